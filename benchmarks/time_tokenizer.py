"""Time the tokenizer (RQ-KMeans fit / encode) and lifelong compression on every available backend.

Plain script (not a pytest suite: these are seconds-long end-to-end steps, not kernels)::

    python benchmarks/time_tokenizer.py                 # ML-100K (if present) + synthetic, CPU (+ CUDA if visible)
    python benchmarks/time_tokenizer.py --large         # + 100k x 64 (3 x 1024) and 1M x 64 (3 x 8192) embeddings
    python benchmarks/time_tokenizer.py --json out.json # also write the rows

Rows: data, N x D, codebooks, backend/device, fit seconds, encode seconds (all N items), reconstruction loss,
level-0 utilization, collision rate; then hierarchical compression throughput (users/s, items/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onerec_fast.data import load_movielens, make_synthetic_world  # noqa: E402
from onerec_fast.tokenizer.cli import auto_codebook_size  # noqa: E402
from onerec_fast.tokenizer import (  # noqa: E402
    RQKMeans,
    faiss_available,
    fuse_item_embeddings,
    hierarchical_kmeans_compress,
)

ML100K = ROOT.parent / "shared" / "data" / "ml-100k"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def backends() -> list[tuple[str, torch.device]]:
    out = []
    if faiss_available():
        out.append(("faiss", torch.device("cpu")))
    out.append(("torch", torch.device("cpu")))
    if torch.cuda.is_available():
        out.append(("torch", torch.device("cuda")))
    return out


def time_rq(name: str, emb: torch.Tensor, sizes: list[int], backend: str, dev: torch.device,
            balanced: bool = False) -> dict:
    rq = RQKMeans(levels=len(sizes), codebook_size=sizes, backend=backend, device=dev, balanced=balanced,
                  verbose=False)
    x = emb.to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    rq.fit(x)
    _sync(dev)
    fit = time.perf_counter() - t0
    rq.encode(x[: min(len(x), 1024)])  # warm-up (CUDA context, kernels)
    _sync(dev)
    t0 = time.perf_counter()
    rq.encode(x)
    _sync(dev)
    enc = time.perf_counter() - t0
    s = rq.stats()
    return {"data": name, "N": emb.shape[0], "D": emb.shape[1], "codebooks": "x".join(map(str, sizes)),
            "balanced": balanced, "backend": f"{backend}/{dev.type}", "fit_s": fit, "encode_s": enc,
            "recon": s["recon_loss"], "util0": s["levels"][0]["utilization"], "collisions": s["collision_rate"]}


def time_compress(users: int, length: int, max_items: int, d: int, dev: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(users * length, d, generator=g).to(dev)
    off = (torch.arange(users + 1) * length).to(dev)
    feats = {"timestamp": torch.arange(users * length, dtype=torch.float64, device=dev)}
    hierarchical_kmeans_compress(x[: 2 * length], None, max_items,
                                 offsets=off[:3])  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    res = hierarchical_kmeans_compress(x, feats, max_items, offsets=off)
    _sync(dev)
    dt = time.perf_counter() - t0
    return {"users": users, "length": length, "max_items": max_items, "D": d, "device": dev.type, "seconds": dt,
            "users_per_s": users / dt, "items_per_s": users * length / dt,
            "out_per_user": float((res.offsets[1:] - res.offsets[:-1]).float().mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="also 100k and 1M random embeddings (use a GPU)")
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)

    datasets = []
    if (ML100K / "u.data").exists():
        log = load_movielens(ML100K)
        t0 = time.perf_counter()
        emb, _ = fuse_item_embeddings(log, dim=64)
        print(f"ml-100k embeddings: {time.perf_counter() - t0:.2f}s")
        datasets.append(("ml-100k", emb, [auto_codebook_size(len(emb), 3)] * 3))
    world = make_synthetic_world()
    t0 = time.perf_counter()
    emb, _ = fuse_item_embeddings(world.log, dim=64)
    print(f"synthetic embeddings: {time.perf_counter() - t0:.2f}s")
    datasets.append(("synthetic", emb, [auto_codebook_size(len(emb), 3)] * 3))
    if args.large:
        g = torch.Generator().manual_seed(0)
        datasets.append(("random-100k", torch.randn(100_000, 64, generator=g), [1024, 1024, 1024]))
        datasets.append(("random-1M", torch.randn(1_000_000, 64, generator=g), [8192, 8192, 8192]))

    rows = []
    print(f"{'data':<12} {'N x D':>12} {'codebooks':>15} {'bal':>4} {'backend':>11} {'fit s':>8} {'encode s':>9} "
          f"{'recon':>7} {'util0':>6} {'collide':>8}")
    for name, emb, sizes in datasets:
        for backend, dev in backends():
            big = emb.shape[0] >= 100_000
            if big and dev.type == "cpu" and backend == "torch":
                continue  # minutes on CPU; faiss covers the CPU side
            for balanced in ((False,) if big else (False, True)):
                r = time_rq(name, emb, sizes, backend, dev, balanced)
                rows.append(r)
                print(f"{r['data']:<12} {r['N']:>6} x {r['D']:<3} {r['codebooks']:>15} {'y' if balanced else 'n':>4} "
                      f"{r['backend']:>11} {r['fit_s']:>8.2f} {r['encode_s']:>9.4f} {r['recon']:>7.4f} "
                      f"{r['util0']:>6.3f} {r['collisions']:>8.4f}", flush=True)

    print(f"\n{'hierarchical compression':<26} {'device':>6} {'seconds':>8} {'users/s':>9} {'items/s':>11} "
          f"{'out/user':>9}")
    comp = []
    shapes = [(64, 5000, 2000, 64), (256, 1000, 128, 64)]
    if args.large or torch.cuda.is_available():
        shapes.append((256, 20000, 2000, 64))
    for users, length, m, d in shapes:
        for dev in [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []):
            if dev.type == "cpu" and users * length > 2_000_000:
                continue
            r = time_compress(users, length, m, d, dev)
            comp.append(r)
            print(f"{users:>4} x {length:<6} -> {m:<6} d={d:<4} {r['device']:>6} {r['seconds']:>8.2f} "
                  f"{r['users_per_s']:>9.1f} {r['items_per_s']:>11.0f} {r['out_per_user']:>9.1f}", flush=True)
    env = {"torch": torch.__version__, "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "threads": torch.get_num_threads()}
    print(f"\nenv: {env}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rq": rows, "compress": comp}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
