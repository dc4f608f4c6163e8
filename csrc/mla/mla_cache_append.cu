// Writes new tokens into the paged latent cache: bf16 copy, or FP8 quantization (per 128 values
// scale = max(amax, 1e-4) / 448, q = e4m3(x / scale), the same fp32 operations as the reference so
// the bytes match). One warp per token; lane l owns latent values 16 l .. 16 l + 15.
#include "common/cuda_check.h"
#include "mla/mla_cache_token.cuh"
#include "mla/mla_params.h"

namespace flashseek::mla {
namespace {

constexpr int kTokensPerCta = 4;

template <typename T, bool kFp8>
__global__ void __launch_bounds__(kTokensPerCta * 32) mla_cache_append_kernel(const __grid_constant__ AppendParams p) {
  const int tok = blockIdx.x * kTokensPerCta + (threadIdx.x >> 5);
  if (tok >= p.tokens) return;
  const int64_t slot = p.slot_mapping[tok];
  // Negative slots are padding; slots past the cache are skipped (no host sync to report them).
  if (slot < 0 || slot >= p.capacity) return;
  const int lane = threadIdx.x & 31;
  const T* lat = static_cast<const T*>(p.latent) + tok * p.latent_stride + lane * 16;
  float x[16];
  to_float8<T>(*reinterpret_cast<const uint4*>(lat), x);
  to_float8<T>(*reinterpret_cast<const uint4*>(lat + 8), x + 8);
  float rope[8];
  if (lane < 8) {
    to_float8<T>(*reinterpret_cast<const uint4*>(static_cast<const T*>(p.k_rope) + tok * p.rope_stride + lane * 8), rope);
  }
  if constexpr (kFp8) {
    char* dst = static_cast<char*>(p.kv) + slot * kFp8TokenBytes;
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) amax = max_nan(amax, fabsf(x[i]));
    amax = group_amax<8>(amax, 0xffffffffu);  // 8 lanes hold one 128-value block
    const float scale = fp8_block_scale(amax);
    uint32_t w[4];
    quantize_e4m3<16>(x, scale, w);
    *reinterpret_cast<uint4*>(dst + lane * 16) = make_uint4(w[0], w[1], w[2], w[3]);
    if ((lane & 7) == 0) *reinterpret_cast<float*>(dst + kFp8ScaleOffset + 4 * (lane >> 3)) = scale;
    if (lane < 8) *reinterpret_cast<uint4*>(dst + kFp8RopeOffset + lane * 16) = to_bf16x8(rope);
  } else {
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(p.kv) + slot * kDQK;
    *reinterpret_cast<uint4*>(dst + lane * 16) = to_bf16x8(x);
    *reinterpret_cast<uint4*>(dst + lane * 16 + 8) = to_bf16x8(x + 8);
    if (lane < 8) *reinterpret_cast<uint4*>(dst + kDV + lane * 8) = to_bf16x8(rope);
  }
}

template <typename T>
void launch_typed(const AppendParams& p, bool fp8_cache, cudaStream_t stream) {
  const dim3 grid((p.tokens + kTokensPerCta - 1) / kTokensPerCta);
  if (fp8_cache) {
    mla_cache_append_kernel<T, true><<<grid, kTokensPerCta * 32, 0, stream>>>(p);
  } else {
    mla_cache_append_kernel<T, false><<<grid, kTokensPerCta * 32, 0, stream>>>(p);
  }
  FS_CHECK_LAUNCH();
}

}  // namespace

void launch_cache_append(const AppendParams& p, bool fp8_cache, cudaStream_t stream) {
  if (p.tokens == 0) return;
  if (p.fp16_input) {
    launch_typed<__half>(p, fp8_cache, stream);
  } else {
    launch_typed<__nv_bfloat16>(p, fp8_cache, stream);
  }
}

}  // namespace flashseek::mla
