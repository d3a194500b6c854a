"""Lowering a graph to Triton: a kernel per op node, and a step function that calls them in graph order.

`lower` plans every node (tilec/codegen/plans*.py), renders one kernel module per distinct plan and the step
function (templates/triton/step.py.j2), and returns a `TritonProgram` holding the sources. Loading (Triton JIT, on
the GPU or in the CPU interpreter) happens on the first call, so `tilec compile --target triton` writes kernels on a
machine without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import operator
from types import ModuleType
from typing import Callable

import torch
import torch.fx as fx

from tilec.codegen import mma_layout, plans as _plans, plans_moe as _plans_moe  # noqa: F401  (register planners)
from tilec.codegen.plan import PLANNERS, KernelPlan
from tilec.codegen.render import load_source, render, source_hash
from tilec.codegen.tuning import DeviceInfo, device_info, with_pdl
from tilec.errors import TargetError
from tilec.graph import attr, info, module_path
from tilec.ops import op_name
from tilec.options import triton_interpret_requested

# Rendering for a GPU on a machine without one: the H100 this project measures on.
H100 = DeviceInfo(interpret=False, sms=132)


@dataclasses.dataclass
class Kernel:
    alias: str  # the name the step function calls it by
    plan: KernelPlan
    nodes: list[str]
    source: str
    cuda_source: str | None = None  # CUDA C++ the module compiles and launches (embedded in `source` too)

    @property
    def filename(self) -> str:
        return f"kernels/{self.alias}.py"

    @property
    def cuda_filename(self) -> str | None:
        return f"kernels/{self.alias}.cu" if self.cuda_source is not None else None


def target_device_info(device: torch.device) -> DeviceInfo:
    if device.type == "cuda" and not triton_interpret_requested():
        return device_info(device)
    return DeviceInfo(interpret=True, sms=1) if triton_interpret_requested() else with_pdl(H100)


def lower(gm: fx.GraphModule, device: torch.device, stage: str) -> "TritonProgram":
    """Plan and render ``gm`` for ``device``; raises TargetError naming any op without a kernel."""
    dev = target_device_info(device)
    by_plan: dict[KernelPlan, Kernel] = {}
    node_kernel: dict[fx.Node, Kernel] = {}
    for node in gm.graph.nodes:
        name = op_name(node.target) if node.op == "call_function" else None
        if name is None:
            continue
        if name not in PLANNERS:
            raise TargetError(f"target 'triton' has no kernel for tilec.{name} (node %{node.name}); "
                              f"ops with kernels: {', '.join(sorted(PLANNERS))}")
        plan = PLANNERS[name](node, dev)
        if plan not in by_plan:
            by_plan[plan] = Kernel(f"k{len(by_plan):02d}_{name}", plan, [], "")
        by_plan[plan].nodes.append(node.name)
        node_kernel[node] = by_plan[plan]
    for kernel in by_plan.values():
        # every kernel of the step waits for the one before it inside the kernel, not at its launch (_common.j2)
        ctx = {**kernel.plan.ctx(kernel.nodes), "launch_pdl": dev.pdl}
        kernel.source = render(kernel.plan.template, ctx=ctx)
        if ctx.get("cuda_template"):  # written beside the module in artifacts, for reading
            kernel.cuda_source = render(ctx["cuda_template"], ctx=ctx)
    node_derived = {node: _derived(node, kernel) for node, kernel in node_kernel.items()}
    step = render("triton/step.py.j2", **_step_context(gm, node_kernel, node_derived, stage))
    derived = {name: spec for specs in node_derived.values() for name, spec in specs}
    return TritonProgram(gm, list(by_plan.values()), step, device, dev, derived)


def _derived(node: fx.Node, kernel: Kernel) -> list[tuple[str, tuple[str, str]]]:
    """The weights a node's kernel reads re-laid (its plan's ``derived_weights``: [argument index, layout] pairs, the
    argument a weight): [(``<weight>@<layout>``, (weight, layout))], passed after the node's own arguments."""
    out = []
    for index, layout in json.loads(kernel.plan.context).get("derived_weights", []):
        target = node.args[index].target
        out.append((f"{target}@{layout}", (target, layout)))
    return out


def _arg(a) -> tuple:
    if isinstance(a, fx.Node):
        return ("weight", a.target) if a.op == "get_attr" else ("node", a.name)
    if isinstance(a, (list, tuple)) and all(isinstance(x, fx.Node) for x in a):
        return ("list", [x.name for x in a])
    return ("const", a)


