"""GPU check of tune-on-first-use (issue 15): MoE forward+backward at a shape without a shipped entry. The first
call tunes (timed), the second hits memory, a new process reads the disk cache; the output matches the reference.

    ONEREC_FAST_CACHE_DIR=$(mktemp -d) ONEREC_FAST_AUTOTUNE=1 python benchmarks/check_tune_on_first_use.py
"""
import json
import os
import subprocess
import sys
import time

import torch

from onerec_fast.ops.moe import moe_ffn, moe_ffn_ref

def step(T=3000, d=768, f=1536, E=16, k=2, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, sc=1.0: (torch.randn(*s, device="cuda", generator=g) * sc).to(torch.bfloat16).requires_grad_()
    x, rw = r(T, d), r(E, d, sc=d ** -0.5)
    w1, w3, w2 = r(E, d, f, sc=d ** -0.5), r(E, d, f, sc=d ** -0.5), r(E, f, d, sc=f ** -0.5)
    torch.cuda.synchronize(); t = time.perf_counter()
    out = moe_ffn(x, rw, w1, w3, w2, k).out
    out.float().square().mean().backward(); torch.cuda.synchronize()
    dt = time.perf_counter() - t
    return dt, out, [p.grad for p in (x, w1, w2)], (x, rw, w1, w3, w2)

if sys.argv[1:] == ["child"]:
    print(json.dumps({"child_first_s": step()[0]})); sys.exit()
t1, out, grads, ins = step()
t2 = step()[0]
ref = moe_ffn_ref(*[t.detach().float().requires_grad_() for t in ins], 2)
ref.out.square().mean().backward()
err = ((out.float() - ref.out).norm() / ref.out.norm()).item()
cache = os.path.join(os.environ["ONEREC_FAST_CACHE_DIR"], "launch_configs", "moe_gemm.json")
entries = json.load(open(cache)) if os.path.exists(cache) else {}
child = subprocess.run([sys.executable, __file__, "child"], capture_output=True, text=True)
print(json.dumps({"first_call_s": t1, "second_call_s": t2, "rel_err_out": err, "cache_gpus": list(entries),
                  "cached_keys": sum(len(v["configs"]) for v in entries.values())}))
print(child.stdout.strip()[-300:], child.stderr.strip()[-500:])
