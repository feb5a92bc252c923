"""Line-by-line parsing helpers shared by the loaders: every failure names file, line and field.

Every row is validated: :func:`fast_int_table` (one numpy pass for the big integer tables) accepts a file only
when every line is exactly ``ncols`` plain integers separated by the separator, and otherwise returns None so the
caller re-parses line by line with :func:`read_rows` / :func:`to_int`, which name the offending line and field.
Integers must fit int64; a file that does not decode (invalid UTF-8) and a file without data lines are
:class:`DataFormatError` s too.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onerec_fast.data.log import DataFormatError

INT64 = np.iinfo(np.int64)  # the range every integer field must fit


def read_rows(path: Path, sep: str, fields: tuple[str, ...] | None, encoding: str = "utf-8",
              min_fields: int | None = None) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of each non-empty line split on ``sep`` (whitespace when empty).

    With ``fields``, a line must have exactly ``len(fields)`` fields (or at least ``min_fields``). A file without
    any non-empty line, or with a line that does not decode, raises :class:`DataFormatError`.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    rows = 0
    try:
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
                rows += 1
                yield lineno, parts
    except UnicodeDecodeError:
        raise decode_error(path, encoding, sep, fields) from None
    if not rows:
        raise DataFormatError(path, None, fields[0] if fields else "line", "empty file: no data lines")


def decode_error(path: Path, encoding: str, sep: str, fields: tuple[str, ...] | None) -> DataFormatError:
    """The :class:`DataFormatError` of the first line of ``path`` that does not decode as ``encoding``: its line
    number and field (by ``sep``, whitespace when empty; ``fields`` names them, else ``field <n>``)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as e:
                before = raw[:e.start]
                if sep:
                    k = len(before.split(sep.encode())) - 1
                else:  # the fields before; the bad byte ends the last of them unless whitespace precedes it
                    k = len(before.split()) - (1 if before[-1:] and not before[-1:].isspace() else 0)
                field = fields[k] if fields is not None and k < len(fields) else f"field {k + 1}"
                return DataFormatError(path, lineno, field, f"not valid {encoding} (byte 0x{raw[e.start]:02x} at "
                                                            f"column {e.start + 1})")
    return DataFormatError(path, None, "line", f"not valid {encoding}")


def to_int(path: Path, lineno: int, field: str, value: str) -> int:
    """``value`` as an integer that fits int64, else :class:`DataFormatError` naming file, line and field."""
    try:
        out = int(value)
    except ValueError:
        raise DataFormatError(path, lineno, field, f"expected an integer, got {value!r}") from None
    if not INT64.min <= out <= INT64.max:
        raise DataFormatError(path, lineno, field, f"integer {value} does not fit in 64 bits")
    return out


def to_float(path: Path, lineno: int, field: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(path, lineno, field, f"expected a number, got {value!r}") from None


# byte classes of fast_int_table: 0 anything else, 1 digit, 2 minus sign, 3 separator, 4 newline
_DIGIT, _MINUS, _SEP, _NEWLINE = 1, 2, 3, 4


def fast_int_table(path: Path, sep: str, ncols: int) -> np.ndarray | None:
    """Parse a file of integer fields in a few numpy passes: int64 ``[rows, ncols]``, or None unless every line is
    exactly ``ncols`` integers (optional ``-``, digits) separated by ``sep`` and ended by ``\\n`` (the last may
    lack it), each fitting int64. On None the caller re-parses line by line, which names the offending line and
    field (or accepts what only the careful parser takes: blank lines, ``\\r\\n``, spaces, ``+``)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if not data or not sep:
        return None
    sep_b = sep.encode()
    if len(sep_b) > 1:  # one byte per separator, so that the classes below are per byte
        if b"\0" in data:
            return None
        data = data.replace(sep_b, b"\0")
        sep_b = b"\0"
    if not data.endswith(b"\n"):
        data += b"\n"
    table = np.zeros(256, dtype=np.uint8)
    table[np.frombuffer(b"0123456789", np.uint8)] = _DIGIT
    table[ord("-")] = _MINUS
    table[sep_b[0]] = _SEP
    table[ord("\n")] = _NEWLINE
    cls = table[np.frombuffer(data, np.uint8)]
    if not cls.all():  # a byte outside the plain-integer alphabet (space, '.', '\r', non-ASCII...)
        return None
    special = np.flatnonzero(cls != _DIGIT)  # signs, separators, newlines: the positions that give the structure
    kind = cls[special]
    ends, minus, newlines = special[kind >= _SEP], special[kind == _MINUS], special[kind == _NEWLINE]
    lines = len(newlines)
    # No empty field: a separator or newline always follows a digit. A '-' only starts a field and precedes a
    # digit (index -1 is the final newline, so position 0 counts as the start of a line).
    if (cls[ends - 1] != _DIGIT).any() or (cls[minus - 1] < _SEP).any() or (cls[minus + 1] != _DIGIT).any():
        return None
    # exactly ncols - 1 separators on every line: those between consecutive newlines
    seps = special[kind == _SEP]
    if len(seps) != lines * (ncols - 1):
        return None
    if ncols > 1:
        seps = seps.reshape(lines, ncols - 1)
        if (seps[:, -1] > newlines).any() or (seps[1:, 0] < newlines[:-1]).any():
            return None
    try:
        values = np.array(data.replace(sep_b, b" ").split(), dtype=np.int64)
    except (ValueError, OverflowError):  # beyond int64
        return None
    return values.reshape(lines, ncols)
