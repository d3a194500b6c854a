"""Time to first token: a prompt's prefill, warm, on tilec's triton target (bf16, and with MXFP4 experts) beside
transformers' eager MiMoV2FlashForCausalLM over the very same weights.

    python3 benchmarks/bench_prefill.py --out out/prefill                  # GPU: mini, prompts of 32 to 4096 tokens
    python3 benchmarks/bench_prefill.py --out out/prefill --smoke          # CPU: tiny on the reference target

Each tilec prefill runs a random prompt into a fresh session, its cache as long as generate() makes it (at least the
compile option's max_seq_len on a GPU), after one untimed prefill of the same length (Triton compiles the kernels of
that length's tiles then). HF runs its forward over the prompt. Two clocks each:
- the host's wall time from the call until the logits are ready (synchronised before and after);
- on a GPU, the span between CUDA events recorded around the call.
A wall time far above the GPU span means the prefill waits on the host launching its kernels. Medians of --repeats.
torch.compile is not a peer here: it would compile again for every prompt length. With --profile, each entry's GPU
time per kernel too. Writes DIR/bench_prefill.json and prints a line per measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from a source checkout
sys.path.insert(1, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_decode import build_model, hf_sharing_weights  # noqa: E402

import tilec  # noqa: E402


def tilec_prefill(cm, ids: torch.Tensor) -> torch.Tensor:
    """The prompt's logits from a fresh session whose cache is as long as generate() would make it."""
    return cm.new_session(1, cm.generation_length(ids.shape[1] + 1)).step(ids)


def time_prefill(prefill, prompt: torch.Tensor, repeats: int) -> dict:
    """Medians over ``repeats`` timed calls of ``prefill(prompt)``, after two untimed calls (the second captures a
    short prompt's CUDA graph, which the timed calls replay)."""
    gpu = prompt.is_cuda
    prefill(prompt)
    prefill(prompt)
    walls, spans = [], []
    for _ in range(repeats):
        if gpu:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        prefill(prompt)
        if gpu:
            end.record()
            torch.cuda.synchronize()
            spans.append(start.elapsed_time(end))
        walls.append((time.perf_counter() - t) * 1e3)
    return {"wall_ms": round(statistics.median(walls), 4),
            "gpu_ms": round(statistics.median(spans), 4) if spans else None,
            "wall_ms_runs": [round(w, 4) for w in walls]}


