"""One step of trie-constrained beam search: (beam x valid child) candidates -> the best ``beam`` per row.

Semantics (``docs/TRIE_FORMAT.md``; the reference here is the oracle the fused kernels match exactly):
for each batch row, the candidates are (parent beam ``b``, child token ``c``) for every valid child ``c``
of ``b``'s trie node, scored ``scores[b] + logp[b, c]`` where ``logp`` is

* ``normalize="full"``: ``log_softmax`` over the whole vocabulary of the step's logits (Hugging Face), or
* ``normalize="valid"``: ``log_softmax`` over ``b``'s valid children only.

The best ``beam`` candidates come out in descending score, ties broken by the lower flattened index
``b * V + c``. Slots without a finite-score candidate get score -inf, token -1, parent -1, node -1; a dead
(-inf) parent has no candidates.

Non-finite policy: a candidate whose score is NaN (a NaN logit, or under ``"full"`` any NaN among the parent's
logits, which makes its whole log-softmax NaN; a NaN running score) is no candidate, exactly like an invalid
token: it is never returned, so never ahead of a finite one. Both backends agree (the CUDA kernel's score key
maps NaN to "no candidate").

Backends: ``cuda`` (the fused kernel of ``csrc/beam_step/``: log-softmax, mask, top-k in one launch) and
``reference`` (plain PyTorch: dense mask, ``log_softmax``, exact top-k on a 64-bit (score, index) key).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from onerec_fast.backends import cuda_extension, resolve_backend
from onerec_fast.checks import check_tensor
from onerec_fast.trie import SemanticIDTrie

__all__ = ["BeamStepOutput", "beam_step", "beam_step_ref", "topk_lowest_index", "drop_invalid", "NORMALIZE",
           "cuda_beam_step_fn"]

NORMALIZE = ("full", "valid")
IMPLEMENTED = ("cuda", "reference")
CUDA_MAX_BEAM = 1024  # kMaxBeam of csrc/beam_step/beam_step.cuh: the kernel keeps its sorted candidates in smem


class BeamStepOutput(NamedTuple):
    """Result of one beam step for ``B`` rows of ``beam`` beams, best first (dead slots last)."""

    tokens: torch.Tensor  # int64 [B, beam]: chosen code at this level, -1 for a dead slot
    parents: torch.Tensor  # int64 [B, beam]: beam (0..beam-1) of the same row it extends, -1 for a dead slot
    nodes: torch.Tensor  # int32 [B, beam]: trie node at the next depth, -1 for a dead slot
    scores: torch.Tensor  # float32 [B, beam]: running log-prob, -inf for a dead slot


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """An int64 ``[*]`` that orders like the float32 ``x`` (IEEE bits, negatives flipped; -0.0 as +0.0)."""
    bits = (x.float() + 0.0).view(torch.int32).long()
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def topk_lowest_index(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of ``values: [B, n]`` (n < 2**32) along dim 1 by value descending, ties to the lower index.

    ``torch.topk`` does not define the order of ties, so the selection runs on unique 64-bit keys
    ``(order_key(value) << 32) | (2**32 - 1 - index)``. Returns ``(values [B, k], indices int64 [B, k])``.
    """
    low = 0xFFFFFFFF - torch.arange(values.shape[1], device=values.device)
    key = (_order_key(values) << 32) | low
    idx = 0xFFFFFFFF - (key.topk(k, dim=1).values & 0xFFFFFFFF)
    return values.gather(1, idx), idx


