// The megakernel's task functions (templates/cuda/megakernel.cu.j2 includes this file). Every function is one op of
// a decode step, computed by the whole grid: `gwarp` / `nwarps` deal output rows to warps across every block,
// `blockIdx.x` / `gridDim.x` deal larger items to blocks. Values are the graph's: each op computes in fp32 and rounds
// its outputs to their dtype where the reference op does, so a step's intermediates are the reference's, give or
// take the order of fp32 sums. A row's arithmetic never depends on how many rows the step has (batch invariance: a
// verify step's rows are the bits of single-row decode steps).
//
// Memory: weights (never written during a launch) are read through the non-coherent path (ld.global.nc); everything
// written during the launch (activations, the KV cache, scratch) is read at L2 (ld.global.cg), since another SM
// wrote it after this SM may have cached the line. The grid barrier between phases orders the two.

namespace mk {

// 16-bit floats by their bits, so the kernel needs no CUDA header (NVRTC compiles it without include paths).
struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };
typedef unsigned int u32;
#define MK_TASK __device__ __noinline__  // a task function: one copy per type signature, called by every phase
#define MK_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
  return __uint_as_float(static_cast<u32>(b) << 16);
}
__device__ __forceinline__ float f16_bits_to_float(unsigned short b) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
  return f;
}
__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ float tof(bf16 x) { return bf16_bits_to_float(x.bits); }
__device__ __forceinline__ float tof(f16 x) { return f16_bits_to_float(x.bits); }
template <class T> __device__ __forceinline__ T fromf(float x);
template <> __device__ __forceinline__ float fromf<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 fromf<bf16>(float x) {  // round to nearest even, NaN kept quiet
  const u32 u = __float_as_uint(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<unsigned short>((u >> 16) | 0x40u)};
  return bf16{static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
template <> __device__ __forceinline__ f16 fromf<f16>(float x) {
  unsigned short b;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(x));
  return f16{b};
}
// x rounded to T's precision, as a float: what the reference holds after an op that returns a T tensor.
template <class T> __device__ __forceinline__ float rnd(float x) { return tof(fromf<T>(x)); }

// Loads. `nc`: weights; `cg`: values written during this launch.
template <class T> __device__ __forceinline__ float ld_cg(const T* p);
template <> __device__ __forceinline__ float ld_cg<float>(const float* p) { return __ldcg(p); }
template <> __device__ __forceinline__ float ld_cg<bf16>(const bf16* p) {
  return bf16_bits_to_float(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}
template <> __device__ __forceinline__ float ld_cg<f16>(const f16* p) {
  return f16_bits_to_float(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float ld_nc(const float* p) { return __ldg(p); }
// A streamed weight's 16 bytes: mxfp4_mma.cuh's ld_stream, the non-coherent path without a place in L1 (read once a
// step: in L1 they would only evict what is read again, the body's spilled values among them; against __ldg the
// whole step took 11% less time in bf16 and 22% less in MXFP4, every task faster: benchmarks/results/h100-2026-11-25f).
__device__ __forceinline__ uint4 ld_stream16(const void* p) { return ::ld_stream(static_cast<const uint4*>(p)); }
__device__ __forceinline__ unsigned char ld_stream1(const unsigned char* p) {
  unsigned short v;
  asm("ld.global.nc.L1::no_allocate.u8 %0, [%1];" : "=h"(v) : "l"(p));
  return static_cast<unsigned char>(v);
}
__device__ __forceinline__ float ld_nc(const bf16* p) {
  return bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float ld_nc(const f16* p) {
  return f16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
}
// An expert id written during this launch (the router's), as an int.
__device__ __forceinline__ int ld_id(const long long* p) { return static_cast<int>(__ldcg(p)); }
__device__ __forceinline__ int ld_id(const int* p) { return __ldcg(p); }

// 8 consecutive elements as floats (the pointer 16-byte aligned for 16-bit types, 32 for float).
__device__ __forceinline__ void unpack8(uint4 u, float* o, const bf16*) {
  const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = __uint_as_float(w[i] << 16);
    o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack8(uint4 u, float* o, const f16*) {
  const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    o[2 * i] = f16_bits_to_float(static_cast<unsigned short>(w[i] & 0xffffu));
    o[2 * i + 1] = f16_bits_to_float(static_cast<unsigned short>(w[i] >> 16));
  }
}
template <class T> struct Vec8 {  // 16-bit types: one 16-byte load
  // 8 floats rounded to T
  __device__ __forceinline__ void set(const float* o) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = static_cast<u32>(fromf<T>(o[2 * i]).bits) | (static_cast<u32>(fromf<T>(o[2 * i + 1]).bits) << 16);
    u = make_uint4(w[0], w[1], w[2], w[3]);
  }
  uint4 u;
  __device__ __forceinline__ void nc(const T* p) { u = __ldg(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ void stream(const T* p) { u = ld_stream16(p); }
  __device__ __forceinline__ void cg(const T* p) { u = __ldcg(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ void sh(const T* p) { u = *reinterpret_cast<const uint4*>(p); }
  // SH: from this block's staged copy in shared memory (sh), else written during this launch (cg)
  template <bool SH> __device__ __forceinline__ void act(const T* p) { if (SH) sh(p); else cg(p); }
  __device__ __forceinline__ void put(T* p) const { *reinterpret_cast<uint4*>(p) = u; }
  __device__ __forceinline__ void get(float* o) const { unpack8(u, o, static_cast<const T*>(nullptr)); }
};
template <> struct Vec8<float> {
  float4 a, b;
  __device__ __forceinline__ void nc(const float* p) {
    a = __ldg(reinterpret_cast<const float4*>(p));
    b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  }
  __device__ __forceinline__ void stream(const float* p) {
    const uint4 x = ld_stream16(p), y = ld_stream16(p + 4);
    a = make_float4(__uint_as_float(x.x), __uint_as_float(x.y), __uint_as_float(x.z), __uint_as_float(x.w));
    b = make_float4(__uint_as_float(y.x), __uint_as_float(y.y), __uint_as_float(y.z), __uint_as_float(y.w));
  }
  __device__ __forceinline__ void cg(const float* p) {
    a = __ldcg(reinterpret_cast<const float4*>(p));
    b = __ldcg(reinterpret_cast<const float4*>(p) + 1);
  }
  __device__ __forceinline__ void sh(const float* p) {
    a = *reinterpret_cast<const float4*>(p);
    b = *(reinterpret_cast<const float4*>(p) + 1);
  }
  template <bool SH> __device__ __forceinline__ void act(const float* p) { if (SH) sh(p); else cg(p); }
  __device__ __forceinline__ void set(const float* o) {
    a = make_float4(o[0], o[1], o[2], o[3]);
    b = make_float4(o[4], o[5], o[6], o[7]);
  }
  __device__ __forceinline__ void put(float* p) const {
    *reinterpret_cast<float4*>(p) = a;
    *(reinterpret_cast<float4*>(p) + 1) = b;
  }
  __device__ __forceinline__ void get(float* o) const {
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w; o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}

// ------------------------------------------------------------------------------------------------ grid barrier
// A 64-bit count that only grows: every block adds 1 at each barrier (a release add, not waited for) and waits until
// the count reaches its target. A launch makes NB barriers, so it starts at a multiple of NB * gridDim.x blocks'
// arrivals, which every block reads at its start (`barrier_base`: no block can pass all of this launch's barriers
// before the slowest block has started). Nothing is reset between launches, so a CUDA graph replays it as it is.
// All blocks are resident: the grid is one block an SM.
__device__ __forceinline__ unsigned long long barrier_base(unsigned long long* count, unsigned long long per_launch) {
  __shared__ unsigned long long base;
  if (threadIdx.x == 0) {
    unsigned long long now;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(count) : "memory");
    base = per_launch ? now / per_launch * per_launch : 0;
  }
  __syncthreads();
  return base;
}
__device__ __forceinline__ void grid_sync(unsigned long long* count, unsigned long long target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(count) : "memory");
    // Poll with a back-off: a tight loop of loads from the waiting blocks hammers the count's L2 slice (measured:
    // no change in a mini step, benchmarks/results/h100-2026-11-24i/run4_decode_peer); the fence after the last
    // poll makes the other blocks' writes visible.
    unsigned long long now;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(count) : "memory");
    while (now < target) {
      __nanosleep(32);
      asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(now) : "l"(count) : "memory");
    }
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
  }
  __syncthreads();
}

// Each block's share of `bytes` at `base` (16-byte aligned) prefetched into L2 by bulk prefetches: the next phases'
// weights stream from HBM while this phase computes and the grid waits at its barrier.
__device__ __forceinline__ void prefetch_l2(const void* base, long long bytes) {
  if (threadIdx.x != 0 || bytes <= 0) return;
  const long long share = ((bytes + gridDim.x - 1) / gridDim.x + 15) / 16 * 16;
  const long long lo = share * blockIdx.x;
  const long long hi = lo + share < bytes ? lo + share : bytes / 16 * 16;
  for (long long at = lo; at < hi; at += 65536) {
    const unsigned size = static_cast<unsigned>(hi - at < 65536 ? hi - at : 65536);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(static_cast<const char*>(base) + at), "r"(size)
                 : "memory");
  }
}

// ------------------------------------------------------------------------------------------ GEMV building blocks
// A GEMV phase's activations, x [R, K] (n = R * K elements, n % 8 == 0), copied into this block's shared memory at
// `xs` when they fit in MK_XS_BYTES, so that the dot products read them from shared memory rather than making a
// round trip to L2 for every 8 elements. Every thread of the block calls it; returns whether x was staged.
template <class TX> __device__ __forceinline__ bool fits_x(int n) {
  return static_cast<long long>(n) * static_cast<long long>(sizeof(TX)) <= MK_XS_BYTES;
}
template <class TX>
__device__ __forceinline__ bool stage_x(const TX* x, int n, TX* xs) {
  if (!fits_x<TX>(n)) return false;
  __syncthreads();  // the block's reads of the previous staging are done
  constexpr int DEPTH = 4;
  for (int i0 = threadIdx.x * 8; i0 < n; i0 += DEPTH * blockDim.x * 8) {
    Vec8<TX> v[DEPTH];
#pragma unroll
    for (int u = 0; u < DEPTH; ++u)
      if (i0 + u * blockDim.x * 8 < n) v[u].cg(x + i0 + u * blockDim.x * 8);
#pragma unroll
    for (int u = 0; u < DEPTH; ++u)
      if (i0 + u * blockDim.x * 8 < n) v[u].put(xs + i0 + u * blockDim.x * 8);
  }
  __syncthreads();
  return true;
}
// The staging area: shared memory past the first MK_RED_FLOATS floats (the tasks' reductions).
template <class TX> __device__ __forceinline__ TX* staging(float* smem) {
  return reinterpret_cast<TX*>(smem + MK_RED_FLOATS);
}

// acc[i][r] = sum_k w[i][k] * x[r * K + k] for NW weight rows of K elements (K % 8 == 0) and the R rows of x, summed
// over the warp (every lane holds the sums). Each lane takes 8 elements in turn; the NW rows' next DEPTH chunks are
// all loaded before any is used: 8 loads of 16 bytes in flight a lane, as many as the registers hold without spills
// (measured with ptxas -v). x comes from shared memory (SH) or from L2.
template <int MAXR, int NW, bool SH, class TW, class TX>
__device__ __forceinline__ void dot_impl(const TW* const* w, const TX* x, int K, int R, float (*acc)[MAXR]) {
  constexpr int DEPTH = (sizeof(TW) == 4 ? 4 : 8) / NW;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < NW; ++i)
#pragma unroll
    for (int r = 0; r < MAXR; ++r) acc[i][r] = 0.0f;
  for (int k00 = 0; k00 < K; k00 += DEPTH * 256) {  // as many turns in every lane: the __syncwarp below
    const int k0 = k00 + lane * 8;
    Vec8<TW> wv[NW][DEPTH];
#pragma unroll
    for (int u = 0; u < DEPTH; ++u)
#pragma unroll
      for (int i = 0; i < NW; ++i)
        if (k0 + u * 256 < K) wv[i][u].stream(w[i] + k0 + u * 256);
    // ptxas does not move loads past a warp barrier: without it, under the kernel's register pressure, it may
    // interleave them with the FMAs and keep 2 in flight instead of 8 (sass_diff.load_batches checks the build).
    __syncwarp();
#pragma unroll
    for (int u = 0; u < DEPTH; ++u) {
      const int k = k0 + u * 256;
      if (k >= K) break;
      float wf[NW][8];
#pragma unroll
      for (int i = 0; i < NW; ++i) wv[i][u].get(wf[i]);
#pragma unroll
      for (int r = 0; r < MAXR; ++r) {
        if (r >= R) break;
        Vec8<TX> xv;
        xv.template act<SH>(x + r * K + k);
        float xf[8];
        xv.get(xf);
#pragma unroll
        for (int i = 0; i < NW; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][r] = fmaf(wf[i][j], xf[j], acc[i][r]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < NW; ++i)
#pragma unroll
    for (int r = 0; r < MAXR; ++r)
      if (r < R) acc[i][r] = warp_sum(acc[i][r]);
}
// dot_impl with x staged (`staged`: from stage_x, x then the staging area) or not. A step of one row (every decode
// step without speculation) takes a loop made for one row: the MAXR loop's row branches (a taken branch past the
// other rows' code for every chunk) left the GEMV tasks' warps waiting on instruction fetch for 25 to 52% of their
// samples (Nsight Compute, benchmarks/results/h100-2026-11-25b). Row 0's sums are the same bits either way.
template <int MAXR, int NW, class TW, class TX>
__device__ __forceinline__ void dot(const TW* const* w, const TX* x, bool staged, int K, int R, float (*acc)[MAXR]) {
  if (MAXR > 1 && R == 1) {
    float one[NW][1];
    if (staged)
      dot_impl<1, NW, true>(w, x, K, 1, one);
    else
      dot_impl<1, NW, false>(w, x, K, 1, one);
#pragma unroll
    for (int i = 0; i < NW; ++i) acc[i][0] = one[i][0];
    return;
  }
  if (staged)
    dot_impl<MAXR, NW, true>(w, x, K, R, acc);
  else
    dot_impl<MAXR, NW, false>(w, x, K, R, acc);
}

// For each of this warp's output rows n of w [N, K] (n = gwarp, gwarp + nwarps, ...), done(n, acc) with acc[r] the
// dot of row n with x's row r. Two rows at a time, their loads in flight together.
template <int MAXR, class TW, class TX, class F>
__device__ __forceinline__ void gemv_rows(const TW* w, const TX* x, bool staged, int K, int N, int R, int gwarp,
                                          int nwarps, F done) {
  float acc[2][MAXR];
  for (int n = gwarp; n < N; n += 2 * nwarps) {
    if (n + nwarps < N) {
      const TW* rows[2] = {w + static_cast<long long>(n) * K, w + static_cast<long long>(n + nwarps) * K};
      dot<MAXR, 2>(rows, x, staged, K, R, acc);
      done(n, acc[0]);
      done(n + nwarps, acc[1]);
    } else {
      const TW* rows[1] = {w + static_cast<long long>(n) * K};
      dot<MAXR, 1>(rows, x, staged, K, R, acc);
      done(n, acc[0]);
    }
  }
}

// ------------------------------------------------------------------------------------------------------ ops
// tilec.embedding: out[r, :] = table[ids[r], :]
template <class TI, class TW>
MK_TASK void embedding(const TI* ids, const TW* table, TW* out, int H, int R, int V) {
  const int n = R * H;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const long long id = static_cast<long long>(ids[i / H]);
    out[i] = (id >= 0 && id < V) ? table[id * H + i % H] : fromf<TW>(0.0f);
  }
}

// 8 elements of x from `at` (16-byte aligned), plus res where there is one, the sum rounded to TS (add_rms_norm's s).
template <class TS, class TX, class TR>
__device__ __forceinline__ void load_sum8(const TX* x, const TR* res, int at, float* v) {
  Vec8<TX> xv;
  xv.cg(x + at);
  xv.get(v);
  if (res == nullptr) return;
  float w[8];
  Vec8<TR> rv;
  rv.cg(res + at);
  rv.get(w);
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = rnd<TS>(v[e] + w[e]);
}

// One row of tilec.rms_norm / add_rms_norm by one warp, 8 elements a lane at a time (H % 8 == 0): with `res`,
// s = x + res (rounded to TS), else s = x; the row's result is weight * rnd<TS>(s * rsqrt(mean(s^2) + eps)), rounded
// to TO, stored at `out` (global or shared memory); s is stored at `sum` unless it is null. The sum of squares is
// the warp's, in a fixed order: a row's result never depends on the step's other rows.
template <class TX, class TR, class TS, class TW, class TO>
__device__ __forceinline__ void norm_row(const TX* x, const TR* res, const TW* __restrict__ weight, float eps,
                                         int H, TO* out, TS* sum) {
  const int lane = threadIdx.x & 31;
  float ss = 0.0f;
#pragma unroll 4
  for (int i = lane * 8; i < H; i += 256) {
    float v[8];
    load_sum8<TS>(x, res, i, v);
#pragma unroll
    for (int e = 0; e < 8; ++e) ss = fmaf(v[e], v[e], ss);
  }
  const float inv = rsqrtf(warp_sum(ss) / H + eps);
#pragma unroll 4
  for (int i = lane * 8; i < H; i += 256) {
    float v[8], g[8], o[8];
    load_sum8<TS>(x, res, i, v);
    Vec8<TW> gv;
    gv.nc(weight + i);
    gv.get(g);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = g[e] * rnd<TS>(v[e] * inv);
    Vec8<TO> ov;
    ov.set(o);
    ov.put(out + i);
    if (sum != nullptr) {
      Vec8<TS> sv;
      sv.set(v);
      sv.put(sum + i);
    }
  }
}

// tilec.rms_norm / add_rms_norm as a phase of its own (when its consumers cannot compute it, see Normed): a warp a
// row.
template <class TX, class TR, class TS, class TW, class TO>
MK_TASK void rms_norm(const TX* x, const TR* res, const TW* __restrict__ weight, TO* out, TS* sum,
                      int H, int R, float eps, int gwarp, int nwarps) {
  for (int r = gwarp; r < R; r += nwarps)
    norm_row(x + r * H, res != nullptr ? res + r * H : res, weight, eps, H, out + r * H,
             sum != nullptr ? sum + r * H : sum);
}

// A GEMV phase's activations [R, K], as the task reads them. Plain: a tensor, staged in shared memory when it fits
// (else read from L2). Normed: the output of an RMSNorm that has no phase of its own; every block computes it into
// its shared memory (the planner folds a norm only where it always fits), and block 0 of the first consumer phase
// stores the sum when the norm has one (`sum` non-null there only).
template <class TX>
struct Plain {
  using T = TX;
  const TX* x;
  // Stage x in the staging area if it fits (`first`: the phase's first task to read it copies it); whether it is
  // there.
  __device__ __forceinline__ bool stage(int R, int K, float* smem, bool first) const {
    return first ? stage_x(x, R * K, staging<TX>(smem)) : fits_x<TX>(R * K);
  }
  __device__ __forceinline__ const T* global() const { return x; }
};
// The norm's output and sum have one type (the planner's condition), so s is kept in the staging area between the
// two passes: the block reads x (and res) once. A row's sum of squares has a fixed order (each thread's 8-element
// vectors in turn, the warp, then the warps in order), whatever the step's other rows.
template <class TX, class TR, class TS, class TW>
struct Normed {
  using T = TS;
  const TX* x;
  const TR* res;
  const TW* weight;
  TS* sum;
  float eps;
  __device__ __forceinline__ bool stage(int R, int H, float* smem, bool first) const {
    if (!first) return true;
    TS* xs = staging<TS>(smem);
    float* red = smem;  // [R, warps] partial sums of squares
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5;
    __syncthreads();  // the block's reads of the previous staging are done
    for (int r = 0; r < R; ++r) {
      float ss = 0.0f;
#pragma unroll 2
      for (int i = threadIdx.x * 8; i < H; i += blockDim.x * 8) {
        float v[8];
        load_sum8<TS>(x, res, r * H + i, v);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(v[e], v[e], ss);
        Vec8<TS> sv;
        sv.set(v);  // exact: v is rounded to TS
        sv.put(xs + r * H + i);
      }
      ss = warp_sum(ss);
      if ((threadIdx.x & 31) == 0) red[r * warps + warp] = ss;
    }
    __syncthreads();
    for (int r = 0; r < R; ++r) {
      float ss = 0.0f;
      for (int w = 0; w < warps; ++w) ss += red[r * warps + w];
      const float inv = rsqrtf(ss / H + eps);
      for (int i = threadIdx.x * 8; i < H; i += blockDim.x * 8) {
        float v[8], g[8];
        Vec8<TS> sv;
        sv.sh(xs + r * H + i);
        sv.get(v);
        Vec8<TW> gv;
        gv.nc(weight + i);
        gv.get(g);
        if (sum != nullptr && blockIdx.x == 0) sv.put(sum + r * H + i);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = g[e] * rnd<TS>(v[e] * inv);
        sv.set(v);
        sv.put(xs + r * H + i);
      }
    }
    __syncthreads();
    return true;
  }
  __device__ __forceinline__ const T* global() const { return nullptr; }  // never read: always staged
};

// tilec.add / elementwise copies: out = a + b (b may be null)
template <class TA, class TB, class TO>
MK_TASK void add(const TA* a, const TB* b, TO* out, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = fromf<TO>(b != nullptr ? ld_cg(a + i) + ld_cg(b + i) : ld_cg(a + i));
}

// One input of tilec.cat along the last dim: out[r, col0 + i] = src[r, i].
template <class TS, class TO>
MK_TASK void copy_cols(const TS* src, TO* out, int N, int N_out, int col0, int R) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < R * N; i += gridDim.x * blockDim.x)
    out[(i / N) * N_out + col0 + i % N] = fromf<TO>(ld_cg(src + i));
}

// tilec.linear: y[r, n] = x[r, :] . w[n, :] + bias[n], a warp an output column.
template <int MAXR, class TW, class Src, class TB, class TY>
MK_TASK void linear(const TW* __restrict__ w, const TB* __restrict__ bias, Src src, TY* y, int K, int N,
                    int R, int gwarp, int nwarps, float* smem) {
  typename Src::T* xs = staging<typename Src::T>(smem);
  const bool staged = src.stage(R, K, smem, true);
  gemv_rows<MAXR>(w, staged ? xs : src.global(), staged, K, N, R, gwarp, nwarps, [&](int n, const float* acc) {
    if ((threadIdx.x & 31) == 0) {
      const float b = bias != nullptr ? ld_nc(bias + n) : 0.0f;
#pragma unroll
      for (int r = 0; r < MAXR; ++r) {
        if (r >= R) break;  // one branch past the other rows' code (each row's test would be a cold line)
        y[r * N + n] = fromf<TY>(acc[r] + b);
      }
    }
  });
}

// RoPE's angle for position p and pair j of a rotary_dim-wide rotation (HF's inv_freq, in fp32).
__device__ __forceinline__ void rope_cos_sin(long long p, int j, int rotary_dim, float theta, float* c, float* s) {
  const float inv_freq = 1.0f / powf(theta, static_cast<float>(2 * j) / static_cast<float>(rotary_dim));
  const float angle = static_cast<float>(p) * inv_freq;
  *c = cosf(angle);
  *s = sinf(angle);
}

// One projection of tilec.qkv_rope (q or k with RoPE, v without): out[r, head * D + d]. Items: per head, the
// rotary_dim / 2 pairs (d, d + rotary_dim / 2) computed together, then the D - rotary_dim plain columns.
template <int MAXR, class TW, class Src, class TB, class TY, class TP>
MK_TASK void proj_rope(const TW* __restrict__ w, const TB* __restrict__ bias, Src src, TY* y, const TP* pos,
                       int K, int heads, int D, int rotary_dim, float theta, int T, int R, int item0,
                       bool first, int gwarp, int nwarps, float* smem) {
  // the phase's three projections share x: the first stages it
  typename Src::T* xs = staging<typename Src::T>(smem);
  const bool staged = src.stage(R, K, smem, first);
  const typename Src::T* x = staged ? xs : src.global();
  const int half = rotary_dim / 2;
  const int per_head = half + (D - rotary_dim);
  const int items = heads * per_head;
  const int N = heads * D;
  float acc[2][MAXR];
  // item0 offsets this projection's items so the three projections share the warps evenly
  for (int it = (gwarp + nwarps - item0 % nwarps) % nwarps; it < items; it += nwarps) {
    const int head = it / per_head, j = it % per_head;
    const int col = head * D + (j < half ? j : j + half);
    const TW* rows[2] = {w + static_cast<long long>(col) * K, w + static_cast<long long>(col + half) * K};
    if (j < half)  // a rotated pair: both rows together
      dot<MAXR, 2>(rows, x, staged, K, R, acc);
    else
      dot<MAXR, 1>(rows, x, staged, K, R, acc);
    if ((threadIdx.x & 31) == 0) {
      const float ba = bias != nullptr ? ld_nc(bias + col) : 0.0f;
#pragma unroll
      for (int r = 0; r < MAXR; ++r) {
        if (r >= R) break;  // one branch past the other rows' code (each row's test would be a cold line)
        const float x1 = rnd<TY>(acc[0][r] + ba);  // F.linear's output, rounded to its dtype
        if (j >= half) {
          y[r * N + col] = fromf<TY>(x1);
          continue;
        }
        const float x2 = rnd<TY>(acc[1][r] + (bias != nullptr ? ld_nc(bias + col + half) : 0.0f));
        float c, s;
        rope_cos_sin(static_cast<long long>(pos[r / T]) + r % T, j, rotary_dim, theta, &c, &s);
        c = rnd<TY>(c);  // cos and sin in the projection's dtype, as the reference makes them
        s = rnd<TY>(s);
        // out = rot * cos + rotate_half(rot) * sin, each product and the sum rounded as torch does
        y[r * N + col] = fromf<TY>(rnd<TY>(x1 * c) + rnd<TY>(-x2 * s));
        y[r * N + col + half] = fromf<TY>(rnd<TY>(x2 * c) + rnd<TY>(x1 * s));
      }
    }
  }
}

// Whether A and B are one type.
template <class A, class B> struct same_type { static constexpr bool value = false; };
template <class A> struct same_type<A, A> { static constexpr bool value = true; };

// A value (TV) as the cache (TC) holds it, before the rounding to TC (fromf or Vec8::set): times value_scale,
// rounded to TV as the reference rounds it, except where TV is TC (that rounding is then the same, done once). A key
// needs only the rounding to TC.
template <class TC, class TV> __device__ __forceinline__ float value_for_cache(float x, float value_scale) {
  return same_type<TC, TV>::value ? x * value_scale : rnd<TV>(x * value_scale);
}

// The step's new keys and values of batch row b and kv head h stored at slot position % C of the cache, by the whole
// block: attention's last step for (b, h).
template <int D, int DV, class TK, class TV, class TC>
__device__ __forceinline__ void append_rows(const TK* k, const TV* v, TC* kc, TC* vc, long long p0, int b, int h,
                                            int T, int HKV, int C, float value_scale) {
  const int t0 = T > C ? T - C : 0;  // only the last C rows of a step survive in a ring of C slots
  const int n = (T - t0) * (D + DV), s = static_cast<int>(p0 % C);
  const long long head = static_cast<long long>(b) * HKV + h;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int t = t0 + i / (D + DV), e = i % (D + DV), slot = (s + t) % C;
    const long long row = static_cast<long long>(b) * T + t;
    if (e < D)
      kc[(head * C + slot) * D + e] = fromf<TC>(ld_cg(k + (row * HKV + h) * D + e));
    else
      vc[(head * C + slot) * DV + e - D] =
          fromf<TC>(value_for_cache<TC, TV>(ld_cg(v + (row * HKV + h) * DV + e - D), value_scale));
  }
}

// The first key position a step starting at p0 can see, and how many chunks of CH keys (at multiples of CH) hold
// its keys.
__device__ __forceinline__ long long first_key(long long p0, int window) {
  return window ? (p0 - window + 1 > 0 ? p0 - window + 1 : 0) : 0;
}
__device__ __forceinline__ int chunk_count(long long p0, int T, int window, int CH) {
  const long long base = first_key(p0, window) / CH * CH;
  return static_cast<int>((p0 + T - base + CH - 1) / CH);
}

// 16 bytes from global to shared memory without passing through registers (cp.async, L2 only): `bytes` of them read
// (0: the 16 bytes are zeros). `cp_async_wait` waits for this thread's copies; a __syncthreads then shows them all.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  unsigned long long at;
  asm("cvta.to.shared.u64 %0, %1;" : "=l"(at) : "l"(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"l"(at), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// A row of `width` elements of T in shared memory: its stride, padded so that a row is an odd number of 16-byte
// units (lanes reading 16 bytes each of rows 8 apart then hit distinct banks).
template <class T> __device__ __forceinline__ int padded_row(int width) {
  const int units = width * static_cast<int>(sizeof(T)) / 16;
  return (units | 1) * 16 / static_cast<int>(sizeof(T));
}

// An attention sink of head `head`: `kind` 0 fp32, 1 bf16, 2 fp16.
__device__ __forceinline__ float sink_of(const void* sinks, int kind, int head) {
  if (kind == 1) return ld_nc(static_cast<const bf16*>(sinks) + head);
  if (kind == 2) return ld_nc(static_cast<const f16*>(sinks) + head);
  return ld_nc(static_cast<const float*>(sinks) + head);
}

// tilec.attention (with its kv_append), as one phase: an item is (batch b, kv head h, chunk c of CH keys), dealt
// to blocks densely over the step's live chunks, so that a step's few items run on as many blocks.
// - The chunk's cached keys and values are copied into shared memory as they are (cp.async: the whole chunk in
//   flight at once, from a short loop), zeros for keys outside [lo, end); the step's own rows (keys from p0 on) come
//   from k and v (rounded as when cached), loaded with each warp's first query row while the copies fly.
// - Each warp takes query rows (row = t * G + g), a lane a key for the scores, a lane 32nd of the value dims for the
//   sums; the partial softmax state (max, sum, weighted values) goes to `scratch`.
// - The block that finishes (b, h)'s last chunk (a count a (b, h) in `count`, which it sets back to 0 for the next
//   launch) merges the chunks for every query row in order, the sink in the denominator, stores the output, and
//   then stores (b, h)'s new rows in the cache: every chunk of (b, h) has been read by then, so a ring may be
//   overwritten whatever its slack. No phase and no grid barrier for the merge or the stores. The chunks' states
//   come to shared memory by cp.async in groups of as many chunks as MK_SMEM_FLOATS holds (all of them, at the
//   contexts a step's few items serve), so the merge waits for one round trip a group, not one a chunk.
// Every row's sums depend only on the keys it sees and their chunks' fixed positions, not on the step's other rows.
// Code size: a phase this short runs from a cold instruction cache, where each KB of code executed costs about
// 0.1 to 0.4 us (benchmarks/icache_probe.py, results/h100-2026-11-25d); so the loops are short and rolled, divisions
// are by constants, and no path converts what needs no conversion.
// Registers: the kernel is allocated as a whole at its ceiling, so this function's needs move the others' code
// (benchmarks/results/h100-2026-11-25c). One instantiation serves layers with and without sinks (`flags`: bit 0
// causal, bits 1 and 2 the sinks' type, sink_of): with two copies, ptxas spilled around the kernel's calls. The head
// dims are template parameters (a model's layers share them), so a lane's value sums are DV / 32 floats, not 8.
// Diagnostics (the timeline build only, MK_ATTENTION_STAMPS): `stamps` [gridDim.x][8], a block's first item's
// %globaltimer at its start, its chunk staged, its partial state stored, its arrival counted, and (the last block of
// its head only, after a __syncthreads) the merge stored and the new rows stored; [6] = 1 where it was the last.
// Zero where the block had no item. The production build compiles none of it.
#ifdef MK_ATTENTION_STAMPS
#define MK_ATTENTION_STAMP(at) \
  if (threadIdx.x == 0 && item == static_cast<int>(blockIdx.x)) stamps[blockIdx.x * 8 + (at)] = globaltimer()
#define MK_ATTENTION_SYNC_STAMP(at) \
  __syncthreads();                   \
  MK_ATTENTION_STAMP(at)
#define MK_ATTENTION_STAMPS_ARG , unsigned long long* stamps
#else
#define MK_ATTENTION_STAMP(at)
#define MK_ATTENTION_SYNC_STAMP(at)
#define MK_ATTENTION_STAMPS_ARG
#endif
template <int CH, int D, int DV, class TQ, class TK, class TV, class TC, class TP, class TO>
MK_TASK void attention(const TQ* q, const TK* k, const TV* v, TC* kc, TC* vc, const TP* pos, float* scratch,
                       const void* sinks, TO* out, u32* count, int B, int T, int HQ, int HKV, int C,
                       int window, int flags, float scale, float value_scale, int nch_max,
                       float* smem MK_ATTENTION_STAMPS_ARG) {
  constexpr int NV = (DV + 31) / 32;   // value dims a lane (DV <= 256)
  constexpr int KU = D / 8, VU = DV / 8;  // 8-element units of a key row and of a value row
  __shared__ int last;
  const bool causal = flags & 1;
  const int G = HQ / HKV, Q = G * T;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  // scratch: weighted values (first, so that the merge's copies are 16-byte aligned), then max, then sum, by
  // ((b * HKV + h) * nch_max + chunk) * Q + row
  const long long n_state = static_cast<long long>(B) * HKV * nch_max * Q;
  float* sacc = scratch;
  float* sm = scratch + n_state * DV;
  float* sl = sm + n_state;
  const int ks = padded_row<TC>(D), vs = padded_row<TC>(DV);
  TC* k_s = reinterpret_cast<TC*>(smem);
  TC* v_s = k_s + CH * ks;
  float* q_s = reinterpret_cast<float*>(v_s + CH * vs);  // a row of q per warp (rows are whole 16-byte units)
  int items = 0;
  for (int b = 0; b < B; ++b) items += HKV * chunk_count(static_cast<long long>(pos[b]), T, window, CH);
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    int b = 0, c = item, nch = chunk_count(static_cast<long long>(pos[0]), T, window, CH);
    while (c >= HKV * nch) {
      c -= HKV * nch;
      nch = chunk_count(static_cast<long long>(pos[++b]), T, window, CH);
    }
    const int h = c / nch;
    c %= nch;
    const long long p0 = static_cast<long long>(pos[b]);
    const long long lo = first_key(p0, window), end = p0 + T;
    const long long base = (lo / CH + c) * CH;
    const long long head = static_cast<long long>(b) * HKV + h;
    const int s0 = static_cast<int>(base % C);
    MK_ATTENTION_STAMP(0);
    __syncthreads();  // the previous item's reads of k_s / v_s / q_s are done
    {
      // the cached keys and values, zeros outside [lo, end), 8 elements a copy (the step's own rows come below)
      for (int i = threadIdx.x; i < CH * (KU + VU); i += blockDim.x) {
        const bool key = i < CH * KU;
        const int at = key ? i : i - CH * KU, j = key ? at / KU : at / VU, d = (key ? at % KU : at % VU) * 8;
        const long long kp = base + j;
        if (kp >= p0 && kp < end) continue;
        const bool cached = kp >= lo && kp < p0;
        const int slot = (s0 + j) % C;
        const TC* src = key ? kc + (head * C + slot) * D + d : vc + (head * C + slot) * DV + d;
        TC* dst = key ? k_s + j * ks + d : v_s + j * vs + d;
        for (int part = 0; part < static_cast<int>(sizeof(TC)) / 2; ++part)  // 16 bytes each (2 for fp32)
          cp_async16(dst + part * 16 / sizeof(TC), cached ? src + part * 16 / sizeof(TC) : kc, cached ? 16 : 0);
      }
      // this warp's first query row, and the step's own keys and values in this chunk, loaded meanwhile
      const int row = warp, t = row / G;
      const bool has_q = row < Q && D <= 256 && lane * 8 < D;  // the row whole in one 8-element load a lane
      float qf[8];
      if (has_q) {
        Vec8<TQ> u;
        u.cg(q + (static_cast<long long>(b * T + t) * HQ + h * G + row % G) * D + lane * 8);
        u.get(qf);
      }
      const long long f0 = p0 > base ? p0 : base, f1 = end < base + CH ? end : base + CH;  // fresh keys here
      const int n_f = f1 > f0 ? static_cast<int>(f1 - f0) * (KU + VU) : 0;
      for (int i = threadIdx.x; i < n_f; i += blockDim.x) {
        const int j = i / (KU + VU), e = i % (KU + VU) * 8;
        const long long kp = f0 + j, row_kv = static_cast<long long>(b) * T + (kp - p0);
        float f[8];
        Vec8<TC> w;
        if (e < D) {
          Vec8<TK> u;
          u.cg(k + (row_kv * HKV + h) * D + e);
          if constexpr (same_type<TC, TK>::value) {
            w = u;  // the same bits
          } else {
            u.get(f);
            w.set(f);
          }
          w.put(k_s + (kp - base) * ks + e);
        } else {
          Vec8<TV> u;
          u.cg(v + (row_kv * HKV + h) * DV + e - D);
          u.get(f);
#pragma unroll
          for (int x = 0; x < 8; ++x) f[x] = value_for_cache<TC, TV>(f[x], value_scale);
          w.set(f);
          w.put(v_s + (kp - base) * vs + e - D);
        }
      }
      if (has_q) {
#pragma unroll
        for (int x = 0; x < 8; ++x) q_s[warp * D + lane * 8 + x] = qf[x];
      }
      cp_async_wait();
    }
    __syncthreads();
    MK_ATTENTION_STAMP(1);
    for (int row = warp; row < Q; row += warps) {
      const int t = row / G, g = row % G, qh = h * G + g;
      const long long qp = p0 + t;
      if (row != warp || D > 256) {  // else the row came with the keys
        __syncwarp();
        const TQ* qrow = q + (static_cast<long long>(b * T + t) * HQ + qh) * D;
        for (int d = lane * 8; d < D; d += 256) {
          float f[8];
          Vec8<TQ> u;
          u.cg(qrow + d);
          u.get(f);
#pragma unroll
          for (int x = 0; x < 8; ++x) q_s[warp * D + d + x] = f[x];
        }
        __syncwarp();
      }
      float s = -MK_INF;
      if (lane < CH) {
        const long long kp = base + lane;
        bool seen = kp >= lo && kp < end;
        if (causal) {
          seen = seen && kp <= qp;
          if (window) seen = seen && kp > qp - window;
        } else if (window) {
          seen = seen && kp > p0 - window;
        }
        if (seen) {  // four partial sums (D % 8 == 0), element d in dot[d % 4]: four chains
          float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
          const TC* kr = k_s + lane * ks;
          const float* qr = q_s + warp * D;
#pragma unroll 2
          for (int d = 0; d < D; d += 8) {
            float kf[8];
            Vec8<TC> u;
            u.sh(kr + d);
            u.get(kf);
#pragma unroll
            for (int x = 0; x < 8; ++x) dot[x & 3] = fmaf(qr[d + x], kf[x], dot[x & 3]);
          }
          s = ((dot[0] + dot[1]) + (dot[2] + dot[3])) * scale;
        }
      }
      const float m = warp_max(s);
      const float p = m == -MK_INF ? 0.0f : __expf(s - m);
      const float l = warp_sum(p);
      float acc[NV];
#pragma unroll
      for (int i = 0; i < NV; ++i) acc[i] = 0.0f;
#pragma unroll 4
      for (int j = 0; j < CH; ++j) {
        const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
        for (int i = 0; i < NV; ++i)
          if (lane + 32 * i < DV) acc[i] = fmaf(pj, tof(v_s[j * vs + lane + 32 * i]), acc[i]);
      }
      const long long at = (head * nch_max + c) * Q + row;
      if (lane == 0) {
        sm[at] = m;
        sl[at] = l;
      }
#pragma unroll
      for (int i = 0; i < NV; ++i)
        if (lane + 32 * i < DV) sacc[at * DV + lane + 32 * i] = acc[i];
    }
    // the arrival: the block's partial state is stored (the release covers the block's stores, ordered by the
    // __syncthreads), and the last block of (b, h) to arrive merges (its acquire covers the others')
    __syncthreads();
    MK_ATTENTION_STAMP(2);
    if (threadIdx.x == 0) {
      u32 before;
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(before) : "l"(count + head) : "memory");
      last = before == static_cast<u32>(nch - 1);
      if (last) count[head] = 0;  // every chunk of (b, h) has arrived: nothing else reads it in this launch
    }
    __syncthreads();
    MK_ATTENTION_STAMP(3);
#ifdef MK_ATTENTION_STAMPS
    if (threadIdx.x == 0 && item == static_cast<int>(blockIdx.x)) stamps[blockIdx.x * 8 + 6] = last;
#endif
    if (!last) continue;
    // The merge, a block of `nr` query rows and a group of `fit` chunks at a time (shared memory, the keys' place:
    // every warp is done with them): grp_s [fit][nr][DV] weighted values and m_s, l_s [fit][nr]; row_s [nr] each
    // row's max over all chunks and the sink, sink_s [nr] its sink (-inf: none); run_s [nr][1 + DV] its sum and
    // weighted values over the groups so far. All rows are one block where a chunk of them fits (up to 8 rows of 16
    // query heads a kv head); the planner's shared memory holds at least one row's chunk
    // (tilec.codegen.megakernel.attention_merge_floats).
    const long long first = head * nch_max * Q;  // (b, h)'s chunk 0, row 0
    int rows_most = min(Q, MK_SMEM_FLOATS / (2 * DV + 5));
    if (MK_MERGE_ROWS) rows_most = min(rows_most, MK_MERGE_ROWS);
    for (int r0 = 0; r0 < Q; r0 += rows_most) {
      const int nr = min(rows_most, Q - r0);
      int fit = min(nch, (MK_SMEM_FLOATS - nr * (DV + 3)) / (nr * (DV + 2)));
      if (MK_MERGE_CHUNKS) fit = min(fit, MK_MERGE_CHUNKS);
      float* grp_s = smem;
      float* m_s = grp_s + fit * nr * DV;
      float* l_s = m_s + fit * nr;
      float* row_s = l_s + fit * nr;
      float* sink_s = row_s + nr;
      float* run_s = sink_s + nr;
      for (int c0 = 0; c0 < nch; c0 += fit) {
        const int n = min(fit, nch - c0);
        if (c0 || r0) __syncthreads();  // the previous group's reads are done
        // the group's states: a run of rows r0.. a chunk, one run in all where the block has every row
        const int runs = nr == Q ? 1 : n, run = nr == Q ? n * Q : nr;
        for (int cc = 0; cc < runs; ++cc) {
          const long long at = first + static_cast<long long>(c0 + cc) * Q + r0;
          for (int i = threadIdx.x; i < run * DV / 4; i += blockDim.x)
            cp_async16(grp_s + (cc * nr * DV + 4 * i), sacc + at * DV + 4 * i, 16);
          for (int i = threadIdx.x; i < run; i += blockDim.x) {
            m_s[cc * nr + i] = __ldcg(sm + at + i);
            l_s[cc * nr + i] = __ldcg(sl + at + i);
          }
        }
        if (c0 == 0) {  // each row's max (lanes over the chunks, then the warp), while the copies fly
          for (int r = warp; r < nr; r += warps) {
            float m_all = -MK_INF;
#pragma unroll 1
            for (int cc = lane; cc < nch; cc += 32) m_all = fmaxf(m_all, __ldcg(sm + first + cc * Q + r0 + r));
            const float sink = sinks != nullptr ? sink_of(sinks, flags >> 1, h * G + (r0 + r) % G) : -MK_INF;
            m_all = fmaxf(warp_max(m_all), sink);
            if (lane == 0) {
              row_s[r] = m_all;
              sink_s[r] = sink;
            }
          }
        }
        cp_async_wait();
        __syncthreads();
        for (int r = warp; r < nr; r += warps) {
          const int row = r0 + r;
          const float m_all = row_s[r], m_safe = m_all == -MK_INF ? 0.0f : m_all;
          float* run = run_s + r * (1 + DV);
          float l = c0 ? run[0] : 0.0f, acc[NV];
#pragma unroll
          for (int i = 0; i < NV; ++i) acc[i] = c0 && lane + 32 * i < DV ? run[1 + lane + 32 * i] : 0.0f;
#pragma unroll 2
          for (int cc = 0; cc < n; ++cc) {  // the chunks in order: one chain of sums
            const float wgt = __expf(m_s[cc * nr + r] - m_safe);
            l = fmaf(wgt, l_s[cc * nr + r], l);
#pragma unroll
            for (int i = 0; i < NV; ++i)
              if (lane + 32 * i < DV) acc[i] = fmaf(wgt, grp_s[(cc * nr + r) * DV + lane + 32 * i], acc[i]);
          }
          if (c0 + n < nch) {  // more groups to come: keep the row's sums (each lane its own)
            if (lane == 0) run[0] = l;
#pragma unroll
            for (int i = 0; i < NV; ++i)
              if (lane + 32 * i < DV) run[1 + lane + 32 * i] = acc[i];
            continue;
          }
          if (sinks != nullptr) l += __expf(sink_s[r] - m_safe);
          const float inv = l == 0.0f ? 1.0f : 1.0f / l;
          TO* o = out + (static_cast<long long>(b * T + row / G) * HQ + h * G + row % G) * DV;
#pragma unroll
          for (int i = 0; i < NV; ++i)
            if (lane + 32 * i < DV) o[lane + 32 * i] = fromf<TO>(acc[i] * inv);
        }
      }
    }
    MK_ATTENTION_SYNC_STAMP(4);
    append_rows<D, DV>(k, v, kc, vc, p0, b, h, T, HKV, C, value_scale);
    MK_ATTENTION_SYNC_STAMP(5);
  }
}

// tilec.moe_router, first half: scores[r, e] = sigmoid(x[r] . w[e]) in fp32, a warp an expert.
template <int MAXR, class TW, class Src>
MK_TASK void router_scores(const TW* __restrict__ w, Src src, float* scores, int H, int E, int R, int gwarp,
                           int nwarps, float* smem) {
  typename Src::T* xs = staging<typename Src::T>(smem);
  const bool staged = src.stage(R, H, smem, true);
  gemv_rows<MAXR>(w, staged ? xs : src.global(), staged, H, E, R, gwarp, nwarps, [&](int e, const float* acc) {
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int r = 0; r < MAXR; ++r) {
        if (r >= R) break;  // one branch past the other rows' code (each row's test would be a cold line)
        scores[r * E + e] = 1.0f / (1.0f + expf(-acc[r]));
      }
    }
  });
}

