"""ECPO: Early-Clipped GRPO, the policy objective of OneRec's reinforcement learning (TR 2.4).

For every user ``b`` the current policy generates ``G`` items; each generation ``g`` has the sequence
log-probability ``logp[b, g]`` (sum over the 3 semantic-ID codes) under the policy being trained,
the log-probability ``logp_old[b, g]`` under the policy that generated it, and a reward
``rewards[b, g]``. With group-normalized advantages ``A = (r - mean_G r) / std_G r``:

    pi'_old = max(sg(pi_theta) / (1 + eps + delta), pi_old)
    rho     = pi_theta / pi'_old
    J       = mean over unmasked (b, g) of  min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)

``sg`` is stop-gradient. Raising ``pi'_old`` to at least ``pi_theta / (1 + eps + delta)`` bounds the
ratio by ``1 + eps + delta`` before the PPO clip: for a negative advantage PPO's ``min`` keeps the
unclipped ``rho * A``, whose gradient explodes when ``pi_old`` is tiny; the early clip keeps it finite.
There is no KL term. Everything runs in log space (``log pi'_old = max(logp - log(1 + eps + delta),
logp_old)``), and in float32 or wider so bf16 log-probabilities do not lose the ratio.

Non-finite policy: a non-finite reward (NaN or +-inf, e.g. from a broken reward model) is masked out, like an
illegal generation: it leaves the group's mean and std and the loss's mean, its advantage is 0, and a
:class:`~onerec_fast.numerics.NonFiniteWarning` says how many there were. The rest of its group keeps its
advantages (unmasked, one NaN would make the group's std NaN and zero every advantage of the group).
"""

from __future__ import annotations

import math
import warnings

import torch

from onerec_fast.checks import check_tensor
from onerec_fast.numerics import NonFiniteWarning

__all__ = ["group_advantages", "ecpo_loss", "ecpo_loss_with_advantages"]

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_pair(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    check_tensor(name, t, ndim=2, dtype=_FLOATS)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)} ([B, G]), got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")


