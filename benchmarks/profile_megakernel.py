"""Where a megakernel decode step's time goes: each phase's work and each grid barrier, from %globaltimer stamps.

    python3 benchmarks/profile_megakernel.py --out DIR [--preset mini] [--mxfp4] [--context 256] [--rows 1]

Compiles the preset with ``target="cuda"``, prefills a random prompt of ``--context`` tokens, then runs decode steps
of ``--rows`` rows on a variant of the megakernel that stamps the time in every block when a phase's work is done
and after its barrier (`MegakernelProgram.timeline`). Per phase: the work (from the previous barrier's release to
the slowest block's done, p50 over blocks too) and the barrier (from the slowest block's done to the release seen
by the last block). Sums by task kind (with the slowest block's lead over the median block: what spreading a phase
over more blocks could save), and by op: the work of its phases beside the bytes it reads (tilec.cost, as the decode
floor counts them) and their rate. Inside each attention phase, the steps of each block's first item (the timeline
build's MK_ATTENTION_STAMPS): the median block's and the last-finishing block's. Writes
``DIR/profile_megakernel.json`` and prints the tables.

    python3 benchmarks/profile_megakernel.py --from-json DIR/profile_megakernel.json

prints the by-task and by-op tables of a saved profile again, without a GPU (the preset is compiled on the meta
device). ``--check`` also compares one decode step's logits with the triton target's (`check_logits`), so that a
timing run of a new build also shows whether it computes the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import tilec  # noqa: E402
from tilec.cost import node_step_bytes  # noqa: E402
from tilec.models import build_model  # noqa: E402
from tilec.ops import op_name  # noqa: E402


def op_rates(gm, rows: list[dict], context: int) -> list[dict]:
    """Per op kind of the step (summed over its nodes, e.g. the layers): its phases' work in us, the bytes its nodes
    read at ``context`` (weights and KV, tilec.cost.node_step_bytes) and the rate, slowest rate first. A norm or a
    router choice folded into a consumer's phase has no phase: its time is its consumer's."""
    nodes = {n.name: n for n in gm.graph.nodes}
    ops: dict[str, dict] = {}
    seen = set()
    for r in rows:
        node = nodes[r["node"]]
        d = ops.setdefault(op_name(node.target), {"op": op_name(node.target), "nodes": 0, "phases": 0,
                                                  "work_us": 0.0, "bytes": 0})
        d["phases"] += 1
        d["work_us"] += r["work_us"]
        if node.name not in seen:
            seen.add(node.name)
            d["nodes"] += 1
            d["bytes"] += sum(node_step_bytes(node, context))
    for d in ops.values():
        d["tb_per_s"] = d["bytes"] / (d["work_us"] * 1e-6) / 1e12 if d["work_us"] > 0 else 0.0
    return sorted(ops.values(), key=lambda d: d["tb_per_s"])


def print_rates(rates: list[dict]) -> None:
    print(f"\n{'op':<22} {'nodes':>5} {'phases':>6} {'work_us':>9} {'MB':>9} {'TB/s':>6}")
    for d in rates:
        print(f"{d['op']:<22} {d['nodes']:>5} {d['phases']:>6} {d['work_us']:>9.1f} {d['bytes'] / 1e6:>9.2f} "
              f"{d['tb_per_s']:>6.2f}")


def by_task(rows: list[dict]) -> dict[str, dict]:
    """Per task kind: its phases, their work (the slowest block's), the slowest block's lead over the median block
    (``lead_us``: the work less the median block's, which counts as 0 where that block was done before the last
    release, i.e. had nothing to do) and the barriers after them. The lead is the part of the work that spreading the
    phase over more blocks could save."""
    tasks: dict[str, dict] = {}
    for r in rows:
        t = tasks.setdefault(r["task"], {"phases": 0, "work_us": 0.0, "lead_us": 0.0, "barrier_us": 0.0})
        t["phases"] += 1
        t["work_us"] += r["work_us"]
        t["lead_us"] += r["work_us"] - max(r["work_p50_us"], 0.0)
        t["barrier_us"] += r["barrier_us"]
    return tasks


def print_tasks(tasks: dict[str, dict]) -> None:
    print(f"{'task':<22} {'phases':>6} {'work_us':>9} {'lead_us':>9} {'barrier_us':>10}")
    for task, t in sorted(tasks.items(), key=lambda kv: -kv[1]["work_us"] - kv[1]["barrier_us"]):
        print(f"{task:<22} {t['phases']:>6} {t['work_us']:>9.1f} {t['lead_us']:>9.1f} {t['barrier_us']:>10.1f}")


def from_json(path: Path) -> list[dict]:
    """The by-task and by-op tables of a saved profile (its preset compiled on the meta device for the graph); returns
    the by-op rates."""
    saved = json.loads(path.read_text())
    model = build_model(saved["preset"], device="meta")
    cm = tilec.compile(model, target="cuda", options=tilec.Options(mxfp4=saved["mxfp4"]))
    rates = op_rates(cm.graph, saved["phases"], saved["context"])
    print(f"{path}: {saved['preset']} {'mxfp4' if saved['mxfp4'] else 'bf16'} ctx {saved['context']}, "
          f"{saved['total_us']:.1f} us a step")
    print_tasks(by_task(saved["phases"]))
    print_rates(rates)
    return rates


def prefilled(preset: str, mxfp4: bool, context: int, more: int) -> tuple:
    """``preset`` (random weights) compiled for the ``cuda`` target, a session that has prefilled a random prompt of
    ``context`` tokens, and the prompt's ids followed by ``more`` ids for the decode steps: (compiled, session, ids).
    Exits where the preset has no megakernel."""
    model = build_model(preset, device="cuda")
    cm = tilec.compile(model, target="cuda", options=tilec.Options(mxfp4=mxfp4))
    if cm.program.plan is None:
        sys.exit(f"no megakernel: {cm.program.unsupported}")
    gen = torch.Generator("cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, context + more), device="cuda", generator=gen)
    session = cm.new_session(1, ids.shape[1] + 8)
    session.step(ids[:, :context])
    return cm, session, ids


CHECK_PROMPT = 32  # tokens prefilled before --check's decode step


def check_logits(cm, mxfp4: bool) -> float:
    """The relative error of the megakernel's logits for one decode step against the triton target's, both compiled
    from ``cm``'s model (the same weights and options), each in a session of its own that prefilled the same random
    prompt first. The two differ only by rounding (each was 1.2e-2 from the bf16 reference in bench_decode's runs on
    mini); a megakernel build that computes something else reads near 1. A smoke check beside a timing run, not the
    gpu tests' tolerances."""
    other = tilec.compile(cm.source, target="triton", options=tilec.Options(mxfp4=mxfp4))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cm.vocab_size, (1, CHECK_PROMPT + 1), generator=gen)
    logits = []
    for compiled in (cm, other):
        session = compiled.new_session(1, CHECK_PROMPT + 8)
        with torch.inference_mode():
            session.step(ids[:, :CHECK_PROMPT])
            logits.append(session.step(ids[:, CHECK_PROMPT:]).double())
    return float((logits[0] - logits[1]).norm() / logits[1].norm().clamp_min(1e-30))


