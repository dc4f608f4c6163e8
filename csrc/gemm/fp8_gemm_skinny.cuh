// Hopper FP8 block-scaled GEMM for decode: at most 64 tokens, so the weights are the MMA's M and the
// tokens its N (out^T = W . X^T), and the job is to stream the weight matrix at the copy bandwidth.
//
// Dense (M <= 64 tokens) and masked-grouped (M_max <= 64 tokens per expert) problems share one
// mechanism. A tile is 128 weight rows of one group (two warpgroups' wgmma m64n64k32, 64 token
// columns). The work is the list of (tile, 128-deep K block) units of the active groups, tile-major,
// and CTA c of G takes units [c U / G, (c + 1) U / G): every SM streams the same number of weight
// bytes whatever N and K are (stream-K). A tile that lies inside one CTA's range is written as bf16
// at once. A tile shared by several CTAs is finished by the CTA that began it (its reducer): each
// later CTA leaves an fp32 partial in the workspace and counts it on the reducer's counter, and the
// reducer adds them to its own values in CTA order, so the result does not depend on timing
// (section "Shared tiles").
//
// CTA: 320 threads. Warpgroups 0-1 take rows [0, 64) and [64, 128) of each unit: 4 wgmma, wait,
// promote into the fp32 tile (fin += acc * a_scale[token] * b_scale). Warp 8 fills a ring of kStages
// stages: lane 0 TMA-loads the weight block (128 x 128 B) and the token block (8-64 rows x 128 B),
// and the lanes cp.async the 64 activation scales (any stride, zero past the group's tokens) and the
// weight scale, each stage's full barrier completing on the TMA bytes plus the lanes' cp.async
// arrivals. Every operand of a unit is in shared memory when the math warpgroups start it.
// Why 128 rows: with 64-row units (the first version) each SM streamed ~17 GB/s, one unit per
// ~870 cycles, most likely the math warpgroup's wait-promote chain, which now moves 16 KB.
// The kernel is a programmatic dependent launch (common/pdl.cuh).
//
// Warp 9 handles the shared tiles' signalling (signal_warp).
//
// Shared tiles. Until session 10 a second kernel summed the partials; it ended ~3 us after the main
// grid (its launch waits for the grid's completion and memory flush). Now the reducer sums them in
// this grid. A later CTA's math threads store its partial and arrive on a named barrier; the signal
// warp then adds 1 to the reducer's counter with release semantics. The reducer's signal warp waits
// (acquire) until the counter shows every other CTA of the tile, resets it to zero and lets its math
// threads, which kept their own values in registers, load and add the partials. The counters live
// outside the per-call workspace, since they must be zero when a call starts: the launcher keeps one
// zero-initialised array per (device, stream, graph capture) and every call leaves it at zero. Two
// calls can only meet on one array if they run on one stream, i.e. one after the other; the next
// call's CTAs touch it only after griddepcontrol.wait, i.e. after the previous grid has completed.
// A first version counted arrivals with a returning atomic in the math threads and let the last CTA
// to arrive sum the tile: the fence and the atomic stalled the weight stream, and the last arrival's
// chain (store, fence, atomic, loads) was longer than the second kernel (1x2112x7168: 11.9-12.2 us
// against 10.2-10.3, H100, session 10).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "common/named_barrier.cuh"
#include "common/pdl.cuh"
#include "common/smem_sm90.cuh"
#include "common/wgmma_sm90.cuh"

// FS_SKINNY_TL(code): code that exists only in the timeline build (fp8_gemm_skinny_timeline.cuh,
// -DFLASHSEEK_SKINNY_TIMELINE, standalone harnesses only); the default build compiles to the same SASS.
// FS_SKINNY_TL_UNIT(code): the stamps inside the unit loops, left out as well by
// -DFLASHSEEK_SKINNY_TIMELINE_LIGHT (CTA-level stamps only: the per-unit ones slow the kernel by 15-35%).
#ifdef FLASHSEEK_SKINNY_TIMELINE
#include "gemm/fp8_gemm_skinny_timeline.cuh"
#define FS_SKINNY_TL(...) __VA_ARGS__
#else
#define FS_SKINNY_TL(...)
#endif
#if defined(FLASHSEEK_SKINNY_TIMELINE) && !defined(FLASHSEEK_SKINNY_TIMELINE_LIGHT)
#define FS_SKINNY_TL_UNIT(...) __VA_ARGS__
#else
#define FS_SKINNY_TL_UNIT(...)
#endif

