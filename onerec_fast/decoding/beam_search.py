"""Trie-constrained beam search over semantic IDs: only codes of real items come out.

The search runs ``L`` steps (one per code level). At step ``t`` it asks the decoder for next-code scores
of the current prefixes, then one :func:`onerec_fast.ops.beam_step.beam_step` keeps the best ``beam``
(parent beam, valid child) candidates per batch row (semantics in ``docs/TRIE_FORMAT.md``). The loop holds
no host sync: with a capturable ``step_fn`` the whole search can be captured in a CUDA graph.

Non-finite policy: a candidate whose score is NaN (NaN logits or hidden states) is no candidate, like an invalid
code (:mod:`onerec_fast.ops.beam_step`), so it is never returned ahead of a finite one. A batch row left without
any item (every candidate NaN or -inf) gets dead slots and one :class:`~onerec_fast.numerics.NonFiniteWarning`
per search names such rows (one host sync after the loop; skipped while a CUDA graph is being captured).

Stateful decoders (a KV cache per beam) read :class:`BeamSearchState`: ``step_fn(prefix, state)`` gets it
when it takes a second positional parameter (or one named ``state``). ``state.parents`` says which
previous beam each current beam extends, so the decoder reorders its cache with
``cache.index_select(0, state.flat_parents)`` (cache rows ``[B * beam, ...]``) before running the new step.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from onerec_fast.numerics import NonFiniteWarning
from onerec_fast.ops.beam_step import NORMALIZE, BeamStepOutput, beam_step, beam_step_ref
from onerec_fast.ops.lm_head import constrained_lm_head_beam_step, constrained_lm_head_beam_step_ref
from onerec_fast.trie import SemanticIDTrie

__all__ = ["BeamSearchResult", "BeamSearchState", "constrained_beam_search", "constrained_beam_search_ref",
           "run_beam_search"]


class BeamSearchResult(NamedTuple):
    """Per batch row, the ``beam`` best items, best first; slots beyond the number of reachable items are
    dead: code -1 at every level, score -inf, item id -1."""

    codes: torch.Tensor  # int64 [B, beam, L]
    scores: torch.Tensor  # float32 [B, beam]: sum of the per-level log-probs
    item_ids: torch.Tensor  # int64 [B, beam]: the smallest item id with that code


@dataclass
class BeamSearchState:
    """What the search knows before asking ``step_fn`` for level ``step``.

    ``parents: int64 [B, beam]``: the beam of the previous step (within the same batch row) that each
    current beam extends; the identity at step 0. Dead beams point at beam 0 so the index is always valid
    for a gather (their scores are -inf and their results are discarded). ``scores: float32 [B, beam]`` (-inf
    for dead beams), ``nodes: int32 [B, beam]`` (trie node of each prefix, -1 for dead beams).
    """

    step: int
    parents: torch.Tensor
    scores: torch.Tensor
    nodes: torch.Tensor

    @property
    def alive(self) -> torch.Tensor:
        """bool ``[B, beam]``: beams that still hold a valid prefix."""
        return self.scores > float("-inf")

    @property
    def flat_parents(self) -> torch.Tensor:
        """int64 ``[B * beam]``: ``parents`` as row indices into ``[B * beam, ...]`` tensors (for index_select)."""
        b, beam = self.parents.shape
        return (torch.arange(b, device=self.parents.device)[:, None] * beam + self.parents).view(-1)


def _takes_state(fn: Callable) -> bool:
    """True when ``fn`` can take ``(prefix, state)``: a parameter named ``state``, a second required
    positional parameter, or ``*args``."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: call with the prefix only
        return False
    if any(p.name == "state" or p.kind == p.VAR_POSITIONAL for p in params):
        return True
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) >= 2


