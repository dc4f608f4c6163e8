// The per-token and per-head pieces of the MLA pre-attention glue (spec: flashseek/ref/mla.py,
// mla_rope_norm_append), shared by mla_rope_norm_append's own kernel and the W_UK projection that
// runs them beside its GEMV (mla_head_gemv_smem.cu, mla_absorb_rope_append):
//   kv_pre / kv_token: one warp per token: latent = rms_norm(kv[:512]) * w and k_pe = rope(kv[512:]),
//     both rounded to the input dtype, stored to the token's cache slot (bf16, or FP8-quantized per 128
//     values from the rounded latent, exactly as mla_cache_append stores them). Negative slots (padding)
//     and slots past the cache are skipped.
//   q_pre / q_rope: 8 threads per (token, head), 8 values (4 pairs) each: q_out = rope(q_pe), rounded
//     to the input dtype.
// The *_pre halves read only step metadata, tables and weights, so kernels call them before their PDL
// wait; the other halves read the projections' outputs.
//
// Exactness. Rope is two fp32 products and a sum/difference with no FMA contraction (__fmul_rn,
// __fsub_rn), the operations torch runs, so it equals the reference bit for bit given the same
// cos/sin tables. The norm uses the ownership and summation order of csrc/norm's kernel for a
// 512-wide 16-bit row (one warp; lane l sums values 8l..8l+7 then 256+8l..256+8l+7 with fmaf, then
// a xor butterfly; inv = 1 / sqrtf(sum / 512 + eps)), so it equals flashseek.ops.rms_norm on the GPU
// bit for bit and the torch reference to within one rounding of the input dtype (sum order).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "mla/mla_cache_token.cuh"
#include "mla/mla_params.h"

namespace flashseek::mla::rope_dev {

constexpr int kThreadsPerHead = kDRope / 8;  // 8 values (4 rope pairs) per thread
constexpr int kHalfPairs = kDRope / 2;                      // cos/sin row length

__device__ __forceinline__ int64_t clamp_position(int64_t pos, int64_t n) {
  return pos < 0 ? 0 : (pos >= n ? n - 1 : pos);
}

// (x0 c - x1 s, x0 s + x1 c) with every product and sum rounded to fp32, as torch computes it.
__device__ __forceinline__ float2 rotate(float x0, float x1, float c, float s) {
  return make_float2(__fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s)), __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c)));
}

// fp32 -> T (round to nearest even) -> fp32.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__float2half_rn(v));
  } else {
    return __bfloat162float(__float2bfloat16_rn(v));
  }
}

// Eight weights -> fp32 (16 bytes for bf16/fp16, 32 for fp32; the host checks the alignment).
template <typename W>
__device__ __forceinline__ void load_weight8(const void* base, int i, float* f) {
  if constexpr (std::is_same_v<W, float>) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
    const float4 a = p[0], b = p[1];
    f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
  } else {
    to_float8<W>(*reinterpret_cast<const uint4*>(static_cast<const W*>(base) + i), f);
  }
}

// What a kv warp reads before the PDL wait: its slot, position, cos/sin and norm weights (step metadata
// and weights, none of them written by the kernel before this one; see the op's docstring).
struct KvPre {
  int64_t slot;
  float c, s;
  float w[2][8];
};

template <typename W>
__device__ __forceinline__ KvPre kv_pre(const RopeNormAppendParams& p, int tok, int lane) {
  KvPre k;
  k.slot = p.slot_mapping[tok];
  const int64_t pos = clamp_position(p.positions[tok], p.num_positions);
  k.c = p.cos[pos * kHalfPairs + lane];
  k.s = p.sin[pos * kHalfPairs + lane];
  load_weight8<W>(p.weight, 8 * lane, k.w[0]);
  load_weight8<W>(p.weight, kDV / 2 + 8 * lane, k.w[1]);
  return k;
}

