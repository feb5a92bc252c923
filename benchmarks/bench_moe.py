"""``pytest --benchmark benchmarks/bench_moe.py``: the MoE FFN layer, forward and forward+backward, against
the per-expert loop and the torch grouped_mm pipeline (issue 3; cases in onerec_fast/perf/suites/moe.py)."""

import pytest

from benchmarks.conftest import DEVICE
from onerec_fast.perf.suites.moe import cases

pytestmark = pytest.mark.benchmark_case

CASES = cases(DEVICE, quick=DEVICE.type != "cuda")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_moe(case, bench_case):
    bench_case(case)
