"""Triton kernels of the variable-length cross-attention (flash-attention style) and their launchers.

Queries are dense per row, ``q: [B, Hq, Lq, D]``, or one set shared by every row, ``q: [Hq, Lq, D]``
(``stride_qb == 0``: learned queries are never copied B times). Keys/values of row ``b`` are the
keys ``seq_starts[b] <= t < seq_ends[b]``, key t at ``t * k.stride(-3)`` (head h at
``+ h * k.stride(-2)``): a packed jagged ``[T, Hkv, D]`` gives ``seq_starts = cu_seqlens[:-1]``,
``seq_ends = cu_seqlens[1:]``; a padded ``[B, L, Hkv, D]`` (any layout whose row stride is a
multiple of its key stride, e.g. a ``[B, Hkv, L, D]`` cache transposed) gives
``seq_starts = b * k.stride(0) // k.stride(1)`` and ``seq_ends = seq_starts + length[b]``.
Query head ``h`` reads key/value head ``h // (Hq // Hkv)`` (GQA).

* forward: one program per (row, query head, block of queries); an online softmax over the row's
  keys, whose bounds are read from ``seq_starts``/``seq_ends`` at run time, so grids depend only
  on B, the heads and Lq (no host sync, CUDA-graph capturable). Saves the log-sum-exp.
* backward ``dq``: one program per (block of rows, query head, block of queries), looping over the
  keys of each of its rows. Per-row queries use blocks of one row; shared queries sum a fixed block
  of rows in registers and write an fp32 partial per block (a few dozen blocks, not B), reduced
  afterwards in a fixed order: deterministic, no atomics. It also writes
  ``delta = rowsum(dO * O) - dlse`` for the dk/dv pass.
* backward ``dk, dv``: one program per (row, key/value head, split); the split strides over the
  row's key blocks, and each key block loops over every query of the heads sharing it, so every
  key is written by exactly one program (no atomics).

Rows without keys give zero output, ``lse = -inf`` and zero gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .launch_config import LaunchConfig, lookup, pow2_bucket, shape_key

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # jit code may only read constexpr globals
SUPPORTED_HEAD_DIMS = (32, 64, 128)
KERNELS = ("fwd", "bwd_dq", "bwd_dkdv", "bwd_fused")
OP = "varlen_attention"


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_keys(SeqStarts, SeqEnds, b):
    """Row b's first key (int64, for address arithmetic) and its number of keys."""
    start = tl.load(SeqStarts + b).to(tl.int64)
    return start, (tl.load(SeqEnds + b).to(tl.int64) - start).to(tl.int32)


