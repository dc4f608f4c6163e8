// Device helpers for the tokens of the paged latent cache, shared by the kernels that write it
// (mla_cache_append.cu, mla_rope_norm_append.cu). Layouts: mla_params.h and flashseek/ref/mla.py.
//   bf16 token: 512 latent | 64 rope, bf16.
//   FP8 token (656 bytes): 512 e4m3 latent | 4 fp32 scales (one per 128 latent values) | 64 bf16 rope.
// The block quantization arithmetic itself is common/fp8_block_quant.cuh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "common/fp8_block_quant.cuh"
#include "mla/mla_params.h"

namespace flashseek::mla {

constexpr int kFp8ScaleOffset = kDV;       // byte offset of the 4 fp32 scales in an FP8 token
constexpr int kFp8RopeOffset = kDV + 16;   // byte offset of the 64 bf16 rope values

// Two packed 16-bit values (bf16 or half; the first in the low half) -> fp32.
template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t w) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  }
}

// Eight 16-bit values in one 16-byte word -> fp32.
template <typename T>
__device__ __forceinline__ void to_float8(uint4 v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = to_float2<T>(w[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

// Two fp32 -> two T rounded to nearest even (torch's .to(dtype)), packed first-low.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float* f) {
  return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]), pack2<T>(f[6], f[7]));
}

__device__ __forceinline__ uint4 to_bf16x8(const float* f) { return pack8<__nv_bfloat16>(f); }

}  // namespace flashseek::mla
