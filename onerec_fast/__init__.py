"""onerec_fast: OneRec (Kuaishou's generative recommender) with fused Triton and CUDA kernels.

Public names: the modules and ops users import into their own trainers. The recommender's pieces live
in subpackages: ``onerec_fast.tokenizer`` (RQ-KMeans), ``onerec_fast.data``, ``onerec_fast.model``
(``OneRec``, ``OneRecConfig``), ``onerec_fast.train``, ``onerec_fast.rl`` (``ecpo_loss``, rewards).
Importing never fails because a backend is missing: see :func:`available_backends`.
"""

from onerec_fast.backends import backends as available_backends
from onerec_fast.decoding import (
    BeamSearchResult,
    BeamSearchState,
    SemanticIDTrie,
    constrained_beam_search,
    constrained_beam_search_ref,
)
from onerec_fast.modules import MoEAuxLoss, MoELayer, MoEStats, QFormer, QFormerCrossAttention, RMSNorm
from onerec_fast.numerics import NonFiniteWarning
from onerec_fast.ops.beam_step import beam_step, beam_step_ref
from onerec_fast.ops.lm_head import constrained_lm_head, constrained_lm_head_beam_step
from onerec_fast.ops.moe import moe_experts, moe_experts_ref, moe_ffn, moe_ffn_ref
from onerec_fast.ops.moe_routing import moe_route, moe_route_ref
from onerec_fast.ops.rms_norm import rms_norm, rms_norm_ref
from onerec_fast.ops.varlen_attention import (
    beam_shared_cross_attention,
    padded_cross_attention,
    varlen_cross_attention,
    varlen_cross_attention_ref,
)

__version__ = "0.1.0"

__all__ = [
    "BeamSearchResult",
    "BeamSearchState",
    "MoEAuxLoss",
    "MoELayer",
    "MoEStats",
    "NonFiniteWarning",
    "QFormer",
    "QFormerCrossAttention",
    "RMSNorm",
    "SemanticIDTrie",
    "available_backends",
    "beam_shared_cross_attention",
    "beam_step",
    "beam_step_ref",
    "constrained_beam_search",
    "constrained_beam_search_ref",
    "constrained_lm_head",
    "constrained_lm_head_beam_step",
    "moe_experts",
    "moe_experts_ref",
    "moe_ffn",
    "moe_ffn_ref",
    "moe_route",
    "moe_route_ref",
    "padded_cross_attention",
    "rms_norm",
    "rms_norm_ref",
    "varlen_cross_attention",
    "varlen_cross_attention_ref",
]
