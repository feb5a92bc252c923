"""The OneRec decoder (TR 2.3): point-wise generation of one item's semantic ID, code by code.

Input ``[BOS, c_0, ..., c_{L-2}]`` (a learned BOS vector, then the code embeddings of levels 0..L-2, plus
learned positions); ``dec_layers`` pre-RMSNorm blocks of causal self-attention, cross-attention to the
encoder states (padding slots masked) and an FFN (``MoELayer`` for the MoE presets, dense SwiGLU
otherwise); a final RMSNorm and one LM head per level: position t predicts code level t. The training
loss is the next-token cross-entropy averaged over the L codes.

Generation (:meth:`OneRecDecoder.step`) keeps a self-attention KV cache per beam ``[B, beam, H, t, Dh]``,
reordered by the parent-beam indices the beam search chose, and computes the cross-attention keys and
values of the encoder states once per user: the ``beam`` queries of one user attend to that user's
``[H, S, Dh]`` keys as one ``[B, H, beam, Dh]`` query block, so encoder states are never copied per beam.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.encoder import EncoderOutput
from onerec_fast.model.layers import Attention, make_ffn, merge_heads, split_heads

__all__ = ["OneRecDecoder", "DecodeState"]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OneRecConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.self_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.norm2 = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.cross_attn = Attention(d, cfg.n_heads, cfg.dropout)
        self.norm3 = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.ffn = make_ffn(cfg, "dec")
        self.drop = nn.Dropout(cfg.dropout)  # residual branches, training only


@dataclass
class DecodeState:
    """What generation carries between steps for B users x ``beam`` beams."""

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, k/v [B, H, S, Dh], shared by the beams
    key_mask: torch.Tensor  # bool [B, 1, 1, S]
    self_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, k/v [B, beam, H, t, Dh]


class OneRecDecoder(nn.Module):
    def __init__(self, cfg: OneRecConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.bos = nn.Parameter(torch.randn(d) * 0.02)
        # Input embeddings for codes of levels 0..L-2 (the last level is only ever predicted).
        self.code_emb = nn.ModuleList(nn.Embedding(v, d) for v in cfg.vocab_sizes[:-1])
        self.pos_emb = nn.Parameter(torch.randn(cfg.code_levels, d) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.heads = nn.ModuleList(nn.Linear(d, v, bias=False) for v in cfg.vocab_sizes)

    # -- shared pieces -----------------------------------------------------------------------------------
    def embed_token(self, token: torch.Tensor | None, t: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The input vector at position ``t``: BOS for t = 0, else the embedding of the level-(t-1) code
        ``token: int64 [*shape]``. Returns ``[*shape, d]``."""
        x = self.bos.expand(*shape, -1) if t == 0 else self.code_emb[t - 1](token)
        return x + self.pos_emb[t]

    def cross_kv(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention keys and values of the encoder states: ``[B, H, S, Dh]`` each."""
        return [layer.cross_attn.project_kv(enc.states) for layer in self.layers]

    # -- training ----------------------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, enc: EncoderOutput) -> list[torch.Tensor]:
        """Teacher-forced logits. ``codes: int64 [B, L]`` (the target item's codes) -> per level ``l`` the
        logits ``[B, V_l]`` for code ``l`` given BOS and codes ``0..l-1``."""
        B, L = codes.shape
        x = torch.stack([self.embed_token(codes[:, t - 1] if t else None, t, (B,)) for t in range(L)], dim=1)
        key_mask = enc.mask[:, None, None, :]
        for layer in self.layers:
            h = layer.norm1(x)
            x = x + layer.drop(layer.self_attn(h, h, causal=True))
            x = x + layer.drop(layer.cross_attn(layer.norm2(x), enc.states, key_mask))
            x = x + layer.drop(layer.ffn(layer.norm3(x)))
        h = self.norm(x)
        return [head(h[:, t]) for t, head in enumerate(self.heads)]

    def loss(self, codes: torch.Tensor, enc: EncoderOutput, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Next-token cross-entropy averaged over the B x L target codes (fp32). ``masks`` (bool ``[B, V_l]``
        per level, True on the target code): each level's softmax runs over the masked-in codes only."""
        logits = [lg.float() for lg in self.forward(codes, enc)]
        if masks is not None:
            logits = [lg.masked_fill(~m, float("-inf")) for lg, m in zip(logits, masks)]
        return torch.stack([F.cross_entropy(lg, codes[:, t]) for t, lg in enumerate(logits)]).mean()

    # -- generation --------------------------------------------------------------------------------------
    def start(self, enc: EncoderOutput) -> DecodeState:
        return DecodeState(self.cross_kv(enc), enc.mask[:, None, None, :], [])

    def step(self, state: DecodeState, t: int, token: torch.Tensor | None, parents: torch.Tensor | None,
             beam: int) -> torch.Tensor:
        """Logits ``[B, beam, V_t]`` of code level ``t`` for every beam.

        ``token: int64 [B, beam]`` is each beam's level-(t-1) code (None at t = 0); ``parents: int64
        [B, beam]`` the beam each one extends (its cache row; -1 for dead beams, whose scores are -inf and
        whose outputs are ignored). At t = 0 every beam holds the same prefix (BOS), so one row per user
        is computed and broadcast.
        """
        B = state.key_mask.shape[0]
        nb = 1 if t == 0 else beam
        x = self.embed_token(token, t, (B, nb))  # [B, nb, d]
        if t > 0:
            idx = parents.clamp_min(0)[:, :, None, None, None]
            state.self_kv = [tuple(torch.gather(c, 1, idx.expand(-1, -1, *c.shape[2:])) if c.shape[1] == beam
                                   else c.expand(-1, beam, -1, -1, -1) for c in kv) for kv in state.self_kv]
        new_cache = []
        for i, layer in enumerate(self.layers):
            h = layer.norm1(x)
            q = split_heads(layer.self_attn.q(h).unsqueeze(2), layer.self_attn.n_heads)  # [B, nb, H, 1, Dh]
            k_new, v_new = layer.self_attn.project_kv(h.unsqueeze(2))  # [B, nb, H, 1, Dh]
            if t > 0:
                k_new = torch.cat([state.self_kv[i][0], k_new], dim=3)
                v_new = torch.cat([state.self_kv[i][1], v_new], dim=3)
            new_cache.append((k_new, v_new))
            # Every cached position is visible; flattened to 4-D, the layout the fused SDPA kernels take.
            a = F.scaled_dot_product_attention(q.flatten(0, 1), k_new.flatten(0, 1), v_new.flatten(0, 1))
            x = x + layer.self_attn.o(merge_heads(a).view(B, nb, -1))
            ck, cv = state.cross_kv[i]
            x = x + layer.cross_attn.attend(layer.norm2(x), ck, cv, state.key_mask)  # [B, nb, d]: beams as queries
            x = x + layer.ffn(layer.norm3(x))
        state.self_kv = new_cache
        logits = self.heads[t](self.norm(x))
        return logits.expand(B, beam, -1) if nb == 1 else logits

    def step_flops(self, batch_size: int, beam: int, t: int, enc_lens: list[int]) -> float:
        """Useful FLOPs of :meth:`step` at level ``t`` (one row per user at t = 0, ``beam`` after)."""
        from onerec_fast.perf.flops import attention_flops

        cfg = self.cfg
        d = cfg.d_model
        nb = 1 if t == 0 else beam
        rows = batch_size * nb
        per_layer = (2.0 * rows * (6 * d * d + cfg.ffn_weights_per_token("dec"))
                     + attention_flops([1] * rows, [t + 1] * rows, cfg.n_heads, cfg.head_dim)
                     + attention_flops([nb] * batch_size, enc_lens, cfg.n_heads, cfg.head_dim))
        return cfg.dec_layers * per_layer + 2.0 * rows * d * cfg.vocab_sizes[t]

    def cross_kv_flops(self, enc_lens: list[int]) -> float:
        """FLOPs of :meth:`cross_kv` over the real encoder states."""
        d = self.cfg.d_model
        return self.cfg.dec_layers * 2.0 * sum(enc_lens) * 2 * d * d

    def flops(self, batch_size: int, enc_lens: list[int], backward: bool = False) -> float:
        """Useful FLOPs of a teacher-forced forward for ``batch_size`` users (x3 with backward):
        GEMMs over the L positions, the cross-attention K/V projections of the real encoder states,
        causal self-attention and cross-attention, and the LM heads."""
        from onerec_fast.perf.flops import attention_flops

        cfg = self.cfg
        d, L = cfg.d_model, cfg.code_levels
        tokens = batch_size * L
        per_layer = (2.0 * tokens * (6 * d * d + cfg.ffn_weights_per_token("dec"))
                     + attention_flops([L] * batch_size, [L] * batch_size, cfg.n_heads, cfg.head_dim, causal=True)
                     + attention_flops([L] * batch_size, enc_lens, cfg.n_heads, cfg.head_dim))
        f = cfg.dec_layers * per_layer + self.cross_kv_flops(enc_lens) + 2.0 * batch_size * d * sum(cfg.vocab_sizes)
        return f * (3.0 if backward else 1.0)
