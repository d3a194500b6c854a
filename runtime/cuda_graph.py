"""Capturing a decode step once in a CUDA graph and replaying it.

A step of generated kernels is a hundred-odd launches; replaying them as one graph removes the CPU launch cost and
the gaps between kernels. A graph is recorded per input shape and per set of bound tensors (a session's caches, which
stay put), with static buffers for every other input (the tokens, the positions, a draft's context) that each call
copies into. Outputs are copied out, so a caller may keep them.
"""

from __future__ import annotations

import collections
from typing import Callable

import torch


class GraphedStep:
    """Wraps ``step(input_ids, start_pos, *tensors)``: replays a CUDA graph for steps of at most ``max_rows`` rows,
    runs bigger ones (a prefill) directly. The ``max_graphs`` most recently used graphs are kept."""

    def __init__(self, step: Callable, max_rows: int = 8, max_graphs: int = 8):
        self.step, self.max_rows, self.max_graphs = step, max_rows, max_graphs
        self._graphs: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self.replays = self.captures = 0  # counters, for benchmarks and tests

    def graphable(self, input_ids: torch.Tensor) -> bool:
        return input_ids.is_cuda and input_ids.shape[1] <= self.max_rows

    def __call__(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *tensors: torch.Tensor,
                 bound: int | None = None):
        """One step. The graph binds the first ``bound`` of ``tensors`` (all by default) by address: the caches it
        reads and writes in place. The rest are inputs like the tokens: copied into the graph's own buffers, so a
        caller may pass new tensors each call."""
        if not self.graphable(input_ids):
            return self.step(input_ids, start_pos, *tensors)
        bound = len(tensors) if bound is None else bound
        fixed, copied = tensors[:bound], tensors[bound:]
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
