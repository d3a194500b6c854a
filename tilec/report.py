"""The compile report: what each stage did, the model's size, and the bytes a decode step must move.

`build` gathers the figures into a plain dict (written as report.json); `render_markdown` turns it into report.md.
"""

from __future__ import annotations

import dataclasses

from tilec import cost
from tilec.graph import info
from tilec.passmanager import StageRecord

_GB = 1e9


def build(records: list[StageRecord], *, target: str, options, seconds: float) -> dict:
    final = records[-1].graph
    gi = info(final)
    weights = cost.weights(final)
    params = cost.parameters(final)  # MXFP4 blocks hold two parameters per byte
    by_dtype = cost.weight_bytes(final)
    decode = []
    for ctx in options.report_contexts:
        b = cost.step_bytes(final, ctx)
        decode.append({"context": ctx, **b, "floor_ms_h100": round(cost.floor_ms(b["total"]), 4)})
    kv_bytes = sum(s.nbytes for s in gi.cache_specs)
    return {
        "target": target,
        "model": gi.description,
        "graph_kind": gi.kind,
        "specialised_for": {"batch": gi.batch, "rows": gi.rows, "max_seq_len": gi.max_seq_len},
        "parameters": params,
        "weight_bytes": by_dtype,
        "weight_bytes_total": sum(by_dtype.values()),
        "kv_cache_bytes": kv_bytes,
        "decode_step_bytes": decode,
        "stages": [
            {"name": r.name, "doc": r.doc, "nodes": len(r.graph.graph.nodes), "ops": r.op_counts,
             "stats": r.stats, "seconds": round(r.seconds, 4)}
            for r in records
        ],
        "options": {k: (str(v) if v is not None and not isinstance(v, (int, float, bool, tuple)) else v)
                    for k, v in dataclasses.asdict(options).items()},
        "compile_seconds": round(seconds, 3),
    }


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def render_markdown(rep: dict) -> str:
    lines = [f"# tilec compile report", "",
             f"- model: {rep['model']}",
             f"- target: `{rep['target']}`; graph specialised for batch {rep['specialised_for']['batch']}, "
             f"{rep['specialised_for']['rows']} row(s) per step, KV cache for {rep['specialised_for']['max_seq_len']}"
             f" tokens",
             f"- parameters: {rep['parameters']:,} ({rep['parameters'] / _GB:.3g}B)",
             f"- weights: {_fmt_bytes(rep['weight_bytes_total'])} ("
             + ", ".join(f"{k} {_fmt_bytes(v)}" for k, v in sorted(rep["weight_bytes"].items())) + ")",
             f"- KV cache: {_fmt_bytes(rep['kv_cache_bytes'])}",
             f"- compile time: {rep['compile_seconds']} s", ""]
    lines += ["## Bytes per decode step", "",
              "Weights read once per step (only the top-k experts, only the gathered embedding rows) plus the KV "
              "entries attention reads; the floor is those bytes at the H100's measured 3.0 TB/s.", "",
              "| context | weights | KV | total | HBM floor (H100) |", "|---:|---:|---:|---:|---:|"]
    for d in rep["decode_step_bytes"]:
        lines.append(f"| {d['context']} | {_fmt_bytes(d['weights'])} | {_fmt_bytes(d['kv'])} | "
                     f"{_fmt_bytes(d['total'])} | {d['floor_ms_h100']:.3f} ms |")
    mx = next((s["stats"] for s in rep["stages"] if s["name"] == "mxfp4_experts"), None)
    if mx is not None:
        lines += ["", *_mxfp4_section(mx)]
    if rep.get("kernels"):
        lines += ["", *_kernels_section(rep)]
    if rep.get("megakernel"):
        lines += ["", *_megakernel_section(rep["megakernel"])]
    lines += ["", "## Stages", "", "| # | stage | nodes | what it did | seconds |", "|---:|---|---:|---|---:|"]
    for i, s in enumerate(rep["stages"]):
        did = ", ".join(f"{k}: {v}" for k, v in s["stats"].items() if not isinstance(v, (list, dict))) or "-"
        lines.append(f"| {i} | {s['name']} | {s['nodes']} | {did} | {s['seconds']} |")
    ops = sorted({op for s in rep["stages"] for op in s["ops"]})
    lines += ["", "## Ops per stage", "", "| op | " + " | ".join(s["name"] for s in rep["stages"]) + " |",
              "|---|" + "---:|" * len(rep["stages"])]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(str(s["ops"].get(op, 0)) for s in rep["stages"]) + " |")
    return "\n".join(lines) + "\n"


