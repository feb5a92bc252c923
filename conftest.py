"""Test-session set-up shared by tests/ and benchmarks/.

* Without a CUDA device, Triton kernels run under the interpreter (``TRITON_INTERPRET=1``) on CPU
  tensors. It must be set before triton is imported, hence here.
* ``--benchmark`` turns on the benchmark suites in ``benchmarks/`` (skipped otherwise so plain
  ``pytest`` stays fast); ``--bench-dir`` is where their JSON/CSV go. (Full-size shapes on CPU:
  ``onerec-fast bench --full``.)
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # collection errors will say so
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmark suites in benchmarks/ and print the latency/MFU table")
    parser.addoption("--bench-dir", default="bench_results", help="folder for the benchmark JSON/CSV")


def pytest_configure(config):
    # Filled by benchmarks/conftest.py: harness rows and (peak, device) of this session.
    config.onerec_bench_rows = []
    config.onerec_bench_peak = None


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmark: run with --benchmark")
    for item in items:
        if "benchmark_case" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.onerec_bench_rows
    if not rows:
        return
    from onerec_fast.perf.harness import environment, format_table, write_results

    peak, device = config.onerec_bench_peak
    env = environment(device, peak)
    terminalreporter.write_sep("=", "onerec_fast benchmarks")
    terminalreporter.write_line(" ".join(f"{k}={v}" for k, v in env.items()))
    terminalreporter.write_line(format_table(rows, peak))
    j, c = write_results(rows, env, config.getoption("--bench-dir"))
    terminalreporter.write_line(f"results: {j} {c}")


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory, monkeypatch):
    """Cached baseline results (``onerec_fast.train.evaluate.baseline_cache_dir``) and launch configs go to a
    per-session temporary folder, never the user's ``~/.cache``. Tuning launch configs on first use is off unless
    ``ONEREC_FAST_AUTOTUNE`` is set: on a GPU it would tune every shape bucket the small test cases touch (a few
    compiles each), and the tests and benchmarks are about the shipped configs (tests/test_launch_config.py turns
    it on for itself)."""
    monkeypatch.setenv("ONEREC_FAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    if "ONEREC_FAST_AUTOTUNE" not in os.environ:
        monkeypatch.setenv("ONEREC_FAST_AUTOTUNE", "0")
