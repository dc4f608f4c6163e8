// Device building blocks of the MoE dispatch quantization (moe_quant.cu), shared with the kernels
// that quantize token rows themselves (moe_route_dispatch.cu): one copy of the code gives the same
// bytes. The arithmetic itself is common/fp8_block_quant.cuh (flashseek/ref/quant.py step for step).
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "common/fp8_block_quant.cuh"

namespace flashseek {
namespace moe_dev {

struct QuantizedChunk {
  uint2 q;      // 8 e4m3 values
  float scale;  // the block's scale (valid in every lane of the half-warp)
};

// One 128-column block of a bf16 row on a half-warp (lanes 0-15 or 16-31 of a 1-D block): raw =
// this lane's 8 bf16 (columns 8 * (lane % 16) ..; zeros for a missing row). The block amax takes
// four xor-shuffles that stay inside the half-warp, so the other half may have left. ue8m0: the
// scale rounded up to a power of two (fp8_block_scale), as quant_fp8_1x128 with ue8m0.
__device__ __forceinline__ QuantizedChunk quantize_chunk(const uint4 raw, bool ue8m0) {
  const unsigned half = 0xffffu << (threadIdx.x & 16);
  float v[8];
  const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h2[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) amax = max_nan(amax, fabsf(v[i]));
  amax = group_amax<16>(amax, half);
  QuantizedChunk c;
  c.scale = fp8_block_scale(amax, ue8m0);
  c.q = quantize8_e4m3(v, c.scale);
  return c;
}

}  // namespace moe_dev
}  // namespace flashseek
