"""Timing: CUDA events after warm-up on GPUs, a monotonic clock on CPU; medians."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from onerec_fast.kernels.timing import run_times_ms


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
    return Timing(tuple(run_times_ms(fn, torch.device(device), warmup, rep, flush_l2)))


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
