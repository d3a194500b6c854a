"""Every generated kernel goes through Triton's front end for sm_90 (TTIR), on a machine without a GPU.

The CPU interpreter runs Python, so it accepts things the compiler refuses (a module global in a kernel, a loop
bound of the wrong kind, a type mix). Here the step function runs with each kernel launch replaced by building the
kernel's TTIR for Hopper with the launch's real argument types: what would not compile on the GPU fails here.
"""

from __future__ import annotations

import os

import pytest
import torch

import tilec
from tilec.models import build_model

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

MODEL_OVERRIDES: dict = {"mlp_layer_types": ["dense"] * 4}  # TEMP until MoE kernels land
_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
        torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1", torch.int8: "*i8"}


def _ttir_for(fn, args, kwargs, built):
    from triton.backends.nvidia.compiler import CUDABackend
    from triton._C.libtriton import ir

    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs = {}, {}
    for i, name in enumerate(names):
        value = bound.get(name)
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise AssertionError(f"{fn.__name__}: argument {name}={value!r} has no Triton type")
    key = (fn, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())))
    if key in built:
        return
    target = GPUTarget("cuda", 90, 32)
    backend = CUDABackend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    ASTSource(fn, signature, constexprs).make_ir(target, options, backend.get_codegen_implementation(options),
                                                 backend.get_module_map(), context)
    built.add(key)


@pytest.mark.parametrize("options", [tilec.Options(), tilec.Options(greedy=True, hidden_layers=(1, 3))],
                         ids=["logits", "greedy+hidden"])
@pytest.mark.parametrize("rows", [1, 8, 13])
def test_every_kernel_builds_for_sm90(options, rows, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from triton.runtime.jit import JITFunction

    built: set = set()

    def fake_run(self, *args, grid, warmup, **kwargs):
        _ttir_for(self, args, kwargs, built)

    monkeypatch.setattr(JITFunction, "run", fake_run)
    model = build_model("tiny", dtype=torch.bfloat16, **MODEL_OVERRIDES)
    cm = tilec.compile(model, target="triton", options=options)
    program = cm.program
    program.dev = program.dev.__class__(interpret=False, sms=132)
    # Load the kernels as compiled (not interpreted) Triton functions, then run the step on CPU tensors: each
    # launch only builds TTIR.
    from tilec.codegen import render

    modules = {k.alias: render.load_source(k.source, k.alias + "_ttir") for k in program.kernels}
    step = render.load_source(program.step_source, "step_ttir")
    step.__dict__.update(modules)
    from triton.runtime.jit import JITFunction as Jit

    assert any(isinstance(obj, Jit) for m in modules.values() for obj in vars(m).values()), "loaded interpreted"
    session = cm.new_session(1, 64)
    ids = torch.randint(0, 512, (1, rows))
    step.step(ids, torch.tensor([3]), *session.cache.tensors, W=program.weights)
    assert built, "no kernel was built"
