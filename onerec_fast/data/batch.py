"""Per-user training samples for the four encoder pathways, collated as jagged tensors.

API NOTE (stable names; B users in a batch, T = total items of one pathway over the batch, L = code levels)
--------------------------------------------------------------------------------------------------------
``UserBatch`` (what the DataLoader yields; ``.to(device)``, ``.pin_memory()``, ``len(batch) == B``):

* ``user``:          int64 ``[B]``         dense user ids
* ``user_feats``:    ``{name: int64 [B]}``  static categorical user features (gender, age, occupation...);
                                          cardinalities from ``dataset.cardinalities`` (``max id + 1``)
* ``short``:         ``JaggedItems``       last ``short_len`` (20) interactions before the target, oldest first
* ``positive``:      ``JaggedItems``       last ``positive_len`` (256) positive-feedback interactions before the
                                          target (``positive_rule``, e.g. ``"rating>=4"``), oldest first
* ``lifelong``:      ``JaggedItems``       the history before the target; when longer than ``lifelong_len`` (2000)
                                          compressed by hierarchical k-means to <= ``lifelong_len`` cluster
                                          representatives in chronological order (``dense["cluster_size"]`` says how
                                          many items each stands for; 1 when uncompressed)
* ``target_item``:   int64 ``[B]``         the item to predict
* ``target_codes``:  int64 ``[B, L]``      its semantic id (tokenizer codes, incl. the disambiguation level)
* ``target_sparse``: ``{name: int64 [B]}`` / ``target_dense``: ``{name: float32 [B]}``: the target
                                          interaction's engagement (labels / continuous), for RSFT and reward models

``JaggedItems`` (one pathway; nothing padded to the longest user):

* ``offsets``: int32 ``[B+1]``  (cu_seqlens: user b owns rows ``offsets[b]:offsets[b+1]``; a user may have 0 rows)
* ``item``:    int64 ``[T]``     item ids;  ``codes``: int64 ``[T, L]`` their semantic ids
* ``sparse``:  ``{name: int64 [T]}``   categorical item features (author, tag, genre...) and engagement labels
                                       (like, follow, rating...) of each interaction
* ``dense``:   ``{name: float32 [T]}`` ``"timestamp"`` = days between the interaction and the target (>= 0),
                                       continuous engagement (playtime, watch_ratio...) and item features (duration...)
* ``max_len``: python int, the longest segment (known on the host, so kernels need no device sync)
* helpers: ``lengths()`` -> int64 ``[B]``; ``padded(t, pad, slots)`` -> ``[B, slots, ...]`` (default ``max_len``) and a
  bool mask ``[B, slots]``, for host tensors

Building them::

    ds = UserSequenceDataset(log, item_codes, split="train", item_emb=emb, config=BatchConfig(...))
    loader = make_dataloader(ds, batch_size=256, shuffle=True, num_workers=2)

Splits are leave-one-out per user (rows sorted by time): ``test`` targets the last interaction, ``valid`` the
second-to-last, ``train`` every earlier position ``t >= min_history`` (or only the last train position with
``train_targets="last"``). A sample's pathways only ever see rows strictly before its target, so neither the
validation nor the test item reaches training. Users with fewer than 3 interactions only appear in ``train``.
--------------------------------------------------------------------------------------------------------
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from onerec_fast.data.log import InteractionLog

__all__ = [
    "BatchConfig",
    "JaggedItems",
    "UserBatch",
    "UserSequenceDataset",
    "collate_user_batch",
    "make_dataloader",
    "parse_rule",
]

_SECONDS_PER_DAY = 86400.0


# --------------------------------------------------------------------------------------------- batch types
@dataclass
class JaggedItems:
    """One pathway of a batch: rows of B users concatenated, with ``offsets: int32 [B+1]``."""

    offsets: torch.Tensor
    item: torch.Tensor
    codes: torch.Tensor
    sparse: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    max_len: int = 0

    def lengths(self) -> torch.Tensor:
        """int64 ``[B]``: rows per user."""
        return (self.offsets[1:] - self.offsets[:-1]).long()

    def padded(self, t: torch.Tensor, pad=0, slots: int | None = None,
               pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Host ``t: [T, ...]`` -> (``[B, slots, ...]`` with ``pad`` past each user's end, mask bool ``[B, slots]``);
        ``slots`` defaults to ``max_len``; the values in pinned memory with ``pin_memory``. One numpy gather and no
        parallel torch CPU op: the CUDA-graph trainer pads every batch, and three training processes on one 16-core
        host ran 6x slower per step while its padding was torch ops (session 15; the suspected cause, 16 OpenMP
        threads per process). Raises ValueError if a user has more than ``slots`` rows."""
        if t.device.type != "cpu" or self.offsets.device.type != "cpu":
            raise ValueError(f"JaggedItems.padded pads host tensors; got t on {t.device}, offsets on "
                             f"{self.offsets.device}")
        slots = self.max_len if slots is None else slots
        offsets = self.offsets.numpy().astype(np.int64)
        lengths = np.diff(offsets)
        if lengths.size and int(lengths.max()) > slots:
            raise ValueError(f"a user has {int(lengths.max())} items, more than the {slots} padded slots")
        mask = np.arange(slots)[None, :] < lengths[:, None]
        out = torch.empty((lengths.size, slots, *t.shape[1:]), dtype=t.dtype, pin_memory=pin_memory)
        a, o = t.numpy(), out.numpy()
        if a.shape[0] == 0:  # no rows anywhere in the batch
            o[...] = pad
        else:
            np.take(a, np.minimum(offsets[:-1, None] + np.arange(slots)[None, :], a.shape[0] - 1), axis=0, out=o)
            o[~mask] = pad
        return out, torch.from_numpy(mask)

    def map_tensors(self, fn) -> "JaggedItems":
        """``fn`` applied to every tensor (offsets, items, codes, features); ``max_len`` kept."""
        return replace(self, offsets=fn(self.offsets), item=fn(self.item), codes=fn(self.codes),
                       sparse={k: fn(v) for k, v in self.sparse.items()},
                       dense={k: fn(v) for k, v in self.dense.items()})

    def to(self, device, non_blocking: bool = False) -> "JaggedItems":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "JaggedItems":
        return self.map_tensors(lambda t: t.pin_memory())


