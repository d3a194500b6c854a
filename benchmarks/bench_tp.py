"""Tensor-parallel decode: the same MiMo preset greedy-decoded on 1, 2, ... GPUs, next to each rank's HBM floor.

    python3 benchmarks/bench_tp.py --out DIR [--preset mini] [--worlds 1,2] [--context 256] [--steps 64]
        [--precisions bf16,mxfp4] [--all-reduce auto,nccl]

For each number of GPUs (``--worlds``), `tilec.runtime.distributed.launch` starts one process per GPU; every process
builds the preset with the same random weights (bench_decode's ``build_model``), compiles it for the ``triton`` target
with ``Options(tensor_parallel=world)`` (and MXFP4 experts for ``mxfp4``), prefills a random prompt of ``--context``
tokens and times greedy decode steps through a session (CUDA events around each step, as bench_decode). Rank 0 records
the median ms a token, the first greedy tokens, and the first decode step's logits' relative error against the run on
the fewest GPUs. The floor is the bytes one rank's step reads (``tilec.cost.step_bytes`` of its graph) over that GPU's
measured copy bandwidth. ``--all-reduce`` also times each setting of ``TILEC_ALL_REDUCE`` (the one-shot sum through
symmetric memory, or NCCL's collective) for worlds above 1, and a microbenchmark times one sum of a decode step's
size (one row, and 8) both ways, 200 calls replayed in a CUDA graph.

Writes ``DIR/bench_tp.json`` after every world and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import common  # noqa: E402
import tilec  # noqa: E402
from tilec.cost import step_bytes  # noqa: E402
from tilec.runtime import distributed  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--preset", default="mini")
    p.add_argument("--worlds", default="1,2", help="numbers of GPUs, comma-separated (default 1,2)")
    p.add_argument("--context", type=int, default=256, help="prompt length (default 256)")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps (default 64)")
    p.add_argument("--warmup", type=int, default=6, help="untimed decode steps first (default 6)")
    p.add_argument("--precisions", default="bf16,mxfp4")
    p.add_argument("--all-reduce", default="auto,nccl", help="TILEC_ALL_REDUCE settings to time (default auto,nccl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bw-mib", type=int, default=1024, help="bytes of the bandwidth measurement, MiB (default 1024)")
    args = p.parse_args(argv)
    args.worlds = [int(w) for w in args.worlds.split(",")]
    args.precisions = args.precisions.split(",")
    args.all_reduce = args.all_reduce.split(",")
    return args


def time_sums(tp, rows_list=(1, 8), hidden: int = 2048, calls: int = 200) -> dict:
    """us a sum of [rows, hidden] bf16 takes, each way, replayed as a CUDA graph of ``calls`` sums."""
    out = {}
    for rows in rows_list:
        x = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
        for method in ("auto", "nccl"):
            os.environ["TILEC_ALL_REDUCE"] = method
            distributed.all_reduce_(x.clone(), distributed.WORLD)  # buffers and communicators made outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    distributed.all_reduce_(x.clone(), distributed.WORLD)
            graph.replay()
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) * 1e3 / calls)
            out[f"{rows}x{hidden} {method}"] = {"us": sorted(times)[len(times) // 2],
                                                "path": distributed.all_reduce_method(x) if method == "auto"
                                                else "collective"}
    os.environ.pop("TILEC_ALL_REDUCE", None)
    return out


def run_rank(tp, args: argparse.Namespace, out_dir: Path) -> None:
    import bench_decode

    device = torch.device("cuda", torch.cuda.current_device())
    result = {"world": tp.world, "runs": {}}
    bw = common.measure_bandwidth(device, args.bw_mib * 2**20)
    result["copy_bytes_per_s"] = bw["copy"]["bytes_per_s"]
    if tp.world > 1:
        result["sums"] = time_sums(tp)
    t0 = time.perf_counter()
    model = bench_decode.build_model(args.preset, device, args.seed)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.context), generator=gen).to(device)
    methods = args.all_reduce if tp.world > 1 else ["-"]
    for precision in args.precisions:
        options = tilec.Options(tensor_parallel=tp.world, mxfp4=precision == "mxfp4")
        for method in methods:
            if method != "-":
                os.environ["TILEC_ALL_REDUCE"] = method
            # a model of its own for each method: its CUDA graphs capture the sums that method makes
            t0 = time.perf_counter()
            cm = tilec.compile(model, target="triton", options=options)
            compile_s = time.perf_counter() - t0
            nbytes = step_bytes(cm.graph, args.context)
            session_len = args.context + args.warmup + args.steps + 8
            session = cm.new_session(1, max(session_len, cm.options.max_seq_len))
            decoded = bench_decode.decode(session.step, session.step, prompt, args.warmup, args.steps, device)
            stats = common.summarize(decoded.samples_ms)
            key = f"{precision}" + (f" {method}" if method != "-" else "")
            result["runs"][key] = {
                "ms_per_token": stats, "wall_ms_per_token": decoded.wall_ms_per_token,
                "prefill_ms": decoded.prefill_ms, "tokens": decoded.tokens[:16],
                "step_bytes": nbytes, "floor_ms": nbytes["total"] / result["copy_bytes_per_s"] * 1e3,
                "compile_s": round(compile_s, 1), "graph_captures": cm.graph_captures,
                "description": cm.info.description,
            }
            if tp.rank == 0:
                torch.save(decoded.first_logits, out_dir / f"logits_w{tp.world}_{key.replace(' ', '_')}.pt")
            del session, cm
            torch.cuda.empty_cache()
        os.environ.pop("TILEC_ALL_REDUCE", None)
    if tp.rank == 0:
        common.write_json(out_dir / f"bench_tp_w{tp.world}.json", result)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"environment": common.environment(torch.device("cuda")), "args": {k: str(v) for k, v in
                                                                              vars(args).items()}, "worlds": {}}
    for world in args.worlds:
        t0 = time.perf_counter()
        distributed.launch(run_rank, world, args, args.out)
        print(f"world {world}: {time.perf_counter() - t0:.0f} s", flush=True)
        import json

        summary["worlds"][str(world)] = json.loads((args.out / f"bench_tp_w{world}.json").read_text())
        common.write_json(args.out / "bench_tp.json", summary)
    base = min(args.worlds)
    rows = []
    for world in args.worlds:
        for key, run in summary["worlds"][str(world)]["runs"].items():
            logits = torch.load(args.out / f"logits_w{world}_{key.replace(' ', '_')}.pt")
            ref = torch.load(args.out / f"logits_w{base}_{key.split()[0]}.pt")
            run["first_logits_rel_err_vs_fewest"] = common.rel_err(logits, ref)
            ms = run["ms_per_token"]["median"]
            rows.append([world, key, f"{ms:.3f}", f"{run['floor_ms']:.3f}", f"{run['floor_ms'] / ms:.2f}",
                         f"{run['first_logits_rel_err_vs_fewest']:.2e}", run["tokens"][:6]])
    common.write_json(args.out / "bench_tp.json", summary)
    print(common.format_table(["GPUs", "run", "ms/token", "floor ms", "of floor", "rel err", "tokens"], rows))
    for world in args.worlds:
        for key, value in summary["worlds"][str(world)].get("sums", {}).items():
            print(f"world {world} sum {key}: {value['us']:.2f} us ({value['path']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
