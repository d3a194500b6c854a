"""How fast can anything read the bytes one MXFP4 experts call reads? The floor the experts kernels are held to.

    python3 benchmarks/read_floor.py --out out/floor                  # GPU: 8 experts (one row), and 64
    python3 benchmarks/read_floor.py --out out/floor --experts 8      # one row's experts only

The experts kernel's goal is a fraction of the copy bandwidth (a 1 GiB device-to-device copy). A call reads only
20 MB (`mini`, one row: 8 experts of 2.5 MB), so it also pays a launch, the router's choice to read before the first
weight address is known, and the ramp of a short burst. This script times plain read kernels over exactly those bytes
(and over the 64 experts of 8 rows with independent routes), timed as bench_mxfp4_experts.py times the experts
kernels (CUDA-graph replays of one call per layer, LAYERS layers of weights, so nothing is found in L2): they read the
k expert ids first, then every byte of the chosen experts, and XOR them into one word per block, checked against the
host's. Nothing is computed, so their time is what a burst of this size costs by each way of reading:

- ``ldg``: every thread loads 16 bytes at a time, UNROLL loads in flight, blocks over the grid, grid-stride;
- ``async``: one block an SM; each warp copies CH chunks of 512 bytes a stage into its own ring of STAGES stages with
  16-byte ``cp.async`` (each lane its own 16 bytes), waits for its oldest stage and reads it;
- ``bulk``: one block an SM; one thread issues ``cp.async.bulk`` copies of CHUNK bytes into STAGES stages of shared
  memory (mbarrier completion), the other warps wait for each stage, read it and free it (experts_kernel's producer).

Each also as ``walk``: the same bytes in the same order, but without the 64-bit division and modulo by the expert's
size that the plain ones pay at every 16-byte load (ldg) or chunk (async, bulk) to find its expert and offset; a walk
keeps each load's (expert, offset) in 32-bit counters and steps them by the grid's stride. Each runs with
programmatic dependent launch (its wait at the start) and without. Writes DIR/read_floor.json.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from bench_mxfp4_experts import MINI, expert_bytes, time_calls  # noqa: E402

from tilec.codegen.cuda_build import CudaModule, pointer  # noqa: E402

SOURCE = r"""
typedef unsigned int u32;

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// out[blockIdx.x] = the XOR of every thread's acc
__device__ void block_xor(u32 acc, u32* out) {
  __shared__ u32 red[32];
  for (int o = 16; o; o >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < (int)(blockDim.x >> 5); ++i) acc ^= red[i];
    out[blockIdx.x] = acc;
  }
}

// The walk variants' way through the chosen experts' units (16-byte words or chunks of bytes, `per` an expert): a place
// (expert e, unit u) in 32-bit counters, moved on by a fixed stride split once into whole experts and a rest, so no
// load pays a division (the other variants divide a 64-bit index by `per` at every load or chunk).
struct Place {
  u32 e, u;
};

struct Walk {
  u32 per, de, du;
  __device__ Walk(u32 per, u32 stride) : per(per), de(stride / per), du(stride % per) {}
  __device__ __forceinline__ Place at(u32 i) const { return {i / per, i % per}; }  // once, at the start
  __device__ __forceinline__ Place next(Place p) const {
    p.e += de;
    p.u += du;
    if (p.u >= per) {
      p.u -= per;
      ++p.e;
    }
    return p;
  }
};

template <int UNROLL>
__device__ void ldg_read(const unsigned char* w, const long long* ids, int k, long long eb, u32* out, int pdl) {
  __shared__ long long base[64];
  if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (threadIdx.x < k) base[threadIdx.x] = ids[threadIdx.x] * eb;
  __syncthreads();
  if (pdl) asm volatile("griddepcontrol.launch_dependents;");
  const long long per = eb / 16, total = per * k, stride = (long long)gridDim.x * blockDim.x;
  u32 acc = 0;
  for (long long v = (long long)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += stride * UNROLL) {
    uint4 r[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      const long long i = v + j * stride;
      r[j] = i < total ? ld_stream((const uint4*)(w + base[i / per]) + i % per) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) acc ^= r[j].x ^ r[j].y ^ r[j].z ^ r[j].w;
  }
  block_xor(acc, out);
}
extern "C" __global__ void ldg_read4(const unsigned char* w, const long long* ids, int k, long long eb, u32* out,
                                     int pdl) { ldg_read<4>(w, ids, k, eb, out, pdl); }
