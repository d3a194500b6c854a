"""Run megakernel decode steps for Nsight Compute to profile, and save the cubin that ran (no timing here).

    ncu --kernel-name tilec_megakernel --launch-skip 2 --launch-count 2 --section SourceCounters \\
        --section WarpStateStats --metrics group:smsp__pcsamp_warp_stall_reasons,\\
group:smsp__pcsamp_warp_stall_reasons_not_issued -o rep -f \\
        python3 benchmarks/ncu_megakernel.py --cubin DIR/megakernel.cubin [--preset mini --mxfp4 --steps 6]
    ncu -i rep.ncu-rep --page source --csv --print-source sass | gzip > source_sass.csv.gz
    python3 benchmarks/ncu_stalls.py source_sass.csv.gz --cubin DIR/megakernel.cubin

The prompt (``--context`` tokens) is prefilled on the Triton kernels; each of the ``--steps`` decode steps of one
token is one launch of ``tilec_megakernel``. ``--cubin`` writes the machine code those launches ran (the runtime's
compile cache holds it), so that ncu_stalls.py can add the samples up by task function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from profile_megakernel import prefilled  # noqa: E402
from tilec.codegen.cuda_build import arch_of, compile_cubin  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--mxfp4", action="store_true")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="decode steps (megakernel launches)")
    ap.add_argument("--cubin", type=Path, help="where to write the megakernel's cubin")
    args = ap.parse_args()
    cm, session, ids = prefilled(args.preset, args.mxfp4, args.context, args.steps)
    program = cm.program
    with torch.inference_mode():
        before = program.launches
        for i in range(args.steps):
            session.step(ids[:, args.context + i:args.context + i + 1])
    torch.cuda.synchronize()
    print(f"{args.steps} steps, {program.launches - before} megakernel launches")
    if args.cubin is not None:
        args.cubin.parent.mkdir(parents=True, exist_ok=True)
        build = program.build_for(1)  # the build these one-row steps ran
        args.cubin.write_bytes(compile_cubin(build.source, build.name, arch_of(ids.device)))


if __name__ == "__main__":
    main()
