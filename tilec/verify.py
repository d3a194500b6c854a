"""verify: the invariants every stage's graph keeps.

- the FX graph is well formed (``graph.lint``);
- every call is a tilec op or a getitem on a tilec op's tuple result;
- every node carries ``meta["val"]`` (shape and dtype), and re-propagating shapes gives the same ones;
- every get_attr names a tensor that exists on the module.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tilec.errors import VerifyError
from tilec.graph import attr, example_meta_inputs, fmt_val, propagate_meta, target_name
from tilec.ops import op_name


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b)


def verify(gm: fx.GraphModule, stage: str) -> None:
    """Raise VerifyError naming the stage and node at the first broken invariant."""
    def fail(node, what: str) -> None:
        raise VerifyError(f"after stage '{stage}': node %{node.name} ({target_name(node)}): {what}")

    try:
        gm.graph.lint()
    except Exception as exc:  # noqa: BLE001
        raise VerifyError(f"after stage '{stage}': malformed graph: {exc}") from exc
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_name(n.target) is None and n.target is not operator.getitem:
            fail(n, "is not a tilec op")
        if n.op in ("call_method", "call_module"):
            fail(n, "is not a tilec op")
        if n.op == "get_attr":
            try:
                attr(gm, n.target)
            except AttributeError:
                fail(n, f"names a missing attribute {n.target!r}")
        if n.op != "output" and "val" not in n.meta:
            fail(n, "has no shape/dtype (meta['val'])")
    try:
        computed = propagate_meta(gm, example_meta_inputs(gm), overwrite=False)
    except Exception as exc:  # noqa: BLE001 - the graph no longer runs on the meta device: say so with the stage
        raise VerifyError(f"after stage '{stage}': the graph does not run on the meta device: "
                          f"{type(exc).__name__}: {exc}") from exc
    for n, value in computed.items():
        if not _same(n.meta["val"], value):
            fail(n, f"recorded {fmt_val(n.meta['val'])} but computes {fmt_val(value)}")
