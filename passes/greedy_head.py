"""greedy_head: when decoding is greedy, the graph returns the chosen token ids instead of the logits, and the
lm_head GEMV and the argmax over the vocabulary fuse into one ``lm_head_argmax``.

Invariant: the returned ids are the argmax of the logits the graph returned before (first maximum on ties). The
final RMSNorm stays where the residual add put it (``add_rms_norm``); the logits never reach memory.
"""

from __future__ import annotations

import torch.fx as fx

from tilec import ops
from tilec.ops import op_name


def run(gm: fx.GraphModule, ctx=None) -> dict[str, int]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    logits = value[0] if isinstance(value, tuple) else value
    fused = 0
    with gm.graph.inserting_before(out):
        if op_name(logits.target) == "linear" and logits.args[2] is None and len(logits.users) == 1:
            ids = gm.graph.call_function(ops.lm_head_argmax, (logits.args[0], logits.args[1]))
            fused = 1
        else:
            ids = gm.graph.call_function(ops.argmax, (logits,))
    ids.meta["nn_module_stack"] = logits.meta.get("nn_module_stack", {})
    out.args = ((ids, *value[1:]),) if isinstance(value, tuple) else (ids,)
    out.meta.pop("val", None)  # the graph now returns ids: let the pass manager record the new output
    if fused:
        gm.graph.erase_node(logits)
    ids._rename("lm_head_argmax" if fused else "argmax")
    gm.recompile()
    return {"argmax_outputs": 1, "lm_head_fused": fused}
