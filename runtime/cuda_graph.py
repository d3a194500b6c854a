"""Capturing a decode step once in a CUDA graph and replaying it.

A step of generated kernels is a hundred-odd launches; replaying them as one graph removes the CPU launch cost and
the gaps between kernels. A graph is recorded per input shape and per set of bound tensors (a session's caches, which
stay put), with static buffers for every other input (the tokens, the positions, a draft's context) that each call
copies into. Outputs are copied out, so a caller may keep them. A step with more than ``max_rows`` rows in its tokens
or in any other input (a prefill, a draft's first context) runs directly: a shape seen once is not worth a capture.
"""

from __future__ import annotations

import collections
from typing import Callable

import torch


class GraphedStep:
    """Wraps ``step(input_ids, start_pos, *tensors)``: replays a CUDA graph for steps of at most ``max_rows`` rows,
    runs bigger ones directly. A graph binds the first ``bound`` of ``tensors`` (all when None) by address: the caches
    it reads and writes in place. The rest are inputs like the tokens: copied into the graph's own buffers, so a caller
    may pass new tensors each call. The ``max_graphs`` most recently used graphs are kept."""

    def __init__(self, step: Callable, max_rows: int = 8, max_graphs: int = 8, bound: int | None = None):
        self.step, self.max_rows, self.max_graphs, self.bound = step, max_rows, max_graphs, bound
        self._graphs: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self.replays = self.captures = 0  # counters, for benchmarks and tests

    def graphable(self, input_ids: torch.Tensor, copied: tuple) -> bool:
        """On a GPU, and no more than max_rows rows in the tokens or in any copied input (dim 1)."""
        return input_ids.is_cuda and all(t.dim() < 2 or t.shape[1] <= self.max_rows for t in (input_ids, *copied))

    def __call__(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *tensors: torch.Tensor):
        bound = len(tensors) if self.bound is None else self.bound
        fixed, copied = tensors[:bound], tensors[bound:]
        if not self.graphable(input_ids, copied):
            return self.step(input_ids, start_pos, *tensors)
        key = (tuple(input_ids.shape), tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in fixed),
               tuple((tuple(t.shape), t.dtype) for t in copied))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.popitem(last=False)  # the least recently used
            entry = self._graphs[key] = self._capture((input_ids, start_pos, *copied), fixed)
            self.captures += 1
        else:
            self._graphs.move_to_end(key)
        graph, statics, outputs = entry
        for buffer, value in zip(statics, (input_ids, start_pos, *copied)):
            buffer.copy_(value)
        graph.replay()
        self.replays += 1
        return tuple(o.clone() for o in outputs) if isinstance(outputs, tuple) else outputs.clone()

    def _run(self, statics: tuple, fixed: tuple):
        """The step on the static inputs (input_ids, start_pos, then the copied inputs), the bound tensors in their
        place before the copied ones."""
        ids, pos, *copied = statics
        return self.step(ids, pos, *fixed, *copied)

    def _capture(self, inputs: tuple, fixed: tuple):
        statics = tuple(t.clone() for t in inputs)
        # Warm up on a side stream: compiles every kernel (no compiling during capture) and settles the allocator.
        # The warm-up runs are real steps with the real inputs; the replay that follows repeats them exactly.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(statics, fixed)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._run(statics, fixed)
        return graph, statics, outputs
