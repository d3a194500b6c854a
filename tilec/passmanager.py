"""The pass manager: runs named stages over a graph, keeping every stage's graph, its stats and timings.

Each pass gets its own copy of the graph (weights shared) and returns its match counts, so earlier stages stay
intact and runnable: tests run any two neighbouring stages on the same inputs. After each stage the manager
re-propagates shapes, verifies the graph's invariants (when ``options.verify``), and notes what changed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch.fx as fx

from tilec.errors import TilecError, VerifyError
from tilec.graph import copy_graph_module, example_meta_inputs, op_counts, propagate_meta
from tilec.options import Options
from tilec.verify import verify


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass may read besides the graph: the options and the compile target."""

    options: Options
    target: str = "reference"


@dataclasses.dataclass(frozen=True)
class Pass:
    """A named stage: ``run(gm, ctx)`` rewrites its own copy of the graph in place and returns match counts."""

    name: str
    run: Callable[[fx.GraphModule, PassContext], dict]
    doc: str = ""


@dataclasses.dataclass
class StageRecord:
    name: str
    graph: fx.GraphModule
    stats: dict
    seconds: float
    doc: str = ""

    @property
    def op_counts(self) -> dict[str, int]:
        return dict(op_counts(self.graph))


ProgressFn = Callable[[str, int, int], None]


def run_pipeline(gm: fx.GraphModule, passes: list[Pass], ctx: PassContext, *, first: StageRecord,
                 progress: ProgressFn | None = None) -> list[StageRecord]:
    """Run ``passes`` after the ``first`` stage (the capture); returns every stage's record, in order."""
    records = [first]
    if ctx.options.verify:
        verify(gm, first.name)
    for i, p in enumerate(passes):
        if progress:
            progress(p.name, i + 1, len(passes))
        start = time.perf_counter()
        new = copy_graph_module(records[-1].graph)
        try:
            stats = p.run(new, ctx) or {}
        except TilecError as exc:  # a pass refusing the user's model (e.g. a shape it cannot quantise)
            raise type(exc)(f"pass '{p.name}': {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - a crash inside a pass is a tilec bug: say which pass
            raise VerifyError(f"pass '{p.name}' failed: {type(exc).__name__}: {exc}") from exc
        try:
            new.graph.lint()
            new.recompile()
            # New nodes get their shapes; nodes a pass kept or annotated keep theirs, and verify compares the two.
            propagate_meta(new, example_meta_inputs(records[-1].graph), overwrite=False)
        except Exception as exc:  # noqa: BLE001 - the pass left a graph that is malformed or does not fit together
            raise VerifyError(f"pass '{p.name}' left a broken graph: {type(exc).__name__}: {exc}") from exc
        if ctx.options.verify:
            verify(new, p.name)
        records.append(StageRecord(p.name, new, dict(stats), time.perf_counter() - start, p.doc))
    return records
