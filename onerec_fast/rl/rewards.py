"""Rewards for ECPO: the format (legality) reward and composable industrial rewards.

Shapes: B users, G generations per user, L code levels. A generated item is a code sequence
``codes: [B, G, L]``; once looked up in the trie it is an item id ``items: [B, G]`` (int64, -1 where the
codes are no real item).

* :class:`FormatReward` (TR 2.4.3): of the G generations draw K at random per user; the legal ones (real
  items, ``trie.contains``) get advantage 1, the illegal ones are dropped (masked out). It teaches an
  unconstrained policy to emit only real items; the legality rate it reports is over all G.
* A *reward* maps ``(users [B], items [B, G]) -> rewards [B, G]`` (float; anything where ``items < 0``,
  since those are masked out of ECPO): :class:`TableReward` (a known ``[U, I]`` preference, e.g. the
  synthetic world's truth) and ``PScoreReward`` (the reward model, in :mod:`onerec_fast.rl.reward_model`).
* An *adjustment* maps ``(users, items, rewards) -> rewards``: :class:`ExposureShareCap` (viral-content
  control: scale down items whose exposure share passed ``max_share``) and :class:`NewAuthorBoost`.
  :class:`ComposedReward` chains a reward with any number of adjustments.

Scaling a reward by ``factor`` means ``r * factor`` for ``r >= 0`` and ``r / factor`` for ``r < 0``, so a
factor below 1 always lowers the reward and above 1 always raises it, whatever the reward's sign.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from onerec_fast.checks import check_tensor

__all__ = [
    "FormatReward",
    "FormatRewardResult",
    "TableReward",
    "ExposureShareCap",
    "NewAuthorBoost",
    "ComposedReward",
    "scale_reward",
]

_INTS = (torch.int32, torch.int64)


def scale_reward(rewards: torch.Tensor, factor) -> torch.Tensor:
    """``rewards * factor`` where ``rewards >= 0``, ``rewards / factor`` elsewhere (``factor`` > 0: float or
    a tensor broadcasting to ``rewards``): the direction of the change never depends on the sign."""
    return torch.where(rewards >= 0, rewards * factor, rewards / factor)


def _check_items(users: torch.Tensor, items: torch.Tensor) -> None:
    check_tensor("users", users, ndim=1, dtype=_INTS)
    check_tensor("items", items, ndim=2, dtype=_INTS)
    if items.shape[0] != users.shape[0]:
        raise ValueError(f"items must be [B={users.shape[0]}, G] (one row per user), got {tuple(items.shape)}")


# --------------------------------------------------------------------------------------------- format reward
@dataclass
class FormatRewardResult:
    """What :class:`FormatReward` found for one round of generations (tensors ``[B, G]``).

    ``legal``: bool, the codes are a real item. ``drawn``: bool, among the K drawn per user.
    ``mask = drawn & legal``: the entries the format loss trains on, each with ``advantages`` 1
    (0 elsewhere). Pass ``advantages`` and ``mask`` to
    :func:`~onerec_fast.rl.ecpo.ecpo_loss_with_advantages`.
    """

    legal: torch.Tensor
    drawn: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor

    @property
    def legality_rate(self) -> float:
        """Fraction of all B * G generations that are real items (one host sync)."""
        return float(self.legal.float().mean())

    def stats(self) -> dict[str, float]:
        """Counts and rates for the log: generated, legal, drawn, drawn_legal, legality_rate."""
        counts = torch.stack([self.legal.sum(), self.drawn.sum(), self.mask.sum()]).tolist()
        return {
            "generated": float(self.legal.numel()),
            "legal": float(counts[0]),
            "drawn": float(counts[1]),
            "drawn_legal": float(counts[2]),
            "legality_rate": counts[0] / max(self.legal.numel(), 1),
        }


class FormatReward:
    """The format reward: draw ``k`` of the G generations per user; legal ones get advantage 1.

    Args:
        trie: anything with ``contains(codes [M, L]) -> bool [M]`` (a
            :class:`~onerec_fast.decoding.SemanticIDTrie`).
        k: how many generations to draw per user (``1 <= k``; capped at G).
    """

    def __init__(self, trie, k: int):
        if not callable(getattr(trie, "contains", None)):
            raise TypeError(f"trie must have a contains(codes) method, got {type(trie).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.trie, self.k = trie, k

    def __call__(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> FormatRewardResult:
        """``codes: [B, G, L]`` generated code sequences -> :class:`FormatRewardResult`.

        ``generator`` (on the codes' device) makes the draw reproducible.
        """
        check_tensor("codes", codes, ndim=3, dtype=_INTS)
        B, G, L = codes.shape
        legal = self.trie.contains(codes.reshape(B * G, L)).reshape(B, G)
        # K distinct generations per user: the K smallest of G uniform keys
        keys = torch.rand(B, G, generator=generator, device=codes.device)
        pick = keys.argsort(dim=1)[:, : min(self.k, G)]
        drawn = torch.zeros(B, G, dtype=torch.bool, device=codes.device).scatter_(1, pick, True)
        mask = drawn & legal
        return FormatRewardResult(legal=legal, drawn=drawn, mask=mask, advantages=mask.float())


# --------------------------------------------------------------------------------------------- rewards
class TableReward:
    """Reward from a known preference table ``table: [U, I]`` (float): ``r[b, g] = table[users[b], items[b, g]]``,
    0 where ``items < 0``. The synthetic world's true preference is one."""

    def __init__(self, table: torch.Tensor):
        check_tensor("table", table, ndim=2)
        if not table.is_floating_point():
            raise TypeError(f"table must be floating point, got {table.dtype}")
        self.table = table

    def __call__(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        _check_items(users, items)
        self.table = self.table.to(items.device)  # moved once, not on every call
        r = self.table[users[:, None], items.clamp_min(0)]
        return torch.where(items >= 0, r, torch.zeros_like(r))


class ExposureShareCap:
    """Viral-content control: scale the reward of items whose exposure share passed ``max_share`` by ``alpha``.

    Exposures are counted over the generations this adjustment sees (legal items only), the current
    round included: the generated items are what the policy would show. ``share[i] = count[i] /
    total``; with ``decay < 1`` older rounds fade (counts are multiplied by ``decay`` before each
    round is added), so an item can recover once it stops being over-shown.

    Args:
        num_items: ``I``, the item vocabulary.
        alpha: scale (``0 < alpha < 1``) applied to over-exposed items.
        max_share: the share ``f`` above which an item counts as viral (``0 < f < 1``).
        decay: per-round forgetting factor in ``(0, 1]``.
    """

    def __init__(self, num_items: int, alpha: float = 0.5, max_share: float = 0.05, decay: float = 1.0,
                 device: torch.device | str = "cpu"):
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        if not 0 < max_share < 1:
            raise ValueError(f"max_share must lie in (0, 1), got {max_share}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.alpha, self.max_share, self.decay = alpha, max_share, decay
        self.counts = torch.zeros(num_items, dtype=torch.float64, device=device)

    def share(self) -> torch.Tensor:
        """float64 ``[I]``: each item's share of the exposures counted so far (0 before any)."""
        return self.counts / self.counts.sum().clamp_min(1)

    def __call__(self, users: torch.Tensor, items: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        _check_items(users, items)
        self.counts = self.counts.to(items.device)
        legal = items >= 0
        self.counts.mul_(self.decay).index_add_(
            0, items.clamp_min(0).flatten(), legal.flatten().to(self.counts.dtype))
        viral = (self.share()[items.clamp_min(0)] > self.max_share) & legal
        return torch.where(viral, scale_reward(rewards, self.alpha), rewards)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        counts = state["counts"]
        if counts.shape != self.counts.shape:
            raise ValueError(f"counts must have shape {tuple(self.counts.shape)}, got {tuple(counts.shape)}")
        self.counts = counts.to(self.counts.device, torch.float64).clone()


class NewAuthorBoost:
    """Scale the reward of items by new authors by ``factor`` (> 1 boosts).

    Args:
        item_author: int ``[I]``, the author of each item.
        new_authors: the new authors: a bool ``[A]`` mask over author ids, or a sequence/tensor of author ids.
        factor: scale for their items (``> 0``).
    """

    def __init__(self, item_author: torch.Tensor, new_authors, factor: float = 1.5):
        check_tensor("item_author", item_author, ndim=1, dtype=_INTS)
        if not factor > 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        num_authors = int(item_author.max()) + 1 if item_author.numel() else 0
        new = torch.as_tensor(new_authors, device=item_author.device)
        if new.dtype == torch.bool:
            if new.dim() != 1 or new.numel() < num_authors:
                raise ValueError(f"new_authors as a mask must be bool [A >= {num_authors}], got {tuple(new.shape)}")
            is_new = new
        else:
            is_new = torch.zeros(max(num_authors, int(new.max()) + 1 if new.numel() else 0), dtype=torch.bool,
                                 device=item_author.device)
            is_new[new.long()] = True
        self.item_is_new = is_new[item_author.long()]  # bool [I]
        self.factor = factor

    def __call__(self, users: torch.Tensor, items: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
        _check_items(users, items)
        flags = self.item_is_new.to(items.device)[items.clamp_min(0)] & (items >= 0)
        return torch.where(flags, scale_reward(rewards, self.factor), rewards)


class ComposedReward:
    """``base`` reward followed by ``adjustments`` in order; 0 where ``items < 0``.

    ``base``: ``(users [B], items [B, G]) -> [B, G]``; each adjustment: ``(users, items, rewards) -> rewards``.
    """

    def __init__(self, base: Callable, adjustments: Sequence[Callable] = ()):
        if not callable(base):
            raise TypeError(f"base must be callable, got {type(base).__name__}")
        for i, a in enumerate(adjustments):
            if not callable(a):
                raise TypeError(f"adjustments[{i}] must be callable, got {type(a).__name__}")
        self.base, self.adjustments = base, list(adjustments)

    def __call__(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        _check_items(users, items)
        r = self.base(users, items)
        for adjust in self.adjustments:
            r = adjust(users, items, r)
        return torch.where(items >= 0, r, torch.zeros_like(r))
