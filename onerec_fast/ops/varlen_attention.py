"""Variable-length cross-attention: many queries per row over that row's own keys/values.

The QFormer of OneRec's lifelong pathway (128 learned queries over ~2000 history items of
differing length per user) and beam-search decoding (128 beams of a user over that user's encoder
states) are both this op. Padding every row to the longest wastes most of the work, so keys and
values are packed (jagged): ``k, v: [total_k, Hkv, D]`` with ``cu_seqlens_k: [B+1]`` offsets.

Public functions (each returns ``out: [B, Hq, Lq, D]``, plus ``lse: [B, Hq, Lq]`` with
``return_lse=True``):

* :func:`varlen_cross_attention` -- jagged keys/values;
* :func:`padded_cross_attention` -- keys/values ``[B, Lk, Hkv, D]`` plus per-row lengths (no packing);
* :func:`beam_shared_cross_attention` -- decoding: queries ``[B, beams, Hq, D]`` over the row's own
  keys/values (jagged or padded), which are never replicated per beam.

Queries are ``[B, Hq, Lq, D]``, or ``[Hq, Lq, D]`` shared by every row (learned queries: no B-fold
copy, and their gradient is the sum over rows). GQA: query head ``h`` uses key/value head
``h // (Hq // Hkv)``. A row without keys gives zeros, ``lse = -inf`` and zero gradients.

Backends: ``triton`` (``kernels/varlen_attention.py``: flash-attention forward saving the lse, and a
deterministic backward; head_dim 32/64/128, fp32/fp16/bf16) through the custom ops
``onerec_fast::varlen_attention_fwd``/``_bwd``; ``reference`` (plain PyTorch on padded tensors,
:func:`padded_cross_attention_ref`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from onerec_fast.backends import resolve_backend, triton_unless_unsupported
from onerec_fast.checks import FLOAT_DTYPES, check_cu_seqlens, check_dim, check_same, check_tensor

__all__ = [
    "varlen_cross_attention",
    "padded_cross_attention",
    "beam_shared_cross_attention",
    "varlen_cross_attention_ref",
    "padded_cross_attention_ref",
    "runs_fused",
]

_OP = "varlen_attention"
_IMPLEMENTED = ("triton", "reference")
_DTYPES = FLOAT_DTYPES + (torch.float64,)  # float64 only through the reference (the tests' oracle)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# reference
# ----------------------------------------------------------------------------------------------


def padded_cross_attention_ref(q: Tensor, k: Tensor, v: Tensor, seqlens_k: Tensor | None = None,
                               softmax_scale: float | None = None,
                               key_starts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Plain PyTorch cross-attention over padded keys/values, computed in float32 (float64 stays).

    ``q: [B, Hq, Lq, D]`` or shared ``[Hq, Lq, D]``; ``k, v: [B, L, Hkv, D]``; ``seqlens_k: [B]``
    (row b attends to ``k[b, s:s + seqlens_k[b]]`` with ``s = key_starts[b]``, 0 without ``key_starts``;
    None: all L). Returns ``out: [B, Hq, Lq, D]`` in q's dtype and ``lse: [B, Hq, Lq]`` (float32, float64
    for float64 input; -inf for rows without keys).
    """
    batch, length, num_kv_heads, head_dim = k.shape
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
    group = q.shape[-3] // num_kv_heads
    kf, vf = kf.repeat_interleave(group, dim=2), vf.repeat_interleave(group, dim=2)  # [B, L, Hq, D]
    if seqlens_k is None:
        seqlens_k = torch.full((batch,), length, device=k.device)
    qf = qf.expand(batch, *q.shape[-3:])  # shared queries: a view, and autograd sums their gradient over rows
    scores = torch.einsum("bhmd,bnhd->bhmn", qf, kf) * scale  # [B, Hq, Lq, L]
    slot = torch.arange(length, device=k.device)
    start = torch.zeros_like(seqlens_k) if key_starts is None else key_starts
    valid = (slot >= start[:, None]) & (slot < (start + seqlens_k)[:, None])  # [B, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    has_keys = (seqlens_k > 0)[:, None, None, None]
    # Softmax written out so that rows without keys give exact zeros and finite (zero) gradients:
    # the shift m is a constant (out and lse do not depend on it), 0 where a row has no keys.
    m = torch.where(has_keys, scores.amax(-1, keepdim=True).detach(), 0.0)
    e = torch.exp(scores - m)
    denom = torch.where(has_keys, e.sum(-1, keepdim=True), 1.0)
    out = torch.einsum("bhmn,bnhd->bhmd", e / denom, vf)
    lse = torch.where(has_keys, m + torch.log(denom), float("-inf")).squeeze(-1)
    return out.to(q.dtype), lse


