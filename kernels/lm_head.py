"""Triton trie-constrained LM head: the valid children's logits and the normalizer, never ``[R, V]`` logits.

From hidden states ``h: [R, d]`` and the output embedding ``W: [V, d]`` (optional ``bias: [V]``), for the
children of each row's trie node (``child_start``/``child_tokens``: one level of the trie CSR, see
``docs/TRIE_FORMAT.md``), the launchers return

* ``child_logits: float32 [R, M]`` (M = the level's max fan-out): column ``j`` is the logit of child ``j`` of
  ``nodes[r]`` (child entry ``child_start[nodes[r]] + j``, so the columns run in ascending token order);
  columns ``j >= count[r]`` and every column of a skipped row are NOT written (unspecified): at level 0 most
  rows are dead beams and filling them would cost as much as writing the dense logits;
* ``lse: float32 [R]``: ``logsumexp`` over the whole vocabulary (``normalize_valid=False``) or over the row's
  children (``True``; -inf for a row without children), so ``logp = child_logits - lse[:, None]``.

A row is skipped (no children) when its node is outside ``[0, num_nodes)`` or its beam score is -inf.

Two methods:

* ``gemm`` (any fan-out; the only one that gives the full-vocabulary normalizer): a tiled GEMM whose
  epilogue keeps, per ``[BLOCK_M, BLOCK_N]`` tile, the tile's (max, sum exp) per row for an online
  log-sum-exp and gathers (``tl.gather``) the logits of the row's children whose tokens fall in the tile.
  Which children those are comes from ``_child_tile_bounds_kernel`` (one lower bound per tile boundary per row, computed
  before the GEMM so the GEMM epilogue does no dependent searches). Launches: bounds, GEMM, then a
  ``[R, V / BLOCK_N]`` combine into ``lse`` (full) or a log-sum-exp over the written children (valid).
* ``gather`` (valid normalization, few children per node, levels >= 2 of OneRec): one program per row
  computes only its children's dot products (gathered rows of ``W``) with an online log-sum-exp, so the
  cost follows the number of valid children, not V. One launch.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .launch_config import LaunchConfig, lookup, pow2_bucket, shape_key

OP = "lm_head"


@triton.jit
def _row_children(nodes_ptr, scores_ptr, child_start_ptr, r, num_nodes, HAS_SCORES: tl.constexpr):
    """(start, end) of row r's child range in child_tokens; (0, 0) for a dead row."""
    node = tl.load(nodes_ptr + r)
    live = (node >= 0) & (node < num_nodes)
    if HAS_SCORES:
        live = live & (tl.load(scores_ptr + r) > float("-inf"))
    safe = tl.where(live, node, 0)
    start = tl.load(child_start_ptr + safe)
    end = tl.load(child_start_ptr + safe + 1)
    return tl.where(live, start, 0), tl.where(live, end, 0)


@triton.jit
def _online_lse(m, s, x):
    """Per-lane running (max, sum exp(x - max)) updated with one more value per lane (-inf = none)."""
    m_new = tl.maximum(m, x)
    safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, s * tl.exp(m - safe) + tl.exp(x - safe)


@triton.jit
def _lse_of(m, s):
    """log-sum-exp from per-lane running (max, sum exp(x - max)); -inf when every lane is empty."""
    mt = tl.max(m, 0)
    safe = tl.where(mt == float("-inf"), 0.0, mt)
    st = tl.sum(s * tl.exp(m - safe), 0)
    return tl.where(st > 0, safe + tl.log(tl.where(st > 0, st, 1.0)), float("-inf"))


@triton.jit
def _child_tile_bounds_kernel(
    nodes_ptr, scores_ptr, child_start_ptr, child_tokens_ptr, bounds_ptr,
    num_nodes, stride_b, NT1,
    BLOCK_N: tl.constexpr, NT1_PAD: tl.constexpr, SEARCH_STEPS: tl.constexpr, HAS_SCORES: tl.constexpr,
):
    """bounds[r, t] (t = 0..NT): absolute index of row r's first child with token >= t * BLOCK_N (a lower
    bound per vocabulary tile boundary), so the GEMM tile t holds children bounds[r, t] : bounds[r, t + 1]."""
    r = tl.program_id(0)
    start, end = _row_children(nodes_ptr, scores_ptr, child_start_ptr, r, num_nodes, HAS_SCORES)
    t = tl.arange(0, NT1_PAD)
    q = t * BLOCK_N
    lo = tl.zeros([NT1_PAD], dtype=tl.int32) + start
    hi = tl.zeros([NT1_PAD], dtype=tl.int32) + end
    for _ in tl.static_range(SEARCH_STEPS):  # bit_length(max fan-out) halvings close every range
        active = lo < hi
        mid = (lo + hi) // 2
        tok = tl.load(child_tokens_ptr + mid, mask=active, other=0)
        right = active & (tok < q)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    tl.store(bounds_ptr + r.to(tl.int64) * stride_b + t, lo, mask=t < NT1)


