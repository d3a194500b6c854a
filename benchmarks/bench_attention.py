"""The attention of a decode step and of DFlash's verify step, kernel by kernel: tilec's attention op at mini shapes
(16 query heads, 2 kv heads, head dims 192 / 128, value scale 0.707, sinks) over a sliding window of 129 (a ring of
136 slots) and over full attention, at 1 and 8 rows, with the planner's tiles and, with --sweep, other tiles.

    python3 benchmarks/bench_attention.py --out out/attention            # GPU: the planner's tiles
    python3 benchmarks/bench_attention.py --out out/attention --sweep    # and the variants
    python3 benchmarks/bench_attention.py --out out/attention --smoke    # CPU interpreter, one small case (it runs)
    python3 benchmarks/bench_attention.py --out out/attention --max-seq 16384 --cases full:256:1,full:4096:1 \
        --variant MAX_SPLIT=256                                           # a server's cache, a named variant

Each variant is first checked against the reference op (tilec.ops.attention): its output (relative error, fp64
norms) and the cache after the call (the step's rows stored). It is then timed as CUDA-graph replays of one call
per layer, 12 layers each with its own cache, back to back; the figure is the median microseconds a call. The
kernels of a call (append, attend, combine) are launched as a compiled step launches them: with programmatic
dependent launch on Hopper. The floor is the bytes that must move (the visible keys and values, the queries and the
output) over the copy bandwidth measured here. Writes DIR/bench_attention.json and prints a table.
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

from tilec import ops  # noqa: E402
from tilec.codegen.plans import attention_context  # noqa: E402
from tilec.codegen.render import load_source, render  # noqa: E402
from tilec.codegen.tuning import device_info  # noqa: E402
from tilec.runtime.kv_cache import ring_capacity  # noqa: E402

MINI = {"heads": 16, "kv": 2, "D": 192, "DV": 128, "window": 129, "value_scale": 0.707, "layers": 12,
        "max_seq": 4352, "cases": [("sliding", 256, 1), ("sliding", 256, 8), ("full", 256, 1), ("full", 256, 8),
                                   ("full", 4096, 1), ("full", 4096, 8)]}
SMOKE = {"heads": 4, "kv": 2, "D": 16, "DV": 8, "window": 9, "value_scale": 0.707, "layers": 2, "max_seq": 64,
         "cases": [("sliding", 20, 1), ("full", 20, 2)]}
SPEC_ROWS = 8


def window_of(shape: dict, kind: str) -> int:
    return shape["window"] if kind == "sliding" else 0


def context(shape: dict, kind: str, dev, **overrides) -> dict:
    ctx = attention_context(shape["heads"], shape["kv"], shape["D"], shape["DV"], window_of(shape, kind),
                            shape["D"] ** -0.5,
                            shape["value_scale"], True, SPEC_ROWS, torch.bfloat16 if not dev.interpret else
                            torch.float32, dev)
    return {**ctx, "launch_pdl": dev.pdl, **overrides}


def module_for(shape: dict, kind: str, dev, **overrides):
    ctx = context(shape, kind, dev, **overrides)
    return load_source(render("triton/attention.py.j2", ctx={**ctx, "nodes": ["bench"]}), "attention")


def make_layers(shape: dict, kind: str, rows: int, ctx_len: int, device, gen, dtype) -> list[tuple]:
    """(q, k, v, k_cache, v_cache, start_pos, sinks) for each layer: random caches, the step at position ctx_len."""
    cap = ring_capacity(window_of(shape, kind), shape["max_seq"], SPEC_ROWS)  # as the model lays its caches out
    hq, hkv, d, dv = shape["heads"], shape["kv"], shape["D"], shape["DV"]
    out = []
    for _ in range(shape["layers"]):
        def rnd(*s):
            return torch.randn(*s, generator=gen, device=device).to(dtype)
        out.append((rnd(1, rows, hq * d), rnd(1, rows, hkv * d), rnd(1, rows, hkv * dv), rnd(1, hkv, cap, d),
                    rnd(1, hkv, cap, dv), torch.tensor([ctx_len], device=device), rnd(hq)))
    return out


def reference(shape: dict, kind: str, layer: tuple):
    return ops.attention(*layer, shape["heads"], shape["D"], shape["DV"], window_of(shape, kind), shape["D"] ** -0.5,
                         shape["value_scale"], True)


def visible_bytes(shape: dict, kind: str, rows: int, ctx_len: int, elem: int) -> int:
    """The keys and values a step must read (those it can see), its queries and new rows, and its output."""
    keys = min(ctx_len + rows, shape["window"] - 1 + rows) if kind == "sliding" else ctx_len + rows
    per_key = shape["kv"] * (shape["D"] + shape["DV"])
    return elem * (keys * per_key + rows * (shape["heads"] * (shape["D"] + shape["DV"]) + per_key))


def variants(shape: dict, kind: str, dev, sweep: bool) -> list[tuple[str, dict]]:
    """(name, context overrides) around the planner's tiles."""
    out = [("planner", {})]
    if not sweep:
        return out
    base = context(shape, kind, dev)
    for kv in ({"BLOCK_S": 16, "CHUNK": 32}, {"BLOCK_S": 16}, {"CHUNK": 128}, {"CHUNK": 256},
               {"BLOCK_S": 64, "CHUNK": 128}, {"num_warps": 2}, {"num_warps": 8}, {"num_stages": 1},
               {"num_stages": 3}, {"MAX_SPLIT": 16}, {"MAX_SPLIT": 128}, {"COMBINE_DV": 64}, {"COMBINE_DV": 128},
               {"COMBINE_Q": 16}, {"BLOCK_Q_MAX": 16}, {"BLOCK_S": 16, "CHUNK": 32, "num_warps": 2}):
        if any(base.get(k) != v for k, v in kv.items()):
            out.append((" ".join(f"{k}={v}" for k, v in kv.items()), kv))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter, small shapes")
    ap.add_argument("--sweep", action="store_true", help="also time other tiles (GPU)")
    ap.add_argument("--reps", type=int, default=50, help="graph replays a measurement")
    ap.add_argument("--max-seq", type=int, default=0,
                    help="positions the caches are laid out for, as the compile option max_seq_len (default: the "
                         "shape's, 4352 on the GPU); the full-attention plan's chunks depend on it")
    ap.add_argument("--cases", default="", help="kind:context:rows,... (default: the shape's six)")
    ap.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[ KEY=VALUE]",
                    help="also time the plan with these context overrides (integers), beside the planner's; "
                         "repeatable")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dev = device_info(device)
    shape = dict(MINI if cuda else SMOKE)
    if args.max_seq:
        shape["max_seq"] = args.max_seq
    if args.cases:
        try:
            shape["cases"] = [(kind, int(c), int(r)) for kind, c, r in (x.split(":") for x in args.cases.split(","))]
        except ValueError:
            ap.error(f"--cases {args.cases!r}: expected kind:context:rows,... such as full:256:1,sliding:256:8")
        if any(kind not in ("full", "sliding") for kind, _, _ in shape["cases"]):
            ap.error(f"--cases {args.cases!r}: the kinds are full and sliding")
        if any(c + r > shape["max_seq"] for _, c, r in shape["cases"]):
            ap.error(f"--cases {args.cases!r}: a context plus its rows exceeds --max-seq {shape['max_seq']}")
    try:
        named = [(v, {k: int(x) for k, x in (kv.split("=") for kv in v.split())}) for v in args.variant]
    except ValueError:
        ap.error(f"--variant {args.variant}: expected KEY=VALUE pairs with integer values, such as MAX_SPLIT=128")
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    t0 = time.time()
    copy_bw = common.measure_bandwidth(device, 1 << 30)["copy"]["bytes_per_s"] if cuda else None
    results = []
    for kind, ctx_len, rows in shape["cases"]:
        layers = make_layers(shape, kind, rows, ctx_len, device, gen, dtype)
        nbytes = visible_bytes(shape, kind, rows, ctx_len, 2 if cuda else 4)
        for name, overrides in variants(shape, kind, dev, args.sweep and cuda) + named:
            row = {"kind": kind, "ctx": ctx_len, "rows": rows, "variant": name, "overrides": overrides,
                   "bytes": nbytes, "floor_us": nbytes / copy_bw * 1e6 if copy_bw else None}
            try:
                module = module_for(shape, kind, dev, **overrides)
                mine = [t.clone() for t in layers[0]]
                theirs = [t.clone() for t in layers[0]]
                got = module.launch(*mine)
                want = reference(shape, kind, theirs)
                row["rel_err"] = common.rel_err(got, want)
                row["cache_equal"] = bool(torch.equal(mine[3], theirs[3]) and torch.equal(mine[4], theirs[4]))
                calls = [lambda layer=layer: module.launch(*layer) for layer in layers]
                if cuda:
                    row["us"] = common.event_us(common.capture(calls), args.reps, len(calls))
                    row["floor_fraction"] = row["floor_us"] / row["us"]
            except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            results.append(row)
            print(f"  {kind:8s} ctx {ctx_len:5d} rows {rows}  {name:38s} "
                  + (f"{row['us']:7.2f} us  err {row['rel_err']:.1e}  cache {'=' if row['cache_equal'] else '!'}"
                     if "us" in row else row.get("error", f"err {row.get('rel_err', float('nan')):.1e}")),
                  flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "bench_attention.json", {
        "benchmark": "bench_attention", "environment": common.environment(device), "shape": shape,
        "copy_bandwidth_Bps": copy_bw, "timing": "CUDA-graph replays of one call per layer (its own cache), median "
        "us a call", "results": results, "seconds": time.time() - t0})
    print(f"wrote {out / 'bench_attention.json'} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
