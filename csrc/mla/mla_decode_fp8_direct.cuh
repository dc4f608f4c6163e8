// Paged MLA decode over the FP8 latent cache for tiles of up to 32 query rows (s_q * h_q <= 32: the
// memory-bound TP shards, and their s_q = 2 speculative steps), dequantizing straight into the MMA
// fragments.
//
// Why a kernel of its own: the staged kernel (mla_decode_kernel.cuh) dequantizes each 64-token block
// into a bf16 tile by all threads, behind a barrier, and then runs the bf16 MMAs on it: ~1 us of
// dequant plus ~2.6 us of latency-bound MMA / softmax per block, in series, so it ran at the bf16
// kernel's speed while reading 0.57 of its bytes. Here nothing is converted into shared memory:
// - the raw 656-byte tokens land by TMA bulk copies (one per page run of the block, one mbarrier per
//   stage, four stages), issued by warp 0 as stages free up, walking the sm part's (request, block)
//   sequence across request boundaries;
// - S = Q K^T runs as fp16 MMAs: e4m3 -> f16 is one exact cvt per two values, and the per-token scales
//   are folded out of the tiles: S = sum_b s_b[key] (Q_b . K^_b) + Q_rope . K_rope with one fp32
//   accumulator per 128-dim block b (K^ = the raw e4m3 values). Q is rescaled per row by a power of two
//   into the upper f16 range (exact for bf16 and f16 inputs) and the factor is taken back out of S;
// - O[:, block b] += (P * s_b[key]) V^_b: every warp's output dims lie in one block b, and it reads
//   P_b (P times that block's scales, f16) from shared memory; V^ is read as bytes and paired by key
//   with byte permutes before the same cvt.
// The MMA k order is permuted (both operands alike) so that each thread's K fragments are 16
// consecutive bytes of a token (LDS.128), and the V fragments' n order so that each thread's are 8 or
// 16 consecutive bytes; with the tokens' 656-byte stride both are free of bank conflicts.
//
// Warps: 8, as kRG row groups of 16 rows x kW = 8 / kRG warp columns (Tile). S: warp column wc takes
// keys [kKeys wc, +kKeys) of the block over all 576 dims (16 rows: the latent Q fragments stay in
// registers for the request; 32 rows: they are read per block from a per-lane fragment copy in
// shared memory). Row maxima go through shared memory (barrier A), P_b too (barrier B); P V: warp w
// takes dims [64 w, 64 w + 64) of all rows (one scale block; 32 rows: two m-tiles sharing the
// converted V fragments). Row sums stay per thread and are reduced once per request.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "mla/mla_cache_token.cuh"
#include "mla/mla_decode_kernel.cuh"

