"""The ECPO reinforcement-learning loop (TR 2.4) for a pretrained ``OneRec``.

Each round draws a fraction of the users (``user_fraction``, default 1%, of the dataset's samples: pass a
dataset with one sample per user, e.g. ``BatchConfig(train_targets="last")``), generates ``G`` items per
user with the current policy, scores them with a reward function and takes ECPO steps together with the
next-token loss on the users' logged targets:

    loss = ecpo_loss(logp, logp_old, reward, mask=legal)                          (group-normalized)
         + format_weight * ecpo_loss_with_advantages(logp, logp_old, 1, mask=drawn K & legal)
         + ntp_weight * next-token cross-entropy of the batch's logged target items

``logp`` is the teacher-forced sequence log-probability of the 3 codes (full softmax per level) under the
parameters being trained; ``logp_old`` the same under the parameters that generated the items.

Generation (``generation``): ``"sample"`` draws codes level by level from the policy's softmax (at
``temperature``; ``constrained=True`` keeps only trie-valid children, otherwise illegal code sequences can
come out, which the format reward teaches away); ``"beam"`` takes the G best items of trie-constrained beam
search (``OneRec.generate``).

Modes (``mode``): ``"single"`` generates and trains in one process, deterministic for a seed;
``"async"`` runs generation in a separate process (``torch.multiprocessing``, spawn) that keeps a copy of
the policy: the trainer pushes its parameters every ``sync_every`` optimizer steps through a queue, the
generator sends batches of generations back through a bounded queue (``queue_size`` in flight), so
generations are at most a few versions stale and ``logp_old`` is the stale policy's (ECPO's ratio and
early clip handle it). The state dicts travel through shared memory, from each rank to its own generator.

Under torchrun (:mod:`onerec_fast.train.parallel`, ``parallel="ddp"`` or ``"fsdp"``) every rank draws the
same users for a round and works on its contiguous share: it generates for them (from the whole policy: the
model under DDP, a replica gathered from the shards under FSDP2), scores them and computes the loss on them;
the gradients are averaged over ranks (the ECPO advantages are per user, so the split does not change them;
each rank's loss is a mean over its own legal generations). The MoE load is summed over ranks before the
expert-bias update. Only rank 0 evaluates, logs and plots.

Output (``out_dir``): ``rl_metrics.jsonl`` (one row per step: reward, legality, losses, staleness, and the
``eval_*`` columns of ``eval_fn`` every ``eval_every`` steps), ``rl_checkpoint.pt`` (atomic; model,
optimizer, step, RNG: :meth:`ECPOTrainer.resume` continues the single-process run exactly; under torchrun
the DCP folder ``rl_checkpoint.dcp``, which resumes on any number of ranks) and ``rl_reward.png`` (reward
and legality against step) when matplotlib is importable.

Non-finite policy: a loss or gradient norm that is not finite stops training with FloatingPointError naming
the step, before the optimizer step (every rank decides alike), so the weights stay finite and no later save
replaces the last checkpoint; a non-finite reward is masked out of ECPO with a warning (:mod:`onerec_fast.rl.ecpo`).
"""

from __future__ import annotations

import dataclasses
import json
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from onerec_fast.model.layers import moe_layers
from onerec_fast.rl.ecpo import ecpo_loss, ecpo_loss_with_advantages
from onerec_fast.rl.rewards import FormatReward
from onerec_fast.train.checkpoint import checkpoint_path, load_training_state, save_training_state
from onerec_fast.train.parallel import (
    PARALLEL_MODES,
    ParallelModel,
    all_reduce_sum,
    init_distributed,
    local_device,
    shard_range,
)
from onerec_fast.train.pretrain import param_groups  # AdamW groups: no decay on 1-D parameters, as pretraining
from onerec_fast.train.progress import ProgressBar

__all__ = [
    "RLConfig",
    "Generations",
    "ECPOTrainer",
    "sample_generations",
    "generate_group",
    "sequence_logp",
    "evaluate_policy",
    "plot_rl_metrics",
]


