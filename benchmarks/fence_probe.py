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
round (no L2 hits).

Two more cases ask whether a block *without* copies in flight can release for one that has them (the act's hand-off
in experts_kernel's grid barrier):
  peer       clusters of 2 blocks (on two SMs): block 0's producer thread issues its copies, then its warp 0 sends
             PAYLOAD bytes into block 1's shared memory (st.async, completing block 1's mbarrier); block 1's thread 0,
             which issued no copies, waits for them and releases. Timed: the hand-off (block 0's send to block 1's
             receipt), block 1's release, and when block 0's copies land after the send.
  co_resident two blocks an SM, no cluster: the first block on each SM issues copies, the second releases about 1.5 us
             later. Does one block's release wait for another block's copies on the same SM?
And the cluster-scope ``fence.acq_rel.cluster`` with another warp's copies in flight.
Writes DIR/fence_probe.json and prints percentiles (ns) over blocks and rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
from tilec.codegen.cuda_build import CudaModule, pointer  # noqa: E402

MODES = ("none", "in_flight", "other_warp", "landed")
RELEASES = ("fence.acq_rel.gpu", "fence.release.gpu", "atom.release.gpu.add", "red.release.gpu.add",
            "fence.acq_rel.cluster")
PAYLOAD = 1536  # bytes handed to the peer: one row's act at mini shapes (768 bf16)
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
// The release under test (RELEASE: 0 fence.acq_rel.gpu, 1 fence.release.gpu, 2 atom.release.gpu, 3 red.release.gpu,
// 4 fence.acq_rel.cluster).
__device__ __forceinline__ void release(u32* word) {
#if RELEASE == 0
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
#elif RELEASE == 1
  asm volatile("fence.release.gpu;" ::: "memory");
#elif RELEASE == 2
  u32 old;
  asm volatile("atom.release.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(word) : "memory");
  if (old == 0xFFFFFFFFu) *word = 0;  // (uses the value: the add's round trip is timed too)
#elif RELEASE == 3
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" :: "l"(word) : "memory");
#else
  asm volatile("fence.acq_rel.cluster;" ::: "memory");
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

__device__ __forceinline__ void init_bar(u32 bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ u32 peer_addr(u32 local, u32 rank) {  // the same variable in block `rank` of the cluster
  u32 r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(local), "r"(rank));
  return r;
}
// peer: launched in clusters of 2. out[block][0..2]: block 0: the send began, the send issued, its copies landed;
// block 1: the payload arrived (its mbarrier completed), the release ended, the first payload word (a check).
extern "C" __global__ void peer_probe(const unsigned char* src, u64* out, int bytes, u32* word) {
  extern __shared__ __align__(128) unsigned char buf[];
  __shared__ __align__(8) u64 bar, hand;
  __shared__ __align__(16) uint4 inbox[PAYLOAD / 16];
  const u32 b = smem(&bar), h = smem(&hand);
  u32 rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  if (threadIdx.x == 0) {
    init_bar(b);
    init_bar(h);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  cluster_sync();  // the peer's barrier is initialised before anything is sent to it
  u64* o = out + blockIdx.x * 3;
  if (rank == 0) {
    if (threadIdx.x == 32) issue(b, buf, src + (size_t)blockIdx.x * bytes, bytes);
    __syncthreads();  // the copies are in flight
    if (threadIdx.x < 32) {
      const u32 to = peer_addr(smem(inbox), 1), to_bar = peer_addr(h, 1);
      const u64 t0 = now();
      for (int i = threadIdx.x; i < PAYLOAD / 16; i += 32)
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], { %1, %2, %3, %4}, [%5];"
                     :: "r"(to + i * 16), "r"(i + 1), "r"(blockIdx.x), "r"(0u), "r"(0u), "r"(to_bar) : "memory");
      if (threadIdx.x == 0) {
        o[0] = t0;
        o[1] = now();
        wait_bar(b);
        o[2] = now();
      }
    }
  } else if (threadIdx.x == 0) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(h), "r"(PAYLOAD) : "memory");
    wait_bar(h);
    const u64 arrived = now();
    release(word);
    o[0] = arrived;
    o[1] = now();
    o[2] = inbox[0].x;
  }
  cluster_sync();  // block 1 stays until block 0 is done with it
}

