"""``onerec-fast backends``: which kernel backends are available here, and why not."""

from onerec_fast.backends import describe


def add_arguments(parser) -> None:
    del parser  # no options


def run(args) -> int:
    print(describe())
    return 0