// tilec.moe_router's choice for one row by one warp: the choice values (score + correction bias, groups kept by
// their top-2 sums) pick K experts, best first (the lower id on ties); their weights are the plain scores,
// renormalised when `norm`, times `scaling`. Lane j < K gets the j-th expert and weight. `choice`: E floats of
// shared memory for this warp.
template <class TB>
__device__ __forceinline__ void topk_row(const float* scores, const TB* __restrict__ bias, int E, int K, int n_group,
                                         int topk_group, bool norm, float scaling, float* choice, float* weight,
                                         int* expert) {
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < E; e += 32) choice[e] = __ldcg(scores + e) + (bias != nullptr ? ld_nc(bias + e) : 0.0f);
  __syncwarp();
  if (n_group > 1) {  // keep the topk_group groups with the largest sums of their top two
    const int per = E / n_group;
    float gsum = -MK_INF;
    if (lane < n_group) {
      float a = -MK_INF, b2 = -MK_INF;
      for (int e = lane * per; e < (lane + 1) * per; ++e) {
        const float v = choice[e];
        if (v > a) { b2 = a; a = v; } else if (v > b2) { b2 = v; }
      }
      gsum = a + b2;
    }
    unsigned keep = 0;
    for (int k = 0; k < topk_group; ++k) {
      float best = gsum;
      int who = lane < n_group && !((keep >> lane) & 1u) ? lane : 1 << 30;
      if (who == 1 << 30) best = -MK_INF;
      for (int o = 16; o; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int ow = __shfl_xor_sync(0xffffffffu, who, o);
        if (ob > best || (ob == best && ow < who)) { best = ob; who = ow; }
      }
      if (who < n_group) keep |= 1u << who;
    }
    __syncwarp();
    for (int e = lane; e < E; e += 32)
      if (!((keep >> (e / per)) & 1u)) choice[e] = -MK_INF;
    __syncwarp();
  }
  int chosen_e = 0;
  for (int k = 0; k < K; ++k) {
    float best = -MK_INF;
    int who = 1 << 30;
    for (int e = lane; e < E; e += 32) {
      const float v = choice[e];
      if (v > best || (v == best && e < who)) { best = v; who = e; }
    }
    for (int o = 16; o; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int ow = __shfl_xor_sync(0xffffffffu, who, o);
      if (ob > best || (ob == best && ow < who)) { best = ob; who = ow; }
    }
    if (who >= E) who = 0;  // every choice -inf (NaN scores): expert 0, as a defined fallback
    if (lane == k) chosen_e = who;
    __syncwarp();
    if (lane == 0) choice[who] = -MK_INF;
    __syncwarp();
  }
  // The chosen scores in one round trip (lane k's), then their sum in choice order, as the rounds above would add them.
  const float chosen_w = lane < K ? __ldcg(scores + chosen_e) : 0.0f;
  float total = 0.0f;
  for (int k = 0; k < K; ++k) total += __shfl_sync(0xffffffffu, chosen_w, k);
  *weight = (norm ? chosen_w / (total + 1e-20f) : chosen_w) * scaling;
  *expert = chosen_e;
}