namespace flashseek::skinny {

constexpr int kRows = 128;    // weight rows per tile: two warpgroups' m64
constexpr int kTokens = 64;   // token columns per tile: the MMA's N
constexpr int kBlockK = 128;
constexpr int kStages = 8;    // 8 x 16 KB of weights in flight per SM; the copy needs ~45 KB
constexpr int kMathThreads = 256;
constexpr int kThreads = kMathThreads + 64;  // + the producer warp (8) + the signal warp (9)
constexpr int kMaxGroups = 1024;
constexpr int kAcc = kRows * kTokens / kMathThreads;  // 32 fp32 per thread (64 x 64 per warpgroup)
constexpr int kSlotFloats = kAcc * kMathThreads;      // one fp32 partial tile in the workspace

constexpr int kMaxCtas = 1024;  // grid size bound: the tile counters and the fixup table hold one entry a CTA

// Two builds of the kernel differ in how a finished tile reaches out[token][row]. Straight from the
// accumulators it takes 2-byte stores that each touch four rows of out, 32 a thread at 64 tokens;
// their issue held the math warpgroups ~2.6 us a tile at 64 tokens (36864 x 7168: 7.1 us of epilogue
// per CTA against 1.4 at one token, H100, bench/probes/skinny_timeline.cu), and the weight stream
// stalls behind them once the ring is full. The staged build writes the tile as bf16 into shared
// memory and stores it in 16-byte rows: 36864 x 7168 at 64 tokens 102.5 -> 100.7 us, 24576 x 1536
// 21.7 -> 20.5, 2112 x 7168 11.9 -> 11.1. It pays two barriers a tile and 17 KB of shared memory,
// which cost 0.1-0.2 us a call at 1-16 tokens, so the launchers run it from kStageMinTokens tokens
// (M, or M_max of a masked problem) up.
constexpr int kStageMinTokens = 17;
// The staging tile [token][row]: 256 bytes of rows per token, padded by 16 so that the accumulator
// layout's 2-byte writes fall on distinct banks (stage_columns).
constexpr int kOutPitch = kRows * 2 + 16;

struct Params {
  const float* a_scale;  // (group g, token i, kb) at g * a_scale_estride + kb * a_scale_ld + i
  int64_t a_scale_ld, a_scale_estride;
  const float* b_scale;  // [groups, ceil(n / 128), k / 128]
  __nv_bfloat16* out;    // [groups * m_rows, n]
  const int32_t* masked_m;  // masked: tokens per group (clamped to [0, m_rows]); dense: null, one group
  int num_groups;
  int m_rows;  // dense: M; masked: M_max
  int n, k;
  float4* partials;     // workspace: [gridDim.x][kSlotFloats / 4], float4 (j, thread) at j * kMathThreads + thread
  int* tile_counters;   // [kMaxCtas], zero at the start and the end of every call (see "Shared tiles")
};

struct Smem {
  static constexpr int kWBytes = kRows * kBlockK;    // 16 KB
  static constexpr int kXBytes = kTokens * kBlockK;  // 8 KB
  static constexpr int kSaBytes = kTokens * 4 + 16;  // 64 activation scales, then the weight scale
  static constexpr int kW = 0;
  static constexpr int kX = kW + kStages * kWBytes;
  static constexpr int kSa = kX + kStages * kXBytes;
  static constexpr int kActive = kSa + kStages * kSaBytes;  // [0] count, [1..] group ids
  static constexpr int kGroupTokens = kActive + (kMaxGroups + 1) * 4;  // tokens of every group
  static constexpr int kFix = kGroupTokens + kMaxGroups * 4;  // [kMaxCtas] slots the reducer sums
  static constexpr int kBar = (kFix + kMaxCtas * 4 + 7) / 8 * 8;
  static constexpr int kTotal = kBar + 2 * kStages * 8;
  static constexpr int kOut = (kTotal + 15) / 16 * 16;  // the staged build's bf16 tile, past the rest
  // The base is rounded up to 1024 (128B-swizzle atoms).
  template <bool kStaged>
  static constexpr int kDynamic = (kStaged ? kOut + kTokens * kOutPitch : kTotal) + 1024;
  static_assert(kOut + kTokens * kOutPitch + 1024 <= 227 * 1024, "over the sm_90 shared-memory limit");
  __device__ static uint32_t full(uint32_t base, int s) { return base + kBar + 8 * s; }
  __device__ static uint32_t empty(uint32_t base, int s) { return base + kBar + 8 * (kStages + s); }
};

using MmaOp = cute::SM90::GMMA::MMA_64x64x32_F32E4M3E4M3_SS_TN<>;


__device__ __forceinline__ int group_tokens(const Params& p, int g) {
  return p.masked_m != nullptr ? min(max(__ldg(p.masked_m + g), 0), p.m_rows) : p.m_rows;
}

// x / d for x >= 0, d > 0. A 64-bit division is a ~100-instruction software routine; the values met
// in practice fit 32 bits, where the hardware-assisted 32-bit routine is several times shorter.
__device__ __forceinline__ int64_t div_nonneg(int64_t x, int64_t d) {
  return (static_cast<uint64_t>(x) | static_cast<uint64_t>(d)) <= 0xffffffffu
             ? int64_t(static_cast<uint32_t>(x) / static_cast<uint32_t>(d))
             : x / d;
}

// The stream-K split shared by both kernels: U units over G CTAs.
struct Split {
  int64_t units;
  int ctas, num_kb;
  __device__ int64_t begin(int c) const { return div_nonneg(int64_t(c) * units, ctas); }
  // The CTA whose range holds unit u: the largest c with begin(c) <= u.
  __device__ int cta_of(int64_t u) const { return int(div_nonneg((u + 1) * ctas + units - 1, units)) - 1; }
  // How many CTAs hold units of tile t, the first of them being cta_of(t * num_kb). With at least as
  // many units as CTAs every range is non-empty; with fewer, every non-empty range is one unit.
  __device__ int contributors(int64_t t) const {
    const int64_t tb = t * num_kb;
    return units >= ctas ? cta_of(tb + num_kb - 1) - cta_of(tb) + 1 : num_kb;
  }
};

// What CTA c does about shared tiles. Its range [b, e) can start inside a tile that an earlier CTA
// began: it then leaves a partial of that tile (arrive_tile). It can end inside a tile that it
// began: it is then that tile's reducer (reduce_tile), which waits for the other CTAs' partials.
// Every other tile of the range is whole.
struct SharedTiles {
  int64_t arrive_tile = -1, reduce_tile = -1;
  __device__ SharedTiles(const Split& sp, int c) {
    const int64_t b = sp.begin(c), e = sp.begin(c + 1);
    if (b >= e) return;
    const int64_t ts = div_nonneg(b, sp.num_kb), te = div_nonneg(e - 1, sp.num_kb);
    if (b > ts * sp.num_kb) arrive_tile = ts;
    if (b <= te * sp.num_kb && e < (te + 1) * sp.num_kb) reduce_tile = te;
  }
};

// Named barriers between the math threads and the signal warp (barrier 0 is __syncthreads):
// kBarPartial: the math threads have stored the CTA's partial (they arrive, the signal warp waits);
// kBarReady: every other partial of the CTA's reduce tile is visible (the signal warp arrives, the
// math threads wait).
constexpr int kBarPartial = 1, kBarReady = 2, kBarSignalCount = kMathThreads + 32;
__device__ __forceinline__ void named_arrive(int id) { named_barrier_arrive(id, kBarSignalCount); }
__device__ __forceinline__ void named_sync(int id) { named_barrier_sync(id, kBarSignalCount); }

// Writes token columns [8 j, 8 j + 8) of a finished tile, transposed to out[token][row], masked to
// the group's tokens and to N. Thread (warp w, lane l) holds rows 16 w + l / 4 (+ 8) and, in
// v[0..3] = fin[4 j .. 4 j + 3], tokens 8 j + 2 (l % 4) (+ 1) of those two rows.
__device__ __forceinline__ void store_columns(const Params& p, const float (&v)[4], int g, int n0, int tid, int j,
                                              int tokens) {
  const int warp = tid / 32, lane = tid % 32;
  const int r0 = n0 + 16 * warp + lane / 4, r1 = r0 + 8;
  __nv_bfloat16* out = p.out + int64_t(g) * p.m_rows * p.n;
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int tok = 8 * j + 2 * (lane % 4) + q;
    if (tok < tokens) {
      if (r0 < p.n) out[int64_t(tok) * p.n + r0] = __float2bfloat16_rn(v[q]);
      if (r1 < p.n) out[int64_t(tok) * p.n + r1] = __float2bfloat16_rn(v[2 + q]);
    }
  }
}

