// The MoE router's logits for decode-sized batches: out[t, e] = sum_k x[t, k] * w[e, k] in fp32, from
// bf16 hidden rows and a bf16 gate weight (R1: 256 x 7168, 3.7 MB).
//
// Why a kernel: at T = 1 the model's bf16 matmul took three launches (cuBLAS split-K GEMV, its
// reduction, the fp32 conversion: 8.2 us in the b=1 MoE layer timeline, session 9) for a 1.2 us
// weight read. Here: one launch, every SM streaming a slice of the weight. Only for T <= 4
// (routing.h): each CTA re-reads every token row, which loses to a GEMM from T = 8 on.
//
// Grid: one CTA per kRows expert rows (R1: 128 CTAs), 8 warps splitting H in units of 256 columns
// (32 lanes x 8); the warp's first kUnitsAhead units of weight are requested before
// griddepcontrol.wait (the gate weight is never written by a kernel that triggers its dependents
// early: see rms_norm.cu), the token rows after it. Products of bf16 values are exact in fp32;
// each lane accumulates its 8 columns of a unit in order, units in order, then a butterfly over the
// lanes and the warps' partials summed in warp order: deterministic, and within fp32 rounding of
// the exact sum (the reference, flashseek/ref/routing.py router_logits, is an fp32 matmul; the
// tests bound the difference by the sum of |x w| terms).
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "routing/routing.h"

namespace flashseek {
namespace {

constexpr int kRows = 2;
constexpr int kWarps = 8;
constexpr int kUnit = 256;       // columns per warp step
constexpr int kUnitsAhead = 4;   // units per warp whose weights are in flight at once (R1: all 28 / 8)

__device__ __forceinline__ void dot8(const uint4& w, const uint4& x, float& acc) {
  const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&w);
  const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __bfloat1622float2(wp[i]), b = __bfloat1622float2(xp[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

template <int kT>
__global__ void __launch_bounds__(kWarps * 32, 1) router_logits_kernel(const RouterLogitsParams p) {
  __shared__ float part[kWarps][kRows][kT];
  pdl_launch_dependents();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int e0 = blockIdx.x * kRows;
  const int units = (p.H + kUnit - 1) / kUnit;
  const __nv_bfloat16* w = static_cast<const __nv_bfloat16*>(p.weight);
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.hidden);

  float acc[kRows][kT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int t = 0; t < kT; ++t) acc[r][t] = 0.f;

  bool waited = false;
  for (int base = warp; base < units; base += kWarps * kUnitsAhead) {
    uint4 wv[kUnitsAhead][kRows];
#pragma unroll
    for (int i = 0; i < kUnitsAhead; ++i) {
      const int col = (base + i * kWarps) * kUnit + lane * 8;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        wv[i][r] = make_uint4(0u, 0u, 0u, 0u);
        if (col < p.H && e0 + r < p.E)
          wv[i][r] = __ldg(reinterpret_cast<const uint4*>(w + int64_t(e0 + r) * p.w_stride + col));
      }
    }
    if (!waited) {  // the first weights are on their way: now the tokens may be read
      pdl_wait();
      waited = true;
    }
#pragma unroll
    for (int i = 0; i < kUnitsAhead; ++i) {
      const int col = (base + i * kWarps) * kUnit + lane * 8;
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        if (t < p.T && col < p.H) {
          const uint4 xv = *reinterpret_cast<const uint4*>(x + int64_t(t) * p.x_stride + col);
#pragma unroll
          for (int r = 0; r < kRows; ++r) dot8(wv[i][r], xv, acc[r][t]);
        }
      }
    }
  }
  if (!waited) pdl_wait();  // a warp without columns (H < 8 * 256) still orders its stores

#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int t = 0; t < kT; ++t) {
      float v = acc[r][t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) part[warp][r][t] = v;
    }
  __syncthreads();
  if (threadIdx.x < kRows * kT) {
    const int r = threadIdx.x / kT, t = threadIdx.x % kT;
    if (t < p.T && e0 + r < p.E) {
      float s = 0.f;
#pragma unroll
      for (int wi = 0; wi < kWarps; ++wi) s += part[wi][r][t];
      p.out[int64_t(t) * p.out_stride + e0 + r] = s;
    }
  }
}

}  // namespace

void launch_router_logits(const RouterLogitsParams& p, cudaStream_t stream) {
  if (p.T < 0 || p.T > kRouterLogitsMaxT || p.E < 0 || p.H < 0 || p.H % 8 != 0)
    throw std::invalid_argument("flashseek: router_logits parameters out of range");
  if (p.T == 0 || p.E == 0) return;
  const dim3 grid(unsigned((p.E + kRows - 1) / kRows)), block(kWarps * 32);
  if (p.T <= 1) {
    launch_pdl(router_logits_kernel<1>, grid, block, 0, stream, p);
  } else if (p.T <= 2) {
    launch_pdl(router_logits_kernel<2>, grid, block, 0, stream, p);
  } else {
    launch_pdl(router_logits_kernel<4>, grid, block, 0, stream, p);
  }
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek
