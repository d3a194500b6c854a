"""fuse_swiglu: a dense MLP (gate and up projections, SiLU*mul, down projection) becomes one ``swiglu``.

Invariant: same output. The gate and up projections read their input once and the SiLU*mul runs in their epilogue
(the kernel pairs gate row n with up row n). Expert MLPs need no rewrite: ``moe_experts`` already is the fused
gate/up + SiLU*mul + down of each chosen expert, and its kernels fuse the same way.
"""

from __future__ import annotations

import torch.fx as fx

from tilec import ops
from tilec.ops import op_name
from tilec.rewrite import apply_rules, rule


def _is(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node.target) == name


@rule(ops.linear)
def swiglu(node: fx.Node):
    act, w_down, b_down = node.args
    if b_down is not None or not _is(act, "silu_mul") or len(act.users) != 1:
        return None
    gate, up = act.args
    if not (_is(gate, "linear") and _is(up, "linear")) or gate.args[0] is not up.args[0]:
        return None
    if gate.args[2] is not None or up.args[2] is not None or len(gate.users) != 1 or len(up.users) != 1:
        return None
    fused = node.graph.call_function(ops.swiglu, (gate.args[0], gate.args[1], up.args[1], w_down))
    fused._rename(node.name.replace("down_proj", "mlp_swiglu") if "down_proj" in node.name else "swiglu")
    return fused


def run(gm: fx.GraphModule, ctx=None) -> dict[str, int]:
    return dict(apply_rules(gm, [swiglu]))
