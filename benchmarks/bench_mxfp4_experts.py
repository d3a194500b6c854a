"""The MXFP4 experts kernel's bandwidth beside the bf16 kernel and the PyTorch reference, at `mini` expert shapes.

    python3 benchmarks/bench_mxfp4_experts.py --out out/bench            # GPU: E=128, H=2048, I=768, top-8, bf16
    python3 benchmarks/bench_mxfp4_experts.py --out out/bench --sweep    # also time the kernel variants
    python3 benchmarks/bench_mxfp4_experts.py --out out/bench --smoke    # CPU interpreter, tiny shapes (it runs)

For 1, 2, 4 and 8 rows: tilec's experts kernels (MXFP4 and bf16 weights, templates/triton/moe_experts.py.j2 as the
planner configures them: for MXFP4 decode on Hopper, the CUDA kernels of templates/cuda/moe_experts_mxfp4.cu.j2 on
weights re-laid as a program does when it loads; "tilec mxfp4 triton" is the same plan with Triton decode kernels)
and the reference ops (`tilec.ops.mxfp4_moe_experts`, `moe_experts`). Each is first
checked against the reference (relative error, fp64 norms) and then timed over calls that rotate through LAYERS
layers' worth of weights, so no call finds its experts in the 50 MB L2. Kernels are timed as CUDA-graph replays of
one call per layer (launch gaps as a decode step has them), with CUDA events, median over replays; the reference
eagerly with events. Bytes are the weights read: MXFP4 blocks + scales (bf16 weights) of the distinct experts the
call touches. The copy bandwidth is measured here (device-to-device copy of 1 GiB, read + write bytes), and so
is the read floor: a plain read of the same bytes (read_floor.py's fastest kernel), timed the same way.

Routing regimes: ``same`` (every row picks the same top-8: the kernel's row amortisation, 8 rows should cost at most
1.3x one row) and ``random`` (independent rows: bytes grow with the distinct experts; compare time per byte).
Routes: ``--routes cold`` (the default) draws each layer its own route, whose small tensors the other layers' weights
evict, so each call reads the router's choice from DRAM; ``--routes hot`` shares one route between the layers, so it
is in L2, as in a decode step where the router has just written it (x is one tensor, in L2, either way).
Writes DIR/bench_mxfp4_experts.json and prints a short table.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
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
from tilec.codegen import mma_layout  # noqa: E402
from tilec.codegen.plans_moe import experts_context, fused_context, scale_fold_exact, with_down  # noqa: E402
from tilec.codegen.render import load_source, render  # noqa: E402
from tilec.codegen.tuning import DeviceInfo, device_info  # noqa: E402

MINI = {"E": 128, "H": 2048, "I": 768, "k": 8, "layers": 12, "rows": [1, 2, 4, 8]}
SMOKE = {"E": 8, "H": 64, "I": 32, "k": 2, "layers": 2, "rows": [1, 2]}


def kernel_module(fmt: str, shape: dict, dev: DeviceInfo, **overrides):
    ctx = experts_context(fmt, shape["H"], shape["I"], shape["E"], dev, **overrides)
    return load_source(render("triton/moe_experts.py.j2", ctx={**ctx, "nodes": ["bench"]}), "moe_experts")


def fragments_for(fmt: str, layers) -> dict:
    """The weights re-laid for the CUDA decode kernels (tilec/codegen/mma_layout.py), per layer (by its first
    tensor), as a compiled program derives them when it loads."""
    if fmt != "mxfp4" or not torch.cuda.is_available():
        return {}
    return {id(layer[0]): mma_layout.relay_experts(*layer) for layer in layers}


def launcher(module, fragments: dict):
    """module.launch with each layer's re-laid weights appended where the module has the CUDA decode kernels."""
    if not hasattr(module, "CUDA_SOURCE"):
        return module.launch

    def launch(x, w, ids, *layer):
        return module.launch(x, w, ids, *layer, *fragments[id(layer[0])])
    return launch


def expert_bytes(fmt: str, shape: dict) -> int:
    """Bytes of one expert's weights: gate_up [2I, H] and down [H, I]."""
    n = 3 * shape["I"] * shape["H"]
    return n // 2 + n // 32 if fmt == "mxfp4" else 2 * n


