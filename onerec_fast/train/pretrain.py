"""Pretraining: next-token prediction of the target item's semantic ID (TR 3.1), with exact resume.

* AdamW (no weight decay on biases, norms and other 1-D parameters), linear warmup then cosine decay to
  ``min_lr_ratio * lr``, gradient clipping by global norm, bf16 autocast on CUDA, the loss-free MoE expert
  bias updated after every optimizer step. On one GPU the whole step is replayed from CUDA graphs, one per
  batch shape, unless ``TrainConfig.cuda_graph`` is False (:mod:`onerec_fast.train.graph_step`).
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
import functools
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from onerec_fast.model.encoder import seq_lengths
from onerec_fast.model.layers import moe_layers
from onerec_fast.train.checkpoint import checkpoint_path, load_training_state, save_checkpoint, save_training_state
from onerec_fast.train.graph_step import StepGraphs, fixed_shape_batch
from onerec_fast.train.parallel import (PARALLEL_MODES, ParallelModel, all_reduce_sum, broadcast_object,
                                        init_distributed, local_device)
from onerec_fast.train.progress import ProgressBar

__all__ = ["TrainConfig", "Trainer", "EpochBatchSampler", "NonFiniteTrainingError", "lr_at", "param_groups",
           "plot_metrics"]


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.01
    embedding_weight_decay: float | None = None  # decay of the nn.Embedding tables (None: weight_decay)
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
    eval_every: int = 0  # steps between validation evaluations (needs the Trainer's eval_fn; 0: never)
    patience: int = 0  # stop after this many evaluations without a better select_metric (0: never stop early)
    select_metric: str = "ndcg@10"  # the eval_fn result that picks best.pt (higher is better)
    time_budget_s: float = 0.0  # stop (evaluate, save) after this much wall time in train() (0: no limit)
    # replay the step from CUDA graphs, batches padded to fixed shapes (see graph_step.py): None (default) where
    # it applies (one CUDA process), True asks for it (a warning where it cannot apply), False never. Amazon
    # Sports through the CLI, three runs sharing an H100: 10-32 ms a step against 61-73 eager (session 16)
    cuda_graph: bool | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "patience", "ckpt_every", "warmup_steps", "num_workers", "time_budget_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}")
        for name in ("weight_decay", "embedding_weight_decay"):
            if (getattr(self, name) or 0.0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")
        if self.expert_parallel and self.parallel != "ddp":
            raise ValueError(f"expert_parallel needs parallel='ddp', got parallel={self.parallel!r}")


def lr_at(step: int, cfg: TrainConfig, horizon: int | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup over ``warmup_steps`` to ``lr``,
    then cosine decay to ``min_lr_ratio * lr`` at ``horizon`` (default ``cfg.steps``)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, (cfg.steps if horizon is None else horizon) - cfg.warmup_steps)
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


def param_groups(model: torch.nn.Module, weight_decay: float, embedding_weight_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups: ``weight_decay`` on the trainable matrices, none on 1-D parameters (biases, norms).
    ``embedding_weight_decay`` (None: ``weight_decay``): the decay of the ``nn.Embedding`` tables instead (item,
    code and per-trie-node vectors). AdamW decays every row at every step while a rarely seen item's row gets a
    gradient only in the few steps whose batch holds it."""
    # Without embedding_weight_decay the tables stay in the first group: two groups, as checkpoints hold them.
    tables = set() if embedding_weight_decay is None else {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, table, no_decay = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else table if id(p) in tables else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + ([{"params": table, "weight_decay": embedding_weight_decay}] if table else [])


def _tokens(batch, model) -> int:
    """Real tokens a training step processes: items of every pathway + static + queries + L decoder tokens."""
    n = sum(int(seq_lengths(getattr(batch, p)).sum()) for p in ("short", "positive", "lifelong"))
    return n + len(batch) * (1 + model.cfg.num_queries + model.cfg.code_levels)


_NONE = 2**62  # "no non-finite step yet": larger than any step, so a MIN over ranks finds the first bad one


class NonFiniteTrainingError(RuntimeError):
    """The loss or the gradient norm of a training step was NaN or infinite (the message names the step); the
    last checkpoint on disk was written before it and is kept."""


class Trainer:
    """Pretrains ``model`` (a ``OneRec``) on ``dataset`` (a ``UserSequenceDataset``) on ``device``.

    ``out_dir`` (optional) receives the checkpoint (``checkpoint.pt``; ``checkpoint.dcp`` under torchrun),
    ``best.pt`` (the weights with the best validation ``cfg.select_metric``, when ``eval_fn`` is given),
    ``metrics.jsonl`` (training windows and validation rows), ``metrics.csv`` (training windows) and ``loss.png``.
    ``history`` keeps ``(step, loss)`` of every step (the loss of the global batch). ``meta`` (tensors, numbers,
    strings) is stored in every checkpoint as is (the CLI keeps the data source and the item embeddings there).

    ``eval_fn(model) -> {metric: float}`` (e.g. Recall/NDCG@10 of constrained generation on the validation
    split) runs every ``cfg.eval_every`` steps and at the end, on rank 0 only; the best result writes
    ``best.pt`` and ``cfg.patience`` evaluations without improvement stop the run early.

    Non-finite policy: the loss and the gradient norm of every step are checked on the device (no host sync);
    the first non-finite step is read at the next logging window or save, and training stops with
    :class:`NonFiniteTrainingError` naming it. A checkpoint is never written from a state that saw one (nor
    from non-finite weights), so the last good checkpoint survives.

    Under torchrun (the process group is started here if needed) ``device`` ``"cuda"`` means this rank's GPU and
    the model is wrapped as ``cfg.parallel`` says; ``self.model`` stays the ``OneRec`` (sharded in place under
    FSDP2, its MoE layers replaced by expert-parallel ones with ``cfg.expert_parallel``:
    ``self.parallel.full_state_dict()`` is the whole state).
    """

    def __init__(self, model, dataset, cfg: TrainConfig, device: torch.device | str = "cpu",
                 out_dir: str | Path | None = None, show_progress: bool = True, meta: dict | None = None,
                 eval_fn: Callable[[torch.nn.Module], dict] | None = None):
        init_distributed(device)
        self.model, self.dataset, self.cfg = model, dataset, cfg
        self.device = local_device(device)
        self.model.to(self.device)
        # before the optimizer: FSDP2 swaps parameters, expert parallelism swaps the MoE layers
        self.parallel = ParallelModel(model, self.device, cfg.parallel, expert_parallel=cfg.expert_parallel)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.show_progress = show_progress
        self.meta = meta or {}
        self.eval_fn = eval_fn
        fused = self.device.type == "cuda"
        self._moe_layers = moe_layers(model)  # after ParallelModel, which may swap them for expert-parallel ones
        graphs = cfg.cuda_graph is not False and fused and self.parallel.world_size == 1
        if cfg.cuda_graph and fused and not graphs:  # asked for and not given: never silent
            logging.getLogger("onerec_fast").warning("onerec_fast: cuda_graph ignored (more than one process): "
                                                     "every step runs eagerly")
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.embedding_weight_decay), lr=cfg.lr,
                                     betas=(cfg.beta1, cfg.beta2), fused=fused or None)
        # Under graphs the learning rate is a device tensor the captured AdamW reads (filled before each step).
        self._lr = torch.tensor(float(cfg.lr), device=self.device) if graphs else None
        self._set_group_flags()
        self._step_t = torch.zeros((), dtype=torch.int64, device=self.device)  # the step, for the non-finite flag
        self._graphs = StepGraphs(self._step_body, self._graph_state, self.device) if graphs else None
        self.step = 0
        self.history: list[tuple[int, float]] = []
        self.metrics: list[dict] = []  # one row per logging window or evaluation
        # Model selection: the best validation result so far, its step, evaluations since it improved.
        self.selection = {"best": -math.inf, "best_step": -1, "since_best": 0}
        self._bad_step = torch.full((), _NONE, dtype=torch.int64, device=self.device)  # first non-finite step
        # Where the cosine schedule ends: cfg.steps, or sooner when cfg.time_budget_s will stop the run first
        # (projected from the measured step rate, evaluations included), so a budgeted run still anneals.
        self.horizon = cfg.steps
        self._peak = None

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """Where :meth:`save` writes by default: ``<out_dir>/checkpoint.pt`` (``checkpoint.dcp`` under torchrun)."""
        return checkpoint_path(self.out_dir, "checkpoint")

    @property
    def best_path(self) -> Path | None:
        """``<out_dir>/best.pt``: the model with the best validation result (None without ``out_dir``)."""
        return None if self.out_dir is None else self.out_dir / "best.pt"

    def _checkpoint_entries(self) -> dict:
        """Everything a checkpoint holds besides the model, the optimizer and the RNG states."""
        return {
            "model_config": dataclasses.asdict(self.model.cfg),
            "schedule": {"step": self.step},
            "data": {"position": self.step, "seed": self.cfg.seed, "batch_size": self.cfg.batch_size},
            "train_config": dataclasses.asdict(self.cfg),
            "selection": dict(self.selection),
            "meta": self.meta,
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default :attr:`checkpoint_path`); under torchrun every rank must call this.
        Raises :class:`NonFiniteTrainingError` instead of saving a state that saw a non-finite step (and
        ``save_training_state`` refuses non-finite weights)."""
        self._check_finite()
        return save_training_state(self.checkpoint_path if path is None else path, self.model, self.opt,
                                   self._checkpoint_entries())

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save` (by any number of ranks); training continues exactly where
        it stopped (bit-for-bit on the same device and world size). Metric rows logged after the checkpoint's
        step (by the run that stopped) are dropped from ``metrics.jsonl``/``.csv``, so no step appears twice."""

        def same_data_order(ck: dict) -> None:
            if ck["data"]["batch_size"] != self.cfg.batch_size or ck["data"]["seed"] != self.cfg.seed:
                raise ValueError(f"checkpoint {path} was trained with batch_size={ck['data']['batch_size']}, "
                                 f"seed={ck['data']['seed']}; this run has {self.cfg.batch_size}, {self.cfg.seed}: "
                                 "the data order would differ")

        ck = load_training_state(path, self.model, self.opt, validate=same_data_order)
        self._set_group_flags()  # the saved groups carry the writer's settings, which this run may not share
        if self._graphs is not None:  # the optimizer's state tensors are new
            self._graphs.clear()
        self.step = int(ck["schedule"]["step"])
        self.selection.update(ck.get("selection", {}))
        if self.out_dir is not None and self.parallel.is_main:
            _truncate_metrics(self.out_dir, self.step)

    def _set_group_flags(self) -> None:
        """AdamW's groups as this run steps them: capturable, and reading the device learning rate, under graphs."""
        for g in self.opt.param_groups:
            g["capturable"] = self._lr is not None
            if self._lr is not None:
                g["lr"] = self._lr

    # -- the loop ------------------------------------------------------------------------------------------
    def _loader(self):
        p = self.parallel
        sampler = EpochBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.seed, start=self.step,
                                    rank=p.rank, world_size=p.world_size)
        # batch_size=None: the sampler yields index lists and the dataset view builds whole batches (vectorized),
        # padded to fixed shapes for the graphs (straight into pinned memory without workers; workers cannot
        # pin, the loader's pinning thread does). The loader still pins: the batch's other tensors (users,
        # targets) are not padded, and a copy from pageable memory would make the replay wait for the GPU.
        # Pinning an already pinned tensor returns it.
        mc = self.model.cfg
        pad = None if self._graphs is None else functools.partial(fixed_shape_batch, short_len=mc.short_len,
                                                                   pos_len=mc.pos_len,
                                                                   pin_memory=self.cfg.num_workers == 0)
        return torch.utils.data.DataLoader(_BatchView(self.dataset, pad), sampler=sampler, batch_size=None,
                                           collate_fn=_identity, num_workers=self.cfg.num_workers,
                                           pin_memory=self.device.type == "cuda")

    def _mfu(self, flops: float, seconds: float) -> float:
        """MFU of ``flops`` done by all ranks in ``seconds``, against ``world_size`` peaks."""
        from onerec_fast.perf.mfu import mfu, peak_flops

        if self._peak is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" and self.cfg.amp else torch.float32
            self._peak = peak_flops(self.device, dtype)
        return mfu(flops / self.parallel.world_size, seconds, peak=self._peak) if seconds > 0 else float("nan")

    def train_step(self, batch_cpu) -> torch.Tensor:
        """One optimizer step on a CPU ``UserBatch`` (this rank's slice of the global batch; with CUDA graphs
        pinned and padded by :func:`fixed_shape_batch`, as the Trainer's loader gives it); returns this rank's
        (device) loss. A non-finite loss or gradient norm is recorded on the device (see the class
        docstring), not synced here."""
        self.model.train()
        lr = lr_at(self.step, self.cfg, self.horizon)
        if self._lr is None:
            for g in self.opt.param_groups:
                g["lr"] = lr
        else:
            self._lr.fill_(lr)
        self._step_t.fill_(self.step)
        out = None if self._graphs is None else self._graphs(batch_cpu)
        if out is None:
            out = self._step_body(batch_cpu.to(self.device, non_blocking=True))
            self.opt.zero_grad(set_to_none=True)  # no gradient memory held between eager steps
        loss, self._grad_norm = out
        self.step += 1
        return loss.clone()  # a graph's output is overwritten by its next replay

    def _step_body(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward, clipping, the non-finite flag, the optimizer step and the MoE bias update on a
        device batch, without a host sync (so it can be captured); leaves the gradients in place. Returns the
        loss and the gradient norm."""
        cfg = self.cfg
        # Gradients start unset, so backward assigns rather than accumulates: into fresh memory in a capture
        # (not into another graph's gradients, which the parameters still point at after its replay), and in
        # an eager step after a replay (not onto that graph's last gradients).
        self.opt.zero_grad(set_to_none=True)
        amp = self.device.type == "cuda" and cfg.amp
        # no autocast weight cache under graphs: a capture must not keep casts made outside it
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp, cache_enabled=self._graphs is None):
            loss = self.parallel(_loss, batch)
        loss.backward()
        for m in self._moe_layers:  # a capture must not reuse an eager step's gradient accumulators
            m.release_last_forward()
        grad_norm = self.parallel.clip_grad_norm_(cfg.grad_clip)
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        self._bad_step.copy_(torch.where(bad & (self._bad_step == _NONE), self._step_t, self._bad_step))
        self.opt.step()
        self.parallel.sync_expert_load()
        self.model.update_expert_bias()
        return loss.detach(), grad_norm

    def _graph_state(self) -> tuple:
        """What the step's graphs read by address besides the batch (see ``StepGraphs``): the catalogue's trie,
        the parameters and buffers."""
        m = self.model
        trie = m.trie(self.device) if m.cfg.trie_loss or m.cfg.node_heads else None
        return (trie, *(t.data_ptr() for t in itertools.chain(m.parameters(), m.buffers())))

    def _check_finite(self) -> None:
        """Raise :class:`NonFiniteTrainingError` if a step so far had a non-finite loss or gradient norm, on any
        rank. One host sync (and a MIN all-reduce in a process group)."""
        flag = self._bad_step.clone()
        if self.parallel.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        step = int(flag)
        if step != _NONE:
            kept = "; the last checkpoint on disk is kept" if self.out_dir is not None else ""
            raise NonFiniteTrainingError(
                f"non-finite loss or gradient at step {step + 1} (lr {lr_at(step, self.cfg, self.horizon):.3g}): "
                f"training stopped{kept}. Lower --lr, raise --warmup, or train in fp32 (--no-amp) to find the cause")

    def train(self, steps: int | None = None) -> list[tuple[int, float]]:
        """Run until ``steps`` (default ``cfg.steps``) optimizer steps are done in total, or until the
        validation result stops improving (``cfg.patience``); returns ``history``."""
        cfg = self.cfg
        end = cfg.steps if steps is None else steps
        if self.step >= end or self._stopped_early():
            return self.history
        bar = ProgressBar(end, "train", start=self.step) if self.show_progress and self.parallel.is_main else None
        window_flops, window_tokens, pending = 0.0, 0, []
        t0 = started = time.perf_counter()
        first = self.step
        it = iter(self._loader())
        try:
            while self.step < end:
                batch_cpu = next(it)
                self.model.check_batch(batch_cpu)
                window_flops += self.model.flops(batch_cpu, backward=True)
                window_tokens += _tokens(batch_cpu, self.model)
                pending.append((self.step, self.train_step(batch_cpu)))
                if self.step % cfg.log_every == 0 or self.step == end:
                    self._check_finite()
                    losses, window_flops, window_tokens = self._window_totals(pending, window_flops, window_tokens)
                    self.history += [(s + 1, v) for (s, _), v in zip(pending, losses)]
                    dt = time.perf_counter() - t0
                    row = {"step": self.step, "loss": sum(losses) / len(losses),
                           "lr": lr_at(self.step - 1, cfg, self.horizon), "grad_norm": float(self._grad_norm),
                           "tokens_per_s": window_tokens / dt, "mfu": self._mfu(window_flops, dt),
                           "step_ms": 1e3 * dt / len(losses)}
                    self._log(row)
                    if bar is not None:
                        bar.update(len(losses), loss=row["loss"], **{"tok/s": row["tokens_per_s"]},
                                   MFU=f"{100 * row['mfu']:.2f}%")
                    window_flops, window_tokens, pending = 0.0, 0, []
                    t0 = time.perf_counter()
                # the budget is host time (no sync); every rank agrees on it through the broadcast
                elapsed = time.perf_counter() - started
                out_of_time = bool(cfg.time_budget_s) and broadcast_object(elapsed > cfg.time_budget_s)
                if cfg.time_budget_s and self.step % cfg.log_every == 0 and self.step - first >= 2 * cfg.log_every:
                    self.horizon = broadcast_object(
                        self._budget_horizon(end, elapsed, (self.step - first) / elapsed))
                stop = out_of_time
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step != end and not stop:
                    stop = self.evaluate()
                    t0 = time.perf_counter()  # the evaluation is not training time
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.out_dir is not None:
                    self.save()
                if stop:
                    break
        finally:
            if bar is not None:
                bar.close()
        if cfg.eval_every and self.selection["best_step"] != self.step and not self._stopped_early():
            self.evaluate()  # the last weights, unless an evaluation of them already ended the run
        if self.out_dir is not None:
            self.save()
        return self.history

    def _budget_horizon(self, end: int, elapsed: float, steps_per_s: float) -> int:
        """The step at which ``cfg.time_budget_s`` will stop the run at ``steps_per_s`` (at most ``end``, at
        least the next step): the cosine schedule's end for a budgeted run."""
        left = max(0.0, self.cfg.time_budget_s - elapsed)
        return int(min(end, max(self.step + 1, self.step + left * steps_per_s)))

    def _stopped_early(self) -> bool:
        return bool(self.cfg.patience) and self.selection["since_best"] >= self.cfg.patience

    def evaluate(self) -> bool:
        """Run ``eval_fn`` on the current weights (rank 0), log it, write ``best.pt`` when it improves
        ``cfg.select_metric``; returns True when the run should stop (``cfg.patience`` reached). Every rank
        must call this."""
        if self.eval_fn is None:
            return False
        self._check_finite()
        policy = self.parallel.gathered()  # under FSDP2 a replica gathered by every rank
        res = {}
        if self.parallel.is_main:
            was_training = policy.training
            res = self.eval_fn(policy)
            policy.train(was_training)
            if self.cfg.select_metric not in res:
                raise KeyError(f"eval_fn returned {sorted(res)}, without select_metric={self.cfg.select_metric!r}")
        res = broadcast_object(res)
        value, sel = float(res[self.cfg.select_metric]), self.selection
        improved = value > sel["best"]
        if improved:
            sel.update(best=value, best_step=self.step, since_best=0)
            if self.out_dir is not None:
                state = self.parallel.full_state_dict()  # every rank: an all-gather under FSDP2
                if self.parallel.is_main:
                    save_checkpoint(self.best_path, {"model": {k: v.detach().cpu() for k, v in state.items()},
                                                     **self._checkpoint_entries()})
        else:
            sel["since_best"] += 1
        self._log({"step": self.step, **{f"valid_{k}": v for k, v in res.items()}, "best_step": sel["best_step"]})
        if self.show_progress and self.parallel.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in res.items() if "@" in k)
            print(f"step {self.step}: valid {shown}" + (" (best)" if improved else
                                                         f" (best {sel['best']:.4f} at step {sel['best_step']})"))
        return self._stopped_early()

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
        """Append a row to ``metrics.jsonl``; training windows (rows with a loss) also to ``metrics.csv``."""
        self.metrics.append(row)
        if self.out_dir is None or not self.parallel.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if "loss" not in row:
            return
        path = self.out_dir / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


