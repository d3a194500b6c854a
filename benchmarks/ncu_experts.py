"""Launch the MXFP4 experts kernels at `mini` shapes eagerly, for Nsight Compute to profile (no timing here).

    ncu --kernel-name regex:"experts_kernel|gate_up|down" --launch-skip 8 --launch-count 2 --set full \
        python3 benchmarks/ncu_experts.py --rows 1 [--override '{"scale_fold": false}']

(`experts_kernel` where the planner takes it, else the two kernels. Nsight Compute's source page, `--page source`,
gives the stall samples of each instruction: where the down phase's time goes. benchmarks/ncu_stalls.py adds them up
by instruction and reason over the profiled launches; its docstring has the commands.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import bench_mxfp4_experts as bench  # noqa: E402
from tilec.codegen.tuning import device_info  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--format", default="mxfp4", choices=["mxfp4", "dense"])
    ap.add_argument("--override", default="{}", help="experts template context overrides, as JSON")
    ap.add_argument("--calls", type=int, default=12, help="calls launched (the docstring's command skips 8)")
    args = ap.parse_args()
    device = torch.device("cuda")
    dev = device_info(device)
    gen, cpu_gen = torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(0)
    shape = dict(bench.MINI)
    layers = bench.make_layers(args.format, shape, device, gen)
    plan = {**bench.planned(args.format, layers), **json.loads(args.override)}  # as the bench: scale_fold from weights
    module = bench.kernel_module(args.format, shape, dev, **plan)
    launch = bench.launcher(module, bench.fragments_for(args.format, layers))  # the CUDA decode kernels' weights
    x = torch.randn(1, args.rows, shape["H"], generator=cpu_gen).to(device, torch.bfloat16)
    for c in range(args.calls):
        w, ids = bench.routing(args.rows, "same", shape, device, cpu_gen)
        launch(x, w, ids, *layers[c % len(layers)])
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