extern "C" __global__ void ldg_read8(const unsigned char* w, const long long* ids, int k, long long eb, u32* out,
                                     int pdl) { ldg_read<8>(w, ids, k, eb, out, pdl); }

// ldg_read's loads (the same words, in the same order) with each of a thread's UNROLL loads walking its own place, from
// the experts' addresses in shared memory.
template <int UNROLL>
__device__ void ldg_walk_read(const unsigned char* w, const long long* ids, int k, long long eb, u32* out, int pdl) {
  __shared__ const uint4* src[64];
  if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (threadIdx.x < k) src[threadIdx.x] = (const uint4*)(w + ids[threadIdx.x] * eb);
  __syncthreads();
  if (pdl) asm volatile("griddepcontrol.launch_dependents;");
  const u32 stride = gridDim.x * blockDim.x;
  const Walk walk((u32)(eb / 16), stride * UNROLL);
  Place p[UNROLL];  // load j of the thread's next round: word i + j * stride, i = thread, + stride * UNROLL, ...
#pragma unroll
  for (int j = 0; j < UNROLL; ++j) p[j] = walk.at(blockIdx.x * blockDim.x + threadIdx.x + j * stride);
  u32 acc = 0;
  while (p[0].e < (u32)k) {
    uint4 r[UNROLL];
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) r[j] = p[j].e < (u32)k ? ld_stream(src[p[j].e] + p[j].u) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int j = 0; j < UNROLL; ++j) {
      acc ^= r[j].x ^ r[j].y ^ r[j].z ^ r[j].w;
      p[j] = walk.next(p[j]);
    }
  }
  block_xor(acc, out);
}
// (the bounds give ptxas room for a round's loads in flight: without them ldg_walk_read8 compiled to 32 registers,
// fewer than its 8 16-byte loads' 32 registers of data alone; with them, 63, so at most 4 blocks of 256 threads an SM)
extern "C" __global__ void __launch_bounds__(512, 1)
ldg_walk_read4(const unsigned char* w, const long long* ids, int k, long long eb, u32* out, int pdl) {
  ldg_walk_read<4>(w, ids, k, eb, out, pdl);
}
extern "C" __global__ void __launch_bounds__(512, 1)
ldg_walk_read8(const unsigned char* w, const long long* ids, int k, long long eb, u32* out, int pdl) {
  ldg_walk_read<8>(w, ids, k, eb, out, pdl);
}

