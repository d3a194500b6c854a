// splitk_kernel: an experiment (benchmarks/splitk_experiment.py), appended to the rendered experts template, whose
// device functions it uses (chunk, step, slot_table, bulk copies, grid_barrier). Both projections in one persistent
// kernel with no exchange in the middle of the weight stream:
//   unit u = (live slot of rank u / SK_SLICES, slice s = u % SK_SLICES of 16 columns of I); block b takes units
//   [b U / G, (b + 1) U / G). A unit computes gate_up for its 16 columns of act (two gate_up tiles, the warps
//   splitting H as experts_kernel's phase A), SiLU * mul into shared memory, then down's one k16 step over those 16
//   columns for all of H (each warp H / F_WARPS rows), an mma from zero per tile, into partial[pair, s, :] (fp32) for
//   each row that chose the slot's expert.
//   a grid barrier, then each block sums its tiles of H: y = bf16(partial[p, 0] + partial[p, 1] + ...) per pair, in
//   slice order, then each row's choices in router order (choice_sums, as every path of the template).
// SK_TAIL 0 (timing only, wrong outputs): no partials, no barrier, no sums: what the stream and the units cost alone.
#ifndef SK_TAIL
#define SK_TAIL 1
#endif
// Timeline stamps (TIMELINE): 0 start, 1 slot table, 5 first unit's bytes in, 6 first unit done, 7 last unit's bytes
// in, 2 every unit done, 3 grid barrier passed, 4 end.
// Re-laid down weights (splitk_experiment.py, a permutation of mma_layout's): words [E, I/16, H/64, 32 lanes, 4
// tiles] (lane (g, t)'s word for tile 4G + i is its step over columns 16s + 4t .. + 3), scales [E, I/32, H/64, 8 g,
// 4 tiles, 2 h].
#define SK_SLICES (INTER / 16)
#define SK_GU_W (2 * GU_TILE_W)
#define SK_GU_S (2 * GU_TILE_S)
#define SK_D_W (HIDDEN * 8)
#define SK_D_S (HIDDEN)
#define SK_STAGE (SK_GU_W + SK_GU_S + SK_D_W + SK_D_S)
#define SK_GROUPS (HIDDEN / 64 / F_WARPS)  // down: groups of 4 tiles a warp
static_assert(HIDDEN / 64 % F_WARPS == 0, "down groups");
static_assert(SK_STAGE % 128 == 0, "aligned stages");

// SK_ASYNC 1: no producer; each consumer warp copies its own bytes of a unit (16-byte cp.async, each lane its own
// words, some lanes the warp's scales) into its own ring of SK_STAGES stages of SK_W_STAGE bytes: gate_up's words
// (2 tiles x FA_CHUNKS chunks, 512 bytes each), their scales (32 bytes a chunk), down's words (SK_GROUPS x 512) and
// scales (SK_GROUPS x 64).
#ifndef SK_ASYNC
#define SK_ASYNC 0
#endif
#define SK_W_STAGE (2 * FA_CHUNKS * 544 + SK_GROUPS * 576)
static_assert(SK_W_STAGE * F_WARPS == SK_STAGE && FA_CHUNKS <= 8 && SK_GROUPS <= 8, "a warp's share of a unit");

__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}

using SkRing = RingOf<SK_STAGES, SK_STAGE>;

