"""``onerec-fast bench``: time every backend of each op on this machine and print the table.

On a GPU it runs the issue-sized bf16 shapes; on CPU small shapes (``--full`` forces the big ones)
with the Triton kernels through the interpreter, so the numbers there only show the harness works.
"""

from __future__ import annotations

import torch

from onerec_fast.cli_args import device


def add_arguments(parser) -> None:
    from onerec_fast.perf.harness import SUITES

    parser.add_argument("--suite", action="append", choices=SUITES,
                        help="suite to run (repeatable; default: all)")
    parser.add_argument("--device", type=device, default=None, help="cuda or cpu (None: cuda when available)")
    parser.add_argument("--full", action="store_true", help="full-size shapes even on CPU")
    parser.add_argument("--peak", choices=("datasheet", "measured"), default=None,
                        help="MFU against the datasheet dense peak or a measured matmul (default: datasheet on known GPUs)")
    parser.add_argument("--out", default="bench_results", help="folder for bench.json / bench.csv")


def run(args) -> int:
    # On CPU, onerec_fast.cli has set TRITON_INTERPRET before anything imported triton.
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from onerec_fast.backends import describe
    from onerec_fast.perf.harness import environment, format_table, run_suites, write_results

    print("backends:\n" + describe())
    measured = None if args.peak is None else args.peak == "measured"

    def save(case_rows, rows, peak):
        # Each case's rows as soon as it ends, and the files rewritten: a run cut short by a time limit (the
        # device machines allow 10 minutes a command) keeps every finished case.
        print(format_table(case_rows, peak).split("\n", 3)[-1], flush=True)
        write_results(rows, environment(device, peak), args.out)

    rows, peak = run_suites(args.suite, device, quick=device.type == "cpu" and not args.full, measured_peak=measured,
                            on_case=save)
    env = environment(device, peak)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(format_table(rows, peak))
    j, c = write_results(rows, env, args.out)
    print(f"results: {j} {c}")
    return 0