@triton.jit
def _lm_head_gemm_kernel(
    h_ptr, w_ptr, bias_ptr, bounds_ptr, child_tokens_ptr, out_ptr, part_m_ptr, part_s_ptr,
    R, V, D, stride_h, stride_w, stride_b, stride_o, stride_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, FULL: tl.constexpr, IEEE: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of h @ W.T: per-row (max, sum exp) of the tile (FULL) and the row's children
    in it, picked out of the accumulator with ``tl.gather``: all BLOCK_N columns at once (``BLOCK_C`` 0) or
    BLOCK_C at a time."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(R, BLOCK_M)
    num_n = tl.cdiv(V, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the vocabulary together so their W tiles are reused from L2.
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rmask = rm < R
    nmask = rn < V
    a_ptrs = h_ptr + rm[:, None].to(tl.int64) * stride_h + rk[None, :]
    b_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_w + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, D, BLOCK_K):
        kmask = rk + k < D
        a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=nmask[None, :] & kmask[:, None], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(nmask[None, :], acc, float("-inf"))

    if FULL:
        m = tl.max(acc, 1)
        s = tl.sum(tl.exp(acc - m[:, None]), 1)
        p_off = rm.to(tl.int64) * stride_p + pid_n
        tl.store(part_m_ptr + p_off, m, mask=rmask)
        tl.store(part_s_ptr + p_off, s, mask=rmask)

    # Children of each row with tokens in [pid_n * BLOCK_N, (pid_n + 1) * BLOCK_N): entries lo .. hi of child_tokens.
    b_row = bounds_ptr + rm.to(tl.int64) * stride_b
    first = tl.load(b_row, mask=rmask, other=0)
    lo = tl.load(b_row + pid_n, mask=rmask, other=0)
    hi = tl.load(b_row + pid_n + 1, mask=rmask, other=0)
    if BLOCK_C == 0:  # one [BLOCK_M, BLOCK_N] gather: every column of the tile may be a child
        _store_children(acc, lo, hi, first, rm, child_tokens_ptr, out_ptr, stride_o, pid_n * BLOCK_N, 0, BLOCK_N)
    else:  # [BLOCK_M, BLOCK_C] gathers, only as many as the tile's fullest row needs
        for c0 in range(0, tl.max(hi - lo, 0), BLOCK_C):
            _store_children(acc, lo, hi, first, rm, child_tokens_ptr, out_ptr, stride_o, pid_n * BLOCK_N, c0, BLOCK_C)


@triton.jit
def _store_children(acc, lo, hi, first, rm, child_tokens_ptr, out_ptr, stride_o, n0, c0, WIDTH: tl.constexpr):
    """Store the logits of children ``lo + c0 .. lo + c0 + WIDTH`` (clipped to ``hi``) of each row of the
    ``acc: [BLOCK_M, BLOCK_N]`` tile whose first vocabulary column is ``n0``, at their child index in ``out``."""
    pos = lo[:, None] + c0 + tl.arange(0, WIDTH)[None, :]
    ok = pos < hi[:, None]
    tok = tl.load(child_tokens_ptr + pos, mask=ok, other=0)
    val = tl.gather(acc, tl.where(ok, tok - n0, 0), 1)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_o + (pos - first[:, None]), val, mask=ok)


@triton.jit
def _lse_combine_kernel(part_m_ptr, part_s_ptr, lse_ptr, R, NT, stride_p, BR: tl.constexpr, NT_PAD: tl.constexpr):
    """lse[r] from the GEMM tiles' (max, sum exp) partials [R, NT], in tile order."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    t = tl.arange(0, NT_PAD)
    mask = (rows[:, None] < R) & (t[None, :] < NT)
    off = rows[:, None].to(tl.int64) * stride_p + t[None, :]
    pm = tl.load(part_m_ptr + off, mask=mask, other=float("-inf"))
    ps = tl.load(part_s_ptr + off, mask=mask, other=0.0)
    m = tl.max(pm, 1)
    safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(ps * tl.exp(pm - safe[:, None]), 1)  # >= 1 on real rows (the max term is exp(0))
    tl.store(lse_ptr + rows, safe + tl.log(tl.where(s > 0, s, 1.0)), mask=rows < R)


@triton.jit
def _child_lse_kernel(bounds_ptr, out_ptr, lse_ptr, stride_b, stride_o, NT, BLOCK_C: tl.constexpr):
    """lse[r] = logsumexp of row r's written children (valid normalization after the GEMM method)."""
    r = tl.program_id(0)
    count = tl.load(bounds_ptr + r.to(tl.int64) * stride_b + NT) - tl.load(bounds_ptr + r.to(tl.int64) * stride_b)
    c = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], dtype=tl.float32)
    for j0 in range(0, count, BLOCK_C):
        x = tl.load(out_ptr + r.to(tl.int64) * stride_o + j0 + c, mask=j0 + c < count, other=float("-inf"))
        m, s = _online_lse(m, s, x)
    tl.store(lse_ptr + r, _lse_of(m, s))


