"""The MoE Triton kernels (templates/triton/moe_router.py.j2, moe_experts.py.j2) against the reference ops.

CPU: the kernels run in Triton's interpreter, fp32, small drawn shapes. `gpu`: bf16 on CUDA at `mini` expert shapes
(E=128, H=2048, I=768, top-8), every GPU-only variant (inline-PTX dequantisation, tl.dot_scaled, programmatic
dependent launch) included.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is loaded

import pytest  # noqa: E402
import triton  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import tilec  # noqa: E402
from tilec import mxfp4, ops  # noqa: E402
from tilec.codegen.plans_moe import FOLD_LIMIT, experts_context, router_context  # noqa: E402
from tilec.codegen.render import load_source, render  # noqa: E402
from tilec.codegen.tuning import DeviceInfo  # noqa: E402

FAST = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CPU = DeviceInfo(interpret=True, sms=1)
MINI = {"E": 128, "H": 2048, "I": 768, "k": 8}


def load(template: str, ctx: dict, interpret: bool):
    """Render and import a kernel module; Triton picks interpreter or compiler when the module is imported."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return load_source(render(template, ctx={**ctx, "nodes": ["test"]}), template.split("/")[-1].split(".")[0])
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def experts_module(fmt: str, h: int, i: int, e: int, dev: DeviceInfo = CPU, split_k: int = 1,
                   down_block_k: int | None = None, **overrides):
    """The experts kernels for weights in ``fmt``; ``split_k`` > 1 splits gate_up's reduction over H (32-wide steps);
    ``down_block_k`` sets the down projection's step along I."""
    ctx = experts_context(fmt, h, i, e, dev, **overrides)
    if down_block_k:
        ctx["down"] = {**ctx["down"], **{path: {**ctx["down"][path], "BLOCK_K": down_block_k}
                                         for path in ("gemv", "gemm")}}
    if split_k > 1:
        ctx["gate_up"] = {**ctx["gate_up"], **{path: {**ctx["gate_up"][path], "SPLIT_K": split_k,
                                                      "SPLIT_K_ONE_ROW": split_k, "BLOCK_K": 32}
                                               for path in ("gemv", "gemm")}}
    return load("triton/moe_experts.py.j2", ctx, dev.interpret)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def routing(rows: int, k: int, experts: int, same: bool, g: torch.Generator):
    """(weights [1, rows, k], ids [1, rows, k]): distinct ids per row; with `same` every row picks the same."""
    first = torch.randperm(experts, generator=g)[:k]
    ids = torch.stack([first if same else torch.randperm(experts, generator=g)[:k] for _ in range(rows)])
    w = torch.rand(rows, k, generator=g) + 0.05
    return (w / w.sum(-1, keepdim=True)).view(1, rows, k), ids.view(1, rows, k)


def run_experts(fmt, mod, x, w, ids, gate_up, down):
    """(kernel output, reference output) for dense weights, quantising them first for MXFP4."""
    if fmt == "dense":
        return mod.launch(x, w, ids, gate_up, down), ops.moe_experts(x, w, ids, gate_up, down)
    q1, q2 = mxfp4.quantize(gate_up), mxfp4.quantize(down)
    args = (q1.blocks, q1.scales, q2.blocks, q2.scales)
    return mod.launch(x, w, ids, *args), ops.mxfp4_moe_experts(x, w, ids, *args)