def varlen_cross_attention_ref(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_k: Tensor,
                               softmax_scale: float | None = None,
                               max_seqlen_k: int | None = None) -> tuple[Tensor, Tensor]:
    """Plain PyTorch reference of :func:`varlen_cross_attention`: pads the jagged keys/values to
    ``[B, max_seqlen_k, Hkv, D]`` and calls :func:`padded_cross_attention_ref`.

    ``k, v: [total_k, Hkv, D]``, ``cu_seqlens_k: [B+1]``. ``max_seqlen_k`` (an upper bound on the
    longest row) avoids reading the lengths on the host. Without it, eager mode reads the longest
    length; under ``torch.compile`` the bound is ``total_k`` (padding to ``[B, total_k, Hkv, D]``).
    """
    batch, total = cu_seqlens_k.shape[0] - 1, k.shape[0]
    cu = cu_seqlens_k.long()
    lengths = cu[1:] - cu[:-1]
    if max_seqlen_k is None:
        # Traced, int(lengths.max()) is a data-dependent size: Inductor cannot lower the padded
        # tensors' strides (GuardOnDataDependentSymNode in the backward), so use the static bound.
        if torch.compiler.is_compiling():
            max_seqlen_k = total
        else:
            max_seqlen_k = int(lengths.max()) if batch > 0 else 0
    row = torch.repeat_interleave(torch.arange(batch, device=k.device), lengths, output_size=total)
    pos = torch.arange(total, device=k.device) - cu[:-1][row]
    shape = (batch, max(max_seqlen_k, 1), k.shape[1], k.shape[2])  # >= 1 column: amax needs one
    kp = k.new_zeros(shape).index_put((row, pos), k)
    vp = v.new_zeros(shape).index_put((row, pos), v)
    return padded_cross_attention_ref(q, kp, vp, lengths, softmax_scale)


# On a CPU the reference is the production path, and padding every row to the longest costs: a MovieLens-100K
# batch of 256 lifelong histories averages 100 keys a row against a longest of 581 (the QFormer was about a
# quarter of a CPU training step). Rows sorted by length and padded per group of 32 do the same arithmetic
# per row on a fraction of the padding: forward + backward at those lengths 3-5x faster on a 2-core CPU
# (benchmarks/time_cpu_step.py).
_CPU_ROWS_PER_GROUP = 32


def _varlen_ref_length_groups(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_k: Tensor,
                              scale: float) -> tuple[Tensor, Tensor]:
    """:func:`varlen_cross_attention_ref` per group of rows of similar key length (CPU tensors; same shapes
    and values, rows are independent)."""
    cu = cu_seqlens_k.long()
    lengths = cu[1:] - cu[:-1]
    order = torch.argsort(lengths, stable=True)
    outs, lses = [], []
    for rows in order.split(_CPU_ROWS_PER_GROUP):
        lens = lengths[rows]
        sub_cu = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
        total = int(sub_cu[-1])
        tok = torch.repeat_interleave(cu[:-1][rows] - sub_cu[:-1], lens, output_size=total) + torch.arange(total)
        out, lse = varlen_cross_attention_ref(q[rows] if q.dim() == 4 else q, k[tok], v[tok], sub_cu, scale,
                                              int(lens.max()))
        outs.append(out)
        lses.append(lse)
    back = torch.argsort(order)
    return torch.cat(outs)[back], torch.cat(lses)[back]


