// FP8 1x128 activation quantization, plain and fused with silu(gate) * up.
//
// Layout of the work: 16 consecutive lanes own one (row, 128-channel block); each lane loads 8
// channels with one 16-byte load (two for silu_mul), the half-warp reduces the amax with shuffles,
// then each lane writes 8 e4m3 bytes. The math is the reference's, step for step, so the result is
// bit-identical: s = max(amax, 1e-4) / 448 with IEEE division, q = e4m3_rne_satfinite(x / s).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "common/cuda_check.h"
#include "common/fp8_block_quant.cuh"
#include "common/pdl.cuh"
#include "quant/quant.h"

namespace flashseek {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerBlock = 16;  // 16 lanes x 8 channels = one 128-channel scale block

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 f = __half22float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}


template <typename T, bool kSiluMul>
__global__ void __launch_bounds__(kThreads) quant_fp8_1x128_kernel(QuantFp8Params p) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t kb_count = p.n / 128;
  const int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  // m * kb_count * 16 threads are needed; a half-warp is either entirely in range or entirely out,
  // so the half-warp shuffles below never see an exited lane.
  if (t >= p.m * kb_count * kLanesPerBlock) return;
  const int64_t g = t / kLanesPerBlock;
  const int lane = int(t % kLanesPerBlock);
  const int64_t row = g / kb_count;
  const int64_t kb = g - row * kb_count;
  const int64_t col = kb * 128 + lane * 8;
  if (p.masked_m != nullptr) {  // uniform over the half-warp: it shares the row
    const int64_t group = row / p.rows_per_group;
    if (row - group * p.rows_per_group >= __ldg(p.masked_m + group)) return;
  }

  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride + col;
  float v[8];
  if constexpr (kSiluMul) {
    float u[8];
    load8(x, v);
    load8(x + p.n, u);
    silu_mul8(v, u);  // torch's silu in fp32, the product with up never rounded to 16 bits
  } else {
    load8(x, v);
  }

  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = max_nan(amax, fabsf(v[i]));
  amax = group_amax<kLanesPerBlock>(amax, 0xffffu << (threadIdx.x & 16));
  const float s = fp8_block_scale(amax, p.ue8m0);
  uint8_t* out = static_cast<uint8_t*>(p.out) + row * p.n + col;
  *reinterpret_cast<uint2*>(out) = quantize8_e4m3(v, s);
  if (lane == 0) p.scale[kb * p.scale_ld + row] = s;
}

template <bool kSiluMul>
void launch(const QuantFp8Params& p, cudaStream_t stream) {
  const int64_t threads = p.m * (p.n / 128) * kLanesPerBlock;
  if (threads == 0) return;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  // A programmatic dependent launch: the decode GEMMs around it (the MoE's silu_mul step sits between
  // two) overlap their launches with each other's tails.
  if (p.fp16) {
    launch_pdl(quant_fp8_1x128_kernel<__half, kSiluMul>, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, p);
  } else {
    launch_pdl(quant_fp8_1x128_kernel<__nv_bfloat16, kSiluMul>, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, p);
  }
}

}  // namespace

void launch_quant_fp8_1x128(const QuantFp8Params& p, cudaStream_t stream) { launch<false>(p, stream); }
void launch_silu_mul_quant_fp8(const QuantFp8Params& p, cudaStream_t stream) { launch<true>(p, stream); }

}  // namespace flashseek
