"""Where a kernel's warps stall, instruction by instruction, from Nsight Compute's source page.

    ncu --kernel-name experts_kernel --launch-skip 4 --launch-count 8 --section SourceCounters \\
        --section WarpStateStats --metrics group:smsp__pcsamp_warp_stall_reasons,\\
group:smsp__pcsamp_warp_stall_reasons_not_issued -o rep -f python3 benchmarks/ncu_experts.py --rows 1 --calls 14
    ncu -i rep.ncu-rep --page source --csv --print-source sass | gzip > source_sass.csv.gz
    python3 benchmarks/ncu_stalls.py source_sass.csv.gz --ranges 300:660 1640:3200 --top 30

The samples of every profiled launch in the file are added up by instruction (the launches run the same SASS). It
prints the stall reasons over all instructions, those over each ``--ranges`` slice of instruction indices (find the
phases' boundaries in the ``--top`` list: a phase's barriers and loads name it), and the most sampled instructions
with their three main reasons. No GPU needed.
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
from pathlib import Path

ALL = "Warp Stall Sampling (All Samples)"


def read(path: Path) -> tuple[list[str], dict[int, collections.Counter], list[str]]:
    """(SASS text by instruction index, samples by index and reason summed over launches, the reason columns)."""
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
    for launch in launches:
        for index, row in enumerate(launch):
            for name in [ALL, *reasons]:
                value = row[col[name]]
                sums[index][name] += int(value) if value.isdigit() else 0
    return [row[col["Source"]].strip() for row in launches[0]], sums, reasons


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
    args = ap.parse_args()
    sass, sums, reasons = read(args.csv)
    n = len(sass)
    total, by = summary(sums, reasons, 0, n)
    print(f"{n} instructions, {total} samples")
    print("all: " + ", ".join(f"{r} {c} ({100 * c / max(total, 1):.0f}%)" for r, c in by if c))
    for text in args.ranges:
        lo, hi = (int(v) for v in text.split(":"))
        part, by = summary(sums, reasons, lo, hi)
        print(f"[{lo}:{hi}] {part} samples: " + ", ".join(f"{r} {c} ({100 * c / max(part, 1):.0f}%)" for r, c in by
                                                            if c))
    print("\nmost sampled (index, SASS, samples, main reasons):")
    for index, counts in sorted(sorted(sums.items(), key=lambda kv: -kv[1][ALL])[:args.top]):
        main_reasons = sorted(((r[len("stall_"):], counts[r]) for r in reasons if counts[r]), key=lambda x: -x[1])[:3]
        print(f"{index:6d}  {sass[index][:60]:60s} {counts[ALL]:6d}  " + ", ".join(f"{r} {c}" for r, c in main_reasons))


if __name__ == "__main__":
    main()
