"""One rewrite mechanism for every pass: a list of (pattern, function) rules.

A rule's pattern is a node target (or a tuple of targets); its function receives the matched node and returns a
replacement node (built with ``node.graph`` while inserting before the match) or None to leave it alone. Each rule's
name counts its matches, so tests can assert on what a pass did. Producers left without users are removed
afterwards, unless they mutate something (an attention op appending to its cache stays).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable

import torch.fx as fx

from tilec.ops import OPS, op_name


@dataclasses.dataclass(frozen=True)
class Rule:
    name: str
    pattern: object | tuple  # node target(s) to match
    fn: Callable[[fx.Node], fx.Node | None]

    def matches(self, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        pats = self.pattern if isinstance(self.pattern, tuple) else (self.pattern,)
        return any(node.target is p or node.target == p for p in pats)


def rule(pattern, name: str | None = None):
    """Decorator: turn ``fn(node) -> Node | None`` into a Rule matching ``pattern``."""

    def wrap(fn):
        return Rule(name or fn.__name__, pattern, fn)

    return wrap


def is_impure(node: fx.Node) -> bool:
    name = op_name(node.target) if node.op == "call_function" else None
    if name is not None:
        return bool(OPS[name].mutates)
    return node.op in ("placeholder", "output") or (node.op == "call_function" and node.is_impure())


def remove_dead(graph: fx.Graph) -> int:
    """Erase nodes whose results are unused and that change nothing; returns how many were erased."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if not node.users and not is_impure(node):
            graph.erase_node(node)
            removed += 1
    return removed


def apply_rules(gm: fx.GraphModule, rules: Iterable[Rule]) -> collections.Counter:
    """Apply each rule to every node once, in graph order; returns matches per rule name."""
    rules = list(rules)
    counts: collections.Counter = collections.Counter({r.name: 0 for r in rules})
    for node in list(gm.graph.nodes):
        if node.graph is not gm.graph or node.op != "call_function":
            continue  # erased by an earlier replacement
        for r in rules:
            if not r.matches(node):
                continue
            with gm.graph.inserting_before(node):
                new = r.fn(node)
            if new is None:
                continue
            counts[r.name] += 1
            if new is not node:
                # A replacement computes the same value, so it has the same shape and dtype; later rules in this
                # run read that (verify re-checks it against the op's fake implementation).
                for key in ("val", "nn_module_stack", "stack_trace"):
                    if key in node.meta and key not in new.meta:
                        new.meta[key] = node.meta[key]
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            break
    remove_dead(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return counts
