"""Tune the RMSNorm kernels (kernels/rms_norm.py) on this GPU and write kernels/configs/rms_norm.json.

    python benchmarks/tune_rms_norm.py [--shapes 50944x160 16384x1024 65536x2048] [--dtypes float32 bfloat16] [--dry-run]

For each shape ``ROWSxD`` and input dtype (fp32: the residual stream of a bf16-autocast step, whose output is
bf16; bf16: a bf16 model) times every config of the grid (rows per program so that a program holds 1k-16k values,
2-16 warps) for the forward and the backward with CUDA events (medians, no L2 flush: a training step's norm reads
what the previous op just wrote), and keeps the fastest under the key ``"<fwd|bwd> <dtype> d<block> M<rows>"`` of
this GPU (merged into the existing file, written through ``onerec_fast.kernels.launch_config``). Shapes not
listed are tuned on first use (``launch_config``).
"""

from __future__ import annotations

import argparse
import json

import torch

from onerec_fast.kernels import launch_config
from onerec_fast.kernels import rms_norm as k
from onerec_fast.kernels.launch_config import LaunchConfig


def grid(dim: int) -> list[LaunchConfig]:
    bd = k.block_d(dim)
    rows = [m for m in (1, 2, 4, 8, 16, 32, 64, 128) if 1024 <= m * bd <= 16384] or [1]
    return [LaunchConfig(BLOCK_M=m, num_warps=w) for m in rows for w in (2, 4, 8, 16)]


def shape(text: str) -> tuple[int, int]:
    try:
        rows, dim = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxD (e.g. 16384x1024), got {text!r}") from None
    if rows < 1 or not 1 <= dim <= k.MAX_D:
        raise argparse.ArgumentTypeError(f"need rows >= 1 and 1 <= D <= {k.MAX_D}, got {text!r}")
    return rows, dim


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=shape, nargs="+", default=[(50944, 160), (16384, 1024), (65536, 2048)])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dry-run", action="store_true", help="print the best configs without writing the file")
    args = ap.parse_args()
    dev = torch.device("cuda")
    found = {}
    for (rows, dim), name in ((s, d) for s in args.shapes for d in args.dtypes):
        dtype = getattr(torch, name)
        out_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
        x = torch.randn(rows, dim, device=dev, dtype=dtype)
        w = torch.randn(dim, device=dev)
        y, rstd = k.rms_norm_fwd(x, w, 1e-6, out_dtype)
        dy = torch.randn_like(y)
        for kernel, run in (("fwd", lambda c: k.rms_norm_fwd(x, w, 1e-6, out_dtype, c)),
                            ("bwd", lambda c: k.rms_norm_bwd(dy, x, w, rstd, c))):
            label = f"{kernel} {name} {rows}x{dim}"
            best, ms = launch_config.fastest(grid(dim), run, dev, warmup=3, reps=20,
                                             log_line=lambda line: print(f"{label} {line}"))
            print(f"{label} best: {best and best.to_json()} {ms * 1000:.1f} us")
            if best is not None:
                found[k.config_key(kernel, dtype, rows, dim)] = best
    if args.dry_run:
        print(json.dumps({key: cfg.to_json() for key, cfg in found.items()}, indent=1))
        return
    path = launch_config.shipped_path(k.OP)
    launch_config.save_configs(path, launch_config.device_gpu(dev), found)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
