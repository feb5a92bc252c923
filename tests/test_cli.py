"""The ``onerec-fast`` dispatcher: one-line errors with exit 2 for user mistakes (tracebacks with
--debug), defaults in --help, early numeric checks, bench on CPU, generate's ids and history exclusion."""

import argparse
import os
import sys

import pytest

from onerec_fast import cli
from onerec_fast.cli_args import UsageError, number, positive_int

MINE = ("backends", "bench", "generate")


def _subparsers():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_user_errors_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ONEREC_FAST_DEBUG", raising=False)
    missing = str(tmp_path / "nope.pt")
    assert cli.main(["generate", "--checkpoint", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onerec-fast: error: ") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "generate", "--checkpoint", missing])
    monkeypatch.setenv("ONEREC_FAST_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["generate", "--checkpoint", missing])
    with pytest.raises(SystemExit) as e:  # checked by argparse before any work
        cli.main(["generate", "--checkpoint", missing, "--top-k", "-4"])
    assert e.value.code == 2 and "must be >= 1, got -4" in capsys.readouterr().err


def test_help_shows_defaults_and_every_option_has_help():
    _, subs = _subparsers()
    for name, p in subs.items():
        assert isinstance(p.formatter_class, type) and issubclass(p.formatter_class,
                                                                   argparse.ArgumentDefaultsHelpFormatter)
    assert "(default: 10)" in subs["generate"].format_help()
    for name in MINE:
        for a in subs[name]._actions:
            assert a.help, f"{name} {a.option_strings}"


def test_number_checks():
    assert positive_int("3") == 3
    for bad in ("0", "-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_int(bad)
    frac = number(float, min=0.0, max=1.0, min_open=True)
    assert frac("1") == 1.0
    with pytest.raises(argparse.ArgumentTypeError, match="> 0.0"):
        frac("0")
    assert issubclass(UsageError, ValueError)


def test_bench_on_cpu_restarts_with_triton_interpret(monkeypatch):
    """Triton reads TRITON_INTERPRET on import, which importing onerec_fast already did: bench restarts."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    monkeypatch.setattr(os, "execv", lambda exe, args: calls.append(args))
    cli._interpret_triton_on_cpu(["generate", "--checkpoint", "x"])
    assert "TRITON_INTERPRET" not in os.environ and not calls
    cli._interpret_triton_on_cpu(["bench", "--device", "cpu", "--suite", "moe"])
    assert os.environ["TRITON_INTERPRET"] == "1"
    assert calls == [[sys.executable, "-m", "onerec_fast.cli", "bench", "--device", "cpu", "--suite", "moe"]]


def test_generate_raw_ids_and_history_exclusion(tmp_path, capsys):
    from onerec_fast.train import cli_train

    world = [x for kv in ("num_users=40", "num_items=80", "median_history=20", "max_history=40",
                          "heavy_user_frac=0") for x in ("--synthetic", kv)]
    p = argparse.ArgumentParser()
    cli_train.add_arguments(p)
    assert cli_train.run(p.parse_args(["--steps", "1", "--batch-size", "8", "--out", str(tmp_path), *world])) == 0
    ck = str(tmp_path / "checkpoint.pt")
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", ck, "--users", "40"]) == 2
    assert "--users: 40 not in the data (users 0..39)" in capsys.readouterr().err
    assert cli.main(["generate", "--checkpoint", ck, "--users", "3", "--top-k", "5", "--beam", "16",
                     "--history", "100"]) == 0
    out = capsys.readouterr().out
    history = out.split("recent: ")[1].split("\n")[0]
    recs = [line.split(". ", 1)[1].split("  ")[0].strip() for line in out.splitlines() if ". item" in line]
    assert out.startswith("user 3:") and len(recs) == 5 and not any(r in history.split("; ") for r in recs)
