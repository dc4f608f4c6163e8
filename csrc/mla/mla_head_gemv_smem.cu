// The absorbed MLA's per-head projections (mla_head_gemv.cu states the op) with each CTA's whole weight
// slice in shared memory: one CTA per (head, column slice), the slice [K, C] (R1: W_UK 128 x 512,
// W_UV^T 512 x 128, 128 KB) requested by TMA bulk copies before griddepcontrol.wait, so its HBM reads
// start the moment the CTA is resident, whatever the previous kernel still does.
//
// Why: in the b=1 decode layer the register kernel's CTAs could only start loading once the MLA
// decode's CTAs (every register of an SM) had left, then streamed W_UV^T in ~64 KB pieces per CTA over
// two CTAs an SM, and ended ~8.7 us after the combine (session 10 timeline). One 128 KB request per SM
// issued at residency is the shortest path to the bytes; the math is ~16 FMAs per weight row per token.
//
// The FP8 variant (N = 128: each head's output is one 1x128 block of the o_proj input) writes the e4m3
// row and its scale directly, bit-identical to quant_fp8_1x128 of the bf16 output: the bf16-rounded
// values, their amax over the block, fp8_block_quant.cuh's scale and conversion.
//
// CTA: 256 threads = `groups` row groups x C / 8 column chunks of 8; thread (g, ch) accumulates rows
// k = g + groups * i in ascending k for every token; the row groups' partials are summed in group order
// through shared memory (the weight area, reused): a fixed order, deterministic.
#include <cuda_bf16.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/fp8_block_quant.cuh"
#include "common/pdl.cuh"
#include "common/smem_sm90.cuh"
#include "mla/mla_cache_token.cuh"
#include "mla/mla_head_gemv_row.cuh"
#include "mla/mla_params.h"

namespace flashseek::mla {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxWeightBytes = 144 << 10;  // the slice; with T x K activations under 227 KB
constexpr int kMaxCols = 2048;                  // C / 8 column chunks must divide the 256 threads
static_assert(int64_t(kHeadGemvQuantMaxK) * 128 * 2 <= kMaxWeightBytes, "the FP8-output kernel takes whole heads");

// The weight area, reused for the row groups' partials: groups x T x C fp32 = 2048 T floats.
__host__ __device__ inline int64_t region_bytes(int K, int cols, int T) {
  const int64_t w = int64_t(K) * cols * 2, red = int64_t(kThreads) * 8 * T * 4;
  return w > red ? w : red;
}

template <int kT, bool kQuant>
__global__ void __launch_bounds__(kThreads) head_gemv_smem_kernel(const HeadGemvParams p, int cols) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = blockIdx.y, n0 = blockIdx.x * cols;
  const int64_t region = region_bytes(p.K, cols, kT);
  const uint32_t w_bytes = uint32_t(p.K) * cols * 2;
  __nv_bfloat16* sw = reinterpret_cast<__nv_bfloat16*>(smem);            // [K][cols]
  __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(smem + region);   // [T][K]
  const uint32_t bar = smem_u32(smem + region + int64_t(kT) * p.K * 2);
  pdl_launch_dependents();
  // The weights are static (as in rms_norm.cu): their copies go out before the PDL wait.
  if (warp == 0) {
    if (lane == 0) {
      mbar_init(bar, 1);
      asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
      mbar_arrive_expect_tx(bar, w_bytes);
    }
    __syncwarp();
    const __nv_bfloat16* wh = static_cast<const __nv_bfloat16*>(p.w) + int64_t(h) * p.w_hstride + n0;
    if (cols == p.N) {  // the head's rows are contiguous: one copy
      if (lane == 0) bulk_copy(smem_u32(sw), wh, w_bytes, bar);
    } else {
      for (int k = lane; k < p.K; k += 32) bulk_copy(smem_u32(sw + k * cols), wh + int64_t(k) * p.N, cols * 2, bar);
    }
  }
  pdl_wait();
  const __nv_bfloat16* ah = static_cast<const __nv_bfloat16*>(p.a) + int64_t(h) * p.a_hstride;
  const int kc = p.K / 8;
  for (int idx = tid; idx < p.T * kc; idx += kThreads) {
    const int t = idx / kc, j = idx - t * kc;
    *reinterpret_cast<uint4*>(sa + t * p.K + 8 * j) =
        *reinterpret_cast<const uint4*>(ah + int64_t(t) * p.a_tstride + 8 * j);
  }
  __syncthreads();  // also publishes the mbarrier's initialisation to every warp
  mbar_wait(bar, 0);