namespace flashseek::mla {
namespace direct {

using detail::fast_exp2;
using detail::PlanPart;
using detail::p_off;
using detail::visible_keys;

constexpr int kThreads = 256;
constexpr int kWarps = 8;
constexpr int kStages = 4;  // three blocks (126 KB) in flight per SM while one is used
constexpr int kStageBytes = kBlockN * kFp8TokenBytes;  // 41984
constexpr int kLatentBlocks = kDV / 128;               // scale blocks per token
constexpr int kKSteps = kDQK / 16;                     // MMA k steps of S: 32 latent, 4 rope

// A CTA owns kRG row groups of 16 query rows (kRG = 1: up to 16 rows, 2: up to 32). S: the kW = 8 / kRG
// warps of a row group split the block's keys. P V: each warp takes 64 output dims of all rows.
template <int kRG>
struct Tile {
  static constexpr int kM = 16 * kRG;          // query rows
  static constexpr int kW = kWarps / kRG;      // warps per row group
  static constexpr int kKeys = kBlockN / kW;   // keys of S per warp: 8 / 16
  static constexpr int kNT = kKeys / 8;        // n-tiles of S per warp
  // P V: warp w takes output dims [64 w, 64 w + 64) of all kM rows (kRG m-tiles), so the V bytes it
  // converts serve every row group, and the dims lie in one scale block (w / 2).
  static constexpr int kDims = kDV / kWarps;   // 64
  static constexpr int kONT = kDims / 8;       // n-tiles of O per warp and m-tile
  static constexpr int kPBytes = kM * kBlockN * 2;  // one P_b tile (f16)
  // kRG = 1: each thread keeps its latent Q fragments (128 registers) for the request, read from a
  // q tile whose rows are padded by 16 bytes (292 words = 4 mod 32 banks, so the per-block rope
  // fragment reads are conflict-free). kRG = 2 has no registers for that (O alone is 64 a thread):
  // the same bytes hold per-lane fragments ([row group][k step][lane][a0..a3], 16 bytes a lane,
  // conflict-free), scattered there from the threads' q loads and read every block.
  static constexpr int kQStride = kRG == 1 ? kDQK * 2 + 16 : kDQK * 2;
  static constexpr int kStage = 0;
  static constexpr int kP = kStages * kStageBytes;         // [4 blocks][kM rows][64 keys] f16, swizzled
  static constexpr int kMax = kP + kLatentBlocks * kPBytes;  // [kM rows][kW] fp32
  static constexpr int kSum = kMax + kM * kW * 4;          // [2][kW][kM] fp32, by request parity
  static constexpr int kQ = kSum + 2 * kW * kM * 4;        // q tile / fragments
  static constexpr int kRowMax = kQ + kM * kQStride;       // [kM] row max |q| (fp32 bits)
  static constexpr int kBar = kRowMax + kM * 4;            // kStages mbarriers
  static constexpr int kTotal = kBar + kStages * 8;
  static_assert(kTotal <= 232448, "shared memory exceeds the sm_90 per-block limit");
  static_assert(kBar % 8 == 0 && kStageBytes % 16 == 0 && kDims % 64 == 0, "layout");
  static_assert(kRG == 1 || kM * kQStride == kRG * kKSteps * 32 * 16, "fragments fill the tile exactly");
};

__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four e4m3 values (one word, first value lowest) -> two f16x2: values (0, 1) and (2, 3). Exact.
__device__ __forceinline__ void e4m3x4_to_f16(uint32_t w, uint32_t& lo, uint32_t& hi) {
  asm("{\n.reg .b16 l, h;\nmov.b32 {l, h}, %2;\ncvt.rn.f16x2.e4m3x2 %0, l;\ncvt.rn.f16x2.e4m3x2 %1, h;\n}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(w));
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

// The part's sequence of (request, key block), walked identically by the loads and the math.
struct Walk {
  int bi, blk, end, len_eff;
};
// First block of the first request >= bi with a non-empty piece; false past the part.
__device__ __forceinline__ bool walk_from(const DecodeParams& p, const PlanPart& plan, int bi, Walk& w) {
  for (; bi <= plan.b1; ++bi) {
    int len, len_eff, blk_begin, n_iter;
    plan.piece(p, bi, len, len_eff, blk_begin, n_iter);
    if (n_iter > 0) {
      w = Walk{bi, blk_begin, blk_begin + n_iter, len_eff};
      return true;
    }
  }
  return false;
}
__device__ __forceinline__ bool walk_next(const DecodeParams& p, const PlanPart& plan, Walk& w) {
  return ++w.blk < w.end || walk_from(p, plan, w.bi + 1, w);
}

// Warp 0's loads. A block is n_sub = 64 / min(page_size, 64) <= 4 runs of consecutive tokens, each
// inside one page: lane i < n_sub copies run i. A run's first cache row comes from the block table
// (run_row: -1 when the run starts at or past len_eff, not loaded; the rows past len_eff inside a
// loaded run are not copied either). The table is read one block ahead of the copy.
__device__ __forceinline__ int run_row(const DecodeParams& p, const Walk& w, int r) {
  const int run = min(1 << p.page_size_log2, kBlockN);
  const int t0 = w.blk * kBlockN + r * run;
  if (r * run >= kBlockN || t0 >= w.len_eff) return -1;
  // t0 < len_eff <= max_pages * page_size: the table index is in range. Page ids are clamped to
  // [0, num_pages): a bad table gives wrong values, never an out-of-bounds read.
  const uint32_t page = min(static_cast<uint32_t>(__ldg(p.block_table + w.bi * p.bt_stride_b + (t0 >> p.page_size_log2))),
                            static_cast<uint32_t>(p.num_pages - 1));
  return static_cast<int>((page << p.page_size_log2) + (t0 & ((1 << p.page_size_log2) - 1)));
}

// Copies block w into `stage`, armed on `bar`; `row` is this lane's run_row (lanes >= 4: -1).
__device__ __forceinline__ void copy_block(const DecodeParams& p, const Walk& w, int row, uint32_t stage, uint32_t bar,
                                           int lane) {
  const int run = min(1 << p.page_size_log2, kBlockN);
  const int t0 = w.blk * kBlockN + lane * run;
  const uint32_t bytes = row >= 0 ? static_cast<uint32_t>(min(run, w.len_eff - t0) * kFp8TokenBytes) : 0u;
  const uint32_t total = __reduce_add_sync(0xffffffffu, bytes);
  if (lane == 0) mbar_arrive_expect_tx(bar, total);
  __syncwarp();
  if (bytes != 0) {
    bulk_copy(stage + lane * run * kFp8TokenBytes, static_cast<const char*>(p.kv) + static_cast<int64_t>(row) * kFp8TokenBytes,
              bytes, bar);
  }
}

struct Loader {
  Walk w;     // the next block to copy
  bool more;  // whether there is one
  int row;    // its run_row for this lane

  // The part's first kStages - 1 blocks: their table reads are issued together (lanes 4 i .. 4 i + 3
  // read block i's runs), so the first copies do not wait on one another.
  __device__ __forceinline__ void start(const DecodeParams& p, const PlanPart& plan, uint32_t s_base, uint32_t bars,
                                        int lane) {
    constexpr int kFirst = kStages - 1;
    Walk ws[kFirst];
    bool ok[kFirst];
    ok[0] = walk_from(p, plan, plan.b0, ws[0]);
#pragma unroll
    for (int i = 1; i < kFirst; ++i) {
      ws[i] = ws[i - 1];
      ok[i] = ok[i - 1] && walk_next(p, plan, ws[i]);
    }
    int mine = -1;
#pragma unroll
    for (int i = 0; i < kFirst; ++i) {
      if (lane >> 2 == i && ok[i]) mine = run_row(p, ws[i], lane & 3);
    }
#pragma unroll
    for (int i = 0; i < kFirst; ++i) {
      const int r = __shfl_sync(0xffffffffu, mine, 4 * i + (lane & 3));
      if (ok[i]) copy_block(p, ws[i], lane < 4 ? r : -1, s_base + i * kStageBytes, bars + 8 * i, lane);
    }
    w = ws[kFirst - 1];
    more = ok[kFirst - 1] && walk_next(p, plan, w);
    lookup(p, lane);
  }

  __device__ __forceinline__ void lookup(const DecodeParams& p, int lane) {
    row = more && lane < 4 ? run_row(p, w, lane) : -1;
  }

  // Copies the next block into `stage`, then steps on and reads the table for the one after.
  __device__ __forceinline__ void issue(const DecodeParams& p, const PlanPart& plan, uint32_t stage, uint32_t bar,
                                        int lane) {
    copy_block(p, w, row, stage, bar, lane);
    more = walk_next(p, plan, w);
    lookup(p, lane);
  }
};

// 2^k for an integer k in [-126, 127], exactly.
__device__ __forceinline__ float exp2i(int k) { return __int_as_float((k + 127) << 23); }

// The exponent e for which 2^e puts a row's max |q| (fp32 bits) into [2^14, 2^15): for a normal amax
// with biased exponent E, amax is in [2^(E - 127), 2^(E - 126)), so e = 141 - E (clamped to the normal
// range). 0 for a zero, infinite or NaN row; 126 for a subnormal one.
__device__ __forceinline__ int row_exponent(unsigned amax_bits) {
  const int E = static_cast<int>((amax_bits >> 23) & 0xffu);
  if (amax_bits == 0u || E == 0xff) return 0;
  return E == 0 ? 126 : min(max(141 - E, -126), 126);
}

template <typename QT, int kRG>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_fp8_direct_kernel(const __grid_constant__ DecodeParams p) {
  using T = Tile<kRG>;
  constexpr int kM = T::kM, kW = T::kW, kNT = T::kNT, kONT = T::kONT;
  // The combine kernel (a programmatic dependent) may be scheduled as SMs free up; it waits for this
  // whole grid before reading any partial.
  pdl_launch_dependents();
  extern __shared__ __align__(128) char smem[];
  const uint32_t s_base = smem_u32(smem);
  float* s_max = reinterpret_cast<float*>(smem + T::kMax);  // [row][warp column]
  float* s_sum = reinterpret_cast<float*>(smem + T::kSum);
  const uint32_t bars = s_base + T::kBar;

  const int m_tile = blockIdx.x, part = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int rg = warp / kW, wc = warp % kW;  // row group (rows 16 rg ..), warp column
  const int row0 = 16 * rg + g;              // this thread's rows: row0, row0 + 8
  const int pv_block = warp / 2;             // the scale block of this warp's P V dims

  const unsigned* row_max_bits = reinterpret_cast<const unsigned*>(smem + T::kRowMax);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(bars + 8 * s, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // The plan may be read before the wait (PlanPart). Launched as a programmatic dependent (launch_pdl):
  // nothing else written by an earlier kernel (q, the block table, the cache, the workspace the previous
  // combine may still read) is touched before this.
  const PlanPart plan(p, part);
  plan.warm(p);
  if (plan.empty()) return;  // before the wait (PlanPart::empty)
  pdl_wait();
  Loader ld;
  ld.more = false;
  bool loading = false;          // warp 0 has issued the first blocks
  int load_stage = kStages - 1;  // stage of the next block warp 0 loads
  int stage = 0;                 // stage of the next block consumed, and its mbarrier phase
  uint32_t phase = 0;

  for (int bi = plan.b0; bi <= plan.b1; ++bi) {
    int len, len_eff, blk_begin, n_iter;
    plan.piece(p, bi, len, len_eff, blk_begin, n_iter);
    const int limit[2] = {visible_keys(p, m_tile * kM + row0, len, len_eff),
                          visible_keys(p, m_tile * kM + row0 + 8, len, len_eff)};

    // ---- Q. The MMA k order is permuted alike for Q and K: k step (b, hh, j) of the latent part
    // (ks = 8 b + 4 hh + j) pairs a0 / a2 = dims 128 b + 32 t + 16 hh + 4 j + (0, 1) / (2, 3) with the
    // K fragment words read below; rope k step j (ks = 32 + j): dims 512 + 16 t + 4 j + (0, 1) / (2, 3).
    // The latent part is f16 times 2^e (e per row: the row's max |q| lands in [2^14, 2^15)).
    uint32_t qf[kRG == 1 ? kLatentBlocks : 1][2][4][4];  // kRG = 1: [b][hh][j][a0..a3]
    float c_lat[2];  // scale_log2 * 2^-e of rows row0, row0 + 8: takes the factor back out of S
    if (n_iter > 0) {
      // One pass over q: kTPR = 256 / kM consecutive threads share a row, chunk (16 bytes) c of it
      // going to thread c % kTPR; their shuffled max |q| goes to shared memory. 16 rows: the tile is
      // staged there too; 32 rows: each thread keeps its chunks for the fragments below.
      constexpr int kRowChunks = kDQK / 8;    // 72
      constexpr int kTPR = kThreads / kM;     // threads per row: 16 / 8
      constexpr int kPer = (kRowChunks + kTPR - 1) / kTPR;  // 5 / 9
      const int qrow = threadIdx.x / kTPR, qc0 = threadIdx.x % kTPR, qR = m_tile * kM + qrow;
      const QT* qsrc = nullptr;
      if (qR < p.rows) {
        const int s = qR / p.h_q, hh = qR - s * p.h_q;
        qsrc = static_cast<const QT*>(p.q) + bi * p.q_stride_b + s * p.q_stride_s + hh * p.q_stride_h;
      }
      uint4 v[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int c = qc0 + kTPR * i;
        v[i] = make_uint4(0u, 0u, 0u, 0u);
        if (c < kRowChunks && qsrc != nullptr) v[i] = __ldg(reinterpret_cast<const uint4*>(qsrc + 8 * c));
      }
      if (!loading) {  // the part's first loads, with this request's q loads already in flight
        loading = true;
        if (warp == 0) ld.start(p, plan, s_base, bars, lane);
      }
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int c = qc0 + kTPR * i;
        if (c >= kRowChunks) break;
        uint4 w = v[i];
        if (c < kDV / 8) {
          const uint32_t x[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const float2 f = to_float2<QT>(x[k]);
            amax = fmaxf(amax, fmaxf(fabsf(f.x), fabsf(f.y)));
          }
        } else {
          w = detail::q_to_bf16<QT>(w);  // rope: it meets the bf16 K rope (an fp16 q is rounded here)
        }
        v[i] = w;
        if constexpr (kRG == 1) *reinterpret_cast<uint4*>(smem + T::kQ + qrow * T::kQStride + 16 * c) = w;
      }
#pragma unroll
      for (int o = 1; o < kTPR; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      // The previous request's reads of these were before its last barrier.
      if (qc0 == 0) reinterpret_cast<unsigned*>(smem + T::kRowMax)[qrow] = __float_as_uint(amax);
      __syncthreads();  // the row maxima (and the 16-row tile)
#pragma unroll
      for (int h = 0; h < 2; ++h) c_lat[h] = p.scale_log2 * exp2i(-row_exponent(row_max_bits[row0 + 8 * h]));
      if constexpr (kRG == 1) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // h: row g / g + 8 (fragment registers a0, a2 / a1, a3)
          const float up = exp2i(row_exponent(row_max_bits[g + 8 * h]));
#pragma unroll
          for (int b = 0; b < kLatentBlocks; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) {  // dims 128 b + 32 t + 8 c .. : (hh, j) = (c / 2, 2 (c % 2) ..)
              const uint4 w = lds128(s_base + T::kQ + (g + 8 * h) * T::kQStride + 2 * (128 * b + 32 * t + 8 * c));
              const uint32_t x[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
              for (int jj = 0; jj < 2; ++jj) {
                const float2 lo = to_float2<QT>(x[2 * jj]), hi = to_float2<QT>(x[2 * jj + 1]);
                qf[b][c / 2][2 * (c % 2) + jj][h] = pack2<__half>(lo.x * up, lo.y * up);
                qf[b][c / 2][2 * (c % 2) + jj][2 + h] = pack2<__half>(hi.x * up, hi.y * up);
              }
            }
        }
      } else {
        // Each thread scatters its own chunks into per-lane fragments: word ((row group * 36 + ks) * 32
        // + lane) * 4 + r holds fragment register r (a0..a3) of that lane. Latent dim 128 b + 32 t +
        // 16 hh + 4 j + 2 hi (+ 0, 1) is in k step 8 b + 4 hh + j, rope dim 512 + 16 t + 4 j + 2 hi in k
        // step 32 + j; lane 4 g + t; r = 2 hi + (row / 8 % 2) for tile row 16 group + 8 (r % 2) + g.
        // With chunk c = qc0 + 8 i, everything but the base is a compile-time offset.
        uint32_t* frag = reinterpret_cast<uint32_t*>(smem + T::kQ);
        const int grp = qrow >> 4, rlo = (qrow >> 3) & 1, gg = qrow & 7;
        const float up = exp2i(row_exponent(__float_as_uint(amax)));
#pragma unroll
        for (int i = 0; i < kPer; ++i) {
          const int c = qc0 + kTPR * i;
          const uint32_t x[4] = {v[i].x, v[i].y, v[i].z, v[i].w};
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            const int d = 8 * c + 2 * m;  // this word's first dim
            int ks, tt;
            uint32_t word;
            if (c < kDV / 8) {
              ks = 8 * (d >> 7) + 4 * ((d >> 4) & 1) + ((d >> 2) & 3);
              tt = (d >> 5) & 3;
              const float2 f = to_float2<QT>(x[m]);
              word = pack2<__half>(f.x * up, f.y * up);
            } else {
              ks = 32 + (((d - kDV) >> 2) & 3);
              tt = (d - kDV) >> 4;
              word = x[m];  // rope: already bf16
            }
            const int r = 2 * ((d >> 1) & 1) + rlo;
            frag[((grp * kKSteps + ks) * 32 + 4 * gg + tt) * 4 + r] = word;
          }
        }
        __syncthreads();  // the fragments
      }
    }

    // O of m-tile m (rows 16 m + g, + 8), n-tile d, thread (g, t): columns 2 t, 2 t + 1 (see the P V step).
    float o[kRG][kONT][4];
#pragma unroll
    for (int m = 0; m < kRG; ++m)
#pragma unroll
      for (int d = 0; d < kONT; ++d) o[m][d][0] = o[m][d][1] = o[m][d][2] = o[m][d][3] = 0.f;
    // Running maxima of the P V rows 16 m + g + 8 h (every m-tile); sums of the S rows row0 + 8 h.
    float m_run[kRG][2], l_run[2] = {0.f, 0.f};
#pragma unroll
    for (int m = 0; m < kRG; ++m) m_run[m][0] = m_run[m][1] = -INFINITY;

    for (int it = 0; it < n_iter; ++it) {
      const int blk = blk_begin + it;
      const uint32_t sK = s_base + stage * kStageBytes;
      mbar_wait(bars + 8 * stage, phase);

      // ---- S for keys kKeys wc + 8 n + g (n-tile n, B operand column g) ----
      float acc[kNT][kLatentBlocks + 1][4];
#pragma unroll
      for (int n = 0; n < kNT; ++n)
#pragma unroll
        for (int b = 0; b <= kLatentBlocks; ++b) acc[n][b][0] = acc[n][b][1] = acc[n][b][2] = acc[n][b][3] = 0.f;
      const uint32_t krow = sK + (T::kKeys * wc + g) * kFp8TokenBytes;
      const uint32_t qfrag = s_base + T::kQ + (rg * kKSteps * 32 + lane) * 16;  // kRG = 2: + ks * 512
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
#pragma unroll
        for (int b = 0; b < kLatentBlocks; ++b) {
          uint32_t a[4][4];
          if constexpr (kRG == 1) {
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
              for (int r = 0; r < 4; ++r) a[j][r] = qf[b][hh][j][r];
          } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const uint4 q = lds128(qfrag + (8 * b + 4 * hh + j) * 512);
              a[j][0] = q.x, a[j][1] = q.y, a[j][2] = q.z, a[j][3] = q.w;
            }
          }
#pragma unroll
          for (int n = 0; n < kNT; ++n) {
            const uint4 kw = lds128(krow + 8 * n * kFp8TokenBytes + 128 * b + 32 * t + 16 * hh);
            const uint32_t w[4] = {kw.x, kw.y, kw.z, kw.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              uint32_t b0, b1;
              e4m3x4_to_f16(w[j], b0, b1);
              mma_f16(acc[n][b], a[j], b0, b1);
            }
          }
        }
      }
      {
        uint32_t a[4][4];
        if constexpr (kRG == 1) {
          const uint32_t qrow = s_base + T::kQ + g * T::kQStride + 2 * kDV + 32 * t;
          const uint4 qa = lds128(qrow), qb = lds128(qrow + 16);                                   // row g
          const uint4 qc = lds128(qrow + 8 * T::kQStride), qd = lds128(qrow + 8 * T::kQStride + 16);  // row g + 8
          const uint32_t aa[4][4] = {{qa.x, qc.x, qa.y, qc.y}, {qa.z, qc.z, qa.w, qc.w},
                                     {qb.x, qd.x, qb.y, qd.y}, {qb.z, qd.z, qb.w, qd.w}};
#pragma unroll
          for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) a[j][r] = aa[j][r];
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const uint4 q = lds128(qfrag + (32 + j) * 512);
            a[j][0] = q.x, a[j][1] = q.y, a[j][2] = q.z, a[j][3] = q.w;
          }
        }
#pragma unroll
        for (int n = 0; n < kNT; ++n) {
          const uint32_t kr = krow + 8 * n * kFp8TokenBytes + kDV + 16 + 32 * t;
          const uint4 r0 = lds128(kr), r1 = lds128(kr + 16);
          detail::mma_bf16(acc[n][kLatentBlocks], a[0], r0.x, r0.y);
          detail::mma_bf16(acc[n][kLatentBlocks], a[1], r0.z, r0.w);
          detail::mma_bf16(acc[n][kLatentBlocks], a[2], r1.x, r1.y);
          detail::mma_bf16(acc[n][kLatentBlocks], a[3], r1.z, r1.w);
        }
      }