# ----------------------------------------------------------------------------------------------
# custom ops (fused backends)
# ----------------------------------------------------------------------------------------------


def _out_like(q: Tensor, batch: int) -> Tensor:
    """``[B, Hq, Lq, D]`` output in q's memory order of heads vs queries (``[B, Lq, Hq, D]`` memory
    when q's heads are inner, as when q is a view of ``[..., Lq, Hq, D]``), so callers merge heads
    without a copy. Depends only on q's strides, so the real and fake ops agree."""
    heads, seqlen_q, head_dim = q.shape[-3:]
    if q.stride(-3) < q.stride(-2):
        return q.new_empty(batch, seqlen_q, heads, head_dim).transpose(1, 2)
    return q.new_empty(batch, heads, seqlen_q, head_dim)


def _grad_like(t: Tensor) -> Tensor:
    """A gradient buffer shaped like ``t`` with a contiguous last dimension (as the kernels need)."""
    return torch.empty_like(t) if t.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _lastdim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernels(backend: str):
    if backend != "triton":
        raise ValueError(f"{_OP}: the custom op implements backend 'triton', got {backend!r}")
    from onerec_fast.kernels import varlen_attention  # triton is imported only when used

    return varlen_attention


@torch.library.custom_op("onerec_fast::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, seq_starts: Tensor, seq_ends: Tensor,
                          softmax_scale: float, covers_all_keys: bool, backend: str) -> tuple[Tensor, Tensor]:
    """Row b attends to keys ``seq_starts[b] <= t < seq_ends[b]`` of ``k, v: [T, Hkv, D]``.
    ``covers_all_keys``: every key belongs to some row (used by the backward)."""
    kern = _kernels(backend)
    batch = seq_starts.shape[0]
    out = _out_like(q, batch)
    lse = torch.empty(batch, q.shape[-3], q.shape[-2], dtype=torch.float32, device=q.device)
    kern.varlen_attention_fwd(_lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v),
                              seq_starts, seq_ends, out, lse, softmax_scale)
    return out, lse


@_varlen_attention_fwd.register_fake
def _(q, k, v, seq_starts, seq_ends, softmax_scale, covers_all_keys, backend):
    batch = seq_starts.shape[0]
    return _out_like(q, batch), q.new_empty(batch, q.shape[-3], q.shape[-2], dtype=torch.float32)


@torch.library.custom_op("onerec_fast::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd(dout: Tensor, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, seq_starts: Tensor, seq_ends: Tensor, softmax_scale: float,
                          covers_all_keys: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    kern = _kernels(backend)
    dq = _grad_like(q)
    dk = _grad_like(k) if covers_all_keys else torch.zeros_like(k)
    dv = _grad_like(v) if covers_all_keys else torch.zeros_like(v)
    batch, heads, seqlen_q, head_dim = dout.shape
    shared = q.dim() == 3
    if shared:  # fp32 partial sums over fixed blocks of rows, summed below in a fixed order (deterministic)
        cfg = kern.get_config("bwd_dq", head_dim, seqlen_q, kern.keys_per_row(k, batch), q.dtype, q.device)
        m_blocks = -(-seqlen_q // cfg.BLOCK_M)
        blocks = kern.dq_row_blocks(batch, heads, m_blocks, True, q.device)
        dq_buf = torch.empty(blocks, heads, seqlen_q, head_dim, dtype=torch.float32, device=q.device)
    else:
        dq_buf = dq
    delta = torch.empty_like(lse)
    kern.varlen_attention_bwd(
        _lastdim_contiguous(dout), _lastdim_contiguous(q), _lastdim_contiguous(k), _lastdim_contiguous(v), out, lse,
        None if dlse is None else dlse.contiguous(), seq_starts, seq_ends, dq_buf, dk, dv, delta, softmax_scale,
    )
    if shared:
        dq.copy_(dq_buf.sum(0) if batch > 0 else dq_buf.new_zeros(q.shape))
    return dq, dk, dv


@_varlen_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, seq_starts, seq_ends, softmax_scale, covers_all_keys, backend):
    return _grad_like(q), _grad_like(k), _grad_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, seq_starts, seq_ends, softmax_scale, covers_all_keys, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, seq_starts, seq_ends, out, lse)
    ctx.args = (softmax_scale, covers_all_keys, backend)
    ctx.set_materialize_grads(False)  # an unused lse gets None, not a zero tensor to read


