"""Expert parallelism: ``ExpertParallelMoE`` (experts split over the GPUs, NCCL all-to-all) against the
single-GPU ``MoELayer`` holding all experts, forward and forward+backward, with the share of the layer
time spent in the two token all-to-alls (four with the backward), timed with CUDA events around each.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/bench_expert_parallel.py

Every rank feeds its own ``--tokens`` tokens (default d=1024, f=2048, E=24, k=2, T=16384, bf16) to both
layers; the single-GPU layer runs on each GPU alone with all E experts, the EP layer with E/P of them
and the other ranks' tokens. The all-to-all spans include waiting for the slower rank (that is what a
training step pays). Rank 0 prints one row per rank and writes ``--out`` (JSON) if given.
``--device cpu`` runs the same script on gloo with the reference experts (a smoke test of the script;
small shapes advised, e.g. ``--tokens 64 --d-model 32 --d-ff 64 --experts 4``). Not a pytest suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from onerec_fast.distributed import shard_experts
from onerec_fast.modules import MoELayer
from onerec_fast.perf.timing import time_fn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class SpanTimer:
    """``comm_timer`` of the EP layer: CUDA events (the host clock on CPU) around each all-to-all."""

    def __init__(self, device: torch.device):
        self.device = device
        self.spans: list = []  # (start, end) event pairs on CUDA, milliseconds on CPU

    @contextlib.contextmanager
    def __call__(self):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.spans.append((time.perf_counter() - t0) * 1e3)

    def take_ms(self) -> list[float]:
        """Durations of the spans recorded since the last call (syncs on CUDA), then forget them."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            out = [s.elapsed_time(e) for s, e in self.spans]
        else:
            out = list(self.spans)
        self.spans.clear()
        return out


def time_with_comm(fn, timer: SpanTimer, device: torch.device, spans_per_run: int, warmup: int, rep: int):
    """Median over ``rep`` runs of (layer ms, all-to-all ms): each run bracketed like ``time_fn`` and its
    ``spans_per_run`` all-to-all spans summed."""
    for _ in range(warmup):
        fn()
    timer.take_ms()
    layer_ms, comm_ms = [], []
    for _ in range(rep):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            layer_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            layer_ms.append((time.perf_counter() - t0) * 1e3)
        spans = timer.take_ms()
        if len(spans) != spans_per_run:
            raise RuntimeError(f"expected {spans_per_run} all-to-alls per run, timed {len(spans)}")
        comm_ms.append(sum(spans))
    return statistics.median(layer_ms), statistics.median(comm_ms)


def fwd(layer, x):
    def run():
        with torch.no_grad():
            layer(x)
    return run


def fwd_bwd(layer, x, gy):
    def run():
        layer.zero_grad(set_to_none=True)  # no accumulation adds in the timed step
        x.grad = None
        layer(x).backward(gy)
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per rank")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=24)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", choices=("softmax", "sigmoid"), default="softmax")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rep", type=int, default=20)
    p.add_argument("--out", help="JSON file for the results (rank 0)")
    args = p.parse_args(argv)

    if args.device == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast on the shared machines
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = DTYPES[args.dtype]
    T, d, f, E, k = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k

    torch.manual_seed(0)  # the same full layer on every rank
    full = MoELayer(d, f, E, k, router=args.router, dtype=dtype, device=device)
    ep = shard_experts(full)
    timer = SpanTimer(device)
    ep.comm_timer = timer
    g = torch.Generator(device=device).manual_seed(1 + rank)  # each rank its own tokens
    x = torch.randn(T, d, generator=g, device=device, dtype=dtype).requires_grad_()
    gy = torch.randn(T, d, generator=g, device=device, dtype=dtype)

    with torch.no_grad():
        want, got = full(x), ep(x)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        pairs_to_rank = ep.last_stats.tokens_per_expert.view(world, -1).sum(1).tolist()

    row = {"rank": rank, "rel_err_vs_single": err, "pairs_sent_to_rank": pairs_to_rank}
    for name, single_fn, ep_fn, spans in (("fwd", fwd(full, x), fwd(ep, x), 2),
                                          ("fwd+bwd", fwd_bwd(full, x, gy), fwd_bwd(ep, x, gy), 4)):
        dist.barrier()
        row[f"single_{name}_ms"] = time_fn(single_fn, device, warmup=args.warmup, rep=args.rep).median_ms
        dist.barrier()
        layer_ms, comm_ms = time_with_comm(ep_fn, timer, device, spans, args.warmup, args.rep)
        row[f"ep_{name}_ms"], row[f"a2a_{name}_ms"] = layer_ms, comm_ms
        row[f"a2a_{name}_share"] = comm_ms / layer_ms

    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "world": world, "T_per_rank": T, "d": d, "f": f, "E": E, "k": k,
               "router": args.router, "dtype": args.dtype}
        print(" ".join(f"{key}={v}" for key, v in env.items()))
        print(f"{'rank':>4} {'pass':>8} {'single ms':>10} {'EP ms':>8} {'a2a ms':>8} {'a2a share':>9}  "
              f"{'rel err':>8}  pairs sent to each rank")
        for r in rows:
            for name in ("fwd", "fwd+bwd"):
                print(f"{r['rank']:>4} {name:>8} {r[f'single_{name}_ms']:>10.3f} {r[f'ep_{name}_ms']:>8.3f} "
                      f"{r[f'a2a_{name}_ms']:>8.3f} {100 * r[f'a2a_{name}_share']:>8.1f}%  "
                      f"{r['rel_err_vs_single']:>8.1e}  {r['pairs_sent_to_rank']}")
        if args.out:
            tmp = args.out + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"env": env, "rows": rows}, fh, indent=1)
            os.replace(tmp, args.out)  # atomic
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
