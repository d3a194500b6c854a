"""The CUDA decode kernels of mxfp4_moe_experts (templates/cuda/moe_experts_mxfp4.cu.j2).

On any machine: the planner's choice (for drawn shapes too: its experts_kernel plan fits the template's assumptions
and the block's shared memory), the lowering's re-laid weights (step.py passes them after the node's own
arguments), and the generated CUDA source compiling for sm_90a without spills (nvcc, where installed). On the GPU:
the kernels against the reference op at mini expert shapes, batch invariance, and the unfolded scale path. The
fragment layout itself is tested in tests/test_mma_layout.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import tilec
from tilec import ops
from tilec.codegen import mma_layout
from tilec.codegen.plans_moe import (cuda_decode_context, experts_context, fused_context, fused_static_bytes,
                                     with_down)
from tilec.codegen.render import render
from tilec.codegen.tuning import DeviceInfo

from test_triton_moe import (MINI, assert_batch_invariant, experts_module, invariance_routing, moe_graph, rel,
                             routing)

H100 = DeviceInfo(interpret=False, sms=132)


def test_planner_uses_cuda_decode_where_it_applies(monkeypatch):
    cuda = experts_context("mxfp4", 2048, 768, 128, H100)["cuda"]
    # both projections in one persistent kernel: 8 consumer warps, stages of one gate_up tile (32 chunks of 544
    # bytes) or two down slots; 4 of them (11 would fit in 227 KB beside the static shared memory); an act warp
    # beside the producer; down by tile a warp a slot (4 units of 2 slots: 8 warps, a ring of 4; 3 chunks a piece),
    # its last unit copied once the block has arrived at the grid barrier (hold)
    fused = {"warps": 8, "stages": 4, "stage_bytes": 17408, "du": 2, "smem": 4 * 17408, "pdl": True, "by_slot": 16,
             "range": 16, "act_warp": True, "sw": True, "sw_np": 2, "sw_all": True, "hold": 1}
    assert cuda == {"gu_warps": 4, "gu_depth": 4, "groups": 16, "d_split": 2, "d_warps": 16, "d_depth": 6,
                    "fused": fused}
    assert experts_context("mxfp4", 2048, 768, 128, DeviceInfo(True, 1))["cuda"] is None  # interpreter
    assert experts_context("mxfp4", 2048, 768, 128, DeviceInfo(False, 108, (8, 0)))["cuda"] is None  # A100
    assert experts_context("mxfp4", 2080, 768, 128, H100)["cuda"] is None  # H not a multiple of 64
    assert experts_context("mxfp4", 2048, 800, 128, H100)["cuda"] is None  # I neither
    assert experts_context("dense", 2048, 768, 128, H100)["cuda"] is None
    # odd chunk counts: fewer warps over H, no split of I
    odd = cuda_decode_context(192, 192, H100)
    assert {k: v for k, v in odd.items() if k != "fused"} == {
        "gu_warps": 1, "gu_depth": 1, "groups": 16, "d_split": 1, "d_warps": 8, "d_depth": 3}
    assert odd["fused"]["warps"] == 3 and odd["fused"]["du"] == 1  # 3 warps split H's 3 chunks and a slot's 3
    # I larger than H: a stage is one down slot; a GPU with 99 KB a block has fewer stages; none before Hopper
    assert fused_context(1024, 4096, H100) == {"warps": 8, "stages": 4, "stage_bytes": 64 * 544, "du": 1,
                                               "smem": 4 * 64 * 544, "pdl": True, "by_slot": 16, "range": 16,
                                               "act_warp": True, "sw": False, "sw_np": 1,
                                               "sw_all": False, "hold": 1}  # 8 units of a slot: not a warp a slot
    assert odd["fused"]["range"] == 12  # down by slot: one range of all H's 12 tiles
    # H = 6144 (MiMo-V2.5-Pro): 8 warps would hold 12 chunks of x each (and spill): 12 warps, 8 chunks each, three
    # down slots a stage (one gate_up tile's 52 KB of room) of 4 warps each; no act warp (its registers would make
    # the consumers spill: the nvcc test below compiles this shape)
    assert fused_context(6144, 2048, H100) == {"warps": 12, "stages": 3, "stage_bytes": 96 * 544, "du": 3,
                                               "smem": 3 * 96 * 544, "pdl": True, "by_slot": 16, "range": 12,
                                               "act_warp": False, "sw": False, "sw_np": 1, "sw_all": False,
                                               "hold": 1}
    assert fused_context(8192, 2048, H100)["warps"] == 16
    assert fused_context(2048, 768, H100, max_stages=64)["stages"] == 11
    assert fused_context(2048, 768, DeviceInfo(False, 188, (12, 0), 101376), max_stages=64)["stages"] == 4
    assert fused_context(2048, 768, DeviceInfo(False, 108, (8, 0), 166912)) is None
    # down's I in one piece a warp: 12 chunks, 6 in flight; MiMo-V2-Flash's I = 2048: 32 chunks, 4 in flight
    assert with_down(cuda, 768, d_split=1) == {**cuda, "d_split": 1, "d_warps": 8, "d_depth": 6}
    assert with_down(cuda, 2048, d_split=1)["d_depth"] == 4
    import tilec.codegen.cuda_build as cb

    monkeypatch.setattr(cb, "compiler_available", lambda: False)
    assert experts_context("mxfp4", 2048, 768, 128, H100)["cuda"] is None  # nothing to compile with


def test_lowering_passes_the_relaid_weights(monkeypatch):
    """Rendered for the GPU (no TRITON_INTERPRET) on this machine: the experts call gets the four re-laid weights,
    named after their source, and the program derives them with mma_layout when it loads."""
    from tilec.codegen.triton import H100 as RENDER_TARGET, lower

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert RENDER_TARGET.capability == (9, 0)
    program = lower(moe_graph(hidden=128, inter=64, experts=6, k=3), torch.device("cpu"), "test")
    assert program.derived == {"gub@mma_words_gate_up": ("gub", "mma_words_gate_up"),
                               "gus@mma_scales_gate_up": ("gus", "mma_scales_gate_up"),
                               "db@mma_words": ("db", "mma_words"), "ds@mma_scales": ("ds", "mma_scales")}
    call = next(line for line in program.step_source.splitlines() if "mxfp4_moe_experts.launch(" in line)
    assert re.search(r"W\['gub'\], W\['gus'\], W\['db'\], W\['ds'\], W\['gub@mma_words_gate_up'\], "
                     r"W\['gus@mma_scales_gate_up'\], W\['db@mma_words'\], W\['ds@mma_scales'\]\)", call), call
    experts = next(k for k in program.kernels if k.plan.template == "triton/moe_experts.py.j2")
    assert "CUDA_SOURCE" in experts.source and "mma.sync.aligned.m16n8k16" in experts.source
    # what load() adds to the weights the step reads (load itself wants a GPU for these kernels)
    program.derive_weights()
    w = program.weights
    assert torch.equal(w["gub@mma_words_gate_up"], mma_layout.fragment_words(w["gub"], gate_up=True))
    assert torch.equal(w["ds@mma_scales"], mma_layout.fragment_scales(w["ds"]))


def test_no_cuda_decode_when_weights_are_not_graph_constants():
    """The planner needs the weights at hand (get_attr) to re-lay them; otherwise the Triton kernels do decode."""
    import json

    from tilec.codegen.plan import PLANNERS

    gm = moe_graph(hidden=128, inter=64, experts=6, k=3)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and "mxfp4_moe_experts" in str(n.target))
    with gm.graph.inserting_before(node):
        copy = gm.graph.call_function(torch.ops.aten.clone.default, (node.args[3],))
    copy.meta["val"] = node.args[3].meta["val"]
    node.args = node.args[:3] + (copy,) + node.args[4:]

    ctx = json.loads(PLANNERS["mxfp4_moe_experts"](node, H100).context)
    assert ctx["cuda"] is None and "derived_weights" not in ctx



@given(hidden=st.integers(1, 160).map(lambda c: 64 * c), inter=st.integers(1, 96).map(lambda c: 64 * c),
       smem=st.sampled_from([232448, 166912, 101376]), warps=st.sampled_from([None, None, 4, 8, 12, 16]),
       max_stages=st.sampled_from([4, 64]), act_warp=st.sampled_from([None, True, False]))
@example(hidden=5120, inter=2048, smem=232448, warps=None, max_stages=4, act_warp=None)  # 10 warps spilled 536 B
@example(hidden=6144, inter=2560, smem=232448, warps=None, max_stages=4, act_warp=None)  # 12 warps spilled 204 B
@example(hidden=7168, inter=2048, smem=232448, warps=None, max_stages=4, act_warp=None)  # no plan with 14 warps
@settings(max_examples=300, deadline=None)
def test_fused_plan_fits_what_the_template_assumes(hidden, inter, smem, warps, max_stages, act_warp):
    """For drawn expert shapes (held-out MiMo sizes among them), a plan for experts_kernel meets what the template's
    static_asserts and index arithmetic assume and fits the block's shared memory and threads; without a warp count
    given, a consumer warp holds at most 8 chunks of x wherever H's chunks allow it (more spill)."""
    dev = DeviceInfo(interpret=False, sms=132, smem_optin=smem)
    f = fused_context(hidden, inter, dev, warps=warps, max_stages=max_stages, act_warp=act_warp)
    chunks, d_chunks = hidden // 64, inter // 64
    if f is None:
        return
    w, du = f["warps"], f["du"]
    assert chunks % w == 0 and w % du == 0 and d_chunks % (w // du) == 0  # FA_CHUNKS, F_WS, FB_CHUNKS whole
    assert f["range"] % du == 0 and (hidden // 16) % f["range"] == 0 and f["range"] <= 16
    assert f["stage_bytes"] % 128 == 0
    assert f["stage_bytes"] >= max(chunks * 544, du * d_chunks * 544)  # a gate_up tile, or du down slots
    assert 2 <= f["stages"] <= max_stages and f["smem"] == f["stages"] * f["stage_bytes"]
    assert fused_static_bytes(hidden, w) + 16 * f["stages"] + f["smem"] <= smem
    assert (w + 1 + f["act_warp"]) * 32 <= 1024
    # a warp a slot: the template's static_asserts (a warp's first place at most a ring ahead; whole turns of pieces)
    assert not f["sw"] or w // du <= f["stages"]
    assert (w // du) % f["sw_np"] == 0 and (f["sw"] or (f["sw_np"] == 1 and not f["sw_all"]))
    if warps is None and any(chunks % v == 0 and chunks // v <= 8 for v in range(1, 17)):
        assert chunks // w <= 8
    if warps is None and w < 16:  # more warps were not needed, or would not have helped: down's chunks of I
        more = [fused_context(hidden, inter, dev, warps=v, max_stages=max_stages, act_warp=act_warp)
                for v in range(w + 1, 17) if chunks % v == 0 and chunks // v <= 8]
        assert d_chunks * du // w <= 8 or not any(m and d_chunks * m["du"] // m["warps"] <= 8 for m in more)


def grid_barrier_source() -> str:
    """experts_kernel's grid_barrier, from the template."""
    src = (Path(__file__).resolve().parents[1] / "templates" / "cuda" / "moe_experts_mxfp4.cu.j2").read_text()
    body = src[src.index("__device__ void grid_barrier("):]
    return body[:body.index("\n}\n")]


@given(grid=st.integers(1, 1024), launches=st.integers(1, 4), data=st.data())
@example(grid=132, launches=2, data=None)  # the H100's grid (block 0 first in the second launch: see below)
@settings(max_examples=100, deadline=None)
def test_grid_barrier_word(grid, launches, data):
    """experts_kernel's grid barrier on one 32-bit word, emulated over launches in drawn arrival orders: block 0 adds
    2^31 - (grid - 1) and every other block 1; each block waits until the word's top bit differs from that of the
    value its add returned. That happens exactly when the last block has added, and the word is back at 0 or 2^31
    (so the next launch needs no reset). Any sentinel the kernel compares the returned value with (the timeline's
    stamp; an arrival on a barrier must never depend on it) is a value no add returns: 0xFFFFFFFF is one that does
    (the last block, where block 0 arrived first in a launch starting at 2^31), which hung a variant on the H100."""
    body = grid_barrier_source()
    assert "const u32 add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;" in body  # what is emulated here
    assert "((now ^ old) & 0x80000000u) == 0" in body
    guards = [int(c, 16) for c in re.findall(r"old != (0x[0-9A-Fa-f]+)u", body)]  # the constants `old` is tested with
    assert guards and 0xFFFFFFFF not in guards
    word, seen = 0, set()
    for _ in range(launches):
        start = word
        order = data.draw(st.permutations(range(grid))) if data else list(range(grid))
        olds = {}
        for i, block in enumerate(order):
            add = 2 ** 31 - (grid - 1) if block == 0 else 1
            olds[block] = word
            word = (word + add) % 2 ** 32
            released = [((word ^ old) >> 31) & 1 for old in olds.values()]
            assert released == [i == grid - 1] * len(released), (i, grid)  # all go on at the last add, none before
        assert word == start ^ 2 ** 31 and word % 2 ** 31 == 0
        seen |= set(olds.values())
    assert not seen & set(guards)


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("h,i,fold,d_split", [(2048, 768, True, 2), (2048, 768, False, 2), (4096, 2048, True, 2),
                                               (192, 192, True, 2), (2048, 768, True, 1), (1024, 4096, True, 2),
                                               (512, 64, True, 2), (6144, 2048, True, 2), (5120, 2048, True, 2),
                                               (6144, 1024, True, 2), (2048, 1024, True, 2)])
def test_cuda_source_compiles_without_spills(tmp_path, h, i, fold, d_split):
    """The generated CUDA compiles for sm_90a (mini, the MiMo-V2-Flash expert shape, odd chunk counts, I larger or much
    smaller than H, down's I in one or two pieces, MiMo-V2.5-Pro's H = 6144 with 12 consumer warps, H = 5120 with 16,
    where 10 spilled, and 6144 x 1024 with 3 down slots a stage, where 6 spilled), with no local-memory spills
    (registers hold the loads in flight)."""
    ctx = experts_context("mxfp4", h, i, 16, H100, scale_fold=fold)
    assert ctx["cuda"] is not None and ctx["cuda"]["fused"] is not None
    ctx["cuda"] = with_down(ctx["cuda"], i, d_split)
    src = render("cuda/moe_experts_mxfp4.cu.j2", ctx=ctx)
    (tmp_path / "k.cu").write_text(src)
    proc = subprocess.run([NVCC, "-cubin", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas",
                           "-v", "-o", str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for kernel in ("gate_up_kernel", "down_kernel", "experts_kernel"):
        assert f"Compiling entry function '{kernel}'" in proc.stderr
    assert "spill stores" in proc.stderr and not re.search(r"[1-9]\d* bytes spill stores", proc.stderr)
    # experts_kernel's static shared memory as ptxas counts it, against the planner's count (fused_static_bytes and 16
    # bytes of barriers a stage), and with the dynamic part within the GPU's limit
    f = ctx["cuda"]["fused"]
    used = re.search(r"Compiling entry function 'experts_kernel'.*?Used \d+ registers.*?(\d+) bytes smem", proc.stderr,
                     re.S)
    assert used, proc.stderr[-2000:]
    assert int(used.group(1)) <= fused_static_bytes(h, f["warps"]) + 16 * f["stages"]
    assert int(used.group(1)) + f["smem"] <= H100.smem_optin


def test_fused_call_allocates_the_by_slot_outputs_only_where_the_kernel_may_write_them(monkeypatch):
    """experts_kernel writes its by-slot outputs only where more than by_slot slots are live, so never in a call of
    by_slot router pairs or fewer: there the launch gets `out` in their place (a pointer it never follows) and no
    [p, m, H] buffer is allocated; past it, a buffer of its own. On the CPU, with the launch recorded instead of run."""
    import types

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, i, e, k = 512, 64, 16, 8
    mod = experts_module("mxfp4", h, i, e, H100)
    if not hasattr(mod, "_cuda_experts"):
        pytest.skip("the planner plans the CUDA kernels only where NVRTC or nvcc can compile them")
    assert experts_context("mxfp4", h, i, e, H100)["cuda"]["fused"]["by_slot"] == 16
    launches = []
    monkeypatch.setattr(mod, "_CUDA", types.SimpleNamespace(launch=lambda fn, grid, block, args, device, **kw:
                                                            launches.append((fn, args))))
    monkeypatch.setattr(mod, "_sms", lambda device: 132)
    frags = [torch.empty(shape, dtype=torch.int32) for shape in mod.FRAGMENT_SHAPES]
    g = torch.Generator().manual_seed(0)
    for rows, own_buffer in ((1, False), (2, False), (3, True)):  # 8, 16 and 24 router pairs
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(rows)])
        x = torch.randn(rows, h, generator=g).to(torch.bfloat16)
        out = torch.empty_like(x)
        mod._cuda_experts(x, torch.rand(rows, k, generator=g), ids, out, frags)
        fn, args = launches[-1]
        assert fn == "experts_kernel" and len(args) == 15
        assert (args[10].value != out.data_ptr()) == own_buffer, rows  # ybuf


def test_kernel_attribute_is_set_again_when_another_value_was_set_in_between(monkeypatch):
    """CudaModule._set skips the driver only where the attribute holds the asked value: one kernel launched with 160
    KB, then 80 KB, then 160 KB of shared memory needs three calls (caching per value made the third launch fail with
    CUDA_ERROR_INVALID_VALUE on the GPU: benchmarks/read_floor.py's variants)."""
    import sys
    import types

    from tilec.codegen.cuda_build import CudaModule

    calls = []
    driver = types.SimpleNamespace(
        CUfunction_attribute=types.SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES="max_smem"),
        CUkernel=type("CUkernel", (), {}), CUresult=types.SimpleNamespace(CUDA_SUCCESS=0),
        cuFuncSetAttribute=lambda handle, attr, value: calls.append((attr, value)) or (0,))
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = driver
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    module, kernel, dev = CudaModule("", "m"), types.SimpleNamespace(handle=object()), torch.device("cuda", 0)
    for smem in (163840, 163840, 81920, 163840):
        module._set(kernel, "k", dev, "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", smem)
    assert calls == [("max_smem", 163840), ("max_smem", 81920), ("max_smem", 163840)]


def test_clustered_launch_needs_whole_clusters():
    """A clustered launch whose grid is not whole clusters is refused with a TilecError before anything loads."""
    from tilec.codegen.cuda_build import CudaModule
    from tilec.errors import TilecError

    with pytest.raises(TilecError, match="a grid of 131 blocks is not whole clusters of 2"):
        CudaModule("", "m").launch("k", (131,), 64, [], torch.device("cuda", 0), cluster=2)


def test_bad_cuda_source_is_a_clear_error(tmp_path, monkeypatch):
    """A compiler error comes back as a TilecError naming the source and holding the compiler's message; nothing is
    cached."""
    from tilec.codegen import cuda_build
    from tilec.errors import TilecError

    if not cuda_build.compiler_available():
        pytest.skip("needs NVRTC or nvcc")
    monkeypatch.setenv("TILEC_CACHE_DIR", str(tmp_path))
    with pytest.raises(TilecError, match="could not compile the generated CUDA source broken_kernel") as info:
        cuda_build.compile_cubin('extern "C" __global__ void k() { undeclared_name(); }', "broken_kernel", "sm_90a")
    assert "undeclared_name" in str(info.value)
    assert not list(tmp_path.rglob("*.cubin"))


# ------------------------------------------------------------------------------------------------------------- GPU
def gpu_device() -> DeviceInfo:
    props = torch.cuda.get_device_properties(0)
    return DeviceInfo(interpret=False, sms=props.multi_processor_count, capability=(props.major, props.minor))


def random_experts(seed: int, gate_up_codes: tuple[int, int], down_codes: tuple[int, int], e: int = MINI["E"],
                   h: int = MINI["H"], i: int = MINI["I"]) -> tuple:
    """MXFP4 experts on the GPU (mini shapes unless given): random E2M1 codes, scale codes drawn from [lo, hi)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = dict(dtype=torch.uint8, device="cuda", generator=g)
    return (torch.randint(0, 256, (e, 2 * i, h // 2), **codes),
            torch.randint(*gate_up_codes, (e, 2 * i, h // 32), **codes),
            torch.randint(0, 256, (e, h, i // 2), **codes), torch.randint(*down_codes, (e, h, i // 32), **codes))


@pytest.fixture(scope="module")
def mini_mx():
    weights = random_experts(0, (118, 125), (118, 125))
    return weights, mma_layout.relay_experts(*weights)


# The CUDA decode paths: experts_kernel (both projections in one persistent kernel, the planner's choice where it
# fits) as planned, the same with its down phase dealt by slot at every call (planned where more than 16 slots are
# live), and gate_up_kernel + down_kernel (which decode takes where a batch may pass 8 rows).
VARIANTS = ("fused", "fused_by_slot", "two_kernels")


def cuda_module(fold: bool = True, variant: str = "fused"):
    os.environ.pop("TRITON_INTERPRET", None)
    cuda = experts_context("mxfp4", MINI["H"], MINI["I"], MINI["E"], gpu_device())["cuda"]
    assert cuda is not None and cuda["fused"], "the planner did not choose experts_kernel"
    if variant == "two_kernels":
        cuda = {**cuda, "fused": None}
    elif variant == "fused_by_slot":
        cuda = {**cuda, "fused": {**cuda["fused"], "by_slot": 0}}
    mod = experts_module("mxfp4", MINI["H"], MINI["I"], MINI["E"], gpu_device(), scale_fold=fold, cuda=cuda)
    assert hasattr(mod, "CUDA_SOURCE"), "the planner did not choose the CUDA decode kernels"
    return mod


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_cuda_experts_mini(mini_mx, variant):
    """1 to 8 rows (same and independent routes) against the reference op and the Triton kernels, within bf16
    rounding; 24 rows (prefill) take the Triton kernels."""
    weights, frags = mini_mx
    mod = cuda_module(variant=variant)
    g = torch.Generator().manual_seed(0)
    for rows, same in ((1, True), (2, False), (4, True), (8, True), (8, False), (24, False)):
        w, ids = routing(rows, MINI["k"], MINI["E"], same, g)
        x = torch.randn(1, rows, MINI["H"], generator=g).bfloat16().cuda()
        w, ids = w.cuda(), ids.cuda()
        out = mod.launch(x, w, ids, *weights, *frags)
        ref = ops.mxfp4_moe_experts(x, w, ids, *weights)
        tri = mod.launch(x, w, ids, *weights)  # no fragments: the Triton kernels
        assert torch.isfinite(out).all()
        assert rel(out, ref) < 1e-2 and rel(out, tri) < 1e-2, (rows, same, rel(out, ref), rel(out, tri))
        if rows > 8:
            assert torch.equal(out, tri)


@pytest.mark.gpu
def test_gpu_down_by_tile_and_by_slot_give_the_same_bits(mini_mx):
    """experts_kernel's two ways of dealing the down phase (by tile of H, every slot of it in one block; by slot, in
    ranges of tiles, outputs through global memory) sum every output in the same order: equal bits from 1 to 8 rows,
    so which one a batch takes (by how many slots are live) does not change a row. By tile both ways: a warp a slot
    (all of its I, in F_WS pieces) and F_WS warps a slot; and with none or 3 of the block's last down units held back
    until its grid barrier add (the planner holds 1)."""
    weights, frags = mini_mx
    planned = cuda_module()  # by tile up to 16 live slots, by slot past them (8 independent rows)
    cuda = experts_context("mxfp4", MINI["H"], MINI["I"], MINI["E"], gpu_device())["cuda"]
    assert cuda["fused"]["by_slot"] < 64
    by_slot = cuda_module(variant="fused_by_slot")
    assert cuda["fused"]["sw"]
    by_tile = [experts_module("mxfp4", MINI["H"], MINI["I"], MINI["E"], gpu_device(),
                              cuda={**cuda, "fused": {**cuda["fused"], "by_slot": 64, **sw}})
               for sw in ({"sw_np": 1, "sw_all": False}, {"sw": False}, {"hold": 0}, {"hold": 3})]
    g = torch.Generator().manual_seed(5)
    for rows, same in ((1, True), (3, False), (8, True), (8, False)):
        w, ids = routing(rows, MINI["k"], MINI["E"], same, g)
        x = torch.randn(1, rows, MINI["H"], generator=g).bfloat16().cuda()
        w, ids = w.cuda(), ids.cuda()
        outs = [m.launch(x, w, ids, *weights, *frags) for m in (planned, by_slot, *by_tile)]
        for other in outs[1:]:
            assert torch.equal(outs[0], other), (rows, same)
        assert rel(outs[0], ops.mxfp4_moe_experts(x, w, ids, *weights)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_cuda_experts_repeated_choices_in_row_0(mini_mx, variant):
    """Row 0 choosing one expert twice or more (no top-k router does, yet the op allows it: the slot table then has
    dead pairs in row 0, and live slots of rank r that are not pair r) against the reference op; rows whose choices
    are distinct too."""
    weights, frags = mini_mx
    mod = cuda_module(variant=variant)
    g = torch.Generator().manual_seed(11)
    for rows, repeats in ((1, 2), (1, 8), (3, 3), (8, 2), (2, 0)):
        w, ids = routing(rows, MINI["k"], MINI["E"], False, g)
        ids[0, 0, 1:repeats] = ids[0, 0, 0]  # row 0's first `repeats` choices one expert
        x = torch.randn(1, rows, MINI["H"], generator=g).bfloat16().cuda()
        w, ids = w.cuda(), ids.cuda()
        out = mod.launch(x, w, ids, *weights, *frags)
        assert rel(out, ops.mxfp4_moe_experts(x, w, ids, *weights)) < 1e-2, (rows, repeats)


@pytest.mark.gpu
def test_gpu_graph_replay_after_the_counters_regrow(mini_mx):
    """A decode call captured in a CUDA graph, then a call that needs more tile counters than there are (as a
    large model's split-K decode can), then the graph replayed. The counters' old memory must still be allocated
    (the caching allocator's own record says so), and the replay computes what the call computed and leaves tensors
    allocated afterwards untouched. (Down by slot at every call, so the decode call counts its ranges in the
    counters. Before the outgrown buffer was kept alive, the allocator held it as free, and handed it to the next
    tensor of its size.)"""
    import gc

    weights, frags = mini_mx
    mod = cuda_module(variant="fused_by_slot")
    g = torch.Generator().manual_seed(3)
    w, ids = routing(1, MINI["k"], MINI["E"], True, g)
    x = torch.randn(1, 1, MINI["H"], generator=g).bfloat16().cuda()
    w, ids = w.cuda(), ids.cuda()
    eager = mod.launch(x, w, ids, *weights, *frags)  # compiles, and sizes the counters for decode
    torch.cuda.synchronize()
    before = mod._counters(x.device, 1).numel()
    old_ptr = mod._counters(x.device, 1).data_ptr()  # the address only: a reference here would keep it alive
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = mod.launch(x, w, ids, *weights, *frags)
    mod._counters(x.device, 4 * before)  # what a launch needing more counters asks for
    torch.cuda.synchronize()
    gc.collect()
    assert mod._counters(x.device, 1).numel() > before, "the counters did not regrow"
    blocks = [b for seg in torch.cuda.memory_snapshot() for b in seg["blocks"]
              if b["address"] <= old_ptr < b["address"] + b["size"]]
    assert blocks and blocks[0]["state"] == "active_allocated", f"the outgrown counters were freed: {blocks}"
    guards = [torch.full((before,), 12345, dtype=torch.int32, device=x.device) for _ in range(64)]
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    assert all(bool((t == 12345).all()) for t in guards), "the replay wrote into a tensor allocated after the prefill"


@pytest.mark.gpu
def test_gpu_cuda_experts_more_than_8_rows(mini_mx):
    """Top-4 lets decode take up to 16 rows (64 router pairs): blocks of 8 token rows (grid z). Against the reference,
    and each row equal to its own 1-row step."""
    weights, frags = mini_mx
    mod = cuda_module()
    g = torch.Generator().manual_seed(8)
    for rows, same in ((12, False), (16, True), (16, False)):
        w, ids = routing(rows, 4, MINI["E"], same, g)
        x = torch.randn(1, rows, MINI["H"], generator=g).bfloat16().cuda()
        w, ids = w.cuda(), ids.cuda()
        out = mod.launch(x, w, ids, *weights, *frags)
        assert rel(out, ops.mxfp4_moe_experts(x, w, ids, *weights)) < 1e-2, (rows, same)
        for r in (0, 7, 8, rows - 1):
            one = mod.launch(x[:, r:r + 1], w[:, r:r + 1], ids[:, r:r + 1], *weights, *frags)
            assert torch.equal(one[0, 0], out[0, r]), (rows, same, r)


@pytest.mark.gpu
@pytest.mark.parametrize("h,i,e,k", [(512, 64, 16, 8), (1024, 1536, 16, 8), (576, 320, 32, 16), (6144, 2048, 16, 8),
                                     (5120, 2048, 16, 8), (4608, 768, 16, 8)])
def test_gpu_experts_kernel_other_shapes(h, i, e, k):
    """experts_kernel where a stage holds 8, 1, 3 or 2 down slots, with 8, 3, 12 or 16 consumer warps (H = 576: 9
    chunks; H = 6144, MiMo-V2.5-Pro's: 96; H = 5120: 80, where 10 warps would spill) and top-8 or top-16, from 1 to
    the most rows a decode step has: against the reference, and each row the bits of its own 1-row step. H = 4608:
    9 warps a warp a slot (sw) over 3-slot stages, two or three tiles of H a block."""
    os.environ.pop("TRITON_INTERPRET", None)
    ctx = experts_context("mxfp4", h, i, e, gpu_device())
    assert ctx["cuda"] and ctx["cuda"]["fused"], (h, i)
    mod = experts_module("mxfp4", h, i, e, gpu_device())
    weights = random_experts(h + i, (118, 125), (118, 125), e, h, i)
    frags = mma_layout.relay_experts(*weights)
    cg = torch.Generator().manual_seed(3)
    for rows, same in ((1, True), (3, False), (64 // k, False), (64 // k, True)):
        w, ids = routing(rows, k, e, same, cg)
        x = torch.randn(1, rows, h, generator=cg).bfloat16().cuda()
        w, ids = w.cuda(), ids.cuda()
        out = mod.launch(x, w, ids, *weights, *frags)
        assert torch.isfinite(out).all()
        assert rel(out, ops.mxfp4_moe_experts(x, w, ids, *weights)) < 1e-2, (rows, same)
        for r in {0, rows - 1}:
            one = mod.launch(x[:, r:r + 1], w[:, r:r + 1], ids[:, r:r + 1], *weights, *frags)
            assert torch.equal(one[0, 0], out[0, r]), (rows, same, r)


@pytest.mark.gpu
def test_gpu_cuda_experts_unfolded_scales():
    """Scale codes above FOLD_LIMIT: the kernels multiply twice (2^126, then the block scale)."""
    weights = random_experts(1, (120, 135), (100, 131))
    h = MINI["H"]
    mod = cuda_module(fold=False)
    cg = torch.Generator().manual_seed(2)
    w, ids = routing(3, MINI["k"], MINI["E"], False, cg)
    x = (1e-3 * torch.randn(1, 3, h, generator=cg)).bfloat16().cuda()
    out = mod.launch(x, w.cuda(), ids.cuda(), *weights, *mma_layout.relay_experts(*weights))
    ref = ops.mxfp4_moe_experts(x, w.cuda(), ids.cuda(), *weights)
    assert torch.isfinite(out).all() and rel(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_cuda_experts_batch_invariant(mini_mx, variant):
    """A row's output is the same bits in steps of 1 to 8 rows, at any position (DFlash's verify step)."""
    weights, frags = mini_mx
    mod = cuda_module(variant=variant)
    g = torch.Generator().manual_seed(6)
    w, ids = invariance_routing(MINI["k"], MINI["E"], g)
    x = torch.randn(8, MINI["H"], generator=g).bfloat16().cuda()
    w, ids = w.cuda(), ids.cuda()

    def call(rows):
        return (mod.launch(x[rows][None], w[rows][None], ids[rows][None], *weights, *frags)[0],)

    ref = ops.mxfp4_moe_experts(x[None], w[None], ids[None], *weights)[0]
    assert rel(call(list(range(8)))[0], ref) < 1e-2
    assert_batch_invariant(call, g)


@pytest.mark.gpu
def test_gpu_cuda_experts_wrong_fragments_raise(mini_mx):
    weights, frags = mini_mx
    mod = cuda_module()
    x = torch.randn(1, 1, MINI["H"], device="cuda").bfloat16()
    w, ids = routing(1, MINI["k"], MINI["E"], True, torch.Generator().manual_seed(0))
    from tilec.errors import ShapeError

    with pytest.raises(ShapeError, match="re-laid weights"):
        mod.launch(x, w.cuda(), ids.cuda(), *weights, frags[2], frags[3], frags[0], frags[1])



def test_artifact_and_report_show_the_cuda_kernels(tmp_path, monkeypatch):
    """A program rendered for the GPU keeps the CUDA C++ it launches as its own file (kernels/<alias>.cu, the same text
    the module embeds), and the report lists it with the re-laid weights and their bytes."""
    from tilec.models import build_model
    from tilec.report import render_markdown

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build_model("tiny", moe_intermediate_size=64)  # H = I = 64: the CUDA kernels' chunks fit
    cm = tilec.compile(model, target="triton", options=tilec.Options(mxfp4=True))
    cuda = [k for k in cm.program.kernels if k.cuda_source is not None]
    assert len(cuda) == 1 and cuda[0].cuda_filename == f"kernels/{cuda[0].alias}.cu"
    assert "mma.sync.aligned.m16n8k16" in cuda[0].cuda_source and cuda[0].cuda_source.strip() in cuda[0].source
    listed = next(k for k in cm.report["kernels"] if k["file"] == cuda[0].filename)
    assert listed["cuda"] == cuda[0].cuda_filename
    derived = cm.report["derived_weights"]
    layers = sum(1 for n in cm.graph.graph.nodes if "mxfp4_moe_experts" in str(n.target))
    assert len(derived) == 4 * layers
    blocks = [d for d in derived.values() if d["layout"] == "mma_words"]
    assert all(d["bytes"] == 64 * 64 // 2 * 8 for d in blocks)  # [E=8, H=64, I/2=32] uint8 per layer
    assert "## Kernels" in render_markdown(cm.report) and "re-laid" in render_markdown(cm.report)
    cm.save(tmp_path / "a")
    assert (tmp_path / "a" / cuda[0].cuda_filename).read_text() == cuda[0].cuda_source
