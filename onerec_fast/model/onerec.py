"""``OneRec``: the encoder-decoder generative recommender (TR 2.2-2.3) with trie-constrained generation.

Usage::

    model = OneRec(OneRecConfig.preset("tiny", **features_from_dataset(ds, item_codes)), item_codes)
    loss = model(batch)                      # batch: onerec_fast.data.UserBatch on the model's device
    loss.backward(); opt.step(); model.update_expert_bias()
    out = model.generate(batch, beam_size=128, num_return=10)   # out.item_ids [B, 10], out.scores [B, 10]
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from onerec_fast.model.capture import CapturedDecode, DecodeGraphs
from onerec_fast.model.config import OneRecConfig
from onerec_fast.model.decoder import OneRecDecoder
from onerec_fast.model.encoder import EncoderOutput, OneRecEncoder, seq_lengths
from onerec_fast.model.layers import moe_layers

__all__ = ["OneRec", "GenerateOutput", "features_from_dataset", "TransitionTable", "transition_table", "with_transitions"]


class GenerateOutput(NamedTuple):
    item_ids: torch.Tensor  # int64 [B, K], best first; -1 where fewer than K items are reachable
    scores: torch.Tensor  # float32 [B, K]: log-probability of the item's codes (-inf for empty slots)
    codes: torch.Tensor  # int64 [B, K, L] (-1 for empty slots)


def features_from_dataset(ds, item_codes: torch.Tensor | None = None, *, use_item_id: bool = True,
                          use_user_id: bool = True) -> dict:
    """Config fields describing a ``onerec_fast.data.UserSequenceDataset``'s features: static (uid, unless
    ``use_user_id`` is False, + user features), categorical item features (item id, item and engagement labels),
    continuous ones (``timestamp`` + engagement + item continuous features), and the code levels / codebook
    sizes of ``item_codes: [I, L]`` (defaults to the dataset's codes) and its trie's node counts."""
    from onerec_fast.trie import SemanticIDTrie

    codes = torch.as_tensor(ds.codes if item_codes is None else item_codes)
    sizes = tuple(int(v) + 1 for v in codes.max(dim=0).values.tolist())
    card = ds.cardinalities
    static = {**({"uid": ds.log.num_users} if use_user_id else {}), **{k: card[k] for k in ds.user_sparse}}
    item_cat = ({"item": ds.log.num_items} if use_item_id else {})
    item_cat.update({k: card[k] for k in (*ds.item_sparse, *ds.row_sparse)})
    return {
        "static_features": static,
        "item_cat_features": item_cat,
        "item_num_features": ("timestamp", *ds.row_dense, *ds.item_dense),
        "code_levels": codes.shape[1],
        "codebook_size": sizes,
        "trie_nodes": tuple(SemanticIDTrie(codes, sizes).num_nodes[1:]),
    }


class TransitionTable(NamedTuple):
    """The (recent item, trie node) pairs of a training log (:func:`transition_table`): ``keys: int64 [P]``,
    sorted and unique; ``counts: float32 [P, 2]``, each pair's occurrences and those of its recent item."""

    keys: torch.Tensor
    counts: torch.Tensor


def with_transitions(cfg: OneRecConfig, ds, item_codes: torch.Tensor) -> tuple[OneRecConfig, TransitionTable | None]:
    """``(cfg with transition_pairs set, table)`` for ``OneRec(cfg, item_codes, transitions=table)`` over the
    training dataset ``ds``; ``(cfg, None)`` without ``cfg.transition_window``."""
    import dataclasses

    if not cfg.transition_window:
        return cfg, None
    table = transition_table(ds, item_codes, cfg)
    return dataclasses.replace(cfg, transition_pairs=table.keys.numel()), table


def transition_table(ds, item_codes: torch.Tensor, cfg: OneRecConfig) -> TransitionTable:
    """The (recent item, trie node) pairs of a training ``onerec_fast.data.UserSequenceDataset``
    (``cfg.transition_window``, ``cfg.trie_nodes``): for every training target ``i`` and each of the
    ``transition_window`` items ``j`` right before it, one occurrence of the key ``j * total + offset_d + node``
    for the depth-``d`` node of ``i``'s path, ``d = 1..L`` (``offset_d``: the nodes above depth ``d``; ``total``:
    all nodes), and one of ``j`` as a recent item. ``cfg.transition_pairs`` must be its length
    (``dataclasses.replace``)."""
    import numpy as np

    from onerec_fast.trie import SemanticIDTrie

    if ds.split != "train":
        raise ValueError(f"transition_table reads the training split, got a {ds.split!r} dataset")
    w = cfg.transition_window
    codes = torch.as_tensor(item_codes).long().cpu()
    paths = SemanticIDTrie(codes, list(cfg.vocab_sizes)).prefix_nodes(codes)[:, 1:]  # [I, L] depth 1..L nodes
    offsets = torch.tensor([0, *cfg.trie_nodes], dtype=torch.int64).cumsum(0)
    rows = ds.offsets[ds.sample_user] + ds.sample_pos  # each training target's row in the log
    items = torch.from_numpy(ds.log.item.astype(np.int64))
    keys, recent = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int64)]
    for back in range(1, w + 1):
        has = torch.from_numpy(ds.sample_pos >= back)
        r = torch.from_numpy(rows)[has]
        j, node = items[r - back], paths[items[r]] + offsets[:-1]  # [N], [N, L]
        keys.append((j[:, None] * offsets[-1] + node).flatten())
        recent.append(j)
    keys, pair = torch.unique(torch.cat(keys), return_counts=True)
    per_item = torch.bincount(torch.cat(recent), minlength=len(codes))
    return TransitionTable(keys, torch.stack([pair, per_item[keys // offsets[-1]]], 1).float())


class OneRec(nn.Module):
    """Encoder + decoder; ``item_codes: int64 [I, L]`` (item i has codes ``item_codes[i]``) defines the
    items generation may return (a ``SemanticIDTrie`` built on first use on each device)."""

    def __init__(self, cfg: OneRecConfig, item_codes: torch.Tensor | None = None,
                 transitions: TransitionTable | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = OneRecEncoder(cfg)
        self.decoder = OneRecDecoder(cfg)
        self._init_weights()
        self._tries: dict[torch.device, object] = {}
        self._decode_graphs = DecodeGraphs()  # generate(cuda_graph=True); cleared with the tries
        self.register_buffer("item_codes", torch.zeros(0, cfg.code_levels, dtype=torch.int64), persistent=True)
        if item_codes is not None:
            self.set_items(item_codes)
        if transitions is not None:
            self.set_transitions(transitions)

    def _init_weights(self) -> None:
        """N(0, 0.02) for our linear and embedding weights (GPT-2 style), residual output projections
        scaled by 1/sqrt(2 * layers); the MoE and QFormer modules keep their own initialisation."""
        std = 0.02
        own = [self.encoder.static_sparse, self.encoder.static_mlp, self.encoder.item_features,
               self.encoder.short_mlp, self.encoder.pos_mlp, self.encoder.lifelong_mlp, self.encoder.layers,
               self.decoder.code_emb, self.decoder.layers, self.decoder.heads]
        for block in own:
            for m in block.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=std)
                    if isinstance(m, nn.Linear) and m.bias is not None:
                        nn.init.zeros_(m.bias)
        n = self.cfg.enc_layers + self.cfg.dec_layers
        for layer in [*self.encoder.layers, *self.decoder.layers]:
            for name, p in layer.named_parameters():
                if name.endswith(("attn.o.weight", "w2.weight")):
                    nn.init.normal_(p, std=std / (2 * n) ** 0.5)

    # -- items ---------------------------------------------------------------------------------------------
    def set_items(self, item_codes: torch.Tensor) -> None:
        """Set the catalogue: ``item_codes: int64 [I, L]`` with codes inside the config's codebooks."""
        codes = torch.as_tensor(item_codes)
        if codes.dim() != 2 or codes.shape[1] != self.cfg.code_levels:
            raise ValueError(f"item_codes must be [num_items, {self.cfg.code_levels}], got {tuple(codes.shape)}")
        hi = torch.tensor(self.cfg.vocab_sizes, device=codes.device)
        if codes.numel() and (bool((codes.min(0).values < 0).any()) or bool((codes.max(0).values >= hi).any())):
            raise ValueError(f"item_codes must lie in [0, codebook_size) per level {self.cfg.vocab_sizes}")
        self.item_codes = codes.to(self.item_codes.device, torch.int64)
        self._drop_catalogue_caches()

    def set_transitions(self, table: TransitionTable) -> None:
        """Set the (recent item, trie node) pairs of ``cfg.transition_window`` and their counts
        (:func:`transition_table`); their biases (and the prior's weights) start at zero."""
        if not self.cfg.transition_window:
            raise ValueError("set_transitions: this model has no transition biases (cfg.transition_window = 0)")
        keys, counts = torch.as_tensor(table.keys), torch.as_tensor(table.counts)
        p = self.cfg.transition_pairs
        if keys.dim() != 1 or keys.numel() != p or keys.dtype != torch.int64:
            raise ValueError(f"transition keys must be int64 [cfg.transition_pairs={p}], "
                             f"got {keys.dtype} {tuple(keys.shape)}")
        if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise ValueError("transition keys must be sorted and unique (transition_table returns them so)")
        if counts.shape != (p, 2) or not counts.is_floating_point() or not bool((counts >= 1).all()):
            raise ValueError(f"transition counts must be float [cfg.transition_pairs={p}, 2], each >= 1, "
                             f"got {counts.dtype} {tuple(counts.shape)}")
        dec = self.decoder
        with torch.no_grad():
            dec.transition_keys.copy_(keys)
            dec.transition_bias.zero_()
            if self.cfg.transition_prior or self.cfg.transition_mixture:
                dec.transition_counts.copy_(counts)
            if self.cfg.transition_prior:
                for w in dec.transition_weights:
                    w.zero_()

    def set_transition_mixture(self, weight: float) -> None:
        """The Markov chain's weight ``w`` in generation (``cfg.transition_mixture``): items are ranked by
        ``(1 - w) P_net + w P_chain``; 0 is the network alone. ``onerec-fast train`` chooses it on the
        validation split and stores it in ``best.pt``."""
        if not self.cfg.transition_mixture:
            raise ValueError("set_transition_mixture: this model has no transition mixture (cfg.transition_mixture)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight < 1.0:
            raise ValueError(f"transition mixture weight must be a number in [0, 1), got {weight!r}")
        self.decoder.transition_mix.fill_(float(weight))

    def _drop_catalogue_caches(self) -> None:
        """A new catalogue (or loaded weights): the tries and the decode graphs that read them are stale."""
        self._tries.clear()
        self._decode_graphs.clear()

    def trie(self, device: torch.device | None = None):
        """The ``SemanticIDTrie`` of the catalogue on ``device`` (built once per device)."""
        from onerec_fast.trie import SemanticIDTrie

        device = torch.device(device) if device is not None else self.item_codes.device
        if self.item_codes.shape[0] == 0:
            raise RuntimeError("no catalogue: pass item_codes to OneRec(...) or call set_items() before generating")
        if device not in self._tries:
            trie = SemanticIDTrie(self.item_codes.to(device), list(self.cfg.vocab_sizes))
            if self.cfg.node_heads and tuple(trie.num_nodes[1:]) != self.cfg.trie_nodes:
                raise ValueError(f"the catalogue's trie has {tuple(trie.num_nodes[1:])} nodes per depth but the "
                                 f"model's node heads were built for {self.cfg.trie_nodes}: node-head parameters "
                                 "belong to the catalogue the model was trained on")
            self._tries[device] = trie
        return self._tries[device]

    def decoder_trie(self, device: torch.device | None = None):
        """What the decoder's methods take as ``trie``: the catalogue's trie with node heads, else None."""
        return self.trie(device) if self.cfg.node_heads else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The catalogue's size comes from the checkpoint, not from this model's (possibly empty) buffer.
        key = prefix + "item_codes"
        if key in state_dict:
            self.item_codes = torch.empty_like(state_dict[key], device=self.item_codes.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._drop_catalogue_caches()

    # -- batches ---------------------------------------------------------------------------------------------
    def check_batch(self, batch) -> None:
        """Host-side checks of a ``UserBatch`` (call before moving it to the GPU): every pathway fits its
        slots and the target codes match the code levels. Raises ValueError naming the field."""
        cfg = self.cfg
        for name, limit in (("short", cfg.short_len), ("positive", cfg.pos_len), ("lifelong", cfg.lifelong_len)):
            seq = getattr(batch, name)
            longest = int(seq_lengths(seq).max()) if len(batch) else 0
            if longest > limit:
                raise ValueError(f"batch.{name} has a user with {longest} items, more than the model's {limit} "
                                 f"(config {name if name != 'positive' else 'pos'}_len); nothing is truncated")
        if batch.target_codes.dim() != 2 or batch.target_codes.shape[1] != cfg.code_levels:
            raise ValueError(f"batch.target_codes must be [B, {cfg.code_levels}], got {tuple(batch.target_codes.shape)}")

    def encode(self, batch) -> EncoderOutput:
        """Encoder states of a ``UserBatch`` (``static`` = ``uid`` + ``user_feats``)."""
        static = {"uid": batch.user, **batch.user_feats}
        return self.encoder(static, batch.short, batch.positive, batch.lifelong)

    def forward(self, batch) -> torch.Tensor:
        """Training loss of a ``UserBatch``: next-token cross-entropy over the target's L codes (over the trie's
        valid children of each prefix with ``cfg.trie_loss``), plus the MoE auxiliary losses when their
        coefficients are non-zero."""
        codes = batch.target_codes
        trie = self.trie(codes.device) if self.cfg.trie_loss or self.cfg.node_heads else None
        nodes = trie.prefix_nodes(codes) if trie is not None else None  # one walk serves masks and node heads
        masks = self._valid_masks(trie, nodes) if self.cfg.trie_loss else None
        loss = self.decoder.loss(codes, self.encode(batch), masks, self.decoder_trie(codes.device), nodes)
        if self.cfg.moe_aux_loss_coef or self.cfg.moe_z_loss_coef:
            loss = loss + sum(m.aux_loss() for m in moe_layers(self))
        return loss

    def prefix_masks(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """bool ``[B, V_l]`` per level: the codes that extend each row's prefix ``codes[:, :l]`` to a catalogue
        item (``codes: int64 [B, L]``, the codes of catalogue items). On the device, no host sync."""
        trie = self.trie(codes.device)
        return self._valid_masks(trie, trie.prefix_nodes(codes))

    def _valid_masks(self, trie, nodes: torch.Tensor) -> list[torch.Tensor]:
        return [trie.valid_mask(lvl, nodes[:, lvl]) for lvl in range(self.cfg.code_levels)]

    def code_logits(self, batch) -> list[torch.Tensor]:
        """Teacher-forced logits per level, ``[B, V_l]`` each, for ``batch.target_codes``."""
        codes = batch.target_codes
        return self.decoder(codes, self.encode(batch), self.decoder_trie(codes.device))

    def update_expert_bias(self) -> None:
        """Loss-free load balancing: nudge every MoE layer's expert bias by ``cfg.expert_bias_rate`` from the
        load of its last forward (call once per optimizer step)."""
        for m in moe_layers(self):
            m.update_expert_bias(self.cfg.expert_bias_rate)

    # -- generation --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch, beam_size: int = 128, num_return: int | None = None, normalize: str | None = None,
                 search_backend: str = "auto", lm_head: str = "logits", cuda_graph: bool = False) -> GenerateOutput:
        """Top ``num_return`` (default ``beam_size``) catalogue items per user by trie-constrained beam
        search, best first. The encoder runs once per user; its cross-attention keys/values are shared by
        the user's beams; the decoder keeps a per-beam self-attention KV cache reordered by the search's
        parent indices. ``normalize`` defaults to how the model was trained: ``"valid"`` with
        ``cfg.trie_loss``, else ``"full"``. ``lm_head``: ``"logits"`` (the decoder writes ``[B, beam, V]``
        logits and the search selects from them) or ``"fused"`` (the decoder hands its hidden states to the
        fused constrained LM head, ``ops.lm_head``, which scores only each beam's valid children and the
        normalizer; not with node heads). Both give the same items (tests/test_model.py); "logits" is the
        default: on an H100 the fused head is 31-35% slower at 64 and 256 users (docs/ARCHITECTURE.md).

        ``cuda_graph`` (CUDA only): the decode, every level of it, runs as one CUDA graph, captured on the
        first call of each (batch size, beam, settings) and replayed after (:meth:`decode`); the encoder
        runs eagerly (its jagged pathways change shape with every batch). A replay skips the warning for rows
        left without a finite candidate (reading the device would sync): those rows get dead slots only."""
        k = beam_size if num_return is None else num_return
        if not 1 <= k <= beam_size:
            raise ValueError(f"num_return must be in [1, beam_size={beam_size}], got {num_return}")
        enc = self.encode(batch)
        if not cuda_graph:
            res = self.decode(enc, beam_size, normalize, search_backend, lm_head)
        elif not enc.states.is_cuda:
            raise ValueError(f"cuda_graph=True needs the model and batch on a CUDA device, got {enc.states.device}")
        else:
            res = self._captured_decode(enc, beam_size, normalize, search_backend, lm_head)
        return GenerateOutput(res.item_ids[:, :k], res.scores[:, :k], res.codes[:, :k])

    @torch.no_grad()
    def decode(self, enc: EncoderOutput, beam_size: int = 128, normalize: str | None = None,
               search_backend: str = "auto", lm_head: str = "logits"):
        """Trie-constrained beam search from encoder states (:meth:`generate` after the encoder; arguments as
        there): ``BeamSearchResult`` ``(codes [B, beam, L], scores [B, beam], item_ids [B, beam])``. No host sync
        once the trie of the device is built, so it can be captured in a CUDA graph."""
        from onerec_fast.decoding.beam_search import constrained_beam_search

        normalize = normalize or ("valid" if self.cfg.trie_loss else "full")
        if lm_head not in ("logits", "fused"):
            raise ValueError(f"lm_head must be 'logits' or 'fused', got {lm_head!r}")
        if lm_head == "fused" and self.cfg.node_heads:
            raise ValueError("lm_head='fused' scores codes with the level heads alone; this model has node heads "
                             "(cfg.node_heads), whose per-node vectors only lm_head='logits' adds")
        device = enc.states.device
        trie = self.trie(device)
        node_trie = self.decoder_trie(device)
        state = self.decoder.start(enc)

        weights = [head.weight for head in self.decoder.heads]

        def step_fn(prefix: torch.Tensor, search_state) -> torch.Tensor:
            t = search_state.step
            token = prefix[:, :, t - 1] if t > 0 else None
            out = self.decoder.step(state, t, token, search_state.parents, beam_size, search_state.nodes,
                                    node_trie, hidden_only=lm_head == "fused")
            return out.to(weights[t].dtype) if lm_head == "fused" else out.float()

        if lm_head == "fused":
            return constrained_beam_search(None, trie, enc.states.shape[0], beam_size, normalize, hidden_fn=step_fn,
                                           lm_head_weight=weights, backend=search_backend)
        return constrained_beam_search(step_fn, trie, enc.states.shape[0], beam_size, normalize,
                                       backend=search_backend)

    def _captured_decode(self, enc: EncoderOutput, beam_size: int, normalize: str | None, search_backend: str,
                         lm_head: str):
        """:meth:`decode` through a :class:`CapturedDecode` of this shape and these settings (captured once; the
        key holds every parameter's address, so moving the model captures anew)."""
        key = (tuple(enc.states.shape), enc.states.dtype, enc.states.device, beam_size, normalize, search_backend,
               lm_head, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
               tuple(p.data_ptr() for p in self.parameters()))
        if key not in self._decode_graphs:
            self._decode_graphs[key] = CapturedDecode(
                lambda e: self.decode(e, beam_size, normalize, search_backend, lm_head), enc)
        return self._decode_graphs[key](enc)

    # -- accounting ----------------------------------------------------------------------------------------------
    def num_parameters(self, include_sparse: bool = False) -> int:
        """Parameter count; by default without the sparse ID tables (user/item/feature embeddings), whose
        size grows with the dataset: the count the preset names refer to."""
        sparse = {id(p) for mod in (self.encoder.static_sparse, self.encoder.item_features.sparse)
                  for p in mod.parameters()} | {id(p) for p in self.decoder.node_tables()}
        return sum(p.numel() for p in self.parameters() if include_sparse or id(p) not in sparse)

    def flops(self, batch, backward: bool = False) -> float:
        """Useful FLOPs of a training forward (x3 with ``backward``) on ``batch`` (its offsets read on the
        host: pass the CPU batch)."""
        sl, pl, ll = (seq_lengths(getattr(batch, n)).cpu() for n in ("short", "positive", "lifelong"))
        enc_lens = (1 + sl + pl + self.cfg.num_queries).tolist()
        return self.encoder.flops(sl, pl, ll, backward) + self.decoder.flops(len(batch), enc_lens, backward)

    def generate_flops(self, batch, beam_size: int) -> float:
        """Useful FLOPs of :meth:`generate`: the encoder, the cross-attention K/V, and each decoding step."""
        sl, pl, ll = (seq_lengths(getattr(batch, n)).cpu() for n in ("short", "positive", "lifelong"))
        enc_lens = (1 + sl + pl + self.cfg.num_queries).tolist()
        f = self.encoder.flops(sl, pl, ll) + self.decoder.cross_kv_flops(enc_lens)
        return f + sum(self.decoder.step_flops(len(batch), beam_size, t, enc_lens) for t in range(self.cfg.code_levels))
