"""Which of the megakernel's task functions change machine code between two template versions (no GPU needed).

The megakernel is one compilation unit, and ptxas allocates registers across its task functions. So a change to one
task can change the machine code of others, and their speed: on the H100, a batched load in the attention merge
slowed the experts' gate/up phase by 50% with that phase's PTX unchanged
(benchmarks/results/h100-2026-11-25/README.md): ptxas had split the phase's batch of 8 weight loads a lane into
batches of 2 (found with Nsight Compute, benchmarks/results/h100-2026-11-25b/README.md). This script renders the
megakernel of a preset (a few layers, on the meta device) with tilec's templates (A) and with a directory of template
variants (B, `$TILEC_TEMPLATES`), compiles both with nvcc for sm_90a, and compares each task function's SASS. For
each function it reports:
- whether the instructions are identical;
- whether they are the same modulo register names;
- the instruction counts;
- the opcodes whose counts changed.
It also names, in each build, the GEMV loops whose weight loads ptxas split by FMAs (`load_batches`): fewer loads
in flight at once, a slower phase.

It needs nvcc and nvdisasm (Triton ships one). A difference it shows is a reason to time the whole step, not only
the changed phase.

    python3 benchmarks/sass_diff.py --variant DIR [--preset mini --layers 2 --mxfp4 --one-row] [--out DIR]
    python3 benchmarks/sass_diff.py --layers 0     # tilec's templates only: exits 1 where a load batch is split
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

def tool(name: str) -> str | None:
    """``name`` on PATH, else the copy Triton ships (triton/backends/nvidia/bin), else None."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        return str(bundled) if bundled.exists() else None
    except ImportError:
        return None


def megakernel_source(preset: str, layers: int | None, mxfp4: bool, variant: str | None, one_row: bool = False) -> str:
    """The megakernel of ``preset``'s first ``layers`` layers (all where None), rendered with the templates of
    ``variant`` (a TILEC_TEMPLATES directory) or tilec's own; with ``one_row``, its build for steps of one row
    (megakernel.ONE_ROW_BUILD)."""
    import torch

    import tilec
    from tilec.codegen import megakernel
    from tilec.models import build_model, preset_config

    overrides = {}
    if layers is not None:
        cfg = preset_config(preset)
        overrides = {"num_hidden_layers": layers, "layer_types": list(cfg.layer_types[:layers]),
                     "mlp_layer_types": list(cfg.mlp_layer_types[:layers])}

    old, old_one_row = os.environ.pop("TILEC_TEMPLATES", None), megakernel.ONE_ROW_BUILD
    try:
        if variant is not None:
            os.environ["TILEC_TEMPLATES"] = variant
        megakernel.ONE_ROW_BUILD = one_row
        model = build_model(preset, device="meta", dtype=torch.bfloat16, **overrides)
        cm = tilec.compile(model, target="cuda", options=tilec.Options(mxfp4=mxfp4, greedy=True))
        if cm.program.plan is None:
            sys.exit(f"no megakernel for {preset}: {cm.program.unsupported}")
        return cm.program.sources["megakernel_1row.cu" if one_row else "megakernel.cu"]
    finally:
        megakernel.ONE_ROW_BUILD = old_one_row
        os.environ.pop("TILEC_TEMPLATES", None)
        if old is not None:
            os.environ["TILEC_TEMPLATES"] = old


def compile_cubin(source: str, folder: Path, name: str) -> tuple[Path, int]:
    """The cubin of ``source`` (written into ``folder``) and the kernel's register count."""
    from tilec.codegen.cuda_build import nvcc_cubin

    code, report = nvcc_cubin(source, name, "sm_90a", ptxas_info=True)
    cubin = folder / f"{name}.cubin"
    cubin.write_bytes(code)
    regs = re.findall(r"Used (\d+) registers", report)
    return cubin, int(regs[-1]) if regs else -1


def disassembly(cubin: Path, nvdisasm: str) -> tuple[dict[str, list[tuple[int, str]]], dict[str, int]]:
    """The cubin's functions, from nvdisasm: each function's instructions as (byte offset in its code section, text),
    by mangled name, and the offset of every label (branch targets included). A function is a label of a code
    section that does not start with a dot (the megakernel's task functions are labels in the kernel's section); it
    ends at the next one or at a ``.size`` line."""
    text = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True, check=True).stdout
    funcs: dict[str, list[tuple[int, str]]] = {}
    labels: dict[str, int] = {}
    pending: list[str] = []
    current, in_code = None, False
    for line in text.splitlines():
        if line.startswith("//---"):
            in_code, current = ".text." in line, None
            continue
        if not in_code:
            continue
        label = re.match(r"^(\$?[\w$.]+):\s*$", line)
        if label:
            name = label.group(1)
            if not name.startswith("."):
                current = name
                funcs[current] = []
            pending.append(name)
            continue
        if re.match(r"\s*\.size", line):
            current = None
            continue
        ins = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if ins:
            at = int(ins.group(1), 16)
            for name in pending:
                labels[name] = at
            pending = []
            if current is not None:
                funcs[current].append((at, re.sub(r"\s+", " ", ins.group(2))))
    return funcs, labels


