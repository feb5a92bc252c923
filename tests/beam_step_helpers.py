"""Helpers shared by the fused beam-step tests (test_beam_step_cuda.py, test_lm_head.py)."""

from __future__ import annotations

import torch

from onerec_fast.perf.timing import time_fn

NEG_INF = float("-inf")


def assert_same_step(out, ref, atol: float = 1e-4, exact: bool = False) -> None:
    """``out`` and ``ref`` are (tokens, parents, nodes, scores) ``[B, beam]``: scores close, dead slots identical
    (-inf / -1), tokens/parents/nodes equal everywhere (``exact``) or except between reference near-ties
    (neighbouring reference scores within ``atol``, where rounding may legitimately swap the order)."""
    tok, par, nod, sc = out
    rt, rp, rn, rs = ref
    assert tok.dtype == torch.int64 and par.dtype == torch.int64 and nod.dtype == torch.int32
    assert sc.dtype == torch.float32 and sc.shape == rs.shape
    dead = rs == NEG_INF
    assert torch.equal(sc == NEG_INF, dead), "dead slots differ"
    assert torch.isfinite(sc[~dead]).all()
    torch.testing.assert_close(sc[~dead], rs[~dead], atol=atol, rtol=1e-5)
    assert (tok[dead] == -1).all() and (par[dead] == -1).all() and (nod[dead] == -1).all()
    mism = (tok != rt) | (par != rp) | (nod.long() != rn.long())
    if exact:
        assert not mism.any(), f"{int(mism.sum())} slots differ from the reference"
        return
    near = torch.zeros_like(mism)
    gap = (rs[:, 1:] - rs[:, :-1]).abs() <= atol
    near[:, 1:] |= gap
    near[:, :-1] |= gap
    assert not (mism & ~near).any(), f"{int((mism & ~near).sum())} slots differ outside near-ties"


def poison_allocator() -> None:
    """Fill the CUDA caching allocator's free blocks (large and small pools) with 0x7F bytes, so outputs a
    kernel should write but does not show up (int 0x7F7F..., float 3.4e38) instead of a plausible -1 / -inf."""
    blocks = [torch.empty(n, dtype=torch.uint8, device="cuda").fill_(0x7F) for n in [256 << 20] + [256 << 10] * 64]
    torch.cuda.synchronize()
    del blocks


def median_us(fn) -> float:
    """Median CUDA-event latency of ``fn`` in microseconds."""
    return time_fn(fn, "cuda", warmup=3, rep=20).median_ms * 1000
