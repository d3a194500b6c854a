"""A same-start A/B of megakernel builds: step profiles of several source trees, one after the other, in one process
tree on one machine.

    python3 benchmarks/ab_megakernel.py --tree base=DIR --tree new=. --order new,base,new,base [--mxfp4] \\
        [--check] [--warmup] [--guard-s 470] --out OUT

Each tree (a checkout: `tilec/`, `models/`, `passes/`, `runtime/`, `templates/`, `benchmarks/`) becomes a flat copy of
the package under ``OUT/packages/NAME`` (the modules inside `tilec/`, as the installed package lays them out), and
each entry of ``--order`` runs that copy's `benchmarks/profile_megakernel.py` in a subprocess, which puts the copy
first on `sys.path`. A planner change and a template change both ride along, which `$TILEC_TEMPLATES` cannot do.
Alternate the builds (new, base, new, base): the machine's state drifts within a start.

First every tree's megakernel builds are compiled into the kernel cache side by side (`precompile`), so that no run
waits on the compiler for them. The first run still compiles the Triton kernels of prefill and the check (on the H100,
106 to 126 s against 66 to 86 for the runs after it, session 34); ``--warmup`` runs the first build once before the
timed order, not counted. It starts no run that would end after ``--guard-s`` seconds, judged by the slowest run so far
that was not the call's first (the first always starts), and writes ``OUT/ab.json``:
each run's step time and its time by task, with its log under ``OUT/logs``. ``--check``: each run also compares one
decode step's logits with the triton target's (profile_megakernel.py --check); a run whose relative error is above
``--check-tol`` fails, so that a build that times well but computes something else is not read as a win. ``--dry``
renders each tree's megakernel on the meta device instead (no GPU). Before each run it checks that a script in the copy
imports the copy, not an installed tilec.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODULES = ("models", "passes", "runtime", "templates")  # top-level folders the package maps inside tilec
SCRIPTS = ("profile_megakernel.py",)
CHECK = re.compile(r"^check: logits rel err (\S+) ")
STEP = re.compile(r"^(\S+) (\S+) ctx (\d+), (\d+) row\(s\): ([\d.]+) us")
TASK = re.compile(r"^(\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$")


def flat_package(tree: Path, dest: Path) -> Path:
    """``tree``'s package as one folder (``dest/tilec`` with its modules inside) beside its benchmark scripts."""
    if not (tree / "tilec" / "__init__.py").is_file():
        sys.exit(f"ab_megakernel: {tree} is not a tilec checkout (no tilec/__init__.py)")
    if dest.exists():
        shutil.rmtree(dest)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(tree / "tilec", dest / "tilec", ignore=ignore)
    for name in MODULES:
        shutil.copytree(tree / name, dest / "tilec" / name, ignore=ignore)
    (dest / "benchmarks").mkdir()
    for name in SCRIPTS:
        shutil.copy2(tree / "benchmarks" / name, dest / "benchmarks" / name)
    return dest


def parse_profile(text: str) -> dict:
    """The step line, the by-task table and the --check line of profile_megakernel.py's output."""
    out: dict = {"tasks": {}}
    table = True  # the by-task table ends at its first blank line
    for line in text.splitlines():
        if m := CHECK.match(line):
            out["check_rel_err"] = float(m[1])
        elif m := STEP.match(line):
            out.update(preset=m[1], dtype=m[2], context=int(m[3]), rows=int(m[4]), step_us=float(m[5]))
        elif table and "step_us" in out and (m := TASK.match(line.strip())):
            out["tasks"][m[1]] = {"phases": int(m[2]), "work_us": float(m[3]), "lead_us": float(m[4]),
                                  "barrier_us": float(m[5])}
        elif out["tasks"] and not line.strip():
            table = False
    return out


# Which tilec a script in the copy ARGV[1] imports (the copy first on sys.path, as profile_megakernel.py puts it): an
# installed package found first would make the A/B compare that package with itself.
IMPORTS = """
import sys
sys.path.insert(0, sys.argv[1])
import tilec
if not tilec.__file__.startswith(sys.argv[1]):
    sys.exit(f"imported {tilec.__file__}, not the copy in {sys.argv[1]} (pip uninstall tilec first)")
"""
DRY = IMPORTS + """
import torch
from tilec.models import build_model
cm = tilec.compile(build_model("mini", device="meta", dtype=torch.bfloat16, num_hidden_layers=2), target="cuda",
                   options=tilec.Options(mxfp4=sys.argv[2] == "1"))
src = cm.program.sources["megakernel.cu"]
mxfp4 = "mk::Mxfp4Rows<" in src or "mk::experts_gate_up_mma<" in src  # on the CUDA cores or the tensor cores
print(f"{tilec.__file__}: megakernel.cu {len(src)} characters, MXFP4 experts {mxfp4}")
"""

# Compiles the copy ARGV[1]'s megakernel builds that its profile_megakernel.py run will load (the production kernel and
# the timeline variant of preset ARGV[3], ARGV[2] == "1" for MXFP4) for ARGV[4] (default: this machine's GPU) into
# the kernel cache. The model is built on the meta device: its sources are those of the run's model on the GPU (the
# same shapes, dtype and options).
PRECOMPILE = IMPORTS + """
import torch
from tilec.codegen.cuda_build import arch_of
from tilec.models import build_model
options = tilec.Options(mxfp4=sys.argv[2] == "1")
cm = tilec.compile(build_model(sys.argv[3], device="meta"), target="cuda", options=options)
if not hasattr(cm.program, "precompile"):
    sys.exit(f"{tilec.__file__}: this tree has no MegakernelProgram.precompile; its first run compiles")
arch = sys.argv[4] if len(sys.argv) > 4 else arch_of(torch.device("cuda"))
print(f"{tilec.__file__}: compiled {cm.program.precompile(arch, timeline=True)}")
"""


