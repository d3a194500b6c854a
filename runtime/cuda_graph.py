"""Capturing a decode step once in a CUDA graph and replaying it.

A step of generated kernels is a hundred-odd launches; replaying them as one graph removes the CPU launch cost and
the gaps between kernels. A graph is recorded per input shape and per set of bound tensors (a session's caches, which
stay put), with static buffers for every other input (the tokens, the positions, a draft's context) that each call
copies into. Outputs are copied out, so a caller may keep them. A step with more than ``max_rows`` rows in any input
other than the tokens (a draft's first context) runs directly: a shape seen once is not worth a capture.

A prefill of more than ``max_rows`` rows is graphed too where it is short (at most ``prefill_rows`` rows): there the
host's launches, not the GPU, set its time (a 32-token prompt of `mini`: about 3 ms of kernels in 10 to 12 ms,
H100, 2026-11-24, benchmarks/results/h100-2026-11-24f/run2_short_prefill_moe_sweep). The caller pads such a prompt
with rows after its last (`prefill_rows_for`: up to a multiple of ``prefill_step`` rows, so that few shapes recur),
and drops their outputs; a prefill shape is captured the second time it is seen, so prompts of one-off lengths cost
no capture. Which padding is harmless to the cache is the session's to decide (`KVCache.pad_room`).
"""

from __future__ import annotations

import collections
from typing import Callable

import torch


class GraphedStep:
    """Wraps ``step(input_ids, start_pos, *tensors)``: replays a CUDA graph for steps of at most ``max_rows`` rows,
    and for prefills of a multiple of ``prefill_step`` rows up to ``prefill_rows`` seen before; runs others directly.
    A graph binds the first ``bound`` of ``tensors`` (all when None) by address: the caches it reads and writes in
    place. The rest are inputs like the tokens: copied into the graph's own buffers, so a caller may pass new tensors
    each call. The ``max_graphs`` most recently used step graphs are kept, and apart from them the ``prefill_graphs``
    most recently used prefill graphs."""

    SIGHTINGS = 64  # prefill shapes remembered as seen once

    def __init__(self, step: Callable, max_rows: int = 8, max_graphs: int = 8, bound: int | None = None,
                 prefill_rows: int = 0, prefill_step: int = 8, prefill_graphs: int = 8):
        if prefill_step < 1:
            raise ValueError(f"prefill_step must be at least 1, got {prefill_step}")
        self.step, self.max_rows, self.max_graphs, self.bound = step, max_rows, max_graphs, bound
        self.prefill_rows, self.prefill_step, self.prefill_graphs = prefill_rows, prefill_step, prefill_graphs
        self._graphs: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self._prefills: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self.replays = self.captures = 0  # counters, for benchmarks and tests

    def graphable(self, input_ids: torch.Tensor, copied: tuple) -> bool:
        """On a GPU, and no more than max_rows rows in any copied input (dim 1)."""
        return input_ids.is_cuda and all(t.dim() < 2 or t.shape[1] <= self.max_rows for t in copied)

    def prefill_rows_for(self, rows: int) -> int:
        """The rows a step of ``rows`` rows is best padded to: a prefill of more than max_rows and at most
        prefill_rows rows goes up to a multiple of prefill_step (a shape that recurs, so its graph replays); any
        other step keeps its rows."""
        if not self.max_rows < rows <= self.prefill_rows:
            return rows
        return -(-rows // self.prefill_step) * self.prefill_step

    def __call__(self, input_ids: torch.Tensor, start_pos: torch.Tensor, *tensors: torch.Tensor):
        bound = len(tensors) if self.bound is None else self.bound
        fixed, copied = tensors[:bound], tensors[bound:]
        rows = input_ids.shape[1]
        prefill = rows > self.max_rows
        if not self.graphable(input_ids, copied) or (
                prefill and (rows > self.prefill_rows or rows % self.prefill_step or self.prefill_graphs < 1)):
            return self.step(input_ids, start_pos, *tensors)
        key = (tuple(input_ids.shape), tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in fixed),
               tuple((tuple(t.shape), t.dtype) for t in copied))
        graphs, most = (self._prefills, self.prefill_graphs) if prefill else (self._graphs, self.max_graphs)
        entry = graphs.get(key)
        if entry is None:
            if prefill and key not in self._seen:  # the first sighting runs directly
                self._seen[key] = None
                if len(self._seen) > self.SIGHTINGS:
                    self._seen.popitem(last=False)
                return self.step(input_ids, start_pos, *tensors)
            self._seen.pop(key, None)
            if len(graphs) >= most:
                graphs.popitem(last=False)  # the least recently used
            entry = graphs[key] = self._capture((input_ids, start_pos, *copied), fixed)
            self.captures += 1
        else:
            graphs.move_to_end(key)
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
