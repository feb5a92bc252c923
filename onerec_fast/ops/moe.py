"""Mixture-of-experts SwiGLU FFN: router, top-k routing, experts, gate-weighted combine.

``x: [T, d]``; router weight ``[E, d]`` (an ``nn.Linear(d, E, bias=False)``); expert weights
``w1, w3: [E, d, f]`` and ``w2: [E, f, d]``; expert e computes ``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]``
and the output is the gate-weighted sum over each token's k experts. Dropless: every (token, expert)
pair is computed, whatever the load.

Backends (``backend=`` or ``ONEREC_FAST_BACKEND_MOE``):

* ``cuda``: one-launch CUDA routing (``csrc/moe_routing``) + the Triton grouped GEMMs;
* ``triton``: Triton routing (3 launches) + the Triton grouped GEMMs (``kernels/moe_gemm.py``):
  rows gathered through the permutation, SwiGLU fused into GEMM1, gate multiply and scatter back to
  token order fused into GEMM2, deterministic combine; grouped-GEMM backward;
* ``reference``: :func:`moe_ffn_ref`, plain PyTorch (float32 math), traceable by ``torch.compile``.

The router logits are computed in fp32 in every backend, so expert selection does not depend on the
activation dtype's rounding.

:func:`moe_experts` runs the experts alone over rows that were routed elsewhere (expert parallelism:
the rows a rank received), ungated, on the same grouped GEMMs (``cuda``/``triton``) or the reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from onerec_fast.backends import resolve_backend
from onerec_fast.checks import FLOAT_DTYPES, check_cu_seqlens, check_same, check_tensor
from onerec_fast.ops.moe_routing import (
    MoERouting,
    _routing_outputs,
    check_route_params,
    moe_route_bwd,
    moe_route_ref,
    route_kernel_fwd,
    routing_backends,
    selection_bias,
)

__all__ = ["MoEOutput", "moe_experts", "moe_experts_ref", "moe_ffn", "moe_ffn_ref"]


class MoEOutput(NamedTuple):
    out: torch.Tensor  # [T, d], dtype of x
    routing: MoERouting  # ids, gate weights, counts, offsets, permutation, loss statistics


def _check_moe_args(x, router_weight, w1, w3, w2, top_k, router, expert_bias, dtypes):
    check_tensor("x", x, ndim=2, dtype=dtypes)
    check_tensor("router_weight", router_weight, ndim=2)
    check_same("x", x, "router_weight", router_weight)
    T, d = x.shape
    E = router_weight.shape[0]
    if router_weight.shape[1] != d:
        raise ValueError(f"router_weight must have shape (num_experts, d_model={d}), got {tuple(router_weight.shape)}")
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        check_tensor(name, w, ndim=3)
        check_same("x", x, name, w)
    f = w1.shape[2]
    for name, w, want in (("w1", w1, (E, d, f)), ("w3", w3, (E, d, f)), ("w2", w2, (E, f, d))):
        if tuple(w.shape) != want:
            raise ValueError(f"{name} must have shape {want} (num_experts, ...), got {tuple(w.shape)}")
    check_route_params(E, top_k, router, expert_bias, x.device)


def router_logits(x: torch.Tensor, router_weight: torch.Tensor) -> torch.Tensor:
    """fp32 (or float64) router logits ``[T, E]`` of ``x: [T, d]`` and ``router_weight: [E, d]``."""
    dt = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(dt), router_weight.to(dt))


def moe_ffn_ref(
    x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
    top_k: int, router: str = "softmax", norm_topk: bool = True, expert_bias: torch.Tensor | None = None,
) -> MoEOutput:
    """Readable reference MoE FFN, in float32 (float64 inputs stay float64); output in ``x.dtype``.

    Every expert runs on every token and is weighted by a dense ``[T, E]`` gate matrix (zero off
    the top-k), so shapes never depend on the routing: exact, dropless, and ``torch.compile``-able
    with ``fullgraph=True``, at ``E / k`` times the useful FLOPs.
    """
    _check_moe_args(x, router_weight, w1, w3, w2, top_k, router, expert_bias, FLOAT_DTYPES + (torch.float64,))
    dt = torch.promote_types(x.dtype, torch.float32)
    routing = moe_route_ref(router_logits(x, router_weight), top_k, router, norm_topk, expert_bias)
    gates = torch.zeros(x.shape[0], w1.shape[0], dtype=dt, device=x.device)
    gates = gates.scatter(1, routing.topk_ids.long(), routing.topk_weights.to(dt))
    xf = x.to(dt)
    out = torch.zeros_like(xf)
    for e in range(w1.shape[0]):
        out = out + gates[:, e : e + 1] * _swiglu_expert(xf, w1[e], w3[e], w2[e])
    return MoEOutput(out.to(x.dtype), routing)


def _swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One expert of the references: ``(silu(x @ w1) * (x @ w3)) @ w2`` in ``x``'s dtype (``w: [d, f], [f, d]``)."""
    return (F.silu(x @ w1.to(x.dtype)) * (x @ w3.to(x.dtype))) @ w2.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Kernel backends: one fused forward (router GEMM, routing, grouped GEMMs) and its backward.