// tilec.moe_router, second half, as a phase of its own: a warp a row.
template <class TB, class TI>
MK_TASK void router_topk(const float* scores, const TB* __restrict__ bias, float* weights, TI* ids, int E, int K,
                         int n_group, int topk_group, bool norm, float scaling, int R, int gwarp, int nwarps,
                         float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = gwarp; r < R; r += nwarps) {
    float w;
    int e;
    topk_row(scores + r * E, bias, E, K, n_group, topk_group, norm, scaling, smem + warp * E, &w, &e);
    if (lane < K) {
      weights[r * K + lane] = w;
      ids[r * K + lane] = static_cast<TI>(e);
    }
    __syncwarp();
  }
}

// Which experts the experts' first half reads for row r, slot j. Chosen: the router's ids, from an earlier phase.
// Routed: the router's choice folded into the experts' phase: every block chooses every row's experts into its
// shared memory (`area`: K * R ints, then a warp's E floats of choice values each), and block 0 stores the weights
// and ids for experts_down (and the graph).
template <class TI>
struct Chosen {
  const TI* ids;
  __device__ __forceinline__ void prepare(int, int, float*) const {}
  __device__ __forceinline__ int id(int r, int j, int K, const float*) const { return ld_id(ids + r * K + j); }
};
template <class TB, class TI>
struct Routed {
  const float* scores;
  const TB* bias;
  float* weights;
  TI* ids;
  int E, n_group, topk_group;
  bool norm;
  float scaling;
  __device__ __forceinline__ void prepare(int R, int K, float* area) const {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    int* chosen = reinterpret_cast<int*>(area);
    __syncthreads();  // the block's reads of the previous phase's area are done
    for (int r = warp; r < R; r += warps) {
      float w;
      int e;
      topk_row(scores + r * E, bias, E, K, n_group, topk_group, norm, scaling, area + R * K + warp * E, &w, &e);
      if (lane < K) {
        chosen[r * K + lane] = e;
        if (blockIdx.x == 0) {
          weights[r * K + lane] = w;
          ids[r * K + lane] = static_cast<TI>(e);
        }
      }
      __syncwarp();
    }
    __syncthreads();
  }
  __device__ __forceinline__ int id(int r, int j, int K, const float* area) const {
    return reinterpret_cast<const int*>(area)[r * K + j];
  }
};