def drop_invalid(cand: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Candidate scores ``cand: float32 [R, n]`` with the entries that are no candidate set to -inf: those where
    ``ok: bool [R, n]`` is False, and NaN scores (the non-finite policy in the module docstring)."""
    return cand.masked_fill(~ok | torch.isnan(cand), float("-inf"))


def _check_step(logits, nodes, scores, trie, level: int, beam: int, normalize: str) -> tuple[int, int]:
    if not isinstance(trie, SemanticIDTrie):
        raise TypeError(f"trie must be a SemanticIDTrie, got {type(trie).__name__}")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < trie.num_levels:
        raise ValueError(f"level must be an int in [0, {trie.num_levels}), got {level!r}")
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be an int >= 1, got {beam!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    check_tensor("logits", logits, ndim=2, dtype=(torch.float32, torch.float16, torch.bfloat16), device=trie.device)
    rows, v = logits.shape
    if v != trie.vocab_sizes[level]:
        raise ValueError(f"logits must have {trie.vocab_sizes[level]} columns (vocab_size of level {level}), "
                         f"got shape {tuple(logits.shape)}")
    if rows == 0 or rows % beam:
        raise ValueError(f"logits must have a positive multiple of beam ({beam}) rows (B * beam), got {rows}")
    if beam * v >= 2**32:
        raise ValueError(f"beam * vocab_size must be < 2**32 (flattened candidate index), got {beam} * {v}")
    check_tensor("nodes", nodes, ndim=1, dtype=torch.int32, device=trie.device)
    check_tensor("scores", scores, ndim=1, dtype=torch.float32, device=trie.device)
    for name, t in (("nodes", nodes), ("scores", scores)):
        if t.shape[0] != rows:
            raise ValueError(f"{name} must have {rows} entries (one per logits row), got {t.shape[0]}")
    return rows // beam, v


def beam_step_ref(logits: torch.Tensor, nodes: torch.Tensor, scores: torch.Tensor, trie, level: int, beam: int,
                  normalize: str = "full") -> BeamStepOutput:
    """Reference beam step (plain PyTorch, no host sync).

    ``logits: [R, V]`` (R = B * beam, any float dtype; computed in float32), ``nodes: int32 [R]`` (depth-``level``
    trie node of each beam, -1 dead), ``scores: float32 [R]`` (-inf dead) -> :class:`BeamStepOutput` ``[B, beam]``.
    """
    rows, v = logits.shape
    b = rows // beam
    mask = trie.valid_mask(level, nodes)
    x = logits.float()
    if normalize == "valid":
        x = x.masked_fill(~mask, float("-inf"))
    # Rows without valid children give NaN under "valid"; the mask turns them (and all invalid tokens) to -inf.
    cand = drop_invalid(scores[:, None] + torch.log_softmax(x, dim=-1), mask)
    top, flat = topk_lowest_index(cand.view(b, beam * v), beam)
    dead = top == float("-inf")
    parents = torch.where(dead, -1, flat // v)
    tokens = torch.where(dead, -1, flat % v)
    parent_rows = (torch.arange(b, device=logits.device)[:, None] * beam + parents.clamp(min=0)).view(-1)
    child = trie.step_unchecked(level, nodes[parent_rows].long(), tokens.view(-1)).view(b, beam)
    new_nodes = torch.where(dead, -1, child).to(torch.int32)
    return BeamStepOutput(tokens, parents, new_nodes, top)


def cuda_beam_step_fn():
    """The extension's fused beam step kernel (``_C.beam_step``), or None when it is not built."""
    ext = cuda_extension()
    return getattr(ext, "beam_step", None) if ext is not None else None


def beam_step(logits: torch.Tensor, nodes: torch.Tensor, scores: torch.Tensor, trie, level: int, beam: int,
              normalize: str = "full", *, backend: str = "auto") -> BeamStepOutput:
    """One constrained beam step (see the module docstring).

    ``logits: [R, V[level]]`` (R = B * beam), ``nodes: int32 [R]``, ``scores: float32 [R]`` on the trie's device
    -> :class:`BeamStepOutput` of ``[B, beam]`` tensors. ``backend``: "auto", "cuda" or "reference".
    """
    _check_step(logits, nodes, scores, trie, level, beam, normalize)
    chosen = resolve_backend("beam_step", backend, logits.device, IMPLEMENTED)
    if chosen == "cuda":
        why = ("the extension onerec_fast._C has no beam_step kernel (csrc/beam_step/ was not built)"
               if cuda_beam_step_fn() is None else
               f"beam {beam} > {CUDA_MAX_BEAM}" if beam > CUDA_MAX_BEAM else None)
        if why is not None:
            if backend not in (None, "auto"):
                raise RuntimeError(f"beam_step: backend 'cuda' requested but unavailable: {why}")
            chosen = "reference"
    if chosen == "reference":
        return beam_step_ref(logits, nodes, scores, trie, level, beam, normalize)
    dense_root = trie.dense_root if level == 0 else None
    return BeamStepOutput(*beam_step_cuda(logits, nodes.contiguous(), scores.contiguous(), trie.child_start[level],
                                          trie.child_tokens[level], dense_root, beam, normalize))


@torch.library.custom_op("onerec_fast::beam_step", mutates_args=())
def beam_step_cuda(logits: torch.Tensor, nodes: torch.Tensor, scores: torch.Tensor, child_start: torch.Tensor,
                   child_tokens: torch.Tensor, dense_root: torch.Tensor | None, beam: int, normalize: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused CUDA beam step on one level's trie arrays; returns (tokens, parents, nodes, scores) ``[B, beam]``."""
    return tuple(cuda_beam_step_fn()(logits, nodes, scores, child_start, child_tokens, dense_root, beam,
                                     normalize == "valid"))


@beam_step_cuda.register_fake
def _beam_step_fake(logits, nodes, scores, child_start, child_tokens, dense_root, beam, normalize):
    b = logits.shape[0] // beam
    idx = logits.new_empty((b, beam), dtype=torch.int64)
    return idx, torch.empty_like(idx), logits.new_empty((b, beam), dtype=torch.int32), \
        logits.new_empty((b, beam), dtype=torch.float32)