def _backward(ctx, dout, dlse):
    q, k, v, seq_starts, seq_ends, out, lse = ctx.saved_tensors
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.onerec_fast.varlen_attention_bwd(dout, dlse, q, k, v, out, lse, seq_starts, seq_ends,
                                                           *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def _check_qkv(q, k, v, kv_ndim: int, kv_layout: str) -> None:
    check_tensor("q", q, ndim=(3, 4), dtype=_DTYPES)
    check_tensor("k", k, ndim=kv_ndim)
    check_tensor("v", v, ndim=kv_ndim)
    check_same("q", q, "k", k)
    check_same("q", q, "v", v)
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)} ({kv_layout}), got {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the head_dim of q ({q.shape[-1]}) in its last dimension, got shape "
                         f"{tuple(k.shape)} ({kv_layout})")
    heads, kv_heads = q.shape[-3], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"the query heads of q ({heads}, q.shape[-3]) must be a multiple of the key/value heads "
                         f"of k ({kv_heads}, k.shape[-2])")


def _validating(validate: bool, t: Tensor) -> bool:
    """Value checks read device memory; skipped when asked, while tracing, and during graph capture."""
    if not validate or torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _unsupported(q: Tensor) -> str | None:
    """Why the triton kernel does not take queries like ``q``, or None."""
    kern = _kernels("triton")
    if q.shape[-1] not in kern.SUPPORTED_HEAD_DIMS:
        return f"supports head_dim in {kern.SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
    if q.dtype not in FLOAT_DTYPES:
        return f"supports dtypes {[str(d) for d in FLOAT_DTYPES]}, got {q.dtype}"
    return None


def _pick_backend(backend: str | None, q: Tensor) -> str:
    name = resolve_backend(_OP, backend, q.device, _IMPLEMENTED)
    if name != "triton":
        return name
    return triton_unless_unsupported(_OP, backend, q.device, _unsupported(q))


def runs_fused(q: Tensor, backend: str = "auto") -> bool:
    """Whether a call with queries like ``q`` (``[..., Hq, Lq, D]``) and ``backend`` runs the triton kernel, not
    the reference: for callers with a faster path of their own than the reference (SDPA with a mask)."""
    return resolve_backend(_OP, backend, q.device, _IMPLEMENTED) == "triton" and _unsupported(q) is None


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim**-0.5
    if not softmax_scale > 0:  # the kernel takes the row max before scaling
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale}")
    return float(softmax_scale)


