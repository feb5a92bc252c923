"""Multi-GPU pretraining benchmark (a plain script, not a pytest suite): the 0.935B OneRec trained by the real
``Trainer`` on 1 GPU, then under torchrun with DDP, with FSDP2 and with DDP + expert parallelism (the decoder's
MoE experts split over the GPUs, ``--expert-parallel``) on ``--gpus`` GPUs, on the same inputs.

    python benchmarks/bench_distributed.py                              # 0.935b, global batch 64, 2 GPUs
    python benchmarks/bench_distributed.py --scaling weak --steps 100 --out bench_results/distributed
    python benchmarks/bench_distributed.py --device cpu --preset tiny --batch 8 --steps 6 --lifelong 64 \\
        --num-items 5000 --codebook-size 64          # a smoke test of the whole script on CPU (Gloo)

Inputs are bench_model.py's: users with full pathways (20 short-term, 256 positive, ``--lifelong`` lifelong
items; 405 encoder tokens each) over a ``--num-items`` catalogue, here as a dataset whose sample ``i`` is drawn
from seed ``i``, so the ``Trainer``'s sampler gives every run the same global batches (``--scaling strong``,
the default: the global batch stays ``--batch``, each of N GPUs takes ``--batch / N``) and the loss curves of
the four runs must coincide up to bf16 rounding. ``--scaling weak`` keeps ``--batch`` per GPU instead.

Each run is its own process group (``NCCL_NVLS_ENABLE=0`` and the other NVLink-multicast switches off, as this
workplace requires); the 1-GPU run is a plain process (the single-process path). Printed and written to
``--out``: per run the median step time, tokens/s in all and per GPU, MFU (useful FLOPs over N datasheet
peaks), peak memory per GPU, the scaling efficiency (tokens/s per GPU over the 1-GPU run's) and the largest
loss difference to the 1-GPU run; ``summary.json``/``.csv``, each run's ``metrics.json`` and ``loss.png`` (the
loss curves, with matplotlib). ``--ckpt`` also times a checkpoint save (``.pt`` on 1 GPU, DCP on N).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# NVLink multicast stays off in every process we start (a program using it can take a shared host's GPUs down)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class RandomUsers(torch.utils.data.Dataset):
    """``n`` users with full pathways, as ``bench_model.random_batch`` draws them, one sample per index
    (``collate_user_batch`` format); sample ``i`` comes from seed ``seed + i`` wherever it is read."""

    def __init__(self, cfg, n: int, lifelong: int, item_codes: torch.Tensor, seed: int = 0):
        self.cfg, self.n, self.lifelong, self.seed = cfg, n, lifelong, seed
        self.codes = item_codes.numpy()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        import numpy as np

        cfg, rng = self.cfg, np.random.default_rng(self.seed + i)
        num_items = len(self.codes)

        def items(n: int) -> dict:
            item = rng.integers(0, num_items, n)
            return {"item": item, "codes": self.codes[item],
                    "sparse": {k: rng.integers(0, c, n) for k, c in cfg.item_cat_features.items() if k != "item"},
                    "dense": {k: (rng.random(n) * 100).astype(np.float32) for k in cfg.item_num_features}}

        target = int(rng.integers(0, num_items))
        return {"user": int(rng.integers(0, cfg.static_features.get("uid", 1))),
                "user_feats": {k: int(rng.integers(0, c)) for k, c in cfg.static_features.items() if k != "uid"},
                "short": items(cfg.short_len), "positive": items(cfg.pos_len), "lifelong": items(self.lifelong),
                "target_item": target, "target_codes": self.codes[target], "target_sparse": {}, "target_dense": {}}


# --------------------------------------------------------------------------------------------- one run (a rank)
def worker(args) -> int:
    """One run: this process is a rank of torchrun's group (or the only process); rank 0 writes metrics.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_model import bench_config

    from onerec_fast.model.onerec import OneRec
    from onerec_fast.perf.mfu import peak_flops
    from onerec_fast.train.checkpoint import checkpoint_path
    from onerec_fast.train.parallel import init_distributed, local_device, shutdown_distributed
    from onerec_fast.train.pretrain import TrainConfig, Trainer

    info = init_distributed(args.device)
    device = local_device(args.device)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)  # bench_model.py's catalogue
        item_codes = torch.randint(0, args.codebook_size, (args.num_items, 3), generator=g)
        cfg = bench_config(args, args.backend)
        with device:
            model = OneRec(cfg, item_codes)
        n_params = model.num_parameters()
        batch = args.batch * (info.world_size if args.scaling == "weak" else 1)
        ds = RandomUsers(cfg, batch * args.steps, args.lifelong, item_codes)
        expert_parallel = args.parallel == "ep"  # DDP with the experts split over the ranks
        tc = TrainConfig(steps=args.steps, batch_size=batch, lr=args.lr, warmup_steps=args.warmup_steps,
                         log_every=1, ckpt_every=0, num_workers=args.num_workers,
                         parallel="ddp" if expert_parallel else args.parallel, expert_parallel=expert_parallel,
                         amp=device.type == "cuda")
        trainer = Trainer(model, ds, tc, device, show_progress=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        ckpt_s = float("nan")
        if args.ckpt:
            t0 = time.perf_counter()
            path = trainer.save(checkpoint_path(args.run_dir, "checkpoint"))  # checkpoint.pt, or .dcp under torchrun
            ckpt_s = time.perf_counter() - t0
        peaks = _gather(peak_gb)
        if info.is_main:
            Path(args.run_dir).mkdir(parents=True, exist_ok=True)
            result = {"parallel": args.parallel if info.world_size > 1 else "single",
                      "world_size": info.world_size, "global_batch": batch,
                      "dense_parameters": n_params, "peak_memory_gb": peaks, "train_s": train_s,
                      "checkpoint_s": ckpt_s, "checkpoint": str(path) if args.ckpt else None,
                      "peak": str(peak_flops(device, torch.bfloat16 if tc.amp else torch.float32)),
                      "metrics": trainer.metrics, "history": trainer.history}
            (Path(args.run_dir) / "metrics.json").write_text(json.dumps(result, indent=1))
    finally:
        shutdown_distributed()
    return 0


def _gather(x: float) -> list[float]:
    """``x`` of every rank, on every rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [x]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


# --------------------------------------------------------------------------------------------- the launcher
def _run_args(args) -> list[str]:
    """The worker's arguments shared by every run."""
    keep = ("preset", "batch", "lifelong", "num_items", "codebook_size", "steps", "warmup_steps", "lr", "scaling",
            "num_workers", "backend", "device")
    out = []
    for k in keep:
        out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out + (["--ckpt"] if args.ckpt else [])


def launch(args) -> int:
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        print(f"bench_distributed.py needs {args.gpus} CUDA GPUs, this machine has {torch.cuda.device_count()} "
              "(or --device cpu for a smoke test)")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}  # torchrun would set 1
    me = str(Path(__file__).resolve())
    runs = [("1 GPU" if args.device == "cuda" else "1 process", "single", 1)]
    runs += [(f"DDP x{args.gpus}", "ddp", args.gpus), (f"FSDP2 x{args.gpus}", "fsdp", args.gpus),
             (f"EP x{args.gpus}", "ep", args.gpus)]
    results = []
    for label, mode, n in runs:
        run_dir = out / f"{mode}{n}"
        cmd = [sys.executable]
        run_env = dict(env)
        if mode == "single":
            cmd += [me]
            if args.device == "cuda":
                run_env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        else:
            cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), me]
        cmd += ["--worker", "--parallel", "ddp" if mode == "single" else mode, "--run-dir", str(run_dir),
                *_run_args(args)]
        print(f"=== {label}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=run_env)
        print(f"=== {label}: rc={done.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        if done.returncode != 0:
            return done.returncode
        results.append((label, json.loads((run_dir / "metrics.json").read_text())))
    summary = summarize(results, args.skip)
    print(format_summary(summary))
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "runs": summary}, indent=1))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    print(plot_losses(results, out / "loss.png"))
    print(f"results: {out / 'summary.json'}")
    return 0


