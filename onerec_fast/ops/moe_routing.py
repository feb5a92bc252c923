"""Top-k routing of a mixture-of-experts layer.

``logits: [T, E]`` -> scores -> top-k experts per token and their gate weights, the permutation that
groups the ``T * k`` (token, slot) pairs by expert, and the statistics of the load-balancing losses.

Router modes:

* ``"softmax"``: ``p = softmax(logits)`` in fp32; select the k largest ``p``; weights are ``p`` there.
* ``"sigmoid"`` (DeepSeek-V3): ``s = sigmoid(logits)``; select the k largest ``s + expert_bias``
  (the loss-free balancing bias steers selection only); weights are the unbiased ``s``.

With ``norm_topk`` the k weights of a token are divided by their sum. Experts come out in descending
selection score, ties to the lower expert id. Pair ``p = t * k + j`` is slot j of token t.

Backends: ``cuda`` (one launch, ``onerec_fast._C.moe_route_fwd``), ``triton`` (three launches,
``onerec_fast.kernels.moe_routing``), ``reference`` (:func:`moe_route_ref`). None syncs with the host.
The gradient reaches ``logits`` through ``topk_weights``, ``prob_sum`` and ``lse_sq_sum``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from onerec_fast.backends import cuda_extension, resolve_backend
from onerec_fast.checks import FLOAT_DTYPES, check_tensor

__all__ = ["ROUTERS", "MoERouting", "moe_aux_loss", "moe_route", "moe_route_bwd", "moe_route_ref", "moe_z_loss"]

ROUTERS = ("softmax", "sigmoid")
MAX_EXPERTS = 256
MAX_TOP_K = 8


class MoERouting(NamedTuple):
    """Routing of ``T`` tokens over ``E`` experts, ``k`` per token."""

    topk_ids: torch.Tensor  # int32 [T, k], descending score, ties to the lower id
    topk_weights: torch.Tensor  # fp32 [T, k] gate weights (differentiable)
    expert_counts: torch.Tensor  # int32 [E] pairs routed to each expert
    expert_offsets: torch.Tensor  # int32 [E+1] exclusive cumsum of the counts; [E] == T*k
    sorted_pair_idx: torch.Tensor  # int32 [T*k] pairs grouped by expert, ascending within one
    prob_sum: torch.Tensor  # fp32 [E] sum over tokens of the normalised scores (differentiable)
    lse_sq_sum: torch.Tensor  # fp32 [1] sum over tokens of logsumexp(logits)^2 (differentiable)


def moe_aux_loss(routing: MoERouting, num_tokens: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e``: ``f_e`` the fraction of pairs
    routed to expert e, ``P_e`` its mean normalised score. Differentiable through ``prob_sum``; 0-d."""
    E = routing.prob_sum.shape[0]
    frac = routing.expert_counts.to(routing.prob_sum.dtype) / max(num_tokens * top_k, 1)
    return E * (frac * routing.prob_sum).sum() / max(num_tokens, 1)


