// The absorbed MLA's per-head projections (mla_head_gemv.cu states the op) with each CTA's whole weight
// slice in shared memory and the products on tensor cores: one CTA per (head, column slice), the slice
// [K, C] (R1: W_UK 128 x 512, W_UV^T 512 x 128, 128 KB) requested by cp.async before
// griddepcontrol.wait, so its HBM reads start the moment the CTA is resident, whatever the previous
// kernel still does.
//
// Why a CTA per slice: in the b=1 decode layer the register kernel's CTAs could only start loading once
// the MLA decode's CTAs (every register of an SM) had left, then streamed W_UV^T in ~64 KB pieces per CTA
// over two CTAs an SM, and ended ~8.7 us after the combine (session 10 timeline). One request per SM issued
// at residency is the shortest path to the bytes.
// Why tensor cores: the first version of this kernel multiplied on the FP32 pipe (one FMA per weight
// element and token) and was compute-bound past one token: W_UK 5.4 / 12.0 / 19.9 / 36.7 us at T = 1 / 4
// / 8 / 16 against cuBLAS's 4.7 at every T (graph replays, H100, session 13). mma.sync m16n8k16 takes 16
// tokens (zero rows past T) per instruction: the weight stream is the cost up to 64 tokens.
//
// The FP8 variant (N = 128: each head's output is one 1x128 block of the o_proj input) writes the e4m3
// row and its scale directly, bit-identical to quant_fp8_1x128 of the bf16 output: the bf16-rounded
// values, their amax over the block, fp8_block_quant.cuh's scale and conversion.
//
// Shared memory: the slice as [K][C] rows with 16-byte chunk c of row k at chunk c ^ (k % 8) (the 8 rows
// an ldmatrix reads then sit in 8 different bank groups), landing in four K quarters on four mbarriers
// so that the first k steps start before the last rows arrive. The tokens as [16 kMT][K] rows padded by
// 16 bytes, staged after the PDL wait, 16 kMT tokens at a time, by one TMA bulk copy a row on a fifth
// mbarrier (session 25, H200: -0.7 to -1.7 us a decode layer at b = 1 and 16 against every thread's loads,
// which queued behind its own weight cp.asyncs).
// The slice comes by every thread's cp.async (session 13, H100, docs/performance.md):
//   - bulk copies of one padded row each took 17.8 us for W_UV^T's 512 rows of 256 bytes (the TMA
//     unit's cost per copy), and one bulk copy of the whole slice cannot swizzle;
//   - a 3D TMA tensor map with the 128B swizzle matched cp.async alone but lost 4-5 us a decode layer
//     (cause not found; reverted);
//   - known cost of cp.async: a thread's later loads queue behind its own weight copies (ncu:
//     long-scoreboard stalls), which is why the token rows come by bulk copies.
// CTA: 8 warps, warp w owns columns [w C/8, (w+1) C/8) (for C = 64, warps 0-3 own 16 each) of every
// token: kNT16 x 16 columns, kMT x 16 tokens, every k in ascending 16-steps, so each output's sum has
// one fixed order (deterministic; both variants equal).
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/fp8_block_quant.cuh"
#include "common/pdl.cuh"
#include "common/smem_sm90.cuh"
#include "common/smem_opt_in.h"
#include "mla/mla_decode_kernel.cuh"
#include "mla/mla_params.h"
#include "mla/mla_rope_device.cuh"

