"""Tune the Triton MoE grouped GEMMs (kernels/moe_gemm.py) on this GPU and write kernels/configs/moe_gemm.json.

    python benchmarks/tune_moe.py [--shapes 0,2,5] [--kernels gemm1,gemm2] [--quick] [--dry-run]

For every benchmark shape of ``onerec_fast/perf/suites/moe.py`` (index into its FULL list) and every kernel
(gemm1, gemm2 forward; dh, dx, dw13, dw2 backward), times the candidate tile configs with CUDA events on
realistic routing (bf16, softmax router) and keeps the fastest (when it beats the heuristic default)
under the key ``"<kernel> <dtype> d<D> f<F> E<E> k<k> T<pow2(T)>"`` of this GPU (merged into the existing
file, written through ``onerec_fast.kernels.launch_config``). Per shape it prints a summary: router GEMM,
routing, and each kernel's default -> tuned time.
``--quick`` tries a small grid (8 configs per kernel instead of 30 to 45).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from onerec_fast.kernels import launch_config
from onerec_fast.kernels import moe_gemm as g
from onerec_fast.kernels.launch_config import LaunchConfig
from onerec_fast.kernels.moe_routing import router_logits_fwd
from onerec_fast.ops.moe import router_logits
from onerec_fast.ops.moe_routing import moe_route, routing_backends
from onerec_fast.perf.suites.moe import FULL
from onerec_fast.perf.timing import time_fn


def _time_us(fn, device) -> float:
    return time_fn(fn, device, warmup=2, rep=10).median_ms * 1000


def _configs(kernel: str, quick: bool):
    """Candidate tiles; 256-wide tiles and 4-warp 128-row tiles spill registers on sm_90 (ptxas), so
    they are left out."""
    wgrad = kernel in ("dw13", "dw2")
    if quick:
        grid = itertools.product((64, 128), (64, 128), (64,), (8,), (3, 4))
    else:
        grid = itertools.product((64, 128), (64, 128), (32, 64, 128) if wgrad else (32, 64), (4, 8), (3, 4, 5))
    for bm, bn, bk, warps, stages in grid:
        if warps == 4 and bm * bn > 64 * 64:
            continue
        yield LaunchConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


def _fastest_us(label, configs, run, device):
    """``(config, us)`` with the lowest median time (CUDA events); ``(None, inf)`` when none of them runs."""
    cfg, ms = launch_config.fastest(configs, run, torch.device(device), warmup=2, reps=10,
                                    log_line=lambda line: print(f"{label} {line}"))
    print(f"{label} fastest: {cfg and cfg.to_json()} {ms * 1000:.1f} us")
    return cfg, ms * 1000


def tune_shape(d, f, E, k, T, kernels, quick, dev="cuda", dt=torch.bfloat16):
    """Best config per kernel for one shape: ``{key: config}``."""
    gen = torch.Generator(dev).manual_seed(0)
    x = torch.randn(T, d, device=dev, dtype=dt, generator=gen)
    rw = torch.randn(E, d, device=dev, dtype=dt, generator=gen) * d**-0.5
    w1, w3 = (torch.randn(E, d, f, device=dev, dtype=dt, generator=gen) * d**-0.5 for _ in range(2))
    w2 = torch.randn(E, f, d, device=dev, dtype=dt, generator=gen) * f**-0.5
    dy = torch.randn(T, d, device=dev, dtype=dt, generator=gen)
    r = moe_route(router_logits(x, rw), k, backend="triton")
    idx, offs, gate = r.sorted_pair_idx, r.expert_offsets, r.topk_weights.reshape(-1)
    M = T * k
    h, a1, a3 = (torch.empty(M, f, device=dev, dtype=dt) for _ in range(3))
    g.moe_gemm1_fwd(x, w1, w3, idx, offs, k, h, a1, a3)
    da1, da3, hg, _ = g.moe_dh_bwd(dy, w2, gate, idx, offs, a1, a3, k)
    out_pairs = torch.empty(M, d, device=dev, dtype=dt)
    dw13 = (torch.empty_like(w1), torch.empty_like(w3))
    dw2 = torch.empty_like(w2)
    runs = {
        "gemm1": lambda c: g.moe_gemm1_fwd(x, w1, w3, idx, offs, k, h, cfg=c),
        "gemm2": lambda c: g.moe_scatter_gemm(h, w2, idx, offs, out_pairs, b_transposed=False, gate=gate, cfg=c),
        "dh": lambda c: g.moe_dh_bwd(dy, w2, gate, idx, offs, a1, a3, k, cfg=c),
        "dx": lambda c: g.moe_scatter_gemm(da1, w1, idx, offs, out_pairs, b_transposed=True, a2=da3, b2=w3, cfg=c),
        "dw13": lambda c: g.moe_dw13_bwd(x, da1, da3, idx, offs, k, *dw13, cfg=c),
        "dw2": lambda c: g.moe_dw2_bwd(dy, hg, idx, offs, k, dw2, cfg=c),
    }
    # where the time goes besides the grouped GEMMs (untuned, for the record)
    summary = [("router GEMM", _time_us(lambda: router_logits_fwd(x, rw), dev), None)]
    for backend in routing_backends()[:-1]:
        logits = router_logits(x, rw)
        summary.append((f"routing ({backend})", _time_us(lambda: moe_route(logits, k, backend=backend), dev), None))
    found = {}
    for kernel in kernels:
        key = g.config_key(kernel, T, d, f, E, k, x.dtype)
        default = g.default_config(kernel, T, d, f, E, k, dev != "cuda", x.element_size())
        _, default_us = _fastest_us(f"{key} default", [default], runs[kernel], dev)
        best, us = _fastest_us(key, _configs(kernel, quick), runs[kernel], dev)
        summary.append((kernel, default_us, us))
        if best is not None and us < default_us:  # else the heuristic default stays in charge
            found[key] = best
    print(f"== d{d} f{f} E{E} k{k} T{T}: microseconds, default config -> tuned")
    for name, default_us, us in summary:
        print(f"   {name:<18}{default_us:9.1f}" + (f" -> {us:9.1f}" if us is not None else ""))
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(str(i) for i in range(len(FULL))),
                    help=f"indices into the suite's shapes: {[s[1:] for s in FULL]}")
    ap.add_argument("--kernels", default=",".join(g.KERNELS))
    ap.add_argument("--quick", action="store_true", help="a small config grid")
    ap.add_argument("--dry-run", action="store_true", help="print the best configs without writing the file")
    args = ap.parse_args()
    # The tuner times its candidates itself; the set-up launches (no config given) take the stored or default
    # configs instead of tuning on first use.
    os.environ[launch_config.ENV_AUTOTUNE] = "0"
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - set(g.KERNELS)
    if unknown:
        raise SystemExit(f"unknown kernels {sorted(unknown)}; kernels: {g.KERNELS}")
    found = {}
    for i in (int(s) for s in args.shapes.split(",") if s):
        _, d, f, E, k, T = FULL[i]
        found.update(tune_shape(d, f, E, k, T, kernels, args.quick))
    if args.dry_run:
        print(json.dumps({key: cfg.to_json() for key, cfg in found.items()}, indent=1))
        return
    path = launch_config.shipped_path(g.OP)
    gpu = launch_config.device_gpu(torch.device("cuda"))
    launch_config.save_configs(path, gpu, found)
    print(f"wrote {path} ({len(found)} configs for {gpu.name})")


if __name__ == "__main__":
    main()
