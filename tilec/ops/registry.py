"""The registry of tilec ops.

Every tilec op is a ``torch.library`` custom op in the ``tilec`` namespace with a PyTorch reference implementation
and a fake (meta) implementation, so a graph of tilec ops runs on any device and its shapes can be propagated on the
meta device without touching data. Each op also has a ``check`` that validates its arguments; the reference and the
fake implementation both call it, so a shape that does not fit is reported the same way wherever it is found.
"""

import dataclasses
from typing import Callable

import torch

NAMESPACE = "tilec"


@dataclasses.dataclass(frozen=True)
class OpDef:
    """One registered tilec op: its overload (the FX node target), reference, and the names of mutated args."""

    name: str
    overload: torch._ops.OpOverload
    reference: Callable
    mutates: tuple[str, ...]
    doc: str

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}.{self.name}"


OPS: dict[str, OpDef] = {}


def define(name: str, *, fake: Callable, mutates: tuple[str, ...] = ()) -> Callable:
    """Register ``fn`` as the reference implementation of ``tilec::name`` with ``fake`` as its meta kernel.

    Returns the op overload, so model code calls ``torch.ops.tilec.<name>.default`` under a readable name.
    """

    def wrap(fn: Callable) -> torch._ops.OpOverload:
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=mutates)
        custom.register_fake(fake)
        overload = getattr(getattr(torch.ops, NAMESPACE), name).default
        OPS[name] = OpDef(name, overload, fn, tuple(mutates), (fn.__doc__ or "").strip())
        return overload

    return wrap


def op_name(target) -> str | None:
    """The tilec op name of an FX node target, or None when the target is not a tilec op."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE:
        return target._opname
    return None