def functions(cubin: Path, nvdisasm: str) -> dict[str, list[str]]:
    """Each function of the cubin (the kernel and its task functions, by mangled name): its instructions."""
    return {name: [ins for _, ins in body] for name, body in disassembly(cubin, nvdisasm)[0].items()}


WEIGHT_LOAD = r"(@!?U?P\w+\s+)?LDG\S*CONSTANT"  # ld.global.nc, predicated or not
STREAMED_LOAD = r"(@!?U?P\w+\s+)?LDG\S*\.NA\S*CONSTANT"  # ld.global.nc.L1::no_allocate


def load_batches(cubin: Path, nvdisasm: str) -> dict[str, list[dict]]:
    """Each function's innermost loops that load weights (ld.global.nc) and do FMAs (a loop: a branch back to an
    earlier instruction of the function): its instruction count, its weight loads, ``streamed``, those of them that
    take no place in L1 (LDG.E.NA: ld.global.nc.L1::no_allocate), ``batch``, the most of them
    issued between two FMAs (around the back edge), and ``local``, its local-memory loads and stores (spills). A
    GEMV loop whose loads are one batch keeps them all in flight together; ptxas under register pressure may move
    loads past FMAs instead, and so split a batch: that made the experts' gate/up phase of the mini megakernel 45%
    slower (benchmarks/results/h100-2026-11-25b).
    A heuristic: spans with shuffles are left out (the branches back from a warp sum's divergent fallback, BRA.DIV,
    read as loops, and a GEMV's k loop has no shuffle). Checked on the mini and tiny builds of nvcc 13.0 and on four
    NVRTC builds that ran on the H100; in one of these, ptxas placed the one-row loops' back edges where this finds
    no innermost loop, so a loop it does not list is not checked.
    """
    funcs, labels = disassembly(cubin, nvdisasm)
    out: dict[str, list[dict]] = {}
    for name, body in funcs.items():
        if not body:
            continue
        spans = []  # (first, last) offsets of each loop
        for at, ins in body:
            target = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", ins)
            if target and body[0][0] <= labels.get(target.group(1), -1) < at:
                spans.append((labels[target.group(1)], at))
        loops = []
        for lo, hi in spans:
            if any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in spans):
                continue  # not innermost
            loop = [ins for at, ins in body if lo <= at <= hi]
            if any("SHFL" in ins for ins in loop):
                continue  # a warp sum's divergent fallback (BRA.DIV) branching back, or not a GEMV's k loop
            # weight loads: ld.global.nc (__ldg), LDG...CONSTANT; activations from L2 (__ldcg) are not counted
            kinds = ["L" if re.match(WEIGHT_LOAD, x) else "F" if "FFMA" in x else "" for x in loop]
            if "L" in kinds and "F" in kinds:
                # the loop's loads between two FMAs, taken around the back edge (a loop ptxas rotated issues the
                # next turn's loads at its end)
                first = kinds.index("F")
                runs = "".join(kinds[first:] + kinds[:first]).split("F")
                loops.append({"instructions": len(loop), "loads": kinds.count("L"),
                              "streamed": sum(bool(re.match(STREAMED_LOAD, x)) for x in loop),
                              "batch": max(len(r) for r in runs),
                              "local": sum(map(is_local, loop))})
        if loops:
            out[short_name(name)] = out.get(short_name(name), []) + loops
    return out


def split_batches(batches: dict[str, list[dict]], depth: int = 8) -> list[tuple[str, int, int]]:
    """(function, loads, batch) of each loop of `load_batches` whose batch is smaller than ``depth`` loads (the GEMV
    loops' DEPTH x rows), or than all of its loads where it has fewer."""
    return [(f, lp["loads"], lp["batch"]) for f, loops in batches.items() for lp in loops
            if lp["batch"] < min(lp["loads"], depth)]


def spilled_loops(batches: dict[str, list[dict]]) -> list[tuple[str, int, int]]:
    """(function, instructions, local-memory operations) of each loop of `load_batches` that spills."""
    return [(f, lp["instructions"], lp["local"]) for f, loops in batches.items() for lp in loops if lp["local"]]


def local_operations(code: dict[str, list[str]]) -> dict[str, int]:
    """Each function's local-memory loads and stores (LDL / STL: spills, and values kept across calls), where it has
    any. The kernel body's are values it keeps across the task calls, cheap where they stay in L1; more of them is a
    sign that ptxas's whole-kernel allocation got tighter (a one-row dispatch of whole GEMV task bodies took the mini
    bf16 body from 72 to 587, nvcc 13.0, benchmarks/results/h100-2026-11-25d/next/README.md)."""
    counts = {short_name(name): sum(map(is_local, body)) for name, body in code.items()}
    return {name: n for name, n in counts.items() if n}


def short_name(mangled: str) -> str:
    m = re.search(r"mk\d+([a-z_0-9]+?)I", mangled) or re.search(r"mk\d+([a-z_0-9]+)", mangled)
    return m.group(1) if m else mangled.removeprefix("$tilec_megakernel$")


