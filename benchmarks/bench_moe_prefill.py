"""The MoE experts at prefill sizes: tilec's expert-sorted kernels (MXFP4 and bf16 weights) beside the reference
ops, at `mini` expert shapes.

    python3 benchmarks/bench_moe_prefill.py --out out/moe_prefill            # GPU: 256, 1024 and 4096 rows
    python3 benchmarks/bench_moe_prefill.py --out out/moe_prefill --sweep    # also the planner's tile variants
    python3 benchmarks/bench_moe_prefill.py --out out/moe_prefill --smoke    # CPU interpreter, tiny shapes

A prefill's experts are compute-bound: every (row, choice) pair costs 6 * H * I flops (gate, up and down). Each
kernel is first checked against the reference op (relative error), then timed eagerly with CUDA events (median of
--reps calls after warm-up), as a prefill runs. The reference ops loop over the experts that were hit (HF's way);
the MXFP4 reference dequantises the weights it uses first. Writes DIR/bench_moe_prefill.json and prints a table:
ms a call, useful TFLOP/s, and the time against the bf16 reference.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if "--smoke" in sys.argv or not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything loads a Triton kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from a source checkout
sys.path.insert(1, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_mxfp4_experts import kernel_module, make_layers, reference, routing  # noqa: E402

from tilec.codegen.plans_moe import experts_context  # noqa: E402
from tilec.codegen.tuning import DeviceInfo, device_info  # noqa: E402

MINI = {"E": 128, "H": 2048, "I": 768, "k": 8, "layers": 1, "rows": [256, 1024, 4096]}
SMOKE = {"E": 8, "H": 64, "I": 32, "k": 2, "layers": 1, "rows": [40]}


def tiles(bm, gu, down) -> dict:
    """A prefill tile variant for every chunk: BLOCK_M pairs; gate_up's and down's (BLOCK_N, BLOCK_K, num_warps,
    num_stages)."""
    names = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
    return {"upto": None, "BLOCK_M": bm, "gate_up": dict(zip(names, gu)), "down": dict(zip(names, down))}


SWEEP = {
    "m64_gu64x64w4_d128x64w4": tiles(64, (64, 64, 4, 3), (128, 64, 4, 3)),
    "m128_gu64x64w8_d128x64w8": tiles(128, (64, 64, 8, 3), (128, 64, 8, 3)),
    "m64_gu128x64w8_d128x128w8": tiles(64, (128, 64, 8, 3), (128, 128, 8, 3)),
    "m64_gu64x128w4_d128x128w4": tiles(64, (64, 128, 4, 3), (128, 128, 4, 3)),
    "m32_gu64x64w4s4_d128x64w4s4": tiles(32, (64, 64, 4, 4), (128, 64, 4, 4)),
    "m128_gu32x64w4_d64x64w4": tiles(128, (32, 64, 4, 3), (64, 64, 4, 3)),
    "m64_gu64x64w4s4_d64x64w4s4": tiles(64, (64, 64, 4, 4), (64, 64, 4, 4)),
    "m128_gu128x64w8_d256x64w8": tiles(128, (128, 64, 8, 3), (256, 64, 8, 3)),
    # tiles of 256 pairs: each weight tile dequantised once for twice the rows
    "m256_gu64x64w8_d128x64w8": tiles(256, (64, 64, 8, 3), (128, 64, 8, 3)),
    "m256_gu64x64w8s2_d64x64w8s2": tiles(256, (64, 64, 8, 2), (64, 64, 8, 2)),
}
# MXFP4 dequantisation variants on the planner's tiles for many pairs an expert (128 at mini), the template's
# `dequant`: "dot_scaled" is Triton's MXFP4 matmul, "tl" the pure-Triton path
DEQUANT_SWEEP = {"m128_dot_scaled": "dot_scaled", "m128_tl": "tl"}


def time_ms(fn, device, reps: int) -> float:
    return common.summarize(common.time_calls(fn, device, reps, warmup=2))["median"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for bench_moe_prefill.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the CPU interpreter")
    ap.add_argument("--sweep", action="store_true", help="also time the prefill tile variants (GPU)")
    ap.add_argument("--rows", default="", help="row counts, comma-separated (default 256,1024,4096)")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per measurement")
    ap.add_argument("--only", nargs="*", default=[], help="with --sweep: only the variants whose names contain one of "
                    "these")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    shape = dict(MINI if cuda else SMOKE)
    if args.rows:
        shape["rows"] = [int(r) for r in args.rows.split(",")]
    dev = device_info(device) if cuda else DeviceInfo(interpret=True, sms=1)
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    layers = {fmt: make_layers(fmt, shape, device, gen)[0] for fmt in ("mxfp4", "dense")}
    variants = {"planned": {}}
    if args.sweep and cuda:
        planned = experts_context("mxfp4", shape["H"], shape["I"], shape["E"], dev)["prefill"]
        variants.update({name: {"prefill": {"pairs": planned["pairs"], "tiles": [v]}} for name, v in SWEEP.items()})
        # the dequantisation variants on the planner's tiles for many pairs an expert (its last entry)
        variants.update({name: {"prefill": {**planned, "tiles": planned["tiles"][-1:]}, "dequant": d}
                         for name, d in DEQUANT_SWEEP.items()})
        if args.only:
            variants = {n: v for n, v in variants.items() if n == "planned" or any(o in n for o in args.only)}
    results = []
    for rows in shape["rows"]:
        w, ids = routing(rows, "random", shape, device, cpu_gen)
        x = torch.randn(1, rows, shape["H"], generator=cpu_gen).to(device, dtype)
        flops = 6 * rows * shape["k"] * shape["H"] * shape["I"]
        refs = {}
        for fmt in ("dense", "mxfp4"):
            op = reference(fmt)
            refs[fmt] = op(x, w, ids, *layers[fmt])
            ms = time_ms(lambda op=op, fmt=fmt: op(x, w, ids, *layers[fmt]), device, max(2, args.reps // 4))
            results.append({"kernel": f"reference {fmt}", "rows": rows, "ms": ms, "tflops": flops / ms / 1e9})
        for name, overrides in variants.items():
            for fmt in ("mxfp4", "dense") if "dequant" not in overrides else ("mxfp4",):
                module = kernel_module(fmt, shape, dev, **overrides)
                out = module.launch(x, w, ids, *layers[fmt])
                err = common.rel_err(out, refs[fmt])
                ms = time_ms(lambda m=module, fmt=fmt: m.launch(x, w, ids, *layers[fmt]), device, args.reps)
                results.append({"kernel": f"tilec {fmt}", "variant": name, "rows": rows, "ms": ms,
                                "tflops": flops / ms / 1e9, "rel_err": err})
        base = next(r["ms"] for r in results if r["rows"] == rows and r["kernel"] == "reference dense")
        for r in results:
            if r["rows"] == rows:
                r["vs_reference_bf16"] = r["ms"] / base
        print(f"rows {rows} ({rows * shape['k']} pairs, {flops / 1e9:.1f} GFLOP):")
        for r in (r for r in results if r["rows"] == rows):
            err = f"  rel err {r['rel_err']:.1e}" if "rel_err" in r else ""
            print(f"  {r['kernel']:16s} {r.get('variant', ''):30s} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s "
                  f"{r['vs_reference_bf16']:6.3f}x ref{err}", flush=True)
    out = Path(args.out)
    common.write_json(out / "bench_moe_prefill.json", {
        "benchmark": "bench_moe_prefill", "environment": common.environment(device), "shape": shape,
        "timing": "eager calls, CUDA events, median", "results": results,
        "seconds": round(time.perf_counter() - t0, 1)})
    print(f"wrote {out / 'bench_moe_prefill.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
