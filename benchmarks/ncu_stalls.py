"""Where a kernel's warps stall, instruction by instruction, from Nsight Compute's source page.

    ncu --kernel-name experts_kernel --launch-skip 4 --launch-count 8 --section SourceCounters \\
        --section WarpStateStats --metrics group:smsp__pcsamp_warp_stall_reasons,\\
group:smsp__pcsamp_warp_stall_reasons_not_issued -o rep -f python3 benchmarks/ncu_experts.py --rows 1 --calls 14
    ncu -i rep.ncu-rep --page source --csv --print-source sass | gzip > source_sass.csv.gz
    python3 benchmarks/ncu_stalls.py source_sass.csv.gz --ranges 300:660 1640:3200 --top 30

The samples of every profiled launch in the file are added up by instruction (the launches run the same SASS). It
prints the stall reasons over all instructions, those over each ``--ranges`` slice of instruction indices (find the
phases' boundaries in the ``--top`` list: a phase's barriers and loads name it), and the most sampled instructions
with their three main reasons. ``--cubin`` (the machine code that ran; benchmarks/ncu_megakernel.py saves the
megakernel's) adds them up by function as well: the megakernel's task functions are separate functions in the
kernel's code, and nvdisasm (on PATH or Triton's copy) names where each starts. With it, each function's row also
gives its code and the part of it that ran (KB of instructions with an "Instructions Executed" count, the SourceCounters
section's): code that runs once a phase is fetched cold, at about 0.1 to 0.4 us a KB on the H100
(benchmarks/icache_probe.py, results/h100-2026-11-25d). No GPU needed.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import csv
import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sass_diff import disassembly, short_name, tool  # noqa: E402

ALL = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
INSTRUCTION_BYTES = 16


def read(path: Path) -> tuple[list[str], dict[int, collections.Counter], list[str], list[int]]:
    """(SASS text by instruction index, samples by index and reason summed over launches, the reason columns, each
    instruction's byte offset from the kernel's first)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    header, launches, current = None, [], None
    for row in rows:
        if not row:
            continue
        if row[0] == "Kernel Name":
            current = []
            launches.append(current)
        elif row[0] == "Address":
            header = row
        elif current is not None:
            current.append(row)
    if header is None or not launches:
        raise SystemExit(f"{path}: no source page rows (export with --page source --csv --print-source sass)")
    col = {name: i for i, name in enumerate(header)}
    reasons = [h for h in header if h.startswith("stall_") and "(Not" not in h]
    if not reasons:
        raise SystemExit(f"{path}: no stall_* columns (profile with --metrics group:smsp__pcsamp_warp_stall_reasons)")
    sums: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    counted = [ALL, *reasons] + ([EXECUTED] if EXECUTED in col else [])
    for launch in launches:
        for index, row in enumerate(launch):
            for name in counted:
                value = row[col[name]]
                sums[index][name] += int(value) if value.isdigit() else 0
    addresses = [int(row[col["Address"]], 16) for row in launches[0]]
    offsets = [a - addresses[0] for a in addresses]
    return [row[col["Source"]].strip() for row in launches[0]], sums, reasons, offsets


def function_starts(cubin: Path) -> list[tuple[int, str]]:
    """(byte offset, name) of each function in the code of ``cubin``, in order of offset (the kernel's code section
    holds the functions it calls)."""
    nvdisasm = tool("nvdisasm")
    if nvdisasm is None:
        raise SystemExit("--cubin needs nvdisasm (on PATH, or Triton's copy)")
    funcs, _ = disassembly(cubin, nvdisasm)
    return sorted((body[0][0], short_name(name)) for name, body in funcs.items() if body)


def functions_of(offsets: list[int], starts: list[tuple[int, str]]) -> list[str]:
    """The function of each instruction (by its byte offset; "?" before the first function's start)."""
    keys = [s for s, _ in starts]
    return [starts[at][1] if at >= 0 else "?" for at in (bisect.bisect_right(keys, o) - 1 for o in offsets)]


def by_function(sums, reasons, offsets: list[int], starts: list[tuple[int, str]]) -> list[tuple[str, int, list]]:
    """(function, samples, reasons by count) for each function, most sampled first (a function's copies are one)."""
    names = functions_of(offsets, starts)
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for index, counts in sums.items():
        name = names[index]
        totals[name] += counts[ALL]
        for r in reasons:
            groups[name][r[len("stall_"):]] += counts[r]
    return [(name, totals[name], groups[name].most_common()) for name, _ in totals.most_common()]


