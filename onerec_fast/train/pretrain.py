"""Pretraining: next-token prediction of the target item's semantic ID (TR 3.1), with exact resume.

* AdamW (no weight decay on biases, norms and other 1-D parameters), linear warmup then cosine decay to
  ``min_lr_ratio * lr``, gradient clipping by global norm, bf16 autocast on CUDA, the loss-free MoE expert
  bias updated after every optimizer step.
* Data: :class:`EpochBatchSampler` draws batch ``j`` of epoch ``e`` from a permutation seeded by
  ``(seed, e)``, so the data position is just the number of batches consumed and a resumed run reads
  exactly the batches the uninterrupted run would have read.
* Checkpoints (:mod:`onerec_fast.train.checkpoint`): model, optimizer, schedule step, data position and
  every RNG state, written atomically; :meth:`Trainer.resume` continues bit-for-bit on the same device.
* Progress bar with loss, tokens/s and MFU (useful FLOPs from the model's real lengths over the
  ``onerec_fast.perf`` peak); metrics to ``metrics.jsonl`` and ``metrics.csv``; ``loss.png`` at the end
  when matplotlib is importable.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from onerec_fast.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from onerec_fast.train.progress import ProgressBar

__all__ = ["TrainConfig", "Trainer", "EpochBatchSampler", "lr_at", "plot_metrics"]


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end of train()
    num_workers: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps`` to ``lr``,
    then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless batches of dataset indices: epoch ``e`` is ``randperm(n)`` seeded by ``seed * 1_000_003 + e``,
    cut into ``n // batch_size`` full batches (a short tail is dropped so every step has the same
    size). ``start`` is the number of batches already consumed (the resume position)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, start: int = 0):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.per_epoch = n // batch_size

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        epoch, perm = -1, None
        for b in itertools.count(self.start):
            e, j = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield perm[j * self.batch_size:(j + 1) * self.batch_size].tolist()

    def __len__(self) -> int:  # endless; DataLoader only needs a number
        return 2**62


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _tokens(batch, model) -> int:
    """Real tokens a training step processes: items of every pathway + static + queries + L decoder tokens."""
    n = sum(int(getattr(batch, p).offsets[-1]) for p in ("short", "positive", "lifelong"))
    return n + len(batch) * (1 + model.cfg.num_queries + model.cfg.code_levels)


class Trainer:
    """Pretrains ``model`` (a ``OneRec``) on ``dataset`` (a ``UserSequenceDataset``) on ``device``.

    ``out_dir`` (optional) receives ``checkpoint.pt``, ``metrics.jsonl``, ``metrics.csv`` and ``loss.png``.
    ``history`` keeps ``(step, loss)`` of every step. ``meta`` (tensors, numbers, strings) is stored in every
    checkpoint as is (the CLI keeps the data source and the item embeddings there).
    """

    def __init__(self, model, dataset, cfg: TrainConfig, device: torch.device | str = "cpu",
                 out_dir: str | Path | None = None, show_progress: bool = True, meta: dict | None = None):
        from onerec_fast.data.batch import collate_user_batch

        self.model, self.dataset, self.cfg = model, dataset, cfg
        self.device = torch.device(device)
        self.model.to(self.device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.show_progress = show_progress
        self.meta = meta or {}
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), fused=fused or None)
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.metrics: list[dict] = []  # one row per logging window
        self._collate = collate_user_batch
        self._peak = None

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "model_config": dataclasses.asdict(self.model.cfg),
            "optimizer": self.opt.state_dict(),
            "schedule": {"step": self.step},
            "data": {"position": self.step, "seed": self.cfg.seed, "batch_size": self.cfg.batch_size},
            "train_config": dataclasses.asdict(self.cfg),
            "rng": rng_state(),
            "meta": self.meta,
        }

    def save(self, path: str | Path | None = None) -> Path:
        if path is None:
            if self.out_dir is None:
                raise ValueError("save() needs a path when the trainer has no out_dir")
            path = self.out_dir / "checkpoint.pt"
        return save_checkpoint(path, self.state_dict())

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save`; training continues exactly where it stopped."""
        ck = load_checkpoint(path, map_location="cpu")
        if ck["data"]["batch_size"] != self.cfg.batch_size or ck["data"]["seed"] != self.cfg.seed:
            raise ValueError(f"checkpoint {path} was trained with batch_size={ck['data']['batch_size']}, "
                             f"seed={ck['data']['seed']}; this run has {self.cfg.batch_size}, {self.cfg.seed}: "
                             "the data order would differ")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step = int(ck["schedule"]["step"])
        set_rng_state(ck["rng"])

    # -- the loop ------------------------------------------------------------------------------------------
    def _loader(self):
        sampler = EpochBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, start=self.step)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self._collate,
                                           num_workers=self.cfg.num_workers,
                                           pin_memory=self.device.type == "cuda")

    def _mfu(self, flops: float, seconds: float) -> float:
        from onerec_fast.perf.mfu import mfu, peak_flops

        if self._peak is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" and self.cfg.amp else torch.float32
            self._peak = peak_flops(self.device, dtype)
        return mfu(flops, seconds, peak=self._peak) if seconds > 0 else float("nan")

    def train_step(self, batch_cpu) -> torch.Tensor:
        """One optimizer step on a CPU ``UserBatch``; returns the (device) loss."""
        model, cfg = self.model, self.cfg
        model.train()
        batch = batch_cpu.to(self.device, non_blocking=True)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, cfg)
        amp = self.device.type == "cuda" and cfg.amp
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(batch)
        loss.backward()
        self._grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        model.update_expert_bias()
        self.step += 1
        return loss.detach()

    def train(self, steps: int | None = None) -> list[tuple[int, float]]:
        """Run until ``steps`` (default ``cfg.steps``) optimizer steps are done in total; returns ``history``."""
        cfg = self.cfg
        end = cfg.steps if steps is None else steps
        if self.step >= end:
            return self.history
        bar = ProgressBar(end, "train", start=self.step) if self.show_progress else None
        window_flops, window_tokens, pending = 0.0, 0, []
        t0 = time.perf_counter()
        it = iter(self._loader())
        try:
            while self.step < end:
                batch_cpu = next(it)
                self.model.check_batch(batch_cpu)
                window_flops += self.model.flops(batch_cpu, backward=True)
                window_tokens += _tokens(batch_cpu, self.model)
                pending.append((self.step, self.train_step(batch_cpu)))
                if self.step % cfg.log_every == 0 or self.step == end:
                    losses = torch.stack([l for _, l in pending]).float().cpu().tolist()  # one sync per window
                    self.history += [(s + 1, v) for (s, _), v in zip(pending, losses)]
                    dt = time.perf_counter() - t0
                    row = {"step": self.step, "loss": sum(losses) / len(losses), "lr": lr_at(self.step - 1, cfg),
                           "grad_norm": float(self._grad_norm), "tokens_per_s": window_tokens / dt,
                           "mfu": self._mfu(window_flops, dt), "step_ms": 1e3 * dt / len(losses)}
                    self._log(row)
                    if bar is not None:
                        bar.update(len(losses), loss=row["loss"], **{"tok/s": row["tokens_per_s"]},
                                   MFU=f"{100 * row['mfu']:.2f}%")
                    window_flops, window_tokens, pending = 0.0, 0, []
                    t0 = time.perf_counter()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.out_dir is not None:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        if self.out_dir is not None:
            self.save()
        return self.history

    def _log(self, row: dict) -> None:
        self.metrics.append(row)
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        path = self.out_dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


def plot_metrics(metrics_jsonl: str | Path, png: str | Path) -> str:
    """Plot loss (and MFU) against step into ``png``; returns a one-line message (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: skipped the loss plot (metrics are in metrics.csv)"
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("next-code cross-entropy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"loss plot: {png}"
