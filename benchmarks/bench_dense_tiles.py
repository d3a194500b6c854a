"""The dense projections of a decode step and of DFlash's verify step, op by op: qkv_rope (Q/K/V with RoPE), the
dense SwiGLU MLP (gate/up + SiLU*mul, then down), the attention output projection and the lm_head (linear), and the
MoE router (scores GEMV, then top-k) at 1 and 8 rows, each beside its HBM floor.

    python3 benchmarks/bench_dense_tiles.py --out out/dense            # GPU: mini shapes, the planner's tiles
    python3 benchmarks/bench_dense_tiles.py --out out/dense --sweep    # also other tensor-core tiles
    python3 benchmarks/bench_dense_tiles.py --out out/dense --smoke    # CPU interpreter, tiny shapes (it runs)

The projections run on the tensor cores with one tile of rows for every step of up to 16 rows, so a verify step's rows
read the weights once, as one row does, and each row gets the same bits in either (batch invariance). ``vector``
is the one-row path on the CUDA cores (a target's ``row_vector``), which only a 1-row step can take. Each variant
is first checked against the reference op (tilec.ops; relative error, fp64 norms), then timed as CUDA-graph replays
of one call per layer, over enough layers' weights that no call finds its weights in the 50 MB L2; median
microseconds a call. The floor is the weight bytes over the copy bandwidth measured here (device-to-device copy of
1 GiB, read + write bytes). Writes DIR/bench_dense_tiles.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything loads a Triton kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from a source checkout
sys.path.insert(1, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tilec import ops  # noqa: E402
from tilec.codegen.plans import linear_context, qkv_rope_context, swiglu_context  # noqa: E402
from tilec.codegen.plans_moe import router_context  # noqa: E402
from tilec.codegen.render import load_source, render  # noqa: E402
from tilec.codegen.tuning import ROW_TILE, device_info  # noqa: E402

# mini (models/mimo.py): 16 query heads and 2 KV heads of 192 (values 128), 64 rotary dims; the dense MLP of 8192;
# a vocabulary of 32768
MINI = {"H": 2048, "heads": 16, "kv_heads": 2, "D": 192, "DV": 128, "RD": 64, "I": 8192, "vocab": 32768, "E": 128,
        "k": 8, "rows": [1, 8], "bytes_cold": 150e6}
SMOKE = {"H": 64, "heads": 4, "kv_heads": 1, "D": 16, "DV": 8, "RD": 8, "I": 96, "vocab": 80, "E": 16, "k": 4,
         "rows": [1, 3], "bytes_cold": 0}
OPS = ("qkv_rope", "swiglu", "o_proj", "lm_head", "router")


def linear_shape(op: str, shape: dict) -> tuple[int, int]:
    """(N, K) of a linear op's weight."""
    return (shape["H"], shape["heads"] * shape["DV"]) if op == "o_proj" else (shape["vocab"], shape["H"])
THETA = 1e4


def module_for(op: str, shape: dict, dev, **overrides):
    """The op's kernel module as the planner configures it, with ``overrides`` in its context."""
    ctx = op_context(op, shape, dev, **overrides)
    template = {"qkv_rope": "qkv_rope", "swiglu": "swiglu", "router": "moe_router"}.get(op, "linear")
    return load_source(render(f"triton/{template}.py.j2", ctx={**ctx, "nodes": ["bench"]}), template)


def op_context(op: str, shape: dict, dev, **overrides) -> dict:
    """The op's template context as the planner makes it (tilec/codegen/plans.py), with ``overrides``."""
    if op == "qkv_rope":
        return qkv_rope_context(shape["heads"] * shape["D"], shape["kv_heads"] * shape["D"],
                                shape["kv_heads"] * shape["DV"], shape["H"], shape["D"], shape["RD"], dev, **overrides)
    if op == "swiglu":
        return swiglu_context(shape["H"], shape["I"], dev, **overrides)
    if op == "router":
        return {**router_context(shape["E"], shape["H"], dev), **overrides}
    return linear_context(*linear_shape(op, shape), dev, **overrides)


