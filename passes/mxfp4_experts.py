"""mxfp4_experts: hold the MoE experts' weights in MXFP4 (blocks of 32 E2M1 values sharing an E8M0 scale).

Invariant: every ``moe_experts`` node whose weights are graph attributes becomes an ``mxfp4_moe_experts`` node on
MXFP4 copies of them (registered beside the originals as ``<module>.gate_up_proj_blocks`` / ``_scales`` and
``<module>.down_proj_blocks`` / ``_scales``, the names a pre-quantised checkpoint uses), whose output is exactly
``moe_experts`` on the dequantised weights. Nothing else changes: attention, dense MLP, router, embeddings and lm_head
keep their nodes and their very tensors. Layers that are MXFP4 already (``mxfp4_moe_experts`` captured from a model
loaded from an MXFP4 checkpoint) are kept as they are and counted as kept.

Stats: ``quantized`` and ``kept`` layer counts, the scale rule, ``bytes_before`` / ``bytes_after`` of all expert
weights, ``max_rel_err`` (the largest per-layer ||W - dq(q(W))|| / ||W||, None on the meta device), and ``layers``: one
dict per experts layer with its module, status, bytes and errors (the report renders it as a table).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from tilec import mxfp4, ops
from tilec.errors import QuantizationError
from tilec.ops import op_name
from tilec.rewrite import apply_rules, rule


def _tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _new_attr(gm: fx.GraphModule, owner: str, name: str, value: torch.Tensor) -> str:
    """Register ``value`` as buffer ``name`` (made unique) on submodule ``owner`` of ``gm``; returns its target."""
    module = gm.get_submodule(owner) if owner else gm
    unique, i = name, 1
    while hasattr(module, unique):
        unique, i = f"{name}_{i}", i + 1
    module.register_buffer(unique, value)
    return f"{owner}.{unique}" if owner else unique


def _sig(x: float | None) -> float | None:
    return None if x is None else float(f"{x:.6g}")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _layer(module: str, status: str, dtype: str, before: int, after: int, errors: list | None) -> dict:
    """One experts layer's line of the stats; ``errors`` is [(squared error, squared norm)] for gate_up and down."""
    def rel(diff: float, norm: float) -> float:
        return (diff / norm) ** 0.5 if norm else 0.0  # an all-zero weight quantises exactly

    known = bool(errors) and all(e is not None for e in errors)  # None on the meta device
    per_tensor = [rel(*e) for e in errors] if known else [None, None]
    total = rel(sum(e[0] for e in errors), sum(e[1] for e in errors)) if known else None
    return {"module": module, "status": status, "dtype": dtype, "bytes_before": before, "bytes_after": after,
            "rel_err": _sig(total), "rel_err_gate_up": _sig(per_tensor[0]), "rel_err_down": _sig(per_tensor[1])}


def run(gm: fx.GraphModule, ctx=None) -> dict:
    """Lower the graph's experts in place (scale rule from ``ctx.options``, ``floor`` without a context)."""
    scale_rule = ctx.options.mxfp4_scale_rule if ctx is not None else "floor"
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    layers: list[tuple[int, dict]] = []
    quantized: dict[int, tuple] = {}  # id of an original tensor -> (MXFP4Tensor, squared errors): quantised once
    replaced: set[str] = set()

    def quantize(source: fx.Node, weight: torch.Tensor):
        if id(weight) not in quantized:
            q = mxfp4.quantize(weight, scale_rule, name=source.target)
            quantized[id(weight)] = q, mxfp4.squared_error(weight, q)
        return quantized[id(weight)]

    @rule(ops.moe_experts, name="quantized")
    def lower(node: fx.Node):
        x, weights, indices, gate_up_node, down_node = node.args
        gate_up, down = _tensor(gm, gate_up_node), _tensor(gm, down_node)
        if gate_up is None or down is None:
            return None  # weights computed in the graph: nothing to quantise ahead of time
        try:
            (q_gu, err_gu), (q_d, err_d) = quantize(gate_up_node, gate_up), quantize(down_node, down)
        except QuantizationError as exc:
            raise QuantizationError(f"node %{node.name}: {exc}") from None
        args = []
        for source, q in ((gate_up_node, q_gu), (down_node, q_d)):
            owner, _, attr = source.target.rpartition(".")
            for part, value in (("blocks", q.blocks), ("scales", q.scales)):
                args.append(node.graph.get_attr(_new_attr(gm, owner, f"{attr}_{part}", value)))
            replaced.add(source.target)
        layers.append((position[node], _layer(
            gate_up_node.target.rpartition(".")[0], "quantized", str(gate_up.dtype).removeprefix("torch."),
            _nbytes(gate_up) + _nbytes(down), q_gu.nbytes + q_d.nbytes, [err_gu, err_d])))
        return node.graph.create_node("call_function", ops.mxfp4_moe_experts, (x, weights, indices, *args),
                                      name=node.name.replace("moe_experts", "mxfp4_moe_experts"))

    kept = [n for n in gm.graph.nodes if n.op == "call_function" and op_name(n.target) == "mxfp4_moe_experts"]
    for n in kept:
        size = sum(_nbytes(t) for t in (_tensor(gm, a) for a in n.args[3:7]) if t is not None)
        module = n.args[3].target.rpartition(".")[0] if isinstance(n.args[3], fx.Node) else f"%{n.name}"
        layers.append((position[n], _layer(module, "kept", "mxfp4", size, size, None)))
    counts = apply_rules(gm, [lower])
    # The originals are unused now: drop them from this stage's module (earlier stages keep theirs).
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in replaced - still_read:
        owner, _, attr = target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
    details = [d for _, d in sorted(layers, key=lambda item: item[0])]
    errors = [d["rel_err"] for d in details if d["rel_err"] is not None]
    return {"quantized": counts["quantized"], "kept": len(kept), "scale_rule": scale_rule,
            "bytes_before": sum(d["bytes_before"] for d in details),
            "bytes_after": sum(d["bytes_after"] for d in details),
            "max_rel_err": max(errors) if errors else None, "layers": details}
