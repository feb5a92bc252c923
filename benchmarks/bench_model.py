"""End-to-end OneRec benchmark on one GPU (a plain script, not a pytest suite).

Training: step time, tokens/s and MFU of the full OneRec training step (forward, backward, AdamW, expert-
bias update) in bf16 autocast. Generation: trie-constrained beam search (beam 128) for a batch of users:
latency per batch, users/s and inference MFU. Both for the fused kernels (``backend="auto"``: Triton/CUDA
MoE, varlen QFormer attention, CUDA beam step) and for all-reference modules (``backend="reference"``
everywhere), in one run on the same inputs and weights.

    python benchmarks/bench_model.py                       # 0.935b, batch 64, beam 128, 1M-item catalogue
    python benchmarks/bench_model.py --preset 2.6b --batch 32 --out bench_results/model

MFU counts useful FLOPs only (GEMMs and attention over real tokens; ``OneRec.flops`` /
``OneRec.generate_flops``) against ``onerec_fast.perf.peak_flops`` (datasheet dense bf16 unless
``ONEREC_FAST_PEAK=measured``). Users are synthetic with full pathways: 20 short-term, 256 positive and
``--lifelong`` lifelong items each, so the encoder sees 405 tokens per user.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


# implementation label -> (module backend, generate's options)
IMPLS = {"fused": ("auto", {"lm_head": "logits"}),
         "fused-head": ("auto", {"lm_head": "fused"}),
         "fused-graph": ("auto", {"lm_head": "logits", "cuda_graph": True}),
         "reference": ("reference", {"lm_head": "logits"})}


def random_batch(cfg, batch: int, lifelong: int, num_items: int, item_codes: torch.Tensor, seed: int = 0):
    """A ``UserBatch`` of ``batch`` users with full pathways drawn at random (features per the config)."""
    from onerec_fast.data import JaggedItems, UserBatch

    g = torch.Generator().manual_seed(seed)

    def items(n_per_user: int) -> JaggedItems:
        t = batch * n_per_user
        item = torch.randint(0, num_items, (t,), generator=g)
        sparse = {k: torch.randint(0, n, (t,), generator=g) for k, n in cfg.item_cat_features.items() if k != "item"}
        dense = {k: torch.rand(t, generator=g) * 100 for k in cfg.item_num_features}
        offsets = torch.arange(batch + 1, dtype=torch.int32) * n_per_user
        return JaggedItems(offsets, item, item_codes[item], sparse, dense, n_per_user)

    target = torch.randint(0, num_items, (batch,), generator=g)
    return UserBatch(
        user=torch.randint(0, cfg.static_features.get("uid", 1), (batch,), generator=g),
        user_feats={k: torch.randint(0, n, (batch,), generator=g) for k, n in cfg.static_features.items() if k != "uid"},
        short=items(cfg.short_len), positive=items(cfg.pos_len), lifelong=items(lifelong),
        target_item=target, target_codes=item_codes[target])


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, catalogue and device flags shared with ``bench_serving.py``."""
    p.add_argument("--preset", default="0.935b")
    p.add_argument("--beam", type=int, default=128)
    p.add_argument("--lifelong", type=int, default=2000, help="lifelong items per user (QFormer input)")
    p.add_argument("--num-items", type=int, default=1_000_000, help="catalogue size (trie)")
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with --preset tiny)")


