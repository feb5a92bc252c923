"""Triton top-k routing of a mixture-of-experts layer (the fallback of ``csrc/moe_routing``), and the
router GEMM that feeds it.

``_router_logits_kernel``: ``logits = x @ w^T`` in fp32 from bf16/fp16/fp32 ``x: [T, D]`` and ``w: [E, D]``
without an fp32 copy of ``x`` (fp32 inputs use IEEE fp32 dots, not tf32, so selection matches an fp32
reference).

Three launches, no host synchronisation, every reduction in a fixed order (bitwise reproducible):

1. ``_moe_topk_kernel`` (one program per block of ``BLOCK_T`` tokens): fp32 scores, top-k by repeated
   arg-max (ties go to the lower expert id), gate weights, and per block: the expert histogram, the
   sum of the normalised scores, the sum of ``logsumexp^2``, and each pair's rank among the block's
   pairs of the same expert.
2. ``_moe_route_scan_kernel`` (one program): expert counts and offsets from the block histograms, the
   absolute start of every (block, expert) run, and the totals of the score and z-loss partials.
3. ``_moe_route_scatter_kernel`` (one program per block): ``sorted_pair_idx[start + rank] = pair``.

The sorted order is a counting sort of pairs ``p = t * k + j`` by expert, ascending ``p`` within an
expert: within a token the k experts are distinct, so the rank of pair (t, j) is the number of earlier
tokens of the block that picked the same expert.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b): plain Python, as triton.cdiv / next_power_of_2 cost ~10 us a call (3.6)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()

# Elements of one [BLOCK_T, E_PAD] tile in kernel 1 (several such fp32 tiles live at once).
_TILE_ELEMS = 4096


@triton.jit
def _moe_topk_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr, rank_ptr, counts_part_ptr, prob_part_ptr, lse_part_ptr,
    T, E, stride_t,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    SIGMOID: tl.constexpr, NORM_TOPK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    kcols = tl.arange(0, K_PAD)
    rmask = rows < T
    cmask = cols < E
    neg_inf = float("-inf")
    x = tl.load(logits_ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :],
                mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    x = tl.where(cmask[None, :], x, neg_inf)
    m = tl.max(x, 1)
    ex = tl.exp(x - m[:, None])
    z = tl.sum(ex, 1)
    lse = m + tl.log(z)
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))  # 0 in the padding columns (x = -inf)
        q = s / tl.sum(s, 1)[:, None]
        bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
        sel = s + bias[None, :]
    else:
        s = ex / z[:, None]
        q = s
        sel = s
    # NaN scores never win (a NaN would match no maximum and break the distinct-experts invariant).
    sel = tl.where(cmask[None, :] & (sel == sel), sel, neg_inf)

    picked = tl.zeros([BLOCK_T, E_PAD], dtype=tl.int32)
    ids = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(sel, 1)
        cand = (sel == best[:, None]) & (picked == 0) & cmask[None, :]
        idx = tl.min(tl.where(cand, cols[None, :], E_PAD), 1)
        hit = cols[None, :] == idx[:, None]
        wj = tl.sum(tl.where(hit, s, 0.0), 1)
        picked = tl.where(hit, 1, picked)
        sel = tl.where(hit, neg_inf, sel)
        ids = tl.where(kcols[None, :] == j, idx[:, None], ids)
        w = tl.where(kcols[None, :] == j, wj[:, None], w)
    if NORM_TOPK:
        w = w / tl.sum(w, 1)[:, None]
    picked = tl.where(rmask[:, None], picked, 0)
    # Rank of (t, j) among the block's pairs of expert ids[t, j]: earlier tokens that picked it.
    before = tl.cumsum(picked, 0) - picked
    rank = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        idx = tl.sum(tl.where(kcols[None, :] == j, ids, 0), 1)
        rj = tl.sum(tl.where(cols[None, :] == idx[:, None], before, 0), 1)
        rank = tl.where(kcols[None, :] == j, rj[:, None], rank)

    pmask = rmask[:, None] & (kcols[None, :] < TOP_K)
    pair = rows[:, None] * TOP_K + kcols[None, :]
    tl.store(ids_ptr + pair, ids, mask=pmask)
    tl.store(weights_ptr + pair, w, mask=pmask)
    tl.store(rank_ptr + pair, rank, mask=pmask)
    tl.store(counts_part_ptr + pid * E + cols, tl.sum(picked, 0), mask=cmask)
    tl.store(prob_part_ptr + pid * E + cols, tl.sum(tl.where(rmask[:, None], q, 0.0), 0), mask=cmask)
    tl.store(lse_part_ptr + pid, tl.sum(tl.where(rmask, lse * lse, 0.0), 0))


@triton.jit
def _moe_route_scan_kernel(
    counts_part_ptr, prob_part_ptr, lse_part_ptr, start_ptr, counts_ptr, offsets_ptr, prob_sum_ptr, lse_sq_ptr,
    NB, E, E_PAD: tl.constexpr, BLOCK_B: tl.constexpr,
):
    cols = tl.arange(0, E_PAD)
    cmask = cols < E
    brange = tl.arange(0, BLOCK_B)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    psum = tl.zeros([BLOCK_B, E_PAD], dtype=tl.float32)
    lsum = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + brange
        m2 = (b < NB)[:, None] & cmask[None, :]
        counts += tl.sum(tl.load(counts_part_ptr + b[:, None] * E + cols[None, :], mask=m2, other=0), 0)
        psum += tl.load(prob_part_ptr + b[:, None] * E + cols[None, :], mask=m2, other=0.0)
        lsum += tl.load(lse_part_ptr + b, mask=b < NB, other=0.0)
    offsets = tl.cumsum(counts, 0) - counts
    tl.store(counts_ptr + cols, counts, mask=cmask)
    tl.store(offsets_ptr + cols, offsets, mask=cmask)
    tl.store(offsets_ptr + E, tl.sum(counts, 0))
    tl.store(prob_sum_ptr + cols, tl.sum(psum, 0), mask=cmask)
    tl.store(lse_sq_ptr, tl.sum(lsum, 0))
    # Second pass: where each (block, expert) run starts in the sorted order.
    carry = offsets
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + brange
        m2 = (b < NB)[:, None] & cmask[None, :]
        c = tl.load(counts_part_ptr + b[:, None] * E + cols[None, :], mask=m2, other=0)
        tl.store(start_ptr + b[:, None] * E + cols[None, :], carry[None, :] + tl.cumsum(c, 0) - c, mask=m2)
        carry += tl.sum(c, 0)


@triton.jit
def _moe_route_scatter_kernel(
    ids_ptr, rank_ptr, start_ptr, sorted_ptr, T, E,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    kcols = tl.arange(0, K_PAD)
    pmask = (rows < T)[:, None] & (kcols[None, :] < TOP_K)
    pair = rows[:, None] * TOP_K + kcols[None, :]
    e = tl.load(ids_ptr + pair, mask=pmask, other=0)
    r = tl.load(rank_ptr + pair, mask=pmask, other=0)
    start = tl.load(start_ptr + pid * E + e, mask=pmask, other=0)
    tl.store(sorted_ptr + start + r, pair, mask=pmask)


@triton.jit
def _router_logits_kernel(
    x_ptr, w_ptr, out_ptr, T, D, E, stride_x,
    IEEE: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    ks = tl.arange(0, BLOCK_K)
    rmask = rows < T
    cmask = cols < E
    acc = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kmask = (k0 + ks) < D
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + (k0 + ks)[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * D + (k0 + ks)[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * E + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


def router_logits_fwd(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 router logits ``[T, E]`` of ``x: [T, D]`` (row stride any, unit column stride) and contiguous
    ``w: [E, D]`` of the same dtype."""
    T, D = x.shape
    E = w.shape[0]
    out = torch.empty(T, E, dtype=torch.float32, device=x.device)
    if T == 0:
        return out
    e_pad = max(16, next_pow2(E))
    block_t = 64 if e_pad <= 64 else 32
    _router_logits_kernel[(cdiv(T, block_t),)](
        x, w, out, T, D, E, x.stride(0),
        IEEE=x.dtype == torch.float32, E_PAD=e_pad, BLOCK_T=block_t, BLOCK_K=64 if e_pad <= 128 else 32,
        num_warps=4 if e_pad <= 64 else 8, num_stages=3,  # 4 warps spill at E_PAD = 256 (ptxas, sm_90)
    )
    return out