@dataclass
class UserBatch:
    """B training samples (see the module docstring for every field's shape)."""

    user: torch.Tensor
    user_feats: dict[str, torch.Tensor]
    short: JaggedItems
    positive: JaggedItems
    lifelong: JaggedItems
    target_item: torch.Tensor
    target_codes: torch.Tensor
    target_sparse: dict[str, torch.Tensor] = field(default_factory=dict)
    target_dense: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.user.numel()

    def map_tensors(self, fn) -> "UserBatch":
        """``fn`` applied to every tensor, the pathways' included (a pathway is a ``JaggedItems`` or any
        object with ``map_tensors``, e.g. the model's padded form)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if hasattr(v, "map_tensors"):
                out[f.name] = v.map_tensors(fn)
            elif isinstance(v, dict):
                out[f.name] = {k: fn(t) for k, t in v.items()}
            else:
                out[f.name] = fn(v)
        return UserBatch(**out)

    def to(self, device, non_blocking: bool = False) -> "UserBatch":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "UserBatch":
        return self.map_tensors(lambda t: t.pin_memory())


# --------------------------------------------------------------------------------------------- engagement rules
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(-?[0-9.eE+-]+)\s*$")


def parse_rule(rule: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Compile an engagement rule into ``columns -> bool [E]``.

    Grammar: comparisons ``name op number`` (op in ``>= <= == != > <``) joined by ``&`` (and), and those
    groups joined by ``|`` (or): ``"like>0|follow>0|watch_ratio>=0.8"``, ``"rating>=4"``,
    ``"rating>=4&playtime>30"``. The empty rule marks every interaction positive.
    """
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a str, got {type(rule).__name__}")
    groups = []
    for g in rule.split("|") if rule.strip() else []:
        terms = []
        for t in g.split("&"):
            m = _TERM.match(t)
            if not m:
                raise ValueError(f"rule {rule!r}: cannot parse {t.strip()!r} "
                                 f"(expected 'name op number', op in {list(_OPS)})")
            terms.append((m.group(1), _OPS[m.group(2)], float(m.group(3))))
        groups.append(terms)

    def apply(cols: dict[str, np.ndarray], n: int | None = None) -> np.ndarray:
        """``n``: the row count, needed when ``cols`` is empty (a source without engagement columns)."""
        if n is None:
            if not cols:
                raise ValueError("parse_rule: pass n (the row count) when there are no columns")
            n = len(next(iter(cols.values())))
        if not groups:
            return np.ones(n, dtype=bool)
        out = np.zeros(n, dtype=bool)
        for terms in groups:
            acc = np.ones(n, dtype=bool)
            for name, op, val in terms:
                if name not in cols:
                    raise ValueError(f"rule {rule!r}: no column {name!r} (have {sorted(cols)})")
                acc &= op(cols[name], val)
            out |= acc
        return out

    return apply