def summarize(results: list[tuple[str, dict]], skip: int) -> list[dict]:
    """One row per run; timings are medians over the steps after the first ``skip`` (warm-up, compilation)."""
    base_losses = dict(results[0][1]["history"])
    rows = []
    for label, r in results:
        timed = [m for m in r["metrics"] if m["step"] > skip] or r["metrics"]
        n = r["world_size"]
        tok = statistics.median(m["tokens_per_s"] for m in timed)
        losses = dict(r["history"])
        rows.append({
            "run": label, "gpus": n, "global_batch": r["global_batch"],
            "step_ms": statistics.median(m["step_ms"] for m in timed),
            "users_per_s": statistics.median(r["global_batch"] / (m["step_ms"] / 1e3) for m in timed),
            "tokens_per_s": tok, "tokens_per_s_per_gpu": tok / n,
            "mfu": statistics.median(m["mfu"] for m in timed),
            "peak_gb_per_gpu": max(r["peak_memory_gb"]),
            "max_loss_diff": max(abs(losses[s] - base_losses[s]) for s in losses if s in base_losses),
            "final_loss": r["history"][-1][1], "checkpoint_s": r["checkpoint_s"],
        })
    for row in rows:
        row["scaling_efficiency"] = row["tokens_per_s_per_gpu"] / rows[0]["tokens_per_s_per_gpu"]
    return rows