// The staged build: token columns [8 j, 8 j + 8) of a finished tile into the staging tile (same
// register layout as store_columns); store_tile writes the tile out.
__device__ __forceinline__ void stage_columns(uint32_t out_smem, const float (&v)[4], int tid, int j) {
  const int warp = tid / 32, lane = tid % 32;
  const uint32_t row0 = out_smem + 2 * (16 * warp + lane / 4);
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const uint32_t at = row0 + (8 * j + 2 * (lane % 4) + q) * kOutPitch;
    const __nv_bfloat16 lo = __float2bfloat16_rn(v[q]), hi = __float2bfloat16_rn(v[2 + q]);
    asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(at), "h"(*reinterpret_cast<const uint16_t*>(&lo)) : "memory");
    asm volatile("st.shared.b16 [%0], %1;\n" ::"r"(at + 16), "h"(*reinterpret_cast<const uint16_t*>(&hi)) : "memory");
  }
}

// The math threads only (named barrier 3; 0-2 are __syncthreads and the signal warp's).
constexpr int kBarMath = 3;
__device__ __forceinline__ void math_sync() { named_barrier_sync(kBarMath, kMathThreads); }

// The staged tile's first `tokens` token rows to out[token][n0 .. n0 + 128), masked to N, in 16-byte
// stores (the bindings require out contiguous and 16-byte aligned, and N a multiple of 16, so each
// 8-row chunk is whole or past N). The barriers order the staging writes before these reads, and
// these reads before the next tile's staging writes.
__device__ __forceinline__ void store_tile(const Params& p, uint32_t out_smem, int g, int n0, int tokens, int tid) {
  math_sync();
  const int chunks = min(kRows, p.n - n0) / 8;
  __nv_bfloat16* out = p.out + int64_t(g) * p.m_rows * p.n + n0;
  for (int i = tid; i < tokens * (kRows / 8); i += kMathThreads) {
    const int tok = i / (kRows / 8), c = i % (kRows / 8);
    if (c < chunks) {
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(out_smem + tok * kOutPitch + 16 * c));
      *reinterpret_cast<uint4*>(out + int64_t(tok) * p.n + 8 * c) = v;
    }
  }
  math_sync();
}

