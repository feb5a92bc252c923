"""Timing: CUDA events after warm-up on GPUs, a monotonic clock on CPU; medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def quantile_ms(self, q: float) -> float:
        s = sorted(self.times_ms)
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 10, rep: int = 50,
            flush_l2: bool = False) -> Timing:
    """Run ``fn`` ``warmup`` times, then time ``rep`` runs one by one.

    On CUDA each run is bracketed by events on the current stream (no host sync inside the timed
    region). ``flush_l2`` writes a 256 MB buffer before each run so inputs are not served from the
    60 MB L2 of an H200.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if flush_l2 else None
        events = []
        for _ in range(rep):
            if flush is not None:
                flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize(device)
        return Timing(tuple(s.elapsed_time(e) for s, e in events))
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(tuple(times))


def capture_cuda_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn()``, captured after one warm-up call on a side stream (which also compiles
    Triton kernels and lets the caching allocator settle). ``graph.replay()`` reruns the GPU work
    without the Python launch overhead of each op."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