#
# In eager mode the pair runs as a torch.autograd.Function; under torch.compile as the custom op
# ``onerec_fast::moe_ffn_fwd`` (+ ``moe_ffn_bwd``, opaque to the compiler) with the same autograd
# formula. Both call the same launchers; the Function exists because a custom op call costs several
# times more host time (tens of microseconds), which a small-T forward cannot hide.


def _kernel_fwd(x, router_weight, w1, w3, w2, expert_bias, top_k, sigmoid, norm_topk, route_backend, save_act):
    """``(out, *routing (7 tensors), logits, a1, a3)``; ``a1, a3`` empty unless ``save_act``."""
    from onerec_fast.kernels.moe_gemm import moe_gemm_fwd
    from onerec_fast.kernels.moe_routing import router_logits_fwd

    # fp32 logits straight from the activation dtype (no fp32 copy of x)
    logits = router_logits_fwd(x, router_weight.contiguous())
    routing = route_kernel_fwd(logits, expert_bias, top_k, sigmoid, norm_topk, route_backend)
    out, a1, a3 = moe_gemm_fwd(x, w1.contiguous(), w3.contiguous(), w2.contiguous(), routing[1].view(-1),
                               routing[4], routing[3], top_k, save_act)
    return (out, *routing, logits, a1, a3)


def _experts_bwd(dy, x, w1, w3, w2, gate, sorted_pair_idx, expert_offsets, a1, a3, top_k):
    from onerec_fast.kernels.moe_gemm import moe_gemm_bwd

    # The kernels need dy in x's dtype. Seen on the H200: under bf16 autocast in the OneRec trainer the
    # output gradient arrived in fp32 (the dh kernel's dot then refused fp32 x bf16).
    return moe_gemm_bwd(dy.to(x.dtype), x, w1.contiguous(), w3.contiguous(), w2.contiguous(), gate, sorted_pair_idx,
                        expert_offsets, a1, a3, top_k)


def _kernel_bwd(saved, top_k, sigmoid, norm_topk, g_out, g_weights, g_prob_sum, g_lse, experts_bwd):
    """Gradients ``(dx, d router_weight, dw1, dw3, dw2)``: the experts by ``experts_bwd`` (the kernels),
    the routing and the router GEMM in PyTorch ([T, E] is small)."""
    x, router_weight, w1, w3, w2, logits, topk_ids, topk_weights, sorted_pair_idx, expert_offsets, a1, a3 = saved
    T, E = logits.shape
    if g_out is None:
        g_out = x.new_zeros(x.shape)
    dx, dw1, dw3, dw2, dgate = experts_bwd(g_out, x, w1, w3, w2, topk_weights.view(-1),
                                           sorted_pair_idx, expert_offsets, a1, a3, top_k)
    g_w = dgate.view(T, top_k) if g_weights is None else dgate.view(T, top_k) + g_weights
    g_logits = moe_route_bwd(logits, topk_ids, topk_weights, sigmoid, norm_topk, g_w, g_prob_sum, g_lse)
    # The router GEMMs' backward in the activation dtype (router_weight has x's, checked on entry; fp32
    # accumulation), as nn.Linear's would run: in fp32 it took ~180 us at T=16384 d=1024 on the H200,
    # mostly an fp32 copy of x and a SIMT sgemm.
    g = g_logits.to(x.dtype)
    dx = torch.addmm(dx, g, router_weight)
    d_router = g.t() @ x
    return dx, d_router, dw1, dw3, dw2


