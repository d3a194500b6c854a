"""Where the time of one MXFP4 experts call goes on the GPU: a per-block timeline of the CUDA decode kernels.

    python3 benchmarks/timeline_experts.py --out out/timeline        # GPU only: mini expert shapes, 1 and 8 rows
    python3 benchmarks/timeline_experts.py --out out/t --cuda '{"fused": null}'   # the two kernels instead
    python3 benchmarks/timeline_experts.py --out out/t --cuda '{"fused": null, "d_split": 1}'

The kernels (templates/cuda/moe_experts_mxfp4.cu.j2) are rendered with ``timeline`` on: thread 0 of every block
stamps %globaltimer at points of its work, with its SM. gate_up_kernel and down_kernel: when the block starts, after
its slot table, after its weights are in (gate_up: the first slot's sums done; down: the wait for gate_up released)
and when it ends. experts_kernel (the planner's choice where it fits): start, slot table, its gate_up units done,
the grid barrier passed, end; and in down, its first unit's weights in, that unit's sums done (its act in), and the
tile's last unit done (down by slot: the block's outputs written and fenced, before the ranges' counts); and when
its consumers have waited for its last gate_up unit, and (stamped by the producer) when the bytes of the last unit it
copies have landed: when the stream delivered the block's share, whatever the consumers were doing. The calls run
as in bench_mxfp4_experts.py (a CUDA graph over LAYERS layers' weights); the stamps kept are those of the last call.
Times are nanoseconds from the first block's start. Writes DIR/timeline_experts.json and prints percentiles.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import bench_mxfp4_experts as bench  # noqa: E402
import common  # noqa: E402
from tilec.codegen.cuda_build import pointer  # noqa: E402
from tilec.codegen.plans_moe import with_down  # noqa: E402
from tilec.codegen.tuning import device_info  # noqa: E402

POINTS = {"gate_up": ("start", "table", "weights", "end"), "down": ("start", "table", "weights", "end"),
          "experts": ("start", "table", "gate_up_done", "barrier", "end", "down_w_in", "down_first", "down_sums",
                      "gate_up_last_in", "last_unit_in", "bars_init", "dep_wait", "arrived", "flip_seen",
                      "first_copy", "first_down_copy", "first_unit_in", "down_act_issued", "b_loop",
                      "turn0_issued", "fenced")}
KERNELS = ("gate_up", "down", "experts")  # the template's kernel numbers in its stamps
BLOCKS, FIELDS = 8192, 22  # TIMELINE_BLOCKS and TIMELINE_FIELDS in the template


def percentiles(values: list[float]) -> dict:
    v = sorted(values)
    return {"min": v[0], "p10": v[len(v) // 10], "p50": v[len(v) // 2], "p90": v[len(v) * 9 // 10], "max": v[-1]}


def read_stamps(cuda_module, dev) -> torch.Tensor:
    """The template's stamps, int64 [kernel, block, field], read back by its timeline_read kernel."""
    buf = torch.zeros(len(KERNELS) * BLOCKS * FIELDS, dtype=torch.int64, device=dev)
    cuda_module.launch("timeline_read", (64,), 256, [pointer(buf)], dev)
    return buf.view(len(KERNELS), BLOCKS, FIELDS).cpu()


def point_percentiles(s: torch.Tensor, points, t0: int) -> dict:
    """{point: percentiles of its stamps (ns from t0)} over the blocks of ``s`` [block, field] that stamped it."""
    rec = {}
    for i, point in enumerate(points):
        vals = [int(t) - t0 for t in s[:, i] if int(t) > 0]
        if vals:
            rec[point] = percentiles(vals)
    return rec


