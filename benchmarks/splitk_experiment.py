"""Experiment: experts_kernel with no exchange in the middle of the stream (split-K down, benchmarks/splitk_kernel.cu).

    python3 benchmarks/splitk_experiment.py --out out/splitk          # GPU: mini shapes, beside the planner's kernel

experts_kernel computes gate_up for every live slot, waits at a grid barrier for every block's act, then computes
down. Under the weight stream that exchange costs 2 to 3 us at one row (benchmarks/results/h100-2026-11-23d). Here a
unit is (slot, 16 columns of I): gate_up for those columns, then down's k16 step over them for all of H, its fp32
partial sums stored per (pair, slice); one grid barrier at the end, then each block sums its columns of H, slices in
order, pairs in router order. Timed as bench_mxfp4_experts.py times kernels (CUDA-graph replays over 12 layers), in
the same run as the planner's experts_kernel and the read floor, for 1 row, 8 rows on the same experts and 8 rows on
independent routes, in variants (VARIANTS): the units' bytes by a producer warp's bulk copies (as experts_kernel) or by
each consumer warp's own 16-byte cp.async (the way the read floor reads fastest), 3 or 4 stages, 8 or 16 consumer
warps, and timing-only ones without the tail (no partials, barrier or sums: what the stream and the units cost
alone). Each variant is first checked against the reference op at the three cases (one that is wrong is reported and
not timed); every variant then sees the same routes. Then a per-block timeline of the bulk and async kernels. Writes
DIR/splitk.json.

Not yet run on a GPU (written in a session without one). Its sums are not the planner kernel's bits: it adds down's
k16 steps in another grouping. If it wins at one row, a product version must give every path the same bits (a row's
output may not depend on the batch: DFlash's verify against plain decoding). One way: every path computes each k16 step
from zero and adds the steps in one fixed order, and gate_up's tiles are re-laid so that two tiles hold the columns of
one step of down's chunk layout. The cost is a fifth re-laid copy of down (a third more MXFP4 expert memory), because
split-K reads down by columns of I and the other paths read it by rows of H. Alternatively, split-K at one row could
stay a compile option that gives up batch invariance.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_mxfp4_experts import (MINI, kernel_module, launcher, make_layers, measure, measure_read_floor,  # noqa: E402
                                 planned, reference, rel_err, routing, time_calls)
from timeline_experts import KERNELS, point_percentiles, read_stamps  # noqa: E402

from tilec.codegen import mma_layout  # noqa: E402
from tilec.codegen.cuda_build import CudaModule, pointer  # noqa: E402
from tilec.codegen.plans_moe import experts_context, fused_context  # noqa: E402
from tilec.codegen.tuning import device_info  # noqa: E402

KERNEL = Path(__file__).with_name("splitk_kernel.cu")
# the kernel's timeline stamps, in its point order (splitk_kernel.cu)
POINTS = ("start", "table", "units_done", "barrier", "end", "first_in", "first_done", "last_in")
# (stages, consumer warps, tail, copies) of the variants timed; without the tail, the stream and the units alone
VARIANTS = ((4, 8, True, "bulk"), (3, 8, True, "bulk"), (3, 16, True, "bulk"), (4, 8, False, "bulk"),
            (3, 8, True, "async"), (3, 8, False, "async"))


def split_down(words: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mma_layout's down words int32 [E, H/16, I/64, 32, 4] and scales uint8 [E, H/16, I/64, 32] -> the split-K
    layout: words [E, I/16, H/64, 32, 4] (slice s, group G, lane (g, t), tile i: the old word of tile 4G + i, chunk
    s // 4, lane (g, s % 4), step t) and scales [E, I/32, H/64, 8, 4, 2] (block, group, g, tile i, h)."""
    e, nt, nc = words.shape[:3]
    w = words.reshape(e, nt // 4, 4, nc, 8, 4, 4)  # [E, G, i, c, g, t', s]
    w = w.permute(0, 3, 5, 1, 4, 6, 2)  # [E, c, t', G, g, s, i]
    s = scales.reshape(e, nt // 4, 4, nc, 8, 2, 2)  # [E, G, i, c, g, b, h]
    s = s.permute(0, 3, 5, 1, 4, 2, 6)  # [E, c, b, G, g, i, h]
    return (w.reshape(e, nc * 4, nt // 4, 32, 4).contiguous(), s.reshape(e, nc * 2, nt * 16).contiguous())


def stage_bytes(shape: dict) -> int:
    """One unit's bytes (splitk_kernel.cu's SK_STAGE): two gate_up tiles' words and scales, a slice of down's words
    and its 32-column block's scales."""
    return 2 * (shape["H"] // 64) * 544 + 9 * shape["H"]


def cuda_context(shape: dict, dev, plan: dict, warps: int | None = None) -> dict:
    """The planner's CUDA context; with ``warps``, experts_kernel's (and so splitk_kernel's) consumer warps."""
    ctx = experts_context("mxfp4", shape["H"], shape["I"], shape["E"], dev, **plan)
    if not (ctx["cuda"] and ctx["cuda"]["fused"]):
        raise SystemExit("the planner does not pick experts_kernel here: nothing to compare against")
    cuda = ctx["cuda"]
    return {**cuda, "fused": fused_context(shape["H"], shape["I"], dev, warps=warps)} if warps else cuda


def splitk_source(shape: dict, dev, plan: dict, stages: int, timeline: bool = False, warps: int | None = None,
                  tail: bool = True, copies: str = "bulk") -> str:
    """The experts template as the planner renders it (its device functions), with splitk_kernel appended.
    ``tail`` False: timing only (no partial sums, no reduction; wrong outputs). ``copies``: "bulk" (a producer warp's
    bulk copies) or "async" (each consumer warp's own 16-byte copies)."""
    cuda = cuda_context(shape, dev, plan, warps)
    base = kernel_module("mxfp4", shape, dev, **plan, cuda={**cuda, "timeline": timeline})
    defines = f"#define SK_STAGES {stages}\n#define SK_TAIL {int(tail)}\n#define SK_ASYNC {int(copies == 'async')}\n"
    return defines + base.CUDA_SOURCE + "\n" + KERNEL.read_text()


def splitk_launcher(shape: dict, dev, plan: dict, relaid: dict, device, stages: int, timeline: bool = False,
                    warps: int | None = None, tail: bool = True, copies: str = "bulk"):
    """A launch function (as bench_mxfp4_experts.launcher's) of splitk_kernel, and its module. relaid: per layer
    (by its first tensor) gate_up's words and scales (mma_layout) and down's (split_down)."""
    module = CudaModule(splitk_source(shape, dev, plan, stages, timeline, warps, tail, copies), "splitk")
    warps = cuda_context(shape, dev, plan, warps)["fused"]["warps"]
    stage = stage_bytes(shape)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    sync = torch.zeros(2, dtype=torch.int32, device=device)
    partials = {}

    def launch(x, w, ids, *layer):
        gw, gs, dw, ds = relaid[id(layer[0])]
        rows = x.reshape(-1, shape["H"]).contiguous()
        m, k = rows.shape[0], ids.shape[-1]
        p = m * k
        ids2 = ids.reshape(-1, k).to(torch.int64).contiguous()
        w2 = w.reshape(-1, k).to(torch.float32).contiguous()
        out = torch.empty_like(rows)
        if p not in partials:
            partials[p] = torch.empty((p, shape["I"] // 16, shape["H"]), dtype=torch.float32, device=device)
        module.launch("splitk_kernel", (sms,), (warps + 1) * 32,
                      [pointer(rows), pointer(gw), pointer(gs), pointer(dw), pointer(ds), pointer(ids2), pointer(w2),
                       pointer(partials[p]), pointer(out), pointer(sync), ctypes.c_int(m), ctypes.c_int(p),
                       ctypes.c_int(k)], device, pdl=True, smem=stages * stage)
        return out.view(x.shape)
    return launch, module


def timeline(launch, module, shape: dict, layers, device, gen) -> list[dict]:
    """Per-block stamps of the last of a graph of calls (the kernel's points), percentiles in ns from the first
    block's start, for 1 row, 8 rows on the same experts and 8 on independent routes."""
    out = []
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for rows, regime in ((1, "same"), (8, "same"), (8, "random")):
        x = torch.randn(1, rows, shape["H"], generator=gen).to(device, torch.bfloat16)
        routes = [routing(rows, regime, shape, device, gen) for _ in layers]
        calls = [lambda w=w, ids=ids, lw=lw: launch(x, w, ids, *lw) for (w, ids), lw in zip(routes, layers)]
        us = time_calls(calls, 20, True)
        s = read_stamps(module, device)[KERNELS.index("experts"), :sms]  # (the kernel stamps as experts_kernel)
        rec = {"rows": rows, "regime": regime, "us_per_call": us, **point_percentiles(s, POINTS, int(s[:, 0].min()))}
        out.append(rec)
        print(f"  timeline {rows} {regime}: {us:.1f} us; " + ", ".join(
            f"{p} p50 {rec[p]['p50'] / 1e3:.1f} max {rec[p]['max'] / 1e3:.1f}" for p in POINTS if p in rec),
            flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="directory for splitk.json")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device("cuda")
    shape, dev = MINI, device_info(device)
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    copy_bw = common.measure_bandwidth(device, 1 << 30)["copy"]["bytes_per_s"]
    layers = make_layers("mxfp4", shape, device, gen)
    plan = planned("mxfp4", layers)
    fragments = {id(layer[0]): mma_layout.relay_experts(*layer) for layer in layers}
    relaid = {key: (gw, gs, *split_down(dw, ds)) for key, (gw, gs, dw, ds) in fragments.items()}
    planner = launcher(kernel_module("mxfp4", shape, dev, **plan), fragments)
    variants = [("experts_kernel (planner)", planner)]
    for stages, warps, tail, copies in VARIANTS:
        name = f"split-K {copies} {stages} stages {warps} warps" + ("" if tail else " (no tail: timing only)")
        variants.append((name, splitk_launcher(shape, dev, plan, relaid, device, stages, False, warps, tail,
                                               copies)[0]))
    wrong = []
    for (name, fn), tail in zip(variants[1:], [v[2] for v in VARIANTS]):
        for rows, regime in ((1, "same"), (8, "same"), (8, "random")):  # the same inputs through both kernels
            w, ids = routing(rows, regime, shape, device, cpu_gen)
            x = torch.randn(1, rows, shape["H"], generator=cpu_gen).to(device, torch.bfloat16)
            got, ref = fn(x, w, ids, *layers[0]), reference("mxfp4")(x, w, ids, *layers[0])
            err, apart = rel_err(got, ref), rel_err(got, planner(x, w, ids, *layers[0]))
            print(f"  {name}, {rows} {regime}: rel err {err:.1e} against the reference, {apart:.1e} against "
                  f"experts_kernel", flush=True)
            if tail and not err < 1e-2:  # (NaN too) a wrong kernel is reported, not timed
                wrong.append(name)
    wrong = sorted(set(wrong))
    if wrong:
        print(f"WRONG RESULTS, not timed: {wrong}", flush=True)
    variants = [(name, fn) for name, fn in variants if name not in wrong]
    results = []
    for round_ in range(args.repeats):
        for rows, regime in ((1, "same"), (8, "same"), (8, "random")):
            for name, fn in variants:  # every variant sees the same routes and inputs (a generator per case)
                case_gen = torch.Generator().manual_seed(1000 * round_ + 10 * rows + (regime == "random"))
                r = measure(name, fn, "mxfp4", layers, shape, rows, regime, device, case_gen, args.reps, True,
                            reference("mxfp4"))
                r["round"] = round_
                r["fraction_of_copy_bw"] = r["GBps"] * 1e9 / copy_bw
                results.append(r)
                print(f"  {name:52s} rows={rows} {regime:6s} {r['us']:7.1f} us {100 * r['fraction_of_copy_bw']:5.1f}%"
                      f"  err {r['rel_err_vs_reference']:.1e}", flush=True)
        for r in measure_read_floor(shape, ((1, "same"), (8, "same"), (8, "random")), device, cpu_gen, args.reps):
            r["round"] = round_
            r["fraction_of_copy_bw"] = r["GBps"] * 1e9 / copy_bw
            results.append(r)
            print(f"  {'read floor':52s} rows={r['rows']} {r['regime']:6s} {r['us']:7.1f} us "
                  f"{100 * r['fraction_of_copy_bw']:5.1f}%", flush=True)
    stamps = {}
    for stages, warps, _, copies in (VARIANTS[0], VARIANTS[4]):  # bulk and async copies, with their tails
        print(f"timeline: split-K {copies} {stages} stages {warps} warps", flush=True)
        stamps[f"{copies} {stages} stages {warps} warps"] = timeline(
            *splitk_launcher(shape, dev, plan, relaid, device, stages, True, warps, True, copies), shape, layers,
            device, cpu_gen)
    if args.out:
        common.write_json(Path(args.out) / "splitk.json", {"copy_bandwidth_Bps": copy_bw, "wrong": wrong,
                                                            "results": results,
                                                            "timeline_ns": stamps,
                                                            "environment": common.environment(device)})
    print(json.dumps({"copy_GBps": copy_bw / 1e9}))


if __name__ == "__main__":
    main()
