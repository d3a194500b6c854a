"""fuse_norm_qkv_rope: the residual add and RMSNorm before an attention, feeding only its ``qkv_rope``, join it as
one ``add_rms_norm_qkv_rope``.

Matched per ``qkv_rope`` node whose input is the normalised output of an ``add_rms_norm`` that nothing else reads.
Invariant: q, k, v and the residual sum are the same values (the reference op computes exactly the two ops in
turn); the projections' kernel normalises the rows itself, so a decode step launches one kernel fewer a layer.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from tilec import ops
from tilec.ops import op_name
from tilec.rewrite import apply_rules, rule


def _is(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node.target) == name


def _getitem_of(node, index: int):
    """The node that ``node`` takes item ``index`` of, or None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and node.args[1] == index:
        return node.args[0]
    return None


@rule(ops.qkv_rope)
def norm_qkv_rope(node: fx.Node):
    norm = _getitem_of(node.args[0], 0)
    if not _is(norm, "add_rms_norm") or len(node.args[0].users) != 1:
        return None  # not a normalised residual sum, or the normalised rows are read elsewhere too
    sums = [u for u in norm.users if _getitem_of(u, 1) is norm]
    graph = node.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    if any(order[user] < order[node] for s in sums for user in s.users):
        return None  # the sum is read before the projections: the fused op (placed there) would come too late
    with graph.inserting_before(node):
        fused = graph.call_function(ops.add_rms_norm_qkv_rope, (*norm.args, *node.args[1:]))
        fused.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        fused.meta["val"] = (*node.meta["val"], norm.meta["val"][1])
        total = graph.call_function(operator.getitem, (fused, 3))
        total.meta["val"] = norm.meta["val"][1]
    for s in sums:
        s.replace_all_uses_with(total)
    for user in list(node.users):  # q, k, v: the same items of the fused op
        user.args = (fused, *user.args[1:])
    return fused


def run(gm: fx.GraphModule, ctx=None) -> dict[str, int]:
    counts = apply_rules(gm, [norm_qkv_rope])
    for n in gm.graph.nodes:
        if _is(n, "add_rms_norm_qkv_rope") and not n.name.endswith("_norm_qkv_rope"):
            qkv = next((u for u in n.users if u.args[1] == 0), None)
            base = qkv.name.rsplit("_qkv_rope", 1)[0] if qkv is not None and "_qkv_rope" in qkv.name else n.name
            n._rename(base + "_norm_qkv_rope")
            for user in n.users:
                user._rename(f"{n.name}_{('q', 'k', 'v', 'sum')[user.args[1]]}")
    gm.recompile()
    return dict(counts)