def moe_z_loss(routing: MoERouting, num_tokens: int) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``; 0-d."""
    return routing.lse_sq_sum.sum() / max(num_tokens, 1)


def check_route_params(num_experts: int, top_k, router: str, expert_bias, device) -> None:
    """Raise unless ``top_k``, ``router`` and ``expert_bias`` suit ``num_experts`` experts on ``device``."""
    E = num_experts
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"the number of experts must be in 1..{MAX_EXPERTS}, got {E}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= min(E, MAX_TOP_K):
        raise ValueError(f"top_k must be an int in 1..min(num_experts={E}, {MAX_TOP_K}), got {top_k!r}")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    if expert_bias is not None:
        check_tensor("expert_bias", expert_bias, ndim=1, dtype=torch.float32, device=device)
        if expert_bias.shape[0] != E:
            raise ValueError(f"expert_bias must have shape ({E},) (one per expert), got {tuple(expert_bias.shape)}")


def _check_route_args(logits, top_k, router, expert_bias):
    check_tensor("logits", logits, ndim=2, dtype=FLOAT_DTYPES + (torch.float64,))
    if not 1 <= logits.shape[1] <= MAX_EXPERTS:
        raise ValueError(f"logits must have 1..{MAX_EXPERTS} experts in dimension 1, got shape {tuple(logits.shape)}")
    check_route_params(logits.shape[1], top_k, router, expert_bias, logits.device)


def moe_route_ref(
    logits: torch.Tensor, top_k: int, router: str = "softmax", norm_topk: bool = True,
    expert_bias: torch.Tensor | None = None,
) -> MoERouting:
    """Plain-PyTorch routing of ``logits: [T, E]`` (float32 math, float64 kept as float64).

    ``expert_bias: [E]`` fp32 shifts the selection in sigmoid mode (ignored in softmax mode).
    Differentiable through ``topk_weights``, ``prob_sum`` and ``lse_sq_sum``; traceable by
    ``torch.compile`` (no data-dependent shapes).
    """
    _check_route_args(logits, top_k, router, expert_bias)
    T, E = logits.shape
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if router == "sigmoid":
        scores = torch.sigmoid(lf)
        normalised = scores / scores.sum(-1, keepdim=True)
        select = scores if expert_bias is None else scores + expert_bias.to(lf.dtype)
    else:
        scores = torch.softmax(lf, dim=-1)
        normalised = select = scores
    # A stable descending sort puts ties in ascending expert id.
    order = torch.sort(select.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, order)
    if norm_topk:
        weights = weights / weights.sum(-1, keepdim=True)
    flat = order.reshape(-1)
    counts = torch.zeros(E, dtype=torch.int64, device=logits.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = F.pad(torch.cumsum(counts, 0), (1, 0))
    sorted_pair_idx = torch.sort(flat, stable=True).indices
    return MoERouting(
        topk_ids=order.to(torch.int32),
        topk_weights=weights,
        expert_counts=counts.to(torch.int32),
        expert_offsets=offsets.to(torch.int32),
        sorted_pair_idx=sorted_pair_idx.to(torch.int32),
        prob_sum=normalised.sum(0),
        lse_sq_sum=torch.logsumexp(lf, dim=-1).square().sum().reshape(1),
    )


# --------------------------------------------------------------------------------------------------
# Custom op (cuda / triton kernels)


def _routing_outputs(logits: torch.Tensor, top_k: int) -> list[torch.Tensor]:
    T, E = logits.shape
    i32, f32 = dict(dtype=torch.int32, device=logits.device), dict(dtype=torch.float32, device=logits.device)
    return [
        logits.new_empty((T, top_k), **i32),
        logits.new_empty((T, top_k), **f32),
        logits.new_empty((E,), **i32),
        logits.new_empty((E + 1,), **i32),
        logits.new_empty((T * top_k,), **i32),
        logits.new_empty((E,), **f32),
        logits.new_empty((1,), **f32),
    ]


def route_kernel_fwd(logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, sigmoid: bool, norm_topk: bool,
                     backend: str) -> list[torch.Tensor]:
    """The seven routing outputs of contiguous ``logits: [T, E]`` by the ``cuda`` or ``triton`` kernel
    (``expert_bias: [E]`` fp32 in sigmoid mode, else empty). No autograd."""
    outs = _routing_outputs(logits, top_k)
    if logits.shape[0] == 0:
        for t in outs[2:]:
            t.zero_()
    elif backend == "cuda":
        cuda_extension().moe_route_fwd(logits, expert_bias, top_k, sigmoid, norm_topk, *outs)
    else:
        from onerec_fast.kernels.moe_routing import moe_route_fwd

        moe_route_fwd(logits, expert_bias, top_k, sigmoid, norm_topk, *outs)
    return outs


def selection_bias(expert_bias: torch.Tensor | None, num_experts: int, device, sigmoid: bool) -> torch.Tensor:
    """The ``expert_bias`` argument of the kernels: the bias (zeros if None) in sigmoid mode, else empty."""
    if not sigmoid:
        return torch.empty(0, dtype=torch.float32, device=device)
    if expert_bias is None:
        return torch.zeros(num_experts, dtype=torch.float32, device=device)
    return expert_bias


@torch.library.custom_op("onerec_fast::moe_route", mutates_args=())
def _moe_route_op(
    logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, sigmoid: bool, norm_topk: bool, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(route_kernel_fwd(logits, expert_bias, top_k, sigmoid, norm_topk, backend))


@_moe_route_op.register_fake
def _(logits, expert_bias, top_k, sigmoid, norm_topk, backend):
    return tuple(_routing_outputs(logits, top_k))


def moe_route_bwd(
    logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, sigmoid: bool, norm_topk: bool,
    grad_weights: torch.Tensor | None, grad_prob_sum: torch.Tensor | None, grad_lse_sq_sum: torch.Tensor | None,
) -> torch.Tensor:
    """Gradient of the routing outputs w.r.t. ``logits: [T, E]`` (plain PyTorch; [T, E] is small).

    ``grad_weights: [T, k]``, ``grad_prob_sum: [E]``, ``grad_lse_sq_sum: [1]``; None means zero.
    """
    lf = logits.float()
    ids = topk_ids.long()
    scores = torch.sigmoid(lf) if sigmoid else torch.softmax(lf, dim=-1)
    g_scores = torch.zeros_like(lf)
    if grad_weights is not None:
        g_sel = grad_weights.float()
        if norm_topk:
            # w_j = s_j / S: dL/ds_j = (g_j - sum_i g_i w_i) / S
            total = scores.gather(1, ids).sum(-1, keepdim=True)
            g_sel = (g_sel - (g_sel * topk_weights).sum(-1, keepdim=True)) / total
        g_scores = g_scores.scatter(1, ids, g_sel)  # the k ids of a row are distinct
    if grad_prob_sum is not None:
        g_ps = grad_prob_sum.float()[None, :]
        if sigmoid:  # q = s / sum(s)
            z = scores.sum(-1, keepdim=True)
            g_scores = g_scores + (g_ps - (g_ps * scores / z).sum(-1, keepdim=True)) / z
        else:
            g_scores = g_scores + g_ps
    if sigmoid:
        g_logits = g_scores * scores * (1 - scores)
    else:
        g_logits = scores * (g_scores - (g_scores * scores).sum(-1, keepdim=True))
    if grad_lse_sq_sum is not None:
        lse = torch.logsumexp(lf, dim=-1, keepdim=True)
        g_logits = g_logits + 2 * grad_lse_sq_sum.float() * lse * torch.softmax(lf, dim=-1)
    return g_logits.to(logits.dtype)


def _route_setup_context(ctx, inputs, output):
    logits, _, _, sigmoid, norm_topk, _ = inputs
    ctx.sigmoid, ctx.norm_topk = sigmoid, norm_topk
    ctx.save_for_backward(logits, output[0], output[1])


def _route_backward(ctx, g_ids, g_weights, g_counts, g_offsets, g_sorted, g_prob_sum, g_lse):
    logits, topk_ids, topk_weights = ctx.saved_tensors
    g = moe_route_bwd(logits, topk_ids, topk_weights, ctx.sigmoid, ctx.norm_topk, g_weights, g_prob_sum, g_lse)
    return g, None, None, None, None, None


_moe_route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


@torch.compiler.assume_constant_result
def _has_cuda_routing() -> bool:
    # A constant to torch.compile: probed once when traced, not traced through.
    return hasattr(cuda_extension(), "moe_route_fwd")


def routing_backends() -> tuple[str, ...]:
    """Backends of the routing op, best first (``cuda`` only where the extension has the kernel)."""
    return ("cuda", "triton", "reference") if _has_cuda_routing() else ("triton", "reference")


def moe_route(
    logits: torch.Tensor, top_k: int, router: str = "softmax", norm_topk: bool = True,
    expert_bias: torch.Tensor | None = None, backend: str = "auto",
) -> MoERouting:
    """Route ``logits: [T, E]`` (fp32/bf16/fp16; scores always computed in fp32) to ``top_k`` experts.

    ``expert_bias: [E]`` fp32, sigmoid mode only (selection bias). Returns :class:`MoERouting`.
    ``backend``: "auto", "cuda", "triton" or "reference" (see :mod:`onerec_fast.backends`).
    """
    _check_route_args(logits, top_k, router, expert_bias)
    chosen = resolve_backend("moe_routing", backend, logits.device, routing_backends())
    if chosen == "reference":
        return moe_route_ref(logits, top_k, router, norm_topk, expert_bias)
    check_tensor("logits", logits, dtype=FLOAT_DTYPES)
    sigmoid = router == "sigmoid"
    bias = selection_bias(expert_bias, logits.shape[1], logits.device, sigmoid)
    return MoERouting(*_moe_route_op(logits.contiguous(), bias, top_k, sigmoid, norm_topk, chosen))