namespace flashseek::mla {
namespace {

using detail::ldsm_x4;
using detail::ldsm_x4_t;
using detail::mma_bf16;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCols = 512;                   // 4 x 16 columns a warp: 64 fp32 accumulators per token tile
constexpr int64_t kMaxWeightBytes = 160 << 10;
constexpr int kSmemLimit = 227 << 10;
constexpr int kQuarters = 4;
static_assert(int64_t(kHeadGemvQuantMaxK) * 128 * 2 <= kMaxWeightBytes, "the FP8-output kernel takes whole heads");

__host__ __device__ inline int w_pitch(int cols) { return cols * 2; }  // bytes
__host__ __device__ inline int a_pitch(int K) { return K * 2 + 16; }
// Layout: weights | token rows (16 kMT) | per-(token, warp) amax (FP8 variant) | kQuarters mbarriers.
__host__ __device__ inline int64_t a_offset(int K, int cols) { return int64_t(K) * w_pitch(cols); }
__host__ __device__ inline int64_t amax_offset(int K, int cols, int mt) {
  return a_offset(K, cols) + int64_t(16 * mt) * a_pitch(K);
}
__host__ __device__ inline int64_t bar_offset(int K, int cols, int mt) {
  return amax_offset(K, cols, mt) + 16 * mt * kWarps * 4;
}
// mbarriers: the four weight quarters, then the token rows'.
constexpr int kBars = kQuarters + 1;
__host__ __device__ inline int64_t smem_bytes(int K, int cols, int mt) { return bar_offset(K, cols, mt) + kBars * 8; }

// k16 steps [quarter_begin(q), quarter_begin(q + 1)) land on mbarrier q (some quarters are empty for K < 64).
__host__ __device__ inline int quarter_begin(int steps, int q) { return steps * q / kQuarters; }

// kGlue (mla_absorb_rope_append): the MLA glue of mla_rope_norm_append runs beside the W_UK product, so
// that its kernel and one kernel boundary leave the decode step. CTA h (column slice 0) takes q_rope of
// head h for every token, and kv_token of tokens h + H w (+ 8 H i) on warp w. Their *_pre halves run
// before the PDL wait; the rest right after the token rows' copies are issued, so its loads overlap them.
struct GlueState {
  rope_dev::KvPre kv;
  rope_dev::QPre q;
};

template <bool kFp8>
__device__ __forceinline__ void glue_rest(const RopeNormAppendParams& r, int H, int h, int warp, int lane, int tid,
                                          const GlueState& pre) {
  using T = __nv_bfloat16;
  for (int t = h + H * warp, i = 0; t < r.tokens; t += H * kWarps, ++i)
    rope_dev::kv_token<T, T, kFp8>(r, i == 0 ? pre.kv : rope_dev::kv_pre<T>(r, t, lane), t, lane);
  for (int k = tid, i = 0; k < r.tokens * rope_dev::kThreadsPerHead; k += kThreads, ++i) {
    const int t = k / rope_dev::kThreadsPerHead, part = k % rope_dev::kThreadsPerHead;
    rope_dev::q_rope<T>(r, i == 0 ? pre.q : rope_dev::q_pre(r, t, part), t, h, part);
  }
}

// kGlue: 0 none, 1 with a bf16 cache, 2 with the FP8 cache.
template <int kMT, int kNT16, bool kQuant, int kGlue>
__global__ void __launch_bounds__(kThreads) head_gemv_smem_kernel(const HeadGemvParams p, int cols,
                                                                  const RopeNormAppendParams glue_p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = blockIdx.y, n0 = blockIdx.x * cols;
  const int steps = p.K / 16, wp = w_pitch(cols), ap = a_pitch(p.K);
  const uint32_t sw = smem_u32(smem), sa = smem_u32(smem + a_offset(p.K, cols));
  float* s_amax = reinterpret_cast<float*>(smem + amax_offset(p.K, cols, kMT));
  const uint32_t bars = smem_u32(smem + bar_offset(p.K, cols, kMT));
  pdl_launch_dependents();
  const uint32_t tok_bar = bars + 8 * kQuarters;
  if (tid < kQuarters) mbar_init(bars + 8 * tid, kThreads);  // every thread's cp.async arrival
  if (tid == kQuarters) mbar_init(tok_bar, 1);              // one arrival: warp 0 lane 0, with the bytes
  if (tid <= kQuarters) asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  __syncthreads();
  // The weights are static (as in rms_norm.cu): their copies go out before the PDL wait.
  {
    const __nv_bfloat16* wh = static_cast<const __nv_bfloat16*>(p.w) + int64_t(h) * p.w_hstride + n0;
    const int row_chunks = cols / 8, shift = __ffs(row_chunks) - 1;  // cols is a power of two
    for (int q = 0; q < kQuarters; ++q) {
      const int c_end = 16 * quarter_begin(steps, q + 1) * row_chunks;
      for (int idx = 16 * quarter_begin(steps, q) * row_chunks + tid; idx < c_end; idx += kThreads) {
        const int k = idx >> shift, c = idx & (row_chunks - 1);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(sw + k * wp + ((c ^ (k & 7)) << 4)),
                     "l"(wh + int64_t(k) * p.N + 8 * c)
                     : "memory");
      }
      asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bars + 8 * q) : "memory");
    }
  }
  [[maybe_unused]] GlueState glue{};
  [[maybe_unused]] const bool glue_cta = kGlue != 0 && blockIdx.x == 0;
  if constexpr (kGlue != 0) {
    if (glue_cta) {
      if (h + p.H * warp < glue_p.tokens) glue.kv = rope_dev::kv_pre<__nv_bfloat16>(glue_p, h + p.H * warp, lane);
      if (tid < glue_p.tokens * rope_dev::kThreadsPerHead)
        glue.q = rope_dev::q_pre(glue_p, tid / rope_dev::kThreadsPerHead, tid % rope_dev::kThreadsPerHead);
    }
  }
  pdl_wait();

  // Warp w's columns; with C = 64 only warps 0-3 have any.
  const int wcols = 16 * kNT16, wc0 = warp * wcols;
  const bool has_cols = wc0 < cols;
  const __nv_bfloat16* ah = static_cast<const __nv_bfloat16*>(p.a) + int64_t(h) * p.a_hstride;
  const int kc = p.K / 8;
  for (int t0 = 0; t0 < p.T; t0 += 16 * kMT) {
    if (t0 > 0) __syncthreads();  // every read of the previous token rows (and amax) is done
    // The rows come by TMA bulk copies, one a row, issued by warp 0. Not by this thread's loads: those
    // would queue behind its own weight cp.asyncs in the SM's load path (session 13's ncu profile of
    // the 16-token case: long-scoreboard and lg-throttle stalls). The copy engine is idle here. Rows
    // past T are zeros (plain stores): their outputs are never stored.
    const int rows = min(16 * kMT, p.T - t0);
    const uint32_t a_row_bytes = uint32_t(p.K) * 2;
    for (int idx = rows * kc + tid; idx < 16 * kMT * kc; idx += kThreads) {
      const int r = idx / kc, j = idx - r * kc;
      *reinterpret_cast<uint4*>(smem + a_offset(p.K, cols) + int64_t(r) * ap + 16 * j) = make_uint4(0, 0, 0, 0);
    }
    if (warp == 0) {
      // The previous pass's rows were read through the generic proxy (ldmatrix) before the barrier
      // above; the copies below overwrite them through the async proxy.
      if (t0 > 0) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      if (lane == 0) mbar_arrive_expect_tx(tok_bar, uint32_t(rows) * a_row_bytes);
      __syncwarp();
      for (int r = lane; r < rows; r += 32)
        bulk_copy(sa + r * ap, ah + int64_t(t0 + r) * p.a_tstride, a_row_bytes, tok_bar);
    }
    if constexpr (kGlue != 0) {
      if (t0 == 0 && glue_cta) glue_rest<kGlue == 2>(glue_p, p.H, h, warp, lane, tid, glue);
    }
    __syncthreads();  // the zero rows
    mbar_wait(tok_bar, uint32_t(t0 / (16 * kMT)) & 1u);

    float acc[kMT][kNT16][2][4];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int j = 0; j < kNT16; ++j)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[mi][j][e / 4][e % 4] = 0.f;
    if (has_cols) {
      // ldmatrix row addresses: lane l feeds row l % 8 of matrix l / 8. A k step moves 16 rows, which
      // keeps every row's swizzle (k % 8).
      const int q = lane / 8, r8 = lane % 8;
      const uint32_t a_lane = sa + ((q & 1) * 8 + r8) * ap + (q >> 1) * 16;  // tokens x k
      uint32_t w_lane[kNT16];                                                // k x columns
#pragma unroll
      for (int j = 0; j < kNT16; ++j)
        w_lane[j] = sw + ((q & 1) * 8 + r8) * wp + ((((wc0 + 16 * j) / 8 + (q >> 1)) ^ r8) << 4);
      for (int qt = 0; qt < kQuarters; ++qt) {
        if (t0 == 0) mbar_wait(bars + 8 * qt, 0);
        for (int s = quarter_begin(steps, qt); s < quarter_begin(steps, qt + 1); ++s) {
          uint32_t b[kNT16][4];
#pragma unroll
          for (int j = 0; j < kNT16; ++j) ldsm_x4_t(w_lane[j] + s * 16 * wp, b[j]);
#pragma unroll
          for (int mi = 0; mi < kMT; ++mi) {
            uint32_t a[4];
            ldsm_x4(a_lane + mi * 16 * ap + s * 32, a);
#pragma unroll
            for (int j = 0; j < kNT16; ++j) {
              mma_bf16(acc[mi][j][0], a, b[j][0], b[j][1]);
              mma_bf16(acc[mi][j][1], a, b[j][2], b[j][3]);
            }
          }
        }
      }
    }
    // Accumulator (mi, j, nt): rows t0 + 16 mi + lane / 4 (+ 8 for elements 2, 3), columns
    // wc0 + 16 j + 8 nt + 2 (lane % 4) (+ 1).
    if constexpr (!kQuant) {
      if (has_cols) {
        __nv_bfloat16* oh = static_cast<__nv_bfloat16*>(p.out) + int64_t(h) * p.o_hstride + n0 + wc0 + 2 * (lane % 4);
        // out needs only a unit last stride: pairs of columns are 4-byte aligned when the base and both
        // strides are even.
        const bool pairs = ((reinterpret_cast<uintptr_t>(p.out) | uint64_t(p.o_hstride | p.o_tstride) * 2) & 3) == 0;
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int t = t0 + 16 * mi + lane / 4 + 8 * half;
            if (t < p.T) {
#pragma unroll
              for (int j = 0; j < kNT16; ++j)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) {
                  __nv_bfloat16* o = oh + int64_t(t) * p.o_tstride + 16 * j + 8 * nt;
                  const __nv_bfloat162 v = __floats2bfloat162_rn(acc[mi][j][nt][2 * half], acc[mi][j][nt][2 * half + 1]);
                  if (pairs) {
                    *reinterpret_cast<__nv_bfloat162*>(o) = v;
                  } else {
                    o[0] = v.x;
                    o[1] = v.y;
                  }
                }
            }
          }
      }
    } else {
      // C = N = 128, kNT16 = 1: a token's block spans the 8 warps. Round to bf16 (the output
      // quant_fp8_1x128 would read), take each warp's amax over its 16 columns (a quad holds a row),
      // then every block's amax over the warps.
      static_assert(!kQuant || kNT16 == 1, "the FP8 variant runs C = 128");
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float m = 0.f;
#pragma unroll
          for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& v = acc[mi][0][nt][2 * half + e];
              v = __bfloat162float(__float2bfloat16_rn(v));
              m = max_nan(m, fabsf(v));
            }
          m = group_amax<4>(m, 0xffffffffu);
          if (lane % 4 == 0) s_amax[(16 * mi + lane / 4 + 8 * half) * kWarps + warp] = m;
        }
      __syncthreads();
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = 16 * mi + lane / 4 + 8 * half, t = t0 + r;
          if (t >= p.T) continue;
          float m = 0.f;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) m = max_nan(m, s_amax[r * kWarps + w]);
          const float sc = fp8_block_scale(m, p.ue8m0);
          uint8_t* qrow = p.q + int64_t(t) * p.q_tstride + int64_t(h) * 128 + wc0 + 2 * (lane % 4);
          const float x[4] = {acc[mi][0][0][2 * half], acc[mi][0][0][2 * half + 1], acc[mi][0][1][2 * half],
                              acc[mi][0][1][2 * half + 1]};
          uint32_t w[1];
          quantize_e4m3<4>(x, sc, w);
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) *reinterpret_cast<uint16_t*>(qrow + 8 * nt) = uint16_t(w[0] >> (16 * nt));
          if (warp == 0 && lane % 4 == 0) p.scale[int64_t(h) * p.scale_ld + t] = sc;
        }
    }
  }
}