// ---------------------------------------------------------------------------------------------------- MXFP4
// E2M1 code c as the float c's value times 2^-126 (its bits placed as a subnormal-range float: exact for every code),
// and an E8M0 scale code as its power of two (255: NaN; 0: 2^-127).
__device__ __forceinline__ float e2m1_tiny(u32 c) { return __uint_as_float(((c & 8u) << 28) | ((c & 7u) << 22)); }
__device__ __forceinline__ float e8m0(u32 code) {
  return code == 255u ? __uint_as_float(0x7fc00000u) : code == 0u ? __uint_as_float(0x00400000u)
                                                                 : __uint_as_float(code << 23);
}
#define MK_2P126 __uint_as_float(253u << 23)

// Rows of an expert's weights, read a chunk at a time: `load` fetches a chunk (its loads in flight until `dot`),
// `dot` sums it against x. bf16 / fp32 weights: chunks of 8 elements (16 or 32 bytes).
template <class TW, class TX>
struct ExpertRows {
  const TW* w;  // [rows, K]
  static constexpr int CHUNK = 8;
  struct Frag { Vec8<TW> v; };
  __device__ __forceinline__ Frag load(long long row, int K, int c) const {
    Frag f;
    f.v.stream(w + row * K + c * CHUNK);
    return f;
  }
  template <bool SH> __device__ __forceinline__ float dot(const Frag& f, const TX* x, int c) const {
    float wf[8], xf[8];
    f.v.get(wf);
    Vec8<TX> xv;
    xv.template act<SH>(x + c * CHUNK);
    xv.get(xf);
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) s = fmaf(wf[j], xf[j], s);
    return s;
  }
};
// MXFP4 weights: chunks of one block, 32 elements (16 bytes of codes, element 0 in the low nibble) and its scale.
template <class TX>
struct Mxfp4Rows {
  const unsigned char* blocks;  // [rows, K / 2]
  const unsigned char* scales;  // [rows, K / 32]
  static constexpr int CHUNK = 32;
  struct Frag { uint4 u; u32 s; };
  __device__ __forceinline__ Frag load(long long row, int K, int c) const {
    Frag f;
    f.u = ld_stream16(reinterpret_cast<const uint4*>(blocks + row * (K / 2)) + c);
    f.s = ld_stream1(scales + row * (K / 32) + c);
    return f;
  }
  template <bool SH> __device__ __forceinline__ float dot(const Frag& f, const TX* x, int c) const {
    const float sc = e8m0(f.s);
    const u32 words[4] = {f.u.x, f.u.y, f.u.z, f.u.w};
    float s = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      Vec8<TX> xv;
      xv.template act<SH>(x + c * CHUNK + q * 8);
      float xf[8];
      xv.get(xf);
#pragma unroll
      for (int j = 0; j < 8; ++j) s = fmaf((e2m1_tiny(words[q] >> (4 * j)) * MK_2P126) * sc, xf[j], s);
    }
    return s;
  }
};

