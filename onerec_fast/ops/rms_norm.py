"""RMSNorm over the last dimension: ``y = x / sqrt(mean(x^2) + eps) * weight``, statistics in fp32.

:func:`rms_norm` is ``torch.nn.functional.rms_norm`` for one normalized dimension, with two differences that
serve a training step: the output dtype is the caller's choice (``out_dtype``: under bf16 autocast the next op is
a matmul that would cast an fp32 output anyway, so the norm writes bf16 and the cast's copy, forward and
backward, disappears), and the Triton backward (``kernels/rms_norm.py``) reads ``x`` and ``dy`` once, with the
weight gradient reduced from per-program partial sums (deterministic).

Backends (op name ``rms_norm``): ``triton`` (float16/bfloat16/float32 inputs, ``d <= MAX_D``) and
``reference`` (:func:`rms_norm_ref`: plain PyTorch, fp32 statistics, fp64 for fp64 inputs). ``auto`` takes the
reference for what the kernel does not take (float64, wider rows), with a warning once on CUDA.

Non-finite inputs are not special-cased: a row with an Inf or NaN gives what the reference gives (a NaN row for
NaN; for Inf, ``rstd = 0`` and so NaN where ``x`` is Inf and 0 elsewhere), in the output and the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from onerec_fast.backends import resolve_backend, triton_unless_unsupported
from onerec_fast.checks import FLOAT_DTYPES, check_dim, check_same, check_tensor

__all__ = ["rms_norm", "rms_norm_ref"]

_OP = "rms_norm"
_IMPLEMENTED = ("triton", "reference")


def _default_eps(eps: float | None, dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if eps is None else float(eps)


def rms_norm_ref(x: Tensor, weight: Tensor | None = None, eps: float | None = None, *,
                 out_dtype: torch.dtype | None = None) -> Tensor:
    """Reference: same arguments and result as :func:`rms_norm`, by ``torch.nn.functional.rms_norm`` in fp32 (fp64
    for fp64 inputs; differentiable). For fp32 ``x`` and ``weight`` this is exactly ``nn.RMSNorm``, so a CPU model
    computes what it did before the fused op (and at its speed)."""
    dt = torch.promote_types(x.dtype, torch.float32)
    w = None if weight is None else weight.to(dt)
    return F.rms_norm(x.to(dt), x.shape[-1:], w, _default_eps(eps, x.dtype)).to(out_dtype or x.dtype)


def _kernels():
    from onerec_fast.kernels import rms_norm  # triton is imported only when used

    return rms_norm


@torch.library.custom_op("onerec_fast::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``x: [M, d]`` -> ``(y [M, d] out_dtype, rstd fp32 [M])``."""
    return _kernels().rms_norm_fwd(x.contiguous(), None if weight is None else weight.contiguous(), eps, out_dtype)


@_rms_norm_fwd.register_fake
def _(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op("onerec_fast::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(dx [M, d] x.dtype, dw [d] weight.dtype)``; ``dw`` is empty without a weight."""
    dx, dw = _kernels().rms_norm_bwd(dy.contiguous(), x.contiguous(), None if weight is None else weight.contiguous(),
                                     rstd)
    return dx, x.new_empty(0) if dw is None else dw.to(weight.dtype)


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    return torch.empty_like(x), x.new_empty(0) if weight is None else torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.onerec_fast.rms_norm_bwd(dy, x, weight, rstd)
    return dx, (dw if weight is not None and ctx.needs_input_grad[1] else None), None, None


_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _pick_backend(backend: str | None, x: Tensor) -> str:
    name = resolve_backend(_OP, backend, x.device, _IMPLEMENTED)
    if name != "triton":
        return name
    max_d = _kernels().MAX_D
    why = None
    if x.dtype not in FLOAT_DTYPES:
        why = f"supports dtypes {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}"
    elif x.shape[-1] > max_d:
        why = f"supports rows of at most {max_d} values, got {x.shape[-1]}"
    return triton_unless_unsupported(_OP, backend, x.device, why)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float | None = None, *,
             out_dtype: torch.dtype | None = None, backend: str = "auto") -> Tensor:
    """RMSNorm of ``x: [..., d]`` over its last dimension, scaled by ``weight: [d]`` (any float dtype; None: no
    scale) -> ``[..., d]`` in ``out_dtype`` (default ``x.dtype``). ``eps`` None: ``torch.finfo(x.dtype).eps``, as
    ``torch.nn.RMSNorm``. Differentiable in ``x`` and ``weight``; ``backend``: "auto", "triton", "reference"."""
    check_tensor("x", x, ndim=range(1, 65), dtype=FLOAT_DTYPES + (torch.float64,))
    if x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    if weight is not None:
        check_tensor("weight", weight, ndim=1, dtype=FLOAT_DTYPES + (torch.float64,))
        check_same("x", x, "weight", weight, dtype=False)
        check_dim("weight", weight, 0, x.shape[-1], "the last dimension d of x [..., d]")
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"out_dtype must be a float dtype, got {out_dtype}")
    eps = _default_eps(eps, x.dtype)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if _pick_backend(backend, x) == "reference":
        return rms_norm_ref(x, weight, eps, out_dtype=out_dtype)
    # contiguous here, so the tensor the backward keeps is the one the kernels read (not copied again there)
    y, _ = _rms_norm_fwd(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps, out_dtype or x.dtype)
    return y.view(*x.shape[:-1], x.shape[-1])
