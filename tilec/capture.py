"""capture: a model -> an FX graph of tilec ops with shape and dtype on every node.

A decoder (a module with ``cache_layout`` and ``forward(input_ids, start_pos, kv_caches)``, like tilec's MiMo) is
captured as ``graph(input_ids, start_pos, k_cache_0, v_cache_0, ...)``; any other module as ``graph(input_ids)``.
Tracing goes through every submodule (no leaf modules), torch glue is rewritten into tilec ops (passes/normalize),
and whatever is left that is not a tilec op is reported as unsupported with the module and source line it came from.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import operator
import traceback

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import PH

from tilec.errors import TilecError, UnsupportedError
from tilec.graph import GraphInfo, module_path, propagate_meta, source_location, target_name
from tilec.ops import op_name
from tilec.passes import normalize

SUPPORTED_GLUE = "F.linear, F.embedding, a + b, F.silu(a) * b, torch.cat, torch.argmax(x, dim=-1)"


class _Tracer(fx.Tracer):
    """Traces through every module (even torch.nn ones), so their torch calls become visible nodes."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return False


def is_hf_mimo(model) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) == "mimo_v2_flash" and hasattr(model, "state_dict")


def as_tilec_model(model):
    """Accept tilec's own modules, a transformers MiMo model, or an HF checkpoint directory."""
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from tilec.models import from_hf

        return from_hf(model)
    if is_hf_mimo(model):
        from tilec.models import from_hf

        return from_hf(model, device=next(model.parameters()).device)
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedError(f"tilec compiles torch.nn.Module models; got {type(model).__name__}")
    return model


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a module's weights live (the CPU for a module without any)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def capture(model, *, batch: int = 1, rows: int = 1, max_seq_len: int = 4096, spec_rows: int = 8,
            hidden_layers: tuple[int, ...] = ()) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule of tilec ops, annotated for ``batch`` x ``rows`` input ids.

    The graph runs anywhere the weights are and returns what the model returns; ``gm.meta["tilec"]`` says how to
    call it (see `GraphInfo`). With ``hidden_layers`` (models with ``output_hidden_layers``, like MiMo) the graph
    returns ``(logits, hidden)``: the residual stream after those layers, concatenated (what a DFlash draft reads).
    A decoder may take extra tensor inputs after its caches, declared by ``extra_inputs(batch, rows)``.
    """
    model = as_tilec_model(model)
    is_decoder = hasattr(model, "cache_layout")
    device = device_of(model)
    specs = model.cache_layout(batch, max_seq_len, spec_rows) if is_decoder else []
    extras = model.extra_inputs(batch, rows) if hasattr(model, "extra_inputs") else {}
    if is_decoder:
        params = list(inspect.signature(model.forward).parameters)
        if len(params) != 3 + len(extras):
            raise UnsupportedError(
                f"{type(model).__name__}.forward must be forward(input_ids, start_pos, kv_caches"
                + "".join(f", {name}" for name in extras) + f") to go with cache_layout(); it takes "
                f"({', '.join(params)})")
        concrete = {params[2]: [PH] * len(specs)}
    else:
        concrete = None
    if hidden_layers and not hasattr(model, "output_hidden_layers"):
        raise UnsupportedError(f"{type(model).__name__} cannot return hidden states (no output_hidden_layers)")
    with _hidden_outputs(model, tuple(hidden_layers)):
        gm = _trace(model, concrete)
    if is_decoder:
        _flatten_inputs(gm, ["input_ids", "start_pos"] + [s.name for s in specs] + list(extras))
    examples = [torch.zeros((batch, rows), dtype=torch.int64, device="meta")]
    if is_decoder:
        examples.append(torch.zeros((batch,), dtype=torch.int64, device="meta"))
        examples += [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs]
        examples += [torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in extras.values()]
    _propagate(gm, examples, "traced")
    stats = normalize.run(gm)
    _check_supported(gm)
    _name_nodes(gm)
    _propagate(gm, examples, "normalized")
    config = getattr(model, "config", None)
    describe = getattr(model, "describe", None)
    gm.meta["tilec"] = GraphInfo(
        kind="decoder" if is_decoder else "plain", cache_specs=specs, config=config, batch=batch, rows=rows,
        max_seq_len=max_seq_len, spec_rows=spec_rows, description=describe() if callable(describe) else
        type(model).__name__, hidden_layers=tuple(hidden_layers), extra_inputs=list(extras))
    gm.meta["tilec_capture_stats"] = stats
    gm.meta["device"] = device
    return gm


@contextlib.contextmanager
def _hidden_outputs(model, layers: tuple[int, ...]):
    """Ask the model for its hidden states while tracing, and leave it as it was afterwards."""
    if not layers:
        yield
        return
    before = model.output_hidden_layers
    model.output_hidden_layers = layers
    try:
        yield
    finally:
        model.output_hidden_layers = before


def _trace(model: torch.nn.Module, concrete) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except TilecError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the user's model doing something untraceable
        where = _user_frame(exc)
        module = next(reversed(tracer.module_stack), "") if getattr(tracer, "module_stack", None) else ""
        raise UnsupportedError(
            f"tilec could not trace {type(model).__name__}"
            + (f" in module '{module}'" if module else "")
            + (f" at {where}" if where else "")
            + f": {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Models must be traceable by torch.fx: no Python control flow on tensor values; put data-dependent "
            "work (like MoE routing) inside an op.") from exc
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__ + "Graph")


def _user_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        path = fr.filename.replace("\\", "/")
        if "/torch/" not in path and "/tilec/capture.py" not in path:
            return f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return ""


def _flatten_inputs(gm: fx.GraphModule, names: list[str]) -> None:
    """Replace FX's pytree calling convention by flat, named placeholders (k_cache_0, v_cache_0, ...)."""
    gm.graph.set_codegen(fx.graph.CodeGen())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, name in zip(placeholders, names):
        node.target = name
        node.name = name
    out = next(n for n in gm.graph.nodes if n.op == "output")
    value = out.args[0]
    if isinstance(value, (list, tuple)):
        out.args = (value[0],) if len(value) == 1 else (tuple(value),)
    gm.recompile()


