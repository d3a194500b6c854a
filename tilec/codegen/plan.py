"""Kernel plans: for each graph node, which template renders its kernel and with what context.

A planner reads the node (its shapes from ``meta["val"]``, its constant arguments) and the device, and decides
everything the template needs: sizes baked in as constants, block sizes, flags. Templates decide nothing. Nodes
whose plans are equal share one rendered kernel (the same op at the same shapes in every layer).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable

import torch
import torch.fx as fx

from tilec.codegen.tuning import DeviceInfo


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    template: str  # under tilec/templates, e.g. "triton/linear.py.j2"
    context: str  # the template context as canonical JSON: hashable, so equal plans dedupe

    @staticmethod
    def make(template: str, **context) -> "KernelPlan":
        return KernelPlan(template, json.dumps(context, sort_keys=True))

    def ctx(self, nodes: list[str]) -> dict:
        return {**json.loads(self.context), "nodes": nodes}


def val(node) -> torch.Tensor:
    """The meta tensor of a node argument (its shape and dtype)."""
    return node.meta["val"]


Planner = Callable[[fx.Node, DeviceInfo], KernelPlan]
PLANNERS: dict[str, Planner] = {}


def planner(*ops: str):
    """Register a planner for one or more tilec ops."""

    def wrap(fn: Planner) -> Planner:
        for op in ops:
            PLANNERS[op] = fn
        return fn

    return wrap
