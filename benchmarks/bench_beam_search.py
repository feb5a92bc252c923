"""``pytest --benchmark benchmarks/bench_beam_search.py``: trie build, per-level beam steps and the whole
constrained search against the Hugging Face-style, dense-masking and CSR-gather baselines (issue 5)."""

import pytest

from benchmarks.conftest import DEVICE
from onerec_fast.perf.suites.beam_search import cases

pytestmark = pytest.mark.benchmark_case

# Full-size cases (1M and 10M items, 4096 rows) on a GPU only: their names carry the trie's bytes per item,
# so listing them builds the item sets, which takes well under a second there and minutes on 2 CPU cores.
CASES = cases(DEVICE, quick=DEVICE.type != "cuda")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_beam_search(case, bench_case):
    bench_case(case)