class _BatchView(torch.utils.data.Dataset):
    """Index lists -> whole ``UserBatch`` es: through the dataset's vectorized ``batch`` (a
    ``UserSequenceDataset``, or a ``Subset`` of one), else per-sample items and ``collate_user_batch``."""

    def __init__(self, dataset, transform: Callable | None = None):
        base, index = dataset, None
        if isinstance(dataset, torch.utils.data.Subset):
            base, index = dataset.dataset, np.asarray(dataset.indices, dtype=np.int64)
        self.dataset, self.base, self.index, self.transform = dataset, base, index, transform

    def __getitem__(self, indices: list[int]):
        from onerec_fast.data.batch import collate_user_batch

        if hasattr(self.base, "batch"):
            batch = self.base.batch(indices if self.index is None else self.index[indices])
        else:
            batch = collate_user_batch([self.dataset[i] for i in indices])
        return batch if self.transform is None else self.transform(batch)

    def __len__(self) -> int:
        return len(self.dataset)


def _identity(x):
    return x


def _truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop the rows after ``step`` from ``metrics.jsonl`` and ``metrics.csv`` (atomically rewritten)."""
    for name in ("metrics.jsonl", "metrics.csv"):
        path = out_dir / name
        if not path.exists():
            continue
        lines = path.read_text().splitlines(keepends=True)
        if name.endswith(".jsonl"):
            keep = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step]
        else:
            col = next(csv.reader(lines[:1])).index("step") if lines else 0
            keep = lines[:1] + [ln for ln in lines[1:] if float(next(csv.reader([ln]))[col]) <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _loss(model, batch) -> torch.Tensor:
    """The pretraining loss: what :class:`~onerec_fast.train.parallel.ParallelModel` runs in its forward."""
    return model(batch)


def plot_metrics(metrics_jsonl: str | Path, png: str | Path) -> str:
    """Plot the loss against step, and beside it the validation metrics when the run evaluated, into ``png``;
    returns a one-line message (matplotlib is optional)."""
    from onerec_fast.train.progress import line_plots

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    train = [r for r in rows if "loss" in r]
    panels = [("step", "next-code cross-entropy", [("loss", [r["step"] for r in train], [r["loss"] for r in train], "-")])]
    valid = [r for r in rows if any(k.startswith("valid_") for k in r)]
    names = [k for k in (valid[0] if valid else {}) if k.startswith("valid_") and "@" in k]
    if names:
        panels.append(("step", "validation metric", [(k.removeprefix("valid_"), [r["step"] for r in valid],
                                                      [r[k] for r in valid], "o-") for k in names]))
    return line_plots(png, panels, "loss", "metrics are in metrics.csv and metrics.jsonl")
