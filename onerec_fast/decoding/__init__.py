"""Constrained decoding over semantic IDs: the item trie and trie-constrained beam search."""

from onerec_fast.decoding.beam_search import (
    BeamSearchResult,
    BeamSearchState,
    constrained_beam_search,
    constrained_beam_search_ref,
)
from onerec_fast.trie import SemanticIDTrie

__all__ = [
    "BeamSearchResult",
    "BeamSearchState",
    "SemanticIDTrie",
    "constrained_beam_search",
    "constrained_beam_search_ref",
]