ATTENTION_STEPS = ("start", "staged", "stored", "arrived", "merged", "appended")  # MK_ATTENTION_STAMP's 0 to 5


def attention_steps(phases: list[dict], runs: list, att_runs: list) -> list[dict]:
    """Inside each attention phase, from its blocks' first items (stamps [ops, blocks, 8]): the median over blocks
    and runs of each step's time (start: from the previous barrier's release), and the same for the block that
    finished last; merge and append only where the block was its head's last."""
    med = lambda v: sorted(v)[len(v) // 2] if v else None  # noqa: E731
    out = []
    for k, at in enumerate(i for i, p in enumerate(phases) if p["task"] == "attention"):
        steps: dict[str, list] = {name: [] for name in ATTENTION_STEPS}
        slowest: dict[str, list] = {name: [] for name in ATTENTION_STEPS}
        used: list[int] = []
        for st, att in zip(runs, att_runs):
            release = int(st[:, at - 1, 1].max()) if at else int(st[:, 0, 0].min())
            a = att[k]
            used = [b for b in range(a.shape[0]) if int(a[b, 0])]
            last_done = max(used, key=lambda b: int(st[b, at, 0]), default=None)
            for b in used:
                prev = release
                for j, name in enumerate(ATTENTION_STEPS):
                    t = int(a[b, j])
                    if not t:
                        break
                    steps[name].append((t - prev) / 1e3)
                    if b == last_done:
                        slowest[name].append((t - prev) / 1e3)
                    prev = t
        out.append({"node": phases[at]["node"], "items": len(used),
                    "median_us": {n: med(v) for n, v in steps.items()},
                    "last_block_us": {n: med(v) for n, v in slowest.items()}})
    return out


def print_attention_steps(inside: list[dict]) -> None:
    """One line an attention phase: each step's median over blocks, and the last block's, in us."""
    if not inside:
        return
    print("\nattention inside (us: median of the blocks with an item / the block that finished last)")
    print(f"{'node':<36} {'items':>5} " + " ".join(f"{n:>13}" for n in ATTENTION_STEPS))
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in inside:
        print(f"{r['node'][:36]:<36} {r['items']:>5} " + " ".join(
            f"{fmt(r['median_us'][n]) + '/' + fmt(r['last_block_us'][n]):>13}" for n in ATTENTION_STEPS))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for profile_megakernel.json (needed unless --from-json)")
    p.add_argument("--from-json", type=Path, help="print the by-op table of a saved profile (no GPU needed)")
    p.add_argument("--preset", default="mini")
    p.add_argument("--mxfp4", action="store_true")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check", action="store_true",
                   help="also compare one decode step's logits with the triton target's (a smoke check of the build)")
    p.add_argument("--prefetch-mb", type=float, default=None,
                   help="the most of a weight a phase prefetches into L2 for a later one (default: the planner's "
                        "PREFETCH_BYTES; 0: no prefetch), for A/B runs")
    args = p.parse_args()
    if args.from_json is not None:
        from_json(args.from_json)
        return
    if args.out is None:
        p.error("--out is required (or --from-json)")
    if args.prefetch_mb is not None:
        from tilec.codegen import megakernel

        megakernel.PREFETCH_BYTES = int(args.prefetch_mb * 2**20)
    cm, session, ids = prefilled(args.preset, args.mxfp4, args.context, args.rows * (args.repeats + 1))
    program = cm.program
    runs, att_runs = [], []
    for i in range(args.repeats + 1):  # the first compiles the timeline variant and warms up
        first = args.context + i * args.rows
        pos = torch.full((1,), first, dtype=torch.int64, device="cuda")
        with torch.inference_mode():
            _, stamps, att = program.timeline(ids[:, first:first + args.rows], pos, *session.cache.tensors)
        torch.cuda.synchronize()
        if i:
            runs.append(stamps.cpu())
            att_runs.append(att.cpu())
    # the build that ran these steps (a build planned for one row, where the program has one, runs one-row steps)
    phases = program.build_for(args.rows).plan.phases
    rows = []
    for k, ph in enumerate(phases):
        work, work_p50, barrier = [], [], []
        for st in runs:
            # from the previous barrier's last release; the first phase (no stamp at the kernel's start) from its
            # first block's done
            start = int(st[:, 0, 0].min()) if k == 0 else int(st[:, k - 1, 1].max())
            done = st[:, k, 0]
            work.append((int(done.max()) - start) / 1e3)
            work_p50.append(float((done - start).double().median()) / 1e3)
            barrier.append((int(st[:, k, 1].max()) - int(done.max())) / 1e3)
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        rows.append({"phase": k, "node": ph["node"], "task": ph["task"], "work_us": med(work),
                     "work_p50_us": med(work_p50), "barrier_us": med(barrier) if ph["sync"] else 0.0})
    total = sum(r["work_us"] + r["barrier_us"] for r in rows)
    tasks = by_task(rows)
    prefetch = "" if args.prefetch_mb is None else f", prefetch {args.prefetch_mb:g} MB"
    print(f"{args.preset} {'mxfp4' if args.mxfp4 else 'bf16'} ctx {args.context}, {args.rows} row(s){prefetch}: "
          f"{total:.1f} us from the first phase's first stamp to the last (medians of {args.repeats})")
    print_tasks(tasks)
    print(f"\n{'#':>3} {'node':<44} {'task':<20} {'work':>7} {'p50':>7} {'barrier':>7}")
    for r in rows:
        print(f"{r['phase']:>3} {r['node'][:44]:<44} {r['task']:<20} {r['work_us']:>7.2f} {r['work_p50_us']:>7.2f} "
              f"{r['barrier_us']:>7.2f}")
    rates = op_rates(cm.graph, rows, args.context)
    print_rates(rates)
    inside = attention_steps(phases, runs, att_runs)
    print_attention_steps(inside)
    check = None
    if args.check:
        check = check_logits(cm, args.mxfp4)
        print(f"\ncheck: logits rel err {check:.3e} against the triton target (one decode step)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_megakernel.json").write_text(json.dumps(
        {"preset": args.preset, "mxfp4": args.mxfp4, "context": args.context, "rows": args.rows,
         "prefetch_mb": args.prefetch_mb,
         "device": torch.cuda.get_device_name(), "total_us": total, "phases": rows,
         "by_task": tasks,
         "by_op": rates, "attention_steps": inside, "check_rel_err": check},
        indent=1))


if __name__ == "__main__":
    main()
