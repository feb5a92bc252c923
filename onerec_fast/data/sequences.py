"""SASRec-style sequence text files: ``user item item ...`` per line, whitespace-separated integers.

A user may span several lines (SASRec's own files have one ``user item`` pair per line); items keep file order,
which is taken as time: ``timestamp`` = position in the user's sequence x 86400, so a batch's
``dense["timestamp"]`` (days before the target) counts steps back. There is no engagement, so every
interaction counts as positive feedback. A file without sequences, a line that is not UTF-8 and an id beyond int64
raise :class:`DataFormatError` naming file and line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onerec_fast.data._parse import read_rows, to_int
from onerec_fast.data.log import DataFormatError, InteractionLog, dense_ids

__all__ = ["load_sequences"]


def load_sequences(path: str | Path) -> InteractionLog:
    p = Path(path)
    users, items, widths, lasts = [], [], [], []
    for ln, f in read_rows(p, "", None):
        if len(f) < 2:
            raise DataFormatError(p, ln, "item", f"expected 'user item [item ...]', got {len(f)} field(s)")
        u = to_int(p, ln, "user", f[0])
        for k, v in enumerate(f[1:], 1):
            items.append(to_int(p, ln, f"item {k}", v))
        users += [u] * (len(f) - 1)
        widths.append(len(f))
        lasts.append(items[-1])
    raw_u, raw_i = np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)
    _refuse_ratings_table(p, np.array(widths), np.array(lasts, dtype=np.int64))
    u, uvocab = dense_ids(raw_u)
    i, ivocab = dense_ids(raw_i)
    order = np.argsort(u, kind="stable")  # file order within each user
    counts = np.bincount(u, minlength=len(uvocab))
    pos = np.arange(len(u)) - np.repeat(np.cumsum(counts) - counts, counts)
    return InteractionLog(user=u[order], item=i[order], timestamp=pos * 86400, num_users=len(uvocab),
                          num_items=len(ivocab), user_raw_ids=uvocab, item_raw_ids=ivocab, name=p.stem)


def _refuse_ratings_table(path: Path, widths: np.ndarray, lasts: np.ndarray) -> None:
    """A ``user item rating timestamp`` table (e.g. MovieLens' u.data) also parses as sequences of three
    "items", and would invent catalogue items from ratings and times: refuse a file whose every line has the
    same 4+ fields (``widths: [lines]``) and whose last field (``lasts: [lines]``) is always a Unix time
    (>= 1e8 seconds, after 1973)."""
    if len(widths) < 2 or widths.min() != widths.max() or widths[0] < 4 or lasts.min() < 100_000_000:
        return
    raise DataFormatError(path, 1, f"item {widths[0] - 1}",
                          f"every line has {widths[0]} fields and the last is a Unix time: this looks like a "
                          "user/item/rating/timestamp table, not sequences. Pass its MovieLens folder, or a .csv "
                          "with a header (user,item,timestamp[,rating])")