def _level_weights(lm_head_weight, trie: SemanticIDTrie) -> list[torch.Tensor]:
    ws = list(lm_head_weight) if isinstance(lm_head_weight, Sequence) else [lm_head_weight] * trie.num_levels
    if len(ws) != trie.num_levels:
        raise ValueError(f"lm_head_weight must be one tensor [V, d] or one per level ({trie.num_levels}), "
                         f"got {len(ws)}")
    for lvl, w in enumerate(ws):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
            raise ValueError(f"lm_head_weight (level {lvl}) must be a float tensor [V, d], got "
                             f"{type(w).__name__ if not isinstance(w, torch.Tensor) else tuple(w.shape)}")
        if w.shape[0] != trie.vocab_sizes[lvl]:
            raise ValueError(f"lm_head_weight (level {lvl}) must have {trie.vocab_sizes[lvl]} rows "
                             f"(vocab_size of level {lvl}), got shape {tuple(w.shape)}")
        if w.device != trie.device:
            raise ValueError(f"lm_head_weight (level {lvl}) must be on the trie's device {trie.device}, got {w.device}")
    return ws


def _check_output(name: str, out, shape: tuple[int, ...], level: int, device: torch.device) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        raise TypeError(f"{name} must return a float tensor, got "
                        f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__} at level {level}")
    if tuple(out.shape) != shape:
        raise ValueError(f"{name} must return shape {list(shape)} at level {level}, got {list(out.shape)}")
    if out.device != device:
        raise ValueError(f"{name} must return a tensor on the trie's device {device}, got {out.device}")
    return out


