"""Bytes a decode step must move: the numerator of the HBM floor.

Counted from the graph: every weight an op reads (once per step), the embedding rows actually gathered, only the
experts a step can touch, and the KV entries attention reads at a given context length. Activations are a few KB per
step and are left out. The floor is these bytes over the measured memory bandwidth.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from tilec.graph import attr
from tilec.ops import op_name

# Measured on the lent H100 (80 GB HBM3) on 2026-11-22: device-to-device copy, read + write bytes.
H100_COPY_BYTES_PER_S = 3.0e12


def nbytes(val) -> int:
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


def weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every weight tensor the graph reads, by attribute name (shared tensors once)."""
    found, seen = {}, set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = attr(gm, n.target)
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                found[n.target] = t
    return found


def parameters(gm: fx.GraphModule) -> int:
    """Parameters the graph's weights hold: their elements, except that MXFP4 expert blocks hold two per byte and
    their scales none."""
    packed, scales = set(), set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and op_name(n.target) == "mxfp4_moe_experts":
            for i, a in enumerate(n.args[3:7]):
                if isinstance(a, fx.Node) and a.op == "get_attr":
                    (scales if i % 2 else packed).add(a.target)
    return sum(2 * t.numel() if name in packed else 0 if name in scales else t.numel()
               for name, t in weights(gm).items())


def weight_bytes(gm: fx.GraphModule) -> dict[str, int]:
    """Total bytes of weights by dtype name."""
    out: dict[str, int] = {}
    for t in weights(gm).values():
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def _attr_bytes(node: fx.Node) -> int:
    return sum(nbytes(a.meta.get("val")) for a in node.all_input_nodes if a.op == "get_attr")


def node_step_bytes(node: fx.Node, context: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one execution of ``node`` reads when the sequence holds ``context`` tokens."""
    name = op_name(node.target) if node.op == "call_function" else None
    if name is None:
        return 0, 0
    if name == "embedding":
        ids, table = node.args[0].meta["val"], node.args[1].meta["val"]
        return ids.numel() * table.shape[1] * table.element_size(), 0
    if name in ("moe_experts", "mxfp4_moe_experts"):  # only the experts a step can touch (MXFP4: with scales)
        ids = node.args[2].meta["val"]
        experts = node.args[3].meta["val"].shape[0]
        touched = min(experts, ids.numel())
        return _attr_bytes(node) * touched // experts, 0
    if name == "attention":
        kc, vc = node.args[3].meta["val"], node.args[4].meta["val"]
        batch, kv_heads = kc.shape[:2]
        window = node.args[10]
        keys = min(context, window) if window else context
        per_key = kv_heads * (kc.shape[3] * kc.element_size() + vc.shape[3] * vc.element_size())
        sinks = nbytes(node.args[6].meta["val"]) if isinstance(node.args[6], fx.Node) else 0
        return sinks, batch * keys * per_key
    return _attr_bytes(node), 0


def step_bytes(gm: fx.GraphModule, context: int) -> dict[str, int]:
    """Bytes one step of ``gm`` (as annotated: batch and rows) reads at ``context`` tokens of history."""
    w = kv = 0
    for n in gm.graph.nodes:
        a, b = node_step_bytes(n, context)
        w, kv = w + a, kv + b
    return {"weights": w, "kv": kv, "total": w + kv}


def floor_ms(nbytes: int, bandwidth: float = H100_COPY_BYTES_PER_S) -> float:
    return nbytes / bandwidth * 1e3