def moe_route_fwd(
    logits: torch.Tensor, expert_bias: torch.Tensor, top_k: int, sigmoid: bool, norm_topk: bool,
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_counts: torch.Tensor, expert_offsets: torch.Tensor,
    sorted_pair_idx: torch.Tensor, prob_sum: torch.Tensor, lse_sq_sum: torch.Tensor,
) -> None:
    """Fill the routing outputs of ``logits: [T, E]`` (T >= 1), same contract as ``_C.moe_route_fwd``.

    ``expert_bias: [E]`` fp32 (read in sigmoid mode only); outputs: ``topk_ids`` int32 ``[T, k]``,
    ``topk_weights`` fp32 ``[T, k]``, ``expert_counts`` int32 ``[E]``, ``expert_offsets`` int32 ``[E+1]``,
    ``sorted_pair_idx`` int32 ``[T*k]``, ``prob_sum`` fp32 ``[E]``, ``lse_sq_sum`` fp32 ``[1]``.
    """
    T, E = logits.shape
    e_pad = max(16, next_pow2(E))
    k_pad = max(2, next_pow2(top_k))
    block_t = max(16, min(128, _TILE_ELEMS // e_pad, next_pow2(T)))
    nb = cdiv(T, block_t)
    # one scratch allocation (host time matters at small T), carved into the five per-block arrays
    ws = torch.empty(T * top_k + 3 * nb * E + nb, dtype=torch.int32, device=logits.device)
    rank, counts_part, start, prob_part, lse_part = ws.split([T * top_k, nb * E, nb * E, nb * E, nb])
    counts_part, start = counts_part.view(nb, E), start.view(nb, E)
    prob_part, lse_part = prob_part.view(torch.float32).view(nb, E), lse_part.view(torch.float32)
    bias = expert_bias if sigmoid else prob_sum  # any fp32 pointer; not read in softmax mode
    _moe_topk_kernel[(nb,)](
        logits, bias, topk_ids, topk_weights, rank, counts_part, prob_part, lse_part,
        T, E, logits.stride(0),
        TOP_K=top_k, K_PAD=k_pad, E_PAD=e_pad, BLOCK_T=block_t, SIGMOID=sigmoid, NORM_TOPK=norm_topk,
        num_warps=8 if e_pad >= 128 else 4,  # 4 warps spill registers at E_PAD = 256 (ptxas, sm_90)
    )
    block_b = max(16, min(_TILE_ELEMS // e_pad, next_pow2(nb)))
    _moe_route_scan_kernel[(1,)](
        counts_part, prob_part, lse_part, start, expert_counts, expert_offsets, prob_sum, lse_sq_sum,
        nb, E, E_PAD=e_pad, BLOCK_B=block_b, num_warps=4,
    )
    _moe_route_scatter_kernel[(nb,)](
        topk_ids, rank, start, sorted_pair_idx, T, E,
        TOP_K=top_k, K_PAD=k_pad, BLOCK_T=block_t, num_warps=4,
    )
