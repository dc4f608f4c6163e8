// DeepSeek FP8 1x128 block quantization: the arithmetic shared by every kernel that writes e4m3
// blocks (activation quantization, MoE dispatch, the FP8 MLA cache). flashseek/ref/quant.py is the
// specification; one copy of the arithmetic keeps those kernels bit-identical to it and to each other.
#pragma once
#include <cuda_fp8.h>

#include <cstdint>

namespace flashseek {

// torch.amax propagates NaN; fmaxf would drop it.
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// Max of `v` over groups of kLanes consecutive lanes (kLanes a power of two, every lane of `mask`
// present); every lane of a group gets its group's max.
template <int kLanes>
__device__ __forceinline__ float group_amax(float v, unsigned mask) {
#pragma unroll
  for (int off = kLanes / 2; off >= 1; off >>= 1) v = max_nan(v, __shfl_xor_sync(mask, v, off));
  return v;
}

// The exact smallest power of two >= s (the reference computes the same with frexp).
__device__ __forceinline__ float ceil_pow2(float s) {
  uint32_t bits = __float_as_uint(s);
  if ((bits & 0x7f800000u) == 0x7f800000u) return s;  // inf / nan stay
  if (bits & 0x007fffffu) bits = (bits & 0xff800000u) + 0x00800000u;
  return __uint_as_float(bits);
}

// s = max(amax, 1e-4) / 448 with IEEE division; ue8m0 rounds s up to a power of two.
__device__ __forceinline__ float fp8_block_scale(float amax, bool ue8m0 = false) {
  const float s = __fdiv_rn(max_nan(amax, 1e-4f), 448.0f);
  return ue8m0 ? ceil_pow2(s) : s;
}

// Four values -> four e4m3 bytes in one word (first value in the low byte): q = e4m3(x / s) with
// IEEE division, round-to-nearest-even; SATFINITE saturates to +-448 like the reference's clamp
// and keeps NaN.
__device__ __forceinline__ uint32_t quantize4_e4m3(float a, float b, float c, float d, float s) {
  const __nv_fp8x2_storage_t lo =
      __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(a, s), __fdiv_rn(b, s)), __NV_SATFINITE, __NV_E4M3);
  const __nv_fp8x2_storage_t hi =
      __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(c, s), __fdiv_rn(d, s)), __NV_SATFINITE, __NV_E4M3);
  return uint32_t(lo) | (uint32_t(hi) << 16);
}

}  // namespace flashseek