// co_resident: 2 * SMs blocks, two an SM. out[block][0..3]: the SM, then for the first SMs blocks (streamers) the
// copies issued and landed, for the others (releasers) the release's start and end.
extern "C" __global__ void coresident_probe(const unsigned char* src, u64* out, int bytes, u32* word, int streamers) {
  extern __shared__ __align__(128) unsigned char buf[];
  __shared__ __align__(8) u64 bar;
  const u32 b = smem(&bar);
  if (threadIdx.x == 0) {
    init_bar(b);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  u32 sm;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
  u64* o = out + blockIdx.x * 4;
  o[0] = sm;
  if ((int)blockIdx.x < streamers) {
    o[1] = now();
    issue(b, buf, src + (size_t)blockIdx.x * bytes, bytes);
    wait_bar(b);
    o[2] = now();
  } else {
    const u64 start = now();
    while (now() < start + 1500) {}
    o[1] = now();
    release(word);
    o[2] = now();
  }
}
"""


def defines(release: int) -> str:
    """The source's compile-time settings for the release numbered ``release`` in RELEASES."""
    return f"#define CHUNK {CHUNK}\n#define PAYLOAD {PAYLOAD}\n#define RELEASE {release}\n"


def percentiles(v: list[float]) -> dict:
    v = sorted(v)
    return {"p10": v[len(v) // 10], "p50": v[len(v) // 2], "p90": v[len(v) * 9 // 10], "max": v[-1]}


def release_cases(modules, src, out, word, sms: int, nbytes: int, rounds: int, dev) -> dict:
    """The four modes of the first release; the others with none and another warp's copies in flight."""
    per_round = sms * nbytes
    cases = [(k, mode) for k in range(len(RELEASES)) for mode in range(len(MODES))
             if k == 0 or MODES[mode] in ("none", "other_warp")]
    results = {}
    for k, mode in cases:
        release, module, name = RELEASES[k], modules[k], MODES[mode]
        fence, landed_after = [], []
        for r in range(rounds + 2):
            part = src[(r % 8) * per_round:]
            module.launch("fence_probe", (sms,), 64, [pointer(part), pointer(out), ctypes.c_int(nbytes),
                                                      ctypes.c_int(mode), pointer(word)], dev, smem=nbytes)
            torch.cuda.synchronize()
            if r < 2:
                continue  # warm-up
            t = out[:sms * 3].view(sms, 3).cpu()
            fence += [int(x) for x in t[:, 1] - t[:, 0]]
            if name in ("in_flight", "other_warp"):
                landed_after += [int(x) for x in t[:, 2] - t[:, 1]]
        key = f"{release} {name}"
        results[key] = {"release_ns": percentiles(fence)}
        if landed_after:
            results[key]["copies_land_after_release_ns"] = percentiles(landed_after)
    return results


def peer_case(module, src, out, word, sms: int, nbytes: int, rounds: int, dev) -> dict:
    """Clusters of 2: block 0 streams and hands PAYLOAD bytes to block 1, which releases (atom.release.gpu)."""
    pairs = sms // 2
    per_round = sms * nbytes
    handoff, release, landed_after_send = [], [], []
    for r in range(rounds + 2):
        part = src[(r % 8) * per_round:]
        out.zero_()
        module.launch("peer_probe", (2 * pairs,), 64, [pointer(part), pointer(out), ctypes.c_int(nbytes),
                                                       pointer(word)], dev, smem=nbytes, cluster=2)
        torch.cuda.synchronize()
        if r < 2:
            continue
        t = out[:2 * pairs * 3].view(pairs, 2, 3).cpu()
        if not bool((t[:, 1, 2] == 1).all()):
            raise RuntimeError("peer_probe: a payload did not arrive")
        handoff += [int(x) for x in t[:, 1, 0] - t[:, 0, 0]]
        release += [int(x) for x in t[:, 1, 1] - t[:, 1, 0]]
        landed_after_send += [int(x) for x in t[:, 0, 2] - t[:, 0, 0]]
    return {"peer handoff_ns": percentiles(handoff), "peer release_ns": percentiles(release),
            "peer sender_copies_land_after_send_ns": percentiles(landed_after_send)}


def coresident_case(module, src, out, word, sms: int, nbytes: int, rounds: int, dev) -> dict:
    """Two blocks an SM: does the second's release wait for the first's copies, when they are still in flight?"""
    half = nbytes // 2
    waiting, clear = [], []
    for r in range(rounds + 2):
        part = src[(r % 8) * sms * nbytes:]
        out.zero_()
        module.launch("coresident_probe", (2 * sms,), 64, [pointer(part), pointer(out), ctypes.c_int(half),
                                                           pointer(word), ctypes.c_int(sms)], dev, smem=half)
        torch.cuda.synchronize()
        if r < 2:
            continue
        t = out[:2 * sms * 4].view(2 * sms, 4).cpu().tolist()
        landed = {}  # SM -> when its streamer's copies landed (issued before)
        for sm, issued, done, _ in t[:sms]:
            landed[sm] = (issued, done)
        for sm, start, end, _ in t[sms:]:
            s = landed.get(sm)
            # the releaser shares its SM with a streamer whose copies were in flight when it released
            (waiting if s and s[0] < start < s[1] else clear).append(end - start)
    res = {}
    if waiting:
        res["co_resident release_ns, another block's copies in flight"] = percentiles(waiting)
    if clear:
        res["co_resident release_ns, none in flight on its SM"] = percentiles(clear)
    return res


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
    modules = [CudaModule(defines(k) + SOURCE, f"fence_probe_{k}") for k in range(len(RELEASES))]
    word = torch.zeros(1, dtype=torch.int32, device=dev)
    src = torch.randint(0, 256, (sms * nbytes * 8,), dtype=torch.uint8, device=dev)  # 8 rounds' worth, > the L2
    out = torch.zeros(2 * sms * 4, dtype=torch.int64, device=dev)
    results = release_cases(modules, src, out, word, sms, nbytes, args.rounds, dev)
    atom = modules[RELEASES.index("atom.release.gpu.add")]
    for case in (peer_case, coresident_case):
        try:
            results.update(case(atom, src, out, word, sms, nbytes, args.rounds, dev))
        except Exception as e:  # a launch the GPU refuses (clusters) leaves the other figures standing
            results[case.__name__] = {"error": f"{type(e).__name__}: {e}"}
    report = {"benchmark": "fence_probe", "environment": common.environment(dev), "kb_per_block": KB_PER_BLOCK,
              "blocks": sms, "rounds": args.rounds, "payload_bytes": PAYLOAD, "results": results}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    common.write_json(outdir / "fence_probe.json", report)
    print(f"{sms} blocks, {KB_PER_BLOCK} KB of bulk copies each; ns, p10 / p50 / p90 / max over blocks and rounds")
    for name, r in results.items():
        if "error" in r:
            print(f"  {name}: {r['error']}")
            continue
        q = r.get("release_ns", r)
        line = f"  {name:60s} " + " / ".join(str(q[k]) for k in ("p10", "p50", "p90", "max"))
        if "copies_land_after_release_ns" in r:
            q = r["copies_land_after_release_ns"]
            line += "   copies land after it " + " / ".join(str(q[k]) for k in ("p10", "p50", "p90", "max"))
        print(line)
    print(f"wrote {outdir / 'fence_probe.json'}")


if __name__ == "__main__":
    main()