      // ---- scores (log2 domain) of keys kKeys wc + 8 n + 2 t + (0, 1), rows row0, row0 + 8 ----
      float4 sc[kNT][2];
      float sv[kNT][4], mloc[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        const int kl = T::kKeys * wc + 8 * n + 2 * t;  // key within the block
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          const uint4 v = lds128(sK + (kl + k) * kFp8TokenBytes + kDV);
          sc[n][k] = make_float4(__uint_as_float(v.x), __uint_as_float(v.y), __uint_as_float(v.z), __uint_as_float(v.w));
          if (blk * kBlockN + kl + k >= len_eff) sc[n][k] = make_float4(0.f, 0.f, 0.f, 0.f);  // stale rows
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float4 s = sc[n][e & 1];
          float lat = acc[n][0][e] * s.x;
          lat = fmaf(acc[n][1][e], s.y, lat);
          lat = fmaf(acc[n][2][e], s.z, lat);
          lat = fmaf(acc[n][3][e], s.w, lat);
          const float val = fmaf(acc[n][kLatentBlocks][e], p.scale_log2, lat * c_lat[e >> 1]);
          sv[n][e] = blk * kBlockN + kl + (e & 1) < limit[e >> 1] ? val : -INFINITY;
          mloc[e >> 1] = fmaxf(mloc[e >> 1], sv[n][e]);
        }
      }
      detail::quad_max(mloc);
      if (t == 0) {
        s_max[row0 * kW + wc] = mloc[0];
        s_max[(row0 + 8) * kW + wc] = mloc[1];
      }
      __syncthreads();  // A: row maxima visible; every warp is done with the previous block (its stage, P)
      if (warp == 0 && ld.more) {
        ld.issue(p, plan, s_base + load_stage * kStageBytes, bars + 8 * load_stage, lane);
      }
      if (++load_stage == kStages) load_stage = 0;
      // Rows past len_eff hold stale bytes (never copied, or an earlier block's): the first row group's
      // warps zero the latent part of the rows they read as K (every warp has read K by now) before
      // barrier B, after which P V reads them as V.
      if (blk * kBlockN + kBlockN > len_eff && rg == 0) {
        for (int r = 0; r < T::kKeys; ++r) {
          if (blk * kBlockN + T::kKeys * wc + r >= len_eff) {
            *reinterpret_cast<uint4*>(smem + stage * kStageBytes + (T::kKeys * wc + r) * kFp8TokenBytes + 16 * lane) =
                make_uint4(0u, 0u, 0u, 0u);
          }
        }
        // The stage is refilled by TMA (the async proxy) later: order these writes before that.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      }
      float alpha[kRG][2], m_use[kRG][2];
#pragma unroll
      for (int m = 0; m < kRG; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float m_new = m_run[m][h];
#pragma unroll
          for (int w = 0; w < kW; ++w) m_new = fmaxf(m_new, s_max[(16 * m + g + 8 * h) * kW + w]);
          m_use[m][h] = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: avoid (-inf) - (-inf)
          alpha[m][h] = fast_exp2(m_run[m][h] - m_use[m][h]);
          m_run[m][h] = m_new;
        }
      // This warp's S rows are m-tile rg's.
      const float s_use[2] = {kRG == 1 || rg == 0 ? m_use[0][0] : m_use[kRG - 1][0],
                              kRG == 1 || rg == 0 ? m_use[0][1] : m_use[kRG - 1][1]};
      l_run[0] *= kRG == 1 || rg == 0 ? alpha[0][0] : alpha[kRG - 1][0];
      l_run[1] *= kRG == 1 || rg == 0 ? alpha[0][1] : alpha[kRG - 1][1];
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        float pr[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) pr[e] = fast_exp2(sv[n][e] - s_use[e >> 1]);
        l_run[0] += pr[0] + pr[1];
        l_run[1] += pr[2] + pr[3];
        // P_b = P * s_b[key] for each latent block b, f16, chunk kNT wc + n (8 keys) of rows row0, row0 + 8.
        const int chunk = kNT * wc + n;
#pragma unroll
        for (int b = 0; b < kLatentBlocks; ++b) {
          const float s0 = b == 0 ? sc[n][0].x : b == 1 ? sc[n][0].y : b == 2 ? sc[n][0].z : sc[n][0].w;
          const float s1 = b == 0 ? sc[n][1].x : b == 1 ? sc[n][1].y : b == 2 ? sc[n][1].z : sc[n][1].w;
          char* pb = smem + T::kP + b * T::kPBytes;
          *reinterpret_cast<uint32_t*>(pb + p_off(row0, chunk) + 4 * t) = pack2<__half>(pr[0] * s0, pr[1] * s1);
          *reinterpret_cast<uint32_t*>(pb + p_off(row0 + 8, chunk) + 4 * t) = pack2<__half>(pr[2] * s0, pr[3] * s1);
        }
      }