// A finished tile's columns and, once they are all there, the tile. The staged build stages a tile
// only when its group has kStageMinTokens tokens or more: a masked problem's M_max picks the build,
// and most of its experts may hold a token or two. `tokens` is uniform over the CTA.
template <bool kStaged>
__device__ __forceinline__ void put_columns(const Params& p, uint32_t out_smem, const float (&v)[4], int g, int n0,
                                            int tid, int j, int tokens) {
  if (kStaged && tokens >= kStageMinTokens) {
    stage_columns(out_smem, v, tid, j);
  } else {
    store_columns(p, v, g, n0, tid, j, tokens);
  }
}
template <bool kStaged>
__device__ __forceinline__ void put_tile(const Params& p, uint32_t out_smem, int g, int n0, int tokens, int tid) {
  if (kStaged && tokens >= kStageMinTokens) store_tile(p, out_smem, g, n0, tokens, tid);
}

// The groups with at least one token, in order, into active[1..]; active[0] = their count. Warp 0
// (lanes own contiguous runs of groups), from the token counts that every thread staged in shared
// memory (one load each, all in flight together; the producer and the epilogue read them there too).
__device__ __forceinline__ void list_active_groups(const Params& p, const int* tokens, int* active, int lane) {
  const int per = (p.num_groups + 31) / 32;
  const int lo = lane * per, hi = min(lo + per, p.num_groups);
  int mine = 0;
  for (int g = lo; g < hi; ++g) mine += tokens[g] > 0;
  int incl = mine;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  int at = incl - mine;
  for (int g = lo; g < hi; ++g) {
    if (tokens[g] > 0) active[1 + at++] = g;
  }
  if (lane == 31) active[0] = incl;
}

// Token blocks come in boxes of 8, 16, 32 or 64 rows: a group's block is the smallest box that holds
// its tokens, so masked experts with a few tokens do not pull 64 rows of other experts' activations.
// The MMA still reads 64 columns; the ones past the box hold a previous stage's data and are never
// stored.
struct TokenMaps {
  CUtensorMap rows[4];  // boxes of 8 << i rows
};
__device__ __forceinline__ int token_box(int tokens) {
  return tokens <= 8 ? 0 : tokens <= 16 ? 1 : tokens <= 32 ? 2 : 3;
}