def varlen_cross_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_k: Tensor, softmax_scale: float | None = None,
                           backend: str = "auto", *, return_lse: bool = False, max_seqlen_k: int | None = None,
                           validate: bool = True):
    """Cross-attention of each row's queries over that row's jagged keys/values.

    Args:
        q: ``[B, Hq, Lq, D]`` per-row queries, or ``[Hq, Lq, D]`` shared by every row (learned queries).
        k, v: ``[total_k, Hkv, D]``, row b's keys at ``cu_seqlens_k[b] <= t < cu_seqlens_k[b+1]``;
            ``Hq`` a multiple of ``Hkv`` (GQA).
        cu_seqlens_k: int32 (or int64) ``[B+1]`` offsets: 0, non-decreasing, ending at total_k.
        softmax_scale: default ``D ** -0.5``.
        backend: "auto", "triton" or "reference" (see :mod:`onerec_fast.backends`).
        return_lse: also return ``lse: [B, Hq, Lq]`` (float32, natural log, -inf for empty rows), which
            is differentiable too.
        max_seqlen_k: optional upper bound on the longest row; only the reference backend uses it
            (to pad without reading the lengths on the host). Under ``torch.compile`` it defaults to
            total_k, which pads every row to total_k: pass it to bound the reference's memory.
        validate: check the offsets' values (a device-to-host copy on CUDA; skipped under
            ``torch.compile`` and CUDA-graph capture). Pass False on hot paths with trusted offsets.

    Returns:
        ``out: [B, Hq, Lq, D]`` in q's dtype (rows without keys are zeros), and ``lse`` if asked.
    """
    _check_qkv(q, k, v, 3, "[total_k, Hkv, D]")
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], sync=_validating(validate, cu_seqlens_k))
    check_same("k", k, "cu_seqlens_k", cu_seqlens_k, dtype=False)
    batch = cu_seqlens_k.shape[0] - 1
    if q.dim() == 4:
        check_dim("q", q, 0, batch, "rows of cu_seqlens_k")
    scale = _scale(softmax_scale, q.shape[-1])
    name = _pick_backend(backend, q)
    if name == "reference" and k.device.type == "cpu" and batch > _CPU_ROWS_PER_GROUP \
            and not torch.compiler.is_compiling():
        out, lse = _varlen_ref_length_groups(q, k, v, cu_seqlens_k, scale)
    elif name == "reference":
        out, lse = varlen_cross_attention_ref(q, k, v, cu_seqlens_k, scale, max_seqlen_k)
    else:
        cu = cu_seqlens_k.to(torch.int32)
        out, lse = _varlen_attention_fwd(q, k, v, cu[:-1], cu[1:], scale, True, name)
    return (out, lse) if return_lse else out


def padded_cross_attention(q: Tensor, k: Tensor, v: Tensor, seqlens_k: Tensor | None = None,
                           softmax_scale: float | None = None, backend: str = "auto", *, return_lse: bool = False,
                           validate: bool = True, key_starts: Tensor | None = None):
    """Cross-attention over padded keys/values, without packing them.

    Args:
        q: ``[B, Hq, Lq, D]`` or shared ``[Hq, Lq, D]``.
        k, v: ``[B, Lk, Hkv, D]``; row b attends to the window ``k[b, s:s + seqlens_k[b]]`` with
            ``s = key_starts[b]`` (0 without ``key_starts``). Any dense layout is read in place, e.g. a
            ``[B, Hkv, Lk, D]`` cache passed as ``cache.transpose(1, 2)``.
        seqlens_k: int ``[B]`` with values in ``[0, Lk]``; None means all Lk keys of every row (then
            ``key_starts`` must be None).
        key_starts: int ``[B]``, each window's first key, with ``key_starts + seqlens_k <= Lk``: the
            self-attention of a padded sequence whose real tokens are one run with padding on both sides.
        softmax_scale, backend, return_lse, validate: as in :func:`varlen_cross_attention`.

    Returns:
        ``out: [B, Hq, Lq, D]`` (and ``lse: [B, Hq, Lq]``). Gradients of padding keys are zero.
    """
    _check_qkv(q, k, v, 4, "[B, Lk, Hkv, D]")
    batch, length = k.shape[:2]
    if q.dim() == 4:
        check_dim("q", q, 0, batch, "rows of k")
    if key_starts is not None and seqlens_k is None:
        raise ValueError("key_starts needs seqlens_k (each window's length)")
    for name, lens in (("seqlens_k", seqlens_k), ("key_starts", key_starts)):
        if lens is not None:
            check_tensor(name, lens, ndim=1, dtype=_INDEX_DTYPES)
            check_same("k", k, name, lens, dtype=False)
            check_dim(name, lens, 0, batch, "rows of k")
    if seqlens_k is not None and _validating(validate, seqlens_k) and batch > 0:
        first = torch.zeros_like(seqlens_k) if key_starts is None else key_starts
        bad = (seqlens_k < 0) | (first < 0) | (first + seqlens_k > length)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            if key_starts is None:
                raise ValueError(f"seqlens_k must lie in [0, {length}] (k.shape[1]); row {row} has "
                                 f"{int(seqlens_k[row])}")
            raise ValueError(f"each key window must lie in k's {length} keys (key_starts >= 0, seqlens_k >= 0, "
                             f"key_starts + seqlens_k <= {length}); row {row} has key_starts {int(first[row])}, "
                             f"seqlens_k {int(seqlens_k[row])}")
    scale = _scale(softmax_scale, q.shape[-1])
    name = _pick_backend(backend, q)
    if name == "reference":
        out, lse = padded_cross_attention_ref(q, k, v, seqlens_k, scale, key_starts)
    else:
        if not (_rows_of_keys(k) and v.stride() == k.stride()):
            k, v = k.contiguous(), v.contiguous()
        # The kernel addresses key t of the tensor at t * k.stride(1): row b starts at key b * unit.
        unit = k.stride(0) // k.stride(1) if length > 0 else 0
        starts = torch.arange(batch, device=k.device, dtype=torch.int32) * unit
        if key_starts is not None:
            starts = starts + key_starts.to(torch.int32)
        ends = starts + (length if seqlens_k is None else seqlens_k.to(torch.int32))
        out, lse = _varlen_attention_fwd(q, k, v, starts, ends, scale, seqlens_k is None, name)
    return (out, lse) if return_lse else out