def host_profile(run, repeats: int, path: Path) -> dict:
    """Host time of ``run`` per Python function (cProfile, ``repeats`` calls after one untimed): the 40 functions
    with the most time of their own are written to ``path``. cProfile slows Python several-fold, so its times say
    where the host's time goes, not how long a prefill takes."""
    import cProfile
    import io
    import pstats

    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(repeats):
        run()
    prof.disable()
    wall = (time.perf_counter() - t) / repeats
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    return {"host_ms": round(wall * 1e3, 3), "calls": stats.total_calls // repeats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory for bench_prefill.json")
    ap.add_argument("--smoke", action="store_true", help="CPU: the tiny preset on the reference target")
    ap.add_argument("--prompts", default="",
                    help="prompt lengths, comma-separated (default 32,256,1024,4096; with --smoke 8,24)")
    ap.add_argument("--repeats", type=int, default=5, help="timed prefills of each (the median is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="GPU: also each entry's GPU time per kernel (torch.profiler), after all timing")
    ap.add_argument("--host-profile", action="store_true",
                    help="also each tilec entry's host time per Python function (cProfile) over `--repeats` prefills "
                    "of the shortest prompt, after all timing: host_profile_<entry>.txt under --out")
    ap.add_argument("--prefill-graph-rows", type=int, default=tilec.Options.prefill_graph_rows,
                    help="Options.prefill_graph_rows of the tilec entries (0: every prompt runs directly)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if gpu else "cpu")
    try:
        prompts = [int(p) for p in (args.prompts or ("32,256,1024,4096" if gpu else "8,24")).split(",")]
    except ValueError:
        ap.error(f"--prompts {args.prompts!r}: expected lengths such as 32,256,1024")
    if not prompts or min(prompts) < 1:
        ap.error(f"--prompts {args.prompts!r}: lengths must be positive")
    t0 = time.perf_counter()
    model = build_model("mini" if gpu else "tiny", device, args.seed)
    options = tilec.Options(max_seq_len=max(prompts) + 8, prefill_graph_rows=args.prefill_graph_rows)
    entries = {}
    if gpu:
        for name, mx in (("triton", False), ("triton-mxfp4", True)):
            entries[name] = tilec.compile(model, target="triton", options=options.replace(mxfp4=mx))
    else:
        entries["reference"] = tilec.compile(model, options=options)
    hf = hf_sharing_weights(model, None) if gpu else None  # the peer: the same tensors, not a copy

    def prefill_hf(ids):
        with torch.no_grad():
            return hf(input_ids=ids).logits
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    for length in prompts:
        prompt = torch.randint(0, vocab, (1, length), generator=gen).to(device)
        for name, cm in entries.items():
            captures = cm.graph_captures
            results.append({"entry": name, "prompt": length,
                            **time_prefill(lambda ids, cm=cm: tilec_prefill(cm, ids), prompt, args.repeats),
                            "graph_captures": cm.graph_captures - captures,
                            # what stays allocated after this entry's prefills (its kept graphs' buffers included)
                            "allocated_mb": round(torch.cuda.memory_allocated(device) / 2**20, 1) if gpu else None})
            print(f"  {name:14s} prompt {length:5d}  wall {results[-1]['wall_ms']:9.3f} ms"
                  + (f"  gpu {results[-1]['gpu_ms']:9.3f} ms  allocated {results[-1]['allocated_mb']:9.1f} MB"
                     if gpu else ""), flush=True)
        if hf is not None:
            results.append({"entry": "hf", "prompt": length, **time_prefill(prefill_hf, prompt, args.repeats)})
            print(f"  {'hf':14s} prompt {length:5d}  wall {results[-1]['wall_ms']:9.3f} ms"
                  f"  gpu {results[-1]['gpu_ms']:9.3f} ms", flush=True)
    profiles = []
    if gpu and args.profile:  # after every timed call: CUPTI slows later launches (common.kernel_gpu_times)
        for length in prompts:
            prompt = torch.randint(0, vocab, (1, length), generator=gen).to(device)
            runs = {name: (lambda cm=cm: tilec_prefill(cm, prompt)) for name, cm in entries.items()}
            runs["hf"] = lambda: prefill_hf(prompt)
            for name, run in runs.items():
                kernels = common.kernel_gpu_times(run, 2)
                top = sorted(kernels.items(), key=lambda kv: -kv[1][1])
                total = sum(us for _, us in kernels.values())
                profiles.append({"entry": name, "prompt": length, "gpu_us": round(total, 1), "kernels": [
                    {"kernel": k, "launches": n, "gpu_us": round(us, 1)} for k, (n, us) in top]})
                print(f"  {name} prompt {length}: kernels {total / 1e3:.3f} ms on the GPU; the most:", flush=True)
                for k, (n, us) in top[:8]:
                    print(f"    {us / 1e3:9.3f} ms  {n:6.0f} launches  {k[:90]}")
    out = Path(args.out)
    host = []
    if args.host_profile:
        prompt = torch.randint(0, vocab, (1, min(prompts)), generator=gen).to(device)
        for name, cm in entries.items():
            host.append({"entry": name, "prompt": min(prompts),
                         **host_profile(lambda cm=cm: tilec_prefill(cm, prompt), args.repeats,
                                        out / f"host_profile_{name}.txt")})
            print(f"  {name} prompt {min(prompts)}: {host[-1]['host_ms']:.3f} ms of host time a prefill under "
                  f"cProfile, {host[-1]['calls']} Python calls", flush=True)
    common.write_json(out / "bench_prefill.json", {
        "benchmark": "bench_prefill", "environment": common.environment(device), "preset": "mini" if gpu else "tiny",
        "prompts": prompts, "repeats": args.repeats, "prefill_graph_rows": args.prefill_graph_rows,
        "timing": "wall: host clock around a synchronised call; gpu: "
        "CUDA events around it; medians", "results": results, "profiles": profiles,
        "host_profiles": host,
        "seconds": round(time.perf_counter() - t0, 1)})
    print(f"wrote {out / 'bench_prefill.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
