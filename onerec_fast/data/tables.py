"""A generic interactions table (CSV or Parquet) with optional item and user feature tables.

Interactions: one row per interaction with columns ``user``, ``item``, ``timestamp`` (names configurable) and any
number of numeric engagement columns (all remaining columns by default): integer columns become labels (like,
follow...), others continuous (watch time...). ``timestamp`` must be numeric (seconds).

Feature tables: a key column (``item`` / ``user``) and feature columns. Numeric float columns are continuous
(missing values -> the column mean); everything else (integers, strings) is categorical, remapped to ids
``1..n`` in sorted order with 0 for "unknown" (rows missing from the table, empty cells).

CSV files need a header line. Parquet needs ``pyarrow`` (``pip install pyarrow``), else a clear ImportError.
Problems raise :class:`DataFormatError` naming the file, the line (CSV, 1-based including the header; for Parquet
the row) and the column: a row with the wrong number of fields, a non-numeric, NaN or infinite timestamp or
engagement value, an empty user/item/key cell, an integer beyond int64, bytes that are not UTF-8, an interactions
table without rows.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from onerec_fast.data._parse import INT64, decode_error
from onerec_fast.data.log import DataFormatError, InteractionLog, dense_ids

__all__ = ["COLUMN_NAMES", "load_interactions_table", "read_table"]


def read_table(path: str | Path) -> tuple[dict[str, list], list[int]]:
    """Columns of a CSV/Parquet file as ``{name: list of str/values}`` and the file line of every row."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow); "
                              "or convert it to CSV") from None
        cols = pq.read_table(p).to_pydict()
        n = len(next(iter(cols.values()))) if cols else 0
        return cols, list(range(1, n + 1))
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise DataFormatError(p, 1, "header", "empty file: a header line naming the columns is required")
            header = [h.strip() for h in header]
            cols: dict[str, list] = {h: [] for h in header}
            lines = []
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    field = header[len(row)] if len(row) < len(header) else header[-1]
                    raise DataFormatError(p, reader.line_num, field,
                                          f"expected {len(header)} comma-separated fields, got {len(row)}")
                for h, v in zip(header, row):
                    cols[h].append(v.strip())
                lines.append(reader.line_num)
    except UnicodeDecodeError:  # the decoder reads ahead: find the line (and name its field by the header)
        with open(p, "rb") as f:
            first = f.readline()
        try:
            names = tuple(h.strip() for h in next(csv.reader([first.decode("utf-8")])))
        except (UnicodeDecodeError, StopIteration):
            names = None
        raise decode_error(p, "utf-8", ",", names) from None
    return cols, lines


def _int64s(path, lines, name, values) -> np.ndarray | None:
    """The column as int64 when every value is an integer, else None; DataFormatError naming the line of an
    integer beyond int64."""
    try:
        ints = [int(v) for v in values]
    except (ValueError, TypeError):
        return None
    try:
        return np.array(ints, dtype=np.int64)
    except OverflowError:
        k = next(k for k, v in enumerate(ints) if not INT64.min <= v <= INT64.max)
        raise DataFormatError(path, lines[k], name, f"integer {values[k]} does not fit in 64 bits") from None


def _numeric(path, lines, name, values, kind: str) -> np.ndarray:
    """Parse a column that must be numeric and finite: int64 if every value is an integer, else float."""
    ints = _int64s(path, lines, name, values)
    if ints is not None:
        return ints
    out = np.empty(len(values), dtype=np.float64)
    for k, v in enumerate(values):
        try:
            out[k] = float(v)
        except (ValueError, TypeError):
            raise DataFormatError(path, lines[k], name, f"expected a number ({kind}), got {v!r}") from None
        if not np.isfinite(out[k]):
            raise DataFormatError(path, lines[k], name, f"expected a finite number ({kind}), got {v!r}")
    return out


def _is_empty(v) -> bool:
    """A missing cell: empty CSV text, or Parquet's None / NaN."""
    return v is None or v == "" or (isinstance(v, float) and np.isnan(v))


def _ids(path, lines, name, values: list) -> np.ndarray:
    """Raw ids as int64 when they all are integers (numeric order), else strings; DataFormatError naming the
    line of an empty cell or of an integer beyond int64."""
    empty = next((k for k, v in enumerate(values) if _is_empty(v)), None)
    if empty is not None:
        raise DataFormatError(path, lines[empty], name, "empty id")
    ints = _int64s(path, lines, name, values)
    return ints if ints is not None else np.array([str(v) for v in values])


def _features(path, lines, cols: dict, key: str, vocab: np.ndarray) -> dict[str, np.ndarray]:
    """Feature columns aligned to ``vocab`` (module docstring says how each kind is typed)."""
    raw = _ids(path, lines, key, cols[key])
    if vocab.dtype.kind == "U":
        raw = raw.astype(str)
    pos = np.searchsorted(vocab, raw)
    ok = (pos < len(vocab)) & (vocab[np.minimum(pos, len(vocab) - 1)] == raw)
    out = {}
    for name, values in cols.items():
        if name == key:
            continue
        missing = np.array([v is None or v == "" for v in values])
        try:
            vals = np.array([float(v) for v, m in zip(values, missing) if not m], dtype=np.float64)
            is_float = any("." in str(v) or "e" in str(v).lower() for v, m in zip(values, missing) if not m)
        except (ValueError, TypeError):
            is_float = False
        if is_float:
            col = np.full(len(vocab), vals.mean() if len(vals) else 0.0)
            full = np.full(len(values), np.nan)
            full[~missing] = vals
            sel = ok & ~missing
            col[pos[sel]] = full[sel]
            out[name] = col.astype(np.float32)
        else:
            strs = np.array([str(v) for v in values])
            cats = np.unique(strs[~missing])
            col = np.zeros(len(vocab), dtype=np.int64)
            sel = ok & ~missing
            col[pos[sel]] = np.searchsorted(cats, strs[sel]) + 1
            out[name] = col
    return out


