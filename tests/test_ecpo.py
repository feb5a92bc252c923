"""ECPO loss and group advantages against a direct, element-by-element implementation of the formula."""

import math

import pytest
import torch

from onerec_fast.rl import ecpo_loss, ecpo_loss_with_advantages, group_advantages
from tests.helpers import DEVICES, assert_close, rel_err


def direct_ecpo(logp, logp_old, rewards, eps, delta, mask=None):
    """The TR 2.4 formula written out in probability space, one (user, generation) at a time, float64."""
    B, G = logp.shape
    objs = []
    for b in range(B):
        idx = [g for g in range(G) if mask is None or bool(mask[b, g])]
        rs = [float(rewards[b, g]) for g in idx]
        mean = sum(rs) / len(rs) if rs else 0.0
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs)) if rs else 0.0
        for g, r in zip(idx, rs):
            a = (r - mean) / std if std > 0 else 0.0
            pi = torch.exp(logp[b, g])
            pi_old = math.exp(float(logp_old[b, g]))
            pi_old_prime = max(float(pi.detach()) / (1 + eps + delta), pi_old)
            rho = pi / pi_old_prime
            clipped = torch.clamp(rho, 1 - eps, 1 + eps)
            objs.append(torch.minimum(rho * a, clipped * a))
    if not objs:
        return torch.zeros((), dtype=torch.float64)
    return -torch.stack(objs).sum() / len(objs)


def _inputs(B, G, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, G, generator=g, dtype=torch.float64) - 0.1
    # old policy within +-0.6 nats: ratios fall below, inside and above the clip range and the early clip
    logp_old = logp + (torch.rand(B, G, generator=g, dtype=torch.float64) - 0.5) * 1.2
    rewards = torch.randn(B, G, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (logp, logp_old, rewards)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,G", [(1, 2), (5, 7), (3, 16)])
def test_ecpo_loss_matches_formula_values_and_gradients(device, dtype, B, G):
    logp, logp_old, rewards = _inputs(B, G, device, dtype, seed=B * 100 + G)
    logp.requires_grad_(True)
    loss = ecpo_loss(logp, logp_old, rewards, eps=0.2, delta=0.1)
    (grad,) = torch.autograd.grad(loss, logp)

    ref_logp = logp.detach().double().cpu().requires_grad_(True)
    ref = direct_ecpo(ref_logp, logp_old.double().cpu(), rewards.double().cpu(), 0.2, 0.1)
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    assert loss.shape == ()
    assert_close("loss", loss.reshape(1), ref.reshape(1), dtype, device)
    assert_close("d loss / d logp", grad, ref_grad, dtype, device)


def test_early_clip_bounds_the_ratio_for_a_large_negative_advantage():
    eps, delta = 0.2, 0.1
    # generation 0 is much more likely now (pi = 0.5) than when it was generated (pi_old = 1e-6),
    # and it has by far the worst reward: a large negative advantage
    logp = torch.log(torch.tensor([[0.5, 0.1, 0.1, 0.1]], dtype=torch.float64)).requires_grad_(True)
    logp_old = torch.log(torch.tensor([[1e-6, 0.1, 0.1, 0.1]], dtype=torch.float64))
    rewards = torch.tensor([[-10.0, 1.0, 1.2, 0.8]], dtype=torch.float64)
    adv = group_advantages(rewards)
    assert adv[0, 0] < -1.5

    loss = ecpo_loss(logp, logp_old, rewards, eps=eps, delta=delta)
    (grad,) = torch.autograd.grad(loss, logp)
    ref_logp = logp.detach().clone().requires_grad_(True)
    ref = direct_ecpo(ref_logp, logp_old, rewards, eps, delta)
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    assert rel_err(loss.reshape(1), ref.reshape(1)) < 1e-12
    assert rel_err(grad, ref_grad) < 1e-12

    # rho is capped at 1 + eps + delta: the entry contributes -rho * A / n to the loss, and so does its gradient
    n = rewards.shape[1]
    bound = (1 + eps + delta) * adv[0, 0].abs() / n
    assert abs(float(grad[0, 0])) == pytest.approx(float(bound), rel=1e-12)
    # plain PPO (no early clip) would push with pi / pi_old = 5e5 times the advantage
    ppo_rho = 0.5 / 1e-6
    assert abs(float(grad[0, 0])) < ppo_rho * float(adv[0, 0].abs()) / n / 1e5


@pytest.mark.parametrize("value", [0.0, 0.1, 1e3, -7.25])
def test_equal_rewards_give_zero_advantages_and_no_nan(value):
    rewards = torch.full((3, 8), value, dtype=torch.float32)
    rewards[1] = torch.randn(8)  # one ordinary group next to the constant ones
    adv = group_advantages(rewards)
    assert torch.isfinite(adv).all()
    assert (adv[0] == 0).all() and (adv[2] == 0).all()
    assert adv[1].abs().sum() > 0
    assert adv[1].mean().abs() < 1e-6 and (adv[1].pow(2).mean() - 1).abs() < 1e-5

    logp = torch.randn(3, 8).requires_grad_(True)
    loss = ecpo_loss(logp, logp.detach() - 0.05, rewards)
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[0] == 0).all() and (grad[2] == 0).all()


