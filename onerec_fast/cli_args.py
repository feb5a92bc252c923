"""Argument checks shared by the ``onerec-fast`` subcommands, run by argparse before any work.

    parser.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps")
    parser.add_argument("--lr", type=number(float, min=0.0, min_open=True), default=3e-4, help="learning rate")

A bad value gives argparse's one-line usage error and exit code 2. :class:`UsageError` is for mistakes
found later (an unknown user id, a missing file): ``onerec_fast.cli.main`` prints it as one line too.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["UsageError", "device", "non_negative_int", "number", "positive_int"]


class UsageError(ValueError):
    """A mistake in what the user asked for; the CLI prints ``onerec-fast: error: <message>``, exit 2."""


def number(kind: type = int, *, min: float | None = None, max: float | None = None,
           min_open: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type=`` that parses ``kind`` (int or float) and checks ``min <= value <= max``
    (``min < value`` with ``min_open``); ArgumentTypeError says which bound failed."""
    if kind not in (int, float):
        raise ValueError(f"kind must be int or float, got {kind!r}")

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if min is not None and (value <= min if min_open else value < min):
            raise argparse.ArgumentTypeError(f"must be {'>' if min_open else '>='} {min}, got {text}")
        if max is not None and value > max:
            raise argparse.ArgumentTypeError(f"must be <= {max}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = number(int, min=1)
non_negative_int = number(int, min=0)


def device(text: str) -> str:
    """An argparse ``type=`` for ``--device``: a torch device string whose device exists here."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees no CUDA device (use cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA devices")
    return text
