"""Useful floating-point operations of each op (a multiply-add counts 2). Only real work is counted:
padding, recomputation and routing overheads are not, so MFU compares implementations fairly."""

from __future__ import annotations

from collections.abc import Sequence


def swiglu_flops(tokens: int, d: int, f: int, backward: bool = False) -> float:
    """SwiGLU FFN over ``tokens`` rows: x@w1, x@w3 ([d, f] each) and h@w2 ([f, d]).

    Forward is 3 GEMMs of 2*tokens*d*f; backward is twice the forward (grad of inputs and weights).
    """
    fwd = 3 * 2.0 * tokens * d * f
    return fwd * (3.0 if backward else 1.0)


def moe_flops(tokens: int, d: int, f: int, num_experts: int, top_k: int, backward: bool = False) -> float:
    """MoE FFN: the router GEMM ([T, d] x [d, E]) plus top_k SwiGLU experts per token."""
    router = 2.0 * tokens * d * num_experts
    experts = swiglu_flops(tokens * top_k, d, f)
    return (router + experts) * (3.0 if backward else 1.0)


def attention_flops(
    q_lens: int | Sequence[int], k_lens: int | Sequence[int], heads: int, head_dim: int, backward: bool = False,
    causal: bool = False,
) -> float:
    """Attention: QK^T and PV, 2 * 2 * Lq * Lk * D per head per row; backward counts 2.5x the forward
    (dQ, dK, dV, and the recomputed P), the FlashAttention convention.

    ``q_lens``/``k_lens`` are per-row lengths (or one int for all rows; then one row).
    """
    ql = [q_lens] if isinstance(q_lens, int) else list(q_lens)
    kl = [k_lens] if isinstance(k_lens, int) else list(k_lens)
    if len(ql) == 1 and len(kl) > 1:
        ql = ql * len(kl)
    if len(ql) != len(kl):
        raise ValueError(f"q_lens and k_lens must have the same number of rows, got {len(ql)} and {len(kl)}")
    pairs = sum(a * b for a, b in zip(ql, kl))
    if causal:
        pairs /= 2
    fwd = 4.0 * pairs * heads * head_dim
    return fwd * (3.5 if backward else 1.0)


def lm_head_flops(rows: int, d: int, vocab: int) -> float:
    """Full LM head: [rows, d] x [d, V]."""
    return 2.0 * rows * d * vocab