__device__ __forceinline__ void producer(const CUtensorMap* tmap_w, const TokenMaps* tmap_x, const Params& p,
                                         uint8_t* smem, const Split& sp, int c) {
  const uint32_t base = smem_u32(smem);
  const int lane = threadIdx.x % 32;
  const int* active = reinterpret_cast<const int*>(smem + Smem::kActive);
  const int tiles_per_group = (p.n + kRows - 1) / kRows;
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + Smem::kBar);
  constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  int stage = 0;
  uint32_t phase = 0;
  const int64_t begin = sp.begin(c), end = sp.begin(c + 1);
  int64_t u = begin;
  if (u >= end) return;
  FS_SKINNY_TL(const int64_t tl_u0 = u; timeline::Stamp tl_first{}, tl_last{};
               if (lane == 0 && timeline::g_cta != nullptr) timeline::put(timeline::g_cta + c, timeline::kProducer, timeline::now());)
  // The walk advances (group, row tile, K block) incrementally: three 64-bit divisions per unit (the
  // first version) put hundreds of dependent instructions on this one thread's path to each TMA.
  const int64_t t0 = div_nonneg(u, sp.num_kb);
  int kb = int(u - t0 * sp.num_kb);
  int gi = int(div_nonneg(t0, tiles_per_group));
  int n0 = int(t0 - int64_t(gi) * tiles_per_group) * kRows;
  int g = active[1 + gi];
  const int* tokens_of = reinterpret_cast<const int*>(smem + Smem::kGroupTokens);
  int tokens = tokens_of[g];
  const int nsb = (p.n + 127) / 128;
  for (; u < end; ++u) {
    const int box = token_box(tokens);
    mbar_wait(Smem::empty(base, stage), phase ^ 1);
    const bool first = u == begin;
    if (first) pdl_wait();  // the token block and the scales are the previous kernel's output
    if (lane == 0) {
      FS_SKINNY_TL_UNIT(if (u == tl_u0 && timeline::g_cta != nullptr) timeline::put(timeline::g_cta + c, timeline::kTmaPre, timeline::now());)
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full_bar + stage,
                                                                     Smem::kWBytes + (8 << box) * kBlockK);
      cute::SM90_TMA_LOAD_2D::copy(tmap_w, full_bar + stage, kHint, smem + Smem::kW + stage * Smem::kWBytes,
                                   kb * kBlockK, g * p.n + n0);
      cute::SM90_TMA_LOAD_2D::copy(&tmap_x->rows[box], full_bar + stage, kHint,
                                   smem + Smem::kX + stage * Smem::kXBytes,
                                   kb * kBlockK, p.masked_m != nullptr ? g * p.m_rows : 0);
      FS_SKINNY_TL_UNIT(if (u == tl_u0) tl_first = tl_last = timeline::now(); else tl_last = timeline::clk_now();)
    }
    const float* sa = p.a_scale + int64_t(g) * p.a_scale_estride + int64_t(kb) * p.a_scale_ld;
    const uint32_t dst = base + Smem::kSa + stage * Smem::kSaBytes;
#pragma unroll
    for (int h = 0; h < kTokens / 32; ++h) {
      const int i = lane + 32 * h;
      const bool in = i < tokens;
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst + 4 * i),
                   "l"(in ? sa + i : p.a_scale), "r"(in ? 4 : 0) : "memory");
    }
    if (lane == 0) {
      const float* sb = p.b_scale + (int64_t(g) * nsb + n0 / 128) * sp.num_kb + kb;
      asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst + 4 * kTokens), "l"(sb) : "memory");
    }
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(Smem::full(base, stage)) : "memory");
    if (first) pdl_launch_dependents();
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
    if (++kb == sp.num_kb) {
      kb = 0;
      n0 += kRows;
      if (n0 >= p.n && u + 1 < end) {
        n0 = 0;
        g = active[1 + ++gi];
        tokens = tokens_of[g];
      }
    }
  }
  FS_SKINNY_TL(if (lane == 0 && timeline::g_cta != nullptr) {
    timeline::put(timeline::g_cta + c, timeline::kTmaFirst, tl_first);
    timeline::put(timeline::g_cta + c, timeline::kTmaLast, tl_last);
  })
}

// The reducer's sum of its shared tile, columns [8 j0, 8 (j0 + kJ)): its own fp32 values (fin), then
// the partials of the `count` later CTAs listed in `slots` (-1: an empty range, nothing written) in
// CTA order, kB partials loaded together. Fixed order: the result does not depend on timing.
template <int kJ, int kB, bool kStaged>
__device__ __forceinline__ void reduce_columns(const Params& p, const float (&fin)[kAcc], const int* slots,
                                               int count, int j0, int g, int n0, int tokens, int tid,
                                               uint32_t out_smem) {
  float4 sum[kJ];
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    const int f = 4 * min(j0 + j, kAcc / 4 - 1);
    sum[j] = make_float4(fin[f], fin[f + 1], fin[f + 2], fin[f + 3]);
  }
  for (int i0 = 0; i0 < count; i0 += kB) {
    float4 v[kB][kJ];
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int s = i0 + b < count ? slots[i0 + b] : -1;
      const float4* part = p.partials + int64_t(max(s, 0)) * (kSlotFloats / 4) + tid;
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        // .cg: written by other SMs during this grid, and L1 is not coherent with them.
        v[b][j] = s >= 0 && 8 * (j0 + j) < tokens ? __ldcg(part + (j0 + j) * kMathThreads) : float4{};
      }
    }
#pragma unroll
    for (int b = 0; b < kB; ++b) {
#pragma unroll
      for (int j = 0; j < kJ; ++j) {
        sum[j].x += v[b][j].x;
        sum[j].y += v[b][j].y;
        sum[j].z += v[b][j].z;
        sum[j].w += v[b][j].w;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    if (8 * (j0 + j) >= tokens) break;
    const float v[4] = {sum[j].x, sum[j].y, sum[j].z, sum[j].w};
    put_columns<kStaged>(p, out_smem, v, g, n0, tid, j0 + j, tokens);
  }
}

