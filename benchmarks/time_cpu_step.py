"""CPU training-step timings behind the CPU paths of ``ops/varlen_attention.py`` and ``model/encoder.py``.

    python benchmarks/time_cpu_step.py ../shared/data/ml-100k ../shared/data/amazon-sports/sequences.txt

Per dataset: the median of 6 training steps (after 2) of the ``small`` preset at batch 256 (pathways 20/50/1000,
AdamW), one fresh batch per step. Then the QFormer's cross-attention forward + backward at MovieLens-like
lifelong lengths (256 rows, 4 heads, 16 queries, D 32): padded to the longest row (the reference) against padded
per group of similar rows (the CPU path), with their largest difference. Figures: benchmarks/RESULTS.md.
"""
import sys
import time

import numpy as np
import torch

from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.onerec import OneRec, features_from_dataset
from onerec_fast.ops import varlen_attention as va
from onerec_fast.train.pipeline import prepare


def step_seconds(src: str) -> float:
    prep = prepare(src, short_len=20, positive_len=50, lifelong_len=1000, splits=("train",), verbose=False)
    ds = prep.datasets["train"]
    cfg = OneRecConfig.preset("small", short_len=20, pos_len=50, lifelong_len=1000,
                              **features_from_dataset(ds, prep.item_codes, use_user_id=False))
    torch.manual_seed(0)
    model = OneRec(cfg, prep.item_codes)
    opt = torch.optim.AdamW(model.parameters())
    rng = np.random.default_rng(0)
    times = []
    for _ in range(8):
        b = ds.batch(np.sort(rng.permutation(len(ds))[:256]))
        t = time.perf_counter()
        model(b).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:]))


def qformer_attention_ms() -> tuple[float, float, float]:
    rng = np.random.default_rng(0)
    lens = torch.tensor(np.minimum(rng.pareto(1.2, 256) * 40 + 5, 737).astype(np.int64))
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    total, heads, dim = int(cu[-1]), 4, 32

    def grouped(q, k, v, cu, scale):  # the public op on CPU tensors takes the per-group path
        return va.varlen_cross_attention(q, k, v, cu, scale, backend="reference", return_lse=True, validate=False)

    def run(fn):
        g = torch.Generator().manual_seed(1)
        q = torch.randn(256, heads, 16, dim, generator=g, requires_grad=True)
        k = torch.randn(total, heads, dim, generator=g, requires_grad=True)
        v = torch.randn(total, heads, dim, generator=g, requires_grad=True)
        out, lse = fn(q, k, v, cu, dim ** -0.5)
        (out.sum() + lse.sum()).backward()
        return out.detach()

    ms = []
    for fn in (va.varlen_cross_attention_ref, grouped):
        run(fn)
        t = time.perf_counter()
        for _ in range(3):
            out = run(fn)
        ms.append((time.perf_counter() - t) / 3 * 1e3)
    diff = float((run(va.varlen_cross_attention_ref) - run(grouped)).abs().max())
    return ms[0], ms[1], diff


if __name__ == "__main__":
    for src in sys.argv[1:]:
        print(f"{src}: small, batch 256, median step {step_seconds(src):.3f} s", flush=True)
    padded, grouped, diff = qformer_attention_ms()
    print(f"QFormer cross-attention fwd+bwd: padded {padded:.0f} ms, per-group {grouped:.0f} ms, max |diff| {diff:.1e}")
