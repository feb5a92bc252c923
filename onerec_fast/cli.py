"""``onerec-fast``: one entry point for the whole recommender and the benchmarks.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only maps names to modules, imported when the subcommand runs. A user's mistake (a bad
argument, a missing or malformed file, an unknown id) prints one line, ``onerec-fast: error: ...``,
and exits with 2; ``--debug`` or ``ONEREC_FAST_DEBUG=1`` shows the traceback instead. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "backends": ("onerec_fast.perf.cli_backends", "which kernel backends are available here, and why not"),
    "bench": ("onerec_fast.perf.cli_bench", "time every backend of each op and print latency / TFLOP/s / MFU"),
    "demo": ("onerec_fast.train.cli_demo", "synthetic world -> tokenizer -> pretraining -> generation -> metrics"),
    "tokenize": ("onerec_fast.tokenizer.cli", "fit RQ-KMeans semantic IDs on a dataset and print their stats"),
    "train": ("onerec_fast.train.cli_train", "pretrain OneRec (next-token loss over semantic IDs)"),
    "evaluate": ("onerec_fast.train.cli_evaluate", "leave-one-out Recall/NDCG with baselines, legality rate"),
    "generate": ("onerec_fast.train.cli_generate", "top-K recommendations for given users"),
    "rl": ("onerec_fast.rl.cli", "post-train a checkpoint: RSFT, P-Score reward, ECPO"),
}

# Raised for what the user gave us: a bad value (ValueError, which DataFormatError and UsageError are),
# a path that is not there or not readable.
USER_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
PROG = "onerec-fast"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter  # --help shows every option's default
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=fmt)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also ONEREC_FAST_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def _interpret_triton_on_cpu(argv: list[str]) -> None:
    """``bench`` on a machine without CUDA (or ``--device cpu``) runs the Triton kernels through the
    interpreter (``TRITON_INTERPRET=1``), which Triton reads when it is imported. Importing onerec_fast
    already imported it (through torch._dynamo), so the command starts again with the variable set."""
    if "bench" not in argv or "TRITON_INTERPRET" in os.environ:
        return
    import torch

    on_cpu = not torch.cuda.is_available() or any(a in ("--device=cpu",) for a in argv) or \
        any(a == "--device" and b == "cpu" for a, b in zip(argv, argv[1:]))
    if on_cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules:
            os.execv(sys.executable, [sys.executable, "-m", "onerec_fast.cli", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _interpret_triton_on_cpu(argv)
    args = build_parser().parse_args(argv)  # argparse's own errors: usage line, exit 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("ONEREC_FAST_DEBUG", "0") not in ("", "0"):
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
