"""Capturing a decode step once in a CUDA graph and replaying it.

A step of generated kernels is a hundred-odd launches; replaying them as one graph removes the CPU launch cost and
the gaps between kernels. A graph is recorded per input shape and per set of cache tensors (a session's caches stay
put), with static input buffers that each call copies into. Outputs are copied out, so a caller may keep them.
"""

from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    """Wraps ``step(input_ids, start_pos, *tensors)``: replays a CUDA graph for steps of at most ``max_rows`` rows,
    runs bigger ones (a prefill) directly."""

    def __init__(self, step: Callable, max_rows: int = 8, max_graphs: int = 8):
        self.step, self.max_rows, self.max_graphs = step, max_rows, max_graphs
        self._graphs: dict[tuple, tuple] = {}
        self.replays = self.captures = 0  # counters, for benchmarks and tests

    def __call__(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *tensors: torch.Tensor):
        if not input_ids.is_cuda or input_ids.shape[1] > self.max_rows:
            return self.step(input_ids, start_pos, *tensors)
        key = (tuple(input_ids.shape), tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            entry = self._graphs[key] = self._capture(input_ids, start_pos, tensors)
            self.captures += 1
        graph, static_ids, static_pos, outputs = entry
        static_ids.copy_(input_ids)
        static_pos.copy_(start_pos)
        graph.replay()
        self.replays += 1
        return tuple(o.clone() for o in outputs) if isinstance(outputs, tuple) else outputs.clone()

    def _capture(self, input_ids, start_pos, tensors):
        static_ids, static_pos = input_ids.clone(), start_pos.clone()
        # Warm up on a side stream: compiles every kernel (no compiling during capture) and settles the allocator.
        # The warm-up runs are real steps with the real inputs; the replay that follows repeats them exactly.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(static_ids, static_pos, *tensors)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.step(static_ids, static_pos, *tensors)
        return graph, static_ids, static_pos, outputs