extern "C" __global__ void __launch_bounds__((F_WARPS + 1) * 32, 1)
splitk_kernel(const u32* __restrict__ x, const uint4* __restrict__ gw, const u16* __restrict__ gs,
              const uint4* __restrict__ dw, const unsigned char* __restrict__ ds, const long long* __restrict__ ids,
              const float* __restrict__ wts, float* partial, unsigned short* __restrict__ out, u32* sync, int M, int P,
              int K) {
  extern __shared__ __align__(128) unsigned char stages[];
  __shared__ __align__(8) unsigned long long full[SK_STAGES], empty[SK_STAGES];
  __shared__ Slots t;
  __shared__ float part[2][F_WARPS][4][32];
  __shared__ __align__(16) u16 act_s[8][16];
  __shared__ int pair_of[PAIRS_MAX][8];  // live slot rank, row -> the pair whose output it is (-1: none)
  __shared__ float ys[PAIRS_MAX][16];     // the sums: each pair's expert output for the tile (bf16-rounded), by the
                                         // pair holding its partials
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
  const int G = gridDim.x, b = blockIdx.x;
  const SkRing ring{stages, full, empty};
  STAMP(2, 0);
  if (threadIdx.x == 0) {
    for (int i = 0; i < SK_STAGES; ++i) {
      mbar_init(smem_addr(&full[i]), 1);
      mbar_init(smem_addr(&empty[i]), F_WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  for (int i = threadIdx.x; i < PAIRS_MAX * 8; i += blockDim.x) (&pair_of[0][0])[i] = -1;
  asm volatile("griddepcontrol.wait;" ::: "memory");
  slot_table(t, ids, P, wts);
  if (threadIdx.x == 0)
    for (int p = 0; p < P; ++p) pair_of[t.rank[t.first[p]]][p / K] = p;  // later pairs of a row: none repeat
  __syncthreads();
  STAMP(2, 1);
  const int nl = t.n_live, U = nl * SK_SLICES;
  const int u0 = (int)((long long)b * U / G), u1 = (int)((long long)(b + 1) * U / G);

  if (warp == F_WARPS) {  // the producer
    if (!SK_ASYNC && lane == 0) {
      u32 n = 0;
      for (int u = u0; u < u1; ++u, ++n) {
        const int e = t.expert[t.by_rank[u / SK_SLICES]], s = u % SK_SLICES;
        const u32 bar = ring.fill(n, SK_STAGE), dst = ring.stage(n);
        const size_t tile = (size_t)e * (INTER / 8) + 2 * s;
        bulk_copy(dst, gw + tile * (HIDDEN / 64) * 32, SK_GU_W, bar);
        bulk_copy(dst + SK_GU_W, gs + tile * (HIDDEN / 64) * 16, SK_GU_S, bar);
        bulk_copy(dst + SK_GU_W + SK_GU_S, dw + ((size_t)e * SK_SLICES + s) * (HIDDEN / 2), SK_D_W, bar);
        bulk_copy(dst + SK_GU_W + SK_GU_S + SK_D_W, ds + ((size_t)e * (INTER / 32) + s / 2) * HIDDEN, SK_D_S, bar);
      }
    }
  } else {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const int c0 = warp * FA_CHUNKS;
    uint4 xr[FA_CHUNKS][2];
    const uint4* xl = g < M ? (const uint4*)(x + (size_t)g * (HIDDEN / 2)) + (c0 * 8 + q * 2) : nullptr;
#pragma unroll
    for (int i = 0; i < FA_CHUNKS; ++i) {
      xr[i][0] = xl ? ld_x(xl + i * 8) : zero;
      xr[i][1] = xl ? ld_x(xl + i * 8 + 1) : zero;
    }
    u32 n = 0;
    float keep = 0.f;  // (SK_TAIL 0: what keeps the compiler from dropping the down sums)
#if SK_ASYNC
    unsigned char* mine = stages + (size_t)warp * SK_STAGES * SK_W_STAGE;
    auto issue = [&](int u, int slot) {  // unit u's bytes for this warp into its stage `slot`; then a group (empty
      if (u < u1) {                      // past the block's units, so the waits below count alike)
        const int e = t.expert[t.by_rank[u / SK_SLICES]], s = u % SK_SLICES;
        const u32 dst = smem_addr(mine + slot * SK_W_STAGE);
        const size_t tile = (size_t)e * (INTER / 8) + 2 * s;
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int i = 0; i < FA_CHUNKS; ++i)
            cp_async16(dst + (j * FA_CHUNKS + i) * 512 + lane * 16,
                       gw + ((tile + j) * (HIDDEN / 64) + c0 + i) * 32 + lane);
        if (lane < 4 * FA_CHUNKS) {
          const int j = lane / (2 * FA_CHUNKS), piece = lane % (2 * FA_CHUNKS);
          cp_async16(dst + 2 * FA_CHUNKS * 512 + lane * 16,
                     reinterpret_cast<const unsigned char*>(gs) + ((tile + j) * (HIDDEN / 64) + c0) * 32 + piece * 16);
        }
        const size_t slice = (size_t)e * SK_SLICES + s;
#pragma unroll
        for (int i = 0; i < SK_GROUPS; ++i)
          cp_async16(dst + 2 * FA_CHUNKS * 544 + i * 512 + lane * 16,
                     dw + (slice * (HIDDEN / 64) + warp * SK_GROUPS + i) * 32 + lane);
        if (lane < 4 * SK_GROUPS)
          cp_async16(dst + 2 * FA_CHUNKS * 544 + SK_GROUPS * 512 + lane * 16,
                     ds + ((size_t)e * (INTER / 32) + s / 2) * HIDDEN + warp * SK_GROUPS * 64 + lane * 16);
      }
      asm volatile("cp.async.commit_group;" ::: "memory");
    };
    for (int k = 0; k < SK_STAGES; ++k) issue(u0 + k, k);
#endif
    for (int u = u0; u < u1; ++u, ++n) {
      const int r = u / SK_SLICES, s = u % SK_SLICES;
      uint4 a[2][FA_CHUNKS], dwr[SK_GROUPS];
      u32 sc[2][FA_CHUNKS];
      uint2 dsr[SK_GROUPS];
#if SK_ASYNC
      asm volatile("cp.async.wait_group %0;" :: "n"(SK_STAGES - 1) : "memory");  // unit n's group is in
      __syncwarp();  // and every lane's copies (the scales) are seen by the warp
      if (u == u0) STAMP(2, 5);
      if (u == u1 - 1) STAMP(2, 7);
      const unsigned char* st = mine + n % SK_STAGES * SK_W_STAGE;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int i = 0; i < FA_CHUNKS; ++i) {
          a[j][i] = reinterpret_cast<const uint4*>(st)[(j * FA_CHUNKS + i) * 32 + lane];
          const u16* scales = reinterpret_cast<const u16*>(st + 2 * FA_CHUNKS * 512);
          sc[j][i] = scales[(j * FA_CHUNKS + i) * 16 + g * 2 + (q >> 1)];
        }
#pragma unroll
      for (int i = 0; i < SK_GROUPS; ++i) {
        dwr[i] = reinterpret_cast<const uint4*>(st + 2 * FA_CHUNKS * 544)[i * 32 + lane];
        dsr[i] = reinterpret_cast<const uint2*>(st + 2 * FA_CHUNKS * 544 + SK_GROUPS * 512)[i * 8 + g];
      }
      __syncwarp();  // every lane has read the stage: it takes unit n + SK_STAGES
      issue(u + SK_STAGES, n % SK_STAGES);
#else
      const unsigned char* stage = ring.wait(n);
      if (u == u0) STAMP(2, 5);
      if (u == u1 - 1) STAMP(2, 7);
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int i = 0; i < FA_CHUNKS; ++i) {
          a[j][i] = reinterpret_cast<const uint4*>(stage + j * GU_TILE_W)[(c0 + i) * 32 + lane];
          sc[j][i] = reinterpret_cast<const u16*>(stage + SK_GU_W + j * GU_TILE_S)[(c0 + i) * 16 + g * 2 + (q >> 1)];
        }
#pragma unroll
      for (int i = 0; i < SK_GROUPS; ++i) {
        const int grp = warp * SK_GROUPS + i;
        dwr[i] = reinterpret_cast<const uint4*>(stage + SK_GU_W + SK_GU_S)[grp * 32 + lane];
        dsr[i] = reinterpret_cast<const uint2*>(stage + SK_GU_W + SK_GU_S + SK_D_W)[grp * 8 + g];
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(ring.empty_bar(n));
#endif
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float c[2][4] = { {0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f} };
#pragma unroll
        for (int i = 0; i < FA_CHUNKS; ++i) chunk(c, a[j][i], sc[j][i], xr[i]);
#pragma unroll
        for (int i = 0; i < 4; ++i) part[j][warp][i][lane] = c[0][i] + c[1][i];
      }
      consumers_sync();
      if (warp < 2) {  // warp j: act columns 8j .. 8j + 7 of the slice (zeros past the M rows)
        unsigned short a2[2];
        tile_act<F_WARPS>(part[warp], lane, a2);
        act_s[2 * q][8 * warp + g] = 2 * q < M ? a2[0] : (u16)0;
        act_s[2 * q + 1][8 * warp + g] = 2 * q + 1 < M ? a2[1] : (u16)0;
      }
      consumers_sync();
      const uint2 bv = *reinterpret_cast<const uint2*>(&act_s[g][4 * q]);  // columns 4t .. 4t + 3 of row g
      const int p0 = pair_of[r][2 * q], p1 = pair_of[r][2 * q + 1];
#pragma unroll
      for (int i = 0; i < SK_GROUPS; ++i) {
        const u32 w4[4] = {dwr[i].x, dwr[i].y, dwr[i].z, dwr[i].w};
        const u32 s4[4] = {dsr[i].x & 0xFFFFu, dsr[i].x >> 16, dsr[i].y & 0xFFFFu, dsr[i].y >> 16};
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
          float c[4] = {0.f, 0.f, 0.f, 0.f};
          step(c, w4[tt], scale_pair(s4[tt] & 0xFFu), scale_pair(s4[tt] >> 8), bv.x, bv.y);
          const int n0 = 16 * (4 * (warp * SK_GROUPS + i) + tt) + g;  // c[0..1]: row n0, c[2..3]: n0 + 8
#if !SK_TAIL
          keep += c[0] + c[1] + c[2] + c[3];
          continue;
#endif
          if (p0 >= 0) {
            float* dst = partial + ((size_t)p0 * SK_SLICES + s) * HIDDEN + n0;
            __stcg(dst, c[0]);
            __stcg(dst + 8, c[2]);
          }
          if (p1 >= 0) {
            float* dst = partial + ((size_t)p1 * SK_SLICES + s) * HIDDEN + n0;
            __stcg(dst, c[1]);
            __stcg(dst + 8, c[3]);
          }
        }
      }
      if (u == u0) STAMP(2, 6);
    }
#if !SK_TAIL
    if (keep == 12345.f) partial[threadIdx.x] = keep;
#endif
#if SK_ASYNC
    asm volatile("cp.async.wait_all;" ::: "memory");  // (only empty groups are left)
#endif
  }
