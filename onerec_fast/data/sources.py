"""One entry point from a command-line data argument to an :class:`InteractionLog`.

``load_source(spec)``:

* ``"synthetic"`` -> the synthetic world (``synthetic_overrides`` are :class:`SyntheticConfig` fields);
* a folder with ``u.data`` (ML-100K), ``ratings.dat`` (ML-1M) or ``ratings.csv`` (the CSV releases, ML-20M...), or
  that file itself (``ratings.csv`` beside a ``movies.csv``) -> MovieLens;
* a ``.csv`` / ``.parquet`` file -> the generic interactions table (``table_kwargs`` as for
  :func:`load_interactions_table`; the user, item and time columns found by their common names);
* any other file -> SASRec-style sequences (``user item item ...``).
"""

from __future__ import annotations

from pathlib import Path

from onerec_fast.data.log import InteractionLog
from onerec_fast.data.movielens import load_movielens
from onerec_fast.data.sequences import load_sequences
from onerec_fast.data.synthetic import SyntheticWorld, make_synthetic_world
from onerec_fast.data.tables import load_interactions_table

__all__ = ["load_source"]

# MovieLens ratings files (ML-100K, ML-1M): given one, its folder is read (users, items, ratings, features).
_MOVIELENS_FILES = ("u.data", "ratings.dat")


def load_source(spec: str, *, seed: int = 0, synthetic_overrides: dict | None = None,
                table_kwargs: dict | None = None) -> tuple[InteractionLog, SyntheticWorld | None]:
    """Return ``(log, world)``; ``world`` is the :class:`SyntheticWorld` for ``"synthetic"``, else None."""
    if spec == "synthetic":
        world = make_synthetic_world(seed=seed, **(synthetic_overrides or {}))
        return world.log, world
    p = Path(spec)
    if p.is_dir():
        return load_movielens(p), None
    if p.is_file() and (p.name in _MOVIELENS_FILES or (p.name == "ratings.csv" and (p.parent / "movies.csv").exists())):
        return load_movielens(p.parent), None  # the ratings file of a MovieLens folder: the folder
    if not p.exists():
        raise FileNotFoundError(f"data source {spec!r}: not 'synthetic' and no such file or folder")
    if p.suffix.lower() in (".csv", ".parquet", ".pq"):
        return load_interactions_table(p, **(table_kwargs or {})), None
    return load_sequences(p), None
