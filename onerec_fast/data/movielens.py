"""MovieLens loaders: ML-100K (``u.data``, ``u.item``, ``u.user``), ML-1M (``ratings.dat``, ``movies.dat``,
``users.dat``) and the CSV releases (ML-10M/20M/25M/latest: ``ratings.csv`` with ``userId,movieId,rating,timestamp``;
its ratings only, no item or user features), to an :class:`InteractionLog`.

* engagement: ``rating`` (int 1..5); the default positive rule is ``rating>=4``.
* item features: ``genre`` (int, first listed genre + 1, 0 = none), ``genres`` (float multi-hot ``[I, G]``, a content
  vector), ``year`` (float, from the title or release date; unknown -> the median); titles in ``item_titles``.
* user features (ints, 0 = unknown): ``gender`` (F=1, M=2), ``age`` (ML-1M's 7 buckets, 1..7), ``occupation``
  (1..), ``zip`` (first digit + 1).

Ids become dense (sorted raw ids -> 0..n-1, in ``item_raw_ids``/``user_raw_ids``). A rating that names a user or
item missing from the user/item table, or any malformed field, raises :class:`DataFormatError` with file and line.
The ratings file is read in one numpy pass only when every line is exactly 4 plain integers; any irregularity
(a 5th field on one line and 3 on another, an empty field, an integer beyond int64, invalid UTF-8) sends it through
the line-by-line parser, which names the line. An empty file is an error at load time.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from onerec_fast.data._parse import fast_int_table, read_rows, to_int
from onerec_fast.data.log import DataFormatError, InteractionLog
from onerec_fast.data.tables import load_interactions_table

__all__ = ["load_movielens", "load_ml100k", "load_ml1m", "load_ml_csv"]

ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western")
ML1M_GENRES = ML100K_GENRES[1:]
_AGE_BUCKETS = (1, 18, 25, 35, 45, 50, 56)  # ML-1M's age codes; ML-100K ages are bucketed the same way
_YEAR = re.compile(r"\((\d{4})\)\s*$")
_ENC = "latin-1"  # both releases are ISO-8859-1


def load_movielens(path: str | Path) -> InteractionLog:
    """Load a MovieLens release from its folder (detected by ``u.data``, ``ratings.dat`` or ``ratings.csv``)."""
    p = Path(path)
    if (p / "u.data").exists():
        return load_ml100k(p)
    if (p / "ratings.dat").exists():
        return load_ml1m(p)
    if (p / "ratings.csv").exists():
        return load_ml_csv(p)
    raise FileNotFoundError(f"{p}: no MovieLens ratings found (u.data: ML-100K, ratings.dat: ML-1M, ratings.csv: "
                            "the CSV releases)")


def load_ml_csv(path: str | Path) -> InteractionLog:
    """A CSV release of MovieLens (ML-20M, ML-25M, ml-latest): ``ratings.csv`` (``userId,movieId,rating,timestamp``,
    ratings 0.5..5 in half stars), the positive rule ``rating>=4`` as for ML-100K/1M."""
    p = Path(path)
    return load_interactions_table(p / "ratings.csv", user_col="userId", item_col="movieId", time_col="timestamp",
                                   engagement_cols=["rating"], positive_rule="rating>=4", name=p.name)


def _age_bucket(age: int) -> int:
    return int(np.searchsorted(_AGE_BUCKETS, age, side="right"))  # 1..7


def _year(title: str, date: str = "") -> float:
    m = _YEAR.search(title)
    if m:
        return float(m.group(1))
    m = re.search(r"(\d{4})$", date)
    return float(m.group(1)) if m else float("nan")


def _ratings(path: Path, sep: str) -> tuple[np.ndarray, ...]:
    names = ("user_id", "item_id", "rating", "timestamp")
    table = fast_int_table(path, sep, 4)
    if table is not None and len(table) and table[:, 2].min() >= 1 and table[:, 2].max() <= 5:
        return tuple(table[:, c].copy() for c in range(4))
    u, i, r, t = [], [], [], []
    for ln, f in read_rows(path, sep, names):
        u.append(to_int(path, ln, "user_id", f[0]))
        i.append(to_int(path, ln, "item_id", f[1]))
        rv = to_int(path, ln, "rating", f[2])
        if not 1 <= rv <= 5:
            raise DataFormatError(path, ln, "rating", f"expected 1..5, got {rv}")
        r.append(rv)
        t.append(to_int(path, ln, "timestamp", f[3]))
    return tuple(np.array(v, dtype=np.int64) for v in (u, i, r, t))


def _check_known(path: Path, sep: str, field: str, ids: np.ndarray, known: np.ndarray, table: str) -> None:
    """Raise naming the first ratings line whose id is missing from the table."""
    bad = ~np.isin(ids, known)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        for n, (ln, _) in enumerate(read_rows(path, sep, None)):
            if n == first:
                raise DataFormatError(path, ln, field, f"id {ids[first]} is not listed in {table}")


def _build(name, ratings_path, sep, u, i, r, t, item_ids, titles, genres, years, user_ids, user_cols) -> InteractionLog:
    _check_known(ratings_path, sep, "item_id", i, item_ids, "the item table")
    _check_known(ratings_path, sep, "user_id", u, user_ids, "the user table")
    iorder, uorder = np.argsort(item_ids), np.argsort(user_ids)
    item_vocab, user_vocab = item_ids[iorder], user_ids[uorder]
    if len(np.unique(item_vocab)) != len(item_vocab) or len(np.unique(user_vocab)) != len(user_vocab):
        raise ValueError(f"{name}: duplicate ids in the item or user table")
    years = np.asarray(years, dtype=np.float64)[iorder]
    years = np.where(np.isnan(years), np.nanmedian(years) if np.isfinite(years).any() else 0.0, years)
    genres = np.asarray(genres, dtype=np.float32)[iorder]
    first = np.where(genres.any(1), genres.argmax(1) + 1, 0).astype(np.int64)
    log = InteractionLog(
        user=np.searchsorted(user_vocab, u), item=np.searchsorted(item_vocab, i), timestamp=t,
        num_users=len(user_vocab), num_items=len(item_vocab), engagement={"rating": r},
        item_features={"genre": first, "genres": genres, "year": years.astype(np.float32)},
        user_features={k: np.asarray(v, dtype=np.int64)[uorder] for k, v in user_cols.items()},
        item_titles=[titles[j] for j in iorder], user_raw_ids=user_vocab, item_raw_ids=item_vocab,
        positive_rule="rating>=4", name=name)
    return log.sort_()


def load_ml100k(path: str | Path) -> InteractionLog:
    """ML-100K: 943 users, 1682 items, 100000 ratings."""
    p = Path(path)
    u, i, r, t = _ratings(p / "u.data", "\t")
    item_f = p / "u.item"
    fields = ("movie_id", "title", "release_date", "video_release_date", "imdb_url") + tuple(
        f"genre:{g}" for g in ML100K_GENRES)
    ids, titles, genres, years = [], [], [], []
    for ln, f in read_rows(item_f, "|", fields, encoding=_ENC):
        ids.append(to_int(item_f, ln, "movie_id", f[0]))
        titles.append(f[1])
        flags = []
        for name, v in zip(fields[5:], f[5:]):
            if v not in ("0", "1"):
                raise DataFormatError(item_f, ln, name, f"expected 0 or 1, got {v!r}")
            flags.append(v == "1")
        genres.append(flags)
        years.append(_year(f[1], f[2]))
    user_f = p / "u.user"
    uids, cols = [], {"gender": [], "age": [], "occupation": [], "zip": []}
    occ: dict[str, int] = {}
    for ln, f in read_rows(user_f, "|", ("user_id", "age", "gender", "occupation", "zip_code"), encoding=_ENC):
        uids.append(to_int(user_f, ln, "user_id", f[0]))
        cols["age"].append(_age_bucket(to_int(user_f, ln, "age", f[1])))
        if f[2] not in ("F", "M"):
            raise DataFormatError(user_f, ln, "gender", f"expected F or M, got {f[2]!r}")
        cols["gender"].append(1 if f[2] == "F" else 2)
        cols["occupation"].append(occ.setdefault(f[3], len(occ) + 1))
        cols["zip"].append(int(f[4][0]) + 1 if f[4][:1].isdigit() else 0)
    return _build("ml-100k", p / "u.data", "\t", u, i, r, t, np.array(ids), titles, genres, years,
                  np.array(uids), cols)


def load_ml1m(path: str | Path) -> InteractionLog:
    """ML-1M: 6040 users, 3706 rated items (3883 listed), 1000209 ratings."""
    p = Path(path)
    u, i, r, t = _ratings(p / "ratings.dat", "::")
    item_f = p / "movies.dat"
    ids, titles, genres, years = [], [], [], []
    gidx = {g: k for k, g in enumerate(ML1M_GENRES)}
    for ln, f in read_rows(item_f, "::", ("movie_id", "title", "genres"), encoding=_ENC):
        ids.append(to_int(item_f, ln, "movie_id", f[0]))
        titles.append(f[1])
        flags = [False] * len(ML1M_GENRES)
        for g in filter(None, f[2].split("|")):
            if g not in gidx:
                raise DataFormatError(item_f, ln, "genres", f"unknown genre {g!r}")
            flags[gidx[g]] = True
        genres.append(flags)
        years.append(_year(f[1]))
    user_f = p / "users.dat"
    uids, cols = [], {"gender": [], "age": [], "occupation": [], "zip": []}
    for ln, f in read_rows(user_f, "::", ("user_id", "gender", "age", "occupation", "zip_code"), encoding=_ENC):
        uids.append(to_int(user_f, ln, "user_id", f[0]))
        if f[1] not in ("F", "M"):
            raise DataFormatError(user_f, ln, "gender", f"expected F or M, got {f[1]!r}")
        cols["gender"].append(1 if f[1] == "F" else 2)
        cols["age"].append(_age_bucket(to_int(user_f, ln, "age", f[2])))
        cols["occupation"].append(to_int(user_f, ln, "occupation", f[3]) + 1)
        cols["zip"].append(int(f[4][0]) + 1 if f[4][:1].isdigit() else 0)
    return _build("ml-1m", p / "ratings.dat", "::", u, i, r, t, np.array(ids), titles, genres, years,
                  np.array(uids), cols)