def _rows_of_keys(k: Tensor) -> bool:
    """Whether padded ``k: [B, L, Hkv, D]`` can be read in place as rows of keys: dense (so gradients
    allocated like it share its strides), last dimension contiguous, and the row stride a multiple of
    the key stride. True for ``[B, L, Hkv, D]`` and for a ``[B, Hkv, L, D]`` cache transposed."""
    if k.stride(-1) != 1 or k.stride(1) <= 0 or k.stride(0) % k.stride(1):
        return False
    expected = 1  # dense: the strides, smallest first, are the running products of the sizes
    for dim in sorted(range(4), key=k.stride):
        if k.shape[dim] != 1 and k.stride(dim) != expected:
            return False
        expected *= k.shape[dim]
    return True


def beam_shared_cross_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_k: Tensor | None = None,
                                seqlens_k: Tensor | None = None, softmax_scale: float | None = None,
                                backend: str = "auto", *, validate: bool = True) -> Tensor:
    """Decoder cross-attention of every beam of a row over that row's encoder states, which are
    read once per row instead of being replicated per beam (the beams are the row's queries).

    Args:
        q: ``[B, beams, Hq, D]`` (one decoding step of every beam).
        k, v: jagged ``[total_k, Hkv, D]`` with ``cu_seqlens_k: [B+1]``, or padded ``[B, Lk, Hkv, D]``
            with optional ``seqlens_k: [B]`` (None: all Lk keys valid).
        softmax_scale, backend, validate: as in :func:`varlen_cross_attention`.

    Returns:
        ``[B, beams, Hq, D]`` in q's dtype (contiguous for contiguous q with the triton backend).
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=(3, 4))
    qh = q.transpose(1, 2)  # [B, Hq, beams, D], a view: the kernel reads strides
    if k.dim() == 3:
        if cu_seqlens_k is None or seqlens_k is not None:
            raise ValueError("jagged k [total_k, Hkv, D] needs cu_seqlens_k (and no seqlens_k)")
        out = varlen_cross_attention(qh, k, v, cu_seqlens_k, softmax_scale, backend, validate=validate)
    else:
        if cu_seqlens_k is not None:
            raise ValueError("padded k [B, Lk, Hkv, D] takes seqlens_k [B], not cu_seqlens_k")
        out = padded_cross_attention(qh, k, v, seqlens_k, softmax_scale, backend, validate=validate)
    return out.transpose(1, 2)