def run_beam_search(step_fn, trie: SemanticIDTrie, batch_size: int, beam_size: int, normalize: str, hidden_fn,
                    lm_head_weight, step: Callable[..., BeamStepOutput],
                    head_step: Callable[..., BeamStepOutput] | None = None) -> BeamSearchResult:
    """The search loop with the beam selection given (what :func:`constrained_beam_search` and its reference run;
    the benchmark suite times other selections through it). ``step(logits [R, V], nodes, scores, trie, level,
    beam, normalize)`` selects the beams on the ``step_fn`` path, ``head_step(hidden [R, d], weight [V, d], nodes,
    scores, trie, level, beam, normalize)`` on the ``hidden_fn`` path; both return a BeamStepOutput ``[B, beam]``."""
    if not isinstance(trie, SemanticIDTrie):
        raise TypeError(f"trie must be a SemanticIDTrie, got {type(trie).__name__}")
    for name, v in (("batch_size", batch_size), ("beam_size", beam_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if (step_fn is None) == (hidden_fn is None):
        raise ValueError("give exactly one of step_fn (prefix -> logits) and hidden_fn (prefix -> hidden states)")
    if hidden_fn is not None and lm_head_weight is None:
        raise ValueError("hidden_fn needs lm_head_weight (the output embedding [V, d])")
    fn, fn_name = (step_fn, "step_fn") if step_fn is not None else (hidden_fn, "hidden_fn")
    if not callable(fn):
        raise TypeError(f"{fn_name} must be callable, got {type(fn).__name__}")
    weights = _level_weights(lm_head_weight, trie) if hidden_fn is not None else None
    pass_state = _takes_state(fn)

    b, beam, levels, dev = batch_size, beam_size, trie.num_levels, trie.device
    codes = torch.zeros(b, beam, levels, dtype=torch.int64, device=dev)
    # Only beam 0 is live at the start (at the root), so the first step yields no duplicate prefixes.
    scores = torch.full((b, beam), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    nodes = torch.full((b, beam), -1, dtype=torch.int32, device=dev)
    nodes[:, 0] = 0
    parents = torch.arange(beam, device=dev).expand(b, beam)
    for t in range(levels):
        state = BeamSearchState(t, parents, scores, nodes)
        prefix = codes[:, :, :t].contiguous()
        out = fn(prefix, state) if pass_state else fn(prefix)
        if weights is None:
            logits = _check_output("step_fn", out, (b, beam, trie.vocab_sizes[t]), t, dev)
            res = step(logits.reshape(b * beam, -1), nodes.view(-1), scores.view(-1), trie, t, beam, normalize)
        else:
            hidden = _check_output("hidden_fn", out, (b, beam, weights[t].shape[1]), t, dev)
            res = head_step(hidden.reshape(b * beam, -1), weights[t], nodes.view(-1), scores.view(-1), trie, t, beam,
                            normalize)
        parents = res.parents.clamp(min=0)
        codes = codes.gather(1, parents[..., None].expand(b, beam, levels))
        # Dead slots keep a placeholder code 0 so a decoder can always embed the prefix.
        codes[:, :, t] = res.tokens.clamp(min=0)
        scores, nodes = res.scores, res.nodes
    alive = scores > float("-inf")
    _warn_rows_without_items(alive)
    item_ids = trie.leaf_item(nodes.view(-1)).view(b, beam)
    return BeamSearchResult(torch.where(alive[..., None], codes, -1), scores, item_ids)


def _warn_rows_without_items(alive: torch.Tensor) -> None:
    """One NonFiniteWarning when some rows of ``alive: bool [B, beam]`` have no live slot: a trie's every prefix
    has children, so only NaN or -inf scores leave a row without items. Not while a CUDA graph is captured (the
    check reads the device)."""
    if alive.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    dead = ~alive[:, 0]  # slot 0 is the best: dead only when the row has no item at all
    if bool(dead.any()):
        rows = dead.nonzero().flatten().tolist()
        shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
        warnings.warn(f"constrained_beam_search: {len(rows)} of {alive.shape[0]} batch rows have no finite "
                      f"candidate (rows {shown}): every score was NaN or -inf (non-finite logits or hidden "
                      "states?); they get dead slots only (item -1, score -inf)", NonFiniteWarning, stacklevel=4)


def constrained_beam_search(step_fn: Callable | None, trie: SemanticIDTrie, batch_size: int, beam_size: int,
                            normalize: str = "full", *, hidden_fn: Callable | None = None,
                            lm_head_weight: torch.Tensor | Sequence[torch.Tensor] | None = None,
                            backend: str = "auto") -> BeamSearchResult:
    """Beam search over the trie's items: the ``beam_size`` best items per batch row, best first.

    ``step_fn(prefix: int64 [B, beam, t]) -> logits [B, beam, V[t]]`` (or ``step_fn(prefix, state)`` with a
    :class:`BeamSearchState`; see the module docstring) is called once per level, ``t = 0 .. L-1``. Instead
    of ``step_fn``, ``hidden_fn(prefix[, state]) -> hidden [B, beam, d]`` with ``lm_head_weight: [V, d]`` (same
    dtype as hidden; or one per level) scores the codes as ``hidden @ lm_head_weight.T`` (float32 accumulation)
    through the fused constrained LM head, which never writes ``[B * beam, V]`` logits. ``normalize``: "full"
    (log-softmax over the whole vocabulary, then invalid codes dropped) or "valid" (log-softmax over each
    prefix's valid children). Dead beams (fewer reachable items than ``beam_size``) carry placeholder code 0
    in the prefix and node -1.

    ``backend``: "auto" (the fastest available), "reference" (plain PyTorch), "cuda" (the fused CUDA beam step
    of ``csrc/beam_step``; on the ``hidden_fn`` path the Triton LM head feeding it), or "triton" (``hidden_fn``
    path only: the Triton LM head, with the CUDA selection kernel when built).

    Returns :class:`BeamSearchResult` ``(codes int64 [B, beam, L], scores float32 [B, beam],
    item_ids int64 [B, beam])``. NaN-scored candidates are dropped; rows left without any item get dead slots and
    a NonFiniteWarning (module docstring).
    """

    def step(logits, nodes, scores, trie_, level, beam, norm):
        return beam_step(logits, nodes, scores, trie_, level, beam, norm, backend=backend)

    # The LM head's fused backend is Triton (it hands its candidates to the CUDA selection kernel).
    head_backend = "triton" if backend == "cuda" and trie.device.type == "cuda" else backend

    def head_step(hidden, weight, nodes, scores, trie_, level, beam, norm):
        return constrained_lm_head_beam_step(hidden, weight, nodes, scores, trie_, level, beam, norm,
                                             backend=head_backend)

    return run_beam_search(step_fn, trie, batch_size, beam_size, normalize, hidden_fn, lm_head_weight, step,
                           head_step)


def constrained_beam_search_ref(step_fn: Callable | None, trie: SemanticIDTrie, batch_size: int, beam_size: int,
                                normalize: str = "full", *, hidden_fn: Callable | None = None,
                                lm_head_weight: torch.Tensor | Sequence[torch.Tensor] | None = None
                                ) -> BeamSearchResult:
    """:func:`constrained_beam_search` with the plain-PyTorch reference step (the oracle)."""
    return run_beam_search(step_fn, trie, batch_size, beam_size, normalize, hidden_fn, lm_head_weight, beam_step_ref,
                           constrained_lm_head_beam_step_ref)
