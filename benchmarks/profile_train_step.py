"""Where a training step goes, eager against CUDA graphs (TrainConfig.cuda_graph), per preset at batch 256:
the Trainer's whole loop in steps/s (batches drawn, padded, pinned and checked on the host as in a real run),
the step alone on a resident batch (CUDA events, median of 5 rounds of 20 steps), the host costs per step
(batch build, padding to fixed shapes, check_batch, FLOP count), peak and reserved GPU memory, and a
torch.profiler table of five eager steps.

    python benchmarks/profile_train_step.py ../shared/data/amazon-sports/sequences.txt OUT_DIR [--presets small 0.015b]

Prints one JSON line per preset and mode; writes OUT_DIR/prof_<preset>.txt (by GPU time, then by host time).
Run it alone on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.onerec import OneRec, features_from_dataset
from onerec_fast.train.graph_step import fixed_shape_batch
from onerec_fast.train.pipeline import prepare
from onerec_fast.train.pretrain import TrainConfig, Trainer

PATHWAYS = dict(short_len=20, pos_len=50, lifelong_len=1000)


def host_ms(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def resident_step_ms(tr: Trainer, batch) -> float:
    """Median over 5 rounds of the mean CUDA-event time of 20 steps on one resident (pinned) batch."""
    for _ in range(5):
        tr.train_step(batch)
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            tr.train_step(batch)
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / 20)
    return statistics.median(rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--presets", nargs="+", default=["small", "0.015b"])
    ap.add_argument("--steps", type=int, default=300, help="timed loop steps (after 40 warm-up steps)")
    ap.add_argument("--modes", nargs="+", default=["eager", "graph"], choices=["eager", "graph", "graph+compile"],
                    help="graph+compile: graphs, and the encoder layers through torch.compile (an experiment)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    prep = prepare(args.data, short_len=20, positive_len=50, lifelong_len=1000, splits=("train",), verbose=False)
    ds = prep.datasets["train"]
    rng = np.random.default_rng(0)
    draw = lambda: ds.batch(np.sort(rng.choice(len(ds), 256, replace=False)))  # noqa: E731
    for preset in args.presets:
        cfg = OneRecConfig.preset(preset, **PATHWAYS, **features_from_dataset(ds, prep.item_codes, use_user_id=False))
        for mode in args.modes:
            graphs = mode != "eager"
            torch.manual_seed(0)
            m = OneRec(cfg, prep.item_codes)
            if mode == "graph+compile":
                for layer in m.encoder.layers:
                    layer.compile(dynamic=False)
            tr = Trainer(m, ds, TrainConfig(steps=10**6, batch_size=256, lr=1e-3, log_every=50, cuda_graph=graphs),
                         "cuda", show_progress=False)
            tr.train(40)
            torch.cuda.synchronize()
            t = time.perf_counter()
            tr.train(40 + args.steps)
            torch.cuda.synchronize()
            r = {"preset": preset, "mode": mode, "loop_steps_per_s": args.steps / (time.perf_counter() - t)}
            bc = raw = draw()
            if graphs:
                bc = fixed_shape_batch(raw, cfg.short_len, cfg.pos_len).pin_memory()
                r["graphs"] = len(tr._graphs.graphs)
            r["resident_step_ms"] = resident_step_ms(tr, bc)
            # eager against graphed memory: each captured shape keeps its own pool, which stays reserved
            r["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            r["reserved_gb"] = torch.cuda.memory_reserved() / 1e9
            if graphs:
                r["replays"] = tr._graphs.replays
                r["pad_ms"] = host_ms(lambda: fixed_shape_batch(raw, cfg.short_len, cfg.pos_len), 50)
            else:
                r["flops_ms"] = host_ms(lambda: m.flops(bc, backward=True), 50)
                r["check_batch_ms"] = host_ms(lambda: m.check_batch(bc), 50)
                r["batch_build_ms"] = host_ms(draw, 20)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                    for _ in range(5):
                        tr.train_step(bc)
                    torch.cuda.synchronize()
                with open(f"{args.out}/prof_{preset}.txt", "w") as f:
                    f.write(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
                    f.write(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
            print(json.dumps(r), flush=True)
            del tr, m
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
