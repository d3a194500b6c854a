"""DFlash decoding speed and acceptance beside plain greedy decoding, on random weights.

    python3 benchmarks/bench_dflash.py --out out/bench            # GPU: bf16 `mini`; no GPU: fp32 `tiny` on the CPU
    python3 benchmarks/bench_dflash.py --out out/bench --preset tiny --tokens 65

Three runs of the same greedy generation (batch 1, random prompt):
- ``plain``: one target step per token;
- ``oracle``: an `OracleDraft` proposing the target's own continuation, so every proposal is accepted: the ceiling
  of the system at block 8 (what a perfect draft would give; the draft itself costs nothing here);
- ``random_draft``: a randomly initialised DFlash draft (almost nothing accepted): the floor, paying for the draft and
  for verifying 8 rows per token.

The oracle's continuation is the target's own greedy output. In bf16 the verify step (8 rows) may round differently
from plain decoding (1 row) and flip a near-tie; then the run continues from the verify step's choice and the oracle
is re-derived from that output until it is a fixed point (at most a few passes, reported as ``oracle_passes``).

For the two drafted runs, one more generation is taken apart round by round (``phases``): each round's wall time
(it ends with the host reading how many proposals were accepted), the GPU's span of the draft's forward and of the
target's verify step (CUDA events around each; on the CPU, wall time), and what is left: accepting, the rollback, and
the host's launches the GPU waited for. Medians over the rounds, in ms; beside them the prefill's wall time (a short
prompt's CUDA graph replayed, see Options.prefill_graph_rows) and how many CUDA graphs the target captured during that
generation.

Writes ``DIR/bench_dflash.json`` and prints a short table. Timings exclude compilation; each run is done twice
untimed first (warm-up; the second captures the prompt's CUDA graph) and then timed ``--repeats`` times (5 by
default): the table shows the median run, the JSON every run's tokens/s too. (One timed run of 129 tokens lasts 40
to 150 ms of host-driven rounds; single runs of the same build varied by up to 12% on the H100, 741 to 833 tokens/s
for bf16 plain decoding.)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from a source checkout
sys.path.insert(1, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import tilec  # noqa: E402
from tilec.models import build_model  # noqa: E402
from tilec.models.dflash import build_draft  # noqa: E402
from tilec.runtime.dflash import OracleDraft, Sampler, SpeculativeDecoder, as_drafter, session_length  # noqa: E402

BLOCK = 8


def random_model(preset: str, device: str, seed: int):
    """A MiMo preset with random weights on ``device``. On a GPU the numbers are drawn there, with the rules of
    ``MiMoForCausalLM.init_weights`` (drawing 7B numbers on the CPU takes minutes)."""
    if device == "cpu":
        return build_model(preset, seed=seed)
    model = build_model(preset, device="meta")
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            noise = torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32)
            if name.endswith("norm.weight"):
                noise = 1.0 + 0.1 * noise
            elif name.endswith("e_score_correction_bias"):
                noise = 0.05 * noise
            elif not name.endswith("sinks"):
                noise = std * noise
            t.copy_(noise.to(t.dtype))
            del noise
    return model.eval()


def graph_captures(*models) -> int:
    """CUDA graphs captured so far by these compiled models (an oracle draft counts 0)."""
    return sum(m.graph_captures for m in models if isinstance(m, tilec.CompiledModel))


def run(cm, prompt, tokens, draft=None, repeats: int = 1):
    """(output, stats, every timed run's tokens/s, graphs captured during the timed runs) of two warm-up runs (a short
    prompt's CUDA graph is captured the second time it is seen) and then ``repeats`` timed ones: the output and stats
    of the median run (each run gives the same tokens)."""
    for _ in range(2):
        cm.generate(prompt, tokens, draft=draft)
    before = graph_captures(cm, draft)
    timed = [cm.generate(prompt, tokens, draft=draft, return_stats=True) for _ in range(max(1, repeats))]
    out, stats = sorted(timed, key=lambda run_: run_[1].seconds)[len(timed) // 2]
    return out, stats, [round(s.tokens_per_s, 3) for _, s in timed], graph_captures(cm, draft) - before


def round_phases(cm, prompt, tokens: int, draft) -> dict:
    """Medians over the rounds of one greedy generation (after two warm-up ones: a short prompt's CUDA graph is
    captured the second time it is seen): the round's wall time and the spans of its draft forward and verify step,
    in ms (see the module's docstring)."""
    gpu = prompt.is_cuda

    def span(fn, into: list):
        def timed(*args, **kwargs):
            if gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                into.append((start, end))
            else:
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                into.append(time.perf_counter() - t)
            return out
        return timed

    for _ in range(3):  # two warm-up generations, then the timed one
        decoder = None  # gone first (the timing wrappers make cycles: collected), so the new one's session takes
        gc.collect()  # its caches and CUDA graphs
        decoder = SpeculativeDecoder(cm, as_drafter(draft, cm), 1, session_length(cm, prompt.shape[1], tokens, BLOCK),
                                     Sampler(0.0, 1.0, None))
        captured = decoder.target.graph_captures
        if gpu:
            torch.cuda.synchronize()
        t = time.perf_counter()
        decoder.prefill(prompt)
        if gpu:
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t
        produced, drafts, verifies, rounds = 1, [], [], []
        decoder.drafter.propose = span(decoder.drafter.propose, drafts)
        decoder.session.step = span(decoder.session.step, verifies)
        while produced < tokens:
            marks = len(drafts), len(verifies)
            t = time.perf_counter()
            new, _ = decoder.round(BLOCK)  # whole blocks, as dflash_generate; ends on the host reading the acceptance
            # (wall, the round's draft spans (none for a 1-row round, which drafts nothing), its verify spans)
            rounds.append((time.perf_counter() - t, drafts[marks[0]:], verifies[marks[1]:]))
            produced += new.shape[1]
        if gpu:
            torch.cuda.synchronize()
        captured = decoder.target.graph_captures - captured

    def seconds(timed: list) -> float:
        if len(timed) != 1:
            raise RuntimeError(f"a round timed {len(timed)} calls where one was expected")
        return timed[0][0].elapsed_time(timed[0][1]) / 1e3 if gpu else timed[0]
    walls = [wall for wall, _, _ in rounds]
    drafts = [seconds(d) if d else 0.0 for _, d, _ in rounds]
    verifies = [seconds(v) for _, _, v in rounds]
    rest = [w - d - v for w, d, v in zip(walls, drafts, verifies)]

    def ms(xs):
        return round(1e3 * sorted(xs)[len(xs) // 2], 4)
    return {"rounds": len(walls), "round_ms": ms(walls), "draft_ms": ms(drafts), "verify_ms": ms(verifies),
            "rest_ms": ms(rest), "rounds_total_ms": round(1e3 * sum(walls), 4),
            "prefill_ms": round(1e3 * prefill_s, 4), "target_graph_captures": captured,
            "timing": "CUDA events" if gpu else "wall clock (CPU)"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for bench_dflash.json")
    parser.add_argument("--preset", help="MiMo preset (default: mini on a GPU, tiny on the CPU)")
    parser.add_argument("--target", default="auto", choices=("reference", "triton", "cuda", "auto"))
    parser.add_argument("--tokens", type=int, default=129, help="new tokens per run (1 + a multiple of 8 lets every "
                                                                "oracle round be a full block)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--draft-layers", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mxfp4", action="store_true", help="MXFP4 experts (Options(mxfp4=True)) in target and draft")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (the median is reported)")
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    preset = args.preset or ("mini" if gpu else "tiny")
    if not gpu:
        torch.set_num_threads(1)  # small models: more threads only add synchronisation
    t0 = time.perf_counter()
    model = random_model(preset, device, args.seed)
    built_s = time.perf_counter() - t0
    max_len = args.prompt_len + args.tokens + BLOCK
    options = tilec.Options(max_seq_len=max_len, spec_rows=BLOCK, mxfp4=args.mxfp4)
    t0 = time.perf_counter()
    cm = tilec.compile(model, target=args.target, options=options)
    draft = build_draft(model, num_hidden_layers=args.draft_layers, block_size=BLOCK, seed=args.seed + 1)
    draft_cm = tilec.compile(draft, target=cm.target, options=options)
    cm.with_hidden_layers(draft.config.target_layer_ids)  # compiled here, not inside a timed run
    compile_s = time.perf_counter() - t0
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(args.seed)).to(device)

    results = {}
    plain, stats, samples, captures = run(cm, prompt, args.tokens, repeats=args.repeats)
    results["plain"] = {**stats.as_dict(), "tokens_per_s_runs": samples, "graph_captures_timed": captures}

    continuation, passes = plain, 0
    for passes in range(1, 6):
        out, stats, samples, captures = run(cm, prompt, args.tokens, OracleDraft(continuation, BLOCK),
                                            args.repeats)
        if torch.equal(out, continuation):
            break
        continuation = out
    results["oracle"] = {**stats.as_dict(), "tokens_per_s_runs": samples, "graph_captures_timed": captures,
                         "oracle_passes": passes,
                         "same_tokens_as_plain": _same_prefix(out, plain, args.prompt_len)}

    out, stats, samples, captures = run(cm, prompt, args.tokens, draft_cm, args.repeats)
    results["random_draft"] = {**stats.as_dict(), "tokens_per_s_runs": samples, "graph_captures_timed": captures,
                               "same_tokens_as_plain": _same_prefix(out, plain, args.prompt_len)}

    results["oracle"]["phases"] = round_phases(cm, prompt, args.tokens, OracleDraft(continuation, BLOCK))
    results["random_draft"]["phases"] = round_phases(cm, prompt, args.tokens, draft_cm)

    base = results["plain"]["tokens_per_s"]
    for r in results.values():
        r["speedup_vs_plain"] = round(r["tokens_per_s"] / base, 3) if base else None
    report = {
        "benchmark": "dflash", "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({platform.processor() or platform.machine()}, "
                                                          f"{torch.get_num_threads()} thread(s))",
        "note": None if gpu else "no GPU: CPU run of a small preset; tokens/s say nothing about the GPU system",
        "preset": preset, "model": cm.info.description, "draft": draft_cm.info.description, "target": cm.target,
        "mxfp4": args.mxfp4, "block_size": BLOCK, "prompt_len": args.prompt_len, "new_tokens": args.tokens, "batch": 1,
        "build_seconds": round(built_s, 2), "compile_seconds": round(compile_s, 2), "runs": results,
    }
    out_dir = Path(args.out)
    common.write_json(out_dir / "bench_dflash.json", report)  # whole or not at all

    print(f"{report['model']} on {report['device']}, target {cm.target}{', MXFP4 experts' if args.mxfp4 else ''}, "
          f"block {BLOCK}, {args.tokens} new tokens, median of {args.repeats} timed runs")
    print(f"{'run':<14}{'tokens/s':>10}{'ms/token':>10}{'speedup':>9}{'mean acc':>10}{'rounds':>8}  same as plain"
          f"  (graphs captured in the timed runs)")
    for name, r in results.items():
        ms = 1e3 / r["tokens_per_s"] if r["tokens_per_s"] else float("nan")
        same = r.get("same_tokens_as_plain", args.tokens)
        print(f"{name:<14}{r['tokens_per_s']:>10.1f}{ms:>10.2f}{r['speedup_vs_plain']:>9.2f}"
              f"{r['mean_acceptance']:>10.2f}{r['rounds']:>8}  {same}/{args.tokens}  ({r['graph_captures_timed']})")
    print(f"{'per round (median ms)':<24}{'round':>8}{'draft':>8}{'verify':>8}{'rest':>8}{'all rounds':>11}"
          f"{'prefill':>9}  captures")
    for name in ("oracle", "random_draft"):
        p = results[name]["phases"]
        print(f"{name:<24}{p['round_ms']:>8.3f}{p['draft_ms']:>8.3f}{p['verify_ms']:>8.3f}{p['rest_ms']:>8.3f}"
              f"{p['rounds_total_ms']:>11.3f}{p['prefill_ms']:>9.3f}  {p['target_graph_captures']}")
    print(f"wrote {out_dir / 'bench_dflash.json'}")
    return 0


def _same_prefix(a: torch.Tensor, b: torch.Tensor, skip: int) -> int:
    """How many new tokens of a and b agree before the first difference."""
    diff = (a[0, skip:] != b[0, skip:]).nonzero()
    return int(diff[0]) if len(diff) else a.shape[1] - skip


if __name__ == "__main__":
    sys.exit(main())
