"""Benchmark suite: RMSNorm as a bf16-autocast training step runs it.

The input is the fp32 residual stream ``x: [rows, d]`` with an fp32 weight; the output feeds a bf16 matmul.
Shapes: the 0.015b model's encoder on Amazon Sports (256 users x 199 slots, d = 160), and wider rows (16k x
1024, 64k x 2048). Forward and forward+backward (the gradient ``dy`` arrives in bf16). Implementations, all on
the same inputs:

* ``reference`` -- ``nn.RMSNorm``'s path: ``F.rms_norm`` in fp32, then the cast to bf16 that autocast's matmul
  makes (:func:`~onerec_fast.ops.rms_norm.rms_norm_ref`);
* ``compile``   -- the same function under ``torch.compile`` (Inductor fuses the norm and the cast);
* ``triton``    -- :func:`~onerec_fast.ops.rms_norm.rms_norm` (``kernels/rms_norm.py``), writing bf16;
* ``<label>:graph`` (CUDA) -- the same captured in a CUDA graph and replayed: the GPU work without the host's
  launch overhead, as a graphed training step runs it (eager, a call of these sizes is bound by the host).

FLOPs: 4 per element forward, 8 more backward (a memory-bound op: read the GB/s from the time, the MFU
column is near 0).
"""

from __future__ import annotations

import functools

import torch

from onerec_fast.perf.harness import Case, Unavailable
from onerec_fast.perf.timing import capture_cuda_graph

SUITE = "rms_norm"
FULL = ((256 * 199, 160), (16384, 1024), (65536, 2048))
QUICK = ((50, 24),)


@functools.cache
def _compiled_ref():
    from onerec_fast.ops.rms_norm import rms_norm_ref

    return torch.compile(rms_norm_ref)


def _case(device, rows: int, dim: int, out_dtype: torch.dtype, backward: bool, compile_peer: bool) -> Case:
    from onerec_fast.ops.rms_norm import rms_norm, rms_norm_ref

    def setup():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, dim, generator=gen).to(device).requires_grad_(backward)
        w = (1 + 0.1 * torch.randn(dim, generator=gen)).to(device).requires_grad_(backward)
        dy = torch.randn(rows, dim, generator=gen).to(device, out_dtype)
        return {"x": x, "w": w, "dy": dy}

    def timed(fn, graph: bool = False):
        def make(inp):
            def run():
                y = fn(inp["x"], inp["w"], 1e-6, out_dtype=out_dtype)
                return torch.autograd.grad(y, (inp["x"], inp["w"]), inp["dy"]) if backward else y
            try:
                run()
                return capture_cuda_graph(run).replay if graph else run
            except Exception as e:  # noqa: BLE001 -- an optional path that fails here is reported, not fatal
                raise Unavailable(f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from e
        return make

    paths = {"reference": rms_norm_ref, "triton": functools.partial(rms_norm, backend="triton")}
    if compile_peer:
        paths["compile"] = lambda *a, **k: _compiled_ref()(*a, **k)
    impls = {label: timed(fn) for label, fn in paths.items()}
    if torch.device(device).type == "cuda":  # the GPU work alone, as a graphed training step replays it
        impls.update({f"{label}:graph": timed(fn, graph=True) for label, fn in paths.items()})
    flops = rows * dim * (12.0 if backward else 4.0)
    name = f"M{rows} d{dim} fp32->{str(out_dtype).removeprefix('torch.')} {'fwd+bwd' if backward else 'fwd'}"
    return Case(SUITE, name, flops, setup, impls, dtype=out_dtype,
                params={"rows": rows, "d": dim, "backward": backward})


def cases(device: torch.device, quick: bool) -> list[Case]:
    # CPU (the interpreter): fp32 output, as the interpreter cannot run bf16, and no torch.compile peer (its
    # CPU build takes longer than the whole quick suite)
    out_dtype = torch.float32 if quick else torch.bfloat16
    return [_case(device, rows, dim, out_dtype, backward, not quick) for rows, dim in (QUICK if quick else FULL)
            for backward in (False, True)]