def precompile(packages: dict[str, Path], mxfp4: bool, logs: Path, preset: str = "mini",
               arch: str | None = None) -> float:
    """Every tree's builds compiled into the kernel cache side by side (a process a tree), so that no timed run
    waits on the compiler and the compiles overlap. A tree that cannot says why in its log and compiles in its run
    instead. Returns the seconds it took."""
    t0 = time.monotonic()
    procs = {name: subprocess.Popen([sys.executable, "-c", PRECOMPILE, str(pkg), "1" if mxfp4 else "0", preset]
                                    + ([arch] if arch else []), cwd=pkg, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, pkg in packages.items()}
    for name, proc in procs.items():
        out = proc.communicate()[0]
        (logs / f"precompile_{name}.txt").write_text(out)
        last = out.strip().splitlines()[-1] if out.strip() else ""
        print(f"precompile {name}: rc {proc.returncode}, {last}", flush=True)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--order", required=True, help="comma-separated NAMEs, e.g. new,base,new,base")
    ap.add_argument("--mxfp4", action="store_true")
    ap.add_argument("--check", action="store_true", help="check each build's logits against the triton target's")
    ap.add_argument("--check-tol", type=float, default=0.1, help="the most relative error --check passes")
    ap.add_argument("--guard-s", type=float, default=470.0,
                    help="start no run that would end after this many seconds (by the slowest run so far)")
    ap.add_argument("--warmup", action="store_true",
                    help="run the first build of --order once first, not counted (its one-time compiles)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-precompile", action="store_true",
                    help="let each tree's first run compile its kernels (by default all trees compile first, side by "
                         "side)")
    ap.add_argument("--dry", action="store_true", help="render each tree's megakernel (no GPU)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    order = args.order.split(",")
    if unknown := sorted(set(order) - set(trees)):
        sys.exit(f"ab_megakernel: --order names {unknown}, which no --tree gives ({sorted(trees)})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    packages = {name: flat_package(Path(d).resolve(), args.out.resolve() / "packages" / name)
                for name, d in trees.items()}
    start, runs = time.monotonic(), []
    if not args.dry and not args.no_precompile:
        print(f"precompiled in {precompile(packages, args.mxfp4, args.out / 'logs'):.1f} s", flush=True)
    warmup = None
    for i, name in enumerate(([order[0]] if args.warmup else []) + order):
        i -= bool(args.warmup)  # the warm-up is run -1
        done = ([warmup] if warmup else []) + runs
        slowest = max((r["seconds"] for r in done[1:] or done), default=0.0)  # the first carries the compiles
        if time.monotonic() - start + slowest > args.guard_s:
            print(f"ab_megakernel: another run of up to {slowest:.0f} s would end past {args.guard_s:.0f} s; "
                  f"{len(order) - i} runs not started")
            break
        label, pkg = (f"{i}_{name}" if i >= 0 else f"warmup_{name}"), packages[name]
        imports = subprocess.run([sys.executable, "-c", IMPORTS, str(pkg)], capture_output=True, text=True)
        if imports.returncode:
            sys.exit(f"ab_megakernel: {imports.stderr.strip().splitlines()[-1]}")
        if args.dry:
            cmd = [sys.executable, "-c", DRY, str(pkg), "1" if args.mxfp4 else "0"]
        else:
            cmd = [sys.executable, str(pkg / "benchmarks" / "profile_megakernel.py"), "--out",
                   str(args.out / "profiles" / label), "--repeats", str(args.repeats)]
            cmd += (["--mxfp4"] if args.mxfp4 else []) + (["--check"] if args.check else [])
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=pkg)
        log = proc.stdout + proc.stderr
        (args.out / "logs" / f"{label}.txt").write_text(log)
        run = {"name": name, "tree": trees[name], "rc": proc.returncode, "seconds": round(time.monotonic() - t0, 1)}
        if args.dry:
            run["dry"] = log.strip().splitlines()[-1] if log.strip() else ""
        else:
            run.update(parse_profile(log))
            if args.check and not run.get("check_rel_err", float("inf")) <= args.check_tol:
                run["rc"] = run["rc"] or 1  # no check line, or the logits too far from the triton target's
        if i >= 0:
            runs.append(run)
        else:
            warmup = run
        step, check = run.get("step_us", "-"), run.get("check_rel_err")
        checked = "" if check is None else f", logits rel err {check:.2e}"
        print(f"{i if i >= 0 else 'warm-up'} {name}: rc {run['rc']}, step {step} us{checked}, {run['seconds']} s",
              flush=True)
    tmp = args.out / "ab.json.tmp"
    tmp.write_text(json.dumps({"mxfp4": args.mxfp4, "order": order, "runs": runs, "warmup": warmup}, indent=1))
    tmp.replace(args.out / "ab.json")
    if any(r["rc"] for r in runs + ([warmup] if warmup else [])):
        sys.exit("ab_megakernel: a run failed; its log is under " + str(args.out / "logs"))


if __name__ == "__main__":
    main()
