"""Every generated kernel compiles for sm_90 (H100) and fits its shared memory, on a machine without a GPU.

The CPU interpreter runs Python, so it accepts things the compiler refuses (a module global in a kernel, a loop
bound of the wrong kind, a type mix) and never runs out of shared memory. Here the step function of a `mini`-shaped
model (on the meta device: no weights are allocated) runs with each kernel launch replaced by a full Triton compile
for Hopper with the launch's real argument types and options, and the kernel's shared memory is checked against the
H100's 227 KB per block: what would not compile or launch on the GPU fails here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import tilec
from tilec.codegen.tuning import SMEM_OPTIN
from tilec.models import build_model
from tilec.models.config import DENSE, FULL, SLIDING, SPARSE
from tilec.runtime.kv_cache import layout_from_graph

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

pytestmark = pytest.mark.slow

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
        torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1", torch.int8: "*i8"}


H100_SHARED_BYTES = SMEM_OPTIN[(9, 0)]  # per block, after cudaFuncSetAttribute (what Triton checks at launch)


def _compile_for(fn, args, kwargs, built):
    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    # The launcher specialises like Triton's runtime does: 16-byte aligned pointers and ints divisible by 16 get
    # the divisibility hint (which enables wide loads and deeper pipelining: more shared memory), ints equal to 1
    # become constants.
    signature, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for i, name in enumerate(names):
        value = bound.get(name)
        if fn.params[i].is_constexpr or (type(value) is int and value == 1):
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = _PTR[value.dtype]
            attrs[(i,)] = aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            if value % 16 == 0:
                attrs[(i,)] = aligned
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise AssertionError(f"{fn.__name__}: argument {name}={value!r} has no Triton type")
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    key = (fn, tuple(sorted(signature.items())), tuple(sorted((k, repr(v)) for k, v in constexprs.items())),
           tuple(sorted(options.items())), tuple(sorted(attrs)))
    if key in built:
        return
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=options)
    assert kernel.metadata.shared <= H100_SHARED_BYTES, (
        f"{fn.__name__} {constexprs} needs {kernel.metadata.shared} bytes of shared memory; the H100 has "
        f"{H100_SHARED_BYTES}")
    built.add(key)


def build_all(variant: str, rows_list: tuple[int, ...], preset: str = "mini", **overrides) -> int:
    """Lower a 3-layer ``preset`` (its dtype with ``overrides``, meta device) for an H100 and compile every kernel it
    launches for rows in ``rows_list``; returns how many distinct kernels were compiled."""
    from triton.runtime.jit import JITFunction

    from tilec.codegen import render

    built: set = set()
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: _compile_for(self, args, kwargs, built)
    options = {"logits": tilec.Options(), "greedy+hidden": tilec.Options(greedy=True, hidden_layers=(1, 2)),
               "mxfp4": tilec.Options(mxfp4=True)}[variant]
    model = build_model(preset, device="meta", num_hidden_layers=3, layer_types=[FULL, SLIDING, SLIDING],
                        mlp_layer_types=[DENSE, SPARSE, SPARSE], **overrides)
    cm = tilec.compile(model, target="triton", options=options)
    program = cm.program
    modules = {k.alias: render.load_source(k.source, k.alias) for k in program.kernels}
    assert all(isinstance(obj, JITFunction) for m in modules.values() for name, obj in vars(m).items()
               if name.endswith("_kernel")), "kernels loaded for the interpreter"
    step = render.load_source(program.step_source, "step")
    step.__dict__.update(modules)
    program.derive_weights()  # re-laid weights for the CUDA decode kernels (meta here: those kernels do not run)
    caches = [torch.empty(s.shape, dtype=s.dtype, device="meta") for s in
              layout_from_graph(cm.graph, 1, 4096, cm.options.spec_rows)]
    for rows in rows_list:  # a decode step, a verify step, a prefill: each launch only compiles
        ids = torch.empty((1, rows), dtype=torch.int64, device="meta")
        step.step(ids, torch.empty((1,), dtype=torch.int64, device="meta"), *caches, W=program.weights)
    return len(built)


@pytest.mark.parametrize("variant,preset", [("logits", "mini"), ("greedy+hidden", "mini"), ("mxfp4", "mini"),
                                            ("mxfp4", "v2-flash")])  # the full model's shapes: H 4096, 256 experts
def test_every_kernel_compiles_for_sm90(variant, preset):
    # A fresh process without TRITON_INTERPRET: Triton decides interpreted vs compiled once per process.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import test_triton_ttir as t; print('built', t.build_all({variant!r}, (1, 8, 300), {preset!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert int(done.stdout.split("built")[-1]) > 5


def narrow_heads() -> int:
    """build_all of a tiny model with heads of 8: every tl.dot of the attention kernel must get inner sizes of at
    least 16 (Triton 3.6 refuses less when it compiles for the GPU; 3.9 and the interpreter take it), so its
    padded head sizes are checked as well as compiled. Returns how many kernels were compiled."""
    pads = []
    compile_one = _compile_for

    def spy(fn, args, kwargs, built):
        if fn.__name__ == "attend_kernel":
            pads.append((kwargs["D_PAD"], kwargs["DV_PAD"]))
        compile_one(fn, args, kwargs, built)

    globals()["_compile_for"] = spy
    try:
        n = build_all("logits", (1, 8, 30), "tiny", head_dim=8, v_head_dim=8, sliding_window=4)
    finally:
        globals()["_compile_for"] = compile_one
    assert pads and min(min(p) for p in pads) >= 16, pads
    return n


def test_narrow_heads_compile_for_sm90():
    """Head dims of 8, as drawn configurations have: the attention pads them to tl.dot's 16 (masked)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", "import test_triton_ttir as t; print('built', t.narrow_heads())"],
                          cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert int(done.stdout.split("built")[-1]) > 5