def _kernels_section(rep: dict) -> list[str]:
    """The generated kernel modules, with the CUDA C++ some of them launch, and the re-laid weights those read."""
    lines = ["## Kernels", "", "| file | template | nodes | CUDA C++ |", "|---|---|---:|---|"]
    for k in rep["kernels"]:
        lines.append(f"| {k['file']} | {k['template']} | {k['nodes']} | {k.get('cuda', '-')} |")
    launch = rep.get("launch")
    if launch and not launch.get("interpret"):
        lines += ["", "The Triton kernels are launched with programmatic dependent launch: each starts while the one "
                      "before it runs and waits for it inside (TILEC_PDL=0 at compile time turns this off)."
                  if launch.get("pdl") else "The Triton kernels are launched one after another (no programmatic "
                                            "dependent launch: a GPU before Hopper, or TILEC_PDL=0)."]
    derived = rep.get("derived_weights")
    if derived:
        total = sum(d["bytes"] for d in derived.values())
        layouts = sorted({d["layout"] for d in derived.values()})
        lines += ["", f"The CUDA kernels read {len(derived)} weights re-laid ({', '.join(layouts)}; "
                      f"tilec/codegen/mma_layout.py), {_fmt_bytes(total)} computed when the program loads and held "
                      f"beside the originals, which the other kernels read."]
    return lines


def _megakernel_section(mk: dict) -> list[str]:
    """Target ``cuda``: whether decode steps run as the megakernel, and its phases in order."""
    lines = ["## Megakernel", ""]
    if not mk["runs"]:
        return lines + [f"Every step runs on the Triton kernels above: {mk['why']}."]
    lines += [f"Steps of up to {mk['max_rows']} rows (batch x rows) run as one launch of `{mk['file']}`: "
              f"{mk['phases']} phases, each dealt over the whole grid (a block an SM), with {mk['barriers']} grid "
              f"barriers between them; workspace {_fmt_bytes(mk['workspace_bytes'])}, shared memory "
              f"{mk['shared_memory_bytes']} bytes a block. Longer steps (prefill) run on the Triton kernels. An "
              f"RMSNorm whose consumers all stage their activations in shared memory has no phase, nor has a "
              f"router's top-k choice that its experts read first: each consumer computes them there first, in the "
              f"order listed (column 'computes first')."]
    others = [b for b in mk.get("builds", []) if b["file"] != mk["file"]]
    lines += [f"Steps of up to {b['max_rows']} row(s) run `{b['file']}` instead: the megakernel planned for that many "
              f"rows (less code a step)." for b in others]
    lines += ["",
              "| phase | node | op | task | computes first | barrier after |", "|---:|---|---|---|---|---|"]
    for p in mk["schedule"]:
        lines.append(f"| {p['phase']} | {p['node']} | {p['op']} | {p['task']} | {', '.join(p['folds']) or '-'} | "
                     f"{'yes' if p['barrier'] else '-'} |")
    return lines


def _mxfp4_section(mx: dict) -> list[str]:
    """The MXFP4 experts section: bytes before and after, and each layer's relative weight error."""
    fmt_err = lambda e: "-" if e is None else f"{e:.4f}"  # noqa: E731
    ratio = f" ({mx['bytes_after'] / mx['bytes_before']:.3f}x)" if mx["bytes_before"] else ""
    lines = ["## MXFP4 experts", "",
             f"Expert weights held in MXFP4 (blocks of 32 E2M1 values sharing an E8M0 scale: 4.25 bits per weight), "
             f"scale rule `{mx['scale_rule']}`: {mx['quantized']} layer(s) quantised, {mx['kept']} kept as loaded. "
             f"Expert bytes {_fmt_bytes(mx['bytes_before'])} -> {_fmt_bytes(mx['bytes_after'])}{ratio}; largest "
             f"relative weight error ||W - dq(q(W))|| / ||W|| {fmt_err(mx['max_rel_err'])}. Attention, dense MLP, "
             f"router, embeddings and lm_head keep their precision.", "",
             "| experts | status | from | bytes before | bytes after | error | error gate_up | error down |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for d in mx["layers"]:
        lines.append(f"| {d['module']} | {d['status']} | {d['dtype']} | {_fmt_bytes(d['bytes_before'])} | "
                     f"{_fmt_bytes(d['bytes_after'])} | {fmt_err(d['rel_err'])} | {fmt_err(d['rel_err_gate_up'])} | "
                     f"{fmt_err(d['rel_err_down'])} |")
    return lines