template <int kMT, int kNT16, bool kQuant, int kGlue = 0>
void launch_t(const HeadGemvParams& p, int cols, cudaStream_t stream, const RopeNormAppendParams& r = {}) {
  opt_in_dynamic_smem<head_gemv_smem_kernel<kMT, kNT16, kQuant, kGlue>>(kSmemLimit);
  launch_pdl(head_gemv_smem_kernel<kMT, kNT16, kQuant, kGlue>, dim3(unsigned(p.N / cols), unsigned(p.H)),
             dim3(kThreads), size_t(smem_bytes(p.K, cols, kMT)), stream, p, cols, r);
}

// Token tiles per pass: enough for T (up to 4), fewer where the token rows would not fit beside the slice.
int token_tiles(int T, int K, int cols) {
  int mt = T <= 16 ? 1 : T <= 32 ? 2 : 4;
  while (mt > 1 && smem_bytes(K, cols, mt) > kSmemLimit) mt /= 2;
  return mt;
}

template <int kNT16, bool kQuant>
void launch_nt(const HeadGemvParams& p, int cols, cudaStream_t stream) {
  switch (token_tiles(p.T, p.K, cols)) {
    case 1: return launch_t<1, kNT16, kQuant>(p, cols, stream);
    case 2: return launch_t<2, kNT16, kQuant>(p, cols, stream);
    default: return launch_t<4, kNT16, kQuant>(p, cols, stream);
  }
}

}  // namespace

