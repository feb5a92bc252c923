"""From a data source to model-ready datasets: load -> fused item embeddings -> RQ-KMeans codes -> splits.

Shared by ``onerec-fast train / evaluate / generate / demo``. A data source is what
``onerec_fast.data.sources.load_source`` takes: ``"synthetic"`` (the built-in world, sized by ``synthetic``
overrides), a MovieLens folder, an interactions table (``.csv``/``.parquet``) or a SASRec-style sequence file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Prepared", "prepare", "default_codebook_size", "datasets_for"]


def default_codebook_size(num_items: int, levels: int = 3) -> int:
    """Codes per level for a catalogue: about ``2 * N^(1/levels)`` rounded up to a power of two, at most
    8192 (the TR's size), so the last level separates items and the first levels share structure."""
    return int(min(8192, 2 ** math.ceil(math.log2(max(4.0, 2 * num_items ** (1 / levels))))))


@dataclass
class Prepared:
    log: object  # InteractionLog
    world: object | None  # SyntheticWorld when the source is synthetic
    item_emb: torch.Tensor  # float32 [I, D]
    item_codes: torch.Tensor  # int64 [I, L]
    batch_config: object  # BatchConfig
    datasets: dict = field(default_factory=dict)  # split -> UserSequenceDataset
    tokenizer_stats: str = ""


def datasets_for(log, item_codes, item_emb, batch_config, splits=("train", "test")) -> dict:
    from onerec_fast.data import UserSequenceDataset

    return {s: UserSequenceDataset(log, item_codes, s, item_emb=item_emb, config=batch_config) for s in splits}


def prepare(source: str, *, seed: int = 0, levels: int = 3, codebook_size: int | None = None,
            short_len: int = 20, positive_len: int = 256, lifelong_len: int = 2000, emb_dim: int = 64,
            synthetic: dict | None = None, splits=("train", "test"), verbose: bool = True) -> Prepared:
    """Load ``source``, fuse item embeddings, fit RQ-KMeans (``levels`` levels + the collision level) and
    build the leave-one-out datasets with the pathway lengths given."""
    from onerec_fast.data import BatchConfig
    from onerec_fast.data.sources import load_source
    from onerec_fast.tokenizer import RQKMeans, fuse_item_embeddings

    log, world = load_source(source, seed=seed, synthetic_overrides=synthetic)
    if verbose:
        print(log.summary())
    emb, _ = fuse_item_embeddings(log, dim=emb_dim, seed=seed)
    k = codebook_size or default_codebook_size(log.num_items, levels)
    tok = RQKMeans(levels=levels, codebook_size=k, seed=seed, verbose=False).fit(emb)
    stats = tok.format_stats()
    if verbose:
        print(f"RQ-KMeans ({tok.backend_used}), {levels} levels x {k} codes + collision level:\n{stats}")
    bc = BatchConfig(short_len=short_len, positive_len=positive_len, lifelong_len=lifelong_len)
    return Prepared(log, world, emb, tok.item_codes, bc, datasets_for(log, tok.item_codes, emb, bc, splits), stats)
