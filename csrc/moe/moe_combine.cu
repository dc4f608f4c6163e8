// moe_combine: the weighted sum of each token's expert rows plus the shared expert, in one pass.
//
// A thread owns 8 columns (16-byte loads and stores). Deterministic by construction: the k terms
// are added in ascending j, each as a separate fp32 multiply and add (no fma contraction, no
// atomics), which is also exactly the reference's arithmetic, so the output is bit-identical.
// The k expert rows of a token are loaded before the first add to keep k loads in flight.
#include <cuda_bf16.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "moe/moe.h"

namespace flashseek {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ void add_row(float (&acc)[8], const uint4 raw, float w) {
  const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h2[i]);
    acc[2 * i] = __fadd_rn(acc[2 * i], __fmul_rn(w, f.x));
    acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], __fmul_rn(w, f.y));
  }
}

__global__ void __launch_bounds__(kThreads) moe_combine_kernel(const MoeCombineParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t t = blockIdx.x;
  const int64_t col = (int64_t(blockIdx.y) * kThreads + threadIdx.x) * 8;
  if (col >= p.H) return;
  const int32_t* slots = p.token_slots + t * p.ts_stride;
  const float* w = p.weights + t * p.w_stride;

  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  const __nv_bfloat16* eo = static_cast<const __nv_bfloat16*>(p.expert_out);
  for (int j0 = 0; j0 < p.topk; j0 += 8) {
    uint4 raw[8];
    float wj[8];
    bool ok[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int j = j0 + u;
      const int64_t row = j < p.topk ? int64_t(__ldg(slots + j)) : -1;
      ok[u] = row >= 0 && row < p.rows;
      wj[u] = ok[u] ? __ldg(w + j) : 0.0f;
      raw[u] = ok[u] ? __ldg(reinterpret_cast<const uint4*>(eo + row * p.eo_stride + col)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (ok[u]) add_row(acc, raw[u], wj[u]);
    }
  }
  if (p.shared_out) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(p.shared_out) +
                                                           t * p.sh_stride + col));
    const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h2[i]);
      acc[2 * i] = __fadd_rn(acc[2 * i], f.x);
      acc[2 * i + 1] = __fadd_rn(acc[2 * i + 1], f.y);
    }
  }
  uint4 res;
  __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&res);
#pragma unroll
  for (int i = 0; i < 4; ++i) o2[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
  *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + t * p.out_stride + col) = res;
}

}  // namespace

void launch_moe_combine(const MoeCombineParams& p, cudaStream_t stream) {
  if (p.T == 0 || p.H == 0) return;
  const dim3 grid(unsigned(p.T), unsigned((p.H / 8 + kThreads - 1) / kThreads));
  launch_pdl(moe_combine_kernel, grid, dim3(kThreads), 0, stream, p);
}

}  // namespace flashseek