// sums[j] = rows[row_of[j]] . x[j] over K for NR rows, summed over the warp (every lane holds every sum): a lane a
// chunk of each row in turn, DEPTH x NR chunks' loads in flight; x from shared memory (SH) or L2.
template <int NR, int DEPTH, bool SH, class Rows, class TX>
__device__ __forceinline__ void dot_rows(const Rows& rows, const long long* row_of, const TX* const* x, int K,
                                         float* sums) {
  const int lane = threadIdx.x & 31, per = K / Rows::CHUNK;
  float part[NR];
#pragma unroll
  for (int j = 0; j < NR; ++j) part[j] = 0.0f;
  for (int c00 = 0; c00 < per; c00 += 32 * DEPTH) {  // as many turns in every lane: the __syncwarp below
    const int c0 = c00 + lane;
    typename Rows::Frag f[DEPTH][NR];
#pragma unroll
    for (int u = 0; u < DEPTH; ++u)
#pragma unroll
      for (int j = 0; j < NR; ++j)
        if (c0 + 32 * u < per) f[u][j] = rows.load(row_of[j], K, c0 + 32 * u);
    __syncwarp();  // the loads stay one batch (see dot_impl)
#pragma unroll
    for (int u = 0; u < DEPTH; ++u)
#pragma unroll
      for (int j = 0; j < NR; ++j)
        if (c0 + 32 * u < per) part[j] += rows.template dot<SH>(f[u][j], x[j], c0 + 32 * u);
  }
#pragma unroll
  for (int j = 0; j < NR; ++j) sums[j] = warp_sum(part[j]);
}

