"""Transformer pieces shared by the OneRec encoder and decoder: attention, SwiGLU, the FFN choice.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention, cuDNN or the
memory-efficient kernel on GPUs, chosen by PyTorch); padding is a boolean key mask built from the
jagged offsets, so padded slots never influence a real token. Where each row's real keys form one run
(``window``: the encoder's slot layout) and no attention dropout is active, a CUDA step runs the window
through ``onerec_fast.ops.padded_cross_attention`` (``key_starts``) instead: cuDNN's attention with a key
mask took 4.3 of the 0.015b step's 20 ms on Amazon Sports (H100, benchmarks/RESULTS.md, session 15).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from onerec_fast.ops.varlen_attention import padded_cross_attention, runs_fused

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

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.n_heads, self.dropout, self.backend = n_heads, dropout, backend
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def project_kv(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(src).chunk(2, dim=-1)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               causal: bool = False, window: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x: [..., Lq, d]`` queries against ``k, v: [..., H, S, Dh]``; ``mask``: bool broadcastable to
        ``[..., H, Lq, S]`` (True = may attend). ``window`` (with ``x: [B, Lq, d]``, ``k, v: [B, H, S, Dh]``):
        int32 ``([B], [B])``, each row's first real key and their number, the same keys as ``mask`` (which must
        be given too): the fused path where it runs. Returns ``[..., Lq, d]``."""
        q = split_heads(self.q(x), self.n_heads)
        p = self.dropout if self.training else 0.0
        if window is not None and not causal and p == 0.0 and q.is_cuda and runs_fused(q, self.backend):
            # runs_fused resolved the backend ("auto" and the environment included): not again per call
            out = padded_cross_attention(q, k.transpose(1, 2), v.transpose(1, 2), window[1], backend="triton",
                                         validate=False, key_starts=window[0])
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)
        return self.o(merge_heads(out))

    def forward(self, x: torch.Tensor, src: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False, window: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        k, v = self.project_kv(src)
        return self.attend(x, k, v, mask, causal, window)


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