def make_layers(fmt: str, shape: dict, device, gen) -> list[tuple]:
    e, h, i = shape["E"], shape["H"], shape["I"]
    layers = []
    for _ in range(shape["layers"]):
        if fmt == "mxfp4":  # random codes are valid MXFP4; scales near 2^-6 as trained weights have
            codes = dict(dtype=torch.uint8, device=device, generator=gen)
            layers.append((torch.randint(0, 256, (e, 2 * i, h // 2), **codes),
                           torch.randint(118, 125, (e, 2 * i, h // 32), **codes),
                           torch.randint(0, 256, (e, h, i // 2), **codes),
                           torch.randint(118, 125, (e, h, i // 32), **codes)))
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            layers.append(((0.02 * torch.randn(e, 2 * i, h, device=device, generator=gen)).to(dtype),
                           (0.02 * torch.randn(e, h, i, device=device, generator=gen)).to(dtype)))
    return layers


def routing(rows: int, regime: str, shape: dict, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [1, rows, k], ids int64 [1, rows, k])."""
    e, k = shape["E"], shape["k"]
    if regime == "same":
        ids = torch.randperm(e, generator=gen)[:k].repeat(rows, 1)
    else:
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(rows)])
    w = torch.rand(rows, k, generator=gen) + 0.1
    return (w / w.sum(-1, keepdim=True)).view(1, rows, k).to(device), ids.view(1, rows, k).to(device)


def layer_routes(n: int, rows: int, regime: str, shape: dict, device, gen, hot: bool) -> list:
    """A route for each of ``n`` layers: drawn for each (the routes' small tensors are then evicted by the other
    layers' weights between two reads), or with ``hot`` one drawn route shared by every layer (read at every call, so
    it stays in L2, as the router's output is when the experts read it in a decode step)."""
    if hot:
        return [routing(rows, regime, shape, device, gen)] * n
    return [routing(rows, regime, shape, device, gen) for _ in range(n)]


def reference(fmt: str):
    return ops.mxfp4_moe_experts if fmt == "mxfp4" else ops.moe_experts


# ---------------------------------------------------------------------------------------------------------- timing
class KernelTimes:
    """Each kernel's GPU time per call (torch.profiler, CUPTI), taken once every timing is done: once CUPTI has been
    used in a process, every later CUDA-graph call takes about 0.9 us longer (H100, 2026-11-23: the experts kernel
    12.2 to 12.5 us a call at one row before, 13.3 after; the read floor 8.8 to 8.9 before, 9.7 to 9.8 after;
    benchmarks/results/h100-2026-11-23i/run3_cupti). ``later`` keeps a timed run, its calls (which hold what the run
    reads: a CUDA graph holds no reference to its inputs, nor to the module of its kernels) and the dict its times go
    into; ``collect`` fills them all."""

    def __init__(self):
        self.pending = []

    def later(self, run, calls: list, into: dict) -> None:
        self.pending.append((run, calls, into))

    def collect(self) -> None:
        for run, calls, into in self.pending:
            into.update({name: us / len(calls) for name, (_, us) in common.kernel_gpu_times(run, 10).items()})
        self.pending.clear()


def time_calls(calls, reps: int, graph: bool, kernel_times: KernelTimes | None = None,
               per_kernel: dict | None = None) -> float:
    """Median microseconds per call of ``calls`` (each a no-argument function), run back to back; ``per_kernel``, if
    given, receives each kernel's GPU time per call when ``kernel_times`` collects them, after every timing."""
    if not torch.cuda.is_available():  # smoke mode: wall clock, a couple of rounds
        t0 = time.perf_counter()
        for _ in range(reps):
            for call in calls:
                call()
        return (time.perf_counter() - t0) / (reps * len(calls)) * 1e6
    run = None
    if graph:
        try:
            run = common.capture(calls)
        except Exception as exc:  # noqa: BLE001 - report and fall back to eager launches
            print(f"  (CUDA graph capture failed: {type(exc).__name__}: {exc}; timing eager launches)")
    if run is None:
        def run():
            for call in calls:
                call()
        run()  # compile and warm up
        torch.cuda.synchronize()
    us = common.event_us(run, reps, len(calls))
    if per_kernel is not None and kernel_times is not None:
        kernel_times.later(run, calls, per_kernel)
    return us


# -------------------------------------------------------------------------------------------------------- measuring
def measure(name: str, fn, fmt: str, layers, shape, rows: int, regime: str, device, gen, reps: int, graph: bool,
            check_fn=None, kernel_times: KernelTimes | None = None, hot_routes: bool = False) -> dict:
    """Check ``fn`` against the reference on layer 0, then time it over all layers: each layer its own route, or with
    ``hot_routes`` one route for every layer (still every layer's own weights), so the router's choice is in L2 at
    each call, as in a decode step where the router has just written it."""
    routes = layer_routes(len(layers), rows, regime, shape, device, gen, hot_routes)
    x = torch.randn(1, rows, shape["H"], generator=gen).to(device)
    x = x.to(torch.bfloat16) if device.type == "cuda" else x
    err = None
    if check_fn is not None:
        w, ids = routes[0]
        got, ref = fn(x, w, ids, *layers[0]), check_fn(x, w, ids, *layers[0])
        err = common.rel_err(got, ref)
        if not torch.isfinite(got).all():
            err = float("nan")
    calls = [lambda w=w, ids=ids, lw=lw: fn(x, w, ids, *lw) for (w, ids), lw in zip(routes, layers)]
    kernels = {} if kernel_times is not None and device.type == "cuda" else None  # filled by kernel_times.collect()
    us = time_calls(calls, reps, graph, kernel_times, kernels)
    distinct = statistics.mean(len(torch.unique(ids)) for _, ids in routes)
    nbytes = distinct * expert_bytes(fmt, shape)
    return {"kernel": name, "format": fmt, "rows": rows, "regime": regime, "us": us, "bytes": nbytes,
            "distinct_experts": distinct, "GBps": nbytes / us / 1e3, "rel_err_vs_reference": err,
            "kernel_us": kernels}


def measure_read_floor(shape: dict, cases, device, gen, reps: int, hot_routes: bool = False) -> list[dict]:
    """The plain read of the same bytes (benchmarks/read_floor.py's best kernel on the H100, results/h100-2026-11-23e:
    16-byte loads, 8 in flight a thread, walking the experts with 32-bit counters, 8 blocks of 256 threads an SM, PDL;
    8.61 us for one row's 20 MB), for each (rows, regime) of ``cases``: each call reads every byte of
    its route's distinct experts (fresh random bytes, LAYERS layers of them, allocated once for every case), timed as
    the kernels are. What no kernel reading these bytes can beat by much: the experts kernels' time beside it is what
    computing costs."""
    from read_floor import SOURCE

    from tilec.codegen.cuda_build import CudaModule, pointer

    eb = expert_bytes("mxfp4", shape)
    module = CudaModule(SOURCE, "read_floor")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    out = torch.empty(8 * sms, dtype=torch.int32, device=device)
    flat = [torch.randint(0, 256, (shape["E"], eb), dtype=torch.uint8, device=device) for _ in range(shape["layers"])]

    def call(w, ids):
        module.launch("ldg_walk_read8", (8 * sms,), 256, [pointer(w), pointer(ids), ctypes.c_int32(ids.numel()),
                                                          ctypes.c_int64(eb), pointer(out), ctypes.c_int32(1)],
                      device, pdl=True)

    results = []
    for rows, regime in cases:
        chosen = [torch.unique(ids) for _, ids in layer_routes(len(flat), rows, regime, shape, device, gen,
                                                                  hot_routes)]
        us = time_calls([lambda w=w, ids=ids: call(w, ids) for w, ids in zip(flat, chosen)], reps, True)
        distinct = statistics.mean(ids.numel() for ids in chosen)
        nbytes = distinct * eb
        results.append({"kernel": "read floor", "format": "mxfp4", "rows": rows, "regime": regime, "us": us,
                        "bytes": nbytes, "distinct_experts": distinct, "GBps": nbytes / us / 1e3,
                        "rel_err_vs_reference": None, "kernel_us": None})
    return results


def planned(fmt: str, layers) -> dict:
    """What the planner decides from the weights themselves (plans_moe._mxfp4_moe_experts): ``scale_fold``."""
    if fmt != "mxfp4":
        return {}
    return {"scale_fold": scale_fold_exact([t for layer in layers for t in (layer[1], layer[3])])}


def sweep_variants(shape: dict, dev: DeviceInfo, plan: dict) -> list[tuple[str, str, dict]]:
    """(name, format, context overrides) of the variants --sweep times around the planner's choice (``plan``, what it
    took from the weights): dequantisation, scale folding, one-row path, PDL, split-K, blocks, pipeline depth, slot
    groups and the down projection's preload."""
    base = experts_context("mxfp4", shape["H"], shape["I"], shape["E"], dev, **plan)

    def blocks(kernel, path="gemm", **kv):
        section = json.loads(json.dumps(base[kernel]))
        section[path].update(kv)
        return {kernel: section}

    out = [("mx planner", "mxfp4", {})]
    out += [(f"mx dequant={dq}", "mxfp4", {"dequant": dq}) for dq in ("tl", "dot_scaled")]
    out.append((f"mx scale_fold={not base['scale_fold']}", "mxfp4", {"scale_fold": not base["scale_fold"]}))
    out.append(("mx one-row CUDA cores", "mxfp4", {k: {**base[k], "one_row_gemv": True} for k in ("gate_up", "down")}))
    out.append(("mx pdl=False", "mxfp4", {"pdl": False}))
    out.append(("mx gate_up SPLIT_K=2", "mxfp4", blocks("gate_up", SPLIT_K=2)))
    for kernel in ("gate_up", "down"):
        cur = base[kernel]["gemm"]
        out.append((f"mx {kernel} BLOCK_N={cur['BLOCK_N'] // 2} warps/2", "mxfp4",
                    blocks(kernel, BLOCK_N=cur["BLOCK_N"] // 2, num_warps=max(1, cur["num_warps"] // 2))))
        out.append((f"mx {kernel} BLOCK_N={cur['BLOCK_N'] * 2} warps*2", "mxfp4",
                    blocks(kernel, BLOCK_N=cur["BLOCK_N"] * 2, num_warps=cur["num_warps"] * 2)))
        out.append((f"mx {kernel} BLOCK_K={cur['BLOCK_K'] * 2}", "mxfp4", blocks(kernel, BLOCK_K=cur["BLOCK_K"] * 2)))
        for stages in (2, 4, 6):
            if stages != cur["num_stages"]:
                out.append((f"mx {kernel} num_stages={stages}", "mxfp4", blocks(kernel, num_stages=stages)))
    other_groups = 8 if base["groups"] != 8 else 16
    out.append((f"mx groups={other_groups}", "mxfp4", {"groups": other_groups, "down_groups": other_groups}))
    out.append((f"mx down_preload={not base['down_preload']}", "mxfp4", {"down_preload": not base["down_preload"]}))
    out.append(("mx down_preload, pdl=False", "mxfp4", {"down_preload": True, "pdl": False}))
    cu = base["cuda"]
    if cu:  # the CUDA decode kernels (templates/cuda/moe_experts_mxfp4.cu.j2) and their knobs
        out.append(("mx cuda=None (Triton decode)", "mxfp4", {"cuda": None}))
        fused = cu["fused"]
        if fused:  # experts_kernel: PDL, fewer consumer warps, other stage counts
            out.append((f"mx cuda fused pdl={not fused['pdl']}", "mxfp4",
                        {"cuda": {**cu, "fused": {**fused, "pdl": not fused["pdl"]}}}))
            out.append((f"mx cuda fused act_warp={not fused['act_warp']}", "mxfp4",
                        {"cuda": {**cu, "fused": {**fused, "act_warp": not fused["act_warp"]}}}))
            for hold in (0, 1, 2, 3, 4, 8):  # the block's last down units copied once it has arrived at the grid barrier
                if hold != fused["hold"]:
                    out.append((f"mx cuda fused hold={hold}", "mxfp4",
                                {"cuda": {**cu, "fused": {**fused, "hold": hold}}}))
            out.append((f"mx cuda fused sw={not fused['sw']}", "mxfp4",  # down by tile: a warp a slot, or F_WS
                        {"cuda": {**cu, "fused": {**fused, "sw": not fused["sw"]}}}))
            if fused["sw"]:  # a warp a slot: its pieces the other number at a time; its act all first or not
                np_other = 3 - fused["sw_np"]  # 1 <-> 2, where the slot's pieces pair up
                np_ok = (fused["warps"] // fused["du"]) % np_other == 0
                for kv in ({"sw_np": np_other}, {"sw_all": not fused["sw_all"]},
                           {"sw_np": np_other, "sw_all": not fused["sw_all"]}):
                    if "sw_np" in kv and not np_ok:
                        continue
                    name = " ".join(f"{k}={v}" for k, v in kv.items())
                    out.append((f"mx cuda fused {name}", "mxfp4", {"cuda": {**cu, "fused": {**fused, **kv}}}))
            for warps in (4, 16):  # other numbers of consumer warps, where they split H's chunks
                other = fused_context(shape["H"], shape["I"], dev, warps=warps)
                if other and other["warps"] != fused["warps"]:
                    out.append((f"mx cuda fused warps={warps}", "mxfp4", {"cuda": {**cu, "fused": other}}))
                    if other["sw"]:  # and with F_WS warps a slot in down by tile
                        out.append((f"mx cuda fused warps={warps} sw=False", "mxfp4",
                                    {"cuda": {**cu, "fused": {**other, "sw": False}}}))
                    most = fused_context(shape["H"], shape["I"], dev, warps=warps, max_stages=64)
                    if most["stages"] != other["stages"]:
                        out.append((f"mx cuda fused warps={warps} stages={most['stages']}", "mxfp4",
                                    {"cuda": {**cu, "fused": most}}))
            for by_slot in (0, 8, 24, 32, 64):  # down by slot past this many live slots (64: never)
                if by_slot != fused["by_slot"]:
                    out.append((f"mx cuda fused by_slot={by_slot}", "mxfp4",
                                {"cuda": {**cu, "fused": {**fused, "by_slot": by_slot}}}))
            for span in (2, 4, 16):  # by slot: tiles of H a unit
                if span != fused["range"] and span % fused["du"] == 0 and (shape["H"] // 16) % span == 0:
                    out.append((f"mx cuda fused range={span}", "mxfp4",
                                {"cuda": {**cu, "fused": {**fused, "range": span}}}))
            for stages in (2, 3, 6, 11):
                more = fused_context(shape["H"], shape["I"], dev, max_stages=stages)
                if more and more["stages"] != fused["stages"]:
                    out.append((f"mx cuda fused stages={more['stages']}", "mxfp4", {"cuda": {**cu, "fused": more}}))
        cu = {**cu, "fused": None}  # the rest: gate_up_kernel and down_kernel
        out.append(("mx cuda two kernels", "mxfp4", {"cuda": cu}))
        out.append(("mx cuda groups=8", "mxfp4", {"cuda": {**cu, "groups": 8}}))
        out.append(("mx cuda gu_depth=2", "mxfp4", {"cuda": {**cu, "gu_depth": 2}}))
        if cu["d_split"] == 2:
            out.append(("mx cuda d_split=1", "mxfp4", {"cuda": with_down(cu, shape["I"], d_split=1)}))
    return [(name, fmt, {**plan, **overrides}) for name, fmt, overrides in out]


SWEEP_CASES = ((1, "same"), (8, "same"), (8, "random"))


def case(text: str) -> tuple[int, str]:
    """'4r' -> (4, "random"), '4' -> (4, "same")."""
    return (int(text[:-1]), "random") if text.endswith("r") else (int(text), "same")


def run_sweep(variants, args, layers, shape, device, gen, reps: int, dev: DeviceInfo, fragments: dict,
              kernel_times: KernelTimes) -> list[dict]:
    """Time each variant at 1 row, 8 rows on the same experts and 8 rows on independent routes (and the cases of
    ``--more-cases``), ``args.repeats`` times round-robin (so drifts of the GPU spread over all variants alike); each
    row holds the median times, and the errors and per-kernel times of the first round."""
    variants = [v for v in variants if not args.only or any(o in v[0] for o in args.only)]
    rows_out, modules = {}, {}
    for round_ in range(args.repeats):
        for vname, vfmt, overrides in variants:
            row = rows_out.setdefault(vname, {"variant": vname, "overrides": overrides, "samples": {}})
            if "error" in row:
                continue
            try:
                if vname not in modules:
                    modules[vname] = launcher(kernel_module(vfmt, shape, dev, **overrides), fragments)
                for rows, regime in SWEEP_CASES + tuple(args.more_cases):
                    r = measure(vname, modules[vname], vfmt, layers, shape, rows, regime, device, gen, reps,
                                True, reference(vfmt), kernel_times=kernel_times if round_ == 0 else None,
                                hot_routes=args.routes == "hot")
                    tag = f"{rows}" if regime == "same" else f"{rows}r"
                    row["samples"].setdefault(tag, []).append(r["us"])
                    if round_ == 0:
                        row[f"err_{tag}"], row[f"kernel_us_{tag}"], row[f"bytes_{tag}"] = \
                            r["rel_err_vs_reference"], r["kernel_us"], r["bytes"]
            except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            if round_ == args.repeats - 1 and "error" not in row:
                for tag, times in row["samples"].items():
                    row[f"us_{tag}"] = statistics.median(times)
                    row[f"GBps_{tag}"] = row[f"bytes_{tag}"] / row[f"us_{tag}"] / 1e3
            print("  sweep", json.dumps({k: v for k, v in row.items() if k != "overrides"}), flush=True)
    return list(rows_out.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for bench_mxfp4_experts.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in the CPU interpreter")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel variants (GPU)")
    parser.add_argument("--reps", type=int, default=50, help="timed graph replays per measurement")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the sweep's variants (median kept)")
    parser.add_argument("--only", nargs="*", default=[], help="sweep only variants whose name contains one of these")
    parser.add_argument("--more-cases", nargs="*", default=[], type=case,
                        help="the sweep also times these row counts on independent routes, e.g. 2r 4r")
    parser.add_argument("--routes", choices=("cold", "hot"), default="cold",
                        help="cold: each layer its own route (read from DRAM); hot: one route for every layer (in "
                             "L2, as in a decode step where the router has just written it)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    shape = MINI if cuda else SMOKE
    reps = args.reps if cuda else 1
    hot = args.routes == "hot"
    dev = device_info(device)
    gen = torch.Generator(device=device).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    t_start = time.time()

    # device-to-device copy of 1 GiB, bytes read + written per second
    copy_bw = common.measure_bandwidth(device, 1 << 30)["copy"]["bytes_per_s"] if cuda else None
    if copy_bw:
        print(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")
    results, sweep, plans = [], [], {}
    kernel_times = KernelTimes()  # CUPTI once every timing is done (it slows every later call)
    kept = []  # each format's weights, alive until then (about 22 GB at mini shapes): the timed graphs read them
    for fmt in ("mxfp4", "dense"):
        layers = make_layers(fmt, shape, device, gen)
        plan = plans[fmt] = planned(fmt, layers)
        fragments = fragments_for(fmt, layers)
        kernels = [("tilec mxfp4" if fmt == "mxfp4" else "tilec bf16", kernel_module(fmt, shape, dev, **plan))]
        if fmt == "mxfp4" and hasattr(kernels[0][1], "CUDA_SOURCE"):  # the planner's CUDA decode, and without it
            kernels.append(("tilec mxfp4 triton", kernel_module(fmt, shape, dev, **plan, cuda=None)))
        for name, module in kernels:
            for rows in shape["rows"]:
                for regime in (["same", "random"] if rows > 1 else ["same"]):
                    r = measure(name, launcher(module, fragments), fmt, layers, shape, rows, regime, device, cpu_gen,
                                reps, True, reference(fmt), kernel_times=kernel_times, hot_routes=hot)
                    results.append(r)
                    print(f"  {r['kernel']:18s} rows={rows} {regime:6s} {r['us']:8.1f} us  {r['GBps']:7.0f} GB/s  "
                          f"err {r['rel_err_vs_reference']:.1e}", flush=True)
        if fmt == "mxfp4" and cuda:  # the floor: a plain read of the same number of bytes
            for r in measure_read_floor(shape, ((1, "same"), (8, "same"), (8, "random")), device, cpu_gen, reps,
                                        hot):
                results.append(r)
                print(f"  {r['kernel']:18s} rows={r['rows']} {r['regime']:6s} {r['us']:8.1f} us  "
                      f"{r['GBps']:7.0f} GB/s", flush=True)
        for rows in shape["rows"]:
            ref_reps = max(1, reps // 10)
            r = measure("reference", reference(fmt), fmt, layers, shape, rows, "same", device, cpu_gen, ref_reps,
                        False, hot_routes=hot)
            results.append(r)
            print(f"  {r['kernel']:12s} rows={rows} same   {r['us']:8.1f} us  {r['GBps']:7.0f} GB/s", flush=True)
        if args.sweep and cuda and fmt == "mxfp4":
            sweep += run_sweep(sweep_variants(shape, dev, plan), args, layers, shape, device, cpu_gen, reps, dev,
                               fragments, kernel_times)
        kept.append((layers, fragments))
    kernel_times.collect()
    del kept

    for r in results:
        r["fraction_of_copy_bw"] = r["GBps"] * 1e9 / copy_bw if copy_bw else None
    one = {(r["kernel"], r["format"]): r["us"] for r in results if r["rows"] == 1}
    for r in results:
        base = one.get((r["kernel"], r["format"]))
        r["time_vs_1_row"] = r["us"] / base if base else None
    floor = {(r["rows"], r["regime"]): r for r in results if r["kernel"] == "read floor"}
    for r in results:
        f = floor.get((r["rows"], r["regime"])) if r["format"] == "mxfp4" else None
        r["time_vs_read_floor"] = r["us"] / f["us"] if f else None
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_mxfp4_experts", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu interpreter ({platform.machine()})",
        "torch": torch.__version__, "triton": __import__("triton").__version__, "shape": shape,
        "copy_bandwidth_Bps": copy_bw, "timing": "CUDA-graph replay over LAYERS layers (kernels), eager (reference); "
        "median us per call; kernel_us by torch.profiler (CUPTI) after every timing", "routes": args.routes,
        "planned_from_weights": plans, "results": results, "sweep": sweep,
        "seconds": time.time() - t_start,
    }
    common.write_json(out_dir / "bench_mxfp4_experts.json", report)
    print_table(results, sweep)
    print(f"wrote {out_dir / 'bench_mxfp4_experts.json'} ({time.time() - t_start:.0f} s)")


def print_table(results: list[dict], sweep: list[dict]) -> None:
    """The short table: time, bytes, bandwidth and its fraction of the copy bandwidth, cost against one row."""
    print(f"\n{'kernel':18s} {'format':6s} {'rows':>4s} {'regime':6s} {'us':>7s} {'MB read':>7s} {'us/MB':>6s} "
          f"{'GB/s':>5s} {'of copy':>7s} {'vs 1 row':>8s} {'rel err':>8s}")
    for r in results:
        frac = f"{100 * r['fraction_of_copy_bw']:6.1f}%" if r["fraction_of_copy_bw"] else "     -"
        err = f"{r['rel_err_vs_reference']:.1e}" if r["rel_err_vs_reference"] is not None else "-"
        ratio = f"{r['time_vs_1_row']:.2f}x" if r["time_vs_1_row"] else "-"
        mb = r["bytes"] / 1e6
        print(f"{r['kernel']:18s} {r['format']:6s} {r['rows']:4d} {r['regime']:6s} {r['us']:7.1f} {mb:7.2f} "
              f"{r['us'] / mb:6.2f} {r['GBps']:5.0f} {frac:>7s} {ratio:>8s} {err:>8s}")
    mx = {(r["rows"], r["regime"]): r for r in results if r["kernel"] == "tilec mxfp4"}
    if (1, "same") in mx and (8, "same") in mx and mx[(1, "same")]["fraction_of_copy_bw"]:
        print(f"goals: MXFP4 1 row at {100 * mx[(1, 'same')]['fraction_of_copy_bw']:.0f}% of copy bandwidth "
              f"(goal >= 70%); 8 rows (same experts) {mx[(8, 'same')]['time_vs_1_row']:.2f}x one row (goal <= 1.3x)")
        if mx[(1, "same")].get("time_vs_read_floor"):
            print("time against a plain read of the same bytes (read floor): " + ", ".join(
                f"{rows} {regime} {r['time_vs_read_floor']:.2f}x" for (rows, regime), r in sorted(mx.items())
                if r.get("time_vs_read_floor")))
    if sweep:
        print(f"\n{'sweep variant':34s} {'us 1 row':>8s} {'(gate_up':>8s} {'down)':>6s} {'8 rows':>7s} {'8/1':>5s} "
              f"{'8 random':>8s} {'GB/s':>5s} {'err':>8s}")
        for row in sweep:
            if "error" in row:
                print(f"{row['variant']:34s} failed: {row['error'][:70]}")
            else:
                k1 = row.get("kernel_us_1") or {}
                gu = sum(v for n, v in k1.items() if "gate_up" in n)
                dn = sum(v for n, v in k1.items() if "down" in n)
                err = max(row[f"err_{t}"] or 0 for t in ("1", "8", "8r"))
                print(f"{row['variant']:34s} {row['us_1']:8.1f} {gu:8.1f} {dn:6.1f} {row['us_8']:7.1f} "
                      f"{row['us_8'] / row['us_1']:5.2f} {row['us_8r']:8.1f} {row['GBps_8r']:5.0f} {err:8.1e}")


if __name__ == "__main__":
    main()
