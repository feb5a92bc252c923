"""Trie-constrained LM head: the logits of each beam's valid children and the normalizer, without ``[R, V]`` logits.

For hidden states ``hidden: [R, d]`` (R = B * beam), the output embedding ``weight: [V, d]`` (+ ``bias: [V]``) and
one level of a :class:`~onerec_fast.trie.SemanticIDTrie`, :func:`constrained_lm_head` returns
:class:`LMHeadCandidates` in a compact, child-indexed layout (the trie's ``padded_children`` view):

* ``child_logits: float32 [R, M]``, ``M = trie.max_children[level]``: column ``j`` is the logit
  ``hidden[r] @ weight[tok] (+ bias[tok])`` of child ``j`` of ``nodes[r]`` (``tok = child_tokens[child_start[node] + j]``,
  ascending in ``j``). Columns ``j >= count[r]`` (``count`` = the node's fan-out, 0 for a dead row) are
  unspecified: the Triton kernels do not write them (at level 0 almost every row is a dead beam and filling
  them would cost as much as dense logits); the reference sets them to -inf.
* ``lse: float32 [R]``: ``normalize="full"``: ``logsumexp`` over all V logits of the row (Hugging Face);
  ``"valid"``: over the row's children (-inf without children). So ``logp = child_logits - lse[:, None]``.

A row is dead when ``nodes[r]`` is -1 (outside the level's nodes) or, with ``scores`` given, ``scores[r]`` is -inf.

:func:`constrained_lm_head_beam_step` adds the top-``beam`` selection of ``docs/TRIE_FORMAT.md`` over these
candidates: on CUDA the fused kernel of ``csrc/beam_step`` in its compact mode (``_C.beam_step_candidates``),
elsewhere a plain PyTorch selection (:func:`candidates_beam_step_ref`); it equals
``beam_step(hidden @ weight.T + bias, ...)``.

Backends (op name ``lm_head``): ``triton`` (``kernels/lm_head.py``: method ``gemm`` = tiled GEMM with an online
log-sum-exp and a gather of the children's logits in the epilogue, any fan-out, the only way to the full
normalizer; method ``gather`` = only the valid children's dot products, for ``normalize="valid"`` at levels with
few children per node, cost proportional to the children) and ``reference`` (dense logits, then gather).
Inference only: no autograd is registered, so a call that needs gradients raises.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from onerec_fast.backends import cuda_extension, resolve_backend
from onerec_fast.checks import FLOAT_DTYPES, check_dim, check_same, check_tensor
from onerec_fast.ops.beam_step import NORMALIZE, BeamStepOutput, beam_step_ref, drop_invalid, topk_lowest_index
from onerec_fast.trie import SemanticIDTrie

__all__ = [
    "LMHeadCandidates", "constrained_lm_head", "constrained_lm_head_ref", "constrained_lm_head_beam_step",
    "constrained_lm_head_beam_step_ref", "candidates_beam_step_ref", "METHODS",
]

IMPLEMENTED = ("triton", "reference")
METHODS = ("auto", "gemm", "gather")
# "auto" computes only the valid children's dot products (method "gather") when the level's largest fan-out
# is at most V / _GATHER_MAX_FRACTION: beyond that the gathered W rows cost more than the GEMM's tiles.
_GATHER_MAX_FRACTION = 16


class LMHeadCandidates(NamedTuple):
    """Compact candidates of one step (module docstring)."""

    child_logits: torch.Tensor  # float32 [R, max_children]; columns >= the row's fan-out unspecified
    lse: torch.Tensor  # float32 [R]: logp = child_logits - lse[:, None]


def _check(hidden, weight, nodes, trie, level, normalize, bias, scores, method) -> None:
    if not isinstance(trie, SemanticIDTrie):
        raise TypeError(f"trie must be a SemanticIDTrie, got {type(trie).__name__}")
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < trie.num_levels:
        raise ValueError(f"level must be an int in [0, {trie.num_levels}), got {level!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gather" and normalize == "full":
        raise ValueError("method='gather' computes only the children's logits, so it needs normalize='valid' "
                         "(the full normalizer needs every logit: use method='gemm')")
    check_tensor("hidden", hidden, ndim=2, dtype=FLOAT_DTYPES, device=trie.device)
    check_tensor("weight", weight, ndim=2, dtype=FLOAT_DTYPES)
    check_same("hidden", hidden, "weight", weight)
    rows, dim = hidden.shape
    check_dim("weight", weight, 1, dim, "hidden size d of hidden [R, d]")
    check_dim("weight", weight, 0, trie.vocab_sizes[level], f"vocab_size of level {level}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtype=FLOAT_DTYPES)
        check_same("weight", weight, "bias", bias, dtype=False)
        check_dim("bias", bias, 0, weight.shape[0], "V rows of weight")
    check_tensor("nodes", nodes, ndim=1, dtype=torch.int32, device=trie.device)
    check_dim("nodes", nodes, 0, rows, "rows R of hidden [R, d]")
    if scores is not None:
        check_tensor("scores", scores, ndim=1, dtype=torch.float32, device=trie.device)
        check_dim("scores", scores, 0, rows, "rows R of hidden [R, d]")


def _pick_method(method: str, normalize: str, trie, level: int) -> str:
    if method != "auto":
        return method
    few = trie.max_children[level] * _GATHER_MAX_FRACTION <= trie.vocab_sizes[level]
    return "gather" if normalize == "valid" and few else "gemm"


def constrained_lm_head_ref(hidden: torch.Tensor, weight: torch.Tensor, nodes: torch.Tensor, trie, level: int,
                            normalize: str = "full", *, bias: torch.Tensor | None = None,
                            scores: torch.Tensor | None = None) -> LMHeadCandidates:
    """Reference: dense logits ``hidden @ weight.T + bias`` (float32, or float64 for float64 inputs), then the
    children gathered; same arguments and result as :func:`constrained_lm_head`, padding set to -inf."""
    dt = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dt) @ weight.to(dt).t()
    if bias is not None:
        logits = logits + bias.to(dt)
    tokens, ok = trie.padded_children(level, nodes)
    if scores is not None:
        ok = ok & (scores > float("-inf"))[:, None]
    child = logits.gather(1, tokens).masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(logits if normalize == "full" else child, dim=1)
    return LMHeadCandidates(child, lse)


def constrained_lm_head(hidden: torch.Tensor, weight: torch.Tensor, nodes: torch.Tensor, trie, level: int,
                        normalize: str = "full", *, bias: torch.Tensor | None = None,
                        scores: torch.Tensor | None = None, backend: str = "auto",
                        method: str = "auto") -> LMHeadCandidates:
    """Valid children's logits and the normalizer of one step, never materializing ``[R, V]`` logits.

    ``hidden: [R, d]``, ``weight: [V[level], d]`` (same float dtype; float32 accumulation), ``bias: [V] | None``,
    ``nodes: int32 [R]`` (depth-``level`` trie node per row, -1 dead), ``scores: float32 [R] | None`` (rows at -inf
    are skipped). Returns :class:`LMHeadCandidates` ``(child_logits float32 [R, trie.max_children[level]],
    lse float32 [R])`` (module docstring). ``backend``: "auto", "triton", "reference"; ``method`` (triton):
    "auto", "gemm" or "gather" ("gather" needs ``normalize="valid"``). Tip: at level 0 only beam 0 of each
    batch row is live, so passing those B rows alone avoids a GEMM over dead beams.
    """
    _check(hidden, weight, nodes, trie, level, normalize, bias, scores, method)
    chosen = resolve_backend("lm_head", backend, hidden.device, IMPLEMENTED)
    if chosen == "reference":
        return constrained_lm_head_ref(hidden, weight, nodes, trie, level, normalize, bias=bias, scores=scores)
    out = constrained_lm_head_triton(hidden.contiguous(), weight.contiguous(), bias, nodes, scores,
                                     trie.child_start[level], trie.child_tokens[level], int(trie.max_children[level]),
                                     normalize == "valid", _pick_method(method, normalize, trie, level))
    return LMHeadCandidates(*out)


@torch.library.custom_op("onerec_fast::constrained_lm_head", mutates_args=())
def constrained_lm_head_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               nodes: torch.Tensor, scores: torch.Tensor | None, child_start: torch.Tensor,
                               child_tokens: torch.Tensor, max_children: int, normalize_valid: bool, method: str
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernels on one trie level's CSR; returns ``(child_logits [R, max(max_children, 1)], lse [R])``."""
    from onerec_fast.kernels import lm_head as k

    if method == "gather":
        return k.lm_head_gather(hidden, weight, bias, nodes, scores, child_start, child_tokens, max_children)
    return k.lm_head_gemm(hidden, weight, bias, nodes, scores, child_start, child_tokens, max_children,
                          normalize_valid)


