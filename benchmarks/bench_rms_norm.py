"""``pytest --benchmark benchmarks/bench_rms_norm.py``: RMSNorm as a bf16 training step runs it, forward and
forward+backward, against ``F.rms_norm`` and its ``torch.compile`` (cases in onerec_fast/perf/suites/rms_norm.py)."""

import pytest

from benchmarks.conftest import DEVICE
from onerec_fast.perf.suites.rms_norm import cases

pytestmark = pytest.mark.benchmark_case

CASES = cases(DEVICE, quick=DEVICE.type != "cuda")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rms_norm(case, bench_case):
    bench_case(case)