__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// one block an SM: warp 0's lane 0 copies chunks c = blockIdx.x, + gridDim.x, ... (CHUNK bytes, the last of an
// expert shorter) into a ring of STAGES stages; warps 1.. read each stage and free it. WALK: chunk c's expert and
// place in it walked (Walk) rather than divided out of c.
template <bool WALK>
__device__ void bulk_ring_read(const unsigned char* w, const long long* ids, int k, long long eb, u32* out,
                               int pdl, int chunk, int stages) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) unsigned long long full[32], empty[32];
  __shared__ long long base[64];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, consumers = (blockDim.x >> 5) - 1;
  if (threadIdx.x == 0) {
    for (int i = 0; i < stages; ++i) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_addr(&full[i])) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem_addr(&empty[i])), "r"(consumers)
                   : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (threadIdx.x < k) base[threadIdx.x] = ids[threadIdx.x] * eb;
  __syncthreads();
  if (pdl) asm volatile("griddepcontrol.launch_dependents;");
  const long long per = (eb + chunk - 1) / chunk, total = per * k;
  const Walk walk((u32)per, gridDim.x);
  u32 acc = 0;
  if (warp == 0) {
    if (lane == 0) {
      u32 n = 0;
      Place p = walk.at(blockIdx.x);
      for (long long c = blockIdx.x; c < total; c += gridDim.x, ++n, p = walk.next(p)) {
        const u32 s = n % stages;
        if (n >= (u32)stages) {  // wait until the consumers freed this stage's previous use
          const u32 bar = smem_addr(&empty[s]), parity = (n / stages - 1) & 1;
          u32 done = 0;
          while (!done)
            asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                         : "=r"(done) : "r"(bar), "r"(parity) : "memory");
        }
        const long long e = WALK ? p.e : c / per, off = (WALK ? p.u : c % per) * chunk;
        const u32 bytes = (u32)min((long long)chunk, eb - off), bar = smem_addr(&full[s]);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(smem_addr(ring + (size_t)s * chunk)), "l"(w + base[e] + off), "r"(bytes), "r"(bar)
                     : "memory");
      }
    }
  } else {
    u32 n = 0;
    Place p = walk.at(blockIdx.x);
    for (long long c = blockIdx.x; c < total; c += gridDim.x, ++n, p = walk.next(p)) {
      const u32 s = n % stages, bar = smem_addr(&full[s]), parity = (n / stages) & 1;
      u32 done = 0;
      while (!done)
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
      const long long off = (WALK ? p.u : c % per) * chunk;
      const int vecs = (int)(min((long long)chunk, eb - off) / 16);
      const uint4* st = (const uint4*)(ring + (size_t)s * chunk);
      for (int i = (warp - 1) * 32 + lane; i < vecs; i += consumers * 32) {
        const uint4 v = st[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
      }
      __syncwarp();
      if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem_addr(&empty[s])) : "memory");
    }
  }
  block_xor(acc, out);
}
extern "C" __global__ void __launch_bounds__(288, 1)
bulk_read(const unsigned char* w, const long long* ids, int k, long long eb, u32* out, int pdl, int chunk, int stages) {
  bulk_ring_read<false>(w, ids, k, eb, out, pdl, chunk, stages);
}
extern "C" __global__ void __launch_bounds__(288, 1)
bulk_walk_read(const unsigned char* w, const long long* ids, int k, long long eb, u32* out, int pdl, int chunk,
               int stages) {
  bulk_ring_read<true>(w, ids, k, eb, out, pdl, chunk, stages);
}

// W warps a block, each with its own ring of STAGES stages of CH chunks of 512 bytes: every lane copies its own 16
// bytes of a chunk with cp.async (no registers held while in flight), waits for its oldest group, reads what it copied.
// Chunks c = (blockIdx.x * W + warp) * CH + (0 .. CH-1), + gridDim.x * W * CH, ... WALK: the warp's next stage walks
// its place (Walk) rather than dividing each chunk's expert and place out of c.
template <int CH, int STAGES, bool WALK>
__device__ void async_read(const unsigned char* w, const long long* ids, int k, long long eb, u32* out, int pdl) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ const unsigned char* src[64];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, W = blockDim.x >> 5;
  if (pdl) asm volatile("griddepcontrol.wait;" ::: "memory");
  if (threadIdx.x < k) src[threadIdx.x] = w + ids[threadIdx.x] * eb;
  __syncthreads();
  if (pdl) asm volatile("griddepcontrol.launch_dependents;");
  const long long per = eb / 512, total = per * k, step = (long long)gridDim.x * W * CH;
  const long long first = ((long long)blockIdx.x * W + warp) * CH;
  const Walk walk((u32)per, (u32)step);
  Place next = walk.at((u32)first);  // WALK: the first chunk of the next stage to issue
  unsigned char* mine = ring + (size_t)warp * STAGES * CH * 512;
  auto issue = [&](u32 n) {  // stage n of this warp: chunks first + n * step + (0 .. CH-1)
    unsigned char* dst = mine + (n % STAGES) * CH * 512 + lane * 16;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const unsigned char* from = nullptr;
      if (WALK) {  // the CH chunks from `next` span at most two experts
        const bool over = next.u + i >= (u32)per;
        const u32 e = next.e + over, u = next.u + i - (over ? (u32)per : 0);
        if (e < (u32)k) from = src[e] + (size_t)u * 512;
      } else {
        const long long c = first + n * step + i;
        if (c < total) from = src[c / per] + (c % per) * 512;
      }
      if (from)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst + i * 512)),
                     "l"(from + lane * 16) : "memory");
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
    if (WALK) next = walk.next(next);
  };
  const u32 stages_total = first < total ? (u32)((total - first + step - 1) / step) : 0;
