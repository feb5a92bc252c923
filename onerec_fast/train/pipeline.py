"""From a data source to model-ready datasets: load -> fused item embeddings -> RQ-KMeans codes -> splits.

Shared by ``onerec-fast train / evaluate / generate / demo``. A data source is what
``onerec_fast.data.sources.load_source`` takes: ``"synthetic"`` (the built-in world, sized by ``synthetic``
overrides), a MovieLens folder, an interactions table (``.csv``/``.parquet``) or a SASRec-style sequence file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["Prepared", "prepare", "default_codebook_size", "datasets_for", "item_codes_for"]


def default_codebook_size(num_items: int, levels: int = 3) -> int:
    """Codes per level for a catalogue of ``num_items``, at most 8192 (the TR's size).

    Several levels: about ``2 * N^(1/levels)`` rounded up to a power of two, so the last level separates
    items and the first levels share structure. One level: about ``sqrt(N)`` (the nearest power of two), so
    the balanced clusters and the collision level that numbers each cluster's items are about the same size:
    the two softmaxes of a class-based output layer cost the least there, and a beam as wide as the codebook
    keeps every cluster (generation scores every item)."""
    if levels == 1:
        return int(min(8192, 2 ** max(2, round(math.log2(max(4.0, math.sqrt(num_items)))))))
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


def item_codes_for(log, emb: torch.Tensor, *, levels: int = 3, codebook_size: int | None = None,
                   normalize: bool = True, balanced: bool = True, seed: int = 0):
    """Fit the semantic-ID tokenizer on item embeddings ``emb: [I, D]``: RQ-KMeans with ``levels`` levels of
    ``codebook_size`` codes (default :func:`default_codebook_size`) plus the collision level, whose codes
    number each collision group's items by descending training popularity. Returns the fitted ``RQKMeans``.

    ``normalize``: quantize the L2-normalized rows. Collaborative vectors of rare items are short and crowd
    the origin: on Amazon Sports (18k items, 64 codes) the raw vectors left 51% of the items in collision
    groups, the largest of 741 items; normalized rows 15%, largest 74. ``balanced``: equal-size clusters
    at every level (OneRec's balanced k-means)."""
    from onerec_fast.train.baselines import train_counts
    from onerec_fast.tokenizer import RQKMeans

    x = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12) if normalize else emb
    k = codebook_size or default_codebook_size(log.num_items, levels)
    popularity = train_counts(log)
    return RQKMeans(levels=levels, codebook_size=k, seed=seed, balanced=balanced, verbose=False).fit(
        x, rank=torch.from_numpy(-popularity))


def prepare(source: str, *, seed: int = 0, levels: int = 3, codebook_size: int | None = None,
            short_len: int = 20, positive_len: int = 256, lifelong_len: int = 2000, emb_dim: int = 64,
            normalize: bool = True, balanced: bool = True, synthetic: dict | None = None,
            splits=("train", "test"), verbose: bool = True, loaded: tuple | None = None,
            item_vectors: torch.Tensor | None = None, neighbour_mean: bool = False) -> Prepared:
    """Load ``source`` (or take ``loaded``, its ``(log, world)`` from ``load_source``), fuse item embeddings,
    fit the tokenizer (:func:`item_codes_for`) and build the leave-one-out datasets with the pathway lengths
    given. ``item_vectors``: float ``[I, D]`` item vectors to tokenize instead of the fused embeddings;
    ``neighbour_mean``: tokenize the fused embeddings' mean over co-occurring items (``fuse_item_embeddings``)."""
    from onerec_fast.data import BatchConfig
    from onerec_fast.data.sources import load_source
    from onerec_fast.tokenizer import fuse_item_embeddings

    log, world = loaded or load_source(source, seed=seed, synthetic_overrides=synthetic)
    if verbose:
        print(log.summary())
    if item_vectors is None:
        emb, _ = fuse_item_embeddings(log, dim=emb_dim, seed=seed, neighbour_mean=neighbour_mean)
    elif item_vectors.dim() != 2 or item_vectors.shape[0] != log.num_items:
        raise ValueError(f"item_vectors must be [num_items={log.num_items}, D], got {tuple(item_vectors.shape)}")
    else:
        emb = item_vectors.float()
    tok = item_codes_for(log, emb, levels=levels, codebook_size=codebook_size, normalize=normalize,
                         balanced=balanced, seed=seed)
    k = tok.requested_sizes[0]
    stats = tok.format_stats()
    if verbose:
        print(f"RQ-KMeans ({tok.backend_used}), {levels} levels x {k} codes + collision level:\n{stats}")
    bc = BatchConfig(short_len=short_len, positive_len=positive_len, lifelong_len=lifelong_len)
    return Prepared(log, world, emb, tok.item_codes, bc, datasets_for(log, tok.item_codes, emb, bc, splits), stats)
