"""Fused RMSNorm, forward and backward (Triton), for rows of width ``d`` held whole in registers.

Forward (one program per ``BLOCK_M`` rows): ``rstd = 1 / sqrt(mean(x^2) + eps)`` in fp32, ``y = x * rstd * w``
written in the caller's output dtype (bf16 under autocast: the next op is a matmul that would cast an fp32
result anyway), and ``rstd: fp32 [M]`` for the backward.

Backward (a few programs per SM, each looping over blocks of ``BLOCK_M`` rows): with ``xhat = x * rstd`` and
``g = w * dy``, ``dx = rstd * (g - xhat * mean(xhat * g))``, and each program's partial
``dw = sum_rows(dy * xhat)`` into ``dw_partial: fp32 [programs, d]``, which the caller sums (no atomics: the
result is bitwise reproducible on one GPU).

Why: ``torch.nn.RMSNorm`` on CUDA (torch 2.11, H100) spent 87 us per backward call on 51k rows of d = 160, 68 of
them in its gamma reduction (``GammaBetaBackward``), 3.0 of the 0.015b training step's 22.6 ms
(``benchmarks/results/h100-2026-12-07-s15/call1/prof_0.015b.txt``); the backward here reads ``x`` and ``dy`` and
writes ``dx`` once. With these kernels the graphed 0.015b step's GPU work went from 21.6 to 18.7 ms (H100,
session 16, benchmarks/RESULTS.md).

Both kernels are memory-bound; the launch config is ``BLOCK_M`` and ``num_warps``, looked up per GPU and
shape (``launch_config``: the shipped table that ``benchmarks/tune_rms_norm.py`` writes, else tuned on first use).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .launch_config import LaunchConfig, lookup, pow2_bucket, shape_key

OP = "rms_norm"
# The widest row one program holds (fp32 registers: BLOCK_M * BLOCK_D values of x and of dy per program).
MAX_D = 16384
# Elements of one program's tile in the default config (measured on nothing yet: Liger-Kernel's and Triton's
# tutorial layer norm use 4-8k; tune_rms_norm.py and tune-on-first-use pick per GPU).
_TILE = 4096
# Programs per SM in the backward (each loops over row blocks): enough resident warps to keep loads in flight
# (not tuned: chosen so that the partial weight gradients stay a few hundred rows).
_BWD_PROGRAMS_PER_SM = 8


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, D, eps,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < M
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, M, D, num_blocks,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for blk in range(pid, num_blocks, tl.num_programs(0)):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        # rows past M load zeros everywhere, so they add nothing to the partial dw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy
        if HAS_W:
            g = dy * w[None, :]
        c = tl.sum(xhat * g, axis=1) / D
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    if HAS_W:
        tl.store(dw_part_ptr + pid.to(tl.int64) * D + cols, dw, mask=cmask)


def block_d(dim: int) -> int:
    return triton.next_power_of_2(dim)


def config_key(kernel: str, dtype: torch.dtype, rows: int, dim: int) -> str:
    """``"<fwd|bwd> <dtype> d<block_d> M<rows bucket>"``: the tile's width and the row count (a power of two
    from 1k to 1M rows: fewer rows leave the GPU idle whatever the tile, more change nothing)."""
    return shape_key(kernel, dtype, d=block_d(dim), M=pow2_bucket(rows, 1024, 1 << 20))


def default_config(dim: int) -> LaunchConfig:
    bd = block_d(dim)
    return LaunchConfig(BLOCK_M=max(1, _TILE // bd), num_warps=4 if bd <= 1024 else 8)


def candidates(dim: int, interpret: bool) -> list[LaunchConfig]:
    """What tune-on-first-use tries, the default first: twice and half the rows per program, and more warps.
    Interpreter: the default and one other (CPU tests)."""
    default = default_config(dim)
    change = dataclasses.replace
    half = change(default, BLOCK_M=max(1, default.BLOCK_M // 2))
    if interpret:
        return [default, half]
    return [default, half, change(default, BLOCK_M=default.BLOCK_M * 2),
            change(default, num_warps=2 * default.num_warps), change(half, num_warps=2 * default.num_warps)]


def get_config(kernel: str, x: torch.Tensor, rows: int, dim: int, run=None) -> LaunchConfig:
    """The config of ``kernel`` ("fwd" or "bwd") for ``x``'s device and dtype (``launch_config.lookup``);
    ``run(config)`` launches it on the caller's tensors, for tuning on first use."""
    return lookup(OP, config_key(kernel, x.dtype, rows, dim), x.device,
                  lambda: candidates(dim, x.device.type == "cpu"), run)


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, out_dtype: torch.dtype,
                 config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x: [M, d]`` (contiguous, d <= MAX_D), ``weight: [d] | None`` -> ``(y [M, d] out_dtype, rstd fp32 [M])``."""
    rows, dim = x.shape
    y = torch.empty(rows, dim, device=x.device, dtype=out_dtype)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0:
        return y, rstd
    cfg = config or get_config("fwd", x, rows, dim, run=lambda c: rms_norm_fwd(x, weight, eps, out_dtype, c))
    _rms_norm_fwd_kernel[(triton.cdiv(rows, cfg.BLOCK_M),)](
        x, weight if weight is not None else x, y, rstd, rows, dim, eps,
        BLOCK_M=cfg.BLOCK_M, BLOCK_D=block_d(dim), HAS_W=weight is not None, **cfg.launch_options())
    return y, rstd


def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                 config: LaunchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dy, x: [M, d]`` (contiguous), ``weight: [d] | None``, ``rstd: fp32 [M]`` -> ``(dx [M, d] x.dtype,
    dw [d] fp32 | None)``."""
    rows, dim = x.shape
    dx = torch.empty_like(x)
    if rows == 0:
        return dx, None if weight is None else torch.zeros(dim, device=x.device, dtype=torch.float32)
    cfg = config or get_config("bwd", x, rows, dim, run=lambda c: rms_norm_bwd(dy, x, weight, rstd, c))
    blocks = triton.cdiv(rows, cfg.BLOCK_M)
    programs = min(blocks, _bwd_programs(x.device))
    part = torch.empty(programs, dim, device=x.device, dtype=torch.float32) if weight is not None else rstd
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight if weight is not None else x, rstd, dx, part, rows, dim, blocks,
        BLOCK_M=cfg.BLOCK_M, BLOCK_D=block_d(dim), HAS_W=weight is not None, **cfg.launch_options())
    return dx, None if weight is None else part.sum(0)


def _bwd_programs(device: torch.device) -> int:
    """Programs of the backward: a few per SM, each looping over row blocks, so the partial weight gradients are
    a few hundred rows whatever the row count (one per row block wrote 268 MB at 64k rows of d = 2048).
    The interpreter: 3, so CPU tests loop."""
    if device.type != "cuda":
        return 3
    return _BWD_PROGRAMS_PER_SM * _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