int head_gemv_smem_cols(int K, int N) {
  // The widest power-of-two multiple of 64 (up to 512) that divides N and whose [K, C] slice fits beside
  // one tile of 16 token rows.
  int best = 0;
  for (int c = 64; c <= kMaxCols && c <= N; c *= 2) {
    if (N % c == 0 && int64_t(K) * w_pitch(c) <= kMaxWeightBytes && smem_bytes(K, c, 1) <= kSmemLimit) best = c;
  }
  return best;
}

bool absorb_rope_append_fits(const HeadGemvParams& p) {
  return p.T >= 1 && p.T <= kAbsorbRopeAppendMaxT && p.N == kDV && p.q == nullptr && p.K % 32 == 0 &&
         head_gemv_smem_cols(p.K, p.N) == kDV;
}

void launch_absorb_rope_append(const HeadGemvParams& p, const RopeNormAppendParams& r, bool fp8_cache,
                               cudaStream_t stream) {
  if (!absorb_rope_append_fits(p) || r.tokens != p.T || r.heads != p.H || r.fp16_input != 0 ||
      r.weight_dtype != WeightDtype::kBFloat16)
    throw std::invalid_argument("flashseek: mla_absorb_rope_append parameters out of range");
  // T <= 16: one pass of token rows (kMT = 1); C = 512: four 16-column tiles a warp.
  if (fp8_cache) {
    launch_t<1, 4, false, 2>(p, kDV, stream, r);
  } else {
    launch_t<1, 4, false, 1>(p, kDV, stream, r);
  }
  FS_CHECK_LAUNCH();
}

void launch_head_gemv_smem(const HeadGemvParams& p, cudaStream_t stream) {
  const int cols = head_gemv_smem_cols(p.K, p.N);
  if (p.T < 0 || p.T > kHeadGemvMaxT || p.K <= 0 || p.K % 32 != 0 || p.K > kHeadGemvMaxK || cols == 0 ||
      (p.q != nullptr && (p.N != 128 || cols != 128)))
    throw std::invalid_argument("flashseek: mla_head_gemv (shared-memory kernel) parameters out of range");
  if (p.T == 0 || p.H == 0) return;
  if (p.q != nullptr) {
    launch_nt<1, true>(p, cols, stream);
  } else if (cols == 512) {
    launch_nt<4, false>(p, cols, stream);
  } else if (cols == 256) {
    launch_nt<2, false>(p, cols, stream);
  } else {
    launch_nt<1, false>(p, cols, stream);  // C = 128: a warp each; C = 64: warps 0-3
  }
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek::mla
