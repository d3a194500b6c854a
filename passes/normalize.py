"""normalize: rewrite the torch glue a user's model may use into tilec ops.

Invariant: the graph computes the same values; afterwards every call is a tilec op (or a getitem on one's tuple
result) wherever a rule applies. What no rule covers is left for `capture` to report as unsupported.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from tilec import ops
from tilec.rewrite import Rule, apply_rules, rule


def _is_tensor(a) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


@rule((operator.add, torch.add))
def add(node: fx.Node):
    a, b = node.args[:2] if len(node.args) >= 2 else (None, None)
    if node.kwargs or not (_is_tensor(a) and _is_tensor(b)):
        return None
    return node.graph.call_function(ops.add, (a, b))


@rule(F.linear)
def linear(node: fx.Node):
    x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
    return node.graph.call_function(ops.linear, (x, w, b))


@rule(F.embedding)
def embedding(node: fx.Node):
    ids, w = _arg(node, 0, "input"), _arg(node, 1, "weight")
    if _arg(node, 3, "max_norm") is not None:
        return None
    return node.graph.call_function(ops.embedding, (ids, w))


@rule((operator.mul, torch.mul))
def silu_mul(node: fx.Node):
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    for gate, up in ((a, b), (b, a)):
        if isinstance(gate, fx.Node) and gate.op == "call_function" and gate.target is F.silu and _is_tensor(up) \
                and not gate.kwargs.get("inplace", False) and len(gate.users) == 1:
            return node.graph.call_function(ops.silu_mul, (gate.args[0], up))
    return None


@rule(torch.cat)
def cat(node: fx.Node):
    tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not all(_is_tensor(t) for t in tensors) or not isinstance(dim, int):
        return None
    return node.graph.call_function(ops.cat, (list(tensors), dim))


@rule(torch.argmax)
def argmax(node: fx.Node):
    x, dim = _arg(node, 0, "input"), _arg(node, 1, "dim")
    ndim = x.meta["val"].dim() if _is_tensor(x) else None
    if ndim is None or dim not in (-1, ndim - 1) or node.kwargs.get("keepdim", False):
        return None
    return node.graph.call_function(ops.argmax, (x,))


RULES: list[Rule] = [add, linear, embedding, silu_mul, cat, argmax]


def run(gm: fx.GraphModule, ctx=None) -> dict[str, int]:
    """Apply the glue rules in place (capture runs this on its fresh graph); returns matches per rule."""
    return dict(apply_rules(gm, RULES))
