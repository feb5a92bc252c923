"""The OneRec encoder (TR 2.2): four pathways of user behaviour -> one sequence -> a full-attention transformer.

* static pathway: embeddings of the user's static features (uid, gender, age, ...) concatenated ->
  Dense-LeakyReLU-Dense -> 1 token;
* short-term pathway (the last ``short_len`` = 20 items) and positive-feedback pathway (up to ``pos_len``
  = 256 engaged items): per item the semantic-ID code embeddings plus the optional item-level features
  (item id, author, tag, labels: categorical; timestamp, playtime, duration: continuous) ->
  Dense-LeakyReLU-Dense -> one token per item;
* lifelong pathway: the compressed lifelong items (<= ``lifelong_len``) embedded the same way ->
  ``QFormer`` with ``num_queries`` (128) learned queries and ``qformer_blocks`` (2) blocks -> 128 tokens.

The tokens sit in ``enc_len`` fixed slots (405 for the TR sizes) with learned position embeddings, in the
order ``[short | static | lifelong queries | positive]``; slots past a user's history length are padding,
excluded from every attention by a key mask built from the jagged offsets (so results do not depend on other
users in the batch). The short-term items are right-aligned and the positive-feedback items left-aligned,
newest first, so a user's real tokens form one run of slots (``EncoderOutput.window``), which a CUDA step
attends to with the fused windowed attention instead of a masked one (``model/layers.py``). The position
embeddings are stored in the order ``[static | short | positive | queries]`` (each pathway's slots oldest to
newest), the order of earlier versions, so checkpoints load unchanged. Then ``enc_layers`` pre-RMSNorm
blocks of full self-attention + FFN (SwiGLU or MoE).

Item pathways arrive jagged (``onerec_fast.data.JaggedItems``: ``offsets [B+1]``, ``item [T]``, ``codes
[T, L]``, ``sparse``/``dense`` ``{name: [T]}``) as the data loader collates them, or padded
(:class:`PaddedItems`, ``lengths [B]`` and ``[B, N, ...]`` values). Each item's position embedding is that of its
recency within its pathway.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn

from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.layers import Attention, make_ffn
from onerec_fast.modules.rms_norm import RMSNorm

__all__ = ["PaddedItems", "OneRecEncoder", "EncoderOutput", "newest_item_slot", "right_align", "seq_lengths"]


@dataclass
class PaddedItems:
    """One pathway in padded form (the jagged form is ``onerec_fast.data.JaggedItems``): ``codes: int64
    [B, N, L]``, ``lengths: int64 [B]``, features ``[B, N]``; user b's items are ``[:lengths[b]]``, oldest
    first; entries past ``lengths[b]`` are ignored, whatever they hold."""

    codes: torch.Tensor
    lengths: torch.Tensor
    item: torch.Tensor | None = None
    sparse: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_jagged(cls, seq, slots: int, pin_memory: bool = False) -> "PaddedItems":
        """A jagged host pathway (``onerec_fast.data.JaggedItems``) in ``slots`` padded slots per user: values
        ``[B, slots, ...]`` with zeros (item 0, code 0: valid indices) past each user's end, in pinned memory with
        ``pin_memory`` (``JaggedItems.padded`` per tensor). Raises ValueError if a user has more than ``slots``
        items."""
        pad = lambda t: seq.padded(t, 0, slots, pin_memory)[0]  # noqa: E731
        lengths = seq.lengths()
        lens = torch.empty(lengths.shape, dtype=torch.int64, pin_memory=pin_memory).copy_(lengths)
        return cls(pad(seq.codes), lens, None if seq.item is None else pad(seq.item),
                   {k: pad(v) for k, v in seq.sparse.items()}, {k: pad(v) for k, v in seq.dense.items()})

    def map_tensors(self, fn) -> "PaddedItems":
        """``fn`` applied to every tensor that is set."""
        mv = lambda t: None if t is None else fn(t)  # noqa: E731
        return PaddedItems(mv(self.codes), mv(self.lengths), mv(self.item),
                           {k: mv(v) for k, v in self.sparse.items()}, {k: mv(v) for k, v in self.dense.items()})

    def to(self, device, non_blocking: bool = False) -> "PaddedItems":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))


def _is_padded(seq) -> bool:
    return isinstance(seq, PaddedItems)


def seq_lengths(seq) -> torch.Tensor:
    """int64 ``[B]`` items per user of a jagged or padded pathway."""
    return seq.lengths.long() if _is_padded(seq) else (seq.offsets[1:] - seq.offsets[:-1]).long()


def newest_item_slot(cfg: OneRecConfig) -> int:
    """The encoder slot of each user's newest short-term item (a padding slot for a user without history)."""
    return cfg.short_len - 1


