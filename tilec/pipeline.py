"""The compile pipeline: the ordered list of stages a captured graph goes through.

Stage 0 is ``capture`` (tilec.capture: trace, rewrite torch glue into tilec ops, propagate shapes). The passes below
run in this order; each lives in its own file under ``passes/`` and says in its docstring what it keeps invariant.
"""

from __future__ import annotations

from tilec.passes import dead_code
from tilec.options import Options
from tilec.passmanager import Pass


def stages(options: Options, target: str) -> list[Pass]:
    """The passes run after capture for ``target``."""
    return [
        Pass("dead_code", dead_code.run, "remove computation whose result is unused"),
    ]