def run(rows: int, regime: str, shape: dict, layers, fragments, module, cuda: dict, dev, gen) -> dict:
    launch = bench.launcher(module, fragments)
    x = torch.randn(1, rows, shape["H"], generator=gen).to(dev, torch.bfloat16)
    routes = [bench.routing(rows, regime, shape, dev, gen) for _ in layers]
    calls = [lambda w=w, ids=ids, lw=lw: launch(x, w, ids, *lw) for (w, ids), lw in zip(routes, layers)]
    us = bench.time_calls(calls, 20, True)
    stamps = read_stamps(module._CUDA, dev)
    k = shape["k"]
    p = rows * k
    if cuda.get("fused") and module.DECODE_PAIRS // k <= 8:  # grids as the module's _cuda_experts launches them
        grids = {"experts": torch.cuda.get_device_properties(dev).multi_processor_count}
    else:
        wave = cuda["d_warps"] // cuda["d_split"]
        grids = {"gate_up": (shape["I"] // 8) * min(cuda["groups"], p) * -(-rows // 8),
                 "down": (shape["H"] // 16) * -(-p // wave) * -(-rows // 8)}
    first = next(iter(grids))
    t0 = int(stamps[KERNELS.index(first), :grids[first], 0].min())
    out = {"rows": rows, "regime": regime, "us_per_call": us, "grids": grids}
    for name, blocks in grids.items():
        s = stamps[KERNELS.index(name), :blocks]
        points = POINTS[name]
        done = s[:, points.index("end")] > 0  # blocks that ran (down blocks without slots skip the weights point)
        out[name] = {"blocks": int(done.sum()), "sms": int(torch.unique(s[done, FIELDS - 1]).numel()),
                     **point_percentiles(s[done], points, t0)}
    if "down" in grids:
        gu_end = out["gate_up"]["end"]["max"]
        down_starts = [(int(t) - t0) for t in stamps[1, :grids["down"], 0] if int(t) > 0]
        out["down_blocks_started_before_gate_up_ended"] = sum(t < gu_end for t in down_starts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--cuda", default="{}", help="changes to the planner's `cuda` context, as JSON (d_split goes "
                                                   "through plans_moe.with_down; fused: null for the two kernels)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("timeline_experts.py needs a CUDA GPU")
    dev = torch.device("cuda")
    info = device_info(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    shape = dict(bench.MINI)
    layers = bench.make_layers("mxfp4", shape, dev, gen)
    plan = bench.planned("mxfp4", layers)
    ctx = bench.experts_context("mxfp4", shape["H"], shape["I"], shape["E"], info, **plan)
    if not ctx["cuda"]:
        sys.exit("the planner does not pick the CUDA decode kernels on this machine")
    change = json.loads(args.cuda)
    cuda = {**ctx["cuda"], **{k: v for k, v in change.items() if k not in ("d_split", "fused")}}
    if "fused" in change:  # null: the two kernels; an object: changes to the planner's experts_kernel
        cuda["fused"] = change["fused"] and {**cuda["fused"], **change["fused"]}
    if "d_split" in change:
        cuda = with_down(cuda, shape["I"], change["d_split"])
    ctx["cuda"] = cuda
    module = bench.kernel_module("mxfp4", shape, info, **plan, cuda={**ctx["cuda"], "timeline": True})
    fragments = bench.fragments_for("mxfp4", layers)
    results = [run(rows, regime, shape, layers, fragments, module, ctx["cuda"], dev, cpu_gen)
               for rows, regime in ((1, "same"), (8, "same"), (8, "random"))]
    report = {"benchmark": "timeline_experts", "environment": common.environment(dev), "shape": shape,
              "cuda": ctx["cuda"], "units": "ns from the first block's start", "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "timeline_experts.json", report)
    for r in results:
        print(f"\n{r['rows']} rows {r['regime']}: {r['us_per_call']:.1f} us a call (graph); grids {r['grids']}")
        if "down_blocks_started_before_gate_up_ended" in r:
            print(f"  down blocks started before gate_up's last ended: {r['down_blocks_started_before_gate_up_ended']}")
        print(f"  {'kernel':8s} {'point':12s} {'min':>7s} {'p10':>7s} {'p50':>7s} {'p90':>7s} {'max':>7s}  (ns)")
        for name in r["grids"]:
            for point in POINTS[name]:
                if point in r[name]:
                    q = r[name][point]
                    print(f"  {name:8s} {point:12s} {q['min']:7d} {q['p10']:7d} {q['p50']:7d} {q['p90']:7d} "
                          f"{q['max']:7d}")
            print(f"  {name:8s} blocks {r[name]['blocks']} on {r[name]['sms']} SMs")
    print(f"wrote {out / 'timeline_experts.json'}")


if __name__ == "__main__":
    main()
