"""``RMSNorm``: ``torch.nn.RMSNorm`` (same parameter, same state dict) on the fused op of ``ops/rms_norm.py``."""

from __future__ import annotations

import torch
from torch import nn

from onerec_fast.ops.rms_norm import rms_norm

__all__ = ["RMSNorm"]


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` over one (the last) dimension, computed by :func:`~onerec_fast.ops.rms_norm.rms_norm`
    (``backend``: "auto", "triton", "reference").

    ``x: [..., d]`` -> ``[..., d]``: in ``x``'s dtype, except under autocast, where the output is in the autocast
    dtype. The values are those of ``nn.RMSNorm`` rounded to that dtype; a pre-norm block feeds them to a matmul,
    which would round them the same way, so the cast (a copy forward and backward) is saved."""

    def __init__(self, normalized_shape: int | tuple[int] | list[int], eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, backend: str = "auto"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, device=device, dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be one dimension, got {self.normalized_shape}")
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        return rms_norm(x, self.weight, self.eps, out_dtype=out_dtype, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
