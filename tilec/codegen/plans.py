"""Planners for the dense ops: which template, which sizes and block sizes, for each node.

The MoE ops have theirs in plans_moe.py. Every planner reads shapes from the node's ``meta["val"]`` (and its
arguments'), so a plan is a pure function of the graph and the device.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from tilec.codegen.plan import KernelPlan, planner, val
from tilec.codegen.tuning import (ROW_TILE, DeviceInfo, clamp, gemm_blocks, gemv_blocks, matmul_context,
                                  pipeline_stages, pow2_ceil, pow2_floor, prefill_gemm)


def _warps(width: int) -> int:
    return 4 if width <= 2048 else 8


@planner("embedding")
def _embedding(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    hidden = val(node.args[1]).shape[1]
    return KernelPlan.make("triton/embedding.py.j2", doc="gather token rows of the embedding table", H=hidden,
                           BLOCK=clamp(pow2_ceil(hidden), 16, 1024))


@planner("rms_norm", "add_rms_norm")
def _rms_norm(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    hidden = val(node.args[0]).shape[-1]
    return KernelPlan.make("triton/rms_norm.py.j2", doc="RMSNorm of a row (residual add fused when asked)",
                           H=hidden, BLOCK=pow2_ceil(hidden), num_warps=_warps(hidden))


@planner("add", "silu_mul")
def _elementwise(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    op = node.target._opname
    expr = "a + b" if op == "add" else "silu(a) * b"
    return KernelPlan.make("triton/elementwise.py.j2", doc=f"elementwise {expr}", op=op, expr=expr, BLOCK=1024)


@planner("linear")
def _linear(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    n, k = val(node.args[1]).shape
    return KernelPlan.make("triton/linear.py.j2", **linear_context(n, k, dev, val(node.args[1]).dtype.itemsize))


def linear_context(n: int, k: int, dev: DeviceInfo, itemsize: int = 2, **overrides) -> dict:
    """The linear template's context for a weight [n, k] of ``itemsize`` bytes; ``overrides`` replace keys. As many
    pipeline stages as fit, up to 5: on the H100 (2026-11-24, bench_dense_tiles.py --sweep, mini) the attention output
    projection (2048 x 2048) took 6.6 us a call with 5 against 8.5 with 3, at 1 and 8 rows; the lm_head (32768 x
    2048, 64 columns a program) 49.6 us with 3 and 49.7 / 50.1 with 5 (run9_dense_profile); 32 columns 49.8 with 3,
    50.2 with 5."""
    return {"doc": "x @ W.T (+ b)", "N": n, "K": k, **matmul_context(n, k, dev, itemsize), **overrides}


# The dense projections of qkv_rope and SwiGLU's gate/up run on the tensor cores for every row count up to 16, so a
# verify step's rows read the weights once (pick_blocks in templates/triton/_common.j2). Their tiles, measured on the
# H100 (2026-11-24, benchmarks/bench_dense_tiles.py --sweep, mini shapes, us a call at 1 / 8 rows;
# results/h100-2026-11-24/run7_dense_sweep): qkv_rope 10.1 / 10.3 with 32 pairs, BLOCK_K 128, 4 warps and 5 stages,
# against 12.0 / 12.2 with the plain gemm blocks (16, 128, 4 warps, 3 stages) and 10.8 for the one-row vector path;
# 8 warps were slower everywhere (12.0 to 14.4). SwiGLU (gate/up and down) 46.2 / 46.5 with 32 columns, BLOCK_K 128,
# 4 warps, 5 stages against 55.4 / 55.9, and 44.2 for the vector path at one row. BLOCK_K 256 was as fast for
# qkv_rope (9.9 / 10.5) but its stages at prefill's 64 rows would not fit 5 in shared memory.
DENSE_TILE = {"BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4}


@planner("swiglu")
def _swiglu(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    inter, hidden = val(node.args[1]).shape
    return KernelPlan.make("triton/swiglu.py.j2",
                           **swiglu_context(hidden, inter, dev, val(node.args[1]).dtype.itemsize))


def swiglu_context(hidden: int, inter: int, dev: DeviceInfo, itemsize: int = 2, **overrides) -> dict:
    """The dense SwiGLU template's context for weights of ``itemsize`` bytes; ``overrides`` replace keys
    (benchmarks/bench_dense_tiles.py times variants). gate/up: one-row vector blocks (where a target asks for the
    vector path) and DENSE_TILE on the tensor cores; the down projection's as `linear`'s; both kernels as many
    pipeline stages as gate/up's fit (x's tile and two weight tiles a step)."""
    tile = dense_tile(inter, hidden, dev)
    ctx = {"doc": "dense SwiGLU MLP: gate/up + SiLU*mul, then down", "H": hidden, "I": inter,
           "gate_up": gemv_blocks(inter, hidden, dev), "gate_up_gemm": tile,
           "gate_up_prefill": prefill_gemm(inter, hidden, 2, itemsize, dev),
           **matmul_context(hidden, inter, dev, itemsize), "num_stages": pipeline_stages(tile, 2, itemsize, dev)}
    return {**ctx, **overrides}


def dense_tile(n: int, k: int, dev: DeviceInfo) -> dict:
    """DENSE_TILE over n output columns (pairs) and k, narrower where n is (tl.dot needs 16); under the interpreter
    its own large blocks (gemm_blocks)."""
    if dev.interpret:
        return gemm_blocks(n, k, dev)
    return {**DENSE_TILE, "BLOCK_N": clamp(pow2_floor(n), 16, DENSE_TILE["BLOCK_N"])}


@planner("qkv_rope")
def _qkv_rope(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    nq, k = val(node.args[1]).shape
    nk, nv = val(node.args[2]).shape[0], val(node.args[3]).shape[0]
    head_dim, rotary_dim = node.args[8], node.args[9]
    return KernelPlan.make("triton/qkv_rope.py.j2", **qkv_rope_context(nq, nk, nv, k, head_dim, rotary_dim, dev,
                                                                       val(node.args[1]).dtype.itemsize))


def qkv_rope_context(nq: int, nk: int, nv: int, k: int, head_dim: int, rotary_dim: int, dev: DeviceInfo,
                     itemsize: int = 2, **overrides) -> dict:
    """The fused Q/K/V + RoPE template's context for projections of nq, nk and nv rows over k, weights of
    ``itemsize`` bytes; ``overrides`` replace keys. Blocks of output pairs (two weight rows each): one-row vector
    blocks (where a target asks for the vector path) and DENSE_TILE on the tensor cores."""
    pairs = (nq + nk + nv) // 2
    base, tile = matmul_context(pairs, k, dev), dense_tile(pairs, k, dev)
    ctx = {**base, "doc": "Q/K/V projections with partial RoPE on Q and K", "K": k, "NQ": nq, "NK": nk, "NV": nv,
           "D": head_dim, "DV": nv // (nk // head_dim), "RD": rotary_dim,
           "gemv": {**base["gemv"], "BLOCK_N": clamp(base["gemv"]["BLOCK_N"], 2, 64)}, "gemm": tile,
           "num_stages": pipeline_stages(tile, 2, itemsize, dev),
           "prefill_gemm": prefill_gemm(pairs, k, 2, itemsize, dev)}
    return {**ctx, **overrides}


@planner("rope")
def _rope(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    n = val(node.args[0]).shape[-1]
    return KernelPlan.make("triton/rope.py.j2", doc="rotate-half RoPE", N=n, D=node.args[2], RD=node.args[3],
                           BLOCK_P=clamp(pow2_ceil(n // 2), 16, 256))


def _spec_rows(node: fx.Node) -> int:
    """Most rows a decode or verify step has (tiles are fixed up to it, see the attention template)."""
    gi = node.graph.owning_module.meta.get("tilec") if node.graph.owning_module is not None else None
    return getattr(gi, "spec_rows", 8) or 8


@planner("attention")
def _attention(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    kc = val(node.args[3])
    heads, head_dim, v_head_dim, window, scale, value_scale = node.args[7:13]
    causal = node.args[13] if len(node.args) > 13 else node.kwargs.get("causal", True)
    return KernelPlan.make("triton/attention.py.j2", **attention_context(
        heads, kc.shape[1], head_dim, v_head_dim, window, scale, value_scale, bool(causal), _spec_rows(node),
        kc.dtype, dev))


# Sliding windows of at most this many keys take the small key tiles (attention_context). Measured at MiMo's 129
# only; 512 (16 chunks of 32) is where the tiles' extra programs were judged still cheap, not a measured edge.
SHORT_WINDOW = 512


def attention_context(heads: int, kv_heads: int, head_dim: int, v_head_dim: int, window: int, scale: float,
                      value_scale: float, causal: bool, spec_rows: int, cache_dtype: torch.dtype,
                      dev: DeviceInfo) -> dict:
    """The attention template's context (benchmarks/bench_attention.py times it and its variants)."""
    short = 0 < window <= SHORT_WINDOW and not dev.interpret
    block_s = 16 if dev.interpret or short else (32 if head_dim > 128 else 64)
    block_q = 64 if head_dim <= 128 else 32
    return dict(
        doc="GQA over the KV cache (flash-decoding chunks), then append the new rows",
        HQ=heads, HKV=kv_heads, G=heads // kv_heads, D=head_dim, DV=v_head_dim, WINDOW=window,
        SPEC_ROWS=spec_rows, CAUSAL=causal, scale=scale, value_scale=value_scale,
        # Tiles of q [BLOCK_Q, D] and k [BLOCK_S, D] (D padded to a power of two, 256 for MiMo's 192) must fit
        # shared memory with the pipeline's buffers: halve the key block for wide heads.
        # Chunks of 64 keys (at least two tiles: the launcher's rule), and on the GPU only the key tiles that meet
        # the visible range: the chunks past the step's last key cost nothing, and a decode step's critical path is
        # a few tiles. Measured on the H100 (2026-11-23, results/h100-2026-11-23/bench_decode_chunk64.json): mini
        # decode 1.015 ms against 1.108 with chunks of 256; prefill logits as far from fp32 truth as the bf16
        # reference is (logits_error.json).
        # A short sliding window (MiMo's 128 keys) in chunks of 32 keys, tiles of 16: more programs for the few keys
        # it holds. H100, 2026-11-24 (bench_attention.py --sweep, mini, head dims 192 / 128, results/
        # h100-2026-11-24b/run5_live_chunks): 9.7 / 10.7 us a call at 1 / 8 rows against 11.1 / 12.1 with chunks of
        # 64 in tiles of 32; for full attention the latter stay (ctx 256: 12.2 / 14.3 against 13.7 / 15.3).
        BLOCK_S=block_s, CHUNK=32 if short else 64,
        # At most MAX_SPLIT chunks: a larger cache makes them longer. 256 keeps chunks of 64 keys up to 16K
        # positions, and the combine loads up to COMBINE_S chunks at once. H100, 2026-11-24 (bench_attention.py
        # --max-seq 4352 / 8192 / 16384, mini, full attention, one row; results/h100-2026-11-24d/run4_attention_ab),
        # against 64 chunks merged one at a time: ctx 256 11.2 / 11.3 / 13.6 us against 12.3 / 16.4 / 25.5, ctx 4096
        # 19.5 / 19.7 / 18.8 against 27.9 / 26.6 / 33.9, ctx 16000 31.6 against 47.7; COMBINE_S 16 was slower at long
        # contexts (run4), and a prefill takes fewer chunks (PREFILL_PROGRAMS).
        MAX_SPLIT=4 if dev.interpret else 256, BLOCK_Q_MAX=block_q, num_warps=4,
        # the combine's blocks: 8 query rows and 32 value dims a program (more programs for a step's few rows); 4
        # value dims in the interpreter, so its tests split the tests' narrow values too; chunks COMBINE_S at a time
        # (2 in the interpreter, so its tests merge several blocks of them)
        COMBINE_Q=8, COMBINE_DV=4 if dev.interpret else 32, COMBINE_S=2 if dev.interpret else 32,
        # A prefill's programs: its blocks of rows times as few key chunks as make about this many. With each causal
        # block of rows going over only its own rows' keys, 1024 rows at ctx 0 take 124.5 us against 347.8 (full)
        # and 87.3 against 662.2 (the sliding window), and after 3000 positions 734.8 against 853.4 (run4).
        PREFILL_PROGRAMS=2 * dev.sms,
        # A prefill's tiles (more rows than a verify step): 128 query rows, key tiles of 64 (a short window's stay),
        # 8 warps. H100, 2026-11-24 (bench_attention.py, mini, ctx 0,
        # results/h100-2026-11-24e/run7_attention_prefill_graphs):
        # 4096 rows of full attention 558 us against 1244 with the decode tiles (32 rows, keys 32, 4 warps), the
        # sliding window 169 against 318 (157 with keys of 16: the window's tiles stay), 1024 rows full 89 against
        # 124. The interpreter keeps the decode tiles (its tests' plans).
        # fp32 caches with wide heads take 64 query rows: 128 of them need 257 KB of shared memory at head dim 192
        # (H200, 2026-11-24, a fp32 mini's first prefill: triton's OutOfResources).
        PREFILL_BLOCK_Q=block_q if dev.interpret else (64 if cache_dtype.itemsize > 2 and head_dim > 128 else 128),
        PREFILL_WARPS=4 if dev.interpret else 8,
        PREFILL_BLOCK_S=block_s if dev.interpret or short else 64,
        skip_dead_tiles=not dev.interpret,
        num_stages=1 if dev.interpret else 2,
        # bf16 caches: bf16 products on the tensor cores, fp32 accumulation (HF casts probabilities to bf16 too);
        # fp32 (and the interpreter): exact fp32 dots.
        dot_dtype="tl.bfloat16" if cache_dtype == torch.bfloat16 and not dev.interpret else "tl.float32")