@dataclass
class RLConfig:
    steps: int = 200  # optimizer steps in the whole run
    user_fraction: float = 0.01  # share of the dataset's samples (users) per round
    users_per_round: int = 0  # > 0 overrides user_fraction
    group_size: int = 8  # G generations per user
    generation: str = "sample"  # "sample" or "beam"
    temperature: float = 1.0
    constrained: bool = False  # sampling: only trie-valid codes (always legal)
    format_k: int = 4  # K generations drawn per user for the format reward (0: off)
    format_weight: float = 1.0
    ntp_weight: float = 1.0  # weight of the next-token loss on the logged targets
    eps: float = 0.2
    delta: float = 0.1
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    updates_per_round: int = 1  # optimizer steps on one round of generations
    mode: str = "single"  # "single" or "async"
    sync_every: int = 1  # async: push parameters to the generator every N optimizer steps
    queue_size: int = 2  # async: rounds of generations in flight
    seed: int = 0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only before the first and after the last step (when eval_fn is set)
    ckpt_every: int = 0  # 0: only at the end
    parallel: str = "ddp"  # under torchrun: "ddp" (replicated) or "fsdp" (FSDP2, sharded); ignored in one process

    def __post_init__(self):
        for name in ("steps", "group_size", "updates_per_round", "sync_every", "queue_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.user_fraction <= 1:
            raise ValueError(f"user_fraction must lie in (0, 1], got {self.user_fraction}")
        if self.generation not in ("sample", "beam"):
            raise ValueError(f"generation must be 'sample' or 'beam', got {self.generation!r}")
        if self.mode not in ("single", "async"):
            raise ValueError(f"mode must be 'single' or 'async', got {self.mode!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.format_k < 0 or self.users_per_round < 0:
            raise ValueError(f"format_k and users_per_round must be >= 0, got {self.format_k}, {self.users_per_round}")
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {self.parallel!r}")


@dataclass
class Generations:
    """One round of generations for B users: ``codes: int64 [B, G, L]`` (-1 in dead beam slots),
    ``logp_old: float32 [B, G]`` (sequence log-probability under the generating parameters; 0 in dead
    slots), ``alive: bool [B, G]`` (False for beam slots beyond the reachable items), ``version``: the
    optimizer step of the generating parameters."""

    codes: torch.Tensor
    logp_old: torch.Tensor
    alive: torch.Tensor
    version: int = 0


# --------------------------------------------------------------------------------------------- generation
@torch.no_grad()
def sample_generations(model, batch, group_size: int, temperature: float = 1.0, constrained: bool = False,
                       generator: torch.Generator | None = None) -> Generations:
    """Ancestral sampling of ``group_size`` code sequences per user of ``batch`` (on the model's device).

    The encoder runs once per user and its cross-attention keys/values are shared by the G samples (the
    decoder's beam step with each sample its own beam). ``logp_old`` is the full-softmax log-probability at
    temperature 1 (the policy's own), whatever ``temperature``/``constrained`` shaped the draw.
    """
    enc = model.encode(batch)
    B, G, L = len(batch), group_size, model.cfg.code_levels
    device = enc.states.device
    state = model.decoder.start(enc)
    parents = torch.arange(G, device=device).expand(B, G)
    node_trie = model.decoder_trie(device)
    trie = model.trie(device) if constrained or node_trie is not None else None
    nodes = torch.zeros(B * G, dtype=torch.int64, device=device)
    token, codes = None, []
    logp = torch.zeros(B, G, dtype=torch.float32, device=device)
    for t in range(L):
        logits = model.decoder.step(state, t, token, parents if t else None, G, nodes.view(B, G),
                                    node_trie).float()  # [B, G, V_t]
        logp_t = F.log_softmax(logits, dim=-1)
        scores = logits / temperature
        if constrained:
            valid = trie.valid_mask(t, nodes).view(B, G, -1)
            scores = scores.masked_fill(~valid, float("-inf"))
        probs = F.softmax(scores, dim=-1).view(B * G, -1)
        token = torch.multinomial(probs, 1, generator=generator).view(B, G)
        logp += logp_t.gather(-1, token[..., None]).squeeze(-1)
        if trie is not None:
            nodes = trie.step(t, nodes, token.reshape(-1))
        codes.append(token)
    alive = torch.ones(B, G, dtype=torch.bool, device=device)
    return Generations(torch.stack(codes, dim=-1), logp, alive)


@torch.no_grad()
def generate_group(model, batch, cfg: RLConfig, generator: torch.Generator | None = None) -> Generations:
    """G generations per user as ``cfg`` says (sampling or the G best of constrained beam search)."""
    if cfg.generation == "beam":
        out = model.generate(batch, beam_size=cfg.group_size, num_return=cfg.group_size)
        alive = out.item_ids >= 0
        return Generations(out.codes, torch.where(alive, out.scores.float(), 0.0), alive)
    return sample_generations(model, batch, cfg.group_size, cfg.temperature, cfg.constrained, generator)


def sequence_logp(model, enc, codes: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log pi(codes | user): ``codes: int64 [B, G, L]`` (valid code values) -> float32 ``[B, G]``,
    the sum over the L levels of the full-softmax log-probabilities. ``enc``: the B users' encoder output,
    repeated for their G generations (the encoder runs once)."""
    B, G, L = codes.shape
    enc_g = enc.map_tensors(lambda t: t.repeat_interleave(G, dim=0))  # every field, the recent item ids too
    flat = codes.reshape(B * G, L)
    logits = model.decoder(flat, enc_g, model.decoder_trie(flat.device))
    lp = sum(F.log_softmax(lg.float(), dim=-1).gather(1, flat[:, t:t + 1]).squeeze(1) for t, lg in enumerate(logits))
    return lp.view(B, G)


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_policy(model, dataset, reward_fn: Callable, indices=None, group_size: int = 8, top_k: int = 0,
                    batch_size: int = 64, seed: int = 0, device: torch.device | str | None = None) -> dict:
    """Score the policy on ``dataset[indices]`` (default: every sample) with ``reward_fn`` (e.g. the true preference).

    Returns ``{"reward": mean reward of the legal items among group_size unconstrained samples per user,
    "legality": share of those samples that are real items, "reward_top": mean reward of the top_k items of
    constrained beam search}`` (``reward_top`` only when ``top_k > 0``). Deterministic for a seed.
    """
    from onerec_fast.data.batch import collate_user_batch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    idx = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    gen = torch.Generator(device=device).manual_seed(seed)
    trie = model.trie(device)
    was_training = model.training
    model.eval()
    tot = torch.zeros(4, dtype=torch.float64)  # reward sum, legal count, generated count, top-k reward sum
    for s in range(0, len(idx), batch_size):
        batch = collate_user_batch([dataset[i] for i in idx[s:s + batch_size]]).to(device)
        g = sample_generations(model, batch, group_size, generator=gen)
        B, G, L = g.codes.shape
        items = trie.lookup(g.codes.reshape(B * G, L)).view(B, G)
        r = reward_fn(batch.user, items)
        legal = items >= 0
        tot[0] += float((r * legal).sum())
        tot[1] += float(legal.sum())
        tot[2] += B * G
        if top_k:
            out = model.generate(batch, beam_size=top_k, num_return=top_k)
            rt = reward_fn(batch.user, out.item_ids)
            tot[3] += float((rt * (out.item_ids >= 0)).sum())
    model.train(was_training)
    res = {"reward": float(tot[0] / tot[1].clamp_min(1)), "legality": float(tot[1] / tot[2])}
    if top_k:
        res["reward_top"] = float(tot[3] / (len(idx) * top_k))
    return res


# --------------------------------------------------------------------------------------------- the trainer
class ECPOTrainer:
    """ECPO post-training of ``model`` (a ``OneRec`` with its catalogue set) on users of ``dataset``.

    Args:
        model: the policy; trained in place.
        dataset: a ``UserSequenceDataset`` (or Subset) whose samples are the users to draw from; each
            sample's context is the state and its logged target feeds the next-token loss.
        reward_fn: ``(users [B], items [B, G]) -> rewards [B, G]`` (items -1 where illegal), e.g.
            :class:`~onerec_fast.rl.rewards.ComposedReward` of a P-Score reward and industrial adjustments.
        cfg: :class:`RLConfig`.
        eval_fn: optional ``model -> {name: float}`` logged as ``eval_<name>`` (e.g. the true reward); under
            torchrun give it on every rank (the FSDP2 replica is gathered by all): it runs on rank 0 only.
        meta: stored as is in every checkpoint (the CLI passes on the train checkpoint's data record, so
            ``onerec-fast evaluate`` can load an RL checkpoint).

    Under torchrun every rank draws the same round of ``users_per_round`` users and takes its contiguous
    share (generation, rewards and the loss on its own users; gradients averaged by DDP or FSDP2 as
    ``cfg.parallel`` says); the logged reward, legality and losses are over all ranks.
    """

    def __init__(self, model, dataset, reward_fn: Callable, cfg: RLConfig, device: torch.device | str = "cpu",
                 out_dir: str | Path | None = None, eval_fn: Callable | None = None, show_progress: bool = True,
                 meta: dict | None = None):
        from onerec_fast.data.batch import collate_user_batch

        if len(dataset) < 1:
            raise ValueError("dataset must hold at least one user sample")
        init_distributed(device)
        self.model, self.dataset, self.reward_fn, self.cfg = model, dataset, reward_fn, cfg
        self.device = local_device(device)
        self.model.to(self.device)
        self.parallel = ParallelModel(model, self.device, cfg.parallel)  # before the optimizer: FSDP2 swaps parameters
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.eval_fn, self.show_progress, self.meta = eval_fn, show_progress, meta or {}
        self.opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                     fused=self.device.type == "cuda" or None)
        self.trie = model.trie(self.device)
        self.format_reward = FormatReward(self.trie, cfg.format_k) if cfg.format_k else None
        self.step = 0
        self.metrics: list[dict] = []
        self._collate = collate_user_batch
        self.users_per_round = cfg.users_per_round or max(1, round(cfg.user_fraction * len(dataset)))
        self.users_per_round = min(self.users_per_round, len(dataset))
        rank, world = self.parallel.rank, self.parallel.world_size
        if self.users_per_round < world:
            raise ValueError(f"users_per_round ({self.users_per_round}) must be at least the number of ranks "
                             f"({world}): every rank trains on its own users")
        self._pick_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: the round's users
        self._sample_gen = torch.Generator(device=self.device).manual_seed(_rank_seed(cfg.seed + 1, rank))
        self._draw_gen = torch.Generator(device=self.device).manual_seed(_rank_seed(cfg.seed + 2, rank))

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        """Where :meth:`save` writes by default: ``<out_dir>/rl_checkpoint.pt`` (``.dcp`` under torchrun)."""
        return checkpoint_path(self.out_dir, "rl_checkpoint")

    def _checkpoint_entries(self) -> dict:
        """Everything a checkpoint holds besides the model, the optimizer and the RNG states. The sampling
        and format-draw generators are per rank: ``[world_size, state]`` (every rank's, gathered)."""
        per_rank = [self._sample_gen.get_state(), self._draw_gen.get_state()]
        if self.parallel.world_size > 1:
            gathered = [None] * self.parallel.world_size
            dist.all_gather_object(gathered, per_rank)
        else:
            gathered = [per_rank]
        return {
            "model_config": dataclasses.asdict(self.model.cfg),
            "step": self.step,
            "rl_config": dataclasses.asdict(self.cfg),
            "meta": self.meta,
            "generators": {"pick": self._pick_gen.get_state(), "sample": torch.stack([g[0] for g in gathered]),
                           "draw": torch.stack([g[1] for g in gathered])},
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint (default :attr:`checkpoint_path`); under torchrun every rank must call this."""
        return save_training_state(self.checkpoint_path if path is None else path, self.model, self.opt,
                                   self._checkpoint_entries())

    def resume(self, path: str | Path) -> None:
        """Continue from :meth:`save`'s checkpoint: exactly on the same device and number of ranks; on another
        number of ranks the per-rank sampling generators restart from seeds of (seed, step, rank)."""
        ck = load_training_state(path, self.model, self.opt)
        self.step = int(ck["step"])
        gens = ck["generators"]
        self._pick_gen.set_state(gens["pick"])
        # A single-process checkpoint of an earlier version holds one state per generator, not one per rank.
        sample, draw = torch.atleast_2d(gens["sample"]), torch.atleast_2d(gens["draw"])
        rank, world = self.parallel.rank, self.parallel.world_size
        if sample.shape[0] == world:
            self._sample_gen.set_state(sample[rank])
            self._draw_gen.set_state(draw[rank])
        else:
            self._sample_gen.manual_seed(_rank_seed(self.cfg.seed + 1, rank, self.step))
            self._draw_gen.manual_seed(_rank_seed(self.cfg.seed + 2, rank, self.step))

    # -- one round ------------------------------------------------------------------------------------------
    def pick_users(self, generator: torch.Generator | None = None) -> list[int]:
        """Dataset indices of this round's users (``users_per_round`` distinct samples, the same on every rank)."""
        g = generator if generator is not None else self._pick_gen
        return torch.randperm(len(self.dataset), generator=g)[: self.users_per_round].tolist()

    def local_users(self, users: list[int]) -> list[int]:
        """This rank's contiguous share of a round's users (all of them in one process)."""
        lo, hi = shard_range(len(users), self.parallel.rank, self.parallel.world_size)
        return users[lo:hi]

    def collate(self, indices: list[int]):
        return self._collate([self.dataset[i] for i in indices])

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.device.type == "cuda" and self.cfg.amp)

    def train_round(self, batch_cpu, gens: Generations) -> dict:
        """Rewards for one round of generations (this rank's users), then ``updates_per_round`` optimizer
        steps; returns the round's metrics over all ranks (reward and legality of the generations, losses of
        the last update)."""
        cfg, model = self.cfg, self.model
        model.check_batch(batch_cpu)
        batch = batch_cpu.to(self.device, non_blocking=True)
        codes = gens.codes.to(self.device)
        alive = gens.alive.to(self.device)
        logp_old = gens.logp_old.to(self.device)
        B, G, L = codes.shape
        safe = codes.clamp_min(0)  # dead beam slots hold -1: any valid code, they are masked anyway
        items = torch.where(alive, self.trie.lookup(safe.reshape(B * G, L)).view(B, G), -1)
        legal = items >= 0
        with torch.no_grad():
            rewards = self.reward_fn(batch.user, items).float()
        fmt_mask = None
        if self.format_reward is not None:
            fmt_mask = self.format_reward(safe, generator=self._draw_gen).mask & alive
        model.train()
        for _ in range(cfg.updates_per_round):
            with self._autocast():
                logp, ntp = self.parallel(_policy_terms, batch, safe)
            rl = ecpo_loss(logp, logp_old, rewards, eps=cfg.eps, delta=cfg.delta, mask=legal)
            loss = rl + cfg.ntp_weight * ntp
            if model.cfg.moe_aux_loss_coef or model.cfg.moe_z_loss_coef:  # as OneRec.forward adds them
                loss = loss + sum(m.aux_loss() for m in moe_layers(model))
            fmt = torch.zeros((), device=self.device)
            if fmt_mask is not None:
                fmt = ecpo_loss_with_advantages(logp, logp_old, fmt_mask.float(), eps=cfg.eps, delta=cfg.delta,
                                                mask=fmt_mask)
                loss = loss + cfg.format_weight * fmt
            loss.backward()
            grad_norm = self.parallel.clip_grad_norm_(cfg.grad_clip)
            self._stop_unless_finite(loss, grad_norm, rl, fmt, ntp)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.parallel.sync_expert_load()
            model.update_expert_bias()
            self.step += 1
        # sums over the round's generations (added over ranks), then the losses (averaged over ranks)
        counts = torch.stack([(rewards * legal).sum(), legal.sum().float(), torch.tensor(B * G, device=self.device,
                                                                                        dtype=torch.float32)])
        losses = torch.stack([rl.detach(), fmt.detach(), ntp.detach().float(), loss.detach()])
        if self.parallel.world_size > 1:
            counts = all_reduce_sum(counts)
            losses = self.parallel.all_reduce_mean(losses)
        reward_sum, n_legal, n = counts
        vals = torch.stack([reward_sum / n_legal.clamp_min(1), n_legal / n, *losses, grad_norm.float()]).tolist()
        keys = ("reward", "legality", "ecpo_loss", "format_loss", "ntp_loss", "loss", "grad_norm")
        users = int(n.item()) // G
        return {"step": self.step, **dict(zip(keys, vals)), "users": users, "staleness": self.step - 1 - gens.version}

    def _stop_unless_finite(self, loss, grad_norm, rl, fmt, ntp) -> None:
        """FloatingPointError naming the coming step when ``loss`` or ``grad_norm`` (0-d) is not finite on any
        rank (one all-reduce of the flags, so every rank stops), before the optimizer touches the weights."""
        bad = torch.stack([~torch.isfinite(loss.detach()), ~torch.isfinite(grad_norm.detach())]).float()
        if self.parallel.world_size > 1:
            bad = all_reduce_sum(bad)
        if bool(bad.any()):
            terms = ", ".join(f"{k} {float(v.detach()):.4g}" for k, v in (("ecpo", rl), ("format", fmt), ("ntp", ntp)))
            kept = f"; the last checkpoint {self.checkpoint_path} is kept" if self.out_dir is not None else ""
            raise FloatingPointError(
                f"ECPO step {self.step + 1}: non-finite {'loss' if bad[0] else 'gradient'} on this rank or another "
                f"(here: loss {float(loss.detach()):.4g} with terms {terms}; gradient norm {float(grad_norm):.4g}); "
                f"stopped before the optimizer step, the weights are unchanged{kept}")

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> list[dict]:
        """Run until ``steps`` (default ``cfg.steps``) optimizer steps are done in total; returns the metrics."""
        end = self.cfg.steps if steps is None else steps
        if self.step >= end:
            return self.metrics
        self._evaluate()
        bar = ProgressBar(end, "rl", start=self.step) if self.show_progress and self.parallel.is_main else None
        try:
            if self.cfg.mode == "single":
                self._train_single(end, bar)
            else:
                self._train_async(end, bar)
        finally:
            if bar is not None:
                bar.close()
        if not self.cfg.eval_every or self.step % self.cfg.eval_every:
            self._evaluate()
        if self.out_dir is not None:
            self.save()
            if self.parallel.is_main:
                msg = plot_rl_metrics(self.out_dir / "rl_metrics.jsonl", self.out_dir / "rl_reward.png")
                if self.show_progress:
                    print(msg)
        return self.metrics

    def _after_round(self, row: dict, t0: float, bar) -> None:
        row["round_s"] = time.perf_counter() - t0
        if self.cfg.eval_every and self.step % self.cfg.eval_every == 0:
            row.update({f"eval_{k}": v for k, v in self._run_eval().items()})
        if self.step % self.cfg.log_every == 0 or any(k.startswith("eval_") for k in row):
            self._log(row)
        if bar is not None:
            bar.update(self.cfg.updates_per_round, reward=row["reward"], legal=row["legality"], loss=row["loss"])
        if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0 and self.out_dir is not None:
            self.save()

    def _train_single(self, end: int, bar) -> None:
        while self.step < end:
            t0 = time.perf_counter()
            batch_cpu = self.collate(self.local_users(self.pick_users()))
            policy = self.parallel.gathered()  # whole parameters (a replica refreshed from the shards under FSDP2)
            policy.eval()
            with self._autocast():  # the precision training computes logp in, so rho starts at 1
                gens = generate_group(policy, batch_cpu.to(self.device), self.cfg, self._sample_gen)
            gens.version = self.step
            self._after_round(self.train_round(batch_cpu, gens), t0, bar)

    def _policy_state_cpu(self) -> dict:
        """The policy's whole state on CPU for the generator process (a collective under FSDP2)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.parallel.full_state_dict().items()}

    def _train_async(self, end: int, bar) -> None:
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        param_q, out_q = ctx.Queue(), ctx.Queue(maxsize=self.cfg.queue_size)
        rank, world = self.parallel.rank, self.parallel.world_size
        lo, hi = shard_range(self.users_per_round, rank, world)
        spec = {
            "model_config": dataclasses.asdict(self.model.cfg),
            "state": self._policy_state_cpu(),
            "version": self.step,
            "rl_config": dataclasses.asdict(self.cfg),
            "dataset": self.dataset,
            "device": str(self.device),
            "users_per_round": hi - lo,  # this rank's share, drawn by its own generator process
            "seeds": (_rank_seed(self.cfg.seed + 101, rank), _rank_seed(self.cfg.seed + 102, rank)),
            "num_threads": torch.get_num_threads(),  # a spawned process would start with the default
        }
        proc = ctx.Process(target=_generator_main, args=(spec, param_q, out_q), daemon=True)
        proc.start()
        try:
            while self.step < end:
                t0 = time.perf_counter()
                msg = _get_alive(out_q, proc)
                if msg[0] == "error":
                    raise RuntimeError(f"the generator process failed:\n{msg[1]}")
                _, batch_cpu, gens = msg
                self._after_round(self.train_round(batch_cpu, gens), t0, bar)
                if self.step % self.cfg.sync_every == 0:
                    param_q.put({"version": self.step, "state": self._policy_state_cpu()})
        finally:
            param_q.put(None)
            _drain(out_q)
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
                proc.join()

    # -- logging --------------------------------------------------------------------------------------------
    def _run_eval(self) -> dict:
        """``eval_fn`` on rank 0 (``{}`` elsewhere); every rank must call this (the FSDP2 replica is gathered)."""
        if self.eval_fn is None:
            return {}
        policy = self.parallel.gathered()
        if not self.parallel.is_main:
            return {}
        was_training = policy.training
        res = self.eval_fn(policy)
        policy.train(was_training)
        return res

    def _evaluate(self) -> None:
        res = self._run_eval()
        if res:
            self._log({"step": self.step, **{f"eval_{k}": v for k, v in res.items()}})

    def _log(self, row: dict) -> None:
        self.metrics.append(row)
        if self.out_dir is None or not self.parallel.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "rl_metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _policy_terms(model, batch, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a training update computes with the parameters (run inside the DDP/FSDP2 forward): the teacher-forced
    ``logp [B, G]`` of the generations ``codes [B, G, L]`` and the next-token loss on the logged targets (0-d)."""
    enc = model.encode(batch)
    return sequence_logp(model, enc, codes), model.decoder.loss(batch.target_codes, enc,
                                                                trie=model.decoder_trie(enc.states.device))


def _rank_seed(base: int, rank: int, step: int = 0) -> int:
    """Seed of a per-rank generator: ``base`` itself for rank 0 at step 0 (the single-process stream)."""
    return base + 1_000_003 * rank + 7_919 * step


def _get_alive(q, proc, poll_s: float = 1.0):
    """``q.get()`` that raises instead of hanging when the producer process died."""
    while True:
        try:
            return q.get(timeout=poll_s)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the generator process exited with code {proc.exitcode}") from None


def _drain(q) -> None:
    """Discard what the generator process still queued, so that it is not blocked on a full queue. Its tensors
    travel as file descriptors fetched from the producer: once it has exited, unpickling one fails with EOFError
    or a connection error (seen in CI), which is fine for an item thrown away."""
    try:
        while True:
            q.get_nowait()
    except (queue.Empty, OSError, ValueError, EOFError):
        pass


def _generator_main(spec: dict, param_q, out_q) -> None:
    """The generator process: a copy of the policy that generates rounds until it receives ``None``."""
    try:
        from onerec_fast.data.batch import collate_user_batch
        from onerec_fast.model.config import OneRecConfig
        from onerec_fast.model.onerec import OneRec

        torch.set_num_threads(spec["num_threads"])
        cfg = RLConfig(**spec["rl_config"])
        device = torch.device(spec["device"])
        model = OneRec(OneRecConfig(**spec["model_config"]), spec["state"]["item_codes"])
        model.load_state_dict(spec["state"])
        model.to(device).eval()
        version, dataset = spec["version"], spec["dataset"]
        pick = torch.Generator().manual_seed(spec["seeds"][0])
        sample = torch.Generator(device=device).manual_seed(spec["seeds"][1])

        def newest_params() -> bool:
            """Load the newest pushed parameters; False once the trainer said stop."""
            nonlocal version
            latest = None
            try:
                while True:
                    msg = param_q.get_nowait()
                    if msg is None:
                        return False
                    latest = msg
            except queue.Empty:
                pass
            if latest is not None:
                model.load_state_dict(latest["state"])
                version = latest["version"]
            return True

        while newest_params():
            idx = torch.randperm(len(dataset), generator=pick)[: spec["users_per_round"]].tolist()
            batch = collate_user_batch([dataset[i] for i in idx])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.amp):
                gens = generate_group(model, batch.to(device), cfg, sample)
            gens = Generations(gens.codes.cpu(), gens.logp_old.cpu(), gens.alive.cpu(), version)
            while True:  # a full queue must not keep us from seeing the stop message
                try:
                    out_q.put(("gen", batch, gens), timeout=0.2)
                    break
                except queue.Full:
                    if not newest_params():
                        return
    except Exception:  # report to the trainer instead of dying silently
        out_q.put(("error", traceback.format_exc()))


def plot_rl_metrics(metrics_jsonl: str | Path, png: str | Path) -> str:
    """Plot reward and legality against RL step into ``png`` (with the ``eval_`` curves when logged);
    returns a one-line message (matplotlib is optional)."""
    from onerec_fast.train.progress import line_plots

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    panels = []
    for key in ("reward", "legality"):
        series = []
        for prefix, style in (("", "-"), ("eval_", "o-")):
            pts = [(r["step"], r[prefix + key]) for r in rows if prefix + key in r]
            if pts:
                series.append((f"{prefix or 'train '}{key}".replace("_", " "), *zip(*pts), style))
        panels.append(("RL step", key, series))
    return line_plots(png, panels, "reward", "metrics are in rl_metrics.jsonl")
