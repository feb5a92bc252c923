"""Where the MoE layer's GPU time goes: device time per kernel of ``moe_ffn`` (torch.profiler), forward and
forward+backward, bf16, on the benchmark suite's shapes.

    python benchmarks/profile_moe.py [--shapes 0,2] [--backend cuda] [--calls 10]

``--shapes`` indexes ``onerec_fast/perf/suites/moe.py``'s FULL list (default: 0.935B at T=512 and 16384).
Prints, per shape and pass, the kernels by device time per call and their total. Needs a CUDA device.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from onerec_fast.ops.moe import moe_ffn
from onerec_fast.perf.suites.moe import FULL


def profile_shape(d, f, E, k, T, backward: bool, backend: str, calls: int, rows: int = 14) -> None:
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(dev).manual_seed(0)
    x = torch.randn(T, d, device=dev, dtype=dt, generator=g).requires_grad_(backward)
    params = [(torch.randn(*s, device=dev, generator=g) * s[-2] ** -0.5).to(dt).requires_grad_(backward)
              for s in [(E, d), (E, d, f), (E, d, f), (E, f, d)]]
    dy = torch.randn(T, d, device=dev, dtype=dt, generator=g)

    def run():
        with torch.set_grad_enabled(backward):
            out = moe_ffn(x, *params, k, backend=backend).out
            if backward:
                torch.autograd.grad(out, [x, *params], dy)

    for _ in range(5):  # compile, allocator warm-up
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    print(f"==== d{d} f{f} E{E} k{k} T{T} {'fwd+bwd' if backward else 'fwd'}: device us per call, launches per call")
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    for e in events[:rows]:
        if e.self_device_time_total > 0:
            print(f"  {e.self_device_time_total / calls:9.1f} us  x{e.count // calls:<3} {e.key[:90]}")
    print(f"  total {sum(e.self_device_time_total for e in events) / calls:.1f} us")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0,2", help=f"indices into {[s[1:] for s in FULL]}")
    ap.add_argument("--backend", default="cuda", choices=("cuda", "triton"))
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_moe: needs a CUDA device")
    for i in (int(s) for s in args.shapes.split(",") if s):
        _, d, f, E, k, T = FULL[i]
        for backward in (False, True):
            profile_shape(d, f, E, k, T, backward, args.backend, args.calls)


if __name__ == "__main__":
    main()