def _name_nodes(gm: fx.GraphModule) -> None:
    """Name each op node after its module and op (``l3_q_proj``, ``l3_self_attn_attention``) for readable dumps."""
    for n in gm.graph.nodes:
        name = op_name(n.target) if n.op == "call_function" else None
        if name is None:
            continue
        path = module_path(n).removeprefix("model.")
        parts = re.sub(r"layers\.(\d+)", r"l\1", path).split(".") if path else []
        # The op name is redundant when the module already says it (q_proj is a linear, norm an rms_norm).
        tail = parts[-1] if parts else ""
        label = tail if name in ("linear", "rms_norm", "embedding") and tail else "_".join(p for p in (tail, name) if p)
        prefix = parts[0] if len(parts) > 1 and re.fullmatch(r"l\d+", parts[0]) else ""
        if name == "rope" and isinstance(n.args[0], fx.Node):
            n._rename(f"{n.args[0].name}_rope")  # l3_q_proj_rope, l3_k_proj_rope
        else:
            n._rename("_".join(p for p in (prefix, label) if p))
    gm.recompile()


def _propagate(gm: fx.GraphModule, examples: list, stage: str) -> None:
    try:
        propagate_meta(gm, examples)
    except TilecError as exc:
        raise type(exc)(f"{exc} (while propagating shapes through the {stage} graph)") from exc
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedError(f"tilec could not run the {stage} graph on the meta device: {type(exc).__name__}: "
                               f"{exc}") from exc


def _check_supported(gm: fx.GraphModule) -> None:
    bad = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if n.op == "call_function" and (op_name(n.target) is not None or n.target is operator.getitem):
            continue
        where = " ".join(p for p in (f"in module '{module_path(n)}'" if module_path(n) else "",
                                     f"at {source_location(n)}" if source_location(n) else "") if p)
        bad.append(f"`{target_name(n)}` {where}".rstrip())
    if bad:
        shown = "\n  - ".join(bad[:8]) + (f"\n  - ... and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise UnsupportedError(
            f"tilec cannot capture {len(bad)} call(s) that are not tilec ops:\n  - {shown}\n"
            f"Supported: torch.ops.tilec.* ops, and the torch glue tilec rewrites into them ({SUPPORTED_GLUE}).")