@triton.jit
def _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, mask_n, MASK: tl.constexpr):
    """One key block of the online softmax; scores are in log2 units (scaled by scale * log2 e,
    applied after the max so that scale and shift fuse into one FMA; needs qk_scale > 0)."""
    qk = tl.dot(q, tl.trans(k))
    if MASK:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)  # m_i = -inf on the first block: alpha = 0
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _varlen_attn_fwd_kernel(
    Q, K, V, Out, Lse, SeqStarts, SeqEnds,
    stride_qb, stride_qh, stride_qm,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    num_heads, num_m_blocks, group, seqlen_q, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    # Programs of one row are adjacent (m-blocks of a head innermost) so its keys stay in L2.
    b = pid // (num_heads * num_m_blocks)
    rem = pid % (num_heads * num_m_blocks)
    h = rem // num_m_blocks
    mb = rem % num_m_blocks
    kvh = h // group
    b64 = b.to(tl.int64)
    start, seqlen_k = _row_keys(SeqStarts, SeqEnds, b)

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < seqlen_q
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    k_ptrs = K + start * stride_kt + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + start * stride_vt + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Full key blocks without masks, then the row's ragged tail.
    n_full = (seqlen_k // BLOCK_N) * BLOCK_N
    for n in range(0, n_full, BLOCK_N):
        k = tl.load(k_ptrs + n * stride_kt)
        v = tl.load(v_ptrs + n * stride_vt)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, offs_n, MASK=False)
    if n_full < seqlen_k:
        mask_n = n_full + offs_n < seqlen_k
        k = tl.load(k_ptrs + n_full * stride_kt, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptrs + n_full * stride_vt, mask=mask_n[:, None], other=0.0)
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, mask_n, MASK=True)

    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc * (1.0 / l_safe)[:, None]
    # Natural-log lse; -inf (log 0) for a row without keys.
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) / _LOG2E, float("-inf"))
    tl.store(Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(Lse + b64 * stride_lb + h * stride_lh + offs_m, lse, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# backward: dq (and delta)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _query_tile(
    b64, h, offs_m, mask_m, Q, Out, dOut, Lse, dLse, stride_qb, stride_qh, stride_qm, stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """What the backward needs of the queries ``offs_m`` of (row b, head h): ``q, dO [BLOCK_M, HEAD_DIM]``,
    ``delta = rowsum(dO * O) - dlse`` (the gradient reaching lse directly; dS = P * (dP - delta)),
    ``lse * log2 e`` (+inf past Lq, so P = 0 there) and the offsets of the lse entries."""
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    do = tl.load(dOut + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=mask_m[:, None], other=0.0)
    o = tl.load(Out + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse_off = b64 * stride_lb + h * stride_lh + offs_m
    if HAS_DLSE:
        delta -= tl.load(dLse + lse_off, mask=mask_m, other=0.0)
    lse2 = tl.load(Lse + lse_off, mask=mask_m, other=float("inf")) * _LOG2E
    return q, do, delta, lse2, lse_off


@triton.jit
def _dq_row(
    dq, b, h, kvh, offs_m, mask_m, Q, K, V, Out, dOut, Lse, dLse, Delta, SeqStarts, SeqEnds,
    stride_qb, stride_qh, stride_qm, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, qk_scale,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Adds row b's term to ``dq`` (fp32 ``[BLOCK_M, HEAD_DIM]``) and writes row b's delta."""
    b64 = tl.cast(b, tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    start, seqlen_k = _row_keys(SeqStarts, SeqEnds, b)
    q, do, delta, lse2, lse_off = _query_tile(
        b64, h, offs_m, mask_m, Q, Out, dOut, Lse, dLse, stride_qb, stride_qh, stride_qm, stride_ob, stride_oh,
        stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, HAS_DLSE, HEAD_DIM)
    tl.store(Delta + lse_off, delta, mask=mask_m)

    k_ptrs = K + start * stride_kt + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + start * stride_vt + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :]
    # One masked loop (ptxas: fewer registers than an unmasked loop plus a masked tail, as in the forward).
    for n in range(0, seqlen_k, BLOCK_N):
        mask_n = n + offs_n < seqlen_k
        k = tl.load(k_ptrs + n * stride_kt, mask=mask_n[:, None], other=0.0)
        v = tl.load(v_ptrs + n * stride_vt, mask=mask_n[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(mask_n[None, :], tl.math.exp2(qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _varlen_attn_bwd_dq_kernel(
    Q, K, V, Out, dOut, Lse, dLse, Delta, dQ, SeqStarts, SeqEnds,
    stride_qb, stride_qh, stride_qm,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqm,
    num_heads, num_m_blocks, group, seqlen_q, batch, rows_per_program, sm_scale, qk_scale,
    SHARED_Q: tl.constexpr, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid // (num_heads * num_m_blocks)  # the row, or for shared queries the block of rows
    rem = pid % (num_heads * num_m_blocks)
    h = rem // num_m_blocks
    mb = rem % num_m_blocks
    kvh = h // group
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < seqlen_q

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Per-row queries get a loop-free body: the loop over rows costs registers (spills).
    if SHARED_Q:
        b_first = c * rows_per_program
        for b in range(b_first, tl.minimum(b_first + rows_per_program, batch)):
            dq = _dq_row(dq, b, h, kvh, offs_m, mask_m, Q, K, V, Out, dOut, Lse, dLse, Delta, SeqStarts, SeqEnds,
                         stride_qb, stride_qh, stride_qm, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
                         qk_scale, HAS_DLSE, HEAD_DIM, BLOCK_N)
    else:
        dq = _dq_row(dq, c, h, kvh, offs_m, mask_m, Q, K, V, Out, dOut, Lse, dLse, Delta, SeqStarts, SeqEnds,
                     stride_qb, stride_qh, stride_qm, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh,
                     qk_scale, HAS_DLSE, HEAD_DIM, BLOCK_N)
    dq = dq * sm_scale
    tl.store(dQ + c.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(dQ.dtype.element_ty), mask=mask_m[:, None])


# ----------------------------------------------------------------------------------------------
# backward: dk, dv
# ----------------------------------------------------------------------------------------------


@triton.jit
def _varlen_attn_bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, SeqStarts, SeqEnds,
    stride_qb, stride_qh, stride_qm,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_kv_heads, group, seqlen_q, num_splits, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // (num_kv_heads * num_splits)
    rem = pid % (num_kv_heads * num_splits)
    kvh = rem // num_splits
    split = rem % num_splits
    b64 = b.to(tl.int64)
    start, seqlen_k = _row_keys(SeqStarts, SeqEnds, b)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mb = tl.arange(0, BLOCK_M)

    for nb in range(split, tl.cdiv(seqlen_k, BLOCK_N), num_splits):
        rows = start + nb * BLOCK_N + offs_n
        mask_n = nb * BLOCK_N + offs_n < seqlen_k
        k = tl.load(K + rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(V + rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        # Rows of dk/dv past the row's end see k = v = 0 and are never stored; each key row of
        # dk/dv depends only on its own row of p, so they need no masking.
        for g in range(group):
            h = kvh * group + g
            for m0 in range(0, seqlen_q, BLOCK_M):
                offs_m = m0 + offs_mb
                mask_m = offs_m < seqlen_q
                q = tl.load(Q + b64 * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                            mask=mask_m[:, None], other=0.0)
                do = tl.load(dOut + b64 * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                             + offs_d[None, :], mask=mask_m[:, None], other=0.0)
                lse_off = b64 * stride_lb + h * stride_lh + offs_m
                lse2 = tl.load(Lse + lse_off, mask=mask_m, other=float("inf")) * _LOG2E  # p = 0 past Lq
                delta = tl.load(Delta + lse_off, mask=mask_m, other=0.0)
                pT = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])  # [BLOCK_N, BLOCK_M]
                dv += tl.dot(pT.to(do.dtype), do)
                dpT = tl.dot(v, tl.trans(do))
                dsT = pT * (dpT - delta[None, :])
                dk += tl.dot(dsT.to(q.dtype), q)
        tl.store(dK + rows[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :],
                 (dk * sm_scale).to(dK.dtype.element_ty), mask=mask_n[:, None])
        tl.store(dV + rows[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :],
                 dv.to(dV.dtype.element_ty), mask=mask_n[:, None])


# ----------------------------------------------------------------------------------------------
# backward, one pass: dq, dk, dv (per-row queries, Hq == Hkv, Lq <= 128)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _varlen_attn_bwd_fused_kernel(
    Q, K, V, Out, dOut, Lse, dLse, dQ, dK, dV, SeqStarts, SeqEnds,
    stride_qb, stride_qh, stride_qm,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_heads, seqlen_q, sm_scale, qk_scale,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (row, head) holds all the row's queries (BLOCK_M >= Lq), so it owns dq of its
    # queries and dk/dv of its keys outright: one sweep over the keys computes all three (5 dots per
    # key block instead of the two-kernel path's 7), with no atomics and no partial sums.
    pid = tl.program_id(0)
    b = pid // num_heads
    h = pid % num_heads
    b64 = b.to(tl.int64)
    start, seqlen_k = _row_keys(SeqStarts, SeqEnds, b)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < seqlen_q
    q, do, delta, lse2, _ = _query_tile(
        b64, h, offs_m, mask_m, Q, Out, dOut, Lse, dLse, stride_qb, stride_qh, stride_qm, stride_ob, stride_oh,
        stride_om, stride_dob, stride_doh, stride_dom, stride_lb, stride_lh, HAS_DLSE, HEAD_DIM)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n in range(0, seqlen_k, BLOCK_N):
        rows = start + n + offs_n
        mask_n = n + offs_n < seqlen_k
        k = tl.load(K + rows[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        v = tl.load(V + rows[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=mask_n[:, None], other=0.0)
        # Keys past the row's end load as zeros, so their score is 0 and exp2(0 - lse2) overflows to inf when
        # lse < -88.7 (fp32); inf * 0 in the dq dot would then be NaN. Their P is set to 0 (a select, no
        # extra pass); their dk/dv rows are not stored.
        pT = tl.where(mask_n[:, None], tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :]),
                      0.0)  # [BLOCK_N, BLOCK_M]
        dv = tl.dot(pT.to(do.dtype), do)
        dsT = pT * (tl.dot(v, tl.trans(do)) - delta[None, :])
        ds = dsT.to(q.dtype)
        dk = tl.dot(ds, q)
        dq += tl.dot(tl.trans(ds), k)
        tl.store(dK + rows[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :],
                 (dk * sm_scale).to(dK.dtype.element_ty), mask=mask_n[:, None])
        tl.store(dV + rows[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :],
                 dv.to(dV.dtype.element_ty), mask=mask_n[:, None])
    tl.store(dQ + b64 * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(dQ.dtype.element_ty), mask=mask_m[:, None])


# ----------------------------------------------------------------------------------------------
# launch configs
# ----------------------------------------------------------------------------------------------


def lq_bucket(seqlen_q: int) -> int:
    """The query-length bucket configs are keyed by: the next power of two, between 16 and 128."""
    return pow2_bucket(seqlen_q, 16, 128)


def lk_bucket(keys_per_row: int) -> int:
    """The key-length bucket configs are keyed by: the next power of two of the keys per row, between
    128 and 4096. Short and long rows want different tiles: on the H200 the d128 forward config tuned on
    rows of 512-2048 keys (3 stages) ran B=1024 of those in 1.95 ms against 2.40 ms with the default
    (2 stages), but the 405-key beam decode in 0.277 ms against 0.184 ms."""
    return pow2_bucket(keys_per_row, 128, 4096)


def keys_per_row(k: torch.Tensor, batch: int) -> int:
    """Mean keys per row as the shapes give them (no sync): ``total / B`` for jagged ``k: [total, Hkv, D]``,
    the padded length for ``[B, L, Hkv, D]``."""
    return k.shape[:-2].numel() // max(1, batch)


def config_key(kernel: str, head_dim: int, seqlen_q: int, keys: int, dtype: torch.dtype) -> str:
    """Shape key of ``kernels/configs/varlen_attention.json``, e.g. ``"fwd bfloat16 d64 lq128 lk2048"``
    (``keys``: keys per row, see :func:`keys_per_row`). fp16 is keyed as bfloat16: their tiles are the same
    size, so either's tuned config serves the other."""
    return shape_key(kernel, torch.bfloat16 if dtype == torch.float16 else dtype, d=head_dim, lq=lq_bucket(seqlen_q),
                     lk=lk_bucket(keys))


def default_config(kernel: str, head_dim: int, seqlen_q: int, device_type: str, elem_bytes: int = 2
                   ) -> LaunchConfig:
    """Untuned heuristic, used where nothing tuned applies. Chosen offline for sm_90a from ptxas reports
    (compiled with the JIT's 16-divisibility specialization; at Lq >= 64 every choice uses wgmma,
    pipelines its loads with cp.async and spills nothing): forward and dq 128 queries (Lq permitting) x
    64 keys (x 32 for dq at head_dim 128) with 8 warps; dk/dv 64 keys x 64 queries with 8 warps (128 keys
    x 32 queries at head_dim 128: the key tile is the dots' M, which wgmma needs >= 64).
    On CPU (interpreter) every program and every op costs a fixed ~1 ms whatever the tile size, so
    tiles are as large as the tests' shapes allow while still exercising the key-block loops.
    fp32 (``elem_bytes`` 4, not a speed path: its dots run in TF32) at head_dim 128 takes 32-key tiles
    and one stage: the 16-bit tiles asked for 320 KiB of shared memory on the H200 (227 KiB there)."""
    bucket = lq_bucket(seqlen_q)
    if device_type != "cuda":
        return LaunchConfig(BLOCK_M=bucket, BLOCK_N=32, num_warps=1, num_stages=1)
    small = head_dim <= 64
    if elem_bytes > 2 and not small:
        if kernel == "bwd_dkdv":
            return LaunchConfig(BLOCK_M=min(bucket, 32), BLOCK_N=64, num_warps=8, num_stages=1)
        return LaunchConfig(BLOCK_M=min(bucket, 64), BLOCK_N=32, num_warps=4, num_stages=1)
    if kernel == "fwd":
        return LaunchConfig(BLOCK_M=bucket, BLOCK_N=64, num_warps=8 if bucket >= 128 else 4,
                            num_stages=3 if small else 2)
    if kernel == "bwd_fused":  # BLOCK_M holds every query of the row (fused_bwd_applies)
        # H200, B=512 Lq=128 bf16 (tune_varlen_attention): 128-key tiles 1.57 ms vs 2.42 ms with 64 at
        # head_dim 64; at 128 the fp32 dq tile takes the registers and 32-key tiles win (3.54 ms).
        # fp32 (head_dim <= 64 only) keeps 64 keys, 2 stages: its q and dO tiles take 64 KiB of shared memory.
        block_n = 128 if small and elem_bytes <= 2 else 64 if small else 32
        return LaunchConfig(BLOCK_M=bucket, BLOCK_N=block_n, num_warps=8 if bucket >= 64 else 4,
                            num_stages=3 if elem_bytes <= 2 else 2)
    if kernel == "bwd_dq":
        return LaunchConfig(BLOCK_M=bucket, BLOCK_N=64 if small else 32, num_warps=8 if bucket >= 64 else 4,
                            num_stages=2)
    if small:
        return LaunchConfig(BLOCK_M=min(bucket, 64), BLOCK_N=64, num_warps=8, num_stages=2)
    return LaunchConfig(BLOCK_M=min(bucket, 32), BLOCK_N=128, num_warps=8, num_stages=2)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on first use besides the default, BLOCK_M capped at the Lq
# bucket (None: the bucket): the configs the H200 tuning chose (kernels/configs/varlen_attention.json) and
# their neighbours in benchmarks/tune_varlen_attention.py's grid.
_GPU_TILES = {
    "fwd": ((None, 64, 8, 3), (None, 128, 8, 2), (None, 32, 4, 2), (64, 64, 4, 2)),
    "bwd_dq": ((None, 64, 8, 3), (None, 32, 8, 3), (64, 64, 4, 2)),
    "bwd_dkdv": ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2)),
    "bwd_fused": ((None, 128, 8, 3), (None, 64, 8, 3), (None, 32, 8, 3), (None, 64, 4, 2)),
}


def candidates(kernel: str, head_dim: int, seqlen_q: int, device_type: str, elem_bytes: int = 2
               ) -> list[LaunchConfig]:
    """What tune-on-first-use tries, the default first. Valid for every shape of the Lq bucket: BLOCK_M never
    exceeds the bucket (the one-pass backward takes the bucket whatever BLOCK_M says); a tile that does not
    fit the GPU (fp32 at head_dim 128) fails to compile and is skipped. Interpreter: the default and
    16-key tiles (CPU tests)."""
    default = default_config(kernel, head_dim, seqlen_q, device_type, elem_bytes)
    if device_type != "cuda":
        return [default, dataclasses.replace(default, BLOCK_N=16)]
    bucket = lq_bucket(seqlen_q)
    return [default, *(LaunchConfig(BLOCK_M=min(m or bucket, bucket), BLOCK_N=n, num_warps=w, num_stages=s)
                       for m, n, w, s in _GPU_TILES[kernel])]


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def get_config(kernel: str, head_dim: int, seqlen_q: int, keys: int, dtype: torch.dtype, device: torch.device,
               run=None) -> LaunchConfig:
    """The config of ``kernel`` for this shape (``keys``: keys per row) on ``device``
    (``launch_config.lookup``); ``run(config)`` launches it on the caller's tensors, for tuning on first use."""
    return lookup(OP, config_key(kernel, head_dim, seqlen_q, keys, dtype), device,
                  lambda: candidates(kernel, head_dim, seqlen_q, device.type, dtype.itemsize), run)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _qb(q: torch.Tensor) -> int:
    """Row stride of the queries: 0 for queries shared by every row."""
    return q.stride(0) if q.dim() == 4 else 0


def varlen_attention_fwd(q, k, v, seq_starts, seq_ends, out, lse, softmax_scale: float,
                         config: LaunchConfig | None = None):
    """Forward into ``out: [B, Hq, Lq, D]`` (q's dtype) and ``lse: [B, Hq, Lq]`` (fp32, natural log).

    ``q: [B, Hq, Lq, D]`` or shared ``[Hq, Lq, D]``; ``k, v: [T, Hkv, D]`` or ``[B, L, Hkv, D]`` (see
    the module docstring); ``seq_starts, seq_ends: int32 [B]``. Every tensor's last dimension must be
    contiguous; ``lse`` contiguous.
    """
    batch, num_heads, seqlen_q, head_dim = out.shape
    if batch == 0 or seqlen_q == 0:
        return
    cfg = config or get_config("fwd", head_dim, seqlen_q, keys_per_row(k, batch), q.dtype, q.device,
                               run=lambda c: varlen_attention_fwd(q, k, v, seq_starts, seq_ends, out, lse,
                                                                  softmax_scale, c))
    num_m_blocks = triton.cdiv(seqlen_q, cfg.BLOCK_M)
    grid = (batch * num_heads * num_m_blocks,)
    _varlen_attn_fwd_kernel[grid](
        q, k, v, out, lse, seq_starts, seq_ends,
        _qb(q), q.stride(-3), q.stride(-2),
        k.stride(-3), k.stride(-2), v.stride(-3), v.stride(-2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        num_heads, num_m_blocks, num_heads // k.shape[-2], seqlen_q, softmax_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, **cfg.launch_options(),
    )


def dq_row_blocks(batch: int, num_heads: int, num_m_blocks: int, shared: bool, device: torch.device) -> int:
    """How many blocks of rows the dq pass uses: one per row for per-row queries; for shared queries
    enough blocks to fill the GPU about four times over, each summing its rows in a fixed order."""
    if not shared:
        return batch
    want = triton.cdiv(4 * _num_sms(device), max(1, num_heads * num_m_blocks))
    return max(1, min(batch, want))


def fused_bwd_applies(shared: bool, num_heads: int, num_kv_heads: int, seqlen_q: int, head_dim: int,
                      elem_bytes: int) -> bool:
    """Whether the one-pass backward (``_varlen_attn_bwd_fused_kernel``) handles this shape: per-row
    queries, no GQA (one program owns each key's dk/dv), Lq <= 128 (all of a row's queries in one
    tile). fp32 at head_dim 128 stays on the two-kernel path: its q and dO tiles alone take 128 KiB
    of shared memory."""
    return (not shared and num_heads == num_kv_heads and seqlen_q <= 128
            and (elem_bytes <= 2 or head_dim <= 64))


class _Bwd(NamedTuple):
    """The arguments of :func:`varlen_attention_bwd`, handed to each of its kernels' launchers."""

    dout: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    dlse: torch.Tensor | None
    seq_starts: torch.Tensor
    seq_ends: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    delta: torch.Tensor
    softmax_scale: float


def varlen_attention_bwd(dout, q, k, v, out, lse, dlse, seq_starts, seq_ends, dq, dk, dv, delta,
                         softmax_scale: float, configs: dict[str, LaunchConfig] | None = None,
                         fused: bool | None = None):
    """Backward into ``dq`` (q's shape; for shared queries an fp32 ``[C, Hq, Lq, D]`` of per-row-block
    partials, C from :func:`dq_row_blocks`, summed by the caller), ``dk, dv`` (k's shape and strides)
    and the scratch ``delta: [B, Hq, Lq]`` fp32 (layout of ``lse``). ``dlse`` (layout of ``lse``) or None.

    ``fused``: the one-pass kernel (where :func:`fused_bwd_applies`; the default there) or the two
    kernels (dq, then dk/dv). ``configs``: kernel name -> config, instead of the lookup (the tuner's).
    Keys outside every row are not written: callers zero ``dk``/``dv`` when such keys exist.
    """
    batch, num_heads, seqlen_q, head_dim = dout.shape
    if batch == 0 or seqlen_q == 0:
        return
    shared = q.dim() == 3
    configs = configs or {}
    applies = fused_bwd_applies(shared, num_heads, k.shape[-2], seqlen_q, head_dim, q.element_size())
    if fused and not applies:
        raise ValueError(f"fused=True needs per-row queries, num_heads == num_kv_heads, seqlen_q <= 128 and 16-bit "
                         f"or head_dim <= 64; got shared={shared}, heads {num_heads}/{k.shape[-2]}, "
                         f"seqlen_q={seqlen_q}, head_dim={head_dim}, {q.dtype}")
    a = _Bwd(dout, q, k, v, out, lse, dlse, seq_starts, seq_ends, dq, dk, dv, delta, softmax_scale)
    if applies and fused is not False:
        _bwd_fused(a, configs.get("bwd_fused"))
    else:
        _bwd_dq(a, configs.get("bwd_dq"))  # writes delta, which the dk/dv pass reads
        _bwd_dkdv(a, configs.get("bwd_dkdv"))


def _bwd_config(kernel: str, a: _Bwd, cfg: LaunchConfig | None, launch) -> LaunchConfig:
    """``cfg``, else the lookup's config of ``kernel`` (tuned on first use by rerunning ``launch(a, config)``:
    each of these kernels writes its outputs without reading them)."""
    batch, _, seqlen_q, head_dim = a.dout.shape
    return cfg or get_config(kernel, head_dim, seqlen_q, keys_per_row(a.k, batch), a.q.dtype, a.q.device,
                             run=lambda c: launch(a, c))


def _bwd_fused(a: _Bwd, cfg: LaunchConfig | None):
    """One-pass backward: dq, dk, dv of per-row queries (:func:`fused_bwd_applies`)."""
    cfg = _bwd_config("bwd_fused", a, cfg, _bwd_fused)
    dout, q, k, v, out, lse, dlse, dq, dk, dv = a.dout, a.q, a.k, a.v, a.out, a.lse, a.dlse, a.dq, a.dk, a.dv
    batch, num_heads, seqlen_q, head_dim = dout.shape
    _varlen_attn_bwd_fused_kernel[(batch * num_heads,)](
        q, k, v, out, dout, lse, dlse if dlse is not None else lse, dq, dk, dv, a.seq_starts, a.seq_ends,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(-3), k.stride(-2), v.stride(-3), v.stride(-2),
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        dk.stride(-3), dk.stride(-2), dv.stride(-3), dv.stride(-2),
        num_heads, seqlen_q, a.softmax_scale, a.softmax_scale * LOG2E,
        HAS_DLSE=dlse is not None, HEAD_DIM=head_dim, BLOCK_M=lq_bucket(seqlen_q), BLOCK_N=cfg.BLOCK_N,
        **cfg.launch_options(),
    )


def _bwd_dq(a: _Bwd, cfg: LaunchConfig | None):
    """dq (per row, or per row block for shared queries) and delta, the two-kernel path's first pass."""
    cfg = _bwd_config("bwd_dq", a, cfg, _bwd_dq)
    dout, q, k, v, out, lse, dlse, dq = a.dout, a.q, a.k, a.v, a.out, a.lse, a.dlse, a.dq
    batch, num_heads, seqlen_q, head_dim = dout.shape
    shared = q.dim() == 3
    num_m_blocks = triton.cdiv(seqlen_q, cfg.BLOCK_M)
    row_blocks = dq.shape[0] if shared else batch
    rows_per_program = triton.cdiv(batch, row_blocks)
    _varlen_attn_bwd_dq_kernel[(row_blocks * num_heads * num_m_blocks,)](
        q, k, v, out, dout, lse, dlse if dlse is not None else lse, a.delta, dq, a.seq_starts, a.seq_ends,
        _qb(q), q.stride(-3), q.stride(-2),
        k.stride(-3), k.stride(-2), v.stride(-3), v.stride(-2),
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        num_heads, num_m_blocks, num_heads // k.shape[-2], seqlen_q, batch, rows_per_program, a.softmax_scale,
        a.softmax_scale * LOG2E,
        SHARED_Q=shared, HAS_DLSE=dlse is not None, HEAD_DIM=head_dim, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        **cfg.launch_options(),
    )


def _bwd_dkdv(a: _Bwd, cfg: LaunchConfig | None):
    """dk, dv per (row, key/value head, split of the row's key blocks), the two-kernel path's second pass."""
    cfg = _bwd_config("bwd_dkdv", a, cfg, _bwd_dkdv)
    dout, q, k, v, dk, dv = a.dout, a.q, a.k, a.v, a.dk, a.dv
    batch, _, seqlen_q, head_dim = dout.shape
    num_kv_heads = k.shape[-2]
    # Split each row's key blocks over programs: about 4 blocks per program on an average row
    # (total_k is a shape, so no sync), more splits when rows x heads would not fill the GPU.
    # Splits past a short row's end exit at once.
    fill = triton.cdiv(4 * _num_sms(q.device), batch * num_kv_heads)
    num_splits = max(1, fill, triton.cdiv(k.shape[:-2].numel(), batch * cfg.BLOCK_N * 4))
    _varlen_attn_bwd_dkdv_kernel[(batch * num_kv_heads * num_splits,)](
        q, k, v, dout, a.lse, a.delta, dk, dv, a.seq_starts, a.seq_ends,
        _qb(q), q.stride(-3), q.stride(-2),
        k.stride(-3), k.stride(-2), v.stride(-3), v.stride(-2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        a.lse.stride(0), a.lse.stride(1),
        dk.stride(-3), dk.stride(-2), dv.stride(-3), dv.stride(-2),
        num_kv_heads, dout.shape[1] // num_kv_heads, seqlen_q, num_splits, a.softmax_scale, a.softmax_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, **cfg.launch_options(),
    )