// Experts, first half: act[r, j, i] = rnd(rnd(silu(g)) * u), g and u = x[r] . gate_up[e][i] and [I + i], rounded to
// TA (the reference's bf16 or fp32 expert outputs), for the expert e = ids[r, j]; a warp an (r, j, i).
template <class Rows, class Src, class Route, class TA>
MK_TASK void experts_gate_up(Rows gate_up, Src src, Route route, TA* act, int H, int I, int K,
                             int R, int gwarp, int nwarps, float* smem) {
  using TX = typename Src::T;
  TX* xs = staging<TX>(smem);
  const bool staged = src.stage(R, H, smem, true);
  const TX* x = staged ? xs : src.global();
  float* area = smem + MK_AREA_FLOATS;
  route.prepare(R, K, area);
  for (int it = gwarp; it < R * K * I; it += nwarps) {
    const int r = it / (K * I), j = (it / I) % K, i = it % I;
    const long long e = route.id(r, j, K, area);
    const long long row_of[2] = {e * 2 * I + i, e * 2 * I + I + i};
    const TX* xr[2] = {x + r * H, x + r * H};
    float gu[2];
    if (staged)
      dot_rows<2, 4, true>(gate_up, row_of, xr, H, gu);
    else
      dot_rows<2, 4, false>(gate_up, row_of, xr, H, gu);
    if ((threadIdx.x & 31) == 0) {
      const float gr = rnd<TA>(gu[0]), ur = rnd<TA>(gu[1]);
      act[(r * K + j) * I + i] = fromf<TA>(rnd<TA>(silu(gr)) * ur);
    }
  }
}