# ---------------------------------------------------------------------------------------------------------- router
def ties_sorted(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``ids`` with each run of exactly equal ``weights`` (the reference's) in a row put in ascending order. Where two
    experts' fp32 scores are equal (a sigmoid saturated at 1 - 2^-24 ... for logits near 14), their order is
    torch.topk's, which is not defined; the kernel takes the lower id first."""
    out = ids.clone()
    flat_w, flat_i = weights.reshape(-1, weights.shape[-1]), out.view(-1, ids.shape[-1])
    for r in range(flat_w.shape[0]):
        j = 0
        while j < flat_w.shape[1]:
            e = j
            while e + 1 < flat_w.shape[1] and flat_w[r, e + 1] == flat_w[r, j]:
                e += 1
            flat_i[r, j:e + 1] = flat_i[r, j:e + 1].sort().values
            j = e + 1
    return out


def test_ties_sorted_orders_only_equal_weights():
    ids = torch.tensor([[[21, 9, 7, 3]]])
    assert ties_sorted(ids, torch.tensor([[[0.9, 0.9, 0.5, 0.4]]])).tolist() == [[[9, 21, 7, 3]]]
    assert ties_sorted(ids, torch.tensor([[[0.9, 0.8, 0.5, 0.4]]])).tolist() == [[[21, 9, 7, 3]]]


@FAST
@given(rows=st.sampled_from([1, 2, 5, 17, 40]), group_size=st.sampled_from([2, 4, 8]),
       n_group=st.sampled_from([1, 2, 4]), data=st.data(), bias=st.booleans(), norm=st.booleans(),
       seed=st.integers(0, 999))
def test_router(rows, group_size, n_group, data, bias, norm, seed):
    """Up to ROW_TILE rows the scores are GEMVs, past it (a prefill) fp32 tiles; both against the reference."""
    g = torch.Generator().manual_seed(seed)
    experts, hidden = group_size * n_group, 24
    topk_group = data.draw(st.integers(1, n_group))
    top_k = data.draw(st.integers(1, topk_group * group_size if n_group > 1 else min(experts, 8)))
    x, weight = torch.randn(1, rows, hidden, generator=g), torch.randn(experts, hidden, generator=g)
    correction = 0.1 * torch.randn(experts, generator=g) if bias else None
    mod = load("triton/moe_router.py.j2", router_context(experts, hidden, CPU), True)
    args = (correction, top_k, n_group, topk_group, norm, 2.5)
    (gw, gi), (rw, ri) = mod.launch(x, weight, *args), ops.moe_router(x, weight, *args)
    assert gi.dtype == torch.int64 and gw.dtype == torch.float32 and gi.shape == ri.shape
    assert torch.equal(ties_sorted(gi, rw), ties_sorted(ri, rw))
    assert torch.allclose(gw, rw, rtol=1e-6, atol=1e-6)


def test_router_takes_the_lower_id_first_on_a_tie():
    """The case hypothesis found (CI, 2026-11-25): two experts' logits 14.05 and 14.04 give the same fp32 sigmoid;
    the kernel puts the lower id first, torch.topk the other; the same experts and weights either way."""
    g = torch.Generator().manual_seed(31)
    x, weight = torch.randn(1, 5, 24, generator=g), torch.randn(32, 24, generator=g)
    mod = load("triton/moe_router.py.j2", router_context(32, 24, CPU), True)
    args = (None, 6, 4, 4, False, 2.5)
    (gw, gi), (rw, ri) = mod.launch(x, weight, *args), ops.moe_router(x, weight, *args)
    assert gi[0, 1, :2].tolist() == [9, 21] and rw[0, 1, 0] == rw[0, 1, 1]
    assert torch.equal(ties_sorted(gi, rw), ties_sorted(ri, rw)) and torch.allclose(gw, rw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rows,n_group,topk_group", [(17, 1, 1), (70, 4, 2)])
def test_router_prefill_rows(rows, n_group, topk_group):
    """A prefill's rows (past ROW_TILE): the scores as fp32 tiles, the choice and weights as the reference's."""
    g = torch.Generator().manual_seed(rows)
    experts, hidden = 32, 80
    x, weight = torch.randn(1, rows, hidden, generator=g), torch.randn(experts, hidden, generator=g)
    mod = load("triton/moe_router.py.j2", router_context(experts, hidden, CPU), True)
    assert rows > mod.ROWS_GEMV
    args = (0.1 * torch.randn(experts, generator=g), 6, n_group, topk_group, True, 2.5)
    (gw, gi), (rw, ri) = mod.launch(x, weight, *args), ops.moe_router(x, weight, *args)
    assert torch.equal(gi, ri)
    assert torch.allclose(gw, rw, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------------------- experts
@FAST
@given(fmt=st.sampled_from(["dense", "mxfp4"]), rows=st.sampled_from([1, 2, 8]), k=st.integers(1, 8),
       extra=st.integers(0, 6), same=st.booleans(), hidden=st.sampled_from([32, 64, 96]),
       inter=st.sampled_from([32, 64]), split=st.sampled_from([1, 2]), preload=st.booleans(), seed=st.integers(0, 999))
def test_experts_decode(fmt, rows, k, extra, same, hidden, inter, split, preload, seed):
    """Decode sizes (rows * k <= 64): one slot per distinct expert; few experts, so rows share them. ``split``
    splits gate_up's reduction (where H allows); ``preload`` has the down projection load its first slot's weights whole before the slot loop (in 32-wide
    steps, so several)."""
    g = torch.Generator().manual_seed(seed)
    experts = k + extra
    w, ids = routing(rows, k, experts, same, g)
    x = torch.randn(1, rows, hidden, generator=g)
    gate_up, down = 0.2 * torch.randn(experts, 2 * inter, hidden, generator=g), \
        0.2 * torch.randn(experts, hidden, inter, generator=g)
    split = split if hidden % 64 == 0 else 1
    mod = experts_module(fmt, hidden, inter, experts, split_k=split, down_preload=preload,
                         down_block_k=32 if preload else None)
    got, ref = run_experts(fmt, mod, x, w, ids, gate_up, down)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("fmt", ["dense", "mxfp4"])
def test_experts_prefill(fmt):
    """rows * k > 64: the pairs sorted by expert, tiles of 16 pairs, rows in chunks (32 pairs a chunk here, so three
    chunks)."""
    g = torch.Generator().manual_seed(1)
    rows, k, experts, hidden, inter = 40, 2, 5, 32, 32
    w, ids = routing(rows, k, experts, False, g)
    ids[0, 3] = ids[0, 0]  # rows that repeat another row's choice
    x = torch.randn(2, rows // 2, hidden, generator=g)
    gate_up, down = torch.randn(experts, 2 * inter, hidden, generator=g), torch.randn(experts, hidden, inter, generator=g)
    ctx = experts_context(fmt, hidden, inter, experts, CPU)
    mod = experts_module(fmt, hidden, inter, experts, prefill={**ctx["prefill"], "pairs": 32})
    got, ref = run_experts(fmt, mod, x, w.view(2, rows // 2, k), ids.view(2, rows // 2, k), gate_up, down)
    assert got.shape == x.shape
    assert rel(got, ref) < 1e-5


@FAST
@given(fmt=st.sampled_from(["dense", "mxfp4"]), k=st.integers(1, 8), experts_extra=st.integers(0, 9),
       rows=st.integers(65, 90), hidden=st.sampled_from([32, 64, 96]), inter=st.sampled_from([32, 64]),
       chunk=st.sampled_from([64, 200, 16384]), skew=st.booleans(), seed=st.integers(0, 999))
def test_experts_prefill_drawn(fmt, k, experts_extra, rows, hidden, inter, chunk, skew, seed):
    """Prefill sizes against the reference: drawn top-k, expert counts, shapes and chunks (``chunk`` pairs at
    most); with ``skew`` most pairs go to one expert, so segments span many tiles and others stay empty."""
    g = torch.Generator().manual_seed(seed)
    experts = k + experts_extra
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(rows)])
    if skew:
        ids[: rows * 3 // 4, 0] = 0
        ids[: rows * 3 // 4, 1:] = torch.stack([torch.randperm(experts - 1, generator=g)[: k - 1] + 1
                                                for _ in range(rows * 3 // 4)])
    w = torch.rand(rows, k, generator=g) + 0.05
    x = torch.randn(1, rows, hidden, generator=g)
    gate_up, down = 0.2 * torch.randn(experts, 2 * inter, hidden, generator=g), \
        0.2 * torch.randn(experts, hidden, inter, generator=g)
    ctx = experts_context(fmt, hidden, inter, experts, CPU)
    mod = experts_module(fmt, hidden, inter, experts, prefill={**ctx["prefill"], "pairs": chunk})
    got, ref = run_experts(fmt, mod, x, w.view(1, rows, k), ids.view(1, rows, k), gate_up, down)
    assert rel(got, ref) < 1e-5


@FAST
@given(pairs=st.integers(1, 300), experts=st.integers(1, 40), block_m=st.sampled_from([1, 4, 16]),
       seed=st.integers(0, 999))
def test_prefill_sort(pairs, experts, block_m, seed):
    """expert_counts_kernel and expert_sort_kernel against a plain sort: the tiles hold each expert's pairs in pair
    order, padded with -1 to whole tiles, experts in order; the tiles past the last segment are -1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, experts, (pairs,), generator=g)
    mod = experts_module("dense", 32, 32, experts)
    tiles = pairs // block_m + min(experts, pairs)
    counts = torch.empty(experts, dtype=torch.int32)
    block_e = 2 if seed % 2 else 16
    mod.expert_counts_kernel[(triton.cdiv(experts, block_e),)](ids, counts, pairs, BLOCK_E=block_e, BLOCK=64)
    assert counts.tolist() == torch.bincount(ids, minlength=experts).tolist()
    order = torch.full((tiles * block_m,), -7, dtype=torch.int32)
    tile_expert = torch.full((tiles,), -7, dtype=torch.int32)
    mod.expert_sort_kernel[(experts,)](ids, counts, order, tile_expert, pairs, tiles, BLOCK_M=block_m,
                                       BLOCK_ALL=mod._pow2(experts), BLOCK=64)
    want_order, want_tiles = [], []
    for e in range(experts):
        mine = [p for p in range(pairs) if int(ids[p]) == e]
        n_tiles = -(-len(mine) // block_m)
        want_order += mine + [-1] * (n_tiles * block_m - len(mine))
        want_tiles += [e] * n_tiles
    assert tile_expert.tolist() == want_tiles + [-1] * (tiles - len(want_tiles))
    assert order[: len(want_order)].tolist() == want_order


def test_outgrown_counters_stay_alive():
    """The kernels' tile counters grow where a call needs more (a large split-K decode); the buffer they outgrow
    stays allocated, because a CUDA graph captured before (decode steps) still holds its address: freed, the
    allocator could give that memory to another tensor, which every replay would then overwrite."""
    import gc
    import weakref

    mod = experts_module("mxfp4", 32, 32, 4)
    device = torch.device("cpu")
    first = mod._counters(device, 16)
    assert mod._counters(device, 16) is first  # reused while it is large enough
    alive = weakref.ref(first)
    del first
    grown = mod._counters(device, 10 * 4096)
    gc.collect()
    assert grown.numel() >= 10 * 4096 and alive() is not None


@pytest.mark.parametrize("fmt,split", [("dense", 1), ("mxfp4", 1), ("dense", 2), ("mxfp4", 4)])
def test_experts_repeated_choices(fmt, split):
    """Rows sharing experts, a row choosing one expert twice, and a zero router weight: each expert's weights are
    applied once per (row, choice), as the reference does; also with gate_up's reduction split in slices."""
    g = torch.Generator().manual_seed(2)
    hidden, inter, experts = 128, 32, 5
    ids = torch.tensor([[[3, 1, 3], [1, 4, 0], [0, 3, 1]]])
    w = torch.tensor([[[0.5, 0.25, 0.125], [1.0, 0.0, 2.0], [0.75, 1.5, 0.5]]])
    x = torch.randn(1, 3, hidden, generator=g)
    gate_up, down = torch.randn(experts, 2 * inter, hidden, generator=g), torch.randn(experts, hidden, inter, generator=g)
    mod = experts_module(fmt, hidden, inter, experts, split_k=split)
    got, ref = run_experts(fmt, mod, x, w, ids, gate_up, down)
    assert rel(got, ref) < 1e-5
    got2, _ = run_experts(fmt, mod, x, w, ids, gate_up, down)  # the split's counters were left ready
    assert torch.equal(got, got2)


# ------------------------------------------------------------------------------------------------ batch invariance
# DFlash verifies drafted tokens in one multi-row target step and takes the result for what 1-row decode steps would
# give: each row's output must be the same bits whatever other rows share the step, and however many (1 to 8).
def invariance_routing(k: int, experts: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [8, k], ids [8, k]) for 8 rows with what makes a kernel's sums depend on the step's other rows: rows
    sharing experts in different router orders, two rows with the same choice, a row choosing one expert twice, a row
    choosing an expert no other row chooses, and a zero router weight."""
    pool = torch.randperm(experts, generator=g)
    shared, own, others = pool[:k], pool[k], pool[k + 1:]
    ids = torch.empty(8, k, dtype=torch.int64)
    ids[0] = ids[2] = shared
    ids[1] = shared.flip(0)
    ids[3] = shared[torch.randperm(k, generator=g)]
    ids[3, -1] = ids[3, 0]
    ids[4] = shared
    ids[4, k // 2] = own
    ids[5] = torch.cat([others[torch.randperm(len(others), generator=g)[:k - k // 2]], shared[k // 2:]])
    for r in (6, 7):
        mixed = torch.cat([shared, others])
        ids[r] = mixed[torch.randperm(len(mixed), generator=g)[:k]]
    w = torch.rand(8, k, generator=g) + 0.05
    w[6, 1] = 0.0
    return w, ids


def invariance_calls(g: torch.Generator) -> list[list[int]]:
    """Rows of the steps to compare: all 8, and for M = 2..7 windows of a shuffled order (every row in a step of
    each size, at varying positions)."""
    calls = [list(range(8))]
    for m in range(2, 8):
        order = torch.randperm(8, generator=g).tolist()
        order += order[:-len(order) % m]
        calls += [order[i:i + m] for i in range(0, len(order), m)]
    return calls


def assert_batch_invariant(call, g: torch.Generator) -> None:
    """``call(rows)`` runs one step on those of the 8 rows and returns its outputs, each [len(rows), ...]: every row's
    outputs must equal, bit for bit, those of the step holding that row alone."""
    alone = [call([r]) for r in range(8)]
    for rows in invariance_calls(g):
        for got, want in zip(call(rows), zip(*alone)):
            for pos, r in enumerate(rows):
                assert torch.equal(got[pos], want[r][0]), f"row {r} at position {pos} of a {len(rows)}-row step {rows}"


def experts_step(fmt: str, mod, x, w, ids, weights):
    """A `call` for assert_batch_invariant: the experts kernels on rows of (x, w, ids) with weights (as launch takes
    them); also returns the reference of the full 8-row step."""
    def call(rows):
        return (mod.launch(x[rows][None], w[rows][None], ids[rows][None], *weights)[0],)
    ref = (ops.mxfp4_moe_experts if fmt == "mxfp4" else ops.moe_experts)(x[None], w[None], ids[None], *weights)[0]
    return call, ref


@pytest.mark.parametrize("fmt,split", [("dense", 2), ("mxfp4", 1)])
def test_experts_batch_invariant(fmt, split):
    """fp32 in the interpreter: a row's output is the same bits in steps of 1 to 8 rows, at any position."""
    g = torch.Generator().manual_seed(4)
    k, experts, hidden, inter = 4, 10, 64, 32
    w, ids = invariance_routing(k, experts, g)
    x = torch.randn(8, hidden, generator=g)
    gate_up, down = 0.2 * torch.randn(experts, 2 * inter, hidden, generator=g), \
        0.2 * torch.randn(experts, hidden, inter, generator=g)
    if fmt == "mxfp4":
        q1, q2 = mxfp4.quantize(gate_up), mxfp4.quantize(down)
        weights = (q1.blocks, q1.scales, q2.blocks, q2.scales)
    else:
        weights = (gate_up, down)
    call, ref = experts_step(fmt, experts_module(fmt, hidden, inter, experts, split_k=split), x, w, ids, weights)
    assert rel(call(list(range(8)))[0], ref) < 1e-5
    assert_batch_invariant(call, g)


@pytest.mark.parametrize("n_group,topk_group,bias", [(1, 1, False), (4, 2, True)])
def test_router_batch_invariant(n_group, topk_group, bias):
    g = torch.Generator().manual_seed(5)
    experts, hidden, top_k = 16, 48, 4
    x, weight = torch.randn(8, hidden, generator=g), torch.randn(experts, hidden, generator=g)
    correction = 0.1 * torch.randn(experts, generator=g) if bias else None
    mod = load("triton/moe_router.py.j2", router_context(experts, hidden, CPU), True)
    args = (correction, top_k, n_group, topk_group, True, 2.5)
    assert torch.equal(mod.launch(x, weight, *args)[1], ops.moe_router(x, weight, *args)[1])
    assert_batch_invariant(lambda rows: mod.launch(x[rows], weight, *args), g)


# --------------------------------------------------------------------------------------- MXFP4 dequantisation, exact
# A kernel calling the experts kernel's own `x_tile` and `step`: with X the identity, the product is W itself. It lives
# in a generated file beside the kernel module (Triton compiles only functions it can read from a file).
PROBE = """
import triton
import triton.language as tl
from {module} import step, x_tile


@triton.jit
def probe_kernel(w_ptr, s_ptr, x_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DEQUANT: tl.constexpr, PRECISION: tl.constexpr):
    n = tl.arange(0, BLOCK_N)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xa, xb = x_tile(x_ptr, m, m < K, k0, K, BLOCK_K, DEQUANT == "dot_scaled")
        acc = step(acc, w_ptr, s_ptr, n, n < N, xa, xb, k0, K, BLOCK_M, BLOCK_N, BLOCK_K, DEQUANT, PRECISION)
    tl.store(out_ptr + n[:, None] * K + m[None, :], acc, mask=(n < N)[:, None] & (m < K)[None, :])
"""


def probe(dev: DeviceInfo, dequant: str, **overrides):
    """The probe kernel over an MXFP4 experts module rendered for ``dev``."""
    mod = experts_module("mxfp4", 64, 32, 2, dev, dequant=dequant, **overrides)
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if dev.interpret else "0"
    try:
        return load_source(PROBE.format(module=mod.__name__), "moe_probe").probe_kernel
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def mismatches(got: torch.Tensor, want: torch.Tensor, q: mxfp4.MXFP4Tensor) -> str:
    """The first few elements that differ, with their E2M1 code and scale code."""
    bad = (got != want).nonzero().tolist()
    out = []
    for n, k in bad[:8]:
        byte = int(q.blocks[n, k // 2])
        code = byte & 15 if k % 2 == 0 else byte >> 4
        out.append(f"[{n},{k}] got {got[n, k].item()!r} want {want[n, k].item()!r} (code {code}, "
                   f"scale {int(q.scales[n, k // 32])})")
    return f"{len(bad)} elements differ: " + "; ".join(out)


def exactness_case(device, max_scale: int = 255) -> tuple[mxfp4.MXFP4Tensor, torch.Tensor]:
    """Every E2M1 code in every byte position, under scale codes from the bottom (0: 2^-127, a subnormal) to the
    top (252; 253/254 overflow fp32 for the larger elements, 255 is NaN), or to ``max_scale`` (larger codes are
    replaced by codes from max_scale down)."""
    n, k = 8, 64
    codes = torch.arange(n * k // 2) * 7 % 256
    scales = torch.tensor([0, 1, 2, 100, 127, 128, 200, 252, 120, 110, 130, 140, 90, 60, 30, 3])
    scales = torch.where(scales > max_scale, max_scale - scales % 7, scales)
    q = mxfp4.MXFP4Tensor(codes.to(torch.uint8).view(n, k // 2).to(device),
                          scales.to(torch.uint8).view(n, k // 32).to(device), (n, k))
    return q, mxfp4.dequantize(q, torch.float32)


@pytest.mark.parametrize("block_m", [1, 16])
def test_mxfp4_dequant_exact(block_m):
    """The pure-tl dequantisation equals tilec.mxfp4.dequantize bit for bit (one-row and tensor-core paths)."""
    probe_kernel = probe(CPU, "tl")
    q, want = exactness_case("cpu")
    x = torch.eye(64)
    out = torch.full((8, 64), float("nan"))
    probe_kernel[(triton.cdiv(64, block_m),)](q.blocks, q.scales, x, out, N=8, K=64, BLOCK_M=block_m, BLOCK_N=16,
                                              BLOCK_K=64, DEQUANT="tl", PRECISION="ieee")
    assert torch.equal(out, want)


# ------------------------------------------------------------------------------------------ through the lowering
def moe_graph(hidden: int, inter: int, experts: int, k: int, n_group: int = 1, seed: int = 3):
    """A captured graph of embedding, router and MXFP4 experts (weights ``gub``, ``gus``, ``db``, ``ds``): x comes
    from the graph's input, so capture cannot fold the MoE ops into a constant."""
    g = torch.Generator().manual_seed(seed)
    q1 = mxfp4.quantize(torch.randn(experts, 2 * inter, hidden, generator=g))
    q2 = mxfp4.quantize(torch.randn(experts, hidden, inter, generator=g))

    class Moe(torch.nn.Module):
        def forward(self, input_ids):
            x = ops.embedding(input_ids, self.table)
            w, ids = ops.moe_router(x, self.router, self.bias, k, n_group, 1, True, 1.5)
            return ops.mxfp4_moe_experts(x, w, ids, self.gub, self.gus, self.db, self.ds)

    mod = Moe()
    for name, t in (("table", torch.randn(10, hidden, generator=g)),
                    ("router", torch.randn(experts, hidden, generator=g)),
                    ("bias", 0.1 * torch.randn(experts, generator=g)), ("gub", q1.blocks), ("gus", q1.scales),
                    ("db", q2.blocks), ("ds", q2.scales)):
        mod.register_buffer(name, t)
    return tilec.capture(mod)


def test_lowered_router_and_experts():
    """The planners (tilec/codegen/plans_moe.py) and the kernels' launch signatures, through tilec's Triton lowering
    of a captured graph (x comes from the graph's input, so capture cannot fold the MoE ops into a constant)."""
    from tilec.codegen.triton import lower

    gm = moe_graph(hidden=32, inter=32, experts=6, k=3, n_group=2)
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        program = lower(gm, torch.device("cpu"), "test")
        ids = torch.tensor([[1, 7, 7]])
        got, ref = program(ids), gm(ids)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    assert {k.plan.template for k in program.kernels} >= {"triton/moe_router.py.j2", "triton/moe_experts.py.j2"}
    assert rel(got, ref) < 1e-5


def test_scale_fold_planned_from_the_weights():
    """The GPU plan folds the dequantisation's 2^126 into the block scale only when every scale code of the layer's
    weights is at most FOLD_LIMIT (2^(code - 1) a bf16); one larger code, or weights not at hand (meta), and it
    keeps the two multiplies."""
    import json

    from tilec.codegen.plan import PLANNERS

    g = torch.Generator().manual_seed(4)
    q1 = mxfp4.quantize(torch.randn(4, 64, 64, generator=g))
    q2 = mxfp4.quantize(torch.randn(4, 64, 32, generator=g))

    class Experts(torch.nn.Module):
        def forward(self, input_ids):
            x = ops.embedding(input_ids, self.table)
            w, ids = ops.moe_router(x, self.router, None, 2, 1, 1, True, 1.0)
            return ops.mxfp4_moe_experts(x, w, ids, self.gub, self.gus, self.db, self.ds)

    def planned(gus, ds) -> bool:
        mod = Experts()
        for name, t in (("table", torch.randn(10, 64, generator=g)), ("router", torch.randn(4, 64, generator=g)),
                        ("gub", q1.blocks), ("gus", gus), ("db", q2.blocks), ("ds", ds)):
            mod.register_buffer(name, t)
        gm = tilec.capture(mod)
        node = next(n for n in gm.graph.nodes if n.op == "call_function" and "mxfp4_moe_experts" in str(n.target))
        ctx = json.loads(PLANNERS["mxfp4_moe_experts"](node, DeviceInfo(interpret=False, sms=132)).context)
        assert ctx["dequant"] == "asm"
        return ctx["scale_fold"]

    assert int(q1.scales.max()) <= FOLD_LIMIT and int(q2.scales.max()) <= FOLD_LIMIT
    assert planned(q1.scales, q2.scales)
    big = q2.scales.clone()
    big[3, 7, 0] = FOLD_LIMIT + 1
    assert not planned(q1.scales, big)
    assert not planned(q1.scales.to("meta"), q2.scales.to("meta"))
    # the interpreter's pure-tl dequantisation has no such variant
    assert not experts_context("mxfp4", 64, 32, 4, CPU)["scale_fold"]


# ------------------------------------------------------------------------------------------------------------- GPU
def gpu_device() -> DeviceInfo:
    return DeviceInfo(interpret=False, sms=torch.cuda.get_device_properties(0).multi_processor_count)


GPU_VARIANTS = [{}, {"dequant": "asm"}, {"dequant": "dot_scaled"}, {"dequant": "asm", "pdl": True},
                {"dequant": "asm", "one_row": "gemv"}, {"one_row": "gemv"}, {"down_preload": True},
                {"down_preload": True, "scale_fold": True}]


def gpu_overrides(fmt: str, variant: dict) -> dict:
    """Context overrides for a GPU variant; "one_row" picks the CUDA-core ("gemv": a timing variant, not
    batch-invariant) or tensor-core ("dot") path for a single row."""
    base = experts_context(fmt, MINI["H"], MINI["I"], MINI["E"], gpu_device())
    out = {key: v for key, v in variant.items() if key != "one_row"}
    if "one_row" in variant:
        for kernel in ("gate_up", "down"):
            out[kernel] = {**base[kernel], "one_row_gemv": variant["one_row"] == "gemv"}
    return out


@pytest.fixture(scope="module")
def mini_weights():
    g = torch.Generator(device="cuda").manual_seed(0)
    e, h, i = MINI["E"], MINI["H"], MINI["I"]
    dense = ((0.02 * torch.randn(e, 2 * i, h, device="cuda", generator=g)).bfloat16(),
             (0.02 * torch.randn(e, h, i, device="cuda", generator=g)).bfloat16())
    mx = (torch.randint(0, 256, (e, 2 * i, h // 2), dtype=torch.uint8, device="cuda", generator=g),
          torch.randint(118, 125, (e, 2 * i, h // 32), dtype=torch.uint8, device="cuda", generator=g),
          torch.randint(0, 256, (e, h, i // 2), dtype=torch.uint8, device="cuda", generator=g),
          torch.randint(118, 125, (e, h, i // 32), dtype=torch.uint8, device="cuda", generator=g))
    return {"dense": dense, "mxfp4": mx}


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,variant", [("dense", {}), ("dense", {"one_row": "gemv"}), ("dense", {"pdl": True})]
                         + [("mxfp4", v) for v in GPU_VARIANTS])
def test_gpu_experts_mini(fmt, variant, mini_weights):
    """bf16 activations at mini expert shapes, 1 to 8 rows (same and random routing) and a prefill, against the
    reference op: within bf16 rounding (each side rounds gate, up, act and every expert's output to bf16)."""
    mod = experts_module(fmt, MINI["H"], MINI["I"], MINI["E"], gpu_device(), **gpu_overrides(fmt, variant))
    ref_op = ops.mxfp4_moe_experts if fmt == "mxfp4" else ops.moe_experts
    g = torch.Generator().manual_seed(0)
    for rows, same in ((1, True), (2, False), (4, True), (8, True), (8, False), (24, False)):
        w, ids = routing(rows, MINI["k"], MINI["E"], same, g)
        x = torch.randn(1, rows, MINI["H"], generator=g).bfloat16().cuda()
        w, ids = w.cuda(), ids.cuda()
        out = torch.full_like(x, float("nan"))
        out.copy_(mod.launch(x, w, ids, *mini_weights[fmt]))
        ref = ref_op(x, w, ids, *mini_weights[fmt])
        assert torch.isfinite(out).all()
        assert rel(out, ref) < 1e-2, (rows, same, rel(out, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("dequant,block_m", [("tl", 1), ("tl", 16), ("asm", 1), ("asm", 16), ("dot_scaled", 16),
                                             ("asm_fold", 16)])
def test_gpu_mxfp4_dequant_exact(dequant, block_m):
    """Every dequantisation path on the GPU equals tilec.mxfp4.dequantize exactly (bf16 one-hot X, fp32 sums);
    "asm_fold" (the asm path with 2^126 folded into the scale) on the scale codes it is planned for (<= 128)."""
    fold = dequant == "asm_fold"
    dequant = "asm" if fold else dequant
    probe_kernel = probe(gpu_device(), dequant, scale_fold=fold)
    q, want = exactness_case("cuda", max_scale=FOLD_LIMIT if fold else 255)
    x = torch.eye(64, device="cuda", dtype=torch.bfloat16)
    out = torch.full((8, 64), float("nan"), device="cuda")
    probe_kernel[(triton.cdiv(64, block_m),)](q.blocks, q.scales, x, out, N=8, K=64, BLOCK_M=block_m, BLOCK_N=16,
                                              BLOCK_K=64, DEQUANT=dequant, PRECISION="tf32")
    out, want = out.cpu(), want.cpu()
    if dequant == "dot_scaled":
        # Triton's dot_scaled flushes blocks with scale code 0 (2^-127, values below 1e-37) to zero: documented in
        # the planner; every other block is exact.
        tiny = q.scales.cpu().repeat_interleave(32, dim=1) == 0
        assert not out[tiny].any()
        out, want = out[~tiny], want[~tiny]
    # bf16 holds every MXFP4 value whose fp32 value is a normal or subnormal above 2^-133: all of these.
    assert torch.equal(out, want), mismatches(out, want, q) if out.dim() == 2 else "mismatch"


@pytest.mark.gpu
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (8, 4)])
def test_gpu_router_mini(n_group, topk_group):
    """8 rows (GEMVs) and a prefill's 300 (tensor-core tiles), with an fp32 router weight (fp32 products) and a bf16
    one (bf16 operands: exact products), against the reference's fp32 scores."""
    g = torch.Generator().manual_seed(0)
    mod = load("triton/moe_router.py.j2", router_context(MINI["E"], MINI["H"], gpu_device()), False)
    bias = (0.01 * torch.randn(MINI["E"], generator=g)).cuda()
    args = (bias, MINI["k"], n_group, topk_group, True, 2.5)
    for rows, dtype in ((8, torch.float32), (300, torch.float32), (300, torch.bfloat16)):
        x = torch.randn(1, rows, MINI["H"], generator=g).bfloat16().cuda()
        weight = (0.02 * torch.randn(MINI["E"], MINI["H"], generator=g)).to(dtype).cuda()
        (gw, gi), (rw, ri) = mod.launch(x, weight, *args), ops.moe_router(x, weight, *args)
        # Sums in another order may swap choices whose scores tie to within rounding: rows whose k-th and next
        # best choice scores (the reference's) are that close may differ, no other row.
        choice = torch.sigmoid(x.float() @ weight.float().T) + bias
        clear = torch.ones(choice.shape[:-1], dtype=torch.bool, device=choice.device)
        if n_group > 1:  # the groups' choice too: their scores (the sum of their two best) as clearly apart
            grouped = choice.view(*choice.shape[:-1], n_group, -1)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group + 1, dim=-1)
            clear &= (best.values[..., -2] - best.values[..., -1]) > 1e-5
            kept = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter(-1, best.indices[..., :-1], True)
            choice = grouped.masked_fill(~kept[..., None], float("-inf")).view(choice.shape)
        top = choice.topk(MINI["k"] + 1, dim=-1).values
        clear &= (top[..., -2] - top[..., -1]) > 1e-5
        assert clear.float().mean() > 0.9
        assert torch.equal(gi[clear], ri[clear]), (rows, dtype)
        assert torch.allclose(gw[clear], rw[clear], rtol=1e-5, atol=1e-6), (rows, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,variant", [("dense", {}), ("dense", {"pdl": True}), ("mxfp4", {}),
                                         ("mxfp4", {"dequant": "tl"}), ("mxfp4", {"dequant": "dot_scaled"}),
                                         ("mxfp4", {"down_preload": True, "pdl": True})])
def test_gpu_experts_batch_invariant(fmt, variant, mini_weights):
    """bf16 at mini expert shapes, the planner's kernels (and other dequantisations): a row's output is the same bits
    in steps of 1 to 8 rows, at any position (what DFlash's verify step needs to equal decoding)."""
    g = torch.Generator().manual_seed(6)
    w, ids = invariance_routing(MINI["k"], MINI["E"], g)
    x = torch.randn(8, MINI["H"], generator=g).bfloat16().cuda()
    mod = experts_module(fmt, MINI["H"], MINI["I"], MINI["E"], gpu_device(), **variant)
    call, ref = experts_step(fmt, mod, x, w.cuda(), ids.cuda(), mini_weights[fmt])
    assert rel(call(list(range(8)))[0], ref) < 1e-2
    assert_batch_invariant(call, g)


@pytest.mark.gpu
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (8, 4)])
def test_gpu_router_batch_invariant(n_group, topk_group):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, MINI["H"], generator=g).bfloat16().cuda()
    weight = (0.02 * torch.randn(MINI["E"], MINI["H"], generator=g)).cuda()
    bias = (0.01 * torch.randn(MINI["E"], generator=g)).cuda()
    mod = load("triton/moe_router.py.j2", router_context(MINI["E"], MINI["H"], gpu_device()), False)
    args = (bias, MINI["k"], n_group, topk_group, True, 2.5)
    assert_batch_invariant(lambda rows: mod.launch(x[rows], weight, *args), g)