# --------------------------------------------------------------------------------------------- dataset
@dataclass
class BatchConfig:
    """Pathway lengths and sampling.

    ``lifelong_stride``: a sample's lifelong pathway compresses the history up to the last multiple of the stride
    before the target (the newer items are in the short-term pathway when ``stride <= short_len``), so one
    compression serves ``stride`` consecutive targets and is cached. Compressions are computed on first use (in
    the worker) or all at once, batched over users, by ``dataset.precompute_lifelong()``. Their number grows with
    heavy users' history length / stride: ``max_targets_per_user`` or ``train_targets="last"`` bound it.
    ``positive_rule`` / ``target_rule``: see :func:`parse_rule`; ``None`` takes the log's default positive rule /
    keeps every target (RSFT passes e.g. ``"watch_ratio>=0.5"`` to train only on engaged targets).
    """

    short_len: int = 20
    positive_len: int = 256
    lifelong_len: int = 2000
    lifelong_stride: int = 20
    positive_rule: str | None = None
    target_rule: str | None = None
    train_targets: str = "all"  # "all" positions, or "last" (one train sample per user)
    max_targets_per_user: int | None = None  # keep only each user's latest N train targets (caps heavy users)
    min_history: int = 1
    compress_iters: int = 5
    cache_size: int = 100_000  # cached lifelong compressions per worker