def bench_device(args, script: str) -> torch.device | None:
    """``--device``, or None (after saying why) when it asks for CUDA on a machine without it."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU (or --device cpu for a smoke test)")
        return None
    return device


def reference_weights(args, device: torch.device):
    """(config, item codes ``[num_items, 3]``, a state dict every implementation loads, dense parameter count):
    one random model, so all implementations run the same weights."""
    from onerec_fast.model.onerec import OneRec

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    item_codes = torch.randint(0, args.codebook_size, (args.num_items, 3), generator=g)
    cfg = bench_config(args, "reference")
    with device:
        ref = OneRec(cfg, item_codes)
    return cfg, item_codes, {k: v.detach().clone() for k, v in ref.state_dict().items()}, ref.num_parameters()


def bench_config(args, backend: str):
    """The preset with 3 code levels of ``--codebook-size`` and an item-id table covering the catalogue."""
    from onerec_fast.model.config import OneRecConfig

    base = OneRecConfig.preset(args.preset)
    return base.replace(backend=backend, code_levels=3, codebook_size=args.codebook_size,
                        item_cat_features={**base.item_cat_features, "item": args.num_items})


def _timed(fn, device: torch.device, warmup: int, rep: int) -> float:
    """Median milliseconds of ``fn`` over ``rep`` runs after ``warmup`` (CUDA events on GPUs)."""
    from onerec_fast.perf.timing import time_fn

    return time_fn(fn, device, warmup=warmup, rep=rep).median_ms


def _peak_mem_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def _reset_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_impl(label: str, backend: str, gen_options: dict, args, state: dict, batch_cpu, gen_batch_cpu,
               peak) -> dict:
    from onerec_fast.model.onerec import OneRec
    from onerec_fast.perf.mfu import mfu

    device = torch.device(args.device)
    cfg = bench_config(args, backend)
    with device:
        model = OneRec(cfg)
    model.load_state_dict(state)  # same weights for every implementation
    search_backend = "reference" if backend == "reference" else "auto"
    row = {"impl": label, "backend": backend, **gen_options}

    # -- training step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = batch_cpu.to(device)
    model.check_batch(batch_cpu)

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias()

    _reset_mem(device)
    ms = _timed(train_step, device, args.warmup, args.steps)
    flops = model.flops(batch_cpu, backward=True)
    row.update(train_step_ms=ms, train_users_per_s=len(batch_cpu) / (ms / 1e3),
               train_tflops=flops / (ms / 1e3) / 1e12, train_mfu=mfu(flops, ms / 1e3, peak=peak),
               train_peak_mem_gb=_peak_mem_gb(device))
    del opt
    model.zero_grad(set_to_none=True)

    # -- generation
    model.eval()
    gb = gen_batch_cpu.to(device)
    model.trie(device)  # built once, outside the timing

    def generate():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model.generate(gb, beam_size=args.beam, num_return=10, search_backend=search_backend,
                                  **gen_options)

    _reset_mem(device)
    ms = _timed(generate, device, args.warmup, args.gen_reps)
    flops = model.generate_flops(gen_batch_cpu, args.beam)
    out = generate()
    row.update(gen_batch_ms=ms, gen_users_per_s=len(gen_batch_cpu) / (ms / 1e3),
               gen_tflops=flops / (ms / 1e3) / 1e12, gen_mfu=mfu(flops, ms / 1e3, peak=peak),
               gen_peak_mem_gb=_peak_mem_gb(device), gen_legal=float((out.item_ids >= 0).float().mean()))
    del model
    _reset_mem(device)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=64, help="users per training step")
    p.add_argument("--gen-batch", type=int, default=64, help="users per generation batch")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--gen-reps", type=int, default=10, help="timed generation batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--impls", default="fused,reference",
                   help="comma list of fused, fused-head (fused, and generation through the fused constrained LM "
                        "head: OneRec.generate(lm_head='fused')), fused-graph (fused, and the decode replayed as a "
                        "CUDA graph: OneRec.generate(cuda_graph=True)), reference")
    p.add_argument("--out", default="bench_results/model")
    args = p.parse_args(argv)
    device = bench_device(args, "bench_model.py")
    if device is None:
        return 1

    from onerec_fast.backends import describe
    from onerec_fast.perf.mfu import peak_flops

    cfg, item_codes, state, n_params = reference_weights(args, device)
    batch = random_batch(cfg, args.batch, args.lifelong, args.num_items, item_codes, seed=2)
    gen_batch = random_batch(cfg, args.gen_batch, args.lifelong, args.num_items, item_codes, seed=3)
    peak = peak_flops(device, torch.bfloat16)
    print("backends:\n" + describe())
    print(f"OneRec {args.preset}: {n_params / 1e6:.1f}M dense parameters; train batch {args.batch} users x {cfg.enc_len} tokens "
          f"(+{args.lifelong} lifelong items); generation {args.gen_batch} users x beam {args.beam} over "
          f"{args.num_items} items; peak {peak}")
    rows = []
    for label in args.impls.split(","):
        t0 = time.perf_counter()
        rows.append(bench_impl(label, *IMPLS[label], args, state, batch, gen_batch, peak))
        print(f"{label}: done in {time.perf_counter() - t0:.0f}s", flush=True)
    cols = [("train_step_ms", "train ms"), ("train_users_per_s", "train users/s"), ("train_mfu", "train MFU"),
            ("train_peak_mem_gb", "train GB"), ("gen_batch_ms", "gen ms/batch"), ("gen_users_per_s", "gen users/s"),
            ("gen_mfu", "gen MFU"), ("gen_peak_mem_gb", "gen GB")]
    print(f"{'impl':<10}" + "".join(f"{h:>15}" for _, h in cols))
    for r in rows:
        cells = "".join(f"{100 * r[k]:>14.1f}%" if "mfu" in k else f"{r[k]:>15.2f}" for k, _ in cols)
        print(f"{r['impl']:<10}{cells}")
    base = next((r for r in rows if r["impl"] == "reference"), None)
    for r in rows:
        if base is not None and r is not base:
            print(f"speedup {r['impl']}/reference: train {base['train_step_ms'] / r['train_step_ms']:.2f}x, "
                  f"generation {base['gen_batch_ms'] / r['gen_batch_ms']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "peak": str(peak), "args": vars(args)}
    (out / "bench_model.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"results: {out / 'bench_model.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
