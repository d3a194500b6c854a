"""fuse_add_rms_norm: a residual add feeding an RMSNorm becomes one ``add_rms_norm`` producing both results.

Invariant: the normalised value and the residual sum are the same tensors as before (the sum keeps feeding the next
residual add); a decode step reads the residual stream once instead of twice.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from tilec import ops
from tilec.ops import op_name
from tilec.rewrite import apply_rules, rule


def _is(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node.target) == name


@rule(ops.rms_norm)
def add_rms_norm(node: fx.Node):
    summed, weight, eps = node.args
    if not _is(summed, "add"):
        return None
    a, b = summed.args
    graph = node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    if any(order[user] < order[node] for user in summed.users if user is not node):
        return None  # the sum is read before the norm: the fused op (placed at the norm) would come too late
    with graph.inserting_before(node):
        fused = graph.call_function(ops.add_rms_norm, (a, b, weight, eps))
        fused.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        fused.meta["val"] = (node.meta["val"], summed.meta["val"])
        normed = graph.call_function(operator.getitem, (fused, 0))
        normed.meta["val"] = node.meta["val"]
        total = graph.call_function(operator.getitem, (fused, 1))
        total.meta["val"] = summed.meta["val"]
    summed.replace_all_uses_with(total)
    return normed


def run(gm: fx.GraphModule, ctx=None) -> dict[str, int]:
    counts = apply_rules(gm, [add_rms_norm])
    _name(gm)
    return dict(counts)


def _name(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if _is(n, "add_rms_norm") and not n.name.endswith("add_norm"):
            src = n.args[2]
            label = src.target.removeprefix("model.").replace("layers.", "l").rsplit(".", 1)[0] \
                if src.op == "get_attr" else n.name
            n._rename(label.replace(".", "_") + "_add_norm")
            for user in n.users:
                user._rename(f"{n.name}_{'out' if user.args[1] == 0 else 'sum'}")
    gm.recompile()