@constrained_lm_head_triton.register_fake
def _constrained_lm_head_fake(hidden, weight, bias, nodes, scores, child_start, child_tokens, max_children,
                              normalize_valid, method):
    rows = hidden.shape[0]
    return (hidden.new_empty((rows, max(max_children, 1)), dtype=torch.float32),
            hidden.new_empty((rows,), dtype=torch.float32))


def candidates_beam_step_ref(child_logits: torch.Tensor, lse: torch.Tensor, nodes: torch.Tensor,
                             scores: torch.Tensor, child_start: torch.Tensor, child_tokens: torch.Tensor,
                             beam: int) -> BeamStepOutput:
    """Top-``beam`` selection over compact candidates in plain PyTorch (no host sync).

    ``child_logits: [R, M]``, ``lse: [R]`` (as from :func:`constrained_lm_head`), ``nodes: int32 [R]``,
    ``scores: float32 [R]``, one trie level's ``child_start``/``child_tokens`` -> :class:`BeamStepOutput`
    ``[B, beam]``. Candidate ``(b, j)`` scores ``scores[b] + (child_logits[b, j] - lse[b])``; the flattened index
    ``b * M + j`` orders like ``b * V + token`` because a node's children ascend in token.
    """
    rows, m = child_logits.shape
    b = rows // beam
    num_nodes = child_start.numel() - 1
    live = (nodes >= 0) & (nodes < num_nodes) & (scores > float("-inf"))
    safe = torch.where(live, nodes, 0).long()
    start = torch.where(live, child_start[safe], 0).long()
    count = torch.where(live, child_start[safe + 1] - child_start[safe], 0).long()
    ok = torch.arange(m, device=child_logits.device)[None, :] < count[:, None]
    cand = drop_invalid((child_logits.float() - lse.float()[:, None]) + scores[:, None], ok)
    top, flat = topk_lowest_index(cand.view(b, beam * m), beam)
    dead = top == float("-inf")
    parents = torch.where(dead, -1, flat // m)
    parent_rows = (torch.arange(b, device=cand.device)[:, None] * beam + parents.clamp(min=0)).view(-1)
    entry = (start[parent_rows] + (flat % m).view(-1)).view(b, beam)
    safe_entry = entry.clamp(0, max(child_tokens.numel() - 1, 0))
    tokens = torch.where(dead, -1, child_tokens[safe_entry].long())
    new_nodes = torch.where(dead, -1, entry).to(torch.int32)
    return BeamStepOutput(tokens, parents, new_nodes, top)


@torch.library.custom_op("onerec_fast::beam_step_candidates", mutates_args=())
def beam_step_candidates_cuda(child_logits: torch.Tensor, lse: torch.Tensor, nodes: torch.Tensor,
                              scores: torch.Tensor, child_start: torch.Tensor, child_tokens: torch.Tensor,
                              beam: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused CUDA beam step in compact mode (``_C.beam_step_candidates``, normalizer ``lse`` given)."""
    return tuple(cuda_extension().beam_step_candidates(child_logits, lse, nodes, scores, child_start, child_tokens,
                                                       beam, False))


@beam_step_candidates_cuda.register_fake
def _beam_step_candidates_fake(child_logits, lse, nodes, scores, child_start, child_tokens, beam):
    b = child_logits.shape[0] // beam
    idx = child_logits.new_empty((b, beam), dtype=torch.int64)
    return (idx, torch.empty_like(idx), child_logits.new_empty((b, beam), dtype=torch.int32),
            child_logits.new_empty((b, beam), dtype=torch.float32))


# csrc/beam_step's kMaxBeam: the kernel keeps each CTA's sorted top-beam list in shared memory.
_CUDA_MAX_BEAM = 1024


def _has_cuda_step(device: torch.device, beam: int) -> bool:
    ext = cuda_extension() if device.type == "cuda" else None
    return ext is not None and hasattr(ext, "beam_step_candidates") and beam <= _CUDA_MAX_BEAM


def constrained_lm_head_beam_step(hidden: torch.Tensor, weight: torch.Tensor, nodes: torch.Tensor,
                                  scores: torch.Tensor, trie, level: int, beam: int, normalize: str = "full", *,
                                  bias: torch.Tensor | None = None, backend: str = "auto",
                                  method: str = "auto") -> BeamStepOutput:
    """Fused LM head + constrained beam step: equals ``beam_step(hidden @ weight.T + bias, nodes, scores, trie,
    level, beam, normalize)`` without the ``[R, V]`` logits.

    ``hidden: [R = B * beam, d]``, ``weight: [V[level], d]``, ``nodes: int32 [R]``, ``scores: float32 [R]``
    -> :class:`~onerec_fast.ops.beam_step.BeamStepOutput` of ``[B, beam]`` tensors. ``backend`` picks the LM
    head ("auto", "triton", "reference"); with "triton" on CUDA the selection is the fused CUDA kernel when
    the extension is built (and ``beam <= 1024``), else (and on CPU) :func:`candidates_beam_step_ref`.
    """
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise ValueError(f"beam must be an int >= 1, got {beam!r}")
    if hidden.dim() == 2 and (hidden.shape[0] == 0 or hidden.shape[0] % beam):
        raise ValueError(f"hidden must have a positive multiple of beam ({beam}) rows (B * beam), "
                         f"got shape {tuple(hidden.shape)}")
    _check(hidden, weight, nodes, trie, level, normalize, bias, scores, method)
    if scores is None:
        raise TypeError("scores must be a float32 tensor [R], got None")
    chosen = resolve_backend("lm_head", backend, hidden.device, IMPLEMENTED)
    if chosen == "reference":
        return constrained_lm_head_beam_step_ref(hidden, weight, nodes, scores, trie, level, beam, normalize,
                                                 bias=bias)
    cand = constrained_lm_head(hidden, weight, nodes, trie, level, normalize, bias=bias, scores=scores,
                               backend="triton", method=method)
    cs, ct = trie.child_start[level], trie.child_tokens[level]
    if _has_cuda_step(hidden.device, beam):
        return BeamStepOutput(*beam_step_candidates_cuda(cand.child_logits, cand.lse, nodes, scores, cs, ct, beam))
    return candidates_beam_step_ref(cand.child_logits, cand.lse, nodes, scores, cs, ct, beam)


def constrained_lm_head_beam_step_ref(hidden: torch.Tensor, weight: torch.Tensor, nodes: torch.Tensor,
                                      scores: torch.Tensor, trie, level: int, beam: int, normalize: str = "full", *,
                                      bias: torch.Tensor | None = None) -> BeamStepOutput:
    """Reference of :func:`constrained_lm_head_beam_step`: dense float32 logits, then ``beam_step_ref``."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return beam_step_ref(logits, nodes, scores, trie, level, beam, normalize)
