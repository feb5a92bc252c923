"""Timing runs of a callable: CUDA events after warm-up on GPUs, a monotonic clock on CPU.

The one timing loop of the package: ``kernels.launch_config`` tunes with it and ``onerec_fast.perf.timing``
(the benchmark harness) wraps it, so a tuned config and a reported figure are measured the same way."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["run_times_ms"]


def run_times_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
                 flush_l2: bool = False) -> list[float]:
    """Run ``fn`` ``warmup`` times, then time ``reps`` runs one by one; milliseconds per run.

    On CUDA each run is bracketed by events on the current stream (no host sync inside the timed region; a
    launch error of the warm-up surfaces at the sync before them). ``flush_l2`` writes a 256 MB buffer before
    each run so inputs are not served from the 50-60 MB L2 of an H100/H200."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if flush_l2 else None
        events = []
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times