#pragma unroll
      for (int m = 0; m < kRG; ++m)
#pragma unroll
        for (int d = 0; d < kONT; ++d) {
          o[m][d][0] *= alpha[m][0];
          o[m][d][1] *= alpha[m][0];
          o[m][d][2] *= alpha[m][1];
          o[m][d][3] *= alpha[m][1];
        }
      __syncthreads();  // B: every P_b visible (and the zeroed rows)

      // ---- O[:, 64 warp ..] += P_b V^ (b = warp / 2). B fragment of n-tile d, column g = dim
      // 64 warp + 8 g + d: keys (2t, 2t+1) and (2t+8, 2t+9) of the 16-key step; each thread reads 8
      // consecutive bytes of those four keys, converted once for all m-tiles.
      {
        const uint32_t sP = s_base + T::kP + pv_block * T::kPBytes;
        const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;
        const int a_chunk = lane >> 4;
        const uint32_t vbase = sK + T::kDims * warp + 8 * g;
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[kRG][4];
#pragma unroll
          for (int m = 0; m < kRG; ++m) detail::ldsm_x4(sP + p_off(16 * m + a_row, 2 * kk + a_chunk), a[m]);
          const int k0 = 16 * kk + 2 * t;
          const uint2 va = lds64(vbase + k0 * kFp8TokenBytes), vb = lds64(vbase + (k0 + 1) * kFp8TokenBytes);
          const uint2 vc = lds64(vbase + (k0 + 8) * kFp8TokenBytes), vd = lds64(vbase + (k0 + 9) * kFp8TokenBytes);
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const uint32_t wa = q ? va.y : va.x, wb = q ? vb.y : vb.x, wcc = q ? vc.y : vc.x, wd = q ? vd.y : vd.x;
            // (key 2t, key 2t+1) byte pairs of dims 4 q + 0..3, and the same for keys 2t+8, 2t+9.
            uint32_t lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3;
            e4m3x4_to_f16(prmt(wa, wb, 0x5140), lo0, hi0);  // dims 4 q + 0, 1
            e4m3x4_to_f16(prmt(wa, wb, 0x7362), lo1, hi1);  // dims 4 q + 2, 3
            e4m3x4_to_f16(prmt(wcc, wd, 0x5140), lo2, hi2);
            e4m3x4_to_f16(prmt(wcc, wd, 0x7362), lo3, hi3);
#pragma unroll
            for (int m = 0; m < kRG; ++m) {
              mma_f16(o[m][4 * q + 0], a[m], lo0, lo2);
              mma_f16(o[m][4 * q + 1], a[m], hi0, hi2);
              mma_f16(o[m][4 * q + 2], a[m], lo1, lo3);
              mma_f16(o[m][4 * q + 3], a[m], hi1, hi3);
            }
          }
        }
      }
      if (++stage == kStages) {
        stage = 0;
        phase ^= 1;
      }
    }

    // ---- write this piece: out / lse directly, or a split partial to the workspace ----
    // Row sums: this thread's keys -> the warp's -> the row group's, in a fixed order.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    }
    // Double-buffered by request: a fast warp may write the next request's sums (which need not pass
    // another barrier first) while a slow one still reads these.
    float* sums = s_sum + (bi & 1) * kW * kM;
    if (t == 0) {
      sums[wc * kM + row0] = l_run[0];
      sums[wc * kM + row0 + 8] = l_run[1];
    }
    __syncthreads();
    bool direct;
    int slot;
    if (!plan.destination(p, bi, direct, slot)) continue;
    // Thread (g, t) holds, of rows 16 m + g + 8 h, the 16 consecutive dims 64 warp + 16 t + i: i < 8
    // from o[m][i][2 h], the rest from o[m][i - 8][2 h + 1].
    const int col = T::kDims * warp + 16 * t;