// kJ column groups at a time, so that the loads in flight per thread stay at 16 float4 whatever the
// token count (M = 1: one group, 16 partials a round trip).
template <int kJ, bool kStaged>
__device__ __forceinline__ void reduce_tile(const Params& p, const float (&fin)[kAcc], const int* slots, int count,
                                            int g, int n0, int tokens, int tid, uint32_t out_smem) {
#pragma unroll
  for (int j0 = 0; j0 < kAcc / 4; j0 += kJ) {
    if (8 * j0 >= tokens) break;
    reduce_columns<kJ, 16 / kJ, kStaged>(p, fin, slots, count, j0, g, n0, tokens, tid, out_smem);
  }
  put_tile<kStaged>(p, out_smem, g, n0, tokens, tid);
}

// The signal warp: it alone touches the tile counters, so the math warpgroups never wait on a fence
// or an atomic in the middle of the weight stream. It publishes the CTA's partial (after the math
// threads have stored it) with one release add on the counter of the tile's reducer, and, for the
// CTA's own reduce tile, lists the later CTAs' slots, waits until they have all arrived (acquire),
// sets the counter back to zero and releases the math threads.
// Progress: a reducer waits only for later CTAs of its own tile, and only the tile that straddles the
// last resident CTA can have a waiting reducer whose partners are not resident yet, so with CTAs
// dispatched in index order (what the hardware does) at most one reducer per grid is stuck at a time
// and every other CTA finishes and frees its SM. A programmatic dependent launch starts the next
// kernel only once every CTA of this one has started (griddepcontrol.launch_dependents), so a
// following kernel cannot take the SMs the remaining CTAs need.
__device__ __forceinline__ void signal_warp(const Params& p, uint8_t* smem, const Split& sp, int c,
                                            const SharedTiles& st) {
  const int lane = threadIdx.x % 32;
  if (st.arrive_tile >= 0) {
    named_sync(kBarPartial);
    if (lane == 0) {
      int* counter = p.tile_counters + sp.cta_of(st.arrive_tile * sp.num_kb);
      asm volatile("red.release.gpu.global.add.s32 [%0], 1;\n" ::"l"(counter) : "memory");
    }
  }
  if (st.reduce_tile >= 0) {
    const int64_t tb = st.reduce_tile * sp.num_kb;
    const int last = sp.cta_of(tb + sp.num_kb - 1);
    int* slots = reinterpret_cast<int*>(smem + Smem::kFix);
    for (int o = c + 1 + lane; o <= last; o += 32) slots[o - c - 1] = sp.begin(o) == sp.begin(o + 1) ? -1 : o;
    if (lane == 0) {
      const int expected = sp.contributors(st.reduce_tile) - 1;
      int* counter = p.tile_counters + c;
      for (;;) {
        int arrived;
        asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(arrived) : "l"(counter) : "memory");
        if (arrived >= expected) break;
        __nanosleep(64);
      }
      *counter = 0;  // every other CTA of the tile has arrived: nobody touches it again in this call
    }
    __syncwarp();
    named_arrive(kBarReady);
  }
}