def _check_mask(mask: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """The mask as bool ``[B, G]`` (all True when None)."""
    if mask is None:
        return torch.ones(ref.shape, dtype=torch.bool, device=ref.device)
    check_tensor("mask", mask, ndim=2, dtype=torch.bool)
    if mask.shape != ref.shape or mask.device != ref.device:
        raise ValueError(
            f"mask must be bool {tuple(ref.shape)} ([B, G]) on {ref.device}, got {tuple(mask.shape)} on {mask.device}"
        )
    return mask


def _finite_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool ``[B, G]``) without the entries whose reward is non-finite; warns when it drops any."""
    bad = mask & ~torch.isfinite(rewards)
    n_bad = int(bad.sum())
    if n_bad:
        warnings.warn(f"ECPO: {n_bad} of {int(mask.sum())} unmasked rewards are not finite (NaN or inf); they are "
                      "masked out (advantage 0, left out of their group's mean and std and of the loss)",
                      NonFiniteWarning, stacklevel=3)
        return mask & ~bad
    return mask


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def group_advantages(rewards: torch.Tensor, mask: torch.Tensor | None = None, rel_tol: float = 1e-6) -> torch.Tensor:
    """Group-normalized advantages ``A = (r - mean) / std`` over the G generations of each user.

    Args:
        rewards: ``[B, G]`` reward of generation ``g`` for user ``b`` (no gradient flows through it).
        mask: optional bool ``[B, G]``; False entries (e.g. illegal generations) are left out of the
            mean and std and get advantage 0. Non-finite rewards are masked the same way, with a
            NonFiniteWarning (module docstring).
        rel_tol: a group whose std is at most ``rel_tol * (1 + |mean|)`` is treated as having equal
            rewards: its advantages are exactly 0 (rounding in the mean would otherwise turn equal
            rewards into +-1 advantages, and a zero std into NaN). Groups with fewer than two
            unmasked entries also get 0.

    Returns:
        ``[B, G]`` advantages, float32 (float64 for float64 rewards), detached. The std is the
        population std (divide by the group size), so a group of two gives advantages +-1.
    """
    check_tensor("rewards", rewards, ndim=2, dtype=_FLOATS)
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol}")
    m = _finite_rewards(rewards, _check_mask(mask, rewards))
    r = rewards.detach().to(_compute_dtype(rewards))
    w = m.to(r.dtype)
    r = torch.where(m, r, torch.zeros_like(r))  # masked entries may hold NaN/inf: keep them out of the sums
    n = w.sum(dim=1, keepdim=True)
    mean = r.sum(dim=1, keepdim=True) / n.clamp_min(1)
    centered = (r - mean) * w
    std = (centered.square().sum(dim=1, keepdim=True) / n.clamp_min(1)).sqrt()
    ok = (std > rel_tol * (1 + mean.abs())) & (n >= 2)
    return torch.where(ok & m, centered / torch.where(ok, std, torch.ones_like(std)), torch.zeros_like(r))


def ecpo_loss_with_advantages(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    eps: float = 0.2,
    delta: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ECPO loss for given advantages (no group normalization); see :func:`ecpo_loss`.

    Used directly by the format reward, whose advantages are fixed (1 for legal generations).

    Args:
        logp: ``[B, G]`` sequence log-probabilities under the policy being trained (gradient flows).
        logp_old: ``[B, G]`` sequence log-probabilities under the generating policy (detached).
        advantages: ``[B, G]`` advantages (detached).
        eps, delta: PPO clip range and the early-clip margin (``eps > 0``, ``delta >= 0``).
        mask: optional bool ``[B, G]``; the mean runs over True entries only, and False entries
            (which may hold NaN or -inf) get no gradient.

    Returns:
        scalar loss ``-J`` in float32 (float64 for float64 ``logp``); 0 when every entry is masked.
    """
    check_tensor("logp", logp, ndim=2, dtype=_FLOATS)
    _check_pair("logp_old", logp_old, "logp", logp)
    _check_pair("advantages", advantages, "logp", logp)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a number > 0, got {eps!r}")
    if not (isinstance(delta, (int, float)) and delta >= 0):
        raise ValueError(f"delta must be a number >= 0, got {delta!r}")
    m = _check_mask(mask, logp)
    dt = _compute_dtype(logp)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    # where() before any arithmetic: masked garbage must not reach exp() and send NaN into the gradient.
    lp = torch.where(m, logp.to(dt), zero)
    lp_old = torch.where(m, logp_old.detach().to(dt), zero)
    adv = torch.where(m, advantages.detach().to(dt), zero)
    log_old_prime = torch.maximum(lp.detach() - math.log1p(eps + delta), lp_old)
    rho = torch.exp(lp - log_old_prime)  # <= 1 + eps + delta by construction
    obj = torch.minimum(rho * adv, rho.clamp(1 - eps, 1 + eps) * adv)
    w = m.to(dt)
    return -(obj * w).sum() / w.sum().clamp_min(1)


def ecpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    rewards: torch.Tensor,
    eps: float = 0.2,
    delta: float = 0.1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ECPO loss (negated objective) of G generations per user.

    Args:
        logp: ``[B, G]`` log pi_theta of each generated item: the sum of the log-probabilities of its
            3 semantic-ID codes under the policy being trained. Gradients flow into it.
        logp_old: ``[B, G]`` the same under the policy that generated the items (treated as constant).
        rewards: ``[B, G]`` reward per user and generation (treated as constant); turned into
            advantages by :func:`group_advantages` over the unmasked entries of each row.
        eps: PPO clip range: ``rho`` is clipped to ``[1 - eps, 1 + eps]``.
        delta: early-clip margin: ``pi'_old >= pi_theta / (1 + eps + delta)``, so ``rho <= 1 + eps + delta``.
        mask: optional bool ``[B, G]``: False entries (e.g. illegal or padded generations) are left
            out of the advantages and the mean, and receive no gradient. Entries with a non-finite reward
            are masked the same way, with a NonFiniteWarning (module docstring).

    Returns:
        scalar ``-mean(min(rho * A, clip(rho, 1 - eps, 1 + eps) * A))`` over the unmasked entries,
        float32 (float64 for float64 ``logp``).
    """
    check_tensor("logp", logp, ndim=2, dtype=_FLOATS)
    _check_pair("rewards", rewards, "logp", logp)
    mask = _finite_rewards(rewards, _check_mask(mask, logp))
    adv = group_advantages(rewards, mask)
    return ecpo_loss_with_advantages(logp, logp_old, adv, eps=eps, delta=delta, mask=mask)
