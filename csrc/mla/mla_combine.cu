// Merges the split-KV partials (o normalized per split, lse in log2) of requests with more than one
// split: out = sum_i 2^(lse_i - lse) o_i, lse = log2 sum_i 2^lse_i (stored as a natural log).
// One warp per packed row; each lane owns 16 of the 512 dims (four coalesced float4 columns).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_check.h"
#include "mla/mla_params.h"

namespace flashseek::mla {
namespace {

constexpr int kRowsPerCta = 4;

__device__ __forceinline__ void store4(__nv_bfloat16* dst, float4 v) {
  __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u = make_uint2(*reinterpret_cast<uint32_t*>(&a), *reinterpret_cast<uint32_t*>(&b));
  *reinterpret_cast<uint2*>(dst) = u;
}
__device__ __forceinline__ void store4(__half* dst, float4 v) {
  __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
  uint2 u = make_uint2(*reinterpret_cast<uint32_t*>(&a), *reinterpret_cast<uint32_t*>(&b));
  *reinterpret_cast<uint2*>(dst) = u;
}

template <typename QT>
__global__ void __launch_bounds__(kRowsPerCta * 32) mla_combine_kernel(const __grid_constant__ DecodeParams p) {
  const int bi = blockIdx.y;
  const int* per_req = p.plan + kPlanPartInts * p.num_sm_parts;
  const int n = per_req[2 * bi + 1], base = per_req[2 * bi];
  if (n <= 1) return;  // written by the decode kernel directly
  if (base < 0 || base + n > workspace_slots(p.num_sm_parts)) return;  // inconsistent plan
  const int R = blockIdx.x * kRowsPerCta + (threadIdx.x >> 5);
  if (R >= p.rows) return;
  const int lane = threadIdx.x & 31;
  const float* lse_in = p.ws_lse + static_cast<int64_t>(base) * p.rows + R;

  float m = -INFINITY;
  for (int i = lane; i < n; i += 32) m = fmaxf(m, lse_in[static_cast<int64_t>(i) * p.rows]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.f;
  if (m != -INFINITY) {
    for (int i = lane; i < n; i += 32) sum += exp2f(lse_in[static_cast<int64_t>(i) * p.rows] - m);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float lse2 = m == -INFINITY ? -INFINITY : m + log2f(sum);

  float4 acc[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (lse2 != -INFINITY) {
    for (int i = 0; i < n; ++i) {
      const float w = exp2f(lse_in[static_cast<int64_t>(i) * p.rows] - lse2);
      const float* src = p.ws_o + (static_cast<int64_t>(base + i) * p.rows + R) * kDV + lane * 4;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float4 v = *reinterpret_cast<const float4*>(src + k * 128);
        acc[k].x += w * v.x;
        acc[k].y += w * v.y;
        acc[k].z += w * v.z;
        acc[k].w += w * v.w;
      }
    }
  }
  const int s = R / p.h_q, h = R - s * p.h_q;
  QT* dst = static_cast<QT*>(p.out) + bi * p.o_stride_b + s * p.o_stride_s + h * p.o_stride_h + lane * 4;
#pragma unroll
  for (int k = 0; k < 4; ++k) store4(dst + k * 128, acc[k]);
  if (lane == 0) p.lse[(static_cast<int64_t>(bi) * p.h_q + h) * p.s_q + s] = lse2 * 0.69314718055994531f;
}

}  // namespace

void launch_combine(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0 || p.ws_o == nullptr) return;
  const dim3 grid((p.rows + kRowsPerCta - 1) / kRowsPerCta, p.batch);
  if (q_fp16) {
    mla_combine_kernel<__half><<<grid, kRowsPerCta * 32, 0, stream>>>(p);
  } else {
    mla_combine_kernel<__nv_bfloat16><<<grid, kRowsPerCta * 32, 0, stream>>>(p);
  }
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek::mla
