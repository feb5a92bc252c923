"""``onerec-fast``: one entry point for the whole recommender and the benchmarks.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
this file only maps names to modules, imported when the subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onerec-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