class _MoEKernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, router_weight, w1, w3, w2, expert_bias, top_k, sigmoid, norm_topk, route_backend, save_act):
        outs = _kernel_fwd(x, router_weight, w1, w3, w2, expert_bias, top_k, sigmoid, norm_topk, route_backend,
                           save_act)
        out, ids, weights, counts, offsets, sorted_idx, prob_sum, lse, logits, a1, a3 = outs
        ctx.save_for_backward(x, router_weight, w1, w3, w2, logits, ids, weights, sorted_idx, offsets, a1, a3)
        ctx.top_k, ctx.sigmoid, ctx.norm_topk = top_k, sigmoid, norm_topk
        ctx.mark_non_differentiable(ids, counts, offsets, sorted_idx, logits, a1, a3)
        # Unused outputs get None, not zero-filled gradients (a1, a3 alone: 2 x 134 MB of fills at T=16384).
        ctx.set_materialize_grads(False)
        return outs

    @staticmethod
    def backward(ctx, g_out, g_ids, g_weights, g_counts, g_offsets, g_sorted, g_prob_sum, g_lse, *unused):
        grads = _kernel_bwd(ctx.saved_tensors, ctx.top_k, ctx.sigmoid, ctx.norm_topk, g_out, g_weights,
                            g_prob_sum, g_lse, _experts_bwd)
        return (*grads, None, None, None, None, None, None)