// The activations of experts_gate_up_mma's fragments: staged in shared memory, or written earlier in this launch
// (from L2: the non-coherent path could return an older copy).
struct XShared {
  static __device__ __forceinline__ uint4 load(const uint4* p) { return *p; }
};
struct XL2 {
  static __device__ __forceinline__ uint4 load(const uint4* p) { return __ldcg(p); }
};

// A warp's sums over the 16-row tile `tile` of the re-laid `words` / `scales` (N chunks of fragments, PipeRegs with
// DEPTH in flight a lane) against the activations `xrow` as the mma's token column 0 (staged in shared memory, or
// from L2): c[4] as the mma's accumulator (rows g and g + 8 in lanes (g, 0): c[0] and c[2]).
template <int N, int DEPTH, class TX>
__device__ __forceinline__ void tile_sums(bool staged, const uint4* words, const unsigned short* scales, long long tile,
                                          const TX* xrow, float* c) {
  const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const uint4* w = words + tile * N * 32 + lane;
  const unsigned short* sc = scales + tile * N * 16 + g * 2 + (q >> 1);
  const uint4* x = g == 0 ? reinterpret_cast<const uint4*>(xrow) + q * 2 : nullptr;
  if (staged) {
    PipeRegs<N, DEPTH, XShared> pipe;
    pipe.issue(w, sc);
    pipe.run(c, w, sc, x);
  } else {
    PipeRegs<N, DEPTH, XL2> pipe;
    pipe.issue(w, sc);
    pipe.run(c, w, sc, x);
  }
}

