"""Where a decode step's time goes: GPU time per Triton kernel inside the CUDA graph, beside the graph's wall time.

    python3 benchmarks/profile_step.py --out out/prof            # bf16 `mini`, triton target, context 256
    python3 benchmarks/profile_step.py --out out/prof --mxfp4
    python3 benchmarks/profile_step.py --out out/prof --mxfp4 --rows 8   # a DFlash verify step: 8 rows at once

The step runs as decoding runs it, a CUDA graph replay; torch.profiler (CUPTI) records each kernel's GPU time inside
the graph, grouped by kernel function (with the generated modules defining it). The graph's wall time minus the
kernels' summed time is what launches and the gaps between kernels cost: the share a persistent kernel would win
back (with programmatic dependent launch a kernel starts early and waits inside, so that share can read negative).
A second table gives each kernel module's launches per step and the weight bytes they read (stacked experts: only
the experts routed to), with the HBM floor of those bytes at the measured copy bandwidth.

With ``--rows`` N > 1 each step feeds N random tokens at the same positions, as DFlash's verify step does (its rows
route to different experts), and leaves the context as it was, so every step sees the same one.

Writes ``DIR/profile_step.json`` and prints both tables. Needs a GPU.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import common  # noqa: E402
import tilec  # noqa: E402
from tilec.models import build_model  # noqa: E402
from tilec.runtime.cuda_graph import GraphedStep  # noqa: E402
from tilec.runtime.kv_cache import layout_from_graph  # noqa: E402
from tilec.runtime.session import DecodeSession  # noqa: E402


def weight_bytes(args) -> int:
    """Bytes of weights one launch must read: 2-D and 3-D tensors (KV caches are 4-D), and of stacked expert weights
    only the experts the launch's router indices name."""
    ids = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int64 and a.dim() >= 2]
    used = int(ids[0].unique().numel()) if ids else None
    total = 0
    for a in args:
        if not isinstance(a, torch.Tensor) or a.dim() not in (2, 3) or a.numel() < 4096 or a.dtype == torch.int64:
            continue
        nbytes = a.numel() * a.element_size()
        if a.dim() == 3 and used is not None:
            nbytes = nbytes * used // a.shape[0]
        total += nbytes
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--mxfp4", action="store_true")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=1, help="tokens a step (DFlash's verify step: 8), at most 8")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="the cache's positions (default: the context plus 2 x steps + 128). bench_decode.py "
                         "sizes each session's cache to its context plus 78, so it never decodes a short context "
                         "in a large cache; this option does (a server's max_seq_len)")
    args = ap.parse_args(argv)
    if not 1 <= args.rows <= 8:
        ap.error("--rows must be 1 to 8 (the decode graph's rows)")
    if not torch.cuda.is_available():
        print("profile_step.py needs a GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    model = build_model(args.preset, device=device)
    length = args.max_seq_len or args.context + 2 * args.steps + 128
    cm = tilec.compile(model, target="triton", options=tilec.Options(mxfp4=args.mxfp4, max_seq_len=length))
    program = cm.program
    program.load()
    specs = layout_from_graph(cm.graph, 1, length, cm.options.spec_rows)
    bandwidth = common.measure_bandwidth(device, 2 << 30)["copy"]["bytes_per_s"]

    # Weight bytes each kernel module's launches read in one decode step (an eager step, counted at the launches).
    reads: dict[str, int] = defaultdict(int)
    launches: dict[str, int] = defaultdict(int)

    def count(alias: str, args: tuple, _out) -> None:
        if not alias.endswith("_embedding"):  # a gather: one row of the table per token
            reads[alias] += weight_bytes(args)
        launches[alias] += 1

    session = DecodeSession(program, specs, batch=1, max_seq_len=length, device=device)
    ids = torch.randint(0, cm.vocab_size, (1, args.context), device=device)
    token = session.step(ids)[:, -1:].argmax(-1)
    block = torch.randint(0, cm.vocab_size, (1, args.rows), device=device)  # --rows > 1: the rows of a verify step
    with program.observing(count):  # weight_bytes synchronises: an eager step, never inside a graph capture
        token = session.step(token if args.rows == 1 else block)[:, -1:].argmax(-1)

    # Decode steps as CUDA graph replays (as decoding runs them): wall time, then GPU time per kernel function.
    graphed = DecodeSession(GraphedStep(program, max_rows=8), specs, batch=1, max_seq_len=length, device=device)
    graphed.step(ids)
    tok = token.clone()
    at = graphed.length

    def one():  # one token a step, the context growing; or the verify rows, every step at the same positions
        return graphed.step(tok) if args.rows == 1 else graphed.step(block, start=at, advance=0)

    samples = common.time_calls(one, device, repeats=args.steps, warmup=5)
    graph_us = common.summarize(samples)["median"] * 1e3
    times = common.kernel_gpu_times(one, args.steps)
    owners = defaultdict(list)  # kernel function -> the modules defining it
    for k in program.kernels:
        for name in re.findall(r"^def (\w+)\(", k.source, flags=re.M):
            owners[name].append(k.alias)
    kernels = [{"kernel": name, "modules": owners.get(name, []), "per_step": launches, "gpu_us_per_step": us}
               for name, (launches, us) in times.items()]
    kernels.sort(key=lambda r: -r["gpu_us_per_step"])
    total_gpu = sum(r["gpu_us_per_step"] for r in kernels)
    modules_rows = [{"module": k.alias, "launches": launches[k.alias], "weight_MB": reads[k.alias] / 1e6,
                     "floor_us": reads[k.alias] / bandwidth * 1e6} for k in program.kernels]
    result = {"benchmark": "profile_step", "created": common.now_iso(), "environment": common.environment(device),
              "preset": args.preset, "mxfp4": args.mxfp4, "context": args.context, "rows": args.rows,
              "copy_Bps": bandwidth,
              "graph_step_us": graph_us, "kernels_gpu_us_per_step": total_gpu,
              "gaps_us_per_step": graph_us - total_gpu,
              "floor_us": sum(r["floor_us"] for r in modules_rows), "per_kernel": kernels, "per_module": modules_rows}
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "profile_step.json", result)
    print(f"{args.preset} {'mxfp4' if args.mxfp4 else 'bf16'} ctx {args.context}, {args.rows} row(s): a CUDA-graph "
          f"step takes {graph_us:.1f} us; its kernels run {total_gpu:.1f} us of it, launches and gaps "
          f"{graph_us - total_gpu:.1f} us; weight floor {result['floor_us']:.1f} us")
    if program.dev.pdl:
        print("(programmatic dependent launch: CUPTI counts each kernel from its early start, so its time includes "
              "waiting for the one before; TILEC_PDL=0 gives per-kernel times without it)")
    print(common.format_table(["kernel", "modules", "per_step", "gpu_us", "share"],
                              [[r["kernel"][:40], ",".join(r["modules"])[:40], r["per_step"], r["gpu_us_per_step"],
                                r["gpu_us_per_step"] / total_gpu] for r in kernels[:20]]))
    print(common.format_table(["module", "launches", "weight_MB", "floor_us"],
                              [[r["module"], r["launches"], r["weight_MB"], r["floor_us"]] for r in modules_rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
