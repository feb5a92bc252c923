"""Transformer pieces shared by the OneRec encoder and decoder: attention, SwiGLU, the FFN choice.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention or the
memory-efficient kernel on GPUs, chosen by PyTorch); padding is a boolean key mask built from the
jagged offsets, so padded slots never influence a real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Attention", "SwiGLU", "make_ffn", "moe_layers", "split_heads", "merge_heads"]


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``x: [..., L, H*Dh]`` -> ``[..., H, L, Dh]``."""
    *lead, L, d = x.shape
    return x.view(*lead, L, n_heads, d // n_heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``x: [..., H, L, Dh]`` -> ``[..., L, H*Dh]``."""
    *lead, H, L, Dh = x.shape
    return x.transpose(-3, -2).reshape(*lead, L, H * Dh)


class Attention(nn.Module):
    """Multi-head attention without biases; self- or cross-attention depending on what ``kv`` sees;
    ``dropout`` on the attention weights in training mode.

    ``project_kv(src: [..., S, d]) -> (k, v): [..., H, S, Dh]`` lets callers compute keys/values once
    (the encoder states for every decoding step and every beam; the self-attention KV cache).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def project_kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(src).chunk(2, dim=-1)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False) -> torch.Tensor:
        """``x: [..., Lq, d]`` queries against ``k, v: [..., H, S, Dh]``; ``mask``: bool broadcastable to
        ``[..., H, Lq, S]`` (True = may attend). Returns ``[..., Lq, d]``."""
        q = split_heads(self.q(x), self.n_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.o(merge_heads(out))

    def forward(self, x: torch.Tensor, src: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        k, v = self.project_kv(src)
        return self.attend(x, k, v, mask, causal)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN ``(silu(x W1) * (x W3)) W2`` on ``x: [..., d]`` (the MoE experts' form)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def make_ffn(cfg, part: str) -> nn.Module:
    """The FFN of an encoder (``part="enc"``) or decoder (``"dec"``) layer: a dense SwiGLU of width
    ``cfg.d_ff`` when that part has no experts, else ``onerec_fast.modules.MoELayer`` with the config's
    expert width, router, balancing losses and backend."""
    num_experts, top_k = getattr(cfg, f"{part}_moe_experts"), getattr(cfg, f"{part}_moe_top_k")
    if num_experts == 0:
        return SwiGLU(cfg.d_model, cfg.d_ff)
    from onerec_fast.modules.moe import MoELayer

    return MoELayer(cfg.d_model, cfg.expert_d_ff, num_experts, top_k, router=cfg.moe_router, norm_topk=True,
                    aux_loss_coef=cfg.moe_aux_loss_coef, z_loss_coef=cfg.moe_z_loss_coef, backend=cfg.backend)


def moe_layers(module: nn.Module) -> list[nn.Module]:
    """Every MoE FFN inside ``module``: the modules holding a loss-free ``expert_bias`` buffer."""
    return [m for m in module.modules() if isinstance(getattr(m, "expert_bias", None), torch.Tensor)]
