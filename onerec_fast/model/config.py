"""``OneRecConfig``: the shape of a OneRec model, with the presets of the OneRec TR's scaling study.

The TR (arXiv 2506.13695) names its models by parameter count: OneRec-0.015B, -0.121B, -0.935B and
-2.633B. The widths and depths below are ours, chosen so that the *dense* parameter count of the model
this package builds matches the name within ``PARAM_MARGIN`` (checked in ``tests/test_model.py``).
"Dense" means every parameter except the sparse ID tables whose size grows with the dataset (user id,
item id, author, tag, ... embeddings); the semantic-ID code embeddings and the LM heads (8192 codes per
level) are counted.

=========  =======  ======  ===========  ============  ============================================
preset     d_model  heads   enc / dec    d_ff (expert) FFN
=========  =======  ======  ===========  ============  ============================================
tiny       64       4       2 / 2        128           decoder MoE 4 experts top-2 (tests)
small      128      4       2 / 2        512           dense SwiGLU, dropout 0.2, node heads, BOS + newest item (public benchmarks)
0.015b     160      5       5 / 5        640           dense SwiGLU
0.121b     512      8       8 / 8        2304          dense SwiGLU
0.935b     1024     16      8 / 8        4096 / 1024   decoder MoE 24 experts top-2 (expert d_ff 1024)
2.6b       1024     16      12 / 12      4096 / 1344  MoE 24 experts top-4 in encoder and decoder
=========  =======  ======  ===========  ============  ============================================

Dense parameter counts (``OneRec(cfg).num_parameters()``): 0.015b 14.6M, 0.121b 123.3M, 0.935b 912.4M,
2.6b 2636.7M. The 2.6b preset has 24 transformer layers in all (12 encoder + 12 decoder).

Sequence layout (TR 2.2): 1 static token + ``short_len`` (20) + ``pos_len`` (256) + ``num_queries``
(128) lifelong tokens = 405 encoder states for the TR sizes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

__all__ = ["OneRecConfig", "PRESETS", "PARAM_MARGIN", "nominal_parameters"]

# Allowed relative gap between a preset's dense parameter count and the count in its name.
PARAM_MARGIN = 0.05

# Feature sets the presets use by default: those of the synthetic world (onerec_fast.data). Real
# datasets override them (``OneRecConfig.preset(name, static_features=..., ...)``).
_DEFAULT_STATIC = {"uid": 100_000, "gender": 3, "age": 8}
_DEFAULT_ITEM_CAT = {"item": 100_000, "author": 10_000, "tag": 512, "like": 2, "follow": 2, "forward": 2, "comment": 2}
_DEFAULT_ITEM_NUM = ("timestamp", "playtime", "duration")


@dataclass
class OneRecConfig:
    """Hyper-parameters of a OneRec encoder-decoder.

    Feature specs: ``static_features`` maps each static user feature to its cardinality (one token);
    ``item_cat_features`` maps each categorical per-item feature (item id, author, tag, labels) to its
    cardinality; ``item_num_features`` names the continuous per-item features (timestamp, playtime,
    duration). Any of them may be empty; the semantic-ID codes are always used.
    """

    name: str = "custom"
    d_model: int = 64
    n_heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    d_ff: int = 128  # hidden width of the dense SwiGLU FFNs (and of the QFormer FFN)
    enc_moe_experts: int = 0  # 0 -> dense SwiGLU FFN in the encoder
    enc_moe_top_k: int = 0
    dec_moe_experts: int = 0  # 0 -> dense SwiGLU FFN in the decoder
    dec_moe_top_k: int = 0
    moe_d_ff: int = 0  # per-expert hidden width (0 -> d_ff)
    moe_router: str = "sigmoid"  # "sigmoid" routes on scores + expert_bias: the TR's loss-free balancing
    expert_bias_rate: float = 1e-3  # step of the loss-free expert-bias update after every optimizer step
    moe_aux_loss_coef: float = 0.0
    moe_z_loss_coef: float = 0.0
    code_levels: int = 3
    codebook_size: int | tuple[int, ...] = 8192  # per level, or one size for all levels
    d_feat: int = 32  # width of each sparse feature embedding
    d_code: int = 0  # width of each code embedding in the encoder's item features (0 -> d_model // 2)
    short_len: int = 20
    pos_len: int = 256
    lifelong_len: int = 2000
    num_queries: int = 128
    qformer_blocks: int = 2
    static_features: dict[str, int] = field(default_factory=lambda: dict(_DEFAULT_STATIC))
    item_cat_features: dict[str, int] = field(default_factory=lambda: dict(_DEFAULT_ITEM_CAT))
    item_num_features: tuple[str, ...] = _DEFAULT_ITEM_NUM
    norm_eps: float = 1e-6
    dropout: float = 0.0  # on the input tokens, attention weights and residual branches (training only)
    # Dropout on the attention weights alone (None: ``dropout``). Without it a CPU step is cheaper (a ``small``
    # ML-100K step on a fixed batch: 2.26 s -> 1.44 s), but ML-100K quality fell (0.1103 / 0.0516
    # -> 0.0986 / 0.0491 Recall/NDCG@10, CPU, seed 0; docs/ARCHITECTURE.md): the presets keep it.
    attn_dropout: float | None = None
    # Train each code level's softmax over the target prefix's children in the catalogue trie only, and rank by
    # the same renormalized probabilities at generation (beam search normalize="valid"): the model is then a
    # proper distribution over the catalogue's items. False: softmax over the whole codebook ("full").
    trie_loss: bool = False
    # Per-prefix parameters (the decoder's node heads): every node of the catalogue's trie (each prefix of an
    # item's codes; the depth-L nodes are the items themselves) gets an output vector and a bias, added to the
    # code head's logit of the code that leads to it, and the prefixes of depth 1..L-1 an input vector. A code
    # then means one thing per prefix instead of one thing under every parent. ``trie_nodes``: the node count
    # at depth 1..L (``features_from_dataset`` fills it); the parameters belong to that catalogue.
    node_heads: bool = False
    # With node heads, a learned bias per trie node besides its vector. A bias scores a node alike for every
    # user (its training frequency under its parent); without it a node's score depends on the user state.
    node_bias: bool = True
    trie_nodes: tuple[int, ...] = ()
    # The decoder's first input (BOS) adds the encoder state of the user's newest item (the last short-term
    # slot), so the residual stream that predicts the first code starts from the item just consumed, as the
    # last position of a causal sequence model does, instead of reaching it through cross-attention alone.
    # Without it the demo's model learned to ignore its encoder (the same code logits for every user) and
    # stayed at popularity; with it, test Recall/NDCG@10 0.066 / 0.030 -> 0.099 / 0.049 (docs/ARCHITECTURE.md).
    bos_newest_item: bool = False
    # With node heads, a learned bias per (recent item, trie node) pair seen in training: the user's
    # ``transition_window`` newest items each add the bias of the pair they formed with a child node whenever
    # a training target on that node's path followed them within that many items (pairs never seen add 0).
    # Exact transitions at every depth, the coarse ones included, where a code shared by hundreds of items
    # cannot remember that item j was once followed by a rarely seen item i. ``transition_pairs``: the number
    # of such pairs (``transition_table``); the parameters belong to that training log. 0: off.
    transition_window: int = 0
    transition_pairs: int = 0
    # With transitions, each seen pair's bias also gets a learned per-level function of its counts,
    # a * log(1 + c) + b * log(1 + n) (c: the pair's occurrences, n: those of its recent item), so that a pair
    # seen once moves from two weights every pair shares instead of from its own bias's ~one Adam update per
    # epoch. In training a sample's own occurrences are left out of the counts (a pair only it formed gets no
    # prior): with them in, the target's pairs are always "seen" in training and rarely at test, and the
    # weights learned that leak at once (Sports, session 12: 0.0249 against 0.0396 Recall@10). The ``small``
    # training recipe turns it on (Sports, 3 seeds: 0.0456 / 0.0249 Recall/NDCG@10 against 0.0396 / 0.0208).
    transition_prior: bool = False
    # With transitions, generation ranks items by a mixture of the network and a first-order Markov chain over
    # items read from the same training counts: P(i) = (1 - w) P_net(i) + w P_chain(i), where P_chain(i) is
    # the share of the training successors of the user's transition_window newest items that were i (w = 0
    # for a user whose recent items were never followed in training). The beam ranks every prefix by its
    # mixture probability (both parts sum over a prefix's items), so an item the chain makes likely is found
    # even where its coarse codes are unlikely under the network: a rarely seen target. w is a buffer
    # (``OneRec.set_transition_mixture``, 0.5 until set), chosen on the validation split by ``onerec-fast
    # train`` (by the ranking metric: by likelihood about 0.05 would win, since most targets get nothing
    # from the chain). The network trains as without it. Why: the network's learned prior lifts a pair seen
    # once by about 1.2 nats over the four levels, less than the popular items' lead, so rare successors stay
    # out of the beam. Sports, 3 seeds through the CLI: test Recall/NDCG@10 0.0532 / 0.0305 against the
    # SASRec-style 0.0472 / 0.0228; seed 0 without the chain 0.0459 / 0.0244 (docs/ARCHITECTURE.md).
    transition_mixture: bool = False
    backend: str = "auto"  # passed to MoELayer, QFormer and RMSNorm ("reference" = plain PyTorch everywhere)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        for which in ("enc", "dec"):
            e, k = getattr(self, f"{which}_moe_experts"), getattr(self, f"{which}_moe_top_k")
            if e < 0 or (e > 0 and not 1 <= k <= e):
                raise ValueError(f"{which}_moe_top_k must be in [1, {which}_moe_experts={e}], got {k}")
        if self.code_levels < 1:
            raise ValueError(f"code_levels must be >= 1, got {self.code_levels}")
        sizes = self.vocab_sizes
        if len(sizes) != self.code_levels or min(sizes) < 1:
            raise ValueError(f"codebook_size must be one positive int or {self.code_levels} of them, got {self.codebook_size}")
        if self.transition_window < 0 or self.transition_window > self.short_len:
            raise ValueError(f"transition_window must be in [0, short_len={self.short_len}], got {self.transition_window}")
        if self.transition_window and not self.node_heads:
            raise ValueError("transition_window needs node_heads (its biases are per trie node)")
        if self.transition_prior and not self.transition_window:
            raise ValueError("transition_prior needs transition_window (it adds to the transition biases)")
        if self.transition_mixture and not self.transition_window:
            raise ValueError("transition_mixture needs transition_window (its chain reads the transition counts)")
        for name in ("short_len", "pos_len", "lifelong_len", "num_queries", "qformer_blocks", "enc_layers", "dec_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_dropout is not None and not 0.0 <= self.attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must be in [0, 1) or None, got {self.attn_dropout}")
        self.item_num_features = tuple(self.item_num_features)
        self.trie_nodes = tuple(int(n) for n in self.trie_nodes)
        if self.trie_nodes and (len(self.trie_nodes) != self.code_levels or min(self.trie_nodes) < 1):
            raise ValueError(f"trie_nodes must hold the catalogue trie's node count at each of the {self.code_levels} "
                             f"depths, got {self.trie_nodes}")

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Codebook size of each code level: ``[code_levels]``."""
        c = self.codebook_size
        return tuple(int(v) for v in c) if isinstance(c, (tuple, list)) else (int(c),) * self.code_levels

    @property
    def attention_dropout(self) -> float:
        """Dropout on the attention weights: ``attn_dropout``, else ``dropout``."""
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    @property
    def code_dim(self) -> int:
        return self.d_code or max(8, self.d_model // 2)

    @property
    def enc_len(self) -> int:
        """Encoder states per user: static + short-term + positive-feedback + lifelong queries."""
        return 1 + self.short_len + self.pos_len + self.num_queries

    def ffn_weights_per_token(self, part: str) -> int:
        """Weights one token multiplies in an ``"enc"`` or ``"dec"`` FFN: the dense SwiGLU, or the router
        plus ``top_k`` experts (the FLOP count per token is twice this)."""
        e, k = getattr(self, f"{part}_moe_experts"), getattr(self, f"{part}_moe_top_k")
        if e:
            return 3 * self.d_model * self.expert_d_ff * k + self.d_model * e
        return 3 * self.d_model * self.d_ff

    def replace(self, **changes) -> "OneRecConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "OneRecConfig":
        """A preset by name (see ``PRESETS``), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)


def nominal_parameters(name: str) -> float:
    """The parameter count a preset's name states: ``"0.935b"`` -> 0.935e9 (``nan`` for ``tiny``)."""
    if name.endswith("b"):
        try:
            return float(name[:-1]) * 1e9
        except ValueError:
            pass
    return math.nan


PRESETS: dict[str, OneRecConfig] = {
    "tiny": OneRecConfig(
        name="tiny", d_model=64, n_heads=4, enc_layers=2, dec_layers=2, d_ff=128,
        dec_moe_experts=4, dec_moe_top_k=2, moe_d_ff=64, codebook_size=64, d_feat=16, d_code=32,
        short_len=20, pos_len=64, lifelong_len=256, num_queries=16, qformer_blocks=2,
        static_features={"uid": 1024, "gender": 3, "age": 8},
        item_cat_features={"item": 4096, "author": 256, "tag": 64},
    ),
    # Public benchmark sizes (10^5-10^6 interactions): narrow and shallow, dropout, pathways cut to what such
    # histories use, trie-normalized code softmax, node heads (the ``small`` training recipe; docs/ARCHITECTURE.md).
    "small": OneRecConfig(
        name="small", d_model=128, n_heads=4, enc_layers=2, dec_layers=2, d_ff=512, short_len=20, pos_len=50,
        lifelong_len=1000, num_queries=16, qformer_blocks=1, dropout=0.2, trie_loss=True, node_heads=True,
        bos_newest_item=True,
    ),
    "0.015b": OneRecConfig(name="0.015b", d_model=160, n_heads=5, enc_layers=5, dec_layers=5, d_ff=640),
    "0.121b": OneRecConfig(name="0.121b", d_model=512, n_heads=8, enc_layers=8, dec_layers=8, d_ff=2304),
    "0.935b": OneRecConfig(
        name="0.935b", d_model=1024, n_heads=16, enc_layers=8, dec_layers=8, d_ff=4096,
        dec_moe_experts=24, dec_moe_top_k=2, moe_d_ff=1024,
    ),
    "2.6b": OneRecConfig(
        name="2.6b", d_model=1024, n_heads=16, enc_layers=12, dec_layers=12, d_ff=4096,
        enc_moe_experts=24, enc_moe_top_k=4, dec_moe_experts=24, dec_moe_top_k=4, moe_d_ff=1344,
    ),
}
