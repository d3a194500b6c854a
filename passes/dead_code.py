"""dead_code: remove nodes whose results nobody uses.

Invariant: outputs and every mutation (attention appending to its KV cache) are unchanged; only pure, unused
computation disappears.
"""

from __future__ import annotations

import torch.fx as fx

from tilec.rewrite import remove_dead


def run(gm: fx.GraphModule, ctx=None) -> dict[str, int]:
    removed = remove_dead(gm.graph)
    gm.recompile()
    return {"removed": removed}
