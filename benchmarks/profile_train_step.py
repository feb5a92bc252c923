"""Where a training step goes: the whole loop's steps/s, the step on a resident batch, the host costs per step
(batch build, check_batch, FLOP count) and a torch.profiler table of five steps, per preset (batch 256).

    python benchmarks/profile_train_step.py ../shared/data/amazon-sports/sequences.txt OUT_DIR

Prints one JSON line per preset; writes OUT_DIR/prof_<preset>.txt (by GPU time, then by host time).
Run it alone on the GPU (benchmarks/RESULTS.md, 2026-12-06 session 6).
"""
import json
import sys
import time

import numpy as np
import torch
from onerec_fast.train.pipeline import prepare
from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.onerec import OneRec, features_from_dataset
from onerec_fast.train.pretrain import TrainConfig, Trainer
from torch.profiler import profile, ProfilerActivity
src, out = sys.argv[1], sys.argv[2]
prep = prepare(src, short_len=20, positive_len=50, lifelong_len=1000, splits=("train",), verbose=False)
ds = prep.datasets["train"]
for preset in ("small", "0.015b"):
    cfg = OneRecConfig.preset(preset, short_len=20, pos_len=50, lifelong_len=1000,
                              **features_from_dataset(ds, prep.item_codes, use_user_id=False))
    torch.manual_seed(0)
    m = OneRec(cfg, prep.item_codes)
    tr = Trainer(m, ds, TrainConfig(steps=10**6, batch_size=256, lr=1e-3, log_every=50, ckpt_every=0),
                 "cuda", show_progress=False)
    tr.train(30); torch.cuda.synchronize()
    t = time.perf_counter(); tr.train(330); torch.cuda.synchronize(); dt = time.perf_counter() - t
    r = {"preset": preset, "loop_steps_per_s": 300 / dt}
    rng = np.random.default_rng(0)
    draw = lambda: ds.batch(np.sort(rng.choice(len(ds), 256, replace=False)))  # noqa: E731
    bc = draw()
    for _ in range(5): tr.train_step(bc)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(50): tr.train_step(bc)
    torch.cuda.synchronize(); r["step_only_per_s"] = 50 / (time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(50): m.flops(bc, backward=True)
    r["flops_ms"] = (time.perf_counter() - t) / 50 * 1e3
    t = time.perf_counter()
    for _ in range(50): m.check_batch(bc)
    r["check_batch_ms"] = (time.perf_counter() - t) / 50 * 1e3
    t = time.perf_counter()
    for _ in range(20): draw()
    r["batch_build_ms"] = (time.perf_counter() - t) / 20 * 1e3
    print(json.dumps(r), flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5): tr.train_step(bc)
        torch.cuda.synchronize()
    with open(f"{out}/prof_{preset}.txt", "w") as f:
        f.write(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
        f.write(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