class UserSequenceDataset(torch.utils.data.Dataset):
    """Samples ``(user, target position)`` of one leave-one-out split (see the module docstring).

    Args:
        log: the interactions (rows sorted by user then time; sorted here if not).
        item_codes: int64 ``[I, L]`` semantic ids of every item (``RQKMeans.item_codes``).
        split: ``"train"``, ``"valid"`` or ``"test"``.
        item_emb: float ``[I, D]`` item embeddings for lifelong compression; required when some history is
            longer than ``lifelong_len``.
        config: :class:`BatchConfig`.
    """

    def __init__(self, log: InteractionLog, item_codes, split: str = "train", item_emb=None,
                 config: BatchConfig | None = None):
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
        cfg = config or BatchConfig()
        if cfg.train_targets not in ("all", "last"):
            raise ValueError(f"train_targets must be 'all' or 'last', got {cfg.train_targets!r}")
        for name in ("short_len", "positive_len", "lifelong_len", "lifelong_stride"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"config.{name} must be >= 1, got {getattr(cfg, name)}")
        codes = np.asarray(item_codes.cpu() if isinstance(item_codes, torch.Tensor) else item_codes)
        if codes.ndim != 2 or codes.shape[0] != log.num_items or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"item_codes must be an integer array [num_items={log.num_items}, L], got "
                             f"{codes.dtype} {codes.shape}")
        if len(log) and np.any(np.diff(log.user) < 0):
            log.sort_()
        self.log, self.split, self.cfg = log, split, cfg
        self.codes = codes.astype(np.int64)
        self.offsets = log.user_offsets()

        # Per-row features, split once into categorical (sparse) and continuous (dense) columns.
        self.row_sparse = {k: v.astype(np.int64) for k, v in log.engagement.items() if log.is_sparse(v)}
        self.row_dense = {k: v.astype(np.float32) for k, v in log.engagement.items() if not log.is_sparse(v)}
        self.item_sparse = {k: v.astype(np.int64) for k, v in log.item_features.items() if log.is_sparse(v)}
        self.item_dense = {k: v.astype(np.float32) for k, v in log.item_features.items()
                           if v.ndim == 1 and not log.is_sparse(v)}
        self.user_sparse = {k: v.astype(np.int64) for k, v in log.user_features.items() if log.is_sparse(v)}
        self.cardinalities = log.cardinalities()

        cols = {**log.engagement, **{k: v[log.item] for k, v in self.item_dense.items()}}
        rule = log.positive_rule if cfg.positive_rule is None else cfg.positive_rule
        self.positive_rows = np.flatnonzero(parse_rule(rule)(cols, len(log))).astype(np.int64)
        target_ok = parse_rule(cfg.target_rule or "")(cols, len(log))

        lens = np.diff(self.offsets)
        users, pos = self._targets(lens, split, cfg)
        keep = target_ok[self.offsets[users] + pos] if len(users) else np.zeros(0, dtype=bool)
        self.sample_user, self.sample_pos = users[keep], pos[keep]

        self.item_emb = None
        if item_emb is not None:
            e = item_emb.detach().float().cpu() if isinstance(item_emb, torch.Tensor) else torch.as_tensor(
                np.asarray(item_emb, dtype=np.float32))
            if e.dim() != 2 or e.shape[0] != log.num_items:
                raise ValueError(f"item_emb must be [num_items={log.num_items}, D], got {tuple(e.shape)}")
            self.item_emb = e
        if self.item_emb is None and len(self.sample_pos) and self.sample_pos.max() > cfg.lifelong_len:
            raise ValueError(f"histories up to {int(self.sample_pos.max())} items exceed lifelong_len="
                             f"{cfg.lifelong_len}: pass item_emb so they can be compressed (nothing is truncated)")
        self._cache: dict[tuple[int, int], tuple] = {}

    @staticmethod
    def _targets(lens: np.ndarray, split: str, cfg: BatchConfig) -> tuple[np.ndarray, np.ndarray]:
        """(user [S], target position within the user's rows [S]) of the split."""
        users = np.arange(len(lens))
        full = lens >= 3
        if split == "test":
            return users[full], lens[full] - 1
        if split == "valid":
            return users[full], lens[full] - 2
        last = np.where(full, lens - 3, lens - 1)  # last train position
        first = np.full_like(lens, cfg.min_history)
        if cfg.train_targets == "last":
            first = np.maximum(first, last)
        if cfg.max_targets_per_user is not None:
            first = np.maximum(first, last - cfg.max_targets_per_user + 1)
        n = np.maximum(last - first + 1, 0)
        u = np.repeat(users, n)
        start = np.repeat(np.cumsum(n) - n, n)
        return u, np.repeat(first, n) + np.arange(n.sum()) - start

    def __len__(self) -> int:
        return len(self.sample_user)

    # ---- per-sample pieces: each returns numpy arrays for the collate function
    def _rows(self, rows: np.ndarray, t_target) -> dict:
        """Features of ``rows``; ``t_target``: the target time (an int, or one per row)."""
        it = self.log.item[rows]
        dense = {"timestamp": ((t_target - self.log.timestamp[rows]) / _SECONDS_PER_DAY).astype(np.float32)}
        dense.update({k: v[rows] for k, v in self.row_dense.items()})
        dense.update({k: v[it] for k, v in self.item_dense.items()})
        sparse = {k: v[it] for k, v in self.item_sparse.items()}
        sparse.update({k: v[rows] for k, v in self.row_sparse.items()})
        return {"item": it, "codes": self.codes[it], "sparse": sparse, "dense": dense}

    def _lifelong(self, u: int, start: int, t: int, t_target: int) -> dict:
        cfg = self.cfg
        if t <= cfg.lifelong_len:
            out = self._rows(np.arange(start, start + t), t_target)
            out["dense"]["cluster_size"] = np.ones(t, dtype=np.float32)
            return out
        anchor = (t // cfg.lifelong_stride) * cfg.lifelong_stride
        key = (u, anchor)
        if key not in self._cache:
            if len(self._cache) >= cfg.cache_size:
                self._cache.clear()
            self._cache[key] = self._compress([(start, anchor)])[0]
        rep_rows, size, mean_ts, dense_avg = self._cache[key]
        out = self._rows(rep_rows, t_target)
        out["dense"].update(dense_avg)
        out["dense"]["timestamp"] = ((t_target - mean_ts) / _SECONDS_PER_DAY).astype(np.float32)
        out["dense"]["cluster_size"] = size
        return out

    def _compress(self, spans: list[tuple[int, int]]) -> list[tuple]:
        """Hierarchical k-means of many users' row spans ``[start, start+n)`` in one batched call."""
        from onerec_fast.tokenizer.hierarchical import hierarchical_kmeans_compress

        rows = np.concatenate([np.arange(s, s + n) for s, n in spans])
        offs = torch.as_tensor(np.concatenate([[0], np.cumsum([n for _, n in spans])]))
        it = self.log.item[rows]
        feats = {"timestamp": torch.as_tensor(self.log.timestamp[rows].astype(np.float64))}
        feats.update({k: torch.as_tensor(v[rows]) for k, v in self.row_dense.items()})
        feats.update({k: torch.as_tensor(v[it]) for k, v in self.item_dense.items()})
        res = hierarchical_kmeans_compress(self.item_emb[torch.as_tensor(it)], feats, self.cfg.lifelong_len,
                                           offsets=offs, iters=self.cfg.compress_iters)
        out = []
        ro = res.offsets.numpy()
        rep = rows[res.index.numpy()]
        for b in range(len(spans)):
            sl = slice(ro[b], ro[b + 1])
            dense_avg = {k: res.features[k][sl].numpy().astype(np.float32) for k in feats if k != "timestamp"}
            out.append((rep[sl], res.cluster_size[sl].numpy().astype(np.float32),
                        res.features["timestamp"][sl].numpy(), dense_avg))
        return out

    def precompute_lifelong(self, users_per_call: int = 256) -> int:
        """Compress every lifelong history this split needs, batched over users; returns how many."""
        cfg = self.cfg
        need = self.sample_pos > cfg.lifelong_len
        keys = sorted({(int(u), int(p // cfg.lifelong_stride * cfg.lifelong_stride))
                       for u, p in zip(self.sample_user[need], self.sample_pos[need])} - set(self._cache))
        for i in range(0, len(keys), users_per_call):
            chunk = keys[i:i + users_per_call]
            res = self._compress([(int(self.offsets[u]), a) for u, a in chunk])
            self._cache.update(zip(chunk, res))
        return len(keys)

    def batch(self, indices) -> "UserBatch":
        """The :class:`UserBatch` of samples ``indices`` (a sequence of ints), built with vectorized numpy: equal
        to ``collate_user_batch([self[i] for i in indices])`` at a fraction of the cost (no per-sample Python;
        only lifelong histories that need compression go through the per-sample path)."""
        cfg = self.cfg
        idx = np.asarray(indices, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0:
            raise ValueError(f"indices must be a non-empty 1-D sequence of sample indices, got shape {idx.shape}")
        u, t = self.sample_user[idx], self.sample_pos[idx]
        start = self.offsets[u]
        target_row = start + t
        t_target = self.log.timestamp[target_row]
        lo = np.maximum(start, target_row - cfg.short_len)
        a = np.searchsorted(self.positive_rows, start)
        b = np.searchsorted(self.positive_rows, target_row)
        pa = np.maximum(a, b - cfg.positive_len)
        if np.all(t <= cfg.lifelong_len):
            lifelong = self._jagged(_ranges(start, t), t, t_target)
            lifelong.dense["cluster_size"] = torch.ones(lifelong.item.numel(), dtype=torch.float32)
        else:
            lifelong = _jag([self._lifelong(int(uu), int(s), int(tt), int(ts))
                             for uu, s, tt, ts in zip(u, start, t, t_target)])
        item = self.log.item[target_row]
        return UserBatch(
            user=torch.from_numpy(u.copy()),
            user_feats={k: torch.from_numpy(v[u].astype(np.int64)) for k, v in self.user_sparse.items()},
            short=self._jagged(_ranges(lo, target_row - lo), target_row - lo, t_target),
            positive=self._jagged(self.positive_rows[_ranges(pa, b - pa)], b - pa, t_target),
            lifelong=lifelong,
            target_item=torch.from_numpy(item.astype(np.int64)),
            target_codes=torch.from_numpy(self.codes[item]),
            target_sparse={k: torch.from_numpy(v[target_row].astype(np.int64)) for k, v in self.row_sparse.items()},
            target_dense={k: torch.from_numpy(v[target_row].astype(np.float32)) for k, v in self.row_dense.items()},
        )

    def _jagged(self, rows: np.ndarray, lens: np.ndarray, t_target: np.ndarray) -> JaggedItems:
        """The pathway of ``rows [T]`` (``lens [B]`` per sample, in order) for targets at times ``t_target [B]``:
        the vectorized :meth:`_rows` of a whole batch."""
        return _jagged_items(self._rows(rows, np.repeat(t_target, lens)), lens)

    def __getitem__(self, idx: int) -> dict:
        cfg = self.cfg
        u, t = int(self.sample_user[idx]), int(self.sample_pos[idx])
        start = int(self.offsets[u])
        target_row = start + t
        t_target = int(self.log.timestamp[target_row])
        lo = max(start, target_row - cfg.short_len)
        a = np.searchsorted(self.positive_rows, start)
        b = np.searchsorted(self.positive_rows, target_row)
        pos_rows = self.positive_rows[max(a, b - cfg.positive_len):b]
        item = int(self.log.item[target_row])
        return {
            "user": u,
            "user_feats": {k: v[u] for k, v in self.user_sparse.items()},
            "short": self._rows(np.arange(lo, target_row), t_target),
            "positive": self._rows(pos_rows, t_target),
            "lifelong": self._lifelong(u, start, t, t_target),
            "target_item": item,
            "target_codes": self.codes[item],
            "target_sparse": {k: v[target_row] for k, v in self.row_sparse.items()},
            "target_dense": {k: v[target_row] for k, v in self.row_dense.items()},
        }


# --------------------------------------------------------------------------------------------- collation
def _ranges(first: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(first[b], first[b] + lens[b])`` over b: int64 ``[sum(lens)]``."""
    ends = np.cumsum(lens)
    return np.repeat(first - (ends - lens), lens) + np.arange(ends[-1] if len(ends) else 0)


def _jagged_items(part: dict, lens: np.ndarray) -> JaggedItems:
    """``part`` (``item``, ``codes``, ``sparse``, ``dense`` arrays over all rows) cut into segments of ``lens``."""
    offsets = np.zeros(len(lens) + 1, dtype=np.int32)
    np.cumsum(lens, out=offsets[1:])
    return JaggedItems(
        offsets=torch.from_numpy(offsets),
        item=torch.from_numpy(part["item"].astype(np.int64)),
        codes=torch.from_numpy(part["codes"].astype(np.int64)),
        sparse={k: torch.from_numpy(v.astype(np.int64)) for k, v in part["sparse"].items()},
        dense={k: torch.from_numpy(v.astype(np.float32)) for k, v in part["dense"].items()},
        max_len=int(lens.max()) if len(lens) else 0,
    )


def _jag(parts: list[dict]) -> JaggedItems:
    """Per-sample pathway parts (:meth:`UserSequenceDataset._rows` dicts) concatenated."""
    first = parts[0]
    cat = {"item": np.concatenate([p["item"] for p in parts]),
           "codes": np.concatenate([p["codes"] for p in parts]),
           "sparse": {k: np.concatenate([p["sparse"][k] for p in parts]) for k in first["sparse"]},
           "dense": {k: np.concatenate([p["dense"][k] for p in parts]) for k in first["dense"]}}
    return _jagged_items(cat, np.array([len(p["item"]) for p in parts], dtype=np.int64))


def collate_user_batch(samples: list[dict]) -> UserBatch:
    """Concatenate samples of :class:`UserSequenceDataset` into one jagged :class:`UserBatch`."""
    if not samples:
        raise ValueError("samples must be a non-empty list")
    s0 = samples[0]

    def stack(key, dtype):
        return {k: torch.tensor(np.array([s[key][k] for s in samples]), dtype=dtype) for k in s0[key]}

    return UserBatch(
        user=torch.tensor([s["user"] for s in samples], dtype=torch.int64),
        user_feats=stack("user_feats", torch.int64),
        short=_jag([s["short"] for s in samples]),
        positive=_jag([s["positive"] for s in samples]),
        lifelong=_jag([s["lifelong"] for s in samples]),
        target_item=torch.tensor([s["target_item"] for s in samples], dtype=torch.int64),
        target_codes=torch.from_numpy(np.stack([s["target_codes"] for s in samples]).astype(np.int64)),
        target_sparse=stack("target_sparse", torch.int64),
        target_dense=stack("target_dense", torch.float32),
    )


def make_dataloader(dataset: UserSequenceDataset, batch_size: int = 256, *, shuffle: bool = False,
                    num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                    drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader yielding :class:`UserBatch`; ``seed`` fixes the shuffle order (reproducible epochs)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate_user_batch,
        pin_memory=pin_memory, drop_last=drop_last, generator=g, persistent_workers=num_workers > 0)
