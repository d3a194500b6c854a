"""Every generated kernel goes through Triton's front end for sm_90 (TTIR), on a machine without a GPU.

The CPU interpreter runs Python, so it accepts things the compiler refuses (a module global in a kernel, a loop
bound of the wrong kind, a type mix). Here the step function runs with each kernel launch replaced by building the
kernel's TTIR for Hopper with the launch's real argument types: what would not compile on the GPU fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tilec
from tilec.models import build_model

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

MODEL_OVERRIDES: dict = {}
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


def build_all(variant: str, rows_list: tuple[int, ...]) -> int:
    """Lower `tiny` (bf16) for an H100 and build every kernel's TTIR; returns how many distinct builds ran."""
    from triton.runtime.jit import JITFunction

    from tilec.codegen import render

    built: set = set()
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: _ttir_for(self, args, kwargs, built)
    options = {"logits": tilec.Options(), "greedy+hidden": tilec.Options(greedy=True, hidden_layers=(1, 3)),
               "mxfp4": tilec.Options(mxfp4=True)}[variant]
    cm = tilec.compile(build_model("tiny", dtype=torch.bfloat16, **MODEL_OVERRIDES), target="triton",
                       options=options)
    program = cm.program
    modules = {k.alias: render.load_source(k.source, k.alias) for k in program.kernels}
    assert all(isinstance(obj, JITFunction) for m in modules.values() for name, obj in vars(m).items()
               if name.endswith("_kernel")), "kernels loaded for the interpreter"
    step = render.load_source(program.step_source, "step")
    step.__dict__.update(modules)
    session = cm.new_session(1, 64)
    for rows in rows_list:  # a decode step, a verify step, a prefill: each launch only builds TTIR
        step.step(torch.randint(0, 512, (1, rows)), torch.tensor([3]), *session.cache.tensors, W=program.weights)
    return len(built)


@pytest.mark.parametrize("variant", ["logits", "greedy+hidden", "mxfp4"])
def test_every_kernel_builds_for_sm90(variant):
    # A fresh process without TRITON_INTERPRET: Triton decides interpreted vs compiled once per process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import test_triton_ttir as t; print('built', t.build_all({variant!r}, (1, 8, 13)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert int(done.stdout.split("built")[-1]) > 5