def _step_context(gm: fx.GraphModule, node_kernel: dict, node_derived: dict, stage: str) -> dict:
    params, statements, result = [], [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            params.append(node.name)
        elif node.op == "call_function" and node.target is operator.getitem:
            statements.append({"kind": "getitem", "out": node.name, "src": node.args[0].name,
                               "index": node.args[1]})
        elif node in node_kernel:
            kernel = node_kernel[node]
            args = [_arg(a) for a in node.args] + [("weight", name) for name, _ in node_derived[node]]
            statements.append({"kind": "call", "node": node.name, "op": op_name(node.target),
                               "where": module_path(node), "kernel": kernel.alias,
                               "out": node.name if node.users else "", "args": args})
        elif node.op == "output":
            value = node.args[0]
            result = [_arg(v) for v in value] if isinstance(value, (tuple, list)) else [_arg(value)]
    return {"params": params, "statements": statements, "result": result, "stage": stage,
            "description": info(gm).description}


class TritonProgram:
    """A graph's Triton kernels and step function: call it like the graph. Kernels load on the first call."""

    def __init__(self, gm: fx.GraphModule, kernels: list[Kernel], step_source: str, device: torch.device,
                 dev: DeviceInfo, derived: dict[str, tuple[str, str]] | None = None):
        self.kernels, self.step_source, self.device, self.dev = kernels, step_source, device, dev
        # Kernels index tensors as dense row-major arrays.
        self.weights = {n.target: attr(gm, n.target).contiguous() for n in gm.graph.nodes if n.op == "get_attr"}
        # Weights some kernels read re-laid (name -> (weight, layout in mma_layout.DERIVED)), computed on load: they
        # hold the same values as their source weight, so a program keeps both (the prefill kernels read the
        # original); a weight changed in place afterwards needs a new compile, as for any derived copy.
        self.derived = dict(derived or {})
        self._step = None

    @property
    def sources(self) -> dict[str, str]:
        """Every generated file, by its path in an artifact (``step.py``, ``kernels/k03_linear.py``, the CUDA C++ of
        modules that launch some, ``kernels/k09_mxfp4_moe_experts.cu``, ...)."""
        files = {"step.py": self.step_source, **{k.filename: k.source for k in self.kernels}}
        files.update({k.cuda_filename: k.cuda_source for k in self.kernels if k.cuda_source is not None})
        return files

    def load(self) -> None:
        if self._step is not None:
            return
        if self.device.type != "cuda" and not self.dev.interpret:
            raise TargetError("these Triton kernels were rendered for a GPU; run on a CUDA device, or set "
                              "TRITON_INTERPRET=1 before compiling to run them on the CPU interpreter")
        if self.device.type == "cuda" and self.dev.interpret:
            raise TargetError("TRITON_INTERPRET=1 is set but the model is on a CUDA device; unset it to run the "
                              "kernels on the GPU, or move the model to the CPU")
        self.derive_weights()
        modules: dict[str, ModuleType] = {k.alias: load_source(k.source, k.alias) for k in self.kernels}
        step_module = load_source(self.step_source, f"step_{source_hash(self.step_source)}")
        step_module.__dict__.update(modules)
        self._step = step_module.step

    def derive_weights(self) -> None:
        """Add the re-laid weights (``self.derived``) to ``self.weights``, once; `load` does it."""
        for name, (target, layout) in self.derived.items():
            if name not in self.weights:
                self.weights[name] = mma_layout.DERIVED[layout](self.weights[target])

    def kernel_module(self, alias: str):
        """The loaded kernel module the step function calls as ``alias`` (``k03_attention``, ...)."""
        self.load()
        return self._step.__globals__[alias]

    @contextlib.contextmanager
    def observing(self, hook: Callable[[str, tuple, object], None]):
        """Within the block, each kernel module launch calls ``hook(alias, args, output)`` after it returns:
        diagnostics record outputs or count bytes this way without touching the generated sources. The hook must
        not synchronise if a CUDA graph is captured meanwhile."""
        self.load()
        names = self._step.__globals__
        plain = {k.alias: names[k.alias] for k in self.kernels}
        names.update({alias: _Observed(alias, module, hook) for alias, module in plain.items()})
        try:
            yield self
        finally:
            names.update(plain)

    @staticmethod
    def dense_inputs(inputs: tuple) -> tuple:
        """The step's inputs as dense row-major tensors. Inputs may be views (a slice of a prompt); caches are
        written in place, so they must be dense already (a copy would take the writes)."""
        dense = []
        for t in inputs:
            if isinstance(t, torch.Tensor) and not t.is_contiguous():
                if t.dim() == 4:
                    raise TargetError(f"a KV cache tensor of shape {tuple(t.shape)} is not contiguous")
                t = t.contiguous()
            dense.append(t)
        return tuple(dense)

    def __call__(self, *inputs):
        self.load()
        return self._step(*self.dense_inputs(inputs), W=self.weights)


class _Observed:
    """A kernel module seen through `TritonProgram.observing`."""

    def __init__(self, alias: str, module: ModuleType, hook: Callable[[str, tuple, object], None]):
        self.alias, self.module, self.hook = alias, module, hook

    def launch(self, *args):
        out = self.module.launch(*args)
        self.hook(self.alias, args, out)
        return out
