"""Shared test utilities: devices (and where the Triton kernels run), per-dtype tolerances, relative
error, poisoning."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from onerec_fast.backends import cuda_extension, triton_interpret

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

HAS_TRITON = importlib.util.find_spec("triton") is not None
# The devices whose tensors the Triton kernels run on in this session: CPU tensors only through the
# interpreter (TRITON_INTERPRET=1, which the root conftest.py sets when there is no CUDA device, so
# CPU CI has "cpu" here and a GPU machine has only "cuda"), CUDA tensors on a GPU.
TRITON_DEVICES = (["cpu"] if HAS_TRITON and triton_interpret() else []) + (["cuda"] if HAS_TRITON and HAS_CUDA else [])


def load_script(relpath: str):
    """The module of a script under the repository root (``benchmarks/...``: scripts, not a package)."""
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def skip_unless_runs(backend: str, device: str | torch.device) -> None:
    """Skip the calling test unless ``backend``'s kernels run on ``device`` tensors in this session:
    "triton" on :data:`TRITON_DEVICES`, "cuda" on CUDA tensors with ``onerec_fast._C`` built;
    "reference" runs everywhere. (Whether the extension has one op's kernel is the test's business.)"""
    dev = torch.device(device).type
    if backend == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        if dev not in TRITON_DEVICES:
            why = ("CPU tensors need the interpreter, TRITON_INTERPRET=1, which conftest.py sets only when "
                   "there is no CUDA device" if dev == "cpu" else "no CUDA device")
            pytest.skip(f"triton does not run on {dev} tensors in this session: {why}")
    elif backend == "cuda":
        if dev != "cuda":
            pytest.skip(f"the cuda backend needs CUDA tensors, got {dev}")
        if cuda_extension() is None:
            pytest.skip("the CUDA extension onerec_fast._C is not built")
    elif backend != "reference":
        raise ValueError(f"backend must be 'triton', 'cuda' or 'reference', got {backend!r}")


# Relative-error bounds ||out - ref|| / ||ref|| against a float64 reference. fp32 on CUDA allows
# tf32-class error because Triton's fp32 dot runs in tf32 on GPUs: the varlen-attention backward
# measured up to 2.73e-3 (dq) and 2.03e-3 (dk) on the H200 (head_dim 32..128, Lq 1..128, GQA). Half
# types are bounded by their 8/11-bit mantissas with fp32 accumulation.
TOL = {torch.float64: 1e-10, torch.float32: 5e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
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
