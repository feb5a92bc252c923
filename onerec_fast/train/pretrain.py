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
* Under torchrun (:mod:`onerec_fast.train.parallel`): data parallel through DDP (``parallel="ddp"``) or
  FSDP2 (``"fsdp"``); each rank reads a disjoint ``batch_size / world_size`` slice of every global batch
  (their union is the single-process batch), so losses and updates match one process with the same
  ``batch_size``; the MoE load is summed over ranks before the expert-bias update; logged loss, tokens/s and
  MFU are over all ranks (MFU against ``world_size`` peaks); only rank 0 shows progress and writes metrics;
  checkpoints are DCP folders that resume on any number of ranks. ``expert_parallel=True`` (DDP only) also
  splits the MoE experts over the ranks (:class:`~onerec_fast.distributed.ExpertParallelMoE`); the updates
  still equal one process's, and checkpoints still hold the whole experts.
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

from onerec_fast.train.checkpoint import checkpoint_path, load_training_state, save_training_state
from onerec_fast.train.parallel import PARALLEL_MODES, ParallelModel, all_reduce_sum, init_distributed, local_device
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
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2, sharded); ignored in one process
    expert_parallel: bool = False  # with "ddp" under torchrun (> 1 process): the MoE experts split over the ranks

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.expert_parallel and self.parallel != "ddp":
            raise ValueError(f"expert_parallel needs parallel='ddp', got parallel={self.parallel!r}")


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
    size). ``start`` is the number of batches already consumed (the resume position).

    With ``world_size > 1`` every global batch of ``batch_size`` indices is cut into ``world_size``
    contiguous slices and rank ``rank`` yields its own (``batch_size / world_size`` indices): the ranks'
    slices of batch ``b`` are disjoint and together are the single-process batch ``b``, whatever the world
    size, so ``start`` (in global batches) resumes on any number of ranks."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than batch_size={batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, "
                             f"world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the world size ({world_size})")
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.per_epoch = n // batch_size
        local = batch_size // world_size
        self._lo, self._hi = rank * local, (rank + 1) * local

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        epoch, perm = -1, None
        for b in itertools.count(self.start):
            e, j = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, perm = e, self._perm(e)
            yield perm[j * self.batch_size:(j + 1) * self.batch_size][self._lo:self._hi].tolist()

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

    ``out_dir`` (optional) receives the checkpoint (``checkpoint.pt``; ``checkpoint.dcp`` under torchrun),
    ``metrics.jsonl``, ``metrics.csv`` and ``loss.png``. ``history`` keeps ``(step, loss)`` of every step (the
    loss of the global batch). ``meta`` (tensors, numbers, strings) is stored in every checkpoint as is (the
    CLI keeps the data source and the item embeddings there). Under torchrun (the process group is started
    here if needed) ``device`` ``"cuda"`` means this rank's GPU and the model is wrapped as ``cfg.parallel``
    says; ``self.model`` stays the ``OneRec`` (sharded in place under FSDP2, its MoE layers replaced by
    expert-parallel ones with ``cfg.expert_parallel``: ``self.parallel.full_state_dict()`` is the whole state).
    """

    def __init__(self, model, dataset, cfg: TrainConfig, device: torch.device | str = "cpu",
                 out_dir: str | Path | None = None, show_progress: bool = True, meta: dict | None = None):
        from onerec_fast.data.batch import collate_user_batch

        init_distributed(device)
        self.model, self.dataset, self.cfg = model, dataset, cfg
        self.device = local_device(device)
        self.model.to(self.device)
        # before the optimizer: FSDP2 swaps parameters, expert parallelism swaps the MoE layers
        self.parallel = ParallelModel(model, self.device, cfg.parallel, expert_parallel=cfg.expert_parallel)
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
    @property
    def checkpoint_path(self) -> Path:
        """Where :meth:`save` writes by default: ``<out_dir>/checkpoint.pt`` (``checkpoint.dcp`` under torchrun)."""
        return checkpoint_path(self.out_dir, "checkpoint")

    def _checkpoint_entries(self) -> dict:
        """Everything a checkpoint holds besides the model, the optimizer and the RNG states."""
        return {
            "model_config": dataclasses.asdict(self.model.cfg),
            "schedule": {"step": self.step},
            "data": {"position": self.step, "seed": self.cfg.seed, "batch_size": self.cfg.batch_size},
            "train_config": dataclasses.asdict(self.cfg),
            "meta": self.meta,
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default :attr:`checkpoint_path`); under torchrun every rank must call this."""
        return save_training_state(self.checkpoint_path if path is None else path, self.model, self.opt,
                                   self._checkpoint_entries())

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save` (by any number of ranks); training continues exactly where
        it stopped (bit-for-bit on the same device and world size)."""

        def same_data_order(ck: dict) -> None:
            if ck["data"]["batch_size"] != self.cfg.batch_size or ck["data"]["seed"] != self.cfg.seed:
                raise ValueError(f"checkpoint {path} was trained with batch_size={ck['data']['batch_size']}, "
                                 f"seed={ck['data']['seed']}; this run has {self.cfg.batch_size}, {self.cfg.seed}: "
                                 "the data order would differ")

        ck = load_training_state(path, self.model, self.opt, validate=same_data_order)
        self.step = int(ck["schedule"]["step"])

    # -- the loop ------------------------------------------------------------------------------------------
    def _loader(self):
        p = self.parallel
        sampler = EpochBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, start=self.step,
                                    rank=p.rank, world_size=p.world_size)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self._collate,
                                           num_workers=self.cfg.num_workers,
                                           pin_memory=self.device.type == "cuda")

    def _mfu(self, flops: float, seconds: float) -> float:
        """MFU of ``flops`` done by all ranks in ``seconds``, against ``world_size`` peaks."""
        from onerec_fast.perf.mfu import mfu, peak_flops

        if self._peak is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" and self.cfg.amp else torch.float32
            self._peak = peak_flops(self.device, dtype)
        return mfu(flops / self.parallel.world_size, seconds, peak=self._peak) if seconds > 0 else float("nan")

    def train_step(self, batch_cpu) -> torch.Tensor:
        """One optimizer step on a CPU ``UserBatch`` (this rank's slice of the global batch); returns this
        rank's (device) loss."""
        model, cfg = self.model, self.cfg
        model.train()
        batch = batch_cpu.to(self.device, non_blocking=True)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, cfg)
        amp = self.device.type == "cuda" and cfg.amp
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = self.parallel(_loss, batch)
        loss.backward()
        self._grad_norm = self.parallel.clip_grad_norm_(cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.parallel.sync_expert_load()
        model.update_expert_bias()
        self.step += 1
        return loss.detach()

    def train(self, steps: int | None = None) -> list[tuple[int, float]]:
        """Run until ``steps`` (default ``cfg.steps``) optimizer steps are done in total; returns ``history``."""
        cfg = self.cfg
        end = cfg.steps if steps is None else steps
        if self.step >= end:
            return self.history
        bar = ProgressBar(end, "train", start=self.step) if self.show_progress and self.parallel.is_main else None
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
                    losses, window_flops, window_tokens = self._window_totals(pending, window_flops, window_tokens)
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

    def _window_totals(self, pending: list, flops: float, tokens: int) -> tuple[list[float], float, int]:
        """A logging window over all ranks: the global batches' losses (the mean of the ranks' losses: each
        rank's loss is the mean over an equal share), and the FLOPs and tokens of every rank. One sync (and one
        all-reduce under torchrun) per window."""
        losses = torch.stack([l for _, l in pending]).float()
        if self.parallel.world_size == 1:
            return losses.cpu().tolist(), flops, tokens
        n = self.parallel.world_size
        counts = torch.tensor([flops, tokens], dtype=torch.float64, device=losses.device)
        totals = all_reduce_sum(torch.cat([losses.double(), counts])).cpu()
        return (totals[:-2] / n).tolist(), float(totals[-2]), int(totals[-1])

    def _log(self, row: dict) -> None:
        self.metrics.append(row)
        if self.out_dir is None or not self.parallel.is_main:
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


def _loss(model, batch) -> torch.Tensor:
    """The pretraining loss: what :class:`~onerec_fast.train.parallel.ParallelModel` runs in its forward."""
    return model(batch)


def plot_metrics(metrics_jsonl: str | Path, png: str | Path) -> str:
    """Plot loss against step into ``png``; returns a one-line message (matplotlib is optional)."""
    from onerec_fast.train.progress import line_plots

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    series = [("loss", [r["step"] for r in rows], [r["loss"] for r in rows], "-")]
    return line_plots(png, [("step", "next-code cross-entropy", series)], "loss", "metrics are in metrics.csv")