@torch.library.custom_op("onerec_fast::moe_ffn_fwd", mutates_args=())
def _moe_ffn_fwd_op(
    x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
    expert_bias: torch.Tensor, top_k: int, sigmoid: bool, norm_topk: bool, route_backend: str, save_act: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    outs = _kernel_fwd(x, router_weight, w1, w3, w2, expert_bias, top_k, sigmoid, norm_topk, route_backend, save_act)
    return tuple(outs)


@_moe_ffn_fwd_op.register_fake
def _(x, router_weight, w1, w3, w2, expert_bias, top_k, sigmoid, norm_topk, route_backend, save_act):
    logits = x.new_empty((x.shape[0], router_weight.shape[0]), dtype=torch.float32)
    act = (x.shape[0] * top_k, w1.shape[2]) if save_act else (0,)
    return (x.new_empty(x.shape), *_routing_outputs(logits, top_k), logits, x.new_empty(act), x.new_empty(act))


@torch.library.custom_op("onerec_fast::moe_ffn_bwd", mutates_args=())
def _moe_experts_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, gate: torch.Tensor,
    sorted_pair_idx: torch.Tensor, expert_offsets: torch.Tensor, a1: torch.Tensor, a3: torch.Tensor, top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _experts_bwd(dy, x, w1, w3, w2, gate, sorted_pair_idx, expert_offsets, a1, a3, top_k)


@_moe_experts_bwd_op.register_fake
def _(dy, x, w1, w3, w2, gate, sorted_pair_idx, expert_offsets, a1, a3, top_k):
    return x.new_empty(x.shape), w1.new_empty(w1.shape), w3.new_empty(w3.shape), w2.new_empty(w2.shape), \
        gate.new_empty(gate.shape)


def _op_setup_context(ctx, inputs, output):
    x, router_weight, w1, w3, w2, _, top_k, sigmoid, norm_topk, _, _ = inputs
    _, ids, weights, _, offsets, sorted_idx, _, _, logits, a1, a3 = output
    ctx.save_for_backward(x, router_weight, w1, w3, w2, logits, ids, weights, sorted_idx, offsets, a1, a3)
    ctx.top_k, ctx.sigmoid, ctx.norm_topk = top_k, sigmoid, norm_topk
    ctx.set_materialize_grads(False)


def _op_backward(ctx, g_out, g_ids, g_weights, g_counts, g_offsets, g_sorted, g_prob_sum, g_lse, *unused):
    grads = _kernel_bwd(ctx.saved_tensors, ctx.top_k, ctx.sigmoid, ctx.norm_topk, g_out, g_weights, g_prob_sum,
                        g_lse, _moe_experts_bwd_op)
    return (*grads, None, None, None, None, None, None)


_moe_ffn_fwd_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _moe_ffn_kernels(x, router_weight, w1, w3, w2, top_k, router, norm_topk, expert_bias, route_backend,
                     recompute):
    sigmoid = router == "sigmoid"
    bias = selection_bias(expert_bias, router_weight.shape[0], x.device, sigmoid)
    save_act = not recompute and torch.is_grad_enabled() and (
        x.requires_grad or router_weight.requires_grad or w1.requires_grad or w3.requires_grad or w2.requires_grad)
    args = (x.contiguous(), router_weight, w1, w3, w2, bias, top_k, sigmoid, norm_topk, route_backend, save_act)
    if torch.compiler.is_compiling():
        outs = _moe_ffn_fwd_op(*args)
    else:
        outs = _MoEKernelFunction.apply(*args)
    return MoEOutput(outs[0], MoERouting(*outs[1:8]))


def moe_backends() -> tuple[str, ...]:
    """Backends of :func:`moe_ffn`, best first (``cuda`` needs the extension's routing kernel)."""
    return routing_backends()


def moe_ffn(
    x: torch.Tensor, router_weight: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
    top_k: int, *, router: str = "softmax", norm_topk: bool = True, expert_bias: torch.Tensor | None = None,
    backend: str = "auto", recompute: bool = False,
) -> MoEOutput:
    """Mixture-of-experts SwiGLU FFN of ``x: [T, d]``; returns ``MoEOutput(out [T, d], routing)``.

    ``router_weight: [E, d]``, ``w1, w3: [E, d, f]``, ``w2: [E, f, d]``, all of ``x``'s dtype and device;
    ``router``: "softmax" or "sigmoid"; ``expert_bias: [E]`` fp32 (sigmoid selection bias).
    Differentiable w.r.t. ``x``, the router weight and the experts; ``routing.prob_sum`` and
    ``routing.lse_sq_sum`` carry the gradient of the aux and z losses (see ``moe_aux_loss``).
    ``recompute``: the kernel backends keep no ``[T*k, f]`` activations for the backward and
    recompute them there (one more first GEMM) to save memory.
    """
    _check_moe_args(x, router_weight, w1, w3, w2, top_k, router, expert_bias, FLOAT_DTYPES + (torch.float64,))
    chosen = resolve_backend("moe", backend, x.device, moe_backends())
    if chosen == "reference":
        return moe_ffn_ref(x, router_weight, w1, w3, w2, top_k, router, norm_topk, expert_bias)
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    return _moe_ffn_kernels(x, router_weight, w1, w3, w2, top_k, router, norm_topk, expert_bias, chosen, recompute)


# --------------------------------------------------------------------------------------------------
# The experts alone, over rows grouped by expert through a permutation (no routing, no gate)


def _check_experts_args(x, sorted_idx, expert_offsets, w1, w3, w2, dtypes):
    check_tensor("x", x, ndim=2, dtype=dtypes)
    N, d = x.shape
    for name, w in (("w1", w1), ("w3", w3), ("w2", w2)):
        check_tensor(name, w, ndim=3)
        check_same("x", x, name, w)
    E, f = w1.shape[0], w1.shape[2]
    for name, w, want in (("w1", w1, (E, d, f)), ("w3", w3, (E, d, f)), ("w2", w2, (E, f, d))):
        if tuple(w.shape) != want:
            raise ValueError(f"{name} must have shape {want} (num_experts, ...) for x of shape {(N, d)}, "
                             f"got {tuple(w.shape)}")
    check_tensor("sorted_idx", sorted_idx, ndim=1, dtype=torch.int32, device=x.device)
    if sorted_idx.shape[0] != N:
        raise ValueError(f"sorted_idx must have shape ({N},) (one entry per row of x), got {tuple(sorted_idx.shape)}")
    check_tensor("expert_offsets", expert_offsets, ndim=1, dtype=torch.int32, device=x.device)
    if expert_offsets.shape[0] != E + 1:
        raise ValueError(f"expert_offsets must have shape ({E + 1},) (num_experts + 1), "
                         f"got {tuple(expert_offsets.shape)}")


def moe_experts_ref(x: torch.Tensor, sorted_idx: torch.Tensor, expert_offsets: torch.Tensor, w1: torch.Tensor,
                    w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`moe_experts`: one expert at a time on its slice of the permuted rows, float32
    math (float64 kept), output in ``x.dtype``. Reads ``expert_offsets`` on the host and checks that
    ``sorted_idx`` is a permutation. Every expert takes part, an empty one on zero rows, so each
    weight gets a gradient (zeros where no row went)."""
    _check_experts_args(x, sorted_idx, expert_offsets, w1, w3, w2, FLOAT_DTYPES + (torch.float64,))
    check_cu_seqlens("expert_offsets", expert_offsets, x.shape[0])
    idx = sorted_idx.long()
    if not torch.equal(torch.sort(idx).values, torch.arange(x.shape[0], device=x.device)):
        raise ValueError(f"sorted_idx must be a permutation of 0..{x.shape[0] - 1}")
    dt = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(dt).index_select(0, idx)
    bounds = expert_offsets.tolist()
    ys = [_swiglu_expert(xs[lo:hi], w1[e], w3[e], w2[e]) for e, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
    y = torch.cat(ys)
    # out-of-place index_copy: differentiable w.r.t. y (its backward gathers through the same index)
    return y.new_empty(y.shape).index_copy(0, idx, y).to(x.dtype)


class _MoEExpertsFunction(torch.autograd.Function):
    """The grouped GEMMs with one slot per row (``top_k = 1``) and no gate (forward unscaled; the
    backward's gate of ones costs one multiply by 1.0, exact, and its gate gradient is dropped)."""

    @staticmethod
    def forward(ctx, x, sorted_idx, expert_offsets, w1, w3, w2, save_act):
        from onerec_fast.kernels.moe_gemm import moe_gemm_fwd

        out, a1, a3 = moe_gemm_fwd(x, w1, w3, w2, None, sorted_idx, expert_offsets, 1, save_act)
        ctx.save_for_backward(x, sorted_idx, expert_offsets, w1, w3, w2, a1, a3)
        return out

    @staticmethod
    def backward(ctx, g_out):
        x, sorted_idx, expert_offsets, w1, w3, w2, a1, a3 = ctx.saved_tensors
        ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        dx, dw1, dw3, dw2, _ = _experts_bwd(g_out, x, w1, w3, w2, ones, sorted_idx, expert_offsets,
                                            a1, a3, 1)
        return dx, None, None, dw1, dw3, dw2, None


def moe_experts(
    x: torch.Tensor, sorted_idx: torch.Tensor, expert_offsets: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
    w2: torch.Tensor, *, backend: str = "auto",
) -> torch.Tensor:
    """SwiGLU experts over rows already assigned to them: ``out[r] = (silu(x[r] @ w1[e]) * (x[r] @ w3[e])) @ w2[e]``
    for the expert e of row r; ``[N, d]`` in the row order of ``x``, ungated.

    ``x: [N, d]``; ``sorted_idx: [N]`` int32, a permutation listing the rows grouped by expert, expert e
    owning ``sorted_idx[expert_offsets[e] : expert_offsets[e+1]]``; ``expert_offsets: [E+1]`` int32,
    0 first, N last; ``w1, w3: [E, d, f]``, ``w2: [E, f, d]``. For rows already stored grouped, pass
    ``sorted_idx = arange(N)``. Differentiable w.r.t. ``x`` and the weights.

    ``cuda``/``triton`` (the same Triton grouped GEMMs here: there is no routing) gather the rows
    through ``sorted_idx`` inside the GEMM (no permuted copy), trust the indices and never sync with
    the host; ``reference`` is :func:`moe_experts_ref`. Eager only (no torch.compile custom op).
    """
    _check_experts_args(x, sorted_idx, expert_offsets, w1, w3, w2, FLOAT_DTYPES + (torch.float64,))
    chosen = resolve_backend("moe", backend, x.device, moe_backends())
    if chosen == "reference":
        return moe_experts_ref(x, sorted_idx, expert_offsets, w1, w3, w2)
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    save_act = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w3, w2))
    return _MoEExpertsFunction.apply(x.contiguous(), sorted_idx, expert_offsets, w1.contiguous(), w3.contiguous(),
                                     w2.contiguous(), save_act)
