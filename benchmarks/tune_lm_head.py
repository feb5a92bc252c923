"""Tune the Triton constrained LM head (kernels/lm_head.py) on this GPU and write kernels/configs/lm_head.json.

    python benchmarks/tune_lm_head.py [--rows 4096] [--vocab 8192] [--dim 1024] [--dtype bfloat16] [--quick] [--dry-run]

Times every candidate config of the ``gemm`` method (normalize="full", levels 1 and 2 of a 1M-item trie, summed)
and of the ``gather`` method (normalize="valid", level 2) with CUDA events and keeps the fastest under the key
``"<method> <dtype> <rows> <vocab> <dim>"`` of this GPU's name (merged into the existing file).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch

from onerec_fast.kernels import lm_head as k
from onerec_fast.perf.timing import time_fn
from onerec_fast.trie import SemanticIDTrie

CONFIG_PATH = os.path.join(os.path.dirname(__file__), "..", "kernels", "configs", "lm_head.json")


def _gemm_configs(quick: bool):
    # quick: the Hopper-shaped corner of the grid (128-row tiles, 64-deep K, 8 warps), 12 configs.
    # BC: children gathered per epilogue step (0 = the whole tile at once; see kernels/lm_head.py).
    grid = ((128,), (128, 256), (64,), (8,), (3, 4), (0, 16, 32)) if quick else \
        ((64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4), (0, 16))
    for bm, bn, bk, warps, stages, bc in itertools.product(*grid):
        if bm * bn >= 128 * 256 and warps == 4:
            continue
        yield {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "BC": bc, "num_warps": warps, "num_stages": stages}


def _gather_configs(quick: bool):
    grid = ((16, 32), (256,), (4, 8)) if quick else ((8, 16, 32), (128, 256, 512), (2, 4, 8))
    for bc, bk, warps in itertools.product(*grid):
        yield {"BC": bc, "BK": bk, "num_warps": warps}


def _best(label, configs, run):
    best, best_us = None, float("inf")
    for cfg in configs:
        try:
            us = time_fn(lambda: run(cfg), "cuda", warmup=2, rep=10).median_ms * 1000
        except Exception as e:  # out of shared memory / registers for this tile: skip it
            print(f"{label} {cfg}: failed ({type(e).__name__})")
            continue
        print(f"{label} {cfg}: {us:.1f} us")
        if us < best_us:
            best, best_us = cfg, us
    print(f"{label} best: {best} {best_us:.1f} us")
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--dry-run", action="store_true", help="print the best configs without writing the file")
    ap.add_argument("--quick", action="store_true", help="a small config grid (12 GEMM, 4 gather configs)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    n = 1_000_000
    first = (torch.rand(n, 1, generator=g) ** 4 * args.vocab).long()
    codes = torch.cat([first, torch.randint(0, args.vocab, (n, 2), generator=g)], 1)
    trie = SemanticIDTrie(codes.cuda(), args.vocab)
    hidden = torch.randn(args.rows, args.dim, device="cuda", dtype=dtype)
    weight = torch.randn(args.vocab, args.dim, device="cuda", dtype=dtype) / args.dim ** 0.5

    def nodes_at(level):
        return torch.randint(0, trie.num_nodes[level], (args.rows,), device="cuda", dtype=torch.int32)

    n1, n2 = nodes_at(1), nodes_at(2)
    def gemm_levels_1_2(cfg):  # a dense level (fan-out up to V) and a sparse one: BC helps only the latter
        for level, nodes in ((1, n1), (2, n2)):
            k.lm_head_gemm(hidden, weight, None, nodes, None, trie.child_start[level], trie.child_tokens[level],
                           trie.max_children[level], False, cfg)

    gemm = _best("gemm", _gemm_configs(args.quick), gemm_levels_1_2)
    gather = _best("gather", _gather_configs(args.quick), lambda cfg: k.lm_head_gather(
        hidden, weight, None, n2, None, trie.child_start[2], trie.child_tokens[2], trie.max_children[2], cfg))
    shape = f"{args.dtype} {args.rows} {args.vocab} {args.dim}"
    found = {f"gemm {shape}": gemm, f"gather {shape}": gather}
    if args.dry_run:
        print(json.dumps(found, indent=1))
        return
    data = {}
    if os.path.exists(CONFIG_PATH):
        with open(CONFIG_PATH) as f:
            data = json.load(f)
    data.setdefault(torch.cuda.get_device_name(), {}).update({key: v for key, v in found.items() if v is not None})
    os.makedirs(os.path.dirname(CONFIG_PATH), exist_ok=True)
    with open(CONFIG_PATH, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {CONFIG_PATH}")


if __name__ == "__main__":
    main()
