// The absorbed MLA's per-head projections at decode sizes: out[h, t, :] = a[h, t, :] @ w[h] for every
// head h, T <= kHeadGemvMaxT tokens, bf16 in and out, fp32 accumulation. With W_UK (q_nope [.., 128]
// -> q_lat [.., 512]) and W_UV^T (o_lat [.., 512] -> o [.., 128]), 16.8 MB of bf16 weights each at
// R1's 128 heads.
//
// Why a kernel: cuBLAS's batched GEMM took 8.2-8.4 us for each (2.0 TB/s) in the b=1 layer timeline
// (session 9) and, not being a programmatic dependent, let nothing overlap its launch. Here every CTA
// streams a 64-column slice of one head's weight (the first 16 rows a thread, i.e. all of it for
// K <= 512, read before griddepcontrol.wait: the weights are static, see rms_norm.cu), the head's
// token rows are staged in shared memory after the wait.
//
// CTA (column block of 64, head): 256 threads = 32 row groups x 8 column chunks of 8; thread (rg, c)
// accumulates rows k = rg + 32 i of its chunk for every token, in ascending k; the 4 row groups of a
// warp are summed with two xor shuffles (8, then 16) and the 8 warps' partials in warp order: a
// fixed order, so the result is deterministic (and equals torch.bmm's to fp32 rounding before the
// one bf16 rounding; the tests bound the difference).
#include <cuda_bf16.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "mla/mla_cache_token.cuh"
#include "mla/mla_params.h"

namespace flashseek::mla {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 64;      // output columns per CTA
constexpr int kRowGroups = 32;
constexpr int kChunk = 4;      // weight rows a thread has in flight after the first batch

// kPrefetch: weight rows a thread loads before griddepcontrol.wait (all of them for K <= 32 kPrefetch).
// Two CTAs an SM (at most 128 registers): W_UV^T's 256 CTAs then fit in one wave.
template <int kT, int kPrefetch>
__global__ void __launch_bounds__(kThreads, 2) head_gemv_kernel(const HeadGemvParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* sa = reinterpret_cast<__nv_bfloat16*>(smem);                 // [T][K]
  float* red = reinterpret_cast<float*>(smem + kT * p.K * 2);                  // [8 warps][kT][64]
  pdl_launch_dependents();
  const int tid = threadIdx.x, c = tid & 7, rg = tid >> 3, warp = tid >> 5, lane = tid & 31;
  const int h = blockIdx.y, n0 = blockIdx.x * kCols;
  const int rows = p.K / kRowGroups;  // per thread
  const __nv_bfloat16* wh = static_cast<const __nv_bfloat16*>(p.w) + int64_t(h) * p.w_hstride + n0 + 8 * c;
  auto load_w = [&](int i) {
    return __ldg(reinterpret_cast<const uint4*>(wh + int64_t(rg + kRowGroups * i) * p.N));
  };
  // The whole slice (K <= 512) is requested before the wait, so that none of it waits on a dependent
  // round trip after the previous kernel. With only the first 4 of W_UV^T's 16 rows a thread early it
  // ended 10.0 us after the MLA combine in the b=1 layer, now 8.7 (session 10 timelines): the CTAs
  // become resident only when the decode's CTAs, which hold every register of an SM, have left.
  uint4 wv[kPrefetch];
#pragma unroll
  for (int i = 0; i < kPrefetch; ++i) wv[i] = i < rows ? load_w(i) : make_uint4(0u, 0u, 0u, 0u);
  pdl_wait();
  // The head's token rows into shared memory (16-byte chunks).
  const __nv_bfloat16* ah = static_cast<const __nv_bfloat16*>(p.a) + int64_t(h) * p.a_hstride;
  const int kc = p.K / 8;
  for (int idx = tid; idx < p.T * kc; idx += kThreads) {
    const int t = idx / kc, j = idx - t * kc;
    *reinterpret_cast<uint4*>(sa + t * p.K + 8 * j) =
        *reinterpret_cast<const uint4*>(ah + int64_t(t) * p.a_tstride + 8 * j);
  }
  __syncthreads();

  float acc[kT][8];
#pragma unroll
  for (int t = 0; t < kT; ++t)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[t][j] = 0.f;
  // One weight row (8 columns) into every token's accumulators, rows in ascending k.
  auto fma_row = [&](const uint4& w, int i) {
    const int k = rg + kRowGroups * i;
    float wf[8];
    to_float8<__nv_bfloat16>(w, wf);
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      if (t < p.T) {
        const float av = __bfloat162float(sa[t * p.K + k]);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[t][j] = fmaf(av, wf[j], acc[t][j]);
      }
    }
  };
#pragma unroll
  for (int i = 0; i < kPrefetch; ++i) {
    if (i < rows) fma_row(wv[i], i);
  }
  // Rows past the early ones (K > kPrefetch * 32), kChunk loads in flight at a time.
  for (int i0 = kPrefetch; i0 < rows; i0 += kChunk) {
    uint4 wc[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) wc[i] = i0 + i < rows ? load_w(i0 + i) : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      if (i0 + i < rows) fma_row(wc[i], i0 + i);
    }
  }
  // lane = 8 * (rg % 4) + c: the warp's four row groups of chunk c are lanes c, c + 8, c + 16, c + 24.
