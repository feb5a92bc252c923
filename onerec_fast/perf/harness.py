"""The benchmark harness: every implementation of a case timed on the same inputs in one run.

A *suite* is a module ``onerec_fast.perf.suites.<name>`` with a function
``cases(device: torch.device, quick: bool) -> list[Case]``; ``quick`` asks for small shapes (the
CPU run in CI). ``benchmarks/bench_<name>.py`` runs a suite under ``pytest --benchmark`` and
``onerec-fast bench`` runs all of them.

Each row reports median latency, TFLOP/s (useful FLOPs of the case over the median), MFU against
the stated peak, speedup over the reference implementation of the case, and peak memory.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from onerec_fast.perf.mfu import Peak, peak_flops
from onerec_fast.perf.timing import time_fn

SUITES = ("moe", "varlen_attention", "beam_search", "rms_norm")


class Unavailable(Exception):
    """Raised by an implementation's setup when it cannot run here (backend missing); the row says why."""


@dataclass
class Case:
    suite: str
    name: str  # shape and pass, e.g. "d1024 f2048 E24 k2 T4096 fwd"
    flops: float  # useful FLOPs of one call
    setup: Callable[[], dict]  # builds the inputs once; every implementation gets the same dict
    impls: dict[str, Callable[[dict], Callable[[], object]]]  # label -> (inputs -> zero-arg fn to time)
    reference: str = "reference"  # label the speedup column divides by
    dtype: torch.dtype = torch.bfloat16
    params: dict = field(default_factory=dict)


@dataclass
class Row:
    suite: str
    case: str
    impl: str
    status: str  # "ok" or why not
    median_ms: float = math.nan
    p20_ms: float = math.nan
    p80_ms: float = math.nan
    tflops: float = math.nan
    mfu: float = math.nan
    speedup: float = math.nan
    peak_mem_mb: float = math.nan


def load_suite(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; suites: {SUITES}")
    return importlib.import_module(f"onerec_fast.perf.suites.{name}")


def run_case(case: Case, device: torch.device, peak: Peak, *, warmup: int | None = None,
             rep: int | None = None, budget_ms: float = 1000.0, inputs: dict | None = None) -> list[Row]:
    """Time every implementation of ``case``; rows in the order of ``case.impls``.

    Each gets ``warmup`` untimed runs then ``rep`` timed ones (fewer when a run is slow: about
    ``budget_ms`` of timed runs, never fewer than 5). ``inputs`` (from ``case.setup()``) lets a caller
    that needs the inputs afterwards build them once.
    """
    cuda = device.type == "cuda"
    warmup = warmup if warmup is not None else (10 if cuda else 1)
    rep = rep if rep is not None else (50 if cuda else 3)
    if inputs is None:
        inputs = case.setup()
    rows: list[Row] = []
    for label, make in case.impls.items():
        try:
            fn = make(inputs)
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            # A slow implementation (the reference at B=1024 takes ~100 ms a call) gets fewer runs, so a
            # suite fits a time budget: about `budget_ms` of timed work per implementation, at least 5 runs.
            est = time_fn(fn, device, warmup=1, rep=1).median_ms
            n = max(5, min(rep, int(budget_ms / max(est, 1e-3))))
            t = time_fn(fn, device, warmup=min(warmup, n), rep=n)
            mem = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else math.nan
        except Unavailable as e:
            rows.append(Row(case.suite, case.name, label, f"n/a: {e}"))
            continue
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(Row(case.suite, case.name, label, "n/a: out of memory"))
            continue
        sec = t.median_ms * 1e-3
        rows.append(Row(case.suite, case.name, label, "ok", t.median_ms, t.quantile_ms(0.2), t.quantile_ms(0.8),
                        case.flops / sec / 1e12, case.flops / sec / peak.flops, math.nan, mem))
    ref = next((r for r in rows if r.impl == case.reference and r.status == "ok"), None)
    for r in rows:
        if ref is not None and r.status == "ok":
            r.speedup = ref.median_ms / r.median_ms
    if cuda:
        torch.cuda.empty_cache()
    return rows


def environment(device: torch.device, peak: Peak) -> dict:
    import triton  # noqa: F401  (version only; present on every supported install)

    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", "?"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "peak": str(peak),
    }
    return env


def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(rows: list[Row], peak: Peak) -> str:
    """A fixed-width table, one line per (case, implementation)."""
    head = f"{'suite':<17}{'case':<44}{'impl':<18}{'median ms':>11}{'TFLOP/s':>9}{'MFU':>7}{'vs ref':>8}{'mem MB':>9}  status"
    lines = [f"MFU against {peak}", head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and (r.suite, r.case) != last:
            lines.append("")
        last = (r.suite, r.case)
        lines.append(
            f"{r.suite:<17}{r.case[:43]:<44}{r.impl[:17]:<18}{_fmt(r.median_ms, '11.4f')}{_fmt(r.tflops, '9.2f')}"
            f"{_fmt(100 * r.mfu, '6.1f')}%{_fmt(r.speedup, '7.2f')}x{_fmt(r.peak_mem_mb, '9.1f')}  {r.status}"
        )
    return "\n".join(lines)


def write_results(rows: list[Row], env: dict, folder: str, stem: str = "bench") -> tuple[str, str]:
    """Write ``<stem>.json`` (environment + rows) and ``<stem>.csv`` under ``folder``; return the paths."""
    os.makedirs(folder, exist_ok=True)
    jpath, cpath = os.path.join(folder, f"{stem}.json"), os.path.join(folder, f"{stem}.csv")
    with open(jpath, "w") as f:
        json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["suite"])
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    return jpath, cpath


def run_suites(names: list[str] | None, device: torch.device, *, quick: bool, measured_peak: bool | None = None,
               dtype: torch.dtype = torch.bfloat16, log=print, on_case=None) -> tuple[list[Row], Peak]:
    """Run suites end to end (used by ``onerec-fast bench``). ``on_case(case_rows, rows_so_far, peak)`` runs
    after every case, so a caller can show and save the rows before a long suite ends (or is killed)."""
    peak = peak_flops(device, dtype, measured=measured_peak)
    rows: list[Row] = []
    for name in names or SUITES:
        for case in load_suite(name).cases(device, quick):
            log(f"  {name}: {case.name}")
            case_rows = run_case(case, device, peak)
            rows.extend(case_rows)
            if on_case is not None:
                on_case(case_rows, rows, peak)
    return rows, peak