# The names public interaction tables give their user, item and time columns (MovieLens 20M/25M ``userId,movieId``;
# Amazon reviews ``reviewerID,asin,unixReviewTime``; Yelp ``user_id,business_id``), tried in this order when the
# caller names none: exactly one of a role's names must be present.
COLUMN_NAMES = {
    "user": ("user", "user_id", "userId", "userid", "uid", "reviewerID"),
    "item": ("item", "item_id", "itemId", "itemid", "iid", "movieId", "asin", "business_id"),
    "timestamp": ("timestamp", "time", "ts", "unixReviewTime"),
}


def _column(path: Path, cols: dict, role: str, given: str | None) -> str:
    """The column holding ``role`` ("user", "item" or "timestamp"): ``given``, or the one name of
    :data:`COLUMN_NAMES` that the table has."""
    if given is not None:
        if given not in cols:
            raise DataFormatError(path, 1, given, f"required column missing (columns: {sorted(cols)})")
        return given
    found = [c for c in COLUMN_NAMES[role] if c in cols]
    if not found:
        raise DataFormatError(path, 1, role, f"required column missing: none of {list(COLUMN_NAMES[role])} "
                                             f"(columns: {sorted(cols)})")
    if len(found) > 1:
        raise DataFormatError(path, 1, role, f"several columns could hold it, {found}: name one "
                                             f"({'time' if role == 'timestamp' else role}_col=...) or drop the others")
    return found[0]


def load_interactions_table(path: str | Path, *, user_col: str | None = None, item_col: str | None = None,
                            time_col: str | None = None, engagement_cols: list[str] | None = None,
                            item_features: str | Path | None = None, user_features: str | Path | None = None,
                            item_key: str | None = None, user_key: str | None = None, positive_rule: str = "",
                            name: str | None = None) -> InteractionLog:
    """Load an interactions table (+ optional feature tables) into an :class:`InteractionLog`.

    ``user_col``/``item_col``/``time_col``: the columns' names; None finds each among the common names of
    :data:`COLUMN_NAMES` (``user``, ``user_id``, ``userId``, ...), and two candidates for one role are an error.
    Every other column is an engagement column unless ``engagement_cols`` lists them. Items and users listed only
    in a feature table still get ids. ``positive_rule`` (see :func:`onerec_fast.data.batch.parse_rule`) is stored
    as the log's default; empty = every interaction positive.
    """
    p = Path(path)
    cols, lines = read_table(p)
    user_col, item_col, time_col = (_column(p, cols, role, given) for role, given in
                                    (("user", user_col), ("item", item_col), ("timestamp", time_col)))
    if not lines:
        raise DataFormatError(p, None, user_col, "no interactions: the table has no rows")
    eng_names = [c for c in cols if c not in (user_col, item_col, time_col)] if engagement_cols is None else list(
        engagement_cols)
    for c in eng_names:
        if c not in cols:
            raise DataFormatError(p, 1, c, f"engagement column missing (columns: {sorted(cols)})")
    ts = _numeric(p, lines, time_col, cols[time_col], "timestamp")
    beyond = np.flatnonzero(np.abs(ts) >= 2.0**63)  # float seconds that int64 cannot hold
    if len(beyond):
        raise DataFormatError(p, lines[beyond[0]], time_col, f"timestamp {cols[time_col][beyond[0]]} does not fit "
                                                             "in 64 bits")
    engagement = {}
    for c in eng_names:
        v = _numeric(p, lines, c, cols[c], "engagement")
        engagement[c] = v if v.dtype == np.int64 else v.astype(np.float32)

    tables, vocabs = {}, {}
    for label, fpath, key, col in (("item", item_features, item_key or item_col, item_col),
                                   ("user", user_features, user_key or user_col, user_col)):
        raw = _ids(p, lines, col, cols[col])
        known = None
        if fpath is not None:
            fcols, flines = read_table(fpath)
            if key not in fcols:
                raise DataFormatError(fpath, 1, key, f"key column missing (columns: {sorted(fcols)})")
            tables[label] = (fpath, flines, fcols, key)
            known = _ids(fpath, flines, key, fcols[key])
            if known.dtype != raw.dtype:  # ints on one side, strings on the other: compare as strings
                known, raw = known.astype(str), raw.astype(str)
        vocabs[label] = dense_ids(raw, known)
    (u, uvocab), (i, ivocab) = vocabs["user"], vocabs["item"]
    feats = {label: _features(*table, vocabs[label][1]) for label, table in tables.items()}
    item_feats, user_feats = feats.get("item", {}), feats.get("user", {})
    log = InteractionLog(user=u, item=i, timestamp=np.round(ts).astype(np.int64), num_users=len(uvocab),
                         num_items=len(ivocab), engagement=engagement, item_features=item_feats,
                         user_features=user_feats, user_raw_ids=uvocab, item_raw_ids=ivocab,
                         positive_rule=positive_rule, name=name or p.stem)
    return log.sort_()