@triton.jit
def _lm_head_gather_kernel(
    h_ptr, w_ptr, bias_ptr, nodes_ptr, scores_ptr, child_start_ptr, child_tokens_ptr, out_ptr, lse_ptr,
    num_nodes, D, stride_h, stride_w, stride_o,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCORES: tl.constexpr,
):
    """Row r: dot products of h[r] with W[token] for its children only, and their log-sum-exp."""
    r = tl.program_id(0)
    start, end = _row_children(nodes_ptr, scores_ptr, child_start_ptr, r, num_nodes, HAS_SCORES)
    c = tl.arange(0, BLOCK_C)
    rk = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_C], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_C], dtype=tl.float32)
    h_row = h_ptr + r.to(tl.int64) * stride_h
    for j0 in range(start, end, BLOCK_C):
        cmask = j0 + c < end
        tok = tl.load(child_tokens_ptr + j0 + c, mask=cmask, other=0)
        w_rows = w_ptr + tok[:, None].to(tl.int64) * stride_w
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k in range(0, D, BLOCK_K):
            kmask = rk + k < D
            hv = tl.load(h_row + k + rk, mask=kmask, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + k + rk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wv * hv[None, :], 1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + tok, mask=cmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + r.to(tl.int64) * stride_o + (j0 - start) + c, acc, mask=cmask)
        x = tl.where(cmask, acc, float("-inf"))
        m, s = _online_lse(m, s, x)
    tl.store(lse_ptr + r, _lse_of(m, s))


def config_key(method: str, dtype: torch.dtype, rows: int, vocab: int, dim: int) -> str:
    """Key of one method and problem in ``configs/lm_head.json`` (rows bucketed to a power of two: beams x
    users varies per call), e.g. ``"gemm bfloat16 R4096 V8192 d1024"``."""
    return shape_key(method, dtype, R=pow2_bucket(rows), V=vocab, d=dim)


def default_config(method: str, dtype: torch.dtype, interpret: bool) -> LaunchConfig:
    """Heuristic launch config, used where nothing tuned applies.

    ``gemm``: Hopper-class 128x128 tiles with 64-deep K steps for 16-bit inputs (fp32 halves BLOCK_K to stay
    within shared memory), children gathered from the whole tile at once (``BLOCK_C`` 0). Measured on the
    H200 (2026-11-29, BLOCK_C 0): the kernel takes 429 us where the plain GEMM takes 98 us, and 128x256
    tiles take 1347 us, so the gather epilogue, not the main loop, is the cost; ``BLOCK_C`` > 0 narrows it
    to [BLOCK_M, BLOCK_C] per step and skips the steps no row needs (a candidate of the tuning, not yet
    timed on a GPU, hence not the default). ``gather``: 16 children x 256-deep K steps per step.
    The interpreter (CPU tests) runs small tiles; tl.dot needs >= 16 in every dimension.
    """
    if method == "gather":
        return LaunchConfig(BLOCK_C=16, BLOCK_K=32 if interpret else 256, num_warps=4)
    if interpret:
        return LaunchConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, BLOCK_C=0, num_warps=4, num_stages=1)
    return LaunchConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32 if dtype == torch.float32 else 64, GROUP_M=8,
                        BLOCK_C=0, num_warps=8, num_stages=3)


def candidates(method: str, dtype: torch.dtype, interpret: bool) -> list[LaunchConfig]:
    """What tune-on-first-use tries, the default first: variations of one field each, from the corner of
    ``benchmarks/tune_lm_head.py``'s grid that fits Hopper (every tile valid for every shape: the kernels
    mask partial tiles). Interpreter: the default and one other (CPU tests)."""
    default = default_config(method, dtype, interpret)
    change = dataclasses.replace
    if method == "gather":
        if interpret:
            return [default, change(default, BLOCK_C=8)]
        return [default, change(default, BLOCK_C=32), change(default, BLOCK_K=128), change(default, num_warps=8)]
    if interpret:
        return [default, change(default, BLOCK_N=16)]
    return [default, change(default, BLOCK_C=16), change(default, BLOCK_N=256), change(default, num_stages=4),
            change(default, BLOCK_M=64)]