def test_single_generation_groups_have_zero_advantage():
    adv = group_advantages(torch.randn(4, 1))
    assert (adv == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_excludes_entries_from_advantages_mean_and_gradient(device):
    B, G = 4, 6
    logp, logp_old, rewards = _inputs(B, G, device, torch.float64, seed=7)
    mask = torch.rand(B, G, generator=torch.Generator().manual_seed(3)) > 0.35
    mask[0] = False  # a user with every generation masked
    mask[1, :] = False
    mask[1, 2] = True  # a user with one unmasked generation: advantage 0
    mask = mask.to(device)
    # masked entries hold garbage that must not leak into the loss or its gradient
    logp = torch.where(mask, logp, torch.full_like(logp, float("nan"))).requires_grad_(True)
    logp_old = torch.where(mask, logp_old, torch.full_like(logp_old, float("-inf")))
    rewards = torch.where(mask, rewards, torch.full_like(rewards, float("inf")))

    loss = ecpo_loss(logp, logp_old, rewards, mask=mask)
    (grad,) = torch.autograd.grad(loss, logp)
    ref_logp = torch.where(mask, logp.detach(), torch.zeros_like(logp)).cpu().requires_grad_(True)
    ref = direct_ecpo(ref_logp, logp_old.cpu(), rewards.cpu(), 0.2, 0.1, mask.cpu())
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss.reshape(1), ref.reshape(1)) < 1e-12
    assert rel_err(grad, ref_grad) < 1e-12
    assert (grad[~mask] == 0).all()
    adv = group_advantages(rewards, mask)
    assert (adv[~mask] == 0).all() and (adv[1] == 0).all()


def test_fully_masked_loss_is_zero():
    logp = torch.randn(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = ecpo_loss(logp, logp.detach(), torch.randn(2, 3), mask=mask)
    loss.backward()
    assert float(loss.detach()) == 0.0 and (logp.grad == 0).all()


def test_fixed_advantages_with_fresh_policy_is_policy_gradient():
    # logp_old == logp: rho = 1 everywhere, so the loss is -mean(A) and its gradient -A / n
    logp = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(3, 5, dtype=torch.float64)
    loss = ecpo_loss_with_advantages(logp, logp.detach(), adv)
    (grad,) = torch.autograd.grad(loss, logp)
    assert float(loss.detach()) == pytest.approx(-float(adv.mean()), rel=1e-12)
    assert rel_err(grad, -adv / adv.numel()) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_log_probs_are_upcast(device):
    logp, logp_old, rewards = _inputs(4, 8, device, torch.float64, seed=11)
    ref = ecpo_loss(logp, logp_old, rewards)
    out = ecpo_loss(logp.bfloat16(), logp_old.bfloat16(), rewards.bfloat16())
    assert out.dtype == torch.float32
    assert rel_err(out.reshape(1), ref.reshape(1)) < 0.1


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="logp_old"):
        ecpo_loss(x, torch.randn(2, 4), x)
    with pytest.raises(ValueError, match="rewards"):
        ecpo_loss(x, x, torch.randn(3))
    with pytest.raises(TypeError, match="logp"):
        ecpo_loss(x.long(), x, x)
    with pytest.raises(TypeError, match="mask"):
        ecpo_loss(x, x, x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        ecpo_loss(x, x, x, mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps"):
        ecpo_loss(x, x, x, eps=0.0)
    with pytest.raises(ValueError, match="delta"):
        ecpo_loss(x, x, x, delta=-0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rewards_are_masked_with_a_warning(bad):
    """One bad reward in a group (issue 17, finding 3): it is masked out, the rest of its group keeps the
    advantages it has without it (unmasked, NaN used to zero the whole group)."""
    from onerec_fast.numerics import NonFiniteWarning

    B, G = 3, 5
    logp, logp_old, rewards = _inputs(B, G, "cpu", torch.float64, seed=11)
    rewards[1, 3] = bad
    without = torch.ones(B, G, dtype=torch.bool)
    without[1, 3] = False
    with pytest.warns(NonFiniteWarning, match="1 of 15 unmasked rewards are not finite"):
        adv = group_advantages(rewards)
    assert torch.equal(adv, group_advantages(rewards, without)) and (adv[1] != 0).sum() == G - 1
    logp.requires_grad_(True)
    with pytest.warns(NonFiniteWarning):
        loss = ecpo_loss(logp, logp_old, rewards)
    assert torch.isfinite(loss)
    assert float(loss.detach()) == float(ecpo_loss(logp, logp_old, rewards, mask=without).detach())
