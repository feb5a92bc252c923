"""Tune the launch configs of the variable-length attention kernels on this GPU.

Times every candidate tile config of each kernel (forward; backward dq, dk/dv of the two-kernel path;
the one-pass backward) on a representative ragged batch (B=1024 rows of Lk uniform in [512, 2048],
Hq = Hkv = 8), rejects configs that do not compile, run out of resources or disagree with the default
config, and writes the fastest per shape key (when it beats the heuristic default by ``MIN_GAIN``; else
the key is removed) into ``kernels/configs/varlen_attention.json`` under this GPU (other GPUs' entries are
kept; written through ``onerec_fast.kernels.launch_config``). Run on the target GPU:

    python benchmarks/tune_varlen_attention.py                       # bf16, head_dim 64 and 128, Lq 128
    python benchmarks/tune_varlen_attention.py --head-dims 32 64 128 --seqlens-q 16 32 64 128 --dtypes bfloat16 float16
    python benchmarks/tune_varlen_attention.py --dry-run              # print, write nothing
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

from onerec_fast.kernels import launch_config
from onerec_fast.kernels import varlen_attention as kern
from onerec_fast.kernels.launch_config import LaunchConfig

GRID = {
    "fwd": {"BLOCK_M": (64, 128), "BLOCK_N": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3)},
    "bwd_dq": {"BLOCK_M": (64, 128), "BLOCK_N": (32, 64), "num_warps": (4, 8), "num_stages": (2, 3)},
    "bwd_dkdv": {"BLOCK_M": (32, 64, 128), "BLOCK_N": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2,)},
    # BLOCK_M is every query of the row (the bucket); only the key tile and the pipelining vary
    "bwd_fused": {"BLOCK_M": (128,), "BLOCK_N": (32, 64, 128), "num_warps": (4, 8), "num_stages": (1, 2, 3)},
}


def candidates(kernel: str, seqlen_q: int) -> list[LaunchConfig]:
    grid = dict(GRID[kernel])
    bucket = kern.lq_bucket(seqlen_q)
    grid["BLOCK_M"] = (bucket,) if kernel == "bwd_fused" else tuple(m for m in grid["BLOCK_M"] if m <= bucket) or (bucket,)
    return [LaunchConfig(**dict(zip(grid, values))) for values in itertools.product(*grid.values())]


def make_inputs(batch: int, seqlen_q: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(512, 2049, (batch,), generator=g)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total, heads = int(cu[-1]), 8
    dev = "cuda"
    x = {
        "q": torch.randn(batch, heads, seqlen_q, head_dim, device=dev, dtype=dtype),
        "k": torch.randn(total, heads, head_dim, device=dev, dtype=dtype),
        "v": torch.randn(total, heads, head_dim, device=dev, dtype=dtype),
        "dout": torch.randn(batch, heads, seqlen_q, head_dim, device=dev, dtype=dtype),
        "cu": cu.to(dev),
        "out": torch.empty(batch, heads, seqlen_q, head_dim, device=dev, dtype=dtype),
        "lse": torch.empty(batch, heads, seqlen_q, device=dev, dtype=torch.float32),
    }
    kern.varlen_attention_fwd(x["q"], x["k"], x["v"], cu[:-1].to(dev), x["cu"][1:], x["out"], x["lse"],
                              head_dim**-0.5)
    return x


def runner(kernel: str, x: dict, cfg: LaunchConfig | None):
    """A zero-arg fn running the pass ``kernel`` belongs to with ``cfg`` for it, and its outputs."""
    q, k, v, cu = x["q"], x["k"], x["v"], x["cu"]
    scale = q.shape[-1] ** -0.5
    if kernel == "fwd":
        out, lse = torch.empty_like(x["out"]), torch.empty_like(x["lse"])
        return (lambda: kern.varlen_attention_fwd(q, k, v, cu[:-1], cu[1:], out, lse, scale, cfg)), (out,)
    dq, dk, dv, delta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(x["lse"])
    configs = {kernel: cfg} if cfg else None
    fused = kernel == "bwd_fused"  # the two-kernel path's configs are timed on that path
    return (lambda: kern.varlen_attention_bwd(x["dout"], q, k, v, x["out"], x["lse"], None, cu[:-1], cu[1:], dq, dk,
                                              dv, delta, scale, configs, fused)), (dq, dk, dv)


# A config is kept only when it beats the heuristic default by this much: a 0.2% "win" of the d64 forward
# at B=512 ran 17% slower than the default at B=1024 on the H200.
MIN_GAIN = 0.03


def tune_one(kernel: str, x: dict, seqlen_q: int, verbose: bool) -> tuple[LaunchConfig | None, float]:
    """``(config, ms)`` of the fastest candidate, or ``(None, default ms)`` when none beats the default
    by ``MIN_GAIN``."""
    default = kern.default_config(kernel, x["q"].shape[-1], seqlen_q, "cuda", x["q"].element_size())
    fn, expect = runner(kernel, x, default)
    fn()
    expect = [t.clone() for t in expect]
    runs = {default: fn}  # the candidates that run and agree with the default, each with its own outputs
    for cfg in candidates(kernel, seqlen_q):
        try:
            fn, outs = runner(kernel, x, cfg)
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 -- out of shared memory/registers, or a compile failure
            if verbose:
                print(f"    {cfg.to_json()}: skipped ({type(e).__name__})")
            continue
        err = max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                  for a, b in zip(outs, expect))
        if not err < 2e-2:
            print(f"    {cfg.to_json()}: WRONG (relative difference {err:.2e} from the default config)")
            continue
        runs.setdefault(cfg, fn)
    cuda = torch.device("cuda")
    _, base_ms = launch_config.fastest([default], lambda c: runs[c](), cuda, warmup=5, reps=20)
    best, best_ms = launch_config.fastest([c for c in runs if c != default], lambda c: runs[c](), cuda, warmup=5,
                                          reps=20, log_line=(lambda line: print(f"    {line}")) if verbose else None)
    if best is None or best_ms > (1 - MIN_GAIN) * base_ms:
        best, best_ms = None, base_ms
    print(f"  {kernel}: default {base_ms:.4f} ms -> best {best_ms:.4f} ms {best.to_json() if best else 'default'}")
    return best, best_ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seqlens-q", nargs="+", type=int, default=[128])
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--kernels", nargs="+", default=list(kern.KERNELS), choices=kern.KERNELS)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_varlen_attention: needs a CUDA device", file=sys.stderr)
        return 1
    # The tuner times its candidates itself; launches it gives no config (the inputs' forward, the other
    # backward kernel of a pass) take the stored or default configs instead of tuning on first use.
    os.environ[launch_config.ENV_AUTOTUNE] = "0"
    gpu = launch_config.device_gpu(torch.device("cuda"))
    found = {}
    for dtype_name, head_dim, seqlen_q in itertools.product(args.dtypes, args.head_dims, args.seqlens_q):
        dtype = getattr(torch, dtype_name)
        print(f"{gpu.name}: {dtype_name} head_dim {head_dim} Lq {seqlen_q} (bucket {kern.lq_bucket(seqlen_q)})")
        x = make_inputs(args.batch, seqlen_q, head_dim, dtype)
        keys = kern.keys_per_row(x["k"], args.batch)
        for kernel in args.kernels:
            cfg, _ = tune_one(kernel, x, seqlen_q, args.verbose)
            found[kern.config_key(kernel, head_dim, seqlen_q, keys, dtype)] = cfg  # None: the default
        del x
        torch.cuda.empty_cache()
    if args.dry_run:
        print(json.dumps({key: cfg and cfg.to_json() for key, cfg in found.items()}, indent=1))
        return 0
    path = launch_config.shipped_path(kern.OP)
    launch_config.save_configs(path, gpu, found)
    print(f"wrote {sum(c is not None for c in found.values())} configs for {gpu.name} to {path}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