template <bool kStaged>
__device__ __forceinline__ void math_warpgroup(const Params& p, uint8_t* smem, const Split& sp, int c) {
  const uint32_t base = smem_u32(smem);
  const int tid = threadIdx.x, lane = tid % 32;
  const int* active = reinterpret_cast<const int*>(smem + Smem::kActive);
  const int tiles_per_group = (p.n + kRows - 1) / kRows;
  // K-major 128-byte rows, 8-row swizzle atoms 1024 B apart; the descriptors of stage 0 plus the stage
  // and K-step offsets (16-byte units).
  const uint64_t w_desc0 = wgmma_desc_sw128(base + Smem::kW + (tid / 128) * 64 * kBlockK, 16, 1024);
  const uint64_t x_desc0 = wgmma_desc_sw128(base + Smem::kX, 16, 1024);
  const uint32_t out_smem = base + Smem::kOut;
  int stage = 0;
  uint32_t phase = 0;
  float acc[kAcc], fin[kAcc];
  const SharedTiles st(sp, c);
  const int64_t end = sp.begin(c + 1);
  int64_t u = sp.begin(c);
  FS_SKINNY_TL(timeline::Stamp tl_full_first{}, tl_full_last{}, tl_epi_start{}, tl_epi_end{};
               uint64_t tl_epi_clk = 0; uint32_t tl_whole = 0, tl_partial = 0;
               bool tl_first = true, tl_last_whole = false;)
  while (u < end) {
    const int64_t t = div_nonneg(u, sp.num_kb);
    const int kb0 = int(u - t * sp.num_kb);
    const int kb_end = int(min(end, (t + 1) * sp.num_kb) - t * sp.num_kb);
    const int g = active[1 + int(div_nonneg(t, tiles_per_group))];
    const int n0 = int(t - div_nonneg(t, tiles_per_group) * tiles_per_group) * kRows;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) fin[i] = 0.f;
    for (int kb = kb0; kb < kb_end; ++kb) {
      mbar_wait(Smem::full(base, stage), phase);
      FS_SKINNY_TL_UNIT(if (tl_first) tl_full_first = tl_full_last = timeline::now(); else tl_full_last = timeline::clk_now();
                   tl_first = false;)
      const uint64_t w_desc = w_desc0 + uint64_t(stage) * (Smem::kWBytes >> 4);
      const uint64_t x_desc = x_desc0 + uint64_t(stage) * (Smem::kXBytes >> 4);
      cute::warpgroup_arrive();
#pragma unroll
      for (int ks = 0; ks < kBlockK / 32; ++ks) {
        wgmma_ss<MmaOp>(w_desc + ks * 2, x_desc + ks * 2, acc, ks > 0, std::make_index_sequence<kAcc>{});
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
#pragma unroll
      for (int i = 0; i < kAcc; ++i) cute::warpgroup_fence_operand(acc[i]);
      const uint32_t sa_base = base + Smem::kSa + stage * Smem::kSaBytes + 8 * (lane % 4);
      float sb;
      asm volatile("ld.shared.f32 %0, [%1];\n"
                   : "=f"(sb)
                   : "r"(base + Smem::kSa + stage * Smem::kSaBytes + 4 * kTokens));
      float2 sa[kAcc / 4];
#pragma unroll
      for (int j = 0; j < kAcc / 4; ++j) {
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(sa[j].x), "=f"(sa[j].y) : "r"(sa_base + 32 * j));
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(Smem::empty(base, stage));
#pragma unroll
      for (int j = 0; j < kAcc / 4; ++j) {
        const float s0 = sa[j].x * sb, s1 = sa[j].y * sb;
        fin[4 * j + 0] = fmaf(acc[4 * j + 0], s0, fin[4 * j + 0]);
        fin[4 * j + 1] = fmaf(acc[4 * j + 1], s1, fin[4 * j + 1]);
        fin[4 * j + 2] = fmaf(acc[4 * j + 2], s0, fin[4 * j + 2]);
        fin[4 * j + 3] = fmaf(acc[4 * j + 3], s1, fin[4 * j + 3]);
      }
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }
    FS_SKINNY_TL_UNIT(tl_epi_start = timeline::clk_now();)
    // Columns past the group's tokens are neither stored nor kept as partials (M = 1: 1/8 of them).
    const int tokens = reinterpret_cast<const int*>(smem + Smem::kGroupTokens)[g];
    const bool whole = kb0 == 0 && kb_end == sp.num_kb;
    if (!whole && t == st.reduce_tile) {
      named_sync(kBarReady);
      const int* slots = reinterpret_cast<const int*>(smem + Smem::kFix);
      const int count = sp.cta_of(t * sp.num_kb + sp.num_kb - 1) - c;
      if (tokens <= 8) {
        reduce_tile<1, kStaged>(p, fin, slots, count, g, n0, tokens, tid, out_smem);
      } else if (tokens <= 16) {
        reduce_tile<2, kStaged>(p, fin, slots, count, g, n0, tokens, tid, out_smem);
      } else {
        reduce_tile<4, kStaged>(p, fin, slots, count, g, n0, tokens, tid, out_smem);
      }
    } else {
      float4* slot = p.partials + int64_t(c) * (kSlotFloats / 4) + tid;
#pragma unroll
      for (int j = 0; j < kAcc / 4; ++j) {
        if (8 * j >= tokens) break;
        if (whole) {
          const float v[4] = {fin[4 * j], fin[4 * j + 1], fin[4 * j + 2], fin[4 * j + 3]};
          put_columns<kStaged>(p, out_smem, v, g, n0, tid, j, tokens);
        } else {
          slot[j * kMathThreads] = make_float4(fin[4 * j], fin[4 * j + 1], fin[4 * j + 2], fin[4 * j + 3]);
        }
      }
      if (whole) {
        put_tile<kStaged>(p, out_smem, g, n0, tokens, tid);
      } else {
        named_arrive(kBarPartial);  // the signal warp publishes it
      }
    }
    FS_SKINNY_TL_UNIT(tl_epi_end = timeline::clk_now(); tl_epi_clk += tl_epi_end.clk - tl_epi_start.clk;
                 (whole ? tl_whole : tl_partial) += 1; tl_last_whole = whole;)
    u = t * sp.num_kb + kb_end;
  }
  FS_SKINNY_TL(if (tid == 0 && timeline::g_cta != nullptr) {
    timeline::Cta* r = timeline::g_cta + c;
    timeline::put(r, timeline::kFullFirst, tl_full_first);
    timeline::put(r, timeline::kFullLast, tl_full_last);
    timeline::put(r, timeline::kEpiStart, tl_epi_start);
    timeline::put(r, timeline::kEpiEnd, tl_epi_end);
    r->epi_clk = tl_epi_clk;
    r->tiles_whole = tl_whole;
    r->tiles_partial = tl_partial;
    r->last_whole = tl_last_whole;
  })
}

