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

// a / b rounded as __fdiv_rn rounds it (IEEE, nearest even), without its range-check branch. The
// compiler's division is the hardware reciprocal and five FMAs (refinement, quotient, correction), then
// FCHK and a branch to a slow routine for operands that sequence cannot take. That branch sits after
// every division, so a thread quantizing 8 values runs its divisions one after another on a latency-bound
// kernel's critical path (H200, session 26: silu_mul_quant_fp8 at one token 1.82 -> 1.40 us a call,
// quant_fp8_1x128 and the norm quantizers -0.15 us; performance.md).
// Here the same sequence, as the compiler emits it, runs unconditionally, and `exact` says whether the
// operands lie where it is the IEEE quotient: both finite, normal and within 2^+-60 of 1, so that no
// intermediate overflows or underflows. That this range is inside the one FCHK passes is our reading
// (FCHK is undocumented); the bit-exact GPU tests of every quantizer against its reference check it.
// div_rn_n batches it: one check for all (the pattern of routing_device.cuh's sigmoid_ref, for reciprocals).
__device__ __forceinline__ float div_rn_unchecked(float a, float b, bool& exact) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  r = __fmaf_rn(r, __fmaf_rn(-b, r, 1.0f), r);
  const float q = __fmaf_rn(a, r, 0.0f);
  const float abs_a = fabsf(a), abs_b = fabsf(b);
  exact = abs_a >= 0x1p-60f && abs_a <= 0x1p60f && abs_b >= 0x1p-60f && abs_b <= 0x1p60f;
  return __fmaf_rn(r, __fmaf_rn(-b, q, a), q);
}

// q[i] = __fdiv_rn(a[i], b[i]) for kN quotients: the branch-free sequences side by side, then one
// branch (rarely taken: a zero, denormal, huge, infinite or NaN operand) that redoes them all.
template <int kN>
__device__ __forceinline__ void div_rn_n(const float (&a)[kN], const float (&b)[kN], float (&q)[kN]) {
  bool exact = true;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    bool ok;
    q[i] = div_rn_unchecked(a[i], b[i], ok);
    exact &= ok;
  }
  if (!exact) {
#pragma unroll
    for (int i = 0; i < kN; ++i) q[i] = __fdiv_rn(a[i], b[i]);
  }
}

// torch's silu(gate) * up, 8 values at once: gate / (1 + exp(-gate)) in fp32, then the product with up,
// never rounded to 16 bits (v holds gate on entry, the products on return).
__device__ __forceinline__ void silu_mul8(float (&v)[8], const float (&up)[8]) {
  float den[8], q[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) den[i] = 1.0f + expf(-v[i]);
  div_rn_n<8>(v, den, q);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(q[i], up[i]);
}

// Values already divided by their scale -> e4m3 bytes (RNE, SATFINITE; the first value in the low byte).
__device__ __forceinline__ uint32_t cvt2_e4m3(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ uint32_t cvt4_e4m3(float a, float b, float c, float d) {
  return cvt2_e4m3(a, b) | (cvt2_e4m3(c, d) << 16);
}

// kN values (a multiple of 4) -> e4m3 bytes, four a word (first value lowest): q = e4m3(x / s) with IEEE
// division, round-to-nearest-even; SATFINITE saturates to +-448 like the reference's clamp and keeps NaN.
template <int kN>
__device__ __forceinline__ void quantize_e4m3(const float (&x)[kN], float s, uint32_t (&w)[kN / 4]) {
  static_assert(kN % 4 == 0, "whole words");
  float sv[kN], q[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) sv[i] = s;
  div_rn_n<kN>(x, sv, q);
#pragma unroll
  for (int i = 0; i < kN / 4; ++i) w[i] = cvt4_e4m3(q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]);
}
__device__ __forceinline__ uint2 quantize8_e4m3(const float (&x)[8], float s) {
  uint32_t w[2];
  quantize_e4m3<8>(x, s, w);
  return make_uint2(w[0], w[1]);
}

}  // namespace flashseek
