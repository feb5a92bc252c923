"""CUDA-graph capture of the generation decode (``OneRec.generate(cuda_graph=True)``).

Decoding is launch-bound: at 0.935b and beam 128 one and eight users cost the same 43 ms on an H100
(benchmarks/RESULTS.md, session 11), three levels of decoder steps and beam steps, a few hundred small kernels.
A graph replays them without the host. What the graph reads is fixed at capture: the encoder states and mask
(copied into static buffers at each replay), the weights and the trie (by address: a model moved to other
memory, or given a new catalogue, needs a new capture, which ``OneRec`` arranges).
"""

from __future__ import annotations

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
        self._states, self._mask = enc.states.clone(), enc.mask.clone()
        static = EncoderOutput(self._states, self._mask)
        side = torch.cuda.Stream(device=enc.states.device)
        side.wait_stream(torch.cuda.current_stream(enc.states.device))
        with torch.cuda.stream(side):
            decode(static)
        torch.cuda.current_stream(enc.states.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._out = decode(static)

    def __call__(self, enc: EncoderOutput) -> tuple:
        if enc.states.shape != self._states.shape or enc.mask.shape != self._mask.shape:
            raise ValueError(f"captured for encoder states {tuple(self._states.shape)} and mask "
                             f"{tuple(self._mask.shape)}, got {tuple(enc.states.shape)} and {tuple(enc.mask.shape)}")
        self._states.copy_(enc.states)
        self._mask.copy_(enc.mask)
        self._graph.replay()
        return type(self._out)(*(t.clone() for t in self._out))


class DecodeGraphs(dict):
    """key -> :class:`CapturedDecode`. A deep copy or a pickle of the model gets an empty one (graphs belong to
    the memory they were captured on)."""

    def __deepcopy__(self, memo) -> DecodeGraphs:
        return DecodeGraphs()

    def __reduce__(self):
        return (DecodeGraphs, ())
