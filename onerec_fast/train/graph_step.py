"""CUDA-graph capture of the training step (``TrainConfig.cuda_graph``).

A small model's step is bound by launching its ~1,000 kernels, not by their work: 0.015b on Amazon Sports at
batch 256 spent 40-45 ms of host time per step against 20 ms of GPU time (H100, benchmarks/RESULTS.md, "Where
a training step goes"). A graph replays the whole step (forward, backward, gradient clipping, the non-finite
flag, AdamW, the MoE bias update) from one launch.

A graph needs fixed shapes, and a jagged batch changes its shape every step. :func:`fixed_shape_batch` pads the
pathways into slots (short-term and positive feedback to the model's ``short_len``/``pos_len``, which the
encoder's token layout has anyway; lifelong to a power of two, so a run sees a handful of shapes), which
gives the same loss: padding is masked out of every attention and never reaches a gradient. Each shape gets
its graph the second time it comes (the first runs eagerly, which compiles the kernels and creates the
optimizer state, none of which may happen in a capture) and is replayed after that.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from onerec_fast.model.encoder import PaddedItems

__all__ = ["StepGraphs", "fixed_shape_batch", "lifelong_slots"]

MIN_LIFELONG_SLOTS = 8


def lifelong_slots(longest: int) -> int:
    """Padded lifelong slots for a batch whose longest lifelong history has ``longest`` items: the next power
    of two (at least ``MIN_LIFELONG_SLOTS``)."""
    return max(MIN_LIFELONG_SLOTS, 1 << max(0, int(longest) - 1).bit_length())


def fixed_shape_batch(batch, short_len: int, pos_len: int, pin_memory: bool = False):
    """``batch`` (a jagged ``UserBatch``, on the host) with its pathways padded (:class:`PaddedItems`, in pinned
    memory with ``pin_memory``): short-term to ``short_len`` slots, positive feedback to ``pos_len``, lifelong
    to :func:`lifelong_slots` of its longest history. Shapes then depend on the batch size and that power of
    two only."""
    longest = int(batch.lifelong.lengths().max()) if len(batch) else 0
    pad = functools.partial(PaddedItems.from_jagged, pin_memory=pin_memory)
    return dataclasses.replace(batch, short=pad(batch.short, short_len), positive=pad(batch.positive, pos_len),
                               lifelong=pad(batch.lifelong, lifelong_slots(longest)))


def _identity(state: tuple) -> tuple:
    return tuple(x if isinstance(x, int) else id(x) for x in state)


def _tensors(batch) -> list[torch.Tensor]:
    """Every tensor of ``batch`` (anything with ``map_tensors``), in a fixed order."""
    out: list[torch.Tensor] = []
    batch.map_tensors(lambda t: out.append(t) or t)
    return out


class _Captured:
    """``step(batch) -> tuple of tensors`` captured for one batch shape; the batch is copied into static inputs."""

    def __init__(self, step: Callable, batch, device: torch.device):
        static = batch.to(device)
        self.inputs = _tensors(static)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate host memory during the capture
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = step(static)

    def __call__(self, tensors: list[torch.Tensor]) -> tuple:
        """Replay on a batch given as its :func:`_tensors`."""
        for static, new in zip(self.inputs, tensors):
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.out


class StepGraphs:
    """Training steps replayed from CUDA graphs, one per batch shape.

    ``step(batch_on_device) -> tuple of tensors`` does one whole optimizer step without a host sync and
    without zeroing gradients (a captured backward writes them afresh). ``state()`` returns what the graphs
    read by address besides the batch: objects (e.g. the trie) and ints (e.g. the parameters' and buffers'
    ``data_ptr``); when an object is another one or an int changes, the graphs are dropped and captured again
    (a new optimizer state calls :meth:`clear`). At most ``max_graphs`` shapes are captured; others run
    eagerly (``__call__`` returns None and the caller runs the step itself)."""

    def __init__(self, step: Callable, state: Callable[[], tuple], device: torch.device, max_graphs: int = 8):
        if device.type != "cuda":
            raise ValueError(f"StepGraphs needs a CUDA device, got {device}")
        self.step, self.state, self.device, self.max_graphs = step, state, device, max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: set[tuple] = set()
        self.replays = 0  # steps replayed from a graph
        self._state: tuple | None = None  # held, so no id in it is reused while the graphs live
        self._state_key: tuple | None = None

    def clear(self) -> None:
        """Drop every graph (e.g. after the optimizer's state was loaded anew)."""
        self.graphs.clear()
        self.seen.clear()

    def __call__(self, batch) -> tuple | None:
        """Replay the graph of ``batch``'s shape (a host batch, pinned for an asynchronous copy); None when the
        caller must run this step eagerly (a shape's first step, or no room for another graph)."""
        state = self.state()
        ident = _identity(state)
        if ident != self._state_key:
            self.clear()
            self._state, self._state_key = state, ident
        tensors = _tensors(batch)
        key = tuple((t.shape, t.dtype) for t in tensors)
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen or len(self.graphs) >= self.max_graphs:
                self.seen.add(key)
                return None
            graph = self.graphs[key] = _Captured(self.step, batch, self.device)
        self.replays += 1
        return graph(tensors)