#pragma unroll
  for (int n = 0; n < STAGES - 1; ++n) issue(n);
  u32 acc = 0;
  for (u32 n = 0; n < stages_total; ++n) {
    asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");
    const unsigned char* from = mine + (n % STAGES) * CH * 512 + lane * 16;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const uint4 v = *(const uint4*)(from + i * 512);
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    issue(n + STAGES - 1);
  }
  asm volatile("cp.async.wait_all;" ::: "memory");
  block_xor(acc, out);
}
#define ASYNC_KERNEL(name, CH, STAGES, WALK)                                                                        \
  extern "C" __global__ void name(const unsigned char* w, const long long* ids, int k, long long eb, u32* out,   \
                                  int pdl) { async_read<CH, STAGES, WALK>(w, ids, k, eb, out, pdl); }
ASYNC_KERNEL(async_read4x10, 4, 10, false)
ASYNC_KERNEL(async_read2x10, 2, 10, false)
ASYNC_KERNEL(async_read4x5, 4, 5, false)
ASYNC_KERNEL(async_walk_read4x10, 4, 10, true)
ASYNC_KERNEL(async_walk_read2x10, 2, 10, true)
ASYNC_KERNEL(async_walk_read4x5, 4, 5, true)
"""


def variants(sms: int) -> list[dict]:
    out = []
    for pdl in (True, False):
        for walk in (False, True):
            for blocks in (1, 2, 4, 8):
                for threads, unroll in ((256, 4), (256, 8), (512, 4)):
                    out.append({"kind": "ldg", "walk": walk, "blocks": blocks * sms, "threads": threads,
                                "unroll": unroll, "pdl": pdl})
            for ch, stages, warps in ((4, 10, 8), (2, 10, 16), (4, 5, 16), (4, 5, 8)):
                out.append({"kind": "async", "walk": walk, "blocks": sms, "threads": 32 * warps, "chunks": ch,
                            "stages": stages, "pdl": pdl})
            for chunk, stages in ((16384, 4), (16384, 8), (8192, 8), (4096, 16), (32768, 4), (16384, 12)):
                out.append({"kind": "bulk", "walk": walk, "blocks": sms, "threads": 288, "chunk": chunk,
                            "stages": stages, "pdl": pdl})
    return out


def name_of(v: dict) -> str:
    if v["kind"] == "ldg":
        tail = f"unroll={v['unroll']}"
    elif v["kind"] == "async":
        tail = f"chunks={v['chunks']} stages={v['stages']}"
    else:
        tail = f"chunk={v['chunk'] // 1024}K stages={v['stages']}"
    kind = f"{v['kind']} walk" if v["walk"] else v["kind"]
    return f"{kind} blocks={v['blocks']} threads={v['threads']} {tail} pdl={v['pdl']}"


def kernel_of(v: dict) -> str:
    """The variant's kernel in SOURCE."""
    walk = "walk_" if v["walk"] else ""
    if v["kind"] == "ldg":
        return f"ldg_{walk}read{v['unroll']}"
    if v["kind"] == "async":
        return f"async_{walk}read{v['chunks']}x{v['stages']}"
    return f"bulk_{walk}read"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for read_floor.json")
    parser.add_argument("--reps", type=int, default=50, help="timed graph replays per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the variants (median kept)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64],
                        help="distinct experts a call reads (8: one row at top-8; 64: about 8 independent rows)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("read_floor.py needs a CUDA GPU")
    device = torch.device("cuda")
    shape = MINI
    eb = expert_bytes("mxfp4", shape)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    copy_bw = common.measure_bandwidth(device, 1 << 30)["copy"]["bytes_per_s"]
    gen = torch.Generator(device=device).manual_seed(0)
    layers = [torch.randint(0, 256, (shape["E"], eb), dtype=torch.uint8, device=device, generator=gen)
              for _ in range(shape["layers"])]
    module = CudaModule(SOURCE, "read_floor")
    out = torch.empty(8 * sms, dtype=torch.int32, device=device)
    result = {"benchmark": "read_floor", "date": common.now_iso(), "environment": common.environment(device),
              "shape": shape, "copy_bandwidth_Bps": copy_bw, "timing": "CUDA-graph replay of one call per layer "
              "over LAYERS layers, median us per call (as bench_mxfp4_experts.py)", "runs": []}
    print(f"copy {copy_bw / 1e9:.0f} GB/s")
    for k in args.experts:
        cpu = torch.Generator().manual_seed(k)
        ids = [torch.randperm(shape["E"], generator=cpu)[:k].to(device) for _ in layers]
        rows = measure(module, out, layers, ids, k, eb, sms, args)
        nbytes = k * eb
        for row in rows:
            if row["samples"]:
                row["us"] = statistics.median(row["samples"])
                row["GBps"] = nbytes / row["us"] / 1e3
                row["fraction_of_copy_bw"] = row["GBps"] * 1e9 / copy_bw
        run = {"experts": k, "bytes_per_call": nbytes, "goal_us_at_70pct": nbytes / (0.7 * copy_bw) * 1e6,
               "variants": rows}
        result["runs"].append(run)
        print(f"\n{k} experts: {nbytes / 1e6:.2f} MB a call; 70% of copy = {run['goal_us_at_70pct']:.2f} us")
        for row in sorted(rows, key=lambda r: r.get("us", 1e9)):
            if "us" in row:
                print(f"{row['variant']:66s} {row['us']:7.2f} us {row['GBps']:6.0f} GB/s "
                      f"{100 * row['fraction_of_copy_bw']:5.1f}% xor {'ok' if row.get('xor_ok') else 'WRONG'}")
            else:
                print(f"{row['variant']:66s} {row.get('error')}")
    common.write_json(Path(args.out) / "read_floor.json", result)
    print(f"wrote {Path(args.out) / 'read_floor.json'}")


def measure(module, out, layers, ids, k, eb, sms, args) -> list[dict]:
    """Each variant checked (XOR of every word read, against the host's) and timed ``args.repeats`` times,
    round-robin."""
    device = out.device

    def call(v: dict, w: torch.Tensor, i: torch.Tensor):
        args_ = [pointer(w), pointer(i), ctypes.c_int32(k), ctypes.c_int64(eb), pointer(out), ctypes.c_int32(v["pdl"])]
        if v["kind"] == "ldg":
            module.launch(kernel_of(v), (v["blocks"],), v["threads"], args_, device, pdl=v["pdl"])
        elif v["kind"] == "async":
            module.launch(kernel_of(v), (v["blocks"],), v["threads"], args_, device, pdl=v["pdl"],
                          smem=v["threads"] // 32 * v["stages"] * v["chunks"] * 512)
        else:
            module.launch(kernel_of(v), (v["blocks"],), v["threads"],
                          args_ + [ctypes.c_int32(v["chunk"]), ctypes.c_int32(v["stages"])], device, pdl=v["pdl"],
                          smem=v["chunk"] * v["stages"])

    words = layers[0][ids[0]].reshape(-1).view(torch.int32)
    want = xor_all(words)
    rows = {}
    for round_ in range(args.repeats):
        for v in variants(sms):
            name = name_of(v)
            row = rows.setdefault(name, {"variant": name, **v, "samples": []})
            if "error" in row:
                continue
            try:
                if round_ == 0:
                    out.zero_()
                    call(v, layers[0], ids[0])
                    row["xor_ok"] = xor_all(out[: v["blocks"]]) == want
                row["samples"].append(time_calls([lambda w=w, i=i, v=v: call(v, w, i) for w, i in zip(layers, ids)],
                                                 args.reps, True))
            except Exception as exc:  # noqa: BLE001 - a variant that fails is reported
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return list(rows.values())


def xor_all(words: torch.Tensor) -> int:
    """XOR of every int32 word (on the device, by halving)."""
    w = words.reshape(-1).clone()
    while w.numel() > 1:
        if w.numel() % 2:
            w = torch.cat([w, torch.zeros(1, dtype=w.dtype, device=w.device)])
        w = torch.bitwise_xor(w[: w.numel() // 2], w[w.numel() // 2:])
    return int(w.item()) & 0xFFFFFFFF


if __name__ == "__main__":
    main()
