"""CUDA-graph capture of the generation decode (``OneRec.generate(cuda_graph=True)``).

Decoding is launch-bound: at 0.935b and beam 128 one and eight users cost the same 43 ms on an H100
(benchmarks/RESULTS.md, session 11), three levels of decoder steps and beam steps, a few hundred small kernels.
A graph replays them without the host. What the graph reads is fixed at capture: the encoder output (states, mask, recent item ids;
copied into static buffers at each replay), the weights and the trie (by address: a model moved to other
memory, or given a new catalogue, needs a new capture, which ``OneRec`` arranges).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from onerec_fast.model.encoder import EncoderOutput

__all__ = ["CapturedDecode", "DecodeGraphs"]


class CapturedDecode:
    """``decode(enc: EncoderOutput) -> tuple of tensors`` captured for ``enc``'s shapes, dtype and device.

    Built with one warm-up run on a side stream (Triton compiles, launch configs are looked up or tuned,
    the trie is built: none of that may happen inside a capture), then the capture. A call copies ``enc``
    into the static inputs, replays, and returns clones of the outputs (the next replay overwrites them)."""

    def __init__(self, decode: Callable[[EncoderOutput], tuple], enc: EncoderOutput):
        if not enc.states.is_cuda:
            raise ValueError(f"CapturedDecode needs CUDA encoder states, got {enc.states.device}")
        # Every field of the encoder output is a graph input (states, mask and, with transitions, recent ids).
        self._static = enc.map_tensors(torch.clone)
        side = torch.cuda.Stream(device=enc.states.device)
        side.wait_stream(torch.cuda.current_stream(enc.states.device))
        with torch.cuda.stream(side):
            decode(self._static)
        torch.cuda.current_stream(enc.states.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = decode(self._static)

    def __call__(self, enc: EncoderOutput) -> tuple:
        pairs = [(f.name, getattr(self._static, f.name), getattr(enc, f.name)) for f in dataclasses.fields(EncoderOutput)]
        for name, static, new in pairs:
            if (static is None) != (new is None) or (static is not None and static.shape != new.shape):
                raise ValueError(f"captured for encoder output {name} "
                                 f"{None if static is None else tuple(static.shape)}, got "
                                 f"{None if new is None else tuple(new.shape)}")
        for _, static, new in pairs:
            if static is not None:
                static.copy_(new)
        self._graph.replay()
        return type(self._out)(*(t.clone() for t in self._out))


class DecodeGraphs(dict):
    """key -> :class:`CapturedDecode`. A deep copy or a pickle of the model gets an empty one (graphs belong to
    the memory they were captured on)."""

    def __deepcopy__(self, memo) -> DecodeGraphs:
        return DecodeGraphs()

    def __reduce__(self):
        return (DecodeGraphs, ())
