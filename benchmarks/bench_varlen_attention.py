"""``pytest --benchmark benchmarks/bench_varlen_attention.py``: variable-length cross-attention
(reference, padded SDPA + mask, dense SDPA, FlexAttention, triton), the QFormer module and
beam-shared decoding, side by side; the table prints at the end of the session."""

import pytest

from benchmarks.conftest import DEVICE
from onerec_fast.perf.suites import varlen_attention as suite

pytestmark = pytest.mark.benchmark_case

_CASES = suite.cases(DEVICE, quick=DEVICE.type != "cuda")


@pytest.mark.parametrize("case", _CASES, ids=[c.name for c in _CASES])
def test_varlen_attention(case, bench_case):
    bench_case(case)
