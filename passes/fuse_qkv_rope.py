"""fuse_qkv_rope: the Q, K and V projections of one attention, with RoPE on Q and K, become one ``qkv_rope``.

Matched per attention node: q = rope(linear(x, wq)), k = rope(linear(x, wk)) with the same position input, head dim,
rotary dim and theta, and v = linear(x, wv), all from the same x. Invariant: q, k and v are the same values; the
three projections read x once and RoPE runs in their epilogue.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from tilec import ops
from tilec.ops import op_name
from tilec.rewrite import apply_rules, rule


def _is(node, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node.target) == name


@rule(ops.attention)
def qkv_rope(node: fx.Node):
    q, k, v = node.args[:3]
    if not (_is(q, "rope") and _is(k, "rope") and _is(v, "linear")):
        return None
    qp, kp = q.args[0], k.args[0]
    if not (_is(qp, "linear") and _is(kp, "linear")) or q.args[1:] != k.args[1:]:
        return None
    x = qp.args[0]
    if kp.args[0] is not x or v.args[0] is not x:
        return None
    if any(len(n.users) != 1 for n in (q, k, v, qp, kp)):
        return None  # a projection used elsewhere too: fusing would compute it twice
    start_pos, head_dim, rotary_dim, theta = q.args[1:]
    graph = node.graph
    with graph.inserting_before(node):
        fused = graph.call_function(ops.qkv_rope, (x, qp.args[1], kp.args[1], v.args[1], qp.args[2], kp.args[2],
                                                   v.args[2], start_pos, head_dim, rotary_dim, theta))
        fused.meta["val"] = (q.meta["val"], k.meta["val"], v.meta["val"])
        fused.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        parts = []
        for i, old in enumerate((q, k, v)):
            part = graph.call_function(operator.getitem, (fused, i))
            part.meta["val"] = old.meta["val"]
            parts.append(part)
    node.args = (*parts, *node.args[3:])
    return node  # the attention node itself stays; its inputs now come from the fused op


def run(gm: fx.GraphModule, ctx=None) -> dict[str, int]:
    counts = apply_rules(gm, [qkv_rope])
    for n in gm.graph.nodes:
        if _is(n, "qkv_rope"):
            att = next(iter(next(iter(n.users)).users))
            n._rename(att.name.replace("_attention", "").replace("_self_attn", "") + "_qkv_rope")
            for user in n.users:
                user._rename(f"{n.name}_{'qkv'[user.args[1]]}")
    gm.recompile()
    return dict(counts)
