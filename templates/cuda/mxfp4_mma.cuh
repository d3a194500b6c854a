// MXFP4 weights re-laid as mma fragments (tilec/codegen/mma_layout.py) on the tensor cores: the loads, the bit
// operations that make a lane's word four bf16 fragment registers, and a warp's sums over a 16-row tile. Included by
// templates/cuda/moe_experts_mxfp4.cu.j2 (the experts kernel) and the megakernel's tasks; the includer defines
// SCALE_FOLD (1: every scale code is at most 128, so one multiply a register) and the u32 / u16 types.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {  // read once: keep it out of L1
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 { %0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ u32 ld_scales(const u16* p) {
  u16 v;
  asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ld_x(const uint4* p) {  // activations: read by many blocks, cached
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 { %0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
// PipeRegs' activation loads: ld_x (an earlier kernel's output, through the non-coherent cache) by default.
struct XNc {
  static __device__ __forceinline__ uint4 load(const uint4* p) { return ld_x(p); }
};

__device__ __forceinline__ u32 mul_bf16x2(u32 a, u32 b) {
  u32 d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// The multiplier that turns magnitudes placed at bf16 bits 6..8 (value * 2^-126) into value * 2^(code - 127), as
// a bf16 pair. Folded (the planner checked every code is at most 128): 2^(code - 1), exact. Otherwise the kernel
// multiplies by 2^126 first and then by 2^(code - 127) (code 0: the subnormal 2^-127; 255: NaN).
__device__ __forceinline__ u32 scale_pair(u32 code) {
#if SCALE_FOLD
  return code * 0x00800080u + 0x3F003F00u;  // ((code + 126) << 7) in both halves
#else
  u32 bits = code == 0 ? 0x0040u : (code == 255 ? 0x7FC0u : code << 7);
  return bits | (bits << 16);
#endif
}

__device__ __forceinline__ void mma_bf16(float c[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 { %0,%1,%2,%3}, { %4,%5,%6,%7}, { %8,%9}, { %0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One word: the four fragment registers of one k16 step (mma_layout.py's MAG_SHIFT / SIGN_SHIFT), times the scales of
// rows g (sg) and g + 8 (sg8), then the mma against the activations b0, b1.
__device__ __forceinline__ void step(float c[4], u32 w, u32 sg, u32 sg8, u32 b0, u32 b1) {
  u32 r0 = w & 0x81C081C0u;
  u32 r1 = (w << 3) & 0x81C081C0u;
  u32 r2 = ((w << 6) & 0x01C001C0u) | ((w << 2) & 0x80008000u);
  u32 r3 = ((w >> 3) & 0x01C001C0u) | ((w << 1) & 0x80008000u);
#if !SCALE_FOLD
  r0 = mul_bf16x2(r0, 0x7E807E80u); r1 = mul_bf16x2(r1, 0x7E807E80u);
  r2 = mul_bf16x2(r2, 0x7E807E80u); r3 = mul_bf16x2(r3, 0x7E807E80u);
#endif
  mma_bf16(c, mul_bf16x2(r0, sg), mul_bf16x2(r1, sg8), mul_bf16x2(r2, sg), mul_bf16x2(r3, sg8), b0, b1);
}

// One chunk (four k16 steps) of a lane: its weights a, its 16-bit scale pair s, its activations x[0..1]. Steps
// alternate between two accumulators, so consecutive mmas do not wait on each other.
__device__ __forceinline__ void chunk(float c[2][4], uint4 a, u32 s, const uint4 x[2]) {
  u32 sg = scale_pair(s & 0xFFu), sg8 = scale_pair(s >> 8);
  step(c[0], a.x, sg, sg8, x[0].x, x[0].y);
  step(c[1], a.y, sg, sg8, x[0].z, x[0].w);
  step(c[0], a.z, sg, sg8, x[1].x, x[1].y);
  step(c[1], a.w, sg, sg8, x[1].z, x[1].w);
}

// A warp's sums over N_CHUNKS consecutive chunks of one 16-row tile: out[4] as the mma's accumulator (rows g, g + 8;
// tokens 2t, 2t + 1). w: the tile's first chunk for this lane (chunks 32 uint4 apart); s: its scale pair (chunks 16
// u16 apart); x: the lane's token row at the first chunk's 16 columns (chunks 8 uint4 apart), null when the lane's
// token is past the rows (loaded by XL::load). `issue` loads the first DEPTH chunks' weights into registers (the down
// kernel does it before waiting for gate_up's output), `run` the rest and the sums.
template <int N_CHUNKS, int DEPTH, class XL = XNc>
struct PipeRegs {
  uint4 a[DEPTH];
  u32 s[DEPTH];

  __device__ __forceinline__ void issue(const uint4* w, const u16* sc) {
#pragma unroll
    for (int i = 0; i < DEPTH; ++i) {
      a[i] = ld_stream(w + i * 32);
      s[i] = ld_scales(sc + i * 16);
    }
    __syncwarp();  // keeps the compiler from sinking these loads towards their use
  }

  __device__ __forceinline__ void run(float out[4], const uint4* w, const u16* sc, const uint4* x) {
    // Rounds of DEPTH chunks; the loop is not unrolled, so the compiler cannot sink a round's loads (the next
    // round's weights) into the round that uses them: DEPTH loads stay in flight. The activations (L2-resident)
    // come XR chunks ahead through a ring of registers that carries over from round to round.
    constexpr int XR = DEPTH % 2 == 0 ? 2 : 1;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    float c[2][4] = { {0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f} };
    uint4 xb[XR][2];
#pragma unroll
    for (int j = 0; j < XR; ++j) {
      xb[j][0] = x ? XL::load(x + j * 8) : zero;
      xb[j][1] = x ? XL::load(x + j * 8 + 1) : zero;
    }
#pragma unroll 1
    for (int i0 = 0; i0 < N_CHUNKS; i0 += DEPTH) {
#pragma unroll
      for (int j = 0; j < DEPTH; ++j) {
        chunk(c, a[j], s[j], xb[j % XR]);
        if (i0 + DEPTH < N_CHUNKS) {
          a[j] = ld_stream(w + (i0 + DEPTH + j) * 32);
          s[j] = ld_scales(sc + (i0 + DEPTH + j) * 16);
        }
        if (i0 + j + XR < N_CHUNKS) {
          xb[j % XR][0] = x ? XL::load(x + (i0 + j + XR) * 8) : zero;
          xb[j % XR][1] = x ? XL::load(x + (i0 + j + XR) * 8 + 1) : zero;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = c[0][i] + c[1][i];
  }
};
