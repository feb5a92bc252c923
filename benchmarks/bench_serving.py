"""Serving-style generation benchmark (a plain script): per-request latency and users/s of ``OneRec.generate``.

A request is a batch of users whose features arrive on the host; its latency is what a client sees: the copy of
the batch to the device, trie-constrained beam search, and the copy of the top-10 item ids back (wall clock,
the device synchronized before each request; no request overlaps another). Every request holds different users
(fresh random pathways), and every implementation serves the same requests with the same weights.

    python benchmarks/bench_serving.py                                  # 0.935b, beam 128, 1M items
    python benchmarks/bench_serving.py --batches 1,8,64,256 --requests 50 --impls fused,fused-graph,fused-head,reference
    python benchmarks/bench_serving.py --device cpu --preset tiny --num-items 5000 --codebook-size 64 \\
        --lifelong 64 --batches 1,8 --requests 4 --warmup 1                # a smoke test

Implementations (as in ``bench_model.py``): ``fused`` (fused modules, logits LM head), ``fused-head`` (fused
modules and the fused constrained LM head: no ``[users, beam, V]`` logits), ``fused-graph`` (fused modules, the
decode of every level replayed as one CUDA graph captured per request size: ``generate(cuda_graph=True)``; the
encoder runs eagerly), ``reference`` (plain PyTorch modules and search). Prints one row per implementation and request size: p50 / p99 / mean latency (ms) and
users/s (users served over the summed latencies); writes them to ``--out``/bench_serving.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# a sibling script, not a package
from bench_model import (IMPLS, add_model_arguments, bench_config, bench_device, random_batch,  # noqa: E402
                         reference_weights)


def serve(model, requests: list, device: torch.device, beam: int, search_backend: str, gen_options: dict,
          warmup: int) -> tuple[list[float], float]:
    """Latencies (ms) of ``requests`` (host ``UserBatch``es) served one after another, after ``warmup``
    untimed ones; also the share of returned items that are real."""
    def one(batch_cpu):
        batch = batch_cpu.to(device, non_blocking=False)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(batch, beam_size=beam, num_return=10, search_backend=search_backend,
                                 **gen_options)
        return out.item_ids.cpu()  # the D2H copy synchronizes: the request is done when the ids are on the host

    for i in range(warmup):
        one(requests[i % len(requests)])
    lat, legal = [], []
    for batch_cpu in requests:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = one(batch_cpu)
        lat.append((time.perf_counter() - t0) * 1e3)
        legal.append(float((ids >= 0).float().mean()))
    return lat, statistics.mean(legal)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--batches", default="1,8,64,256", help="users per request, comma separated")
    p.add_argument("--requests", type=int, default=50, help="timed requests per request size")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests first (per size: compiles, tunes)")
    p.add_argument("--impls", default=None, help=f"comma separated, of {sorted(IMPLS)} (default: all; on a CPU all "
                                                 "but fused-graph, which needs CUDA)")
    p.add_argument("--out", default="bench_results/serving")
    args = p.parse_args(argv)
    device = bench_device(args, "bench_serving.py")
    if device is None:
        return 1
    sizes = [int(b) for b in args.batches.split(",")]
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if device.type == "cuda" or i != "fused-graph"]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown or min(sizes) < 1 or args.requests < 1:
        p.error(f"--impls must name {sorted(IMPLS)} (got {unknown}); --batches and --requests must be >= 1")

    from onerec_fast.model.onerec import OneRec
    from onerec_fast.perf.timing import Timing

    cfg, item_codes, state, _ = reference_weights(args, device)
    # Distinct users in every request; the same requests for every implementation.
    requests = {b: [random_batch(cfg, b, args.lifelong, args.num_items, item_codes, seed=100 * b + r)
                    for r in range(args.requests)] for b in sizes}
    print(f"OneRec {args.preset}: beam {args.beam} over {args.num_items} items, {args.requests} requests per size "
          f"after {args.warmup} warm-up; device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    rows = []
    for label in impls:
        backend, gen_options = IMPLS[label]
        with device:
            model = OneRec(bench_config(args, backend))
        model.load_state_dict(state)
        model.eval()
        model.trie(device)  # built once at start-up, as a server would
        search_backend = "reference" if backend == "reference" else "auto"
        for b in sizes:
            lat, legal = serve(model, requests[b], device, args.beam, search_backend, gen_options, args.warmup)
            t = Timing(tuple(lat))
            rows.append({"impl": label, "users": b, "p50_ms": t.median_ms, "p99_ms": t.quantile_ms(0.99),
                         "mean_ms": statistics.mean(lat), "users_per_s": b * len(lat) / (sum(lat) / 1e3),
                         "legal": legal})
            r = rows[-1]
            print(f"{label:<11} {b:>5} users  p50 {r['p50_ms']:9.2f} ms  p99 {r['p99_ms']:9.2f} ms  mean "
                  f"{r['mean_ms']:9.2f} ms  {r['users_per_s']:10.1f} users/s  legal {legal:.3f}", flush=True)
        del model
    base = {r["users"]: r for r in rows if r["impl"] == "reference"}
    for r in rows:
        if r["impl"] != "reference" and r["users"] in base:
            print(f"speedup {r['impl']}/reference at {r['users']} users: p50 "
                  f"{base[r['users']]['p50_ms'] / r['p50_ms']:.2f}x, users/s "
                  f"{r['users_per_s'] / base[r['users']]['users_per_s']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "args": vars(args)}
    (out / "bench_serving.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"results: {out / 'bench_serving.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