def get_config(method: str, hidden: torch.Tensor, rows: int, vocab: int, dim: int, run=None) -> LaunchConfig:
    """The config of ``method`` for ``hidden``'s device and dtype (``launch_config.lookup``); ``run(config)``
    launches it on the caller's tensors, for tuning on first use."""
    return lookup(OP, config_key(method, hidden.dtype, rows, vocab, dim), hidden.device,
                  lambda: candidates(method, hidden.dtype, hidden.device.type == "cpu"), run)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def lm_head_gemm(hidden, weight, bias, nodes, scores, child_start, child_tokens, max_children: int,
                 normalize_valid: bool, config: LaunchConfig | None = None):
    """``gemm`` method (module docstring): ``hidden [R, d]``, ``weight [V, d]`` (same dtype, last dim contiguous),
    ``bias [V] | None``, ``nodes int32 [R]``, ``scores float32 [R] | None``, one trie level's CSR ->
    ``(child_logits float32 [R, max_children], lse float32 [R])``."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    out = torch.empty(rows, max(max_children, 1), device=dev, dtype=torch.float32)
    lse = torch.empty(rows, device=dev, dtype=torch.float32)
    if rows == 0:
        return out, lse
    cfg = config or get_config("gemm", hidden, rows, vocab, dim, run=lambda c: lm_head_gemm(
        hidden, weight, bias, nodes, scores, child_start, child_tokens, max_children, normalize_valid, c))
    bn = cfg.BLOCK_N
    nt = triton.cdiv(vocab, bn)
    bounds = torch.empty(rows, nt + 1, device=dev, dtype=torch.int32)
    has_scores = scores is not None
    _child_tile_bounds_kernel[(rows,)](
        nodes, scores if has_scores else nodes, child_start, child_tokens, bounds,
        child_start.numel() - 1, bounds.stride(0), nt + 1,
        BLOCK_N=bn, NT1_PAD=_next_pow2(nt + 1), SEARCH_STEPS=max(1, max_children.bit_length()),
        HAS_SCORES=has_scores,
    )
    full = not normalize_valid
    part_m = torch.empty(rows, nt, device=dev, dtype=torch.float32) if full else out
    part_s = torch.empty(rows, nt, device=dev, dtype=torch.float32) if full else out
    grid = (triton.cdiv(rows, cfg.BLOCK_M) * nt,)
    _lm_head_gemm_kernel[grid](
        hidden, weight, bias if bias is not None else weight, bounds, child_tokens, out, part_m, part_s,
        rows, vocab, dim, hidden.stride(0), weight.stride(0), bounds.stride(0), out.stride(0), part_m.stride(0),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=bn, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, BLOCK_C=cfg.BLOCK_C,
        HAS_BIAS=bias is not None, FULL=full, IEEE=hidden.dtype == torch.float32, **cfg.launch_options(),
    )
    if full:
        br = 16
        _lse_combine_kernel[(triton.cdiv(rows, br),)](part_m, part_s, lse, rows, nt, part_m.stride(0),
                                                      BR=br, NT_PAD=_next_pow2(nt))
    else:
        _child_lse_kernel[(rows,)](bounds, out, lse, bounds.stride(0), out.stride(0), nt, BLOCK_C=128)
    return out, lse


def lm_head_gather(hidden, weight, bias, nodes, scores, child_start, child_tokens, max_children: int,
                   config: LaunchConfig | None = None):
    """``gather`` method (valid normalization): same arguments and results as :func:`lm_head_gemm`."""
    rows, dim = hidden.shape
    out = torch.empty(rows, max(max_children, 1), device=hidden.device, dtype=torch.float32)
    lse = torch.empty(rows, device=hidden.device, dtype=torch.float32)
    if rows == 0:
        return out, lse
    cfg = config or get_config("gather", hidden, rows, weight.shape[0], dim, run=lambda c: lm_head_gather(
        hidden, weight, bias, nodes, scores, child_start, child_tokens, max_children, c))
    has_scores = scores is not None
    _lm_head_gather_kernel[(rows,)](
        hidden, weight, bias if bias is not None else weight, nodes, scores if has_scores else nodes,
        child_start, child_tokens, out, lse,
        child_start.numel() - 1, dim, hidden.stride(0), weight.stride(0), out.stride(0),
        BLOCK_C=cfg.BLOCK_C, BLOCK_K=cfg.BLOCK_K, HAS_BIAS=bias is not None, HAS_SCORES=has_scores,
        **cfg.launch_options(),
    )
    return out, lse