#pragma unroll
  for (int t = 0; t < kT; ++t) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float v = acc[t][j];
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (lane < 8 && t < p.T) red[(warp * kT + t) * kCols + 8 * c + j] = v;
    }
  }
  __syncthreads();
  __nv_bfloat16* oh = static_cast<__nv_bfloat16*>(p.out) + int64_t(h) * p.o_hstride + n0;
  for (int o = tid; o < p.T * kCols; o += kThreads) {
    const int t = o / kCols, col = o - t * kCols;
    float s = 0.f;
#pragma unroll
    for (int w8 = 0; w8 < kThreads / 32; ++w8) s += red[(w8 * kT + t) * kCols + col];
    oh[int64_t(t) * p.o_tstride + col] = __float2bfloat16_rn(s);
  }
}

template <int kT>
void launch_t(const HeadGemvParams& p, cudaStream_t stream) {
  const size_t smem = size_t(kT) * p.K * 2 + size_t(kThreads / 32) * kT * kCols * 4;
  const dim3 grid(unsigned(p.N / kCols), unsigned(p.H));
  // The early rows live in registers beside kT x 8 accumulators: 16 rows for one or two tokens.
  constexpr int kDeep = kT <= 2 ? 16 : 32 / kT;
  if (p.K <= 4 * kRowGroups) {
    launch_pdl(head_gemv_kernel<kT, 4>, grid, dim3(kThreads), smem, stream, p);
  } else {
    launch_pdl(head_gemv_kernel<kT, kDeep>, grid, dim3(kThreads), smem, stream, p);
  }
}

}  // namespace

// FLASHSEEK_HEAD_GEMV=regs forces the register kernel below for every shape; by default a weight slice
// that fits in shared memory goes to mla_head_gemv_smem.cu (read on every call, so that one test process
// checks both).
static bool use_smem_kernel(const HeadGemvParams& p) {
  const char* s = std::getenv("FLASHSEEK_HEAD_GEMV");
  return !(s != nullptr && std::string(s) == "regs") && head_gemv_smem_cols(p.K, p.N) > 0;
}

void launch_head_gemv(const HeadGemvParams& p, cudaStream_t stream) {
  if (p.q != nullptr || use_smem_kernel(p)) {
    launch_head_gemv_smem(p, stream);
    return;
  }
  if (p.T < 0 || p.T > kHeadGemvMaxT || p.K <= 0 || p.K % kRowGroups != 0 || p.K > kHeadGemvMaxK || p.N <= 0 ||
      p.N % kCols != 0 || p.H < 0)
    throw std::invalid_argument("flashseek: mla_head_gemv parameters out of range");
  if (p.T == 0 || p.H == 0) return;
  // 16 tokens' accumulators next to the early rows spill (~1 KB a thread): above 8 tokens this kernel
  // runs in launches of 8, each reading the weights again (shapes that reach it have no room for a
  // slice in shared memory, so they are not R1's).
  for (int t0 = 0; t0 < p.T; t0 += 8) {
    HeadGemvParams c = p;
    c.T = p.T - t0 < 8 ? p.T - t0 : 8;
    c.a = static_cast<const __nv_bfloat16*>(p.a) + int64_t(t0) * p.a_tstride;
    c.out = static_cast<__nv_bfloat16*>(p.out) + int64_t(t0) * p.o_tstride;
    if (c.T == 1) {
      launch_t<1>(c, stream);
    } else if (c.T <= 2) {
      launch_t<2>(c, stream);
    } else if (c.T <= 4) {
      launch_t<4>(c, stream);
    } else {
      launch_t<8>(c, stream);
    }
  }
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek::mla
