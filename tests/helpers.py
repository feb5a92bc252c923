"""Shared test utilities: devices, per-dtype tolerances, relative error, poisoning."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Relative-error bounds ||out - ref|| / ||ref|| against a float64 reference. fp32 allows tf32-class
# error because Triton's fp32 dot uses tf32 on GPUs (~3e-4 seen); half types are bounded by their
# 8/11-bit mantissas with fp32 accumulation.
TOL = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Interpreter (CPU) float32 runs without tf32, so it is held tighter.
TOL_CPU_FP32 = 1e-5


def tol(dtype: torch.dtype, device: str | torch.device = "cuda") -> float:
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        return TOL_CPU_FP32
    return TOL[dtype]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has NaN/Inf; 0-norm refs compare absolutely."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    den = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / den if den > 0 else num


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, device="cuda") -> None:
    e = rel_err(out, ref)
    t = tol(dtype, device)
    assert e <= t, f"{name}: relative error {e:.3e} > {t:.1e} ({dtype}, {device})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (float) or a sentinel (int) so unwritten elements show up."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-12345 if t.dtype != torch.bool else True)
