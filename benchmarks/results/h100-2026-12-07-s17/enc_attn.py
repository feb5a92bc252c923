"""Encoder self-attention of the 0.015b step on Amazon Sports (256 users x 199 slots, 5 heads of 32, bf16),
forward+backward, each path replayed from a CUDA graph (the graphed training step runs it so).
Each user's real keys form one window [lo, hi) (the layout with the padding at both ends).

  sdpa_mask  -- F.scaled_dot_product_attention with a bool key mask [B, 1, 1, S] (the model today: cuDNN)
  sdpa_none  -- the same without a mask (flash; a lower bound, wrong answer for padded users)
  triton     -- onerec_fast padded_cross_attention, key_starts = lo, seqlens_k = hi - lo
  flex       -- FlexAttention (compiled) with a block mask of the window
"""
import statistics
import sys

import torch
import torch.nn.functional as F

from onerec_fast.ops.varlen_attention import padded_cross_attention
from onerec_fast.perf.timing import capture_cuda_graph, time_fn

B, S, H, D = (int(a) for a in (sys.argv[1:5] if len(sys.argv) > 4 else (256, 199, 5, 32)))
dev = torch.device("cuda")
g = torch.Generator().manual_seed(0)
lo = torch.randint(0, 20, (B,), generator=g)
hi = torch.randint(S - 50, S + 1, (B,), generator=g)
lo_d, hi_d = lo.to(dev), hi.to(dev)
slot = torch.arange(S, device=dev)
mask = (slot[None] >= lo_d[:, None]) & (slot[None] < hi_d[:, None])
x = torch.randn(B, S, 3, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
dy = torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16)


def qkv():
    q, k, v = x.unbind(2)  # [B, S, H, D] each
    return q, k, v


def sdpa(use_mask):
    def f():
        q, k, v = (t.transpose(1, 2) for t in qkv())
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :] if use_mask else None)
    return f


def triton():
    q, k, v = qkv()
    return padded_cross_attention(q.transpose(1, 2), k, v, (hi_d - lo_d).to(torch.int32), validate=False,
                                  key_starts=lo_d.to(torch.int32))


flex_fn = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def window(b, h, qi, ki):
        return (ki >= lo_d[b]) & (ki < hi_d[b])

    bm = create_block_mask(window, B, None, S, S, device="cuda")
    fa = torch.compile(flex_attention)

    def flex_fn():
        q, k, v = (t.transpose(1, 2) for t in qkv())
        return fa(q, k, v, block_mask=bm)
except Exception as e:  # noqa: BLE001
    print("flex unavailable:", type(e).__name__, e)

paths = {"sdpa_mask": sdpa(True), "sdpa_none": sdpa(False), "triton": triton}
if flex_fn is not None:
    paths["flex"] = flex_fn
ref = None
for name, fn in paths.items():
    for bwd in (False, True):
        def run(fn=fn, bwd=bwd):
            y = fn()
            return torch.autograd.grad(y, x, dy) if bwd else y
        try:
            out = run()
            gr = capture_cuda_graph(run)
            t = time_fn(gr.replay, dev, warmup=5, rep=30).median_ms
        except Exception as e:  # noqa: BLE001
            print(f"{name} {'fwd+bwd' if bwd else 'fwd'}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        err = ""
        if not bwd and name != "sdpa_none":
            o = out.float()
            # rows outside [lo, hi) are garbage by design (padding queries): compare real rows only
            real = mask[:, None, :, None]
            if ref is None:
                ref = o
            err = f" max|diff| vs sdpa_mask on real rows {((o - ref).abs() * real).max().item():.3e}"
        print(f"B{B} S{S} H{H} D{D} {name:10s} {'fwd+bwd' if bwd else 'fwd    '} {t * 1000:8.1f} us{err}")