def make_layers(op: str, shape: dict, device, gen) -> list[tuple]:
    """Enough copies of the op's weights (bf16, scaled like trained ones) that together they overflow L2."""
    h, d, dv = shape["H"], shape["D"], shape["DV"]
    if op == "qkv_rope":
        dims = [(shape["heads"] * d, h), (shape["kv_heads"] * d, h), (shape["kv_heads"] * dv, h)]
    elif op == "swiglu":
        dims = [(shape["I"], h), (shape["I"], h), (h, shape["I"])]
    elif op == "router":
        dims = [(shape["E"], h)]  # the gate's weight (its fp32 correction bias is added below)
    else:
        dims = [linear_shape(op, shape)]
    per_layer = sum(2 * n * k for n, k in dims)
    count = max(1, int(-(-shape["bytes_cold"] // per_layer)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers = [tuple((torch.randn(n, k, generator=gen, device=device) / k ** 0.5).to(dtype) for n, k in dims)
              for _ in range(count)]
    if op == "router":
        layers = [(w, 0.1 * torch.randn(shape["E"], generator=gen, device=device)) for (w,) in layers]
    return layers


def call_for(op: str, module, x, layer, shape: dict, start_pos):
    if op == "qkv_rope":
        return lambda: module.launch(x, *layer, None, None, None, start_pos, shape["D"], shape["RD"], THETA)
    if op == "router":  # MiMo's: sigmoid, top-k of all experts (one group), renormalised
        return lambda: module.launch(x, *layer, shape["k"], 1, 1, True, 1.0)
    return lambda: module.launch(x, *layer)  # swiglu's three weights, or a linear's one (no bias)


def reference(op: str, x, layer, shape: dict, start_pos):
    if op == "qkv_rope":
        return torch.cat([t.flatten() for t in ops.qkv_rope(x, *layer, None, None, None, start_pos, shape["D"],
                                                             shape["RD"], THETA)])
    if op == "swiglu":
        return ops.swiglu(x, *layer).flatten()
    if op == "router":
        weights, ids = ops.moe_router(x, *layer, shape["k"], 1, 1, True, 1.0)
        return torch.cat([weights.flatten(), ids.flatten().to(weights.dtype)])
    return ops.linear(x, layer[0], None).flatten()


def time_us(calls, reps: int) -> float | None:
    """Median microseconds a call: CUDA-graph replays of the calls back to back (None on the CPU: not timed)."""
    if not torch.cuda.is_available():
        return None
    return common.event_us(common.capture(calls), reps, len(calls))


# A prefill's tiles swept with --rows past ROW_TILE: (BLOCK_M, BLOCK_N of a linear's one weight tile, BLOCK_K, warps,
# stages); kernels with two weight tiles a step (qkv_rope's pairs, gate and up) take half the columns of each.
PREFILL_SWEEP = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3),
                 (128, 128, 32, 8, 4), (64, 256, 64, 8, 3), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3)]


