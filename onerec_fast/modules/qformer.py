"""QFormer: compresses a variable-length memory (a user's lifelong history) into a fixed number of
learned query vectors, with the variable-length cross-attention op underneath.

``QFormer`` runs learned queries ``[num_queries, d]`` through N blocks of

    x = x + CrossAttention(RMSNorm(x), memory)      # jagged (or padded) memory, per row
    x = x + SelfAttention(RMSNorm(x))               # among the queries of a row (SDPA)
    x = x + SwiGLU(RMSNorm(x))

and a final RMSNorm, returning ``[B, num_queries, d]``. In the first block the queries are the same
for every row, so the cross-attention takes them once (``[Hq, Lq, D]``, no B-fold copy; their
gradient is summed over rows by the kernel); from the first residual add on they are per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onerec_fast.checks import check_tensor
from onerec_fast.modules.rms_norm import RMSNorm
from onerec_fast.ops.varlen_attention import padded_cross_attention, varlen_cross_attention

__all__ = ["QFormerCrossAttention", "QFormer"]


class QFormerCrossAttention(nn.Module):
    """Multi-head cross-attention of queries over a per-row memory: q/k/v/o projections around
    :func:`~onerec_fast.ops.varlen_attention.varlen_cross_attention`.

    Args:
        d_model: width of the queries and of the output; ``num_heads`` must divide it.
        num_heads: query heads (head_dim = d_model // num_heads; the triton kernel takes 32/64/128).
        d_kv: width of the memory (default d_model).
        num_kv_heads: key/value heads (default num_heads; must divide num_heads: GQA).
        backend: "auto", "triton" or "reference".
    """

    def __init__(self, d_model: int, num_heads: int, d_kv: int | None = None, num_kv_heads: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        d_kv = d_model if d_kv is None else d_kv
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if d_model % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide d_model ({d_model})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
        self.d_model, self.d_kv = d_model, d_kv
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        self.backend = backend
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_kv, num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_kv, num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, memory: Tensor, cu_seqlens: Tensor | None = None, lengths: Tensor | None = None,
                *, max_seqlen: int | None = None, validate: bool = True) -> Tensor:
        """Attend from ``x`` to each row's memory.

        Args:
            x: ``[B, Lq, d_model]`` per-row queries, or ``[Lq, d_model]`` shared by every row.
            memory: jagged ``[total, d_kv]`` with ``cu_seqlens: [B+1]``, or padded ``[B, L, d_kv]``
                with ``lengths: [B]`` (row b's memory is ``memory[b, :lengths[b]]``; None: all L).
            max_seqlen: jagged only, an upper bound on the longest row; the reference backend pads
                to it (default: the longest row, or total under ``torch.compile``; see
                :func:`varlen_cross_attention`).
            validate: check the offsets/lengths values (a host sync on CUDA).

        Returns:
            ``[B, Lq, d_model]``.
        """
        check_tensor("x", x, ndim=(2, 3))
        check_tensor("memory", memory, ndim=(2, 3))
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have d_model = {self.d_model} features, got shape {tuple(x.shape)}")
        if memory.shape[-1] != self.d_kv:
            raise ValueError(f"memory must have d_kv = {self.d_kv} features, got shape {tuple(memory.shape)}")
        seqlen_q = x.shape[-2]
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)  # [(B,) Hq, Lq, D]
        kv_shape = (*memory.shape[:-1], self.num_kv_heads, self.head_dim)
        k, v = self.k_proj(memory).view(kv_shape), self.v_proj(memory).view(kv_shape)
        if memory.dim() == 2:
            if cu_seqlens is None or lengths is not None:
                raise ValueError("jagged memory [total, d_kv] needs cu_seqlens [B+1] (and no lengths)")
            out = varlen_cross_attention(q, k, v, cu_seqlens, backend=self.backend, max_seqlen_k=max_seqlen,
                                         validate=validate)
        else:
            if cu_seqlens is not None:
                raise ValueError("padded memory [B, L, d_kv] takes lengths [B], not cu_seqlens")
            out = padded_cross_attention(q, k, v, lengths, backend=self.backend, validate=validate)
        # [B, Hq, Lq, D] -> [B, Lq, d_model]; a view when the kernel wrote heads-inner memory.
        return self.o_proj(out.transpose(1, 2).reshape(out.shape[0], seqlen_q, self.d_model))


class _SelfAttention(nn.Module):
    """Multi-head self-attention among the queries of one row (no mask), through SDPA."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, L, d] -> [B, L, d]
        q, k, v = self.qkv_proj(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D]
        return self.o_proj(out.transpose(1, 2).flatten(2))


class _SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)``: x ``[..., d]`` -> ``[..., d]``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=False)  # w1 and w3 in one GEMM
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class _QFormerBlock(nn.Module):
    def __init__(self, d_model, num_heads, d_kv, d_ff, backend):
        super().__init__()
        self.cross_norm = RMSNorm(d_model, eps=1e-6, backend=backend)
        self.cross_attn = QFormerCrossAttention(d_model, num_heads, d_kv, backend=backend)
        self.self_norm = RMSNorm(d_model, eps=1e-6, backend=backend)
        self.self_attn = _SelfAttention(d_model, num_heads)
        self.ffn_norm = RMSNorm(d_model, eps=1e-6, backend=backend)
        self.ffn = _SwiGLU(d_model, d_ff)

    def forward(self, x, memory, cu_seqlens, lengths, max_seqlen, validate):
        x = x + self.cross_attn(self.cross_norm(x), memory, cu_seqlens, lengths, max_seqlen=max_seqlen,
                                validate=validate)  # shared [Lq, d] x broadcasts to [B, Lq, d]
        x = x + self.self_attn(self.self_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class QFormer(nn.Module):
    """Learned queries that summarize each row's variable-length memory.

    Args:
        d_model: width of the queries and of the output.
        num_queries: learned queries (output length).
        num_blocks: blocks of cross-attention, self-attention and SwiGLU FFN (each pre-RMSNorm).
        num_heads: heads of both attentions (head_dim = d_model // num_heads).
        d_kv: width of the memory (default d_model).
        d_ff: hidden width of the FFN (default 4 * d_model).
        backend: backend of the cross-attention and the norms ("auto", "triton", "reference").

    Example::

        qf = QFormer(d_model=1024, num_queries=128, num_blocks=2, num_heads=8, d_kv=512)
        out = qf(values, offsets=offsets)         # values [total, 512], offsets [B+1] -> [B, 128, 1024]
        out = qf(padded, lengths=lengths)         # padded [B, L, 512], lengths [B]   -> [B, 128, 1024]
    """

    def __init__(self, d_model: int, num_queries: int = 128, num_blocks: int = 2, num_heads: int = 8,
                 d_kv: int | None = None, d_ff: int | None = None, backend: str = "auto"):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        d_kv = d_model if d_kv is None else d_kv
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.d_model, self.num_queries = d_model, num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, d_model) * d_model**-0.5)
        self.blocks = nn.ModuleList(_QFormerBlock(d_model, num_heads, d_kv, d_ff, backend) for _ in range(num_blocks))
        self.norm = RMSNorm(d_model, eps=1e-6, backend=backend)

    def forward(self, memory: Tensor, offsets: Tensor | None = None, lengths: Tensor | None = None, *,
                max_len: int | None = None, validate: bool = True) -> Tensor:
        """Summarize each row's memory.

        Args:
            memory: jagged ``[total, d_kv]`` with ``offsets: [B+1]``, or padded ``[B, L, d_kv]`` with
                ``lengths: [B]`` (None: all L rows valid).
            max_len: jagged only, an upper bound on the longest row; the reference backend pads to it
                (default: the longest row, or total under ``torch.compile``).
            validate: check offsets/lengths once (a host sync on CUDA).

        Returns:
            ``[B, num_queries, d_model]``.
        """
        x = self.queries  # [num_queries, d], shared by every row until the first residual add
        for i, block in enumerate(self.blocks):
            x = block(x, memory, offsets, lengths, max_len, validate and i == 0)
        return self.norm(x)
