"""Model FLOP utilization against a stated peak.

The datasheet peaks are dense (no sparsity) tensor-core rates; ``peak_flops(..., measured=True)``
instead times a large matmul on this device, which is the honest ceiling on a given card (the H200
here measured 765-798 TFLOP/s bf16 against the 989 datasheet).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# Dense datasheet rates in FLOP/s, keyed by a substring of the device name, then dtype.
_DATASHEET: dict[str, dict[torch.dtype, float]] = {
    "H200": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "H100": {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12},
    "A100": {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12},
    "L40S": {torch.bfloat16: 362e12, torch.float16: 362e12, torch.float32: 91.6e12},
}


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s
    source: str  # what the number is, printed with every table

    def __str__(self) -> str:
        return f"{self.flops / 1e12:.1f} TFLOP/s ({self.source})"


@functools.lru_cache(maxsize=None)
def _measured(device_type: str, device_index: int | None, dtype: torch.dtype) -> float:
    from onerec_fast.perf.timing import time_fn

    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    n = 8192 if device.type == "cuda" else 512
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    t = time_fn(lambda: a @ b, device, warmup=3, rep=10)
    return 2.0 * n**3 / (t.median_ms * 1e-3)


def peak_flops(device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
               measured: bool | None = None) -> Peak:
    """The FLOP/s MFU is computed against.

    ``measured=None`` reads ``ONEREC_FAST_PEAK`` ("datasheet" or "measured"; default datasheet where
    the device is in the table, measured otherwise, e.g. on CPU).
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if measured is None:
        env = os.environ.get("ONEREC_FAST_PEAK", "datasheet")
        if env not in ("datasheet", "measured"):
            raise ValueError(f"ONEREC_FAST_PEAK must be 'datasheet' or 'measured', got {env!r}")
        measured = env == "measured"
    if not measured and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in _DATASHEET.items():
            if key in name and dtype in table:
                return Peak(table[dtype], f"datasheet dense {str(dtype).removeprefix('torch.')}, {key}")
    if device.type == "cpu":
        dtype = torch.float32  # CPU half-precision matmuls are emulated; fp32 is the CPU's real peak
    f = _measured(device.type, device.index, dtype)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return Peak(f, f"measured {str(dtype).removeprefix('torch.')} matmul on {where}")


def mfu(flops: float, seconds: float, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16, peak: Peak | None = None) -> float:
    """Fraction of peak reached by doing ``flops`` useful operations in ``seconds``."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    p = peak if peak is not None else peak_flops(device, dtype)
    return flops / seconds / p.flops