def format_summary(rows: list[dict]) -> str:
    cols = [("step_ms", "step ms", "{:.1f}"), ("users_per_s", "users/s", "{:.1f}"),
            ("tokens_per_s_per_gpu", "tok/s/GPU", "{:.0f}"), ("mfu", "MFU", "{:.1%}"),
            ("scaling_efficiency", "scaling", "{:.1%}"), ("peak_gb_per_gpu", "GB/GPU", "{:.1f}"),
            ("max_loss_diff", "max |dloss|", "{:.4f}"), ("final_loss", "final loss", "{:.4f}"),
            ("checkpoint_s", "ckpt s", "{:.1f}")]
    lines = [f"{'run':<12}{'batch':>7}" + "".join(f"{h:>13}" for _, h, _ in cols)]
    for r in rows:
        lines.append(f"{r['run']:<12}{r['global_batch']:>7}" + "".join(f"{fmt.format(r[k]):>13}" for k, _, fmt in cols))
    return "\n".join(lines)


def plot_losses(results: list[tuple[str, dict]], png: Path) -> str:
    from onerec_fast.train.progress import line_plots

    series = [(label, *zip(*r["history"]), style) for (label, r), style in zip(results, ("-", "--", ":", "-."))]
    return line_plots(png, [("step", "next-code cross-entropy", series)], "loss",
                      "losses are in each run's metrics.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="0.935b")
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the DDP, FSDP2 and EP runs")
    p.add_argument("--batch", type=int, default=64, help="global batch (strong scaling) or batch per GPU (weak)")
    p.add_argument("--scaling", choices=("strong", "weak"), default="strong")
    p.add_argument("--lifelong", type=int, default=2000, help="lifelong items per user (QFormer input)")
    p.add_argument("--num-items", type=int, default=1_000_000, help="catalogue size")
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the timings")
    p.add_argument("--warmup-steps", type=int, default=10, help="learning-rate warmup")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per rank")
    p.add_argument("--backend", default="auto", help="backend of the fused modules")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--ckpt", action="store_true", help="also time a checkpoint save after each run")
    p.add_argument("--out", default="bench_results/distributed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one run, started by the launcher
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)  # ddp, fsdp or ep (DDP + expert parallel)
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return worker(args) if args.worker else launch(args)


if __name__ == "__main__":
    raise SystemExit(main())
