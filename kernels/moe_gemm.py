"""Triton grouped GEMMs of a mixture-of-experts SwiGLU FFN, forward and backward.

Notation: ``x: [T, D]`` tokens, ``k`` experts per token, ``M = T * k`` (token, slot) pairs; pair
``p = t * k + j``. ``sorted_pair_idx: [M]`` lists the pairs grouped by expert, expert e owning sorted
rows ``offsets[e] : offsets[e+1]``. Weights ``w1, w3: [E, D, F]``, ``w2: [E, F, D]``; expert e computes
``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]``; ``gate: [M]`` fp32 is the gate weight of each pair.

Kernels (all accumulate in fp32; every output element is written once, so runs are bitwise repeatable):

* ``_moe_gemm1_fwd_kernel``: ``a1 = x[tok] @ w1[e]``, ``a3 = x[tok] @ w3[e]``, ``h = silu(a1) * a3`` for
  sorted rows, A rows gathered from ``x`` through the permutation (no permuted copy of ``x``).
* ``_moe_scatter_gemm_kernel``: ``out[pair] = scale * (A @ B[e] (+ A2 @ B2[e]))`` over sorted rows, the
  rows scattered back to pair order ``[M, N]``; forward GEMM2 (``h @ w2``, scale = gate) and backward
  dX (``da1 @ w1^T + da3 @ w3^T``).
* ``_moe_combine_kernel``: the k rows of each token summed in a fixed order (output and dX).
* ``_moe_dh_bwd_kernel``: ``dh = dy[tok] @ w2[e]^T`` with the SwiGLU backward in the epilogue:
  ``da1``, ``da3`` and per-tile partial sums of the gate gradient ``<h, dh_raw>``.
* ``_moe_wgrad_kernel``: weight gradients ``dw1, dw3 = x[tok]^T @ (da1, da3)`` and
  ``dw2 = (gate * h)^T @ dy[tok]`` (``gate * h`` written by the dh kernel), one program per (expert, tile),
  reducing over the expert's rows; empty experts get zeros.

Grids never depend on the routing: the M-tiles of all experts are enumerated over a static upper
bound ``cdiv(M, BLOCK_M) + min(E, M)``; a program maps its tile index to (expert, rows) from
``offsets`` and returns when it lies past the last tile. No host synchronisation anywhere, so the
forward is CUDA-graph capturable. Kernel names in the configs: gemm1, gemm2 (forward), dh, dx, dw13,
dw2 (backward).

Launch configs: :func:`get_config` looks them up through ``launch_config.lookup`` (``configs/moe_gemm.json``,
written by ``benchmarks/tune_moe.py``, then tune-on-first-use over :func:`candidates`, then
:func:`default_config`), keyed ``"<kernel> <dtype> d<D> f<F> E<E> k<k> T<pow2 bucket of T>"``.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from .launch_config import LaunchConfig, lookup, pow2_bucket, shape_key
from .moe_routing import cdiv as _cdiv
from .moe_routing import next_pow2 as _next_pow2

KERNELS = ("gemm1", "gemm2", "dh", "dx", "dw13", "dw2")


# --------------------------------------------------------------------------------------------------
# Shared device helpers


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped ordering of the (m, n) tiles, so GROUP_M m-tiles in flight reuse the same B columns."""
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _expert_tile(pid_m, offsets_ptr, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Map tile index ``pid_m`` over all experts' M-tiles to (expert, first sorted row, segment end).

    ``expert >= E`` when ``pid_m`` lies past the last tile (then the rows are meaningless).
    """
    e = tl.arange(0, E_PAD)
    valid = e < E
    lo = tl.load(offsets_ptr + e, mask=valid, other=0)
    hi = tl.load(offsets_ptr + e + 1, mask=valid, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    expert = tl.sum((tl.cumsum(tiles, 0) <= pid_m).to(tl.int32), 0)
    first_tile = tl.sum(tl.where(e < expert, tiles, 0), 0)
    last = tl.minimum(expert, E - 1)
    row0 = tl.load(offsets_ptr + last) + (pid_m - first_tile) * BLOCK_M
    return expert, row0, tl.load(offsets_ptr + last + 1)


@triton.jit
def _sorted_tile(offsets_ptr, E, N, num_pid_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr, E_PAD: tl.constexpr):
    """This program's tile of a grouped GEMM over sorted rows: (expert, rows, rows-in-segment mask,
    output columns, N-tile index); ``expert >= E`` means no tile (the caller returns)."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), num_pid_m, (N + BLOCK_N - 1) // BLOCK_N, GROUP_M)
    expert, row0, seg_end = _expert_tile(pid_m, offsets_ptr, E, BLOCK_M, E_PAD)
    rows = row0 + tl.arange(0, BLOCK_M)
    return expert, rows, rows < seg_end, pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_n