#pragma unroll
    for (int m = 0; m < kRG; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = 16 * m + g + 8 * h, R = m_tile * kM + row;
        if (R >= p.rows) continue;
        float l_tot = 0.f;
#pragma unroll
        for (int w = 0; w < kW; ++w) l_tot += sums[w * kM + row];
        const bool seen = l_tot > 0.f;
        const float inv = seen ? 1.f / l_tot : 0.f;
        const float lse2 = seen ? m_run[m][h] + __log2f(l_tot) : -INFINITY;
        float v[2 * kONT];
#pragma unroll
        for (int d = 0; d < kONT; ++d) {
          v[d] = o[m][d][2 * h] * inv;
          v[kONT + d] = o[m][d][2 * h + 1] * inv;
        }
        // Rows are 16-byte aligned (checked on the host), so the thread's 16 consecutive dims go out in
        // two 16-byte stores.
        QT* dst = detail::piece_row<QT>(p, bi, R, direct, slot) + col;
        static_assert(2 * kONT % 8 == 0, "whole 16-byte chunks");
#pragma unroll
        for (int d = 0; d < 2 * kONT; d += 8) detail::store_8<QT>(dst + d, v + d);
        if (warp == 0 && t == 0) detail::store_row_lse(p, bi, R, direct, slot, lse2);
      }
  }
}

template <typename QT, int kRG>
void launch(const DecodeParams& p, cudaStream_t stream) {
  auto kernel = mla_decode_fp8_direct_kernel<QT, kRG>;
  constexpr int smem = Tile<kRG>::kTotal;
  opt_in_dynamic_smem<mla_decode_fp8_direct_kernel<QT, kRG>>(smem);
  const dim3 grid((p.rows + Tile<kRG>::kM - 1) / Tile<kRG>::kM, p.num_sm_parts);
  launch_pdl(kernel, grid, dim3(kThreads), smem, stream, p);
  FS_CHECK_LAUNCH();
}

}  // namespace direct
}  // namespace flashseek::mla