__device__ __forceinline__ Split make_split(const Params& p, int active_groups) {
  Split sp;
  sp.num_kb = p.k / kBlockK;
  sp.units = int64_t(active_groups) * ((p.n + kRows - 1) / kRows) * sp.num_kb;
  sp.ctas = gridDim.x;
  return sp;
}

template <bool kStaged>
__global__ void __launch_bounds__(kThreads, 1)
    skinny_kernel(const __grid_constant__ CUtensorMap tmap_w, const __grid_constant__ TokenMaps tmap_x,
                  const __grid_constant__ Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  FS_SKINNY_TL(const timeline::Stamp tl_entry = timeline::now();)
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  int* active = reinterpret_cast<int*>(smem + Smem::kActive);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  int* tokens = reinterpret_cast<int*>(smem + Smem::kGroupTokens);
  const bool masked = p.masked_m != nullptr;
  if (tid == 0) {
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Smem::kBar);
    for (int s = 0; s < kStages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(bars + s, 1 + 32);  // TMA issuer + 32 cp.async lanes
      cutlass::arch::ClusterBarrier::init(bars + kStages + s, kMathThreads / 32);
    }
    cutlass::arch::fence_barrier_init();
    if (!masked) {  // dense: one group of M tokens, always active
      tokens[0] = p.m_rows;
      active[0] = 1;
      active[1] = 0;
    }
  }
  if (tid == kMathThreads) {  // the producer warp's lane 0
    cute::prefetch_tma_descriptor(&tmap_w);
#pragma unroll
    for (int i = 0; i < 4; ++i) cute::prefetch_tma_descriptor(&tmap_x.rows[i]);
  }
  // A masked problem's groups come from masked_m, the previous kernel's output. A dense problem's unit
  // walk comes from the shapes alone: its CTA sets up while the previous grid finishes, and each role
  // waits for that grid (griddepcontrol.wait) just before its first dependent access. The producer's
  // wait sits in its loop, right before the first copies: once the dependency resolves, the first TMA
  // goes out in ~0.1 us instead of ~1.1 us behind the setup, launch_dependents and a cold instruction
  // path (H100, session 11, timeline harness).
  if (masked) {
    pdl_wait();
    for (int g = tid; g < p.num_groups; g += kThreads) tokens[g] = group_tokens(p, g);
    __syncthreads();
    if (warp == 0) list_active_groups(p, tokens, active, lane);
  }
  __syncthreads();
  const Split sp = make_split(p, active[0]);
  FS_SKINNY_TL(const timeline::Stamp tl_setup = timeline::now(); timeline::Stamp tl_pdl{};)
  if (tid < kMathThreads) {
    pdl_wait();  // before the first store: the previous grid may still read this call's output buffer
    FS_SKINNY_TL(tl_pdl = timeline::now();)
    pdl_launch_dependents();
    math_warpgroup<kStaged>(p, smem, sp, blockIdx.x);
  } else if (warp == kMathThreads / 32) {
    producer(&tmap_w, &tmap_x, p, smem, sp, blockIdx.x);  // waits and launches dependents in its loop
  } else {
    pdl_wait();  // the tile counters: the previous call on this stream leaves them at zero when it completes
    pdl_launch_dependents();
    signal_warp(p, smem, sp, blockIdx.x, SharedTiles(sp, blockIdx.x));
  }
  FS_SKINNY_TL(__syncthreads(); if (tid == 0 && timeline::g_cta != nullptr) {
    timeline::Cta* r = timeline::g_cta + blockIdx.x;
    timeline::put(r, timeline::kEntry, tl_entry);
    timeline::put(r, timeline::kPdl, tl_pdl);
    timeline::put(r, timeline::kSetup, tl_setup);
    timeline::put(r, timeline::kExit, timeline::now());
    r->unit_begin = sp.begin(blockIdx.x);
    r->unit_end = sp.begin(blockIdx.x + 1);
    r->smid = timeline::smid();
  })
#endif
}

}  // namespace flashseek::skinny
