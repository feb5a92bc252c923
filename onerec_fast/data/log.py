"""The in-memory form every loader produces: :class:`InteractionLog`.

One row per interaction (E rows), columnar numpy arrays, ids already dense:

* ``user: int64 [E]`` in ``[0, num_users)``, ``item: int64 [E]`` in ``[0, num_items)``,
  ``timestamp: int64 [E]`` (seconds; loaders without real time use the position in the sequence).
* ``engagement: {name: [E]}``: integer arrays are *labels* (like, follow, rating...: categorical, they travel
  as ``sparse`` features in batches), float arrays are *continuous* (watch time...: ``dense`` in batches).
* ``item_features: {name: [I] or [I, k]}`` and ``user_features: {name: [U]}``: integer 1-D arrays are
  categorical (ids in ``[0, cardinality)``), float 1-D arrays are continuous, float 2-D arrays are content
  vectors (used by the tokenizer's fusion, not by batches).
* ``item_titles`` (optional, ``list[str]`` of length I) feeds the text content encoder and readable output.
* ``user_raw_ids`` / ``item_raw_ids`` map dense ids back to the ids in the files.

Loaders sort rows by (user, timestamp, file order), so each user's interactions are contiguous and chronological;
:meth:`InteractionLog.user_offsets` gives the CSR offsets of those runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["InteractionLog", "DataFormatError", "dense_ids"]


class DataFormatError(ValueError):
    """A malformed input file: the message names the file, the line (1-based) and the field."""

    def __init__(self, path, line: int | None, field: str, problem: str):
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: field {field!r}: {problem}")
        self.path, self.line, self.field = str(path), line, field


def dense_ids(raw: np.ndarray, known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Map raw ids to ``[0, n)``: returns (dense [len(raw)], vocabulary [n]) with vocabulary sorted.

    ``known`` (ids listed in a feature table) joins the vocabulary, so items with features but no
    interactions still get an id.
    """
    vocab = np.unique(raw if known is None else np.concatenate([np.asarray(known), np.asarray(raw)]))
    return np.searchsorted(vocab, raw).astype(np.int64), vocab


@dataclass
class InteractionLog:
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    num_users: int
    num_items: int
    engagement: dict[str, np.ndarray] = field(default_factory=dict)
    item_features: dict[str, np.ndarray] = field(default_factory=dict)
    user_features: dict[str, np.ndarray] = field(default_factory=dict)
    item_titles: list[str] | None = None
    user_raw_ids: np.ndarray | None = None
    item_raw_ids: np.ndarray | None = None
    # Default rule for "positive feedback" (see onerec_fast.data.batch.parse_rule), set by each loader.
    positive_rule: str = ""
    name: str = "log"

    def __post_init__(self):
        self.user = np.asarray(self.user, dtype=np.int64)
        self.item = np.asarray(self.item, dtype=np.int64)
        self.timestamp = np.asarray(self.timestamp, dtype=np.int64)
        e = len(self.user)
        if len(self.item) != e or len(self.timestamp) != e:
            raise ValueError(f"user/item/timestamp must have one length, got {e}, {len(self.item)}, "
                             f"{len(self.timestamp)}")
        for k, v in self.engagement.items():
            if len(v) != e:
                raise ValueError(f"engagement[{k!r}] must have {e} rows, got {len(v)}")
        for k, v in self.item_features.items():
            if len(v) != self.num_items:
                raise ValueError(f"item_features[{k!r}] must have {self.num_items} rows, got {len(v)}")
        for k, v in self.user_features.items():
            if len(v) != self.num_users:
                raise ValueError(f"user_features[{k!r}] must have {self.num_users} rows, got {len(v)}")
        if e and (self.user.min() < 0 or self.user.max() >= self.num_users):
            raise ValueError(f"user ids must lie in [0, {self.num_users})")
        if e and (self.item.min() < 0 or self.item.max() >= self.num_items):
            raise ValueError(f"item ids must lie in [0, {self.num_items})")
        if self.item_titles is not None and len(self.item_titles) != self.num_items:
            raise ValueError(f"item_titles must have {self.num_items} entries, got {len(self.item_titles)}")

    def __len__(self) -> int:
        return len(self.user)

    def sort_(self) -> "InteractionLog":
        """Sort rows by (user, timestamp), keeping file order among ties; returns self."""
        order = np.lexsort((np.arange(len(self)), self.timestamp, self.user))
        self.user, self.item, self.timestamp = self.user[order], self.item[order], self.timestamp[order]
        self.engagement = {k: v[order] for k, v in self.engagement.items()}
        self._offsets = None
        return self

    def user_offsets(self) -> np.ndarray:
        """int64 ``[U+1]``: rows ``offsets[u]:offsets[u+1]`` are user u's interactions (rows must be sorted)."""
        if getattr(self, "_offsets", None) is None:
            if len(self) and np.any(np.diff(self.user) < 0):
                raise ValueError("InteractionLog rows are not sorted by user: call sort_() first")
            counts = np.bincount(self.user, minlength=self.num_users)
            self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return self._offsets

    @staticmethod
    def is_sparse(a: np.ndarray) -> bool:
        """Integer/bool 1-D arrays are categorical (sparse) features; floats are continuous."""
        return a.ndim == 1 and (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_)

    def cardinalities(self) -> dict[str, int]:
        """``{name: max value + 1}`` of every categorical feature (item, user and engagement labels)."""
        out = {}
        for d in (self.item_features, self.user_features, self.engagement):
            for k, v in d.items():
                if self.is_sparse(v):
                    out[k] = int(v.max()) + 1 if len(v) else 1
        return out

    def summary(self) -> str:
        lens = np.diff(self.user_offsets())
        return (f"{self.name}: {self.num_users} users, {self.num_items} items, {len(self)} interactions; "
                f"history length min/median/max {lens.min()}/{int(np.median(lens))}/{lens.max()}; "
                f"engagement {sorted(self.engagement)}; item features {sorted(self.item_features)}; "
                f"user features {sorted(self.user_features)}")