// Experts, first half, MXFP4 on the tensor cores: act as experts_gate_up's, from the weights re-laid as mma fragments
// (tilec/codegen/mma_layout.py: gate/up tile T's rows 0..7 are gate rows 8T.., rows 8..15 up rows 8T..). A warp an
// (r, j, T): the 16 rows' sums over H (HC chunks of 64, DEPTH in flight a lane) with row r's activations as the mma's
// token column 0 (the lanes of g = 0; the other columns zero), so act[r, j, 8T + g] comes from lane (g, 0)'s gate and
// up sums. The sums are the mma's fp32 ones over bf16 weights, so they round differently from the CUDA-core path.
template <int HC, int DEPTH, class Src, class Route, class TA>
MK_TASK void experts_gate_up_mma(const uint4* words, const unsigned short* scales, Src src, Route route, TA* act,
                                 int I, int K, int R, int gwarp, int nwarps, float* smem) {
  using TX = typename Src::T;
  constexpr int H = HC * 64;
  TX* xs = staging<TX>(smem);
  const bool staged = src.stage(R, H, smem, true);
  const TX* x = staged ? xs : src.global();
  float* area = smem + MK_AREA_FLOATS;
  route.prepare(R, K, area);
  const int g = (threadIdx.x & 31) >> 2, q = threadIdx.x & 3, tiles = I / 8;  // the lane's place in the fragments
  for (int it = gwarp; it < R * K * tiles; it += nwarps) {
    const int r = it / (K * tiles), j = (it / tiles) % K, T = it % tiles;
    const long long tile = static_cast<long long>(route.id(r, j, K, area)) * tiles + T;
    float c[4];
    tile_sums<HC, DEPTH>(staged, words, scales, tile, x + r * H, c);
    if (q == 0) {  // token column 0: tile rows g (gate) and g + 8 (up)
      const float gr = rnd<TA>(c[0]), ur = rnd<TA>(c[2]);
      act[(r * K + j) * I + 8 * T + g] = fromf<TA>(rnd<TA>(silu(gr)) * ur);
    }
  }
}

// Experts, second half, MXFP4 on the tensor cores: out as experts_down's, from the down weights re-laid as mma
// fragments (16-row tiles of H, I in chunks of 64: IC of them, DEPTH in flight a lane). A block an (r, T): its warps
// take the slots j, each the 16 rows' sums of expert ids[r, j] over act[r, j] (the mma's token column 0) into shared
// memory (`area`, K x 16 floats); then out[r, 16T + n] = sum_j w[r, j] * rnd(y_j[n]) in router order, each product
// rounded to fp32, then summed, as experts_down does.
template <int IC, int DEPTH, class TA, class TI, class TO>
MK_TASK void experts_down_mma(const uint4* words, const unsigned short* scales, const TA* act, const float* weights,
                              const TI* ids, TO* out, int H, int K, int R, float* smem) {
  constexpr int I = IC * 64;
  TA* as = staging<TA>(smem);
  const bool staged = stage_x(act, R * K * I, as);
  const TA* a = staged ? as : act;
  float* y = smem + MK_AREA_FLOATS;  // [K][16]
  const int warp = threadIdx.x >> 5, warps = blockDim.x >> 5, g = (threadIdx.x & 31) >> 2, q = threadIdx.x & 3;
  const int tiles = H / 16;
  for (int it = blockIdx.x; it < R * tiles; it += gridDim.x) {  // the same turns in every thread of the block
    const int r = it / tiles, T = it % tiles;
    for (int j = warp; j < K; j += warps) {
      const long long tile = static_cast<long long>(ld_id(ids + r * K + j)) * tiles + T;
      float c[4];
      tile_sums<IC, DEPTH>(staged, words, scales, tile, a + (r * K + j) * I, c);
      if (q == 0) {  // token column 0: tile rows g and g + 8
        y[j * 16 + g] = c[0];
        y[j * 16 + g + 8] = c[2];
      }
    }
    __syncthreads();
    if (threadIdx.x < 16) {
      float sum = 0.0f;
      for (int j = 0; j < K; ++j)
        sum = __fadd_rn(sum, __fmul_rn(rnd<TA>(y[j * 16 + threadIdx.x]), __ldcg(weights + r * K + j)));
      out[r * H + 16 * T + threadIdx.x] = fromf<TO>(sum);
    }
    __syncthreads();  // y is the next item's
  }
}

// Experts, second half: out[r, h] = sum_j w[r, j] * rnd(down[e_j][h] . act[r, j]), in router order (each product
// rounded to fp32, then summed, as torch does); a warp an (r, h), the KS slots' rows in flight together.
template <int KS, class Rows, class TA, class TI, class TO>
MK_TASK void experts_down(Rows down, const TA* act, const float* weights, const TI* ids, TO* out,
                          int H, int I, int R, int gwarp, int nwarps, float* smem) {
  TA* as = staging<TA>(smem);
  const bool staged = stage_x(act, R * KS * I, as);
  if (staged) act = as;
  for (int it = gwarp; it < R * H; it += nwarps) {
    const int r = it / H, h = it % H;
    long long row_of[KS];
    const TA* xr[KS];
#pragma unroll
    for (int j = 0; j < KS; ++j) {
      row_of[j] = static_cast<long long>(ld_id(ids + r * KS + j)) * H + h;
      xr[j] = act + (r * KS + j) * I;
    }
    float y[KS];
    if (staged)
      dot_rows<KS, 1, true>(down, row_of, xr, I, y);
    else
      dot_rows<KS, 1, false>(down, row_of, xr, I, y);
    if ((threadIdx.x & 31) == 0) {
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < KS; ++j) sum = __fadd_rn(sum, __fmul_rn(rnd<TA>(y[j]), __ldcg(weights + r * KS + j)));
      out[r * H + h] = fromf<TO>(sum);
    }
  }
}

// Dense SwiGLU, first half: act[r, i] = rnd(rnd(silu(rnd(g))) * rnd(u)), a warp a column i (every row), its gate
// and up rows together.
template <int MAXR, class TW, class Src, class TA>
MK_TASK void swiglu_gate_up(const TW* __restrict__ wg, const TW* __restrict__ wu, Src src, TA* act, int H,
                            int I, int R, int gwarp, int nwarps, float* smem) {
  typename Src::T* xs = staging<typename Src::T>(smem);
  const bool staged = src.stage(R, H, smem, true);
  const typename Src::T* x = staged ? xs : src.global();
  float gu[2][MAXR];
  for (int i = gwarp; i < I; i += nwarps) {
    const TW* rows[2] = {wg + static_cast<long long>(i) * H, wu + static_cast<long long>(i) * H};
    dot<MAXR, 2>(rows, x, staged, H, R, gu);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int r = 0; r < MAXR; ++r) {
        if (r >= R) break;  // one branch past the other rows' code (each row's test would be a cold line)
        act[r * I + i] = fromf<TA>(rnd<TA>(rnd<TA>(silu(rnd<TA>(gu[0][r]))) * rnd<TA>(gu[1][r])));
      }
    }
  }
}

// Greedy head, first half: each warp's best (value, id) over its vocabulary rows, per row, the logits rounded to TL
// as the reference's are before its argmax; then each block's best into best_v / best_i [gridDim.x, R].
template <int MAXR, class TL, class TW, class Src>
MK_TASK void head_argmax_partial(const TW* __restrict__ w, Src src, float* best_v, int* best_i, int H, int V,
                                 int R, int gwarp, int nwarps, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  float bv[MAXR];
  int bi[MAXR];
#pragma unroll
  for (int r = 0; r < MAXR; ++r) { bv[r] = -MK_INF; bi[r] = 1 << 30; }
  typename Src::T* xs = staging<typename Src::T>(smem);
  const bool staged = src.stage(R, H, smem, true);
  gemv_rows<MAXR>(w, staged ? xs : src.global(), staged, H, V, R, gwarp, nwarps, [&](int n, const float* acc) {
#pragma unroll
    for (int r = 0; r < MAXR; ++r) {
      const float v = rnd<TL>(acc[r]);
      if (v > bv[r] || (v == bv[r] && n < bi[r])) { bv[r] = v; bi[r] = n; }
    }
  });
  float* sv = smem;
  int* si = reinterpret_cast<int*>(smem + warps * MAXR);
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < MAXR; ++r) { sv[warp * MAXR + r] = bv[r]; si[warp * MAXR + r] = bi[r]; }
  }
  __syncthreads();
  if (threadIdx.x < R) {
    const int r = threadIdx.x;
    float v = -MK_INF;
    int id = 1 << 30;
    for (int w2 = 0; w2 < warps; ++w2) {
      const float ov = sv[w2 * MAXR + r];
      const int oi = si[w2 * MAXR + r];
      if (ov > v || (ov == v && oi < id)) { v = ov; id = oi; }
    }
    best_v[blockIdx.x * R + r] = v;
    best_i[blockIdx.x * R + r] = id;
  }
  __syncthreads();
}

// Greedy head, second half: block 0, a thread a row, over the blocks' bests (the first maximum on ties).
template <class TO>
MK_TASK void head_argmax_final(const float* best_v, const int* best_i, TO* out, int R) {
  if (blockIdx.x != 0) return;
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    float v = -MK_INF;
    int id = 1 << 30;
    for (int blk = 0; blk < gridDim.x; ++blk) {
      const float ov = __ldcg(best_v + blk * R + r);
      const int oi = __ldcg(best_i + blk * R + r);
      if (ov > v || (ov == v && oi < id)) { v = ov; id = oi; }
    }
    out[r] = static_cast<TO>(id >= (1 << 30) ? 0 : id);
  }
}

}  // namespace mk