  const int chunks = cols / 8, groups = kThreads / chunks;
  const int ch = tid % chunks, g = tid / chunks;
  float acc[kT][8];
#pragma unroll
  for (int t = 0; t < kT; ++t)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[t][j] = 0.f;
  for (int k = g; k < p.K; k += groups) {
    fma_weight_row<kT>(acc, *reinterpret_cast<const uint4*>(sw + k * cols + 8 * ch), sa, p.K, p.T, k);
  }
  __syncthreads();  // every weight read is done: the area takes the partials [groups][kT][cols]
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    if (t < p.T) {
      float4* dst = reinterpret_cast<float4*>(red + (int64_t(g) * kT + t) * cols + 8 * ch);
      dst[0] = make_float4(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
      dst[1] = make_float4(acc[t][4], acc[t][5], acc[t][6], acc[t][7]);
    }
  }
  __syncthreads();
  if constexpr (!kQuant) {
    __nv_bfloat16* oh = static_cast<__nv_bfloat16*>(p.out) + int64_t(h) * p.o_hstride + n0;
    for (int o = tid; o < p.T * cols; o += kThreads) {
      const int t = o / cols, c = o - t * cols;
      float s = 0.f;
      for (int gg = 0; gg < groups; ++gg) s += red[(int64_t(gg) * kT + t) * cols + c];
      oh[int64_t(t) * p.o_tstride + c] = __float2bfloat16_rn(s);
    }
  } else {
    // cols == 128: warp w quantizes the blocks of tokens w, w + 8, ..., lane l its columns 4l..4l+3.
    for (int t = warp; t < p.T; t += kThreads / 32) {
      float v[4];
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = 4 * lane + i;
        float s = 0.f;
        for (int gg = 0; gg < groups; ++gg) s += red[(int64_t(gg) * kT + t) * cols + c];
        v[i] = __bfloat162float(__float2bfloat16_rn(s));  // the bf16 output quant_fp8_1x128 would read
        amax = max_nan(amax, fabsf(v[i]));
      }
      amax = group_amax<32>(amax, 0xffffffffu);
      const float sc = fp8_block_scale(amax, p.ue8m0);
      *reinterpret_cast<uint32_t*>(p.q + int64_t(t) * p.q_tstride + int64_t(h) * 128 + 4 * lane) =
          quantize4_e4m3(v[0], v[1], v[2], v[3], sc);
      if (lane == 0) p.scale[int64_t(h) * p.scale_ld + t] = sc;
    }
  }
}

template <int kT, bool kQuant>
void launch_t(const HeadGemvParams& p, int cols, cudaStream_t stream) {
  const size_t smem = size_t(region_bytes(p.K, cols, kT)) + size_t(kT) * p.K * 2 + 16;
  static std::once_flag attr_once[64];
  int device = 0;
  FS_CUDA_CHECK(cudaGetDevice(&device));
  std::call_once(attr_once[device % 64], [] {
    FS_CUDA_CHECK(cudaFuncSetAttribute(head_gemv_smem_kernel<kT, kQuant>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, 227 << 10));
  });
  launch_pdl(head_gemv_smem_kernel<kT, kQuant>, dim3(unsigned(p.N / cols), unsigned(p.H)), dim3(kThreads), smem,
             stream, p, cols);
}

template <bool kQuant>
void launch_q(const HeadGemvParams& p, int cols, cudaStream_t stream) {
  if (p.T == 1) {
    launch_t<1, kQuant>(p, cols, stream);
  } else if (p.T <= 2) {
    launch_t<2, kQuant>(p, cols, stream);
  } else if (p.T <= 4) {
    launch_t<4, kQuant>(p, cols, stream);
  } else if (p.T <= 8) {
    launch_t<8, kQuant>(p, cols, stream);
  } else {
    launch_t<16, kQuant>(p, cols, stream);
  }
}

}  // namespace

int head_gemv_smem_cols(int K, int N) {
  // The widest power-of-two multiple of 64 that divides N and whose [K, C] slice fits.
  int best = 0;
  for (int c = 64; c <= kMaxCols && c <= N; c *= 2) {
    if (N % c == 0 && int64_t(K) * c * 2 <= kMaxWeightBytes) best = c;
  }
  return best;
}

void launch_head_gemv_smem(const HeadGemvParams& p, cudaStream_t stream) {
  const int cols = head_gemv_smem_cols(p.K, p.N);
  if (p.T < 0 || p.T > kHeadGemvMaxT || p.K <= 0 || p.K % 32 != 0 || p.K > kHeadGemvMaxK || cols == 0 ||
      (p.q != nullptr && (p.N != 128 || cols != 128)))
    throw std::invalid_argument("flashseek: mla_head_gemv (shared-memory kernel) parameters out of range");
  if (p.T == 0 || p.H == 0) return;
  if (p.q != nullptr) {
    launch_q<true>(p, cols, stream);
  } else {
    launch_q<false>(p, cols, stream);
  }
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek::mla
