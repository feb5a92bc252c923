"""FLOP counts, MFU, timing and the benchmark harness shared by ``pytest --benchmark`` and ``onerec-fast bench``."""

from onerec_fast.perf.flops import attention_flops, lm_head_flops, moe_flops, swiglu_flops
from onerec_fast.perf.mfu import Peak, mfu, peak_flops
from onerec_fast.perf.timing import Timing, time_fn

__all__ = [
    "Peak",
    "Timing",
    "attention_flops",
    "lm_head_flops",
    "mfu",
    "moe_flops",
    "peak_flops",
    "swiglu_flops",
    "time_fn",
]