@planner("kv_append")
def _kv_append(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    kc, vc = val(node.args[2]), val(node.args[3])
    return KernelPlan.make("triton/kv_append.py.j2", doc="store context keys and values in the cache",
                           HKV=kc.shape[1], D=kc.shape[3], DV=vc.shape[3])


@planner("lm_head_argmax")
def _lm_head_argmax(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    n, k = val(node.args[1]).shape
    blocks = gemv_blocks(n, k, dev)
    # a prefill's rows (past ROW_TILE) on the tensor cores in the linear's prefill tiles; its partial maxima are then
    # n / that BLOCK_N a row
    prefill = prefill_gemm(n, k, 1, val(node.args[1]).dtype.itemsize, dev)
    return KernelPlan.make("triton/argmax.py.j2", doc="lm_head GEMV reduced to the argmax (logits never stored)",
                           fused=True, N=n, K=k, BLOCK_N=blocks["BLOCK_N"], BLOCK_K=blocks["BLOCK_K"],
                           num_warps=blocks["num_warps"],
                           BLOCK_R=clamp(pow2_ceil(n // min(blocks["BLOCK_N"], prefill["BLOCK_N"])), 16, 1024),
                           prefill_gemm=prefill, row_tile=ROW_TILE, dot_dtype=dev.dot_dtype)


@planner("argmax")
def _argmax(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    n = val(node.args[0]).shape[-1]
    return KernelPlan.make("triton/argmax.py.j2", doc="argmax over the last dim", fused=False, N=n, K=0,
                           BLOCK_R=clamp(pow2_ceil(n), 16, 4096))


@planner("cat")
def _cat(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    parts = [val(t) for t in node.args[0]]
    dim = node.args[1]
    if dim not in (-1, parts[0].dim() - 1):
        from tilec.errors import TargetError

        raise TargetError(f"target 'triton': tilec.cat of node %{node.name} joins dim {dim}; only the last dim has "
                          f"a kernel")
    widths = [p.shape[-1] for p in parts]
    return KernelPlan.make("triton/cat.py.j2", doc="concatenate along the last dim", widths=widths,
                           total=sum(widths), BLOCK=clamp(pow2_ceil(max(widths)), 16, 1024))


@planner("all_reduce")
def _all_reduce(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    # In place when this node is the partial sum's only reader (its producer's fresh output, never a weight or input).
    source = node.args[0]
    inplace = source.op == "call_function" and len(source.users) == 1
    return KernelPlan.make("triton/all_reduce.py.j2", doc="sum over the tensor-parallel ranks", inplace=inplace)


@planner("all_gather")
def _all_gather(node: fx.Node, dev: DeviceInfo) -> KernelPlan:
    return KernelPlan.make("triton/all_gather.py.j2", doc="the ranks' slices side by side along the last dim")