template <typename T, typename W, bool kFp8>
__device__ __forceinline__ void kv_token(const RopeNormAppendParams& p, const KvPre& k, int tok, int lane) {
  const int64_t slot = k.slot;
  if (slot < 0 || slot >= p.capacity) return;  // warp-uniform
  const T* kv = static_cast<const T*>(p.kv) + tok * p.kv_stride;

  // Lane l owns latent values [8l, 8l + 8) and [256 + 8l, 256 + 8l + 8): chunk c starts at c * 256 + 8l.
  float x[2][8];
  to_float8<T>(*reinterpret_cast<const uint4*>(kv + 8 * lane), x[0]);
  to_float8<T>(*reinterpret_cast<const uint4*>(kv + kDV / 2 + 8 * lane), x[1]);
  const float2 pe = to_float2<T>(*reinterpret_cast<const uint32_t*>(kv + kDV + 2 * lane));

  float ss = 0.f;
#pragma unroll
  for (int ch = 0; ch < 2; ++ch) {
#pragma unroll
    for (int i = 0; i < 8; ++i) ss = fmaf(x[ch][i], x[ch][i], ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  const float inv = 1.0f / sqrtf(ss / float(kDV) + p.eps);
#pragma unroll
  for (int ch = 0; ch < 2; ++ch) {
#pragma unroll
    for (int i = 0; i < 8; ++i) x[ch][i] = round_to<T>((x[ch][i] * inv) * k.w[ch][i]);
  }
  const float2 r = rotate(pe.x, pe.y, k.c, k.s);
  // The rope values in T, then bf16 (the cache's rope dtype), as the unfused append converts them.
  const uint32_t rope_bf16 = pack2<__nv_bfloat16>(round_to<T>(r.x), round_to<T>(r.y));

  if constexpr (kFp8) {
    char* dst = static_cast<char*>(p.kv_cache) + slot * kFp8TokenBytes;
    // Chunk c of lane l lies in quant block 2c + l / 16: a block is one half-warp's chunks.
#pragma unroll
    for (int ch = 0; ch < 2; ++ch) {
      float amax = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) amax = max_nan(amax, fabsf(x[ch][i]));
      amax = group_amax<16>(amax, 0xffffffffu);
      const float scale = fp8_block_scale(amax);
      *reinterpret_cast<uint2*>(dst + ch * (kDV / 2) + 8 * lane) = quantize8_e4m3(x[ch], scale);
      if ((lane & 15) == 0) *reinterpret_cast<float*>(dst + kFp8ScaleOffset + 4 * (2 * ch + lane / 16)) = scale;
    }
    *reinterpret_cast<uint32_t*>(dst + kFp8RopeOffset + 4 * lane) = rope_bf16;
  } else {
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(p.kv_cache) + slot * kDQK;
    *reinterpret_cast<uint4*>(dst + 8 * lane) = to_bf16x8(x[0]);
    *reinterpret_cast<uint4*>(dst + kDV / 2 + 8 * lane) = to_bf16x8(x[1]);
    *reinterpret_cast<uint32_t*>(dst + kDV + 2 * lane) = rope_bf16;
  }
}

// A q thread's position and cos/sin, read before the PDL wait as kv_pre's.
struct QPre {
  float4 c, s;
};

__device__ __forceinline__ QPre q_pre(const RopeNormAppendParams& p, int tok, int part) {
  const int64_t pos = clamp_position(p.positions[tok], p.num_positions);
  return {*reinterpret_cast<const float4*>(p.cos + pos * kHalfPairs + 4 * part),
          *reinterpret_cast<const float4*>(p.sin + pos * kHalfPairs + 4 * part)};
}

template <typename T>
__device__ __forceinline__ void q_rope(const RopeNormAppendParams& p, const QPre& q, int tok, int head, int part) {
  const T* src = static_cast<const T*>(p.q_pe) + tok * p.q_stride_t + head * p.q_stride_h + 8 * part;
  float x[8];
  to_float8<T>(*reinterpret_cast<const uint4*>(src), x);
  const float cc[4] = {q.c.x, q.c.y, q.c.z, q.c.w}, sc[4] = {q.s.x, q.s.y, q.s.z, q.s.w};
  float y[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 r = rotate(x[2 * i], x[2 * i + 1], cc[i], sc[i]);
    y[2 * i] = r.x;
    y[2 * i + 1] = r.y;
  }
  T* dst = static_cast<T*>(p.q_out) + tok * p.qo_stride_t + head * p.qo_stride_h + 8 * part;
  *reinterpret_cast<uint4*>(dst) = pack8<T>(y);
}

}  // namespace flashseek::mla::rope_dev