def _strip(ins: str, registers: bool) -> str:
    ins = re.sub(r"0x[0-9a-f]+|`\(.*?\)", "X", ins)  # addresses and branch targets
    if registers:
        ins = re.sub(r"\bU?R\d+\b|\bU?P\d\b", "R", ins)
    return ins


def opcode(ins: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", ins).split(" ")[0]


def is_local(ins: str) -> bool:
    """Whether an instruction loads or stores local memory (LDL, LDL.LU, STL.64, ...; predicated or not)."""
    return opcode(ins).split(".")[0] in ("LDL", "STL")


def compare(a: dict[str, list[str]], b: dict[str, list[str]]) -> list[dict]:
    rows = []
    for name in sorted(set(a) | set(b), key=lambda n: -len(a.get(n, b.get(n, [])))):
        fa, fb = a.get(name), b.get(name)
        row = {"function": short_name(name), "mangled": name, "a": len(fa) if fa else None,
               "b": len(fb) if fb else None}
        if fa is not None and fb is not None:
            row["identical"] = [_strip(x, False) for x in fa] == [_strip(x, False) for x in fb]
            row["same_modulo_registers"] = [_strip(x, True) for x in fa] == [_strip(x, True) for x in fb]
            ca, cb = collections.Counter(map(opcode, fa)), collections.Counter(map(opcode, fb))
            row["opcodes_changed"] = {k: cb[k] - ca[k] for k in sorted(set(ca) | set(cb)) if cb[k] != ca[k]}
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", help="directory of template variants (as TILEC_TEMPLATES); without it, only tilec's "
                                     "templates are built and checked for split load batches")
    p.add_argument("--preset", default="mini")
    p.add_argument("--layers", type=int, default=2, help="the preset's first layers to render (default 2; 0: all, "
                                                         "the register pressure of the real kernel)")
    p.add_argument("--mxfp4", action="store_true")
    p.add_argument("--one-row", action="store_true", help="the build for steps of one row (megakernel.ONE_ROW_BUILD)")
    p.add_argument("--out", type=Path, help="folder for sass_diff.json")
    args = p.parse_args()
    nvdisasm = tool("nvdisasm")
    if shutil.which("nvcc") is None or nvdisasm is None:
        sys.exit("sass_diff.py needs nvcc on PATH and nvdisasm (on PATH or Triton's bundled copy)")
    if args.variant is not None and not Path(args.variant).is_dir():
        sys.exit(f"--variant {args.variant!r} is not a directory")
    layers = args.layers or None
    builds = {"a": None} if args.variant is None else {"a": None, "b": args.variant}
    code, regs, batches, spills = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for build, variant in builds.items():
            source = megakernel_source(args.preset, layers, args.mxfp4, variant, args.one_row)
            cubin, regs[build] = compile_cubin(source, Path(tmp), build)
            code[build] = functions(cubin, nvdisasm)
            loops = load_batches(cubin, nvdisasm)
            batches[build], spills[build] = split_batches(loops), spilled_loops(loops)
    what = f"{args.preset}, {args.layers or 'all'} layers" + (", mxfp4" if args.mxfp4 else "") + \
        (", one-row build" if args.one_row else "")
    print(f"{what}: kernel registers " + ", ".join(f"{b.upper()} {r}" for b, r in regs.items()))
    rows = []
    if "b" in code:
        rows = compare(code["a"], code["b"])
        print(f"{'function':<22} {'A':>6} {'B':>6} {'identical':>9} {'mod regs':>8}  opcodes changed (B - A)")
        for r in rows:
            changed = ", ".join(f"{k} {v:+d}" for k, v in list(r.get("opcodes_changed", {}).items())[:6])
            print(f"{r['function'][:22]:<22} {r['a'] or '-':>6} {r['b'] or '-':>6} "
                  f"{str(r.get('identical', '-')):>9} {str(r.get('same_modulo_registers', '-')):>8}  {changed}")
    for build, split in batches.items():
        print(f"{build.upper()}: weight loads split by FMAs (loads / most in one batch): "
              + (", ".join(f"{f} {n}/{b}" for f, n, b in split) or "none"))
        print(f"{build.upper()}: weight loops with local-memory operations (instructions / local): "
              + (", ".join(f"{f} {n}/{k}" for f, n, k in spills[build]) or "none"))
        print(f"{build.upper()}: local-memory operations by function: "
              + (", ".join(f"{f} {n}" for f, n in local_operations(code[build]).items()) or "none"))
    if args.out is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import write_json

        write_json(args.out / "sass_diff.json", {"preset": args.preset, "layers": args.layers, "mxfp4": args.mxfp4,
                                                 "one_row": args.one_row,
                                                 "registers": regs, "functions": rows, "split_batches": batches,
                                                 "spilled_loops": spills,
                                                 "local_operations": {k: local_operations(c) for k, c in code.items()}})
    if args.variant is None and (batches["a"] or spills["a"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