def executed_code(sums, offsets: list[int], starts: list[tuple[int, str]]) -> dict[str, tuple[int, int]]:
    """(bytes of code, bytes of it that ran: instructions with a count under EXECUTED) by function."""
    code: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for index, name in enumerate(functions_of(offsets, starts)):
        row = code[name]
        row[0] += INSTRUCTION_BYTES
        if sums.get(index, {}).get(EXECUTED, 0):
            row[1] += INSTRUCTION_BYTES
    return {name: (c, e) for name, (c, e) in code.items()}


def executed_runs(sass: list[str], sums, offsets: list[int], starts: list[tuple[int, str]],
                  function: str) -> list[dict]:
    """The stretches of ``function``'s code that ran (consecutive instructions with an EXECUTED count): each one's
    byte offset, instruction count, fewest and most executions, samples, "no instruction" samples and first opcodes.
    Many short stretches far apart (a branch past unused code to each) fetch a cold line each."""
    runs: list[dict] = []
    open_run = False
    for index, (offset, name) in enumerate(zip(offsets, functions_of(offsets, starts))):
        counts = sums.get(index, {})
        ran = counts.get(EXECUTED, 0) if name == function else 0
        if not ran:
            open_run = False
            continue
        if not open_run:
            runs.append({"offset": offset, "n": 0, "min": ran, "max": ran, "samples": 0, "no_inst": 0, "ops": []})
            open_run = True
        r = runs[-1]
        r["n"] += 1
        r["min"], r["max"] = min(r["min"], ran), max(r["max"], ran)
        r["samples"] += counts.get(ALL, 0)
        r["no_inst"] += counts.get("stall_no_inst", 0)
        if len(r["ops"]) < 5:
            r["ops"].append(next((w for w in sass[index].split() if not w.startswith("@")), ""))
    return runs


def summary(sums, reasons, lo: int, hi: int) -> tuple[int, list[tuple[str, int]]]:
    total, by = 0, collections.Counter()
    for index in range(lo, hi):
        counts = sums.get(index)
        if counts:
            total += counts[ALL]
            for r in reasons:
                by[r[len("stall_"):]] += counts[r]
    return total, by.most_common()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", type=Path, help="ncu --page source --csv --print-source sass output (.csv or .csv.gz)")
    ap.add_argument("--ranges", nargs="*", default=[], help="instruction index slices a:b to sum apart")
    ap.add_argument("--top", type=int, default=25, help="most sampled instructions to list")
    ap.add_argument("--cubin", type=Path, help="the cubin that ran: add the samples up by function too")
    ap.add_argument("--runs", metavar="FUNCTION", help="with --cubin: the stretches of FUNCTION's code that ran")
    args = ap.parse_args()
    sass, sums, reasons, offsets = read(args.csv)
    n = len(sass)
    total, by = summary(sums, reasons, 0, n)
    print(f"{n} instructions, {total} samples")
    print("all: " + ", ".join(f"{r} {c} ({100 * c / max(total, 1):.0f}%)" for r, c in by if c))
    for text in args.ranges:
        lo, hi = (int(v) for v in text.split(":"))
        part, by = summary(sums, reasons, lo, hi)
        print(f"[{lo}:{hi}] {part} samples: " + ", ".join(f"{r} {c} ({100 * c / max(part, 1):.0f}%)" for r, c in by
                                                            if c))
    if args.cubin is not None:
        starts = function_starts(args.cubin)
        code = executed_code(sums, offsets, starts)
        print("\nby function (code KB, KB that ran, samples, share of all, main reasons as shares of the function's):")
        for name, part, by in by_function(sums, reasons, offsets, starts):
            size, ran = code.get(name, (0, 0))
            print(f"{name[:28]:<28} {size / 1024:7.1f} {ran / 1024:7.1f} {part:8d} {100 * part / max(total, 1):5.1f}%  "
                  + ", ".join(f"{r} {100 * c / max(part, 1):.0f}%" for r, c in by[:5] if c))
        if args.runs:
            print(f"\nstretches of {args.runs} that ran (offset, instructions, executions, samples, no_inst, opcodes):")
            for r in executed_runs(sass, sums, offsets, starts, args.runs):
                print(f"{r['offset']:8x} {r['n']:5d} {r['min']:7d}-{r['max']:<7d} {r['samples']:7d} {r['no_inst']:6d}  "
                      + " ".join(r["ops"]))
    print("\nmost sampled (index, SASS, samples, main reasons):")
    for index, counts in sorted(sorted(sums.items(), key=lambda kv: -kv[1][ALL])[:args.top]):
        main_reasons = sorted(((r[len("stall_"):], counts[r]) for r in reasons if counts[r]), key=lambda x: -x[1])[:3]
        print(f"{index:6d}  {sass[index][:60]:60s} {counts[ALL]:6d}  " + ", ".join(f"{r} {c}" for r, c in main_reasons))


if __name__ == "__main__":
    main()