def right_align(values: torch.Tensor, seq, max_len: int, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Place each user's items in ``max_len`` slots, the newest in the last slot (``reverse``: the slots in
    reverse order, the newest in the first slot and the empty slots last).

    ``values``: ``[T, ...]`` per item of a jagged pathway or ``[B, N, ...]`` of a padded one. Returns
    (``[B, max_len, ...]`` with zeros in empty slots, bool mask ``[B, max_len]``). One gather, no host sync;
    a user with more than ``max_len`` items is a caller error (``OneRec.check_batch`` checks on the host).
    """
    lengths = seq_lengths(seq)
    B = lengths.numel()
    if values.numel() == 0:  # no items anywhere in the batch
        tail = tuple(values.shape[2:] if _is_padded(seq) else values.shape[1:])
        return values.new_zeros((B, max_len) + tail), torch.zeros(B, max_len, dtype=torch.bool, device=values.device)
    slot = torch.arange(max_len - 1, -1, -1, device=values.device) if reverse else torch.arange(max_len, device=values.device)
    src = slot[None, :] - (max_len - lengths[:, None])  # index within the user's items; < 0: empty slot
    mask = src >= 0
    if _is_padded(seq):
        flat = values.flatten(0, 1)
        start = torch.arange(B, device=values.device) * values.shape[1]
    else:
        flat = values
        start = seq.offsets[:-1].long()
    # Empty slots of a user with no items would point one past its segment: clamp into range (masked).
    idx = (start[:, None] + src.clamp_min(0)).clamp_max(flat.shape[0] - 1)
    out = flat[idx].masked_fill(~mask.view(B, max_len, *([1] * (flat.dim() - 1))), 0)
    return out, mask


@dataclass
class EncoderOutput:
    states: torch.Tensor  # [B, S, d] encoder states (padding slots hold finite garbage)
    mask: torch.Tensor  # bool [B, S]: True where a real token sits
    recent: torch.Tensor | None = None  # int64 [B, cfg.transition_window]: newest item ids, newest last, -1 = none
    # int32 [B] each: the real slots of user b are window_start[b] .. window_start[b] + window_len[b] - 1 (one
    # run, as the encoder lays them out; the same slots as ``mask``), or None
    window_start: torch.Tensor | None = None
    window_len: torch.Tensor | None = None

    @property
    def window(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.window_start is None else (self.window_start, self.window_len)

    def map_tensors(self, fn) -> "EncoderOutput":
        """``fn`` applied to every field that is set (the transition biases' ``recent`` included): e.g. a clone,
        or each user's row repeated per scored sequence, ``lambda t: t.repeat_interleave(n, dim=0)``."""
        return EncoderOutput(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})


def _signed_log1p(x: torch.Tensor) -> torch.Tensor:
    # Continuous features (seconds, timestamps) span many orders of magnitude; compress them first.
    return torch.sign(x) * torch.log1p(x.abs())


