"""What running code costs when it is not in the SM's instruction caches: the megakernel's phases run it cold.

    python3 benchmarks/icache_probe.py --out DIR [--sizes 4,8,16,32,64,128,192,256] [--warps 1,8]

The megakernel's task functions run once a layer each, between grid barriers, and the kernel's code is hundreds of
KB, so a phase may fetch its instructions from L2 (or HBM) every time. This probe times straight-line code of SIZE KB
(independent FFMAs in 8 chains, so that issue, not latency, bounds a warm pass) run three times in a row by one block
an SM, at each of three starts:
- ``hbm``: after a 256 MB copy, so that the code is in neither the SMs' caches nor L2;
- ``l2``: after a launch of another kernel of 256 KB of code (the SMs' caches hold that one; L2 holds both);
- ``again``: right after a launch of the same kernel.
Each pass is timed with clock64 from the earliest warp's start to the latest warp's end (cycles, median over blocks);
pass 0 is the cold one, passes 1 and 2 show whether SIZE KB stays in the instruction caches. Writes
DIR/icache_probe.json and prints cycles a KB.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from tilec.codegen.cuda_build import CudaModule, pointer  # noqa: E402

PASSES = 3
FLUSH_KB = 256


def body(kb: int) -> str:
    """``kb`` KB of FFMAs (16 bytes each) over 8 independent chains, as volatile PTX so that none is dropped."""
    lines = []
    for i in range(kb * 1024 // 16):
        r = i % 8
        lines.append(f'    asm volatile("fma.rn.f32 %0, %0, %1, %2;" : "+f"(a{r}) : "f"(m), "f"(c));')
    return "\n".join(lines)


def kernel(kb: int) -> str:
    regs = "\n".join(f"  float a{r} = threadIdx.x * {r + 1}.0f;" for r in range(8))
    total = " + ".join(f"a{r}" for r in range(8))
    # Each warp stamps its own start (after the barrier) and end of every pass; a pass takes from the earliest start
    # to the latest end. (One thread's clock after __syncthreads is not enough: the barrier's wait may be deferred
    # past an instruction that does not depend on it, so warp 0 read the clock before the other warps were done: the
    # first version's 8-warp passes of 8 and 16 KB, results/h100-2026-11-25d.)
    return f"""
extern "C" __global__ void __launch_bounds__(1024, 1) code_{kb}(long long* cycles, float* sink, float m, float c) {{
  __shared__ long long start[32][{PASSES}], end[32][{PASSES}];
{regs}
  const int warp = threadIdx.x >> 5;
#pragma unroll 1
  for (int p = 0; p < {PASSES}; ++p) {{
    __syncthreads();
    const long long t0 = clock64();
{body(kb)}
    const long long t1 = clock64();
    if ((threadIdx.x & 31) == 0) {{
      start[warp][p] = t0;
      end[warp][p] = t1;
    }}
  }}
  __syncthreads();
  if (threadIdx.x == 0)
    for (int p = 0; p < {PASSES}; ++p) {{
      long long lo = start[0][p], hi = end[0][p];
      for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {{
        lo = start[w][p] < lo ? start[w][p] : lo;
        hi = end[w][p] > hi ? end[w][p] : hi;
      }}
      cycles[blockIdx.x * {PASSES} + p] = hi - lo;
    }}
  if ({total} == 12345.0f) sink[0] = 1.0f;  // keeps the chains
}}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sizes", default="4,8,16,32,64,96,128,192,256", help="KB of code, comma-separated")
    ap.add_argument("--warps", default="1,8", help="warps a block, comma-separated")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    module = CudaModule("\n".join(kernel(kb) for kb in sorted(set(sizes + [FLUSH_KB]))), "icache_probe")
    cycles = torch.zeros(sms * PASSES, dtype=torch.int64, device=dev)
    sink = torch.zeros(1, device=dev)
    big = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    big2 = torch.empty_like(big)

    def launch(kb: int, warps: int) -> list[list[int]]:
        module.launch(f"code_{kb}", (sms,), 32 * warps, [pointer(cycles), pointer(sink), ctypes.c_float(1.0),
                                                           ctypes.c_float(0.0)], dev)
        torch.cuda.synchronize()
        c = cycles.view(sms, PASSES).tolist()
        return [statistics.median(row[p] for row in c) for p in range(PASSES)]

    results = []
    for warps in [int(w) for w in args.warps.split(",")]:
        for kb in sizes:
            launch(kb, warps)  # loads the module's code, warms nothing that matters below
            row = {"kb": kb, "warps": warps}
            big2.copy_(big)
            torch.cuda.synchronize()
            row["hbm"] = launch(kb, warps)
            launch(FLUSH_KB, warps)
            row["l2"] = launch(kb, warps)
            row["again"] = launch(kb, warps)
            results.append(row)
            per = lambda v: f"{v / kb:7.0f}"  # noqa: E731
            print(f"{kb:4d} KB {warps} warps  cycles/KB pass0 hbm {per(row['hbm'][0])} l2 {per(row['l2'][0])} "
                  f"again {per(row['again'][0])} | pass1 {per(row['l2'][1])} pass2 {per(row['l2'][2])}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "icache_probe.json", {"environment": common.environment(dev), "sms": sms,
                                                       "passes": PASSES, "results": results})


if __name__ == "__main__":
    main()
