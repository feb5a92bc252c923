"""The P-Score reward model: one BCE tower per logged objective plus a fusion tower giving one score.

Inputs are ids: a user ``user: [N]`` and an item ``item: [N]``. The model keeps the per-user and per-item
feature tables of the :class:`~onerec_fast.data.log.InteractionLog` it was built from as buffers (static
categorical user features; categorical item features such as author and tag; continuous item features
such as duration, standardized), so a reward call needs nothing but ids.

Architecture (N pairs, width ``dim``, ``hidden``)::

    u = MLP(user-id emb + user feature embs)        [N, dim]
    v = MLP(item-id emb + item feature embs + Linear(dense))   [N, dim]
    h = MLP([u, v, u * v])                           [N, hidden]   shared bottom
    tower_k(h) -> logit_k                            one per objective, BCE against target_k in [0, 1]
    fusion([h, sigmoid(logit_1..K)]) -> logit        BCE against sum_k w_k target_k / sum_k w_k
    P-Score = sigmoid(fusion logit)                  [N] in (0, 1)

Objectives come from the log's engagement columns (see :func:`log_objectives`): binary labels (like, follow,
...) as they are, other integer labels (a 1-5 rating) rescaled to [0, 1], continuous ones (watch time)
divided by their 95th percentile and clipped to [0, 1]. With ``negatives > 0`` training adds random
items as non-interactions (every objective 0) and an ``interact`` objective (1 for logged rows), the only
way logged positives alone teach what a user does *not* engage with.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from onerec_fast.checks import check_tensor
from onerec_fast.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["PScoreConfig", "PScoreModel", "PScoreReward", "log_objectives", "train_pscore"]

INTERACT = "interact"


def log_objectives(log, objectives=None) -> dict[str, np.ndarray]:
    """Per-row targets in [0, 1] for the reward model's towers: ``{name: float32 [E]}``.

    ``objectives``: engagement column names to use (default: every engagement column of ``log``).
    Binary integer columns are taken as is; other integer columns are min-max scaled; float columns are
    divided by their 95th percentile (or max when that is 0) and clipped to [0, 1].
    """
    names = list(log.engagement) if objectives is None else list(objectives)
    out = {}
    for name in names:
        if name not in log.engagement:
            raise ValueError(f"objectives: no engagement column {name!r} in the log (have {sorted(log.engagement)})")
        v = np.asarray(log.engagement[name])
        if log.is_sparse(v):
            lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
            t = (v - lo) / (hi - lo) if hi > lo else np.zeros(len(v))
        else:
            v = v.astype(np.float64)
            scale = float(np.quantile(v, 0.95)) if len(v) else 1.0
            if scale <= 0:
                scale = float(v.max()) if len(v) and v.max() > 0 else 1.0
            t = np.clip(v / scale, 0.0, 1.0)
        out[name] = t.astype(np.float32)
    return out


@dataclass
class PScoreConfig:
    """Sizes and feature layout of a :class:`PScoreModel` (plain types, so checkpoints load with
    ``weights_only=True``). ``fusion_weights``: one weight per objective for the fusion target (equal when
    empty)."""

    num_users: int
    num_items: int
    objectives: list[str]
    user_cardinalities: dict[str, int] = field(default_factory=dict)
    item_cardinalities: dict[str, int] = field(default_factory=dict)
    item_dense: list[str] = field(default_factory=list)
    dim: int = 32
    hidden: int = 64
    fusion_weights: list[float] = field(default_factory=list)

    def __post_init__(self):
        if self.num_users < 1 or self.num_items < 1:
            raise ValueError(f"num_users and num_items must be >= 1, got {self.num_users}, {self.num_items}")
        if not self.objectives:
            raise ValueError("objectives must name at least one objective (tower)")
        if self.fusion_weights and len(self.fusion_weights) != len(self.objectives):
            raise ValueError(f"fusion_weights must have one entry per objective ({len(self.objectives)}), "
                             f"got {len(self.fusion_weights)}")
        if self.fusion_weights and (min(self.fusion_weights) < 0 or sum(self.fusion_weights) <= 0):
            raise ValueError(f"fusion_weights must be >= 0 with a positive sum, got {self.fusion_weights}")


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class PScoreModel(nn.Module):
    """Multi-tower reward model (see the module docstring). Build with :meth:`from_log`."""

    def __init__(self, config: PScoreConfig, user_tables: dict[str, torch.Tensor] | None = None,
                 item_tables: dict[str, torch.Tensor] | None = None, item_dense: torch.Tensor | None = None):
        super().__init__()
        c = self.config = config
        d = c.dim
        self.user_emb = nn.Embedding(c.num_users, d)
        self.item_emb = nn.Embedding(c.num_items, d)
        # Lists in config order, not ModuleDicts: objective and feature names ("forward", "type") may clash
        # with nn.Module attributes.
        self.user_feat_emb = nn.ModuleList(nn.Embedding(n, d) for n in c.user_cardinalities.values())
        self.item_feat_emb = nn.ModuleList(nn.Embedding(n, d) for n in c.item_cardinalities.values())
        # Feature tables travel in the state dict: zeros here, filled by from_log or load_state_dict.
        for k in c.user_cardinalities:
            t = user_tables[k] if user_tables else torch.zeros(c.num_users, dtype=torch.int64)
            self.register_buffer(f"user_table_{k}", t.long())
        for k in c.item_cardinalities:
            t = item_tables[k] if item_tables else torch.zeros(c.num_items, dtype=torch.int64)
            self.register_buffer(f"item_table_{k}", t.long())
        self.register_buffer("item_dense_table", item_dense.float() if item_dense is not None
                             else torch.zeros(c.num_items, len(c.item_dense)))
        self.item_dense_proj = nn.Linear(len(c.item_dense), d) if c.item_dense else None
        self.user_mlp = _mlp(d, c.hidden, d)
        self.item_mlp = _mlp(d, c.hidden, d)
        self.bottom = _mlp(3 * d, c.hidden, c.hidden)
        self.towers = nn.ModuleList(_mlp(c.hidden, c.hidden, 1) for _ in c.objectives)
        self.fusion = _mlp(c.hidden + len(c.objectives), c.hidden, 1)
        w = torch.tensor(c.fusion_weights or [1.0] * len(c.objectives))
        self.register_buffer("fusion_weights", w / w.sum())

    @classmethod
    def from_log(cls, log, objectives=None, negatives: int = 1, dim: int = 32, hidden: int = 64,
                 fusion_weights=None) -> PScoreModel:
        """A model for ``log``'s users, items and features; towers for ``objectives`` (default: every
        engagement column) plus ``interact`` when ``negatives > 0``."""
        names = list(log_objectives(log, objectives)) + ([INTERACT] if negatives > 0 else [])
        user_tables = {k: torch.as_tensor(v) for k, v in log.user_features.items() if log.is_sparse(v)}
        item_tables = {k: torch.as_tensor(v) for k, v in log.item_features.items() if log.is_sparse(v)}
        dense_names = [k for k, v in log.item_features.items() if v.ndim == 1 and not log.is_sparse(v)]
        dense = None
        if dense_names:
            dense = torch.stack([torch.as_tensor(log.item_features[k], dtype=torch.float32) for k in dense_names], 1)
            dense = (dense - dense.mean(0)) / dense.std(0).clamp_min(1e-6)
        cfg = PScoreConfig(
            num_users=log.num_users, num_items=log.num_items, objectives=names,
            user_cardinalities={k: int(v.max()) + 1 for k, v in user_tables.items()},
            item_cardinalities={k: int(v.max()) + 1 for k, v in item_tables.items()},
            item_dense=dense_names, dim=dim, hidden=hidden, fusion_weights=list(fusion_weights or []))
        return cls(cfg, user_tables, item_tables, dense)

    def _check_ids(self, user: torch.Tensor, item: torch.Tensor) -> None:
        check_tensor("user", user, ndim=1, dtype=(torch.int32, torch.int64))
        check_tensor("item", item, ndim=1, dtype=(torch.int32, torch.int64))
        if user.shape != item.shape:
            raise ValueError(f"user and item must have one shape [N], got {tuple(user.shape)} and {tuple(item.shape)}")

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``user, item: int [N]`` -> (fusion logit ``[N]``, ``{objective: tower logit [N]}``)."""
        self._check_ids(user, item)
        u = self.user_emb(user)
        for k, emb in zip(self.config.user_cardinalities, self.user_feat_emb):
            u = u + emb(getattr(self, f"user_table_{k}")[user])
        v = self.item_emb(item)
        for k, emb in zip(self.config.item_cardinalities, self.item_feat_emb):
            v = v + emb(getattr(self, f"item_table_{k}")[item])
        if self.item_dense_proj is not None:
            v = v + self.item_dense_proj(self.item_dense_table[item])
        u, v = self.user_mlp(u), self.item_mlp(v)
        h = self.bottom(torch.cat([u, v, u * v], dim=-1))
        logits = torch.cat([t(h) for t in self.towers], dim=-1)  # [N, K]
        fused = self.fusion(torch.cat([h, logits.sigmoid()], dim=-1)).squeeze(-1)
        return fused, dict(zip(self.config.objectives, logits.unbind(-1)))

    def loss(self, user: torch.Tensor, item: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the towers' BCE and the fusion tower's BCE; ``targets: {objective: float [N] in [0, 1]}``."""
        fused, towers = self(user, item)
        missing = set(self.config.objectives) - set(targets)
        if missing:
            raise ValueError(f"targets must hold every objective, missing {sorted(missing)}")
        t = torch.stack([targets[k].float() for k in self.config.objectives], dim=-1)
        loss = sum(F.binary_cross_entropy_with_logits(towers[k], t[:, i]) for i, k in enumerate(self.config.objectives))
        return loss + F.binary_cross_entropy_with_logits(fused, t @ self.fusion_weights)

    @torch.no_grad()
    def score(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """P-Score ``[N]`` in (0, 1) of each (user, item) pair."""
        return self(user, item)[0].sigmoid()

    def save(self, path: str | os.PathLike) -> None:
        """Write config + state dict atomically (``train.checkpoint``); loads with ``weights_only=True``."""
        save_checkpoint(path, {"kind": "pscore", "config": asdict(self.config),
                               "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}})

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> PScoreModel:
        payload = load_checkpoint(path, map_location=map_location)
        if payload.get("kind") != "pscore":
            raise ValueError(f"{path}: not a P-Score checkpoint (kind={payload.get('kind')!r})")
        model = cls(PScoreConfig(**payload["config"]))
        model.load_state_dict(payload["state_dict"])
        return model.eval()


class PScoreReward:
    """The reward model as an ECPO reward: ``(users [B], items [B, G]) -> P-Score [B, G]`` (0 where items < 0)."""

    def __init__(self, model: PScoreModel):
        self.model = model

    def __call__(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        check_tensor("users", users, ndim=1, dtype=(torch.int32, torch.int64))
        check_tensor("items", items, ndim=2, dtype=(torch.int32, torch.int64))
        dev = next(self.model.parameters()).device
        u = users.to(dev)[:, None].expand_as(items).reshape(-1)
        s = self.model.score(u, items.to(dev).clamp_min(0).reshape(-1)).reshape(items.shape).to(items.device)
        return torch.where(items >= 0, s, torch.zeros_like(s))


def train_pscore(model: PScoreModel, log, *, epochs: int = 2, batch_size: int = 1024, lr: float = 3e-3,
                 negatives: int = 1, seed: int = 0, objectives=None, max_rows: int | None = None) -> list[float]:
    """Fit ``model`` on ``log``'s rows (plus ``negatives`` random items per row as non-interactions).

    ``objectives`` must match the model's (default: the model's minus ``interact``). Returns the loss of
    every step (it falls as the model learns). Runs on the model's device.
    """
    names = [k for k in model.config.objectives if k != INTERACT] if objectives is None else list(objectives)
    if (INTERACT in model.config.objectives) != (negatives > 0):
        raise ValueError(f"negatives={negatives} does not match the model's objectives {model.config.objectives} "
                         f"(the {INTERACT!r} tower needs negatives > 0, and only it)")
    dev = next(model.parameters()).device
    targets = {k: torch.as_tensor(v) for k, v in log_objectives(log, names).items()}
    user, item = torch.as_tensor(log.user), torch.as_tensor(log.item)
    g = torch.Generator().manual_seed(seed)
    if max_rows is not None and len(user) > max_rows:
        keep = torch.randperm(len(user), generator=g)[:max_rows]
        user, item, targets = user[keep], item[keep], {k: v[keep] for k, v in targets.items()}
    if negatives > 0:
        n = len(user)
        neg_item = torch.randint(0, model.config.num_items, (n * negatives,), generator=g)
        user = torch.cat([user, user.repeat(negatives)])
        item = torch.cat([item, neg_item])
        targets = {k: torch.cat([v, v.new_zeros(n * negatives)]) for k, v in targets.items()}
        targets[INTERACT] = torch.cat([torch.ones(n), torch.zeros(n * negatives)])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    steps = math.ceil(len(user) / batch_size)
    for _ in range(epochs):
        perm = torch.randperm(len(user), generator=g)
        for s in range(steps):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            loss = model.loss(user[idx].to(dev), item[idx].to(dev), {k: v[idx].to(dev) for k, v in targets.items()})
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    model.eval()
    return losses
