"""Does a gpu-scope release wait for the block's bulk copies in flight? A microbenchmark of what experts_kernel's
grid barrier does (templates/cuda/moe_experts_mxfp4.cu.j2), on its own.

    python3 benchmarks/fence_probe.py --out out/fence        # GPU only

One block per SM. Thread 0 stamps %globaltimer around a release: ``fence.acq_rel.gpu``, ``fence.release.gpu``,
``atom.release.gpu`` (the kernel's grid barrier's arrival) or ``red.release.gpu``; the first in four modes, the others
in the first and third:
  none       no copies: the fence alone;
  in_flight  the same thread has just issued bulk copies (cp.async.bulk, global -> shared) of KB_PER_BLOCK of weights;
  other_warp the copies were issued by another warp's thread (as the kernel's producer does), then the fence;
  landed     the copies have landed (their mbarrier completed) before the fence.
For in_flight and other_warp it also stamps when the copies land (after the fence). If the fence waits for them, it
lasts about as long as the copies take and they land right after it. The source is a fresh part of a large buffer each
round (no L2 hits). Writes DIR/fence_probe.json and prints percentiles (ns) over blocks and rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from tilec.codegen.cuda_build import CudaModule, pointer  # noqa: E402

MODES = ("none", "in_flight", "other_warp", "landed")
RELEASES = ("fence.acq_rel.gpu", "fence.release.gpu", "atom.release.gpu.add", "red.release.gpu.add")
KB_PER_BLOCK = 192
CHUNK = 16384  # bytes a bulk copy

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
__device__ __forceinline__ u64 now() { u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
__device__ __forceinline__ u32 smem(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void wait_bar(u32 bar) {
  u32 done;
  do {
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(bar) : "memory");
  } while (!done);
}
__device__ __forceinline__ void issue(u32 bar, unsigned char* buf, const unsigned char* src, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
  for (int off = 0; off < bytes; off += CHUNK)
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(smem(buf + off)), "l"(src + off), "r"(CHUNK), "r"(bar) : "memory");
}
// The release under test (RELEASE: 0 fence.acq_rel.gpu, 1 fence.release.gpu, 2 atom.release.gpu, 3 red.release.gpu).
__device__ __forceinline__ void release(u32* word) {
#if RELEASE == 0
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
#elif RELEASE == 1
  asm volatile("fence.release.gpu;" ::: "memory");
#elif RELEASE == 2
  u32 old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(word) : "memory");
  if (old == 0xFFFFFFFFu) *word = 0;  // (uses the value: the add's round trip is timed too)
#else
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(word) : "memory");
#endif
}
// out[block][0..2]: before the release, after it, the copies landed (mode 0 and 3: when the release ended)
extern "C" __global__ void fence_probe(const unsigned char* src, u64* out, int bytes, int mode, u32* word) {
  extern __shared__ __align__(128) unsigned char buf[];
  __shared__ __align__(8) u64 bar;
  const u32 b = smem(&bar);
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(b) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const unsigned char* mine = src + (size_t)blockIdx.x * bytes;
  if (threadIdx.x == 32 && mode == 2) issue(b, buf, mine, bytes);  // other_warp: another warp issues the copies
  __syncthreads();
  if (threadIdx.x == 0) {
    if (mode == 1 || mode == 3) issue(b, buf, mine, bytes);
    if (mode == 3) wait_bar(b);
    const u64 before = now();
    release(word);
    const u64 after = now();
    if (mode == 1 || mode == 2) wait_bar(b);
    out[blockIdx.x * 3] = before;
    out[blockIdx.x * 3 + 1] = after;
    out[blockIdx.x * 3 + 2] = now();
  }
}
"""


def percentiles(v: list[float]) -> dict:
    v = sorted(v)
    return {"p10": v[len(v) // 10], "p50": v[len(v) // 2], "p90": v[len(v) * 9 // 10], "max": v[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fence_probe.py needs a CUDA GPU")
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    nbytes = KB_PER_BLOCK * 1024
    modules = [CudaModule(f"#define CHUNK {CHUNK}\n#define RELEASE {k}\n" + SOURCE, f"fence_probe_{k}")
               for k in range(len(RELEASES))]
    word = torch.zeros(1, dtype=torch.int32, device=dev)
    per_round = sms * nbytes
    src = torch.randint(0, 256, (per_round * 8,), dtype=torch.uint8, device=dev)  # 8 rounds' worth, > the L2
    out = torch.zeros(sms * 3, dtype=torch.int64, device=dev)
    # every mode for the first release; the others alone and with another warp's copies in flight (the kernel's case)
    cases = [(k, mode) for k in range(len(RELEASES)) for mode in range(len(MODES))
             if k == 0 or MODES[mode] in ("none", "other_warp")]
    results = {}
    for k, mode in cases:
        release, module, name = RELEASES[k], modules[k], MODES[mode]
        fence, landed_after = [], []
        for r in range(args.rounds + 2):
            part = src[(r % 8) * per_round:]
            module.launch("fence_probe", (sms,), 64, [pointer(part), pointer(out), ctypes.c_int(nbytes),
                                                      ctypes.c_int(mode), pointer(word)], dev, smem=nbytes)
            torch.cuda.synchronize()
            if r < 2:
                continue  # warm-up
            t = out.view(sms, 3).cpu()
            fence += [int(x) for x in t[:, 1] - t[:, 0]]
            if name in ("in_flight", "other_warp"):
                landed_after += [int(x) for x in t[:, 2] - t[:, 1]]
        key = f"{release} {name}"
        results[key] = {"release_ns": percentiles(fence)}
        if landed_after:
            results[key]["copies_land_after_release_ns"] = percentiles(landed_after)
    report = {"benchmark": "fence_probe", "environment": common.environment(dev), "kb_per_block": KB_PER_BLOCK,
              "blocks": sms, "rounds": args.rounds, "results": results}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "fence_probe.json").write_text(json.dumps(report, indent=1))
    print(f"{sms} blocks, {KB_PER_BLOCK} KB of bulk copies each; ns, p10 / p50 / p90 / max over blocks and rounds")
    for name, r in results.items():
        line = f"  {name:32s} " + " / ".join(str(r["release_ns"][k]) for k in ("p10", "p50", "p90", "max"))
        if "copies_land_after_release_ns" in r:
            q = r["copies_land_after_release_ns"]
            line += "   copies land after it " + " / ".join(str(q[k]) for k in ("p10", "p50", "p90", "max"))
        print(line)
    print(f"wrote {outdir / 'fence_probe.json'}")


if __name__ == "__main__":
    main()