#if !SK_TAIL
  return;
#endif
  __syncthreads();  // every warp's partials are stored (the producer has nothing to store)
  STAMP(2, 2);
  if (threadIdx.x == 0) grid_barrier(sync);
  __syncthreads();
  STAMP(2, 3);
  // the sums: tiles T = b, b + G, ... of 16 columns of H
  for (int T = b; T < HIDDEN / 16; T += G) {
    for (int i = threadIdx.x; i < P * 16; i += blockDim.x) {
      const int p = i >> 4, nn = i & 15;
      if (pair_of[t.rank[t.first[p]]][p / K] != p) continue;  // a pair holding no partials (a row's repeat)
      const float* col = partial + (size_t)p * SK_SLICES * HIDDEN + 16 * T + nn;
      float v[SK_SLICES];
#pragma unroll
      for (int s = 0; s < SK_SLICES; ++s) v[s] = __ldcg(col + (size_t)s * HIDDEN);
      float sum = v[0];
#pragma unroll
      for (int s = 1; s < SK_SLICES; ++s) sum += v[s];
      ys[p][nn] = bf16_round(sum);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < M * 16; i += blockDim.x) {  // each row's choices in router order (choice_sums)
      const int m = i >> 4, nn = i & 15;
      float total[1];
      choice_sums(total, t, m, K, [&](int r, float (&v)[1]) { v[0] = ys[pair_of[r][m]][nn]; });
      out[(size_t)m * HIDDEN + 16 * T + nn] = bf16_bits(total[0]);
    }
    __syncthreads();
  }
  STAMP(2, 4);
}
