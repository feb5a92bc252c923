"""``onerec-fast tokenize``: item embeddings (content + collaborative) -> RQ-KMeans semantic ids -> stats table.

Examples::

    onerec-fast tokenize --data synthetic
    onerec-fast tokenize --data ../shared/data/ml-100k --codebook-size 64 --out ml100k_rq.safetensors
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from onerec_fast.cli_args import non_negative_int, number, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic', a MovieLens folder (ML-100K/ML-1M), a .csv/.parquet interactions table, "
                             "or a SASRec-style sequence file (default: synthetic)")
    parser.add_argument("--levels", type=positive_int, default=3, help="residual levels (default 3)")
    parser.add_argument("--codebook-size", default="auto",
                        help="codes per level, one int or comma-separated per level; 'auto' = the power of two "
                             "nearest 4 * N^(1/levels) for N items (OneRec uses 8192 for 10^8 items)")
    parser.add_argument("--backend", default="auto", choices=("auto", "faiss", "torch"), help="k-means backend")
    parser.add_argument("--device", default=None, help="device of the torch backend (default: cuda if available)")
    parser.add_argument("--balanced", action="store_true", help="balanced (equal-size) k-means at every level")
    parser.add_argument("--iters", type=non_negative_int, default=20, help="Lloyd iterations per level")
    parser.add_argument("--collisions", default="extra_level", choices=("extra_level", "none"),
                        help="collision policy (default: an extra disambiguation level)")
    parser.add_argument("--dim", type=positive_int, default=64, help="fused item-embedding width")
    parser.add_argument("--neighbour-mean", action="store_true",
                        help="tokenize each item by the mean of its co-occurring items' fused vectors")
    parser.add_argument("--content-weight", type=number(float, min=0.0, max=1.0), default=0.5, help="content share of the fused embedding")
    parser.add_argument("--text", default="auto", choices=("auto", "minilm", "hashed-tfidf"),
                        help="title encoder (auto: MiniLM when the optional package is installed)")
    parser.add_argument("--num-users", type=positive_int, default=None, help="synthetic world: number of users")
    parser.add_argument("--num-items", type=positive_int, default=None, help="synthetic world: number of items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="save the tokenizer (.safetensors, or torch.save otherwise)")


def auto_codebook_size(n: int, levels: int) -> int:
    """Power of two nearest ``4 * n^(1/levels)``, at least 4: about 64 x more code tuples than items, which keeps
    collisions low on ML-100K (3 x 64: 17.5% of items share codes, 3 x 32: 37%)."""
    return max(4, 2 ** round(math.log2(4 * n ** (1.0 / levels))))


def run(args: argparse.Namespace) -> int:
    from onerec_fast.data.sources import load_source
    from onerec_fast.tokenizer.fusion import fuse_item_embeddings
    from onerec_fast.tokenizer.rq_kmeans import RQKMeans

    overrides = {k: v for k, v in (("num_users", args.num_users), ("num_items", args.num_items)) if v is not None}
    t0 = time.perf_counter()
    log, _ = load_source(args.data, seed=args.seed, synthetic_overrides=overrides)
    t_load = time.perf_counter() - t0
    print(log.summary())
    t0 = time.perf_counter()
    emb, info = fuse_item_embeddings(log, dim=args.dim, content_weight=args.content_weight, text=args.text,
                                     seed=args.seed, neighbour_mean=args.neighbour_mean)
    t_fuse = time.perf_counter() - t0
    print(f"item embeddings [{log.num_items}, {args.dim}]: content {info['content_blocks']} "
          f"({info['content_dim']} dims) + collaborative PPMI-SVD ({info['collab_dim']} dims), weight "
          f"{info['content_weight']:.2f}, PCA keeps {info['explained_variance']:.1%} of the variance"
          f"{', then the mean over co-occurring items' if args.neighbour_mean else ''}")
    if args.codebook_size == "auto":
        sizes: int | list[int] = auto_codebook_size(log.num_items, args.levels)
    else:
        parts = [int(s) for s in str(args.codebook_size).split(",")]
        sizes = parts[0] if len(parts) == 1 else parts
    rq = RQKMeans(levels=args.levels, codebook_size=sizes, backend=args.backend, seed=args.seed,
                  balanced=args.balanced, iters=args.iters, collisions=args.collisions, device=args.device)
    t0 = time.perf_counter()
    rq.fit(emb)
    t_fit = time.perf_counter() - t0
    dev = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = emb.to(dev)
    t0 = time.perf_counter()
    codes = rq.encode(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t_enc = time.perf_counter() - t0
    agree = float((codes.cpu() == rq.item_codes[:, : args.levels]).all(1).float().mean())
    print(f"timings: load {t_load:.2f}s, embeddings {t_fuse:.2f}s, fit {t_fit:.2f}s, "
          f"encode {log.num_items} items {t_enc * 1e3:.1f} ms on {dev}; encode matches fit codes for {agree:.1%}")
    if args.out:
        rq.save(args.out)
        print(f"saved {args.out}")
    return 0
