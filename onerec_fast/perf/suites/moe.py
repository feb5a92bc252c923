"""Benchmark suite: the MoE FFN layer (issue 3), forward and forward+backward, bf16 on CUDA.

Shapes: OneRec-0.935B decoder ``d=1024, f=2048, E=24, k=2`` at T = 512, 4096, 16384; OneRec-2.6B
``k=4`` at T = 4096, 16384; DeepSeek-like ``d=2048, f=1408, E=64, k=6, T=16384``. Softmax router with
top-k renormalisation; the whole layer (router GEMM, routing, experts, combine) is timed.

Implementations (every one gets the same inputs):

* ``reference``: the per-expert loop users write (Hugging Face Mixtral style): fp32 softmax + topk,
  then for each expert ``torch.where`` its tokens, gather, SwiGLU, ``index_add_`` back; in the
  activation dtype. (``moe_ffn_ref``, the test oracle, runs every expert densely in fp32: not a fair
  speed baseline.)
* ``torch_grouped_mm``: the PyTorch-native pipeline as torchtitan does it: argsort permutation, rows
  gathered into per-expert groups padded to 16 rows, ``grouped_mm`` experts (``F.grouped_mm`` or
  ``torch._grouped_mm``, bf16, int32 group ends, column-major expert weights as torchtitan stores
  them), gate multiply and ``index_add_`` scatter back.
* ``triton``: ``moe_ffn(backend="triton")``: Triton routing + Triton grouped GEMMs.
* ``cuda``: ``moe_ffn(backend="cuda")``: one-launch CUDA routing + Triton grouped GEMMs.
* ``cuda_graph`` (forward only): the best kernel backend's forward captured once in a CUDA graph and replayed.

``quick=True`` (CPU): tiny fp32 shapes, ``reference`` and ``triton`` (interpreter) only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onerec_fast.backends import backends
from onerec_fast.ops.moe import moe_backends, moe_ffn
from onerec_fast.perf.flops import moe_flops
from onerec_fast.perf.harness import Case, Unavailable
from onerec_fast.perf.timing import capture_cuda_graph

SUITE = "moe"
# (label, d, f, E, k, T)
FULL = [
    ("0.935B", 1024, 2048, 24, 2, 512),
    ("0.935B", 1024, 2048, 24, 2, 4096),
    ("0.935B", 1024, 2048, 24, 2, 16384),
    ("2.6B", 1024, 2048, 24, 4, 4096),
    ("2.6B", 1024, 2048, 24, 4, 16384),
    ("DeepSeek-like", 2048, 1408, 64, 6, 16384),
]
QUICK = [("tiny", 32, 64, 4, 2, 16)]
GROUP_ALIGN = 16  # rows per expert group rounded up for grouped_mm, as torchtitan pads them


def _loop_moe(x, rw, w1, w3, w2, k):
    """Per-expert loop with data-dependent gathers (host syncs), Mixtral style."""
    probs = torch.softmax(F.linear(x, rw).float(), -1)
    w, sel = probs.topk(k, -1)
    w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(sel == e)
        h = F.silu(x[tok] @ w1[e]) * (x[tok] @ w3[e])
        out.index_add_(0, tok, (h @ w2[e]) * w[tok, slot, None])
    return out


def _grouped_mm_fn():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if fn is None:
        raise Unavailable(f"torch {torch.__version__} has neither F.grouped_mm nor torch._grouped_mm")
    return fn


def _grouped_mm_moe(x, rw, w1, w3, w2, k, gmm):
    """torchtitan-style: argsort permutation, groups padded to GROUP_ALIGN rows, grouped_mm, scatter."""
    T, E = x.shape[0], w1.shape[0]
    probs = torch.softmax(F.linear(x, rw).float(), -1)
    w, sel = probs.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    flat = sel.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    ends = torch.cumsum(padded, 0)
    # destination row of each sorted pair: its expert's padded start + its rank inside the expert
    e_sorted = flat[order]
    rank = torch.arange(T * k, device=x.device) - (torch.cumsum(counts, 0) - counts)[e_sorted]
    dest = (ends - padded)[e_sorted] + rank
    tok = order // k
    xp = x.new_zeros((T * k + GROUP_ALIGN * E, x.shape[1]))
    xp[dest] = x[tok]
    offs = ends.to(torch.int32)
    h = F.silu(gmm(xp, w1, offs=offs)) * gmm(xp, w3, offs=offs)
    y = gmm(h, w2, offs=offs)[dest] * w.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def _make_inputs(d, f, E, T, device, dtype, backward):
    g = torch.Generator(device).manual_seed(0)

    def rnd(*shape, scale):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype).requires_grad_(backward)

    x = rnd(T, d, scale=1.0)
    params = [rnd(E, d, scale=d**-0.5), rnd(E, d, f, scale=d**-0.5), rnd(E, d, f, scale=d**-0.5),
              rnd(E, f, d, scale=f**-0.5)]
    dy = torch.randn(T, d, generator=g, device=device).to(dtype)
    return {"x": x, "params": params, "dy": dy}


def _col_major(w: torch.Tensor) -> torch.Tensor:
    """The same expert weights ``[E, K, N]`` stored column-major (as torchtitan keeps them for grouped_mm)."""
    return w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(w.requires_grad)


def _timed(forward, backward: bool, layout=None):
    """inputs -> zero-arg fn running ``forward(x, rw, w1, w3, w2)`` (and its backward with ``dy``);
    ``layout`` maps each expert weight to the storage the implementation wants (once, untimed)."""

    def make(inp):
        rw, *experts = inp["params"]
        args = [inp["x"], rw, *(layout(w) if layout else w for w in experts)]
        if not backward:
            def fwd():
                with torch.no_grad():
                    return forward(*args)
            return fwd

        def fwd_bwd():
            out = forward(*args)
            return torch.autograd.grad(out, args, inp["dy"])
        return fwd_bwd

    return make


def cases(device: torch.device, quick: bool) -> list[Case]:
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = QUICK if quick or not cuda else FULL
    out = []
    for label, d, f, E, k, T in shapes:
        for backward in (False, True):
            impls = {}

            def reference(inp, k=k, backward=backward):
                return _timed(lambda x, rw, w1, w3, w2: _loop_moe(x, rw, w1, w3, w2, k), backward)(inp)

            impls["reference"] = reference
            if cuda:
                def grouped(inp, k=k, backward=backward):
                    gmm = _grouped_mm_fn()
                    return _timed(lambda x, rw, w1, w3, w2: _grouped_mm_moe(x, rw, w1, w3, w2, k, gmm), backward,
                                  _col_major)(inp)

                impls["torch_grouped_mm"] = grouped
            for backend in ("triton", "cuda") if cuda else ("triton",):
                def kernel(inp, k=k, backward=backward, backend=backend):
                    if backend not in moe_backends() or not backends()[backend].available:
                        raise Unavailable(f"{backend} backend unavailable: {backends()[backend].reason}"
                                          if not backends()[backend].available else
                                          "the extension has no moe_route_fwd")
                    return _timed(lambda *a: moe_ffn(*a, k, backend=backend).out, backward)(inp)

                impls[backend] = kernel
            if cuda and not backward:
                # Inference as a serving loop runs it: the whole forward replayed from a CUDA graph, so the
                # host's launch work (about 0.2 ms at T=512, more than the GPU's) is off the clock.
                def graphed(inp, k=k):
                    best = moe_backends()[0]
                    return capture_cuda_graph(_timed(lambda *a: moe_ffn(*a, k, backend=best).out, False)(inp)).replay

                impls["cuda_graph"] = graphed
            out.append(Case(
                suite=SUITE,
                name=f"{label} d{d} f{f} E{E} k{k} T{T} {'fwd+bwd' if backward else 'fwd'}",
                flops=moe_flops(T, d, f, E, k, backward=backward),
                setup=lambda d=d, f=f, E=E, T=T, backward=backward: _make_inputs(d, f, E, T, device, dtype, backward),
                impls=impls,
                dtype=dtype,
                params=dict(d=d, f=f, E=E, k=k, T=T, backward=backward),
            ))
    return out
