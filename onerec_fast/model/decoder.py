"""The OneRec decoder (TR 2.3): point-wise generation of one item's semantic ID, code by code.

Input ``[BOS, c_0, ..., c_{L-2}]`` (a learned BOS vector, then the code embeddings of levels 0..L-2, plus
learned positions); ``dec_layers`` pre-RMSNorm blocks of causal self-attention, cross-attention to the
encoder states (padding slots masked) and an FFN (``MoELayer`` for the MoE presets, dense SwiGLU
otherwise); a final RMSNorm and one LM head per level: position t predicts code level t. The training
loss is the next-token cross-entropy averaged over the L codes.

With ``cfg.node_heads`` the catalogue's trie (``onerec_fast.decoding.SemanticIDTrie``) adds per-prefix
parameters: the logit of code ``c`` after prefix ``p`` is ``h . (W[c] + N[p + c]) + b[p + c]`` (``W`` the
level's code head, ``N``/``b`` one vector and bias per trie node, the depth-L nodes being the items), and the
input at position t adds the vector of the depth-t prefix. Every method then takes the ``trie``.

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
from onerec_fast.model.encoder import EncoderOutput, newest_item_slot
from onerec_fast.model.layers import Attention, make_ffn, merge_heads, split_heads
from onerec_fast.modules.rms_norm import RMSNorm

__all__ = ["OneRecDecoder", "DecodeState"]


def _take(vec: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``vec[idx]`` (``vec: [N]``) whose backward is an embedding's. The indices here repeat a lot (padding
    children clamp to node 0, pairs never seen land anywhere): the backward of ``vec[idx]`` accumulates each
    run of one index serially, 0.6 ms per call at batch 256 with the ``small`` preset on an H100 (a quarter of
    its training step, session 15 profile); the embedding backward reduces runs in parallel."""
    return F.embedding(idx, vec[:, None]).squeeze(-1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: OneRecConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1 = RMSNorm(d, eps=cfg.norm_eps, backend=cfg.backend)
        self.self_attn = Attention(d, cfg.n_heads, cfg.attention_dropout, cfg.backend)
        self.norm2 = RMSNorm(d, eps=cfg.norm_eps, backend=cfg.backend)
        self.cross_attn = Attention(d, cfg.n_heads, cfg.attention_dropout, cfg.backend)
        self.norm3 = RMSNorm(d, eps=cfg.norm_eps, backend=cfg.backend)
        self.ffn = make_ffn(cfg, "dec")
        self.drop = nn.Dropout(cfg.dropout)  # residual branches, training only


@dataclass
class DecodeState:
    """What generation carries between steps for B users x ``beam`` beams."""

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, k/v [B, H, S, Dh], shared by the beams
    key_mask: torch.Tensor  # bool [B, 1, 1, S]
    self_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, k/v [B, beam, H, t, Dh]
    newest: torch.Tensor | None = None  # [B, d] added to BOS (cfg.bos_newest_item), else None
    recent: torch.Tensor | None = None  # int64 [B, cfg.transition_window] newest item ids (EncoderOutput.recent)
    # cfg.transition_mixture: each user's number of chain successors [B], each beam's log P_net(prefix)
    # [B, nb] and the network's conditionals of the last step [B, nb, V] (OneRecDecoder.mix_transitions)
    chain_total: torch.Tensor | None = None
    net_logp: torch.Tensor | None = None
    net_lp: torch.Tensor | None = None


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
        self.norm = RMSNorm(d, eps=cfg.norm_eps, backend=cfg.backend)
        self.heads = nn.ModuleList(nn.Linear(d, v, bias=False) for v in cfg.vocab_sizes)
        if cfg.node_heads:
            if not cfg.trie_nodes:
                raise ValueError("node_heads needs cfg.trie_nodes, the catalogue trie's node count per depth "
                                 "(features_from_dataset fills it)")
            # Zero-initialised, so training starts from the code-only model; weight decay pulls the vectors
            # of rarely seen prefixes back to their code's shared one.
            self.node_out = nn.ModuleList(nn.Embedding(n, d) for n in cfg.trie_nodes)
            self.node_bias = nn.ParameterList(nn.Parameter(torch.zeros(n)) for n in cfg.trie_nodes) if cfg.node_bias \
                else None
            self.node_in = nn.ModuleList(nn.Embedding(n, d) for n in cfg.trie_nodes[:-1])
            for emb in (*self.node_out, *self.node_in):
                nn.init.zeros_(emb.weight)
        if cfg.transition_window:
            # Sorted keys item * total_nodes + (nodes above depth t + 1) + node of the (recent item, depth-(t+1)
            # node) pairs (transition_table); a bias each, zero at the start (the model without them).
            self.register_buffer("transition_keys", torch.zeros(cfg.transition_pairs, dtype=torch.int64))
            self.transition_bias = nn.Parameter(torch.zeros(cfg.transition_pairs))
            if cfg.transition_prior or cfg.transition_mixture:
                # occurrences of each pair and of its recent item (TransitionTable.counts)
                self.register_buffer("transition_counts", torch.zeros(cfg.transition_pairs, 2))
            if cfg.transition_prior:  # a and b per level
                self.transition_weights = nn.ParameterList(nn.Parameter(torch.zeros(2)) for _ in cfg.trie_nodes)
            if cfg.transition_mixture:  # the chain's weight w in generation (OneRec.set_transition_mixture)
                self.register_buffer("transition_mix", torch.tensor(0.5))
            self.register_buffer("node_offsets", torch.tensor([0, *cfg.trie_nodes], dtype=torch.int64).cumsum(0),
                                 persistent=False)

    def node_tables(self) -> list[nn.Parameter]:
        """The per-trie-node parameters (empty without ``cfg.node_heads``): their size grows with the catalogue
        (the transition biases' with the training log)."""
        if not self.cfg.node_heads:
            return []
        return [*(e.weight for e in self.node_out), *(self.node_bias or ()), *(e.weight for e in self.node_in),
                *([self.transition_bias] if self.cfg.transition_window else []),
                *(self.transition_weights if self.cfg.transition_prior else ())]

    def _need_trie(self, trie) -> None:
        if self.cfg.node_heads and trie is None:
            raise ValueError("this decoder has node heads (cfg.node_heads): pass the catalogue's trie "
                             "(OneRec.decoder_trie(device))")

    # -- shared pieces -----------------------------------------------------------------------------------
    def embed_token(self, token: torch.Tensor | None, t: int, shape: tuple[int, ...],
                    node: torch.Tensor | None = None) -> torch.Tensor:
        """The input vector at position ``t``: BOS for t = 0, else the embedding of the level-(t-1) code
        ``token: int64 [*shape]`` plus, with node heads, that of the depth-t prefix ``node: int64 [*shape]``
        (-1, a prefix outside the catalogue: none). Returns ``[*shape, d]``."""
        x = self.bos.expand(*shape, -1) if t == 0 else self.code_emb[t - 1](token)
        if node is not None and t > 0:
            x = x + torch.where((node >= 0)[..., None], self.node_in[t - 1](node.clamp_min(0)), 0.0)
        return x + self.pos_emb[t]

    def head_logits(self, t: int, h: torch.Tensor, children: tuple[torch.Tensor, torch.Tensor] | None = None,
                    recent: torch.Tensor | None = None, own: torch.Tensor | None = None,
                    pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Level-``t`` logits ``[R, V_t]`` of final hidden states ``h: [R, d]``. With node heads, ``children``
        is ``trie.child_nodes(t, nodes)`` of each row's depth-t prefix (ids and tokens ``[R, K]``): each child's
        vector and bias are added to its code's logit (fp32); with ``cfg.transition_window``, also the
        transition biases of the row's ``recent: int64 [R, W]`` item ids (-1: none) with each child. ``own:
        int64 [R]``: a training row's target node at depth t + 1, whose occurrences the prior leaves out.
        ``pairs``: :meth:`_find_pairs` of these children, where the caller already looked them up."""
        logits = self.heads[t](h)
        if not self.cfg.node_heads:
            return logits
        ids, tokens = children
        ok = ids >= 0
        safe = ids.clamp_min(0)
        s = torch.einsum("rd,rkd->rk", h, self.node_out[t](safe).to(h.dtype)).float()
        if self.node_bias is not None:
            s = s + _take(self.node_bias[t], safe)
        if self.cfg.transition_window:
            s = s + self.transition_logits(t, safe, recent, own, pairs)
        col = torch.where(ok, tokens, logits.shape[-1])  # padding lands in a spare column, dropped
        out = torch.cat([logits.float(), logits.new_zeros(logits.shape[0], 1, dtype=torch.float32)], dim=1)
        return out.scatter_add(1, col, torch.where(ok, s, 0.0))[:, :-1]

    def transition_logits(self, t: int, children: torch.Tensor, recent: torch.Tensor,
                          own: torch.Tensor | None = None,
                          pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """fp32 ``[R, K]``: the sum over each row's ``recent: int64 [R, W]`` items (-1: none) of the bias of the pair
        (item, child) for the depth-(t+1) nodes ``children: int64 [R, K]``; 0 for pairs never seen in training.
        With ``cfg.transition_prior`` a seen pair adds ``a_t log(1 + c) + b_t log(1 + n)`` of its counts, where a
        training row (``own: int64 [R]``, its target's depth-(t+1) node) first takes its own occurrences out: one
        per window slot holding the item, from ``n`` always and from ``c`` where the child is ``own``; a pair left
        with ``c = 0`` adds its bias alone. One binary search per pair into the sorted keys (``pairs``: already
        searched, :meth:`_find_pairs`), no host sync."""
        if self.transition_keys.numel() == 0:
            return children.new_zeros(children.shape, dtype=torch.float32)
        pos, hit = self._find_pairs(t, children, recent) if pairs is None else pairs
        bias = _take(self.transition_bias, pos)
        if self.cfg.transition_prior:
            counts = self.transition_counts[pos]  # [R, W, K, 2]
            pair, item = counts.unbind(-1)
            if own is not None:
                slots = (recent[:, :, None] == recent[:, None, :]).sum(-1, keepdim=True).float()  # [R, W, 1]
                item = item - slots
                pair = pair - torch.where(children[:, None, :] == own[:, None, None], slots, 0.0)
            a, b = self.transition_weights[t].unbind()
            bias = bias + torch.where(pair > 0, a * pair.clamp_min(0).log1p() + b * item.clamp_min(0).log1p(), 0.0)
        return torch.where(hit, bias, 0.0).sum(1)

    def _find_pairs(self, t: int, children: torch.Tensor, recent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pos, hit)``, int64 and bool ``[R, W, K]``: where the pair (``recent[r, w]``, depth-(t+1) node
        ``children[r, k]``) sits in the sorted transition keys, and whether it is there (False for a recent
        slot of -1). One binary search per pair; the keys must not be empty."""
        keys = self.transition_keys
        key = recent[:, :, None] * self.node_offsets[-1] + self.node_offsets[t] + children[:, None, :]
        pos = torch.searchsorted(keys, key).clamp_max(keys.numel() - 1)
        return pos, (keys[pos] == key) & (recent[:, :, None] >= 0)

    def mix_transitions(self, state: DecodeState, t: int, logits: torch.Tensor, children: tuple[torch.Tensor, torch.Tensor],
                        pairs: tuple[torch.Tensor, torch.Tensor] | None, parents: torch.Tensor | None,
                        token: torch.Tensor | None) -> torch.Tensor:
        """``cfg.transition_mixture`` in generation: from the network's level-t logits ``[B, nb, V]`` (nb = 1 at
        t = 0, else beam) of each beam's prefix, the log-probability ``[B, nb, V]`` of each valid child under
        the mixture (1 - w) P_net + w P_chain, given the prefix: ``log m(prefix + v) - log m(prefix)`` with
        ``m`` the mixture's probability of a prefix (its items' sum under either part), -inf for codes that
        are no child. The beam's running score then sums to ``log m`` of the whole path. ``children``: as
        :meth:`head_logits` (``[B * nb, K]``); ``pairs``: :meth:`_find_pairs` of those children and the rows'
        recent items (None without transition keys: no chain); ``parents``/``token``: as :meth:`step`. Keeps
        each beam's ``log P_net(prefix)`` and the network's conditionals in ``state``. The chain counts how often
        a training target under each child followed one of the row's recent items within the window, summed
        over the window; at t = 0 (every depth-1 node a child) that sums to the row's successors."""
        B, nb, V = logits.shape
        ids, tokens = children
        ok = ids >= 0
        col = torch.where(ok, tokens, V)  # padding lands in a spare column, dropped
        valid = torch.zeros(B * nb, V + 1, dtype=torch.bool, device=logits.device).scatter_(1, col, True)[:, :V]
        lp = logits.masked_fill(~valid.view(B, nb, V), float("-inf")).log_softmax(-1)  # the network's, per prefix
        succ = logits.new_zeros(ids.shape)
        if pairs is not None:
            pos, hit = pairs
            succ = torch.where(hit, self.transition_counts[pos, 0], 0.0).sum(1)  # padding: dropped by the scatter
        succ = logits.new_zeros(B * nb, V + 1).scatter_add_(1, col, succ)[:, :V].view(B, nb, V)
        if t == 0:
            state.chain_total = succ.sum(-1)[:, 0]  # [B]: every depth-1 node is a child of the root
            net = logits.new_zeros(B, nb)
        else:
            p = parents.clamp_min(0)
            prev_net, prev_lp = state.net_logp.expand(B, p.shape[1]), state.net_lp.expand(B, p.shape[1], -1)
            net = prev_net.gather(1, p) + prev_lp.gather(1, p[..., None].expand(-1, -1, prev_lp.shape[-1])
                                                            ).gather(2, token[..., None])[..., 0]
        state.net_logp, state.net_lp = net, lp
        # P_chain of each child; all 0 for a user whose recent items have no successor, whose conditionals then
        # come out as the network's alone (the (1 - w) cancels between child and prefix)
        chain = succ / state.chain_total.clamp_min(1.0)[:, None, None]
        log_w, log_net_w = self.transition_mix.log(), torch.log1p(-self.transition_mix)
        child = torch.logaddexp((log_net_w + net)[..., None] + lp, log_w + chain.log())
        prefix = torch.logaddexp(log_net_w + net, log_w + chain.sum(-1).log())
        return torch.where(torch.isfinite(prefix)[..., None], child - prefix[..., None], float("-inf"))

    def newest_item_state(self, enc: EncoderOutput) -> torch.Tensor | None:
        """``[B, d]``: what BOS adds with ``cfg.bos_newest_item``, the encoder state of each user's newest item
        (the last short-term slot; zero for a user without history); None without it."""
        if not self.cfg.bos_newest_item:
            return None
        slot = newest_item_slot(self.cfg)
        return enc.states[:, slot] * enc.mask[:, slot, None]

    def cross_kv(self, enc: EncoderOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cross-attention keys and values of the encoder states: ``[B, H, S, Dh]`` each."""
        return [layer.cross_attn.project_kv(enc.states) for layer in self.layers]

    # -- training ----------------------------------------------------------------------------------------
    def forward(self, codes: torch.Tensor, enc: EncoderOutput, trie=None,
                nodes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Teacher-forced logits. ``codes: int64 [B, L]`` (the target item's codes) -> per level ``l`` the
        logits ``[B, V_l]`` for code ``l`` given BOS and codes ``0..l-1``. ``trie``: the catalogue's, required
        with node heads; ``nodes``: ``trie.prefix_nodes(codes)`` when the caller already walked it."""
        self._need_trie(trie)
        B, L = codes.shape
        if not self.cfg.node_heads:
            nodes = None
        elif nodes is None:
            nodes = trie.prefix_nodes(codes)  # [B, L + 1]
        inputs = [self.embed_token(codes[:, t - 1] if t else None, t, (B,), nodes[:, t] if nodes is not None else None)
                  for t in range(L)]
        newest = self.newest_item_state(enc)
        if newest is not None:
            inputs[0] = inputs[0] + newest
        x = torch.stack(inputs, dim=1)
        key_mask = enc.mask[:, None, None, :]
        for layer in self.layers:
            h = layer.norm1(x)
            x = x + layer.drop(layer.self_attn(h, h, causal=True))
            x = x + layer.drop(layer.cross_attn(layer.norm2(x), enc.states, key_mask, window=enc.window))
            x = x + layer.drop(layer.ffn(layer.norm3(x)))
        h = self.norm(x)
        # in training, the transition prior leaves each row's own occurrences out of its counts
        own = nodes if self.training and self.cfg.transition_prior else None
        return [self.head_logits(t, h[:, t], trie.child_nodes(t, nodes[:, t]) if nodes is not None else None,
                                 enc.recent, own[:, t + 1] if own is not None else None)
                for t in range(L)]

    def loss(self, codes: torch.Tensor, enc: EncoderOutput, masks: list[torch.Tensor] | None = None,
             trie=None, nodes: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy averaged over the B x L target codes (fp32). ``masks`` (bool ``[B, V_l]``
        per level, True on the target code): each level's softmax runs over the masked-in codes only.
        ``trie``/``nodes``: as :meth:`forward`."""
        logits = [lg.float() for lg in self.forward(codes, enc, trie, nodes)]
        if masks is not None:
            logits = [lg.masked_fill(~m, float("-inf")) for lg, m in zip(logits, masks)]
        return torch.stack([F.cross_entropy(lg, codes[:, t]) for t, lg in enumerate(logits)]).mean()

    # -- generation --------------------------------------------------------------------------------------
    def start(self, enc: EncoderOutput) -> DecodeState:
        return DecodeState(self.cross_kv(enc), enc.mask[:, None, None, :], [], self.newest_item_state(enc), enc.recent)

    def step(self, state: DecodeState, t: int, token: torch.Tensor | None, parents: torch.Tensor | None,
             beam: int, nodes: torch.Tensor | None = None, trie=None, hidden_only: bool = False) -> torch.Tensor:
        """Logits ``[B, beam, V_t]`` of code level ``t`` for every beam (with ``hidden_only``, the final
        hidden states ``[B, beam, d]`` that ``heads[t]`` would score: for the fused constrained LM head; not
        with node heads, whose per-node vectors that head does not add).

        ``token: int64 [B, beam]`` is each beam's level-(t-1) code (None at t = 0); ``parents: int64
        [B, beam]`` the beam each one extends (its cache row; -1 for dead beams, whose scores are -inf and
        whose outputs are ignored). At t = 0 every beam holds the same prefix (BOS), so one row per user
        is computed and broadcast. With node heads: ``trie`` and ``nodes: int64 [B, beam]``, each beam's
        depth-t trie node (-1 for a dead beam or a prefix outside the catalogue; ignored at t = 0).
        """
        self._need_trie(trie)
        B = state.key_mask.shape[0]
        nb = 1 if t == 0 else beam
        if not self.cfg.node_heads:
            nodes = None
        elif t == 0:
            nodes = torch.zeros(B, 1, dtype=torch.int64, device=state.key_mask.device)
        else:
            nodes = nodes.long()
        x = self.embed_token(token, t, (B, nb), nodes)  # [B, nb, d]
        if t == 0 and state.newest is not None:
            x = x + state.newest[:, None]
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
            # Every cached position is visible, at most L keys per query: two small matmuls. With SDPA here, a
            # beam-256 evaluation of 256 users failed in cuDNN attention on an H100 ("mha_graph.execute(...)
            # .is_good()", 2026-12-06; beam 128 ran): this is the attention whose batch is B x beam (65,536).
            scores = (q @ k_new.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, nb, H, 1, t + 1]
            a = scores.float().softmax(-1).to(v_new.dtype) @ v_new  # [B, nb, H, 1, Dh]
            x = x + layer.self_attn.o(merge_heads(a).view(B, nb, -1))
            ck, cv = state.cross_kv[i]
            x = x + layer.cross_attn.attend(layer.norm2(x), ck, cv, state.key_mask)  # [B, nb, d]: beams as queries
            x = x + layer.ffn(layer.norm3(x))
        state.self_kv = new_cache
        if hidden_only:
            if self.cfg.node_heads:
                raise ValueError("hidden_only: the node heads' per-node vectors need head_logits (cfg.node_heads)")
            h = self.norm(x)
            return h.expand(B, beam, -1) if nb == 1 else h
        children = trie.child_nodes(t, nodes.reshape(-1)) if self.cfg.node_heads else None
        recent = state.recent.repeat_interleave(nb, 0) if state.recent is not None else None  # [B * nb, W]
        # the transition pairs are looked up once for the biases and the mixture's chain
        pairs = (self._find_pairs(t, children[0].clamp_min(0), recent)
                 if self.cfg.transition_mixture and self.transition_keys.numel() else None)
        logits = self.head_logits(t, self.norm(x).reshape(B * nb, -1), children, recent, pairs=pairs).view(B, nb, -1)
        if self.cfg.transition_mixture:
            logits = self.mix_transitions(state, t, logits, children, pairs, parents, token)
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
