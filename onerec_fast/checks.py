"""Argument checks shared by every layer (ops, trie, modules, decoding, rl): every message names the argument and
what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the given rank(s), dtype(s) and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None:
        allowed_dt = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed_dt:
            raise TypeError(f"{name} must have dtype in {[str(d) for d in allowed_dt]}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, dtype: bool = True) -> None:
    """Raise unless ``a`` and ``b`` share device (and dtype)."""
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the same device as {name_a} ({a.device}), got {b.device}")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the same dtype as {name_a} ({a.dtype}), got {b.dtype}")


def check_dim(name: str, t: torch.Tensor, dim: int, size: int, what: str) -> None:
    """Raise unless ``t.shape[dim] == size`` (``what`` says where ``size`` comes from)."""
    if t.shape[dim] != size:
        raise ValueError(f"{name} must have size {size} ({what}) in dimension {dim}, got shape {tuple(t.shape)}")


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int | None = None, *, sync: bool = True) -> None:
    """Check an int32 offsets tensor ``[B+1]``: starts at 0, non-decreasing, ends at ``total``.

    The value checks read the tensor; callers on a hot path that already validated it pass
    ``sync=False`` (on CUDA the checks cost a device->host copy).
    """
    check_tensor(name, cu, ndim=1, dtype=(torch.int32, torch.int64))
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one entry (B+1 offsets), got 0")
    if not sync or torch.compiler.is_compiling():
        return
    c = cu.detach().to("cpu", torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"{name}[0] must be 0, got {int(c[0])}")
    if c.numel() > 1 and bool((c[1:] < c[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing (monotonic offsets), got {c.tolist()[:16]}...")
    if total is not None and int(c[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of packed rows ({total}), got {int(c[-1])}")
