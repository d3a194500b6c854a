"""Helpers over tilec's FX graphs: node metadata, copying, meta-device shape propagation, and readable listings.

Every node of a tilec graph carries ``node.meta["val"]``: a meta tensor (or a tuple of them) with the node's shape
and dtype, computed by running the graph on the meta device through the ops' fake implementations.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import operator
from typing import Any

import torch
import torch.fx as fx

from tilec.errors import TilecError
from tilec.ops import op_name

_DTYPE_SHORT = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.int64: "i64",
                torch.int32: "i32", torch.uint8: "u8", torch.bool: "bool", torch.float8_e4m3fn: "f8e4m3"}


@dataclasses.dataclass
class GraphInfo:
    """What a captured graph is: its kind, its inputs' meaning, and the cache it needs."""

    kind: str  # "decoder": forward(input_ids, start_pos, *kv_caches); "plain": forward(input_ids)
    cache_specs: list = dataclasses.field(default_factory=list)
    config: Any = None
    batch: int = 1
    rows: int = 1
    max_seq_len: int = 0
    spec_rows: int = 8
    description: str = ""
    hidden_layers: tuple = ()  # the graph returns (logits, hidden states after these layers, concatenated)
    extra_inputs: list = dataclasses.field(default_factory=list)  # names of extra tensor inputs after the caches


def info(gm: fx.GraphModule) -> GraphInfo:
    found = gm.meta.get("tilec")
    if found is None:
        raise TilecError("this GraphModule was not made by tilec.capture (it has no gm.meta['tilec'])")
    return found


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a deep copy of the graph; weights are shared, not copied."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def fmt_dtype(dtype: torch.dtype) -> str:
    return _DTYPE_SHORT.get(dtype, str(dtype).removeprefix("torch."))


def fmt_val(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        return f"{fmt_dtype(val.dtype)}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(fmt_val(v) for v in val) + ")"
    return type(val).__name__


def target_name(node: fx.Node) -> str:
    """A short, stable name for what a node does: ``tilec.linear``, ``getitem``, ``torch.nn.functional.gelu``."""
    if node.op == "call_function":
        name = op_name(node.target)
        if name is not None:
            return f"tilec.{name}"
        if node.target is operator.getitem:
            return "getitem"
        mod = getattr(node.target, "__module__", None) or ""
        return f"{mod}.{getattr(node.target, '__name__', repr(node.target))}".lstrip(".")
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module {node.target}"
    return node.op


def op_counts(gm: fx.GraphModule) -> collections.Counter:
    """How many nodes of each tilec op the graph holds."""
    return collections.Counter(target_name(n) for n in gm.graph.nodes if n.op == "call_function"
                               and n.target is not operator.getitem)


class _MetaInterpreter(fx.Interpreter):
    """Runs a graph on the meta device: weights become meta tensors of the same shape and dtype.

    With ``overwrite`` every node's ``meta["val"]`` is replaced by what it computes; without, only nodes that have
    none get one (so recorded values can be checked against the computed ones, see verify).
    """

    def __init__(self, gm: fx.GraphModule, overwrite: bool = True):
        super().__init__(gm)
        self._attrs: dict[str, torch.Tensor] = {}
        self._overwrite = overwrite
        self.computed: dict[fx.Node, object] = {}

    def get_attr(self, target, args, kwargs):
        if target not in self._attrs:
            value = super().get_attr(target, args, kwargs)
            self._attrs[target] = value.to("meta") if isinstance(value, torch.Tensor) else value
        return self._attrs[target]

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        self.computed[n] = result
        if self._overwrite or "val" not in n.meta:
            n.meta["val"] = result
        return result


def propagate_meta(gm: fx.GraphModule, example_inputs: list[torch.Tensor], *, overwrite: bool = True) -> dict:
    """Annotate nodes with ``meta["val"]`` by running the graph on the meta device (all of them, or with
    ``overwrite=False`` only those without one). Returns what every node computed."""
    inputs = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in example_inputs]
    interp = _MetaInterpreter(gm, overwrite)
    with torch.no_grad():
        interp.run(*inputs)
    return interp.computed


def example_meta_inputs(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The placeholders' recorded meta values, in order (to re-propagate after a pass)."""
    return [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]


def attr(gm: fx.GraphModule, target: str):
    """What a get_attr node's ``target`` ("model.layers.0.w", ...) names in ``gm``."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def weight_name(node: fx.Node) -> str:
    return node.target if node.op == "get_attr" else f"%{node.name}"


def format_graph(gm: fx.GraphModule, title: str = "") -> str:
    """A readable listing: one line per node with its op, arguments, and result shape and dtype."""

    def arg(a: Any) -> str:
        if isinstance(a, fx.Node):
            return weight_name(a)
        if isinstance(a, (list, tuple)):
            return "[" + ", ".join(arg(x) for x in a) + "]"
        if isinstance(a, float):
            return f"{a:g}"
        return repr(a)

    lines = [f"# {title}"] if title else []
    counts = op_counts(gm)
    lines.append(f"# {sum(counts.values())} ops: " + ", ".join(f"{k.removeprefix('tilec.')} x{v}"
                                                               for k, v in sorted(counts.items())))
    for n in gm.graph.nodes:
        val = fmt_val(n.meta["val"]) if "val" in n.meta else "?"
        if n.op == "placeholder":
            lines.append(f"input  %{n.name}: {val}")
        elif n.op == "get_attr":
            continue
        elif n.op == "output":
            lines.append(f"output {arg(n.args[0])}")
        else:
            call = f"{target_name(n)}({', '.join(arg(a) for a in n.args)})"
            where = module_path(n)
            lines.append(f"%{n.name} = {call} -> {val}" + (f"    # {where}" if where else ""))
    return "\n".join(lines) + "\n"


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1]
    return path[0] if isinstance(path, tuple) else str(path)


def source_location(node: fx.Node) -> str:
    """``file, line N, in f: code`` of the user code that created the node, from FX's recorded stack trace."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # Frames are 'File "x.py", line N, in f' each followed by its code line, innermost last; skip torch's own.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File ") and "/torch/" not in lines[i].replace("\\", "/"):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            where = lines[i].replace("File ", "").replace('"', "")
            return f"{where}: {code}" if code else where
    return ""