@triton.jit
def _weight_tile(pid, offsets_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program ``pid`` of a weight-gradient grid (expert-major, then M-tiles, then N-tiles): its expert,
    row and column indices of the ``[M, N]`` weight tile, and the expert's sorted-row range."""
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    expert = pid // (num_m * num_n)
    ms = ((pid // num_n) % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return expert, ms, ns, tl.load(offsets_ptr + expert), tl.load(offsets_ptr + expert + 1)


@triton.jit
def _segment_rows(r0, rs, seg_end, pair_ptr, TOP_K: tl.constexpr):
    """Sorted rows ``r0 + rs`` of a segment ending at ``seg_end``: (rows, in-segment mask, pair, token)."""
    rows = r0 + rs
    rmask = rows < seg_end
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
    return rows, rmask, pair, (pair // TOP_K).to(tl.int64)


# --------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _moe_gemm1_fwd_kernel(
    x_ptr, w1_ptr, w3_ptr, pair_ptr, offsets_ptr, h_ptr, a1_ptr, a3_ptr,
    E, D, F, num_pid_m, stride_x,
    TOP_K: tl.constexpr, STORE_ACT: tl.constexpr, EVEN: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    expert, rows, rmask, cols, pid_n = _sorted_tile(offsets_ptr, E, F, num_pid_m, BLOCK_M, BLOCK_N, GROUP_M, E_PAD)
    if expert >= E:
        return
    # Rows past the segment read token 0: a valid address, never stored.
    tok = (tl.load(pair_ptr + rows, mask=rmask, other=0) // TOP_K).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_x + ks[None, :]
    w_off = expert.to(tl.int64) * D * F + ks[:, None] * F + cols[None, :]
    b1_ptrs = w1_ptr + w_off
    b3_ptrs = w3_ptr + w_off
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN:  # D % BLOCK_K == 0 and F % BLOCK_N == 0: unmasked, vectorised loads
            a = tl.load(a_ptrs)
            b1 = tl.load(b1_ptrs)
            b3 = tl.load(b3_ptrs)
        else:
            kmask = (k0 + ks) < D
            bmask = kmask[:, None] & (cols < F)[None, :]
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            b1 = tl.load(b1_ptrs, mask=bmask, other=0.0)
            b3 = tl.load(b3_ptrs, mask=bmask, other=0.0)
        acc1 = tl.dot(a, b1, acc1)
        acc3 = tl.dot(a, b3, acc3)
        a_ptrs += BLOCK_K
        b1_ptrs += BLOCK_K * F
        b3_ptrs += BLOCK_K * F
    out_off = rows.to(tl.int64)[:, None] * F + cols[None, :]
    omask = rmask[:, None] & (cols < F)[None, :]
    if STORE_ACT:
        tl.store(a1_ptr + out_off, acc1.to(a1_ptr.dtype.element_ty), mask=omask)
        tl.store(a3_ptr + out_off, acc3.to(a3_ptr.dtype.element_ty), mask=omask)
    # silu(a1) * a3, with tl.sigmoid inlined (cheaper under the interpreter)
    tl.store(h_ptr + out_off, (acc1 / (1.0 + tl.exp(-acc1)) * acc3).to(h_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _moe_scatter_gemm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, pair_ptr, offsets_ptr, gate_ptr, out_ptr,
    E, M, N, K, num_pid_m, stride_be, stride_bk, stride_bn,
    HAS_SECOND: tl.constexpr, SCALE: tl.constexpr, EVEN: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    expert, rows, rmask, cols, pid_n = _sorted_tile(offsets_ptr, E, N, num_pid_m, BLOCK_M, BLOCK_N, GROUP_M, E_PAD)
    if expert >= E:
        return
    rows_a = tl.minimum(rows, M - 1).to(tl.int64)  # past the segment: valid rows, results never stored
    ks = tl.arange(0, BLOCK_K)
    a_off = rows_a[:, None] * K + ks[None, :]
    b_off = expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN:  # K % BLOCK_K == 0 and N % BLOCK_N == 0
            acc = tl.dot(tl.load(a_ptr + a_off), tl.load(b_ptr + b_off), acc)
            if HAS_SECOND:
                acc = tl.dot(tl.load(a2_ptr + a_off), tl.load(b2_ptr + b_off), acc)
        else:
            kmask = (k0 + ks) < K
            bmask = kmask[:, None] & (cols < N)[None, :]
            acc = tl.dot(tl.load(a_ptr + a_off, mask=kmask[None, :], other=0.0),
                         tl.load(b_ptr + b_off, mask=bmask, other=0.0), acc)
            if HAS_SECOND:
                acc = tl.dot(tl.load(a2_ptr + a_off, mask=kmask[None, :], other=0.0),
                             tl.load(b2_ptr + b_off, mask=bmask, other=0.0), acc)
        a_off += BLOCK_K
        b_off += BLOCK_K * stride_bk
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
    if SCALE:
        acc = acc * tl.load(gate_ptr + pair, mask=rmask, other=0.0)[:, None]
    out_off = pair.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & (cols < N)[None, :])


@triton.jit
def _moe_dh_bwd_kernel(
    dy_ptr, w2_ptr, pair_ptr, offsets_ptr, gate_ptr, a1_ptr, a3_ptr, da1_ptr, da3_ptr, hg_ptr, dgate_part_ptr,
    E, D, F, M, num_pid_m, stride_dy,
    TOP_K: tl.constexpr, EVEN: tl.constexpr, E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    expert, rows, rmask, cols, pid_n = _sorted_tile(offsets_ptr, E, F, num_pid_m, BLOCK_M, BLOCK_N, GROUP_M, E_PAD)
    if expert >= E:
        return
    pair = tl.load(pair_ptr + rows, mask=rmask, other=0)
    tok = (pair // TOP_K).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = dy_ptr + tok[:, None] * stride_dy + ks[None, :]
    # B[k, n] = w2[e, n, k]: w2^T, read along its contiguous D axis.
    b_ptrs = w2_ptr + expert.to(tl.int64) * F * D + cols[None, :] * D + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        if EVEN:  # D % BLOCK_K == 0 and F % BLOCK_N == 0
            acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
        else:
            kmask = (k0 + ks) < D
            acc = tl.dot(tl.load(a_ptrs, mask=kmask[None, :], other=0.0),
                         tl.load(b_ptrs, mask=kmask[:, None] & (cols < F)[None, :], other=0.0), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    omask = rmask[:, None] & (cols < F)[None, :]
    act_off = rows.to(tl.int64)[:, None] * F + cols[None, :]
    a1 = tl.load(a1_ptr + act_off, mask=omask, other=0.0).to(tl.float32)
    a3 = tl.load(a3_ptr + act_off, mask=omask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a1))
    silu = a1 * sig
    # d gate = <h, dh_raw> over F: this tile's share, summed over the F-tiles by the caller.
    tl.store(dgate_part_ptr + pid_n * M + pair, tl.sum(silu * a3 * acc, 1), mask=rmask)
    gate = tl.load(gate_ptr + pair, mask=rmask, other=0.0)[:, None]
    # gate * h for dw2, whose kernel is then a plain GEMM: recomputing silu there held it to 189 TFLOP/s
    # (T=16384 k=2, H200), against 408 for dw13.
    tl.store(hg_ptr + act_off, (gate * silu * a3).to(hg_ptr.dtype.element_ty), mask=omask)
    dh = acc * gate
    tl.store(da3_ptr + act_off, (dh * silu).to(da3_ptr.dtype.element_ty), mask=omask)
    tl.store(da1_ptr + act_off, (dh * a3 * sig * (1.0 + a1 * (1.0 - sig))).to(da1_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _moe_wgrad_kernel(
    lhs_ptr, rhs_ptr, rhs2_ptr, pair_ptr, offsets_ptr, out_ptr, out2_ptr,
    M, N, stride_tok,
    TOP_K: tl.constexpr, DW2: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[e] = L^T @ R over the rows of expert e (out: [E, M, N]), one program per (expert, tile):
    # dw13 mode: L = x[tok] ([rows, M=D], gathered), R = da1 -> out = dw1, R2 = da3 -> out2 = dw3;
    # dw2 mode: L = gate * h ([rows, M=F], sorted rows, from the dh kernel), R = dy[tok] -> dw2.
    expert, ms, ns, seg_lo, seg_end = _weight_tile(tl.program_id(0), offsets_ptr, M, N, BLOCK_M, BLOCK_N)
    rs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(seg_lo, seg_end, BLOCK_K):
        rows, rmask, pair, tok = _segment_rows(r0, rs, seg_end, pair_ptr, TOP_K)
        lmask = rmask[None, :]
        rhs_mask = rmask[:, None]
        if not EVEN:  # M % BLOCK_M or N % BLOCK_N
            lmask = lmask & (ms < M)[:, None]
            rhs_mask = rhs_mask & (ns < N)[None, :]
        srow = rows.to(tl.int64)
        if DW2:
            lt = tl.load(lhs_ptr + srow[None, :] * M + ms[:, None], mask=lmask, other=0.0)
            r = tl.load(rhs_ptr + tok[:, None] * stride_tok + ns[None, :], mask=rhs_mask, other=0.0)
            acc = tl.dot(lt, r, acc)
        else:
            lt = tl.load(lhs_ptr + tok[None, :] * stride_tok + ms[:, None], mask=lmask, other=0.0)
            r_off = srow[:, None] * N + ns[None, :]
            acc = tl.dot(lt, tl.load(rhs_ptr + r_off, mask=rhs_mask, other=0.0), acc)
            acc2 = tl.dot(lt, tl.load(rhs2_ptr + r_off, mask=rhs_mask, other=0.0), acc2)
    w_off = expert.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
    wmask = (ms < M)[:, None] & (ns < N)[None, :]
    tl.store(out_ptr + w_off, acc.to(out_ptr.dtype.element_ty), mask=wmask)
    if not DW2:
        tl.store(out2_ptr + w_off, acc2.to(out2_ptr.dtype.element_ty), mask=wmask)


# --------------------------------------------------------------------------------------------------
# Launch configs


@triton.jit
def _moe_combine_kernel(pairs_ptr, out_ptr, T, D, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """``out[t] = sum_j pairs[t * TOP_K + j]``, j ascending, in fp32: the fixed-order combine."""
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(pairs_ptr + (rows * TOP_K + j)[:, None] * D + cols[None, :], mask=mask).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


OP = "moe_gemm"


def config_key(kernel: str, T: int, D: int, F: int, E: int, top_k: int, dtype: torch.dtype) -> str:
    """Key of one kernel and problem in ``configs/moe_gemm.json`` (T bucketed to a power of two), e.g.
    ``"gemm1 bfloat16 d1024 f2048 E24 k2 T16384"``."""
    return shape_key(kernel, dtype, d=D, f=F, E=E, k=top_k, T=pow2_bucket(T))


def default_config(kernel: str, T: int, D: int, F: int, E: int, top_k: int, interpret: bool,
                   elem_bytes: int = 2) -> LaunchConfig:
    """Heuristic launch config, used where nothing tuned applies.

    Interpreter: small tiles (the CPU tests use small shapes). GPU (sm_90, checked with ptxas for
    spills): 128x128x64 bf16 tensor-core tiles, 8 warps, 3 stages; the dh kernel (heavy SwiGLU
    epilogue) 128x64 with 4 stages; 64-row M-tiles when experts get fewer than 128 rows on average.
    ``elem_bytes`` 4 (fp32 operands) halves BLOCK_K so the pipelined tiles take the same shared memory
    as in 16-bit: with BLOCK_K 64 fp32 gemm1 asked for 288 KiB and dh for 240 KiB (H200: 227 KiB).
    """
    if interpret:
        def t(n):
            return max(16, min(64, _next_pow2(n)))

        rows = T * top_k
        dims = {"gemm1": (rows, F, D), "gemm2": (rows, D, F), "dh": (rows, F, D), "dx": (rows, D, F),
                "dw13": (D, F, rows), "dw2": (F, D, rows)}[kernel]
        return LaunchConfig(BLOCK_M=t(dims[0]), BLOCK_N=t(dims[1]), BLOCK_K=t(dims[2]), GROUP_M=4, num_warps=4,
                            num_stages=1)
    block_k = 64 * 2 // elem_bytes
    if kernel in ("dw13", "dw2"):
        return LaunchConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=1, num_warps=8, num_stages=3)
    block_m = 128 if T * top_k >= 128 * E else 64
    if kernel == "dh":
        return LaunchConfig(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=4)
    return LaunchConfig(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=block_k, GROUP_M=8, num_warps=8, num_stages=3)


# (BLOCK_M, BLOCK_N, num_stages) tried on first use besides the default, 8 warps, the default's BLOCK_K and
# GROUP_M: the tiles the H200 tuning (kernels/configs/moe_gemm.json) chose for some kernel and shape.
_GPU_TILES = ((128, 128, 3), (128, 128, 4), (64, 128, 4), (128, 64, 4), (64, 64, 4))


def candidates(kernel: str, T: int, D: int, F: int, E: int, top_k: int, interpret: bool,
               elem_bytes: int = 2) -> list[LaunchConfig]:
    """What tune-on-first-use tries for this problem, the default first. Every tile is valid for every
    shape (the kernels mask partial tiles); one that does not fit the GPU fails to compile and is skipped.
    Interpreter: the default and half its BLOCK_N (CPU tests)."""
    default = default_config(kernel, T, D, F, E, top_k, interpret, elem_bytes)
    if interpret:
        return [default, dataclasses.replace(default, BLOCK_N=max(16, default.BLOCK_N // 2))]
    return [default, *(dataclasses.replace(default, BLOCK_M=m, BLOCK_N=n, num_warps=8, num_stages=s)
                       for m, n, s in _GPU_TILES)]


def get_config(kernel: str, x: torch.Tensor, T: int, D: int, F: int, E: int, top_k: int,
               run=None) -> LaunchConfig:
    """The config of ``kernel`` for ``x``'s device and dtype (``launch_config.lookup``); ``run(config)``
    launches it on the caller's tensors, for tuning on first use."""
    interpret = _interpret() or x.device.type != "cuda"
    return lookup(OP, config_key(kernel, T, D, F, E, top_k, x.dtype), x.device,
                  lambda: candidates(kernel, T, D, F, E, top_k, interpret, x.element_size()), run)


def _tile_args(cfg: LaunchConfig) -> dict:
    """The grouped-GEMM kernels' tile constexprs."""
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M)


def _num_pid_m(M: int, E: int, block_m: int) -> int:
    # sum_e cdiv(n_e, BLOCK_M) < M / BLOCK_M + (number of non-empty experts <= min(E, M)), whatever the routing.
    return _cdiv(M, block_m) + min(E, M)


# --------------------------------------------------------------------------------------------------
# Launchers


def _e_pad(E: int) -> int:
    return max(16, _next_pow2(E))


def _even(a: int, block_a: int, b: int, block_b: int) -> bool:
    return a % block_a == 0 and b % block_b == 0


def _grid_m(M: int, E: int, N: int, cfg: LaunchConfig) -> tuple[int, tuple[int]]:
    """(num_pid_m, grid) of a grouped GEMM over M sorted rows and N output columns."""
    npm = _num_pid_m(M, E, cfg.BLOCK_M)
    return npm, (npm * _cdiv(N, cfg.BLOCK_N),)


def moe_gemm1_fwd(x, w1, w3, sorted_pair_idx, expert_offsets, top_k: int, h, a1=None, a3=None, cfg=None):
    """Fill ``h: [M, F]`` (and ``a1, a3: [M, F]`` when given) in sorted-row order; ``x: [T, D]``."""
    T, D = x.shape
    E, _, F = w1.shape
    cfg = cfg or get_config("gemm1", x, T, D, F, E, top_k, run=lambda c: moe_gemm1_fwd(
        x, w1, w3, sorted_pair_idx, expert_offsets, top_k, h, a1, a3, cfg=c))
    npm, grid = _grid_m(T * top_k, E, F, cfg)
    store = a1 is not None
    _moe_gemm1_fwd_kernel[grid](
        x, w1, w3, sorted_pair_idx, expert_offsets, h, a1 if store else h, a3 if store else h,
        E, D, F, npm, x.stride(0),
        TOP_K=top_k, STORE_ACT=store, EVEN=_even(D, cfg.BLOCK_K, F, cfg.BLOCK_N),
        E_PAD=_e_pad(E),
        **_tile_args(cfg), **cfg.launch_options(),
    )


def moe_scatter_gemm(a, b, sorted_pair_idx, expert_offsets, out, *, b_transposed: bool, gate=None,
                     a2=None, b2=None, cfg=None, kernel="gemm2", T: int = 0, top_k: int = 1):
    """``out[pair] = gate[pair] * (a[r] @ B[e] (+ a2[r] @ B2[e]))`` over sorted rows r, ``out: [M, N]``.

    ``a, a2: [M, K]`` in sorted-row order. ``b, b2``: ``[E, K, N]``, or ``[E, N, K]`` read transposed
    when ``b_transposed``. ``gate: [M]`` fp32 in pair order (None: no scaling). ``kernel``, ``T`` and
    ``top_k`` only select the launch config ("gemm2" forward, "dx" backward).
    """
    M, K = a.shape
    E = b.shape[0]
    N = out.shape[1]
    stride_bk, stride_bn = (1, K) if b_transposed else (N, 1)
    cfg = cfg or get_config(kernel, a, T, N, K, E, top_k, run=lambda c: moe_scatter_gemm(
        a, b, sorted_pair_idx, expert_offsets, out, b_transposed=b_transposed, gate=gate, a2=a2, b2=b2, cfg=c))
    npm, grid = _grid_m(M, E, N, cfg)
    _moe_scatter_gemm_kernel[grid](
        a, b, a if a2 is None else a2, b if b2 is None else b2, sorted_pair_idx, expert_offsets,
        a if gate is None else gate, out,
        E, M, N, K, npm, K * N, stride_bk, stride_bn,
        HAS_SECOND=a2 is not None, SCALE=gate is not None, EVEN=_even(K, cfg.BLOCK_K, N, cfg.BLOCK_N),
        E_PAD=_e_pad(E), **_tile_args(cfg), **cfg.launch_options(),
    )


def moe_dh_bwd(dy, w2, gate, sorted_pair_idx, expert_offsets, a1, a3, top_k: int, cfg=None):
    """``dh = gate * (dy[tok] @ w2[e]^T)`` through the SwiGLU backward: returns ``(da1, da3, hg [M, F],
    dgate [M] fp32)``: ``hg = gate * silu(a1) * a3`` (sorted rows, for :func:`moe_dw2_bwd`) and the gate
    gradient ``<h, dy[tok] @ w2[e]^T>`` in pair order."""
    T, D = dy.shape
    E, F, _ = w2.shape
    M = T * top_k
    cfg = cfg or get_config("dh", dy, T, D, F, E, top_k, run=lambda c: moe_dh_bwd(
        dy, w2, gate, sorted_pair_idx, expert_offsets, a1, a3, top_k, cfg=c))
    npm, grid = _grid_m(M, E, F, cfg)
    da1, da3, hg = torch.empty_like(a1), torch.empty_like(a3), torch.empty_like(a1)
    dgate_part = torch.empty((_cdiv(F, cfg.BLOCK_N), M), dtype=torch.float32, device=dy.device)
    _moe_dh_bwd_kernel[grid](
        dy, w2, sorted_pair_idx, expert_offsets, gate, a1, a3, da1, da3, hg, dgate_part,
        E, D, F, M, npm, dy.stride(0),
        TOP_K=top_k, EVEN=_even(D, cfg.BLOCK_K, F, cfg.BLOCK_N), E_PAD=_e_pad(E),
        **_tile_args(cfg), **cfg.launch_options(),
    )
    return da1, da3, hg, dgate_part.sum(0)  # fixed-order sum over the F-tiles


def _wgrad(lhs, rhs, rhs2, sorted_pair_idx, expert_offsets, out, out2, top_k, stride_tok, cfg, dw2: bool):
    E, M, N = out.shape
    grid = (E * _cdiv(M, cfg.BLOCK_M) * _cdiv(N, cfg.BLOCK_N),)
    _moe_wgrad_kernel[grid](
        lhs, rhs, rhs2, sorted_pair_idx, expert_offsets, out, out2, M, N, stride_tok,
        TOP_K=top_k, DW2=dw2, EVEN=_even(M, cfg.BLOCK_M, N, cfg.BLOCK_N),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, **cfg.launch_options(),
    )


def moe_dw13_bwd(x, da1, da3, sorted_pair_idx, expert_offsets, top_k: int, dw1, dw3, cfg=None):
    """Fill ``dw1, dw3: [E, D, F]`` with ``x[tok]^T @ da1`` / ``da3`` over each expert's rows."""
    T, D = x.shape
    E, _, F = dw1.shape
    cfg = cfg or get_config("dw13", x, T, D, F, E, top_k, run=lambda c: moe_dw13_bwd(
        x, da1, da3, sorted_pair_idx, expert_offsets, top_k, dw1, dw3, cfg=c))
    _wgrad(x, da1, da3, sorted_pair_idx, expert_offsets, dw1, dw3, top_k, x.stride(0), cfg, False)


def moe_dw2_bwd(dy, hg, sorted_pair_idx, expert_offsets, top_k: int, dw2, cfg=None):
    """Fill ``dw2: [E, F, D]`` with ``hg^T @ dy[tok]`` over each expert's rows, ``hg = gate * h: [M, F]``
    in sorted-row order (from :func:`moe_dh_bwd`)."""
    T, D = dy.shape
    E, F, _ = dw2.shape
    cfg = cfg or get_config("dw2", dy, T, D, F, E, top_k, run=lambda c: moe_dw2_bwd(
        dy, hg, sorted_pair_idx, expert_offsets, top_k, dw2, cfg=c))
    _wgrad(hg, dy, dy, sorted_pair_idx, expert_offsets, dw2, dw2, top_k, dy.stride(0), cfg, True)


def moe_combine(pairs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sum of the k rows of each token, ``pairs: [T * k, D]`` (pair ``t * k + j``) -> ``[T, D]``, slot order
    fixed (deterministic, no atomics). Replaces ``pairs.view(T, k, D).sum(1)``, which took 72 us at
    T=16384 k=2 D=1024 bf16 on the H200 (torch.profiler; 96 MB moved, a third of the copy bandwidth)."""
    M, D = pairs.shape
    T = M // top_k
    if top_k == 1:
        return pairs.view(T, D)
    out = pairs.new_empty((T, D))
    if T == 0:
        return out
    # Memory-bound: 16-byte loads per thread; on the interpreter, few large programs.
    block_t, block_d = (64, _next_pow2(D)) if _interpret() or pairs.device.type != "cuda" else (8, 256)
    _moe_combine_kernel[(_cdiv(T, block_t), _cdiv(D, block_d))](pairs, out, T, D, TOP_K=top_k, BLOCK_T=block_t,
                                                                 BLOCK_D=block_d, num_warps=4)
    return out


def moe_gemm_fwd(x, w1, w3, w2, gate, sorted_pair_idx, expert_offsets, top_k: int, save_act: bool):
    """Expert forward of ``x: [T, D]``: returns ``(out [T, D], a1 [M, F], a3 [M, F])``.

    ``gate: [M]`` fp32 gate weight of each pair. ``a1, a3`` (pre-activations for the backward) are
    empty unless ``save_act``.
    """
    T, D = x.shape
    E, _, F = w1.shape
    M = T * top_k
    h = x.new_empty((M, F))
    a1 = x.new_empty((M, F) if save_act else (0,))
    a3 = x.new_empty((M, F) if save_act else (0,))
    out_pairs = x.new_empty((M, D))
    if M > 0:
        moe_gemm1_fwd(x, w1, w3, sorted_pair_idx, expert_offsets, top_k, h, a1 if save_act else None,
                      a3 if save_act else None)
        moe_scatter_gemm(h, w2, sorted_pair_idx, expert_offsets, out_pairs, b_transposed=False, gate=gate, T=T,
                         top_k=top_k)
    return moe_combine(out_pairs, top_k), a1, a3


def moe_gemm_bwd(dy, x, w1, w3, w2, gate, sorted_pair_idx, expert_offsets, a1, a3, top_k: int):
    """Expert backward: returns ``(dx [T, D], dw1, dw3 [E, D, F], dw2 [E, F, D], dgate [M] fp32)``.

    ``a1, a3: [M, F]`` from the forward, or empty to recompute them here.
    """
    T, D = x.shape
    E, _, F = w1.shape
    M = T * top_k
    dy = dy.contiguous()
    dw1, dw3, dw2 = torch.empty_like(w1), torch.empty_like(w3), torch.empty_like(w2)
    if M == 0:
        for w in (dw1, dw3, dw2):
            w.zero_()
        return torch.zeros_like(x), dw1, dw3, dw2, gate.new_zeros((0,))
    if a1.numel() == 0:  # recompute the pre-activations instead of having kept them
        a1, a3 = x.new_empty((M, F)), x.new_empty((M, F))
        moe_gemm1_fwd(x, w1, w3, sorted_pair_idx, expert_offsets, top_k, x.new_empty((M, F)), a1, a3)
    da1, da3, hg, dgate = moe_dh_bwd(dy, w2, gate, sorted_pair_idx, expert_offsets, a1, a3, top_k)
    dx_pairs = x.new_empty((M, D))
    moe_scatter_gemm(da1, w1, sorted_pair_idx, expert_offsets, dx_pairs, b_transposed=True, a2=da3, b2=w3,
                     kernel="dx", T=T, top_k=top_k)
    dx = moe_combine(dx_pairs, top_k)
    moe_dw13_bwd(x, da1, da3, sorted_pair_idx, expert_offsets, top_k, dw1, dw3)
    moe_dw2_bwd(dy, hg, sorted_pair_idx, expert_offsets, top_k, dw2)
    return dx, dw1, dw3, dw2, dgate
