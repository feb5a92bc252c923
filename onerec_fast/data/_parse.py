"""Line-by-line parsing helpers shared by the loaders: every failure names file, line and field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onerec_fast.data.log import DataFormatError


def read_rows(path: Path, sep: str, fields: tuple[str, ...] | None, encoding: str = "utf-8",
              min_fields: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of each non-empty line split on ``sep``.

    With ``fields``, a line must have exactly ``len(fields)`` fields (or at least ``min_fields``).
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, encoding=encoding, newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split(sep) if sep else line.split()
            if fields is not None:
                want = len(fields) if min_fields is None else min_fields
                ok = len(parts) == len(fields) if min_fields is None else len(parts) >= min_fields
                if not ok:
                    missing = fields[len(parts)] if len(parts) < len(fields) else fields[-1]
                    raise DataFormatError(path, lineno, missing,
                                          f"expected {want} {sep!r}-separated fields, got {len(parts)}")
            yield lineno, parts


def to_int(path: Path, lineno: int, field: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataFormatError(path, lineno, field, f"expected an integer, got {value!r}") from None


def to_float(path: Path, lineno: int, field: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(path, lineno, field, f"expected a number, got {value!r}") from None


def fast_int_table(path: Path, sep: str, ncols: int) -> np.ndarray | None:
    """Parse a file of integer fields in one numpy call: int64 ``[rows, ncols]``, or None when the file is not a
    clean table (the caller then re-parses line by line, which names the offending line and field)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    toks = (text.replace(sep, " ") if sep.strip() else text).split()
    if len(toks) != lines * ncols:
        return None
    try:
        return np.array(toks, dtype=np.int64).reshape(lines, ncols)
    except (ValueError, OverflowError):
        return None
