"""Planners for the MoE ops: the router (scores GEMV + per-row top-k) and the experts (dense or MXFP4 weights).

Decode sizes are what matter here (1 to 8 rows, top-8 of 128..384 experts): the experts kernels read each chosen
expert's weights once for all rows, so their blocks are picked for one row. The context names every choice the
template makes, including the GPU-only variants timed by benchmarks/bench_mxfp4_experts.py --sweep: ``dequant``
("tl": pure Triton, runs in the interpreter; "asm": inline-PTX nibble->bf16 conversion; "dot_scaled": Triton's MXFP4
matmul; it flushes blocks with scale code 0, 2^-127, to zero) and ``pdl`` (programmatic dependent launch of the down
projection). The GPU variants apply to bf16 activations; others fall back to "tl". ``scale_fold`` (asm only)
multiplies each element once, by 2^126 times its block scale, instead of twice: the planner sets it when the
weights' scale codes allow it (`scale_fold_exact`). ``down_preload`` (with PDL) has each down program load its first
slot's weights before waiting for gate_up, so the two kernels' reads overlap. ``cuda`` (MXFP4 on Hopper, bf16
activations): decode runs on the CUDA kernels of templates/cuda/moe_experts_mxfp4.cu.j2 instead, reading the experts
re-laid as mma fragments (``derived_weights``: tilec/codegen/mma_layout.py); prefill stays on the Triton kernels.

Batch invariance: a decode row's output is the same bits in a step of 1 to BLOCK_M (8) rows (DFlash verifies drafted
tokens in one multi-row step and compares it with 1-row decode steps), so every such step gets one configuration: the
tensor cores with the same tiles and one split-K for every row count. Two keys are timing variants that give one row a
path of its own and so break it: ``one_row_gemv`` (one row on the CUDA cores) and the gemm's ``SPLIT_K_ONE_ROW``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from tilec.codegen import mma_layout
from tilec.codegen.plan import KernelPlan, planner, val
from tilec.codegen.tuning import ROW_TILE, DeviceInfo, clamp, pow2_ceil, pow2_floor
from tilec.graph import attr
from tilec.ops.moe import GATHER_LIMIT

# (row, choice) pairs per prefill chunk: bounds the experts' buffers (each pair's act [I] and output [H]).
PREFILL_PAIRS = 16384


@planner("moe_router")
def _moe_router(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    experts, hidden = val(node.args[1]).shape
    return KernelPlan.make("triton/moe_router.py.j2", **router_context(experts, hidden, dev))


def router_context(experts: int, hidden: int, dev: DeviceInfo) -> dict:
    """The router template's context. On the GPU a program per expert row (up to 511 experts) reading H in blocks of
    up to 1024, and the top-k in one warp (its reductions need no shared memory). H100, 2026-11-24
    (benchmarks/bench_dense_tiles.py --sweep --ops router, mini: 128 experts, H 2048, results/h100-2026-11-24/
    run13_router, each call with a small extra kernel in every variant): both kernels 7.1 / 7.4 us a call at 1 / 8
    rows against 9.0 / 9.0 with 4 experts a program, blocks of 512 and 4 warps for the top-k; the top-k in one warp
    alone 7.4 / 8.5. Without the extra kernel (run15_router_clean): 4.9 / 5.1 us; 2 experts a program 6.4 / 6.5,
    blocks of 2048 5.0 / 5.5, of 256 9.1 / 9.1, the top-k in 2 warps 6.1 / 7.0, the scores in 1 or 2 warps 5.6 to
    5.8. Tried and not kept (`5679818`, run16_router_fused): one launch, the row's last program to store its scores
    (an acquire-release counter) taking the top-k: 5.2 / 5.8 us at best (1 warp), 6.8 / 8.1 with 4."""
    if dev.interpret:
        block_e, block_k = clamp(pow2_ceil(experts), 16, 64), clamp(pow2_ceil(hidden), 16, 256)
    else:
        block_e, block_k = clamp(pow2_floor(experts // 256), 1, 16), clamp(pow2_ceil(hidden), 16, 1024)
    # Past ROW_TILE rows (a prefill), the scores as tensor-core tiles: 4096 rows took 0.64 ms a call as GEMVs and
    # 0.55 as tiles of fp32 products on the CUDA cores (H100, 2026-11-24, bench_prefill.py --profile,
    # results/h100-2026-11-24e/run2_prefill_profile, run5_prefill_profile).
    tile = {"BLOCK_M": 16 if dev.interpret else 64, "BLOCK_N": clamp(pow2_ceil(experts), 16, 64),
            "BLOCK_K": 32 if dev.interpret else 64, "num_warps": 4}
    return {"doc": "MoE router: fp32 sigmoid scores GEMV, then per-row (grouped) top-k and renormalisation",
            "E": experts, "H": hidden, "BLOCK_E": block_e, "BLOCK_K": block_k, "BLOCK_ALL": pow2_ceil(experts),
            "num_warps": 4, "topk_warps": 4 if dev.interpret else 1, "rows_gemv": ROW_TILE, "tile": tile,
            "interpret": dev.interpret}


@planner("moe_experts")
def _moe_experts(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    experts, two_i, hidden = val(node.args[3]).shape
    return KernelPlan.make("triton/moe_experts.py.j2", **experts_context("dense", hidden, two_i // 2, experts, dev))


@planner("mxfp4_moe_experts")
def _mxfp4_moe_experts(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    experts, two_i, half_h = val(node.args[3]).shape
    ctx = experts_context("mxfp4", 2 * half_h, two_i // 2, experts, dev)
    if ctx["dequant"] == "asm":
        scales = [attr(node.graph.owning_module, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None
                  for a in (node.args[4], node.args[6])]
        ctx["scale_fold"] = scale_fold_exact(scales)
    weights = node.args[3:7]
    if ctx["cuda"] and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in weights):
        # the CUDA decode kernels read the weights re-laid (mma_layout), derived once when the program loads
        ctx["derived_weights"] = [[3 + i, layout] for i, layout in enumerate(mma_layout.EXPERT_LAYOUTS)]
        ctx["cuda_template"] = "cuda/moe_experts_mxfp4.cu.j2"
    else:
        ctx["cuda"] = None
    return KernelPlan.make("triton/moe_experts.py.j2", **ctx)


# The largest E8M0 scale code (scale 2^(code - 127)) for which the asm dequantisation folds its 2^126 into the scale:
# 2^(code - 1) must be a bf16 (at most 2^127). Trained expert weights have block scales far below 2 (code 128).
FOLD_LIMIT = 128


def scale_fold_exact(scales) -> bool:
    """Whether ``scale_fold`` is exact for these E8M0 scale tensors: every code at most FOLD_LIMIT. False when one is
    not a tensor at hand (not a weight of the graph, or a meta tensor). The plan holds for the weights as they are
    when compiled: weights edited in place afterwards (scale codes above the limit) need a new compile."""
    for t in scales:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return False
        if t.numel() and int(t.max()) > FOLD_LIMIT:
            return False
    return True


def cuda_decode_context(hidden: int, inter: int, dev: DeviceInfo) -> dict | None:
    """The CUDA decode kernels' configuration (templates/cuda/moe_experts_mxfp4.cu.j2), or None where they do not
    apply: the interpreter, a GPU older than Hopper, no CUDA compiler (NVRTC or nvcc) here, or H or I not a multiple
    of 64 (the fragment layout's chunks). ``fused`` (fused_context) configures experts_kernel, both projections in one
    persistent kernel, which the experts module launches where every decode batch is at most 8 rows (top-k >= 8);
    otherwise gate_up_kernel and down_kernel run, configured by the rest.

    The two kernels against experts_kernel (sweep medians of the same run, mini shapes,
    benchmarks/results/h100-2026-11-23c): 14.0 against 15.4 us at one row, 18.5 against 17.1 at 8 rows on the same
    experts (1.32x one row against 1.11x), 77.0 against 70.4 at 8 independent rows. The planner takes experts_kernel:
    the verify steps of DFlash are 8 rows.

    Measured on the H100 (2026-11-23, benchmarks/bench_mxfp4_experts.py --sweep, mini shapes, medians of 3 rounds;
    benchmarks/results/h100-2026-11-23b): gate_up with 4 warps splitting H, 4 loads in flight per lane, 16 slot
    groups; down with its weights in registers, 16 warps, each slot's I split in two: one row 13.4 to 14.8 us, against
    18.8 to 19.0 for the Triton kernels. Tried, slower at one row, and removed: down's weights through shared memory
    (cp.async; 16.1 to 16.4 us, 15.5 to 15.8 with a shared-memory carveout on gate_up's launch so down's blocks
    could start beside it; faster at 8 rows, where experts_kernel is faster still), gate_up launched with PDL, all
    of gate_up's chunks in flight through cp.async, 2 warps a tile, and prefetching down's weights into L2."""
    from tilec.codegen.cuda_build import compiler_available

    if dev.interpret or dev.capability < (9, 0) or hidden % 64 or inter % 64 or not compiler_available():
        return None
    chunks = hidden // 64
    gu_warps = next(w for w in (4, 2, 1) if chunks % w == 0)
    cuda = {"gu_warps": gu_warps, "gu_depth": max(d for d in (1, 2, 4) if (chunks // gu_warps) % d == 0),
            "groups": 16, "fused": fused_context(hidden, inter, dev)}
    return with_down(cuda, inter)


# Bytes of experts_kernel's static shared memory besides its barriers: the slot table, the warps' sums of two units
# (per consumer warp) and the outputs of a tile's slots (templates/cuda/moe_experts_mxfp4.cu.j2; checked against
# ptxas by tests/test_cuda_experts.py).
F_SLOTS_BYTES = 4 * 64 * 4 + 4
F_PART_BYTES_PER_WARP = 2 * 4 * 32 * 4
F_Y_BYTES = 64 * 16 * 8 * 2


def fused_static_bytes(hidden: int, warps: int) -> int:
    """experts_kernel's static shared memory besides its ring's barriers, as the planner counts it: the slot table,
    the warps' sums, the tile's outputs, the by-slot lists (three ints a range of H, at most one range a tile of 16)
    and their count, and a 1 KB margin for what the compiler adds. tests/test_cuda_experts.py checks it against
    ptxas's count."""
    return F_SLOTS_BYTES + warps * F_PART_BYTES_PER_WARP + F_Y_BYTES + 12 * (hidden // 16) + 4 + 1024


def fused_context(hidden: int, inter: int, dev: DeviceInfo, warps: int | None = None, pdl: bool = True,
                  max_stages: int = 4, by_slot: int = 16, act_warp: bool | None = None, hold: int = 1) -> dict | None:
    """experts_kernel's configuration (both projections in one persistent kernel, the weights streamed into a ring
    of shared-memory stages by bulk copies), or None where it does not fit. The keys:

    - ``warps`` consumer warps split H's chunks of 64 in gate_up and each down slot's chunks of I: by default the
      most, up to 8, that divide H's chunks; more, up to 16, where a warp would hold more than 8 chunks of x or of I
      (they spill: 12 chunks of x at H = 6144), or where there is no plan otherwise.
    - ``du``, ``stage_bytes``, ``stages``: a stage holds one gate_up tile (16 rows by H) or ``du`` down slots of one
      tile (16 rows by I each): the most that fit a gate_up tile's room, split I's chunks evenly and leave a warp at
      most 8 of them (4 past 8 warps where some do); as many stages as fit beside the static shared memory, up to
      ``max_stages`` (more bytes requested at once do not come faster).
    - ``by_slot``, ``range``: where more than ``by_slot`` slots are live, down is dealt by slot in ranges of
      ``range`` tiles of H, each slot's act read once a range; otherwise by tile of H, every slot of a tile in one
      block (no outputs through global memory). Both give every output the same bits.
    - ``act_warp``: a warp of its own adds each gate_up unit's sums and stores its act, so the consumers go straight
      on (where there are at most 10 consumer warps, or each holds at most 5 chunks of x: otherwise its registers
      make the consumers spill).
    - ``sw``, ``sw_np``, ``sw_all``: in down by tile, a warp a slot summing all of its I in the pieces F_WS warps
      would take (the same bits), ``sw_np`` pieces at a time, all of the slot's act loaded first; where registers
      allow.
    - ``hold``: the producer copies the block's last ``hold`` down units only once the block's add at the grid
      barrier has returned (the add's release waits for the block's bulk copies in flight).
    - ``pdl``: launched with programmatic dependent launch.

    On the H100 at mini shapes this plan takes about 12.4 us a call at one row, 13.5 at 8 rows on the same experts
    and 60 at 8 independent rows (2026-11-24). Where that time goes, why this design stays above about 10 us at one
    row, and every variant measured and not kept, with its numbers and runs: benchmarks/results/experts_kernel.md."""
    chunks, d_chunks = hidden // 64, inter // 64
    gu, d_slot = chunks * (512 + 32), d_chunks * (512 + 32)
    room = max(gu, d_slot)

    def stages_for(w: int) -> tuple[int, int, int] | None:
        """(du, stage bytes, stages) for w consumer warps: du the most down slots that fit a gate_up tile's room and
        split I's chunks evenly over the warps (else the fewest that split them, the stage made larger), preferring
        those that leave a warp at most 8 chunks of I, and past 8 warps at most 4 where some do."""
        valid = [u for u in range(1, w + 1) if w % u == 0 and d_chunks % (w // u) == 0]
        if not valid:
            return None
        fits = [u for u in valid if u * d_slot <= room]
        light = [u for u in fits if d_chunks * u // w <= 8]
        lighter = [u for u in light if d_chunks * u // w <= 4] if w > 8 else []  # more warps: fewer registers each
        du = max(lighter or light) if light else max(fits, default=valid[0])
        stage = -(-max(gu, du * d_slot) // 128) * 128
        n = min(max_stages, (dev.smem_optin - fused_static_bytes(hidden, w)) // (stage + 16))  # and 2 barriers
        return (du, stage, n) if n >= 2 else None

    def fine(w: int) -> bool:  # a plan, with at most 8 chunks of I a warp in down (more spill)
        plan = stages_for(w)
        return plan is not None and d_chunks * plan[0] // w <= 8

    if not warps:
        warps = next(w for w in range(8, 0, -1) if chunks % w == 0)
        warps = next((w for w in range(8, 17) if chunks % w == 0 and chunks // w <= 8), warps)
        if not fine(warps):  # more warps, where they split both projections finely enough
            warps = next((w for w in range(warps + 1, 17) if chunks % w == 0 and chunks // w <= 8 and fine(w)), warps)
    if dev.capability < (9, 0) or chunks % warps:
        return None
    plan = stages_for(warps)
    if plan is None:
        return None
    du, stage, stages = plan
    # du divides warps, which divides H's chunks of 64, so du itself always divides H's tiles of 16
    span = max(r for r in range(du, 17) if r % du == 0 and (hidden // 16) % r == 0)
    act_warp = (warps <= 10 or chunks // warps <= 5) if act_warp is None else act_warp
    # down by tile a warp a slot, where a warp's first slot is at most a ring's units ahead of the stream and two
    # pieces' act (2 x 8 registers a chunk) leave room (at 8 chunks a piece, 4096 x 2048, 332 bytes spilled)
    sw = warps // du <= stages and d_chunks // (warps // du) <= 4
    # ... its pieces two at a time where they pair up and have at most 3 chunks each (at 4, I = 1024, 124 bytes
    # spilled), and all of its act loaded first up to 12 chunks of I (8 registers a chunk); both only up to 8
    # consumer warps (164 registers at mini; 16 warps leave 113, and spilled 384 bytes)
    sw_np = 2 if sw and warps <= 8 and (warps // du) % 2 == 0 and d_chunks // (warps // du) <= 3 else 1
    sw_all = sw and warps <= 8 and d_chunks <= 12
    return {"warps": warps, "stages": stages, "stage_bytes": stage, "du": du, "smem": stages * stage, "pdl": pdl,
            "by_slot": by_slot, "range": span, "act_warp": act_warp, "sw": sw, "sw_np": sw_np, "sw_all": sw_all,
            "hold": hold}


def with_down(cuda: dict, inter: int, d_split: int = 2) -> dict:
    """``cuda`` with the down kernel's configuration: each slot's I split between ``d_split`` warps (where I allows),
    8 slots a wave, its weights through registers (up to 6 chunks in flight a warp)."""
    d_chunks = inter // 64
    split = d_split if d_chunks % d_split == 0 else 1
    per_warp = d_chunks // split
    return {**cuda, "d_split": split, "d_warps": 8 * split,
            "d_depth": max(d for d in range(1, 7) if per_warp % d == 0)}


def prefill_blocks(hidden: int, inter: int, min_k: int, dev: DeviceInfo) -> dict:
    """The prefill kernels' tiles (expert-sorted grouped GEMMs) by ``pairs_per_expert``, the chunk's (row, choice)
    pairs over the experts: the first entry whose ``upto`` exceeds it. Each: BLOCK_M pairs of one expert a tile;
    gate_up's BLOCK_N columns of I (as many gate and up rows), down's BLOCK_N columns of H. ``pairs``: a chunk's pairs
    at most.

    H100, 2026-11-24 (benchmarks/bench_moe_prefill.py --sweep, mini experts: 128 of them, H 2048, I 768, top-8;
    results/h100-2026-11-24e/run3_moe_prefill), ms a call, MXFP4 / bf16 weights: at 4096 rows (256 pairs an expert)
    tiles of 128 pairs and 8 warps 1.58 / 1.27 against 1.69 / 1.33 with 64 pairs and 4 warps; at 1024 rows (64 an
    expert, so tiles of 128 are half padding) 0.55 / 0.52 against 0.52 / 0.53. Slower at 4096 rows: BLOCK_K 128
    (1.78 / 1.58), gate_up 128 columns wide (1.90 / 1.53), tiles of 32 pairs (2.21 / 1.83). The reference ops (a
    loop over the experts hit, as HF's): 54.3 / 36.8 ms. Also slower at 4096 rows (results/h100-2026-11-24f/
    run2_short_prefill_moe_sweep; the planner's tiles 1.55 / 1.20 there): tiles of 256 pairs (1.96 / 1.41), and for
    MXFP4 Triton's tl.dot_scaled (4.19) or the pure-tl dequantisation (1.88) in place of the inline asm."""
    if dev.interpret:  # few, large programs
        return {"pairs": PREFILL_PAIRS, "tiles": [{
            "upto": None, "BLOCK_M": 16,
            "gate_up": {"BLOCK_N": clamp(pow2_ceil(inter), 16, 64), "BLOCK_K": clamp(pow2_ceil(hidden), min_k, 128),
                        "num_warps": 4, "num_stages": 1},
            "down": {"BLOCK_N": clamp(pow2_ceil(hidden), 16, 128), "BLOCK_K": clamp(pow2_ceil(inter), min_k, 128),
                     "num_warps": 4, "num_stages": 1}}]}
    return {"pairs": PREFILL_PAIRS, "tiles": [
        {"upto": 128, "BLOCK_M": 64, "gate_up": {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
         "down": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}},
        {"upto": None, "BLOCK_M": 128, "gate_up": {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
         "down": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}}]}


def experts_context(fmt: str, hidden: int, inter: int, experts: int, dev: DeviceInfo, **overrides) -> dict:
    """The experts template's context for weights in ``fmt`` ("dense" or "mxfp4"); ``overrides`` replace keys
    (the benchmark uses them to time variants)."""
    mx = fmt == "mxfp4"
    min_k = 32 if mx else 16  # an MXFP4 step covers whole 32-element scale blocks
    dequant, pdl, preload = "tl", False, False
    if dev.interpret:  # every program costs Python time: few, large blocks
        def blocks(n, k, split=1):
            return {"one_row_gemv": False,
                    "gemv": {"BLOCK_N": clamp(pow2_ceil(n), 2, 128), "BLOCK_K": clamp(pow2_ceil(k), min_k, 256),
                             "SPLIT_K": split, "num_warps": 4, "num_stages": 1},
                    "gemm": {"BLOCK_N": clamp(pow2_ceil(n), 16, 128), "BLOCK_K": clamp(pow2_ceil(k), min_k, 256),
                             "SPLIT_K": split, "BLOCK_M": 8, "BLOCK_M_MANY": 32,
                             "num_warps": 4, "num_stages": 1}}
        # gate_up splits H in two whenever that leaves whole blocks, so the tests cover the split-K reduction.
        split = 2 if hidden % (2 * clamp(pow2_ceil(hidden), min_k, 256)) == 0 else 1
        gate_up, down, groups, down_groups = blocks(inter, hidden, split), blocks(hidden, inter), 1, 2
    elif mx:
        # Measured on the H100 (benchmarks/bench_mxfp4_experts.py --sweep): tensor cores for every row count, 16
        # weight rows per warp (gate_up tiles hold BLOCK_N gate and BLOCK_N up rows); the inline-PTX conversion
        # ("asm") beat pure tl by ~1.8x and tl.dot_scaled by ~1.3x; PDL saves ~0.7 us; L2 prefetch (per line, then
        # bulk cp.async.bulk.prefetch: 20.9 us against 17.3 on 2026-11-23; both removed) and deeper pipelines
        # measured slower. One split of gate_up's H for every row count (batch invariance): unsplit, one row took
        # 19.2 us against 18.4 split in two, and 8 rows 25.6 against 30.8.
        gate_up = {"one_row_gemv": False,
                   "gemv": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
                   "gemm": {"BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1, "BLOCK_M_MANY": 64,
                            "num_warps": 4, "num_stages": 3}}
        down = {"one_row_gemv": False,
                "gemv": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
                "gemm": {"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 256, "BLOCK_M_MANY": 64, "num_warps": 4,
                         "num_stages": 3}}
        # 16 slot groups (more programs when the rows route to many experts), with x split into even and odd columns
        # in registers (`x_tile`): 8 rows on independent routes 86.5 us against 107.6 (8 groups, strided x loads),
        # 8 rows on the same experts 22.7 against 25.1, one row unchanged (18.4 against 18.1; H100, 2026-11-23).
        groups, down_groups = 16, 16
        dequant, pdl = "asm", True
        # The down projection's first slot loads its weights into registers before waiting for gate_up (PDL), where
        # they fit in 256 bytes per thread and the one-row path steps through I as the gemm does (the preload's
        # steps are rendered for the gemm's BLOCK_K).
        tile = down["gemm"]["BLOCK_N"] * (inter // 2 + inter // 32)
        preload = (tile <= 256 * 32 * down["gemm"]["num_warps"]
                   and down["gemv"]["BLOCK_K"] == down["gemm"]["BLOCK_K"])
    else:
        # Tensor cores for one row too (batch invariance): the CUDA-core path (one_row_gemv) took 32.3 us for one
        # row, the tensor cores 33.6 us for two.
        gate_up = {"one_row_gemv": False,
                   "gemv": {"BLOCK_N": 16, "BLOCK_K": clamp(pow2_ceil(hidden), min_k, 512), "num_warps": 4,
                            "num_stages": 3},
                   "gemm": {"BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 128, "BLOCK_M_MANY": 64, "num_warps": 4,
                            "num_stages": 3}}
        down = {"one_row_gemv": False,
                "gemv": {"BLOCK_N": 16, "BLOCK_K": clamp(pow2_ceil(inter), min_k, 256), "num_warps": 4,
                         "num_stages": 3},
                "gemm": {"BLOCK_M": 8, "BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_M_MANY": 64, "num_warps": 4,
                         "num_stages": 3}}
        groups, down_groups = 8, 8
    ctx = {"doc": f"MoE SwiGLU experts ({'MXFP4' if mx else 'dense'} weights): gate/up + SiLU*mul, then down "
                  f"weighted by the router",
           "format": fmt, "H": hidden, "I": inter, "E": experts, "decode_pairs": GATHER_LIMIT,
           "prefill": prefill_blocks(hidden, inter, min_k, dev), "groups": groups, "down_groups": down_groups, "gate_up": gate_up,
           "down": down, "dequant": dequant, "pdl": pdl, "scale_fold": False, "down_preload": preload,
           "cuda": cuda_decode_context(hidden, inter, dev) if mx and dequant == "asm" else None,
           # the tensor cores' operand type: the activations' own (xa is the x tile), fp32 in the interpreter
           "dot_dtype": "tl.float32" if dev.interpret else "xa.dtype"}
    ctx.update(overrides)
    return ctx
