"""Fixtures for the benchmark suites: each case times every implementation with the harness
(CUDA events on GPU) and feeds the fastest one to pytest-benchmark as well."""

import pytest
import torch

from onerec_fast.perf.harness import environment, run_case, write_results
from onerec_fast.perf.mfu import peak_flops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def bench_case(request, benchmark):
    config = request.config

    def run(case):
        if config.onerec_bench_peak is None:
            config.onerec_bench_peak = (peak_flops(DEVICE, case.dtype), DEVICE)
        peak = config.onerec_bench_peak[0]
        inputs = case.setup()  # built once: timed by the harness, then by pytest-benchmark
        rows = run_case(case, DEVICE, peak, inputs=inputs)
        config.onerec_bench_rows.extend(rows)
        # Saved after every case (the summary rewrites them at the end): a run killed by a time limit keeps
        # the finished cases; a killed session-end summary once lost a whole 330 s suite on the H100.
        write_results(config.onerec_bench_rows, environment(DEVICE, peak), config.getoption("--bench-dir"))
        ok = [r for r in rows if r.status == "ok"]
        assert ok, f"no implementation of {case.suite}/{case.name} ran: {[r.status for r in rows]}"
        best = min(ok, key=lambda r: r.median_ms)
        benchmark.extra_info.update({r.impl: r.median_ms for r in ok})
        benchmark.extra_info["best"] = best.impl
        fn = case.impls[best.impl](inputs)

        def timed():
            fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()

        benchmark.pedantic(timed, rounds=5 if DEVICE.type == "cuda" else 1, iterations=1, warmup_rounds=1)

    return run
