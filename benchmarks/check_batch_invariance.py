"""Which kernel breaks batch invariance: one T-row step against T 1-row steps from the same cache, op by op.

    python3 benchmarks/check_batch_invariance.py --out out/inv                 # GPU: bf16 `mini`, triton target
    python3 benchmarks/check_batch_invariance.py --out out/inv --mxfp4 --rows 8 --prompt 200

Greedy DFlash gives plain decoding's tokens only if each row of a verify step (up to 8 rows) is the same bits as a
1-row decode step at that position. This runs the compiled model's generated step without CUDA graphs, records the
output of every kernel launch, and compares row j of the T-row step's outputs with the j-th 1-row step's, launch by
launch, in graph order. The first launch whose rows differ is the kernel to fix (later ones inherit its difference).

Writes ``DIR/check_batch_invariance.json`` (every launch: op, node, max abs difference, rows that differ) and
prints the first differing launches. Exit status 1 when any launch differs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # importable from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tilec  # noqa: E402
from common import environment, now_iso, write_json  # noqa: E402
from tilec.models import build_model  # noqa: E402
from tilec.runtime.kv_cache import layout_from_graph  # noqa: E402
from tilec.runtime.session import DecodeSession  # noqa: E402


def record_step(program, session: DecodeSession, ids: torch.Tensor) -> list:
    """(kernel alias, its output tensors) of every launch of one step, in order."""
    log: list = []
    with program.observing(lambda alias, args, out: log.append((alias, _tensors(out)))):
        session.step(ids)
    return log


def _tensors(out) -> list[torch.Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t.detach().clone() for t in items if isinstance(t, torch.Tensor)]


def row(t: torch.Tensor, j: int, rows: int) -> torch.Tensor | None:
    """Row j of a step's output: outputs are [B, T, ...] or [B*T, ...] (batch 1 here); None if neither."""
    if t.dim() >= 2 and t.shape[0] == 1 and t.shape[1] == rows:
        return t[0, j]
    if t.dim() >= 1 and t.shape[0] == rows:
        return t[j]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default=None, help="default: mini on a GPU, tiny on the CPU")
    ap.add_argument("--mxfp4", action="store_true")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter (not bitwise: see the tests)
    preset = args.preset or ("mini" if device.type == "cuda" else "tiny")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(preset, device=device, dtype=dtype, seed=args.seed)
    length = args.prompt + args.rows + 8
    cm = tilec.compile(model, target="triton", options=tilec.Options(mxfp4=args.mxfp4, max_seq_len=length))
    program = cm.program
    program.load()
    ops = {k.alias: k.alias.split("_", 1)[1] for k in program.kernels}

    def session() -> DecodeSession:
        specs = layout_from_graph(cm.graph, 1, length, cm.options.spec_rows)
        return DecodeSession(program, specs, batch=1, max_seq_len=length, device=device)

    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = cm.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt + args.rows), generator=gen).to(device)
    block_s, single_s = session(), session()
    block_s.step(ids[:, :args.prompt])
    single_s.step(ids[:, :args.prompt])
    block = record_step(program, block_s, ids[:, args.prompt:])
    singles = [record_step(program, single_s, ids[:, args.prompt + j:args.prompt + j + 1]) for j in range(args.rows)]

    launches, first = [], None
    for i, (alias, outs) in enumerate(block):
        entry = {"launch": i, "kernel": alias, "op": ops.get(alias, alias), "outputs": []}
        for o, t in enumerate(outs):
            diff_rows, worst, compared = [], 0.0, 0
            for j in range(args.rows):
                a = row(t, j, args.rows)
                b = row(singles[j][i][1][o], 0, 1) if i < len(singles[j]) else None
                if a is None or b is None or a.shape != b.shape:
                    continue
                compared += 1
                if not torch.equal(a, b):
                    diff_rows.append(j)
                    worst = max(worst, float((a.float() - b.float()).abs().max()))
            entry["outputs"].append({"shape": list(t.shape), "rows_compared": compared, "rows_differ": diff_rows,
                                     "max_abs_diff": worst})
            if diff_rows and first is None:
                first = entry
        launches.append(entry)
    result = {"benchmark": "check_batch_invariance", "created": now_iso(), "environment": environment(device),
              "preset": preset, "mxfp4": args.mxfp4, "rows": args.rows, "prompt": args.prompt,
              "launches": len(launches), "first_difference": first, "per_launch": launches,
              "invariant": first is None}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "check_batch_invariance.json", result)
    differing = [e for e in launches if any(o["rows_differ"] for o in e["outputs"])]
    print(f"{preset} {'mxfp4' if args.mxfp4 else str(dtype)} on {device}: {len(launches)} launches, "
          f"{len(differing)} differ between a {args.rows}-row step and 1-row steps")
    for e in differing[:12]:
        print(f"  #{e['launch']:4d} {e['kernel']:28s} " + "; ".join(
            f"rows {o['rows_differ']} max {o['max_abs_diff']:.3g}" for o in e["outputs"] if o["rows_differ"]))
    return 0 if first is None else 1


if __name__ == "__main__":
    sys.exit(main())