def variants(op: str, shape: dict, dev, sweep: bool, prefill: bool = False) -> list[tuple[str, dict]]:
    """(name, context overrides): the planner's tiles, the one-row vector path, and with --sweep other tiles (a
    prefill's, where ``prefill``)."""
    if op == "router":  # its scores' blocks, and warps of each kernel
        ctx = op_context(op, shape, dev)
        out = [("planner", {})]
        for kv in ({"topk_warps": 1}, {"topk_warps": 2}, {"BLOCK_E": 2}, {"BLOCK_E": 1}, {"BLOCK_E": 8},
                   {"BLOCK_K": 2048}, {"BLOCK_K": 256}, {"num_warps": 1, "topk_warps": 1}, {"num_warps": 2},
                   {"BLOCK_E": 2, "topk_warps": 1}, {"BLOCK_E": 1, "topk_warps": 1, "BLOCK_K": 1024}):
            if sweep and any(ctx.get(k) != v for k, v in kv.items()):
                out.append((" ".join(f"{k}={v}" for k, v in kv.items()), kv))
        return out
    out = [("planner", {}), ("vector (1 row only)", {"row_vector": True})]
    if op == "qkv_rope":  # a weight pointer per pair, as before one_base
        out.append(("pointer per pair", {"one_base": False}))
    if sweep and prefill:  # a prefill's tiles (rows past ROW_TILE)
        key = "gate_up_prefill" if op == "swiglu" else "prefill_gemm"
        base = op_context(op, shape, dev)
        keys = [key, "prefill_gemm"] if op == "swiglu" else [key]
        for bm, bn, bk, warps, stages in PREFILL_SWEEP:
            width = bn // 2 if op in ("qkv_rope", "swiglu") else bn
            kv = {"BLOCK_M": bm, "BLOCK_N": width, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
            if kv == {k: base[key][k] for k in kv}:
                continue
            over = {k: {**base[k], **kv} for k in keys}
            if op == "swiglu":  # the down projection's one weight tile a step: the full width
                over["prefill_gemm"] = {**over["prefill_gemm"], "BLOCK_N": bn}
            out.append((f"M={bm} N={bn} K={bk} warps={warps} stages={stages}", over))
    elif sweep:
        key = "gate_up_gemm" if op == "swiglu" else "gemm"
        ctx = op_context(op, shape, dev)
        tiles = ctx[key]
        for block_n in (16, 32):
            for block_k in (128, 256):
                for warps in (4, 8):
                    for stages in (3, 5):
                        kv = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}
                        if kv == {k: tiles[k] for k in kv} and stages == ctx["num_stages"]:
                            continue
                        out.append((f"N={block_n} K={block_k} warps={warps} stages={stages}",
                                    {key: {**tiles, **kv}, "num_stages": stages}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the CPU interpreter")
    ap.add_argument("--sweep", action="store_true", help="also time other tensor-core tiles (GPU)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS, help="the ops to time (default: all)")
    ap.add_argument("--rows", default="", help="row counts, comma-separated (default 1,8); past 16 rows (a prefill) "
                    "the table adds TFLOP/s and --sweep varies the prefill tiles")
    args = ap.parse_args()
    log = common.Log()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    shape = dict(SMOKE if device.type == "cpu" else MINI)
    if args.rows:
        shape["rows"] = [int(r) for r in args.rows.split(",")]
    prefill = max(shape["rows"]) > ROW_TILE
    dev = device_info(device)
    gen = torch.Generator(device=device).manual_seed(0)
    copy_bps = common.measure_bandwidth(device, 1 << 30)["copy"]["bytes_per_s"] if device.type == "cuda" else None
    results = []
    for op in args.ops:
        layers = make_layers(op, shape, device, gen)
        weight_bytes = sum(t.numel() * t.element_size() for t in layers[0])
        floor_us = weight_bytes / copy_bps * 1e6 if copy_bps else None
        for name, overrides in variants(op, shape, dev, args.sweep, prefill):
            module = module_for(op, shape, dev, **overrides)
            for rows in shape["rows"]:
                if "row_vector" in overrides and rows > 1:
                    continue  # the vector path is one row's alone
                width = linear_shape(op, shape)[1] if op == "o_proj" else shape["H"]
                x = torch.randn(1, rows, width, generator=gen, device=device).to(layers[0][0].dtype)
                start_pos = torch.tensor([37], dtype=torch.int64, device=device)
                out = call_for(op, module, x, layers[0], shape, start_pos)()
                got = torch.cat([t.flatten() for t in out]) if isinstance(out, tuple) else out.flatten()
                err = common.rel_err(got, reference(op, x, layers[0], shape, start_pos))
                us = time_us([call_for(op, module, x, layer, shape, start_pos) for layer in layers], args.reps)
                flops = rows * weight_bytes  # 2 flops a weight (bf16: 2 bytes) a row
                row = {"op": op, "variant": name, "rows": rows, "us": us, "rel_err": err, "weight_bytes": weight_bytes,
                       "floor_us": floor_us, "x_floor": us / floor_us if us and floor_us else None,
                       "tflops": flops / us / 1e6 if us else None, "overrides": overrides}
                results.append(row)
                log(f"{op:9s} {name:34s} {rows} rows {us or float('nan'):8.1f} us  "
                    f"{row['tflops'] or float('nan'):6.1f} TFLOP/s  err {err:.1e}")
    report = {"benchmark": "bench_dense_tiles", "created": common.now_iso(),
              "environment": common.environment(device), "shape": shape, "copy_Bps": copy_bps,
              "layers_timed": "one call per layer, CUDA graph, median", "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "bench_dense_tiles.json", report)
    table = [[r["op"], r["variant"], r["rows"], f"{r['us']:.1f}" if r["us"] else "-",
              f"{r['floor_us']:.1f}" if r["floor_us"] else "-", f"{r['x_floor']:.2f}x" if r["x_floor"] else "-",
              f"{r['tflops']:.1f}" if r["tflops"] else "-", f"{r['rel_err']:.1e}"] for r in results]
    print(common.format_table(["op", "variant", "rows", "us", "floor us", "of floor", "TFLOP/s", "rel err"], table))


if __name__ == "__main__":
    main()
