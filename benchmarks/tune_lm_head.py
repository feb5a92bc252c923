"""Tune the Triton constrained LM head (kernels/lm_head.py) on this GPU and write kernels/configs/lm_head.json.

    python benchmarks/tune_lm_head.py [--rows 4096] [--vocab 8192] [--dim 1024] [--dtype bfloat16] [--quick] [--dry-run]

Times every candidate config of the ``gemm`` method (normalize="full", levels 1 and 2 of a 1M-item trie, summed)
and of the ``gather`` method (normalize="valid", level 2) with CUDA events and keeps the fastest under the key
``"<method> <dtype> R<pow2 rows> V<vocab> d<dim>"`` of this GPU (merged into the existing file, written through
``onerec_fast.kernels.launch_config``).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from onerec_fast.kernels import launch_config
from onerec_fast.kernels import lm_head as k
from onerec_fast.kernels.launch_config import LaunchConfig
from onerec_fast.trie import SemanticIDTrie


def _gemm_configs(quick: bool):
    # quick: the Hopper-shaped corner of the grid (128-row tiles, 64-deep K, 8 warps), 12 configs.
    # BLOCK_C: children gathered per epilogue step (0 = the whole tile at once; see kernels/lm_head.py).
    grid = ((128,), (128, 256), (64,), (8,), (3, 4), (0, 16, 32)) if quick else \
        ((64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4), (0, 16))
    for bm, bn, bk, warps, stages, bc in itertools.product(*grid):
        if bm * bn >= 128 * 256 and warps == 4:
            continue
        yield LaunchConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, BLOCK_C=bc, num_warps=warps,
                           num_stages=stages)


def _gather_configs(quick: bool):
    grid = ((16, 32), (256,), (4, 8)) if quick else ((8, 16, 32), (128, 256, 512), (2, 4, 8))
    for bc, bk, warps in itertools.product(*grid):
        yield LaunchConfig(BLOCK_C=bc, BLOCK_K=bk, num_warps=warps)


def _best(label, configs, run):
    best, ms = launch_config.fastest(configs, run, torch.device("cuda"), warmup=2, reps=10,
                                     log_line=lambda line: print(f"{label} {line}"))
    print(f"{label} best: {best and best.to_json()} {ms * 1000:.1f} us")
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
    found = {k.config_key(method, dtype, args.rows, args.vocab, args.dim): cfg
             for method, cfg in (("gemm", gemm), ("gather", gather)) if cfg is not None}
    if args.dry_run:
        print(json.dumps({key: cfg.to_json() for key, cfg in found.items()}, indent=1))
        return
    path = launch_config.shipped_path(k.OP)
    launch_config.save_configs(path, launch_config.device_gpu(torch.device("cuda")), found)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