class _MLP(nn.Sequential):
    """Dense -> LeakyReLU -> Dense, the TR's per-pathway projection."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(nn.Linear(d_in, d_out), nn.LeakyReLU(0.1), nn.Linear(d_out, d_out))


class ItemFeatureEmbedding(nn.Module):
    """Per-item input features -> one vector ``[..., out_dim]``: the L code embeddings, one embedding per
    categorical feature (``"item"`` reads the item ids, the others the pathway's ``sparse`` dict), and a
    linear map of the (log-compressed) continuous features (the pathway's ``dense`` dict).

    The sparse ID tables live in ``self.sparse`` so parameter counts can leave them out."""

    def __init__(self, cfg: OneRecConfig):
        super().__init__()
        self.code_emb = nn.ModuleList(nn.Embedding(v, cfg.code_dim) for v in cfg.vocab_sizes)
        # Keys get a suffix: feature names such as "forward" would clash with nn.ModuleDict attributes.
        self.sparse = nn.ModuleDict({f"{k}_emb": nn.Embedding(n, cfg.d_feat) for k, n in cfg.item_cat_features.items()})
        self.dense_names = tuple(cfg.item_num_features)
        self.dense = nn.Linear(len(self.dense_names), cfg.d_feat) if self.dense_names else None
        self.out_dim = (cfg.code_levels * cfg.code_dim + len(self.sparse) * cfg.d_feat
                        + (cfg.d_feat if self.dense_names else 0))

    def forward(self, seq) -> torch.Tensor:
        parts = [emb(seq.codes[..., lvl]) for lvl, emb in enumerate(self.code_emb)]
        for key, emb in self.sparse.items():
            name = key.removesuffix("_emb")
            ids = seq.item if name == "item" else seq.sparse.get(name)
            if ids is None:
                raise KeyError(f"item feature {name!r} is in the model config but missing from the batch "
                               f"(batch has {sorted(seq.sparse)})")
            parts.append(emb(ids))
        if self.dense is not None:
            missing = [n for n in self.dense_names if n not in seq.dense]
            if missing:
                raise KeyError(f"continuous item features {missing} are in the model config but missing from the "
                               f"batch (batch has {sorted(seq.dense)})")
            x = torch.stack([seq.dense[n].float() for n in self.dense_names], dim=-1)
            parts.append(self.dense(_signed_log1p(x).to(self.dense.weight.dtype)))
        return torch.cat(parts, dim=-1)


class EncoderLayer(nn.Module):
    """Pre-RMSNorm block: full self-attention with a key padding mask, then the FFN."""

    def __init__(self, cfg: OneRecConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, backend=cfg.backend)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, cfg.backend)
        self.norm2 = RMSNorm(cfg.d_model, eps=cfg.norm_eps, backend=cfg.backend)
        self.ffn = make_ffn(cfg, "enc")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, real: torch.Tensor | None = None,
                window: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x: [B, S, d]``, ``key_mask: bool [B, 1, 1, S]``; ``real``: int64 ``[T]`` flat indices (into B x S)
        of the real tokens, or None. With ``real`` the FFN runs on those tokens only and padding slots keep
        their attention output (padding is never a key, and its states are never read). ``window``: the key
        mask as one run per row (``EncoderOutput.window``), or None."""
        h = self.norm1(x)
        x = x + self.drop(self.attn(h, h, key_mask, window=window))
        if real is None:
            return x + self.drop(self.ffn(self.norm2(x)))
        flat = x.flatten(0, 1)
        return flat.index_add(0, real, self.drop(self.ffn(self.norm2(flat[real]))).to(flat.dtype)).view_as(x)


class OneRecEncoder(nn.Module):
    """Encodes a batch of users into ``[B, cfg.enc_len, d_model]`` states plus their validity mask."""

    def __init__(self, cfg: OneRecConfig):
        super().__init__()
        from onerec_fast.modules.qformer import QFormer

        self.cfg = cfg
        d = cfg.d_model
        self.static_sparse = nn.ModuleDict({f"{k}_emb": nn.Embedding(n, cfg.d_feat) for k, n in cfg.static_features.items()})
        # A user without static features still gets the static token (from a constant input).
        self.static_mlp = _MLP(max(1, len(cfg.static_features)) * cfg.d_feat, d)
        self.item_features = ItemFeatureEmbedding(cfg)
        fin = self.item_features.out_dim
        self.short_mlp = _MLP(fin, d)
        self.pos_mlp = _MLP(fin, d)
        self.lifelong_mlp = _MLP(fin, d)
        self.qformer = QFormer(d, num_queries=cfg.num_queries, num_blocks=cfg.qformer_blocks,
                               num_heads=cfg.n_heads, d_ff=cfg.d_ff, backend=cfg.backend)
        self.pos_emb = nn.Parameter(torch.randn(cfg.enc_len, d) * 0.02)  # stored order: see the module doc
        # slot -> row of pos_emb: short (rows 1..short_len), static (0), queries, positive newest first
        s, p = cfg.short_len, cfg.pos_len
        order = [*range(1, 1 + s), 0, *range(1 + s + p, cfg.enc_len), *range(s + p, s, -1)]
        self.register_buffer("slot_rows", torch.tensor(order), persistent=False)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.norm = RMSNorm(d, eps=cfg.norm_eps, backend=cfg.backend)
        self.drop = nn.Dropout(cfg.dropout)

    # -- pathways ---------------------------------------------------------------------------------------
    def static_token(self, static: dict[str, torch.Tensor], batch_size: int, device) -> torch.Tensor:
        """``static: {name: int64 [B]}`` -> ``[B, 1, d]``."""
        if not self.static_sparse:
            x = torch.ones(batch_size, self.cfg.d_feat, device=device)
        else:
            names = [k.removesuffix("_emb") for k in self.static_sparse]
            missing = [k for k in names if k not in static]
            if missing:
                raise KeyError(f"static features {missing} are in the model config but missing from the batch "
                               f"(batch has {sorted(static)})")
            x = torch.cat([emb(static[k]) for k, emb in zip(names, self.static_sparse.values())], dim=-1)
        return self.static_mlp(x).unsqueeze(1)

    def item_tokens(self, seq, mlp: nn.Module, max_len: int, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One pathway's items -> right-aligned tokens ``[B, max_len, d]`` (``reverse``: newest first, left-aligned)
        and validity mask ``[B, max_len]``."""
        return right_align(mlp(self.item_features(seq)), seq, max_len, reverse)

    def lifelong_tokens(self, seq) -> torch.Tensor:
        """Compressed lifelong items -> ``[B, num_queries, d]`` through the QFormer."""
        x = self.lifelong_mlp(self.item_features(seq))
        # Offsets/lengths were validated on the host (OneRec.check_batch): no device sync here.
        if _is_padded(seq):
            return self.qformer(x, lengths=seq.lengths, validate=False)
        return self.qformer(x, offsets=seq.offsets, max_len=seq.max_len or None, validate=False)

    # -- the whole encoder ------------------------------------------------------------------------------
    def forward(self, static: dict[str, torch.Tensor], short, positive, lifelong) -> EncoderOutput:
        """``static: {name: int64 [B]}``; ``short``/``positive``/``lifelong``: ``JaggedItems`` or
        :class:`PaddedItems`. Returns states ``[B, enc_len, d]`` and their mask."""
        cfg = self.cfg
        lengths = seq_lengths(short)
        B, device = lengths.numel(), short.codes.device
        s_tok = self.static_token(static, B, device)
        sh, sh_mask = self.item_tokens(short, self.short_mlp, cfg.short_len)
        po, po_mask = self.item_tokens(positive, self.pos_mlp, cfg.pos_len, reverse=True)
        ll = self.lifelong_tokens(lifelong)
        x = self.drop(torch.cat([sh, s_tok, ll.to(s_tok.dtype), po], dim=1) + self.pos_emb[self.slot_rows])
        ones = torch.ones(B, 1, dtype=torch.bool, device=device)
        mask = torch.cat([sh_mask, ones, ones.expand(B, cfg.num_queries), po_mask], dim=1)
        key_mask = mask[:, None, None, :]  # [B, 1, 1, S]: padding never serves as a key
        # the same keys as one run of slots: the short items right-aligned before the static token, the
        # positive items left-aligned after the queries (check_batch bounds both lengths by their slots)
        n_short, n_pos = lengths.int(), seq_lengths(positive).int()
        window = (cfg.short_len - n_short, n_short + 1 + cfg.num_queries + n_pos)
        # A CPU step is compute-bound and most slots of short histories are padding (Amazon Sports: 29 real
        # of 87 slots per user on average): there the FFN runs on the real tokens only (a Sports `small` step
        # 1.35 s -> 1.22 s on a 2-core CPU; MovieLens, 68 of 87 real, gains less). On CUDA the shapes
        # stay fixed (finding the real tokens would sync the host; a GPU step is launch-bound).
        real = mask.flatten().nonzero().squeeze(1) if device.type == "cpu" else None
        for layer in self.layers:
            x = layer(x, key_mask, real, window)
        recent = None
        if cfg.transition_window:
            if short.item is None:
                raise KeyError("transition_window needs the short-term pathway's item ids (batch.short.item)")
            ids, ok = right_align(short.item, short, cfg.short_len)
            recent = torch.where(ok, ids, -1)[:, cfg.short_len - cfg.transition_window:]
        return EncoderOutput(self.norm(x), mask, recent, *window)

    def flops(self, short_len: torch.Tensor, pos_len: torch.Tensor, lifelong_len: torch.Tensor,
              backward: bool = False) -> float:
        """Useful FLOPs of one forward (x3 with backward) for users with the given per-pathway lengths
        (int64 ``[B]`` CPU tensors): GEMMs over real tokens, attention over real query/key pairs, the
        QFormer. Padding slots are not counted."""
        from onerec_fast.perf.flops import attention_flops

        cfg = self.cfg
        d = cfg.d_model
        n_items = float((short_len + pos_len + lifelong_len).sum())
        seq = (1 + short_len + pos_len + cfg.num_queries).tolist()
        tokens = float(sum(seq))
        fin = self.item_features.out_dim
        f = 2.0 * n_items * (fin * d + d * d) + 2.0 * len(seq) * (self.static_mlp[0].in_features * d + d * d)
        f += cfg.enc_layers * (2.0 * tokens * (4 * d * d + cfg.ffn_weights_per_token("enc"))
                               + attention_flops(seq, seq, cfg.n_heads, cfg.head_dim))
        f += self.qformer_flops(lifelong_len)
        return f * (3.0 if backward else 1.0)

    def qformer_flops(self, lifelong_len: torch.Tensor) -> float:
        """QFormer FLOPs: per block the queries' projections (cross q/o, self q/k/v/o) and SwiGLU, the
        items' K/V projections, cross-attention over the real items and self-attention among queries."""
        from onerec_fast.perf.flops import attention_flops

        cfg = self.cfg
        d, q, B = cfg.d_model, cfg.num_queries, lifelong_len.numel()
        per_block = (2.0 * B * q * (6 * d * d + 3 * d * cfg.d_ff) + 2.0 * float(lifelong_len.sum()) * 2 * d * d
                     + attention_flops([q] * B, lifelong_len.tolist(), cfg.n_heads, cfg.head_dim)
                     + attention_flops([q] * B, [q] * B, cfg.n_heads, cfg.head_dim))
        return cfg.qformer_blocks * per_block
