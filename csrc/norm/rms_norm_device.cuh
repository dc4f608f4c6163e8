// RMSNorm device code shared by the kernels that must produce rms_norm's exact bits: rms_norm.cu
// itself and rms_norm_quant.cu (the norm fused with the FP8 1x128 quantization after it). The
// vector path's whole row (its thread mapping, summation order and rounding points) lives in
// rms_norm_row below, and its launch shape in rms_norm_vec_iters / rms_norm_vec_threads: a kernel
// that runs the row with that shape sums the squares in rms_norm's order, so its normalized values
// are rms_norm's to the bit. See rms_norm.cu's header for the design.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/pdl.cuh"

namespace flashseek {
namespace norm_detail {

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// Round to nearest even, as torch's .to(dtype) does.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

// kN consecutive U elements held as loaded (16-byte words where they fill them), converted when used:
// load_vec below, or a load issued early whose registers should stay packed until then.
template <typename U, int kN>
struct RawVec {
  static constexpr bool kWords = (int(sizeof(U)) * kN) % 16 == 0;
  static constexpr int kCount = kWords ? int(sizeof(U)) * kN / 16 : kN;
  std::conditional_t<kWords, uint4, U> d[kCount];
  __device__ __forceinline__ void load(const U* p) {
#pragma unroll
    for (int c = 0; c < kCount; ++c) {
      if constexpr (kWords) {
        d[c] = reinterpret_cast<const uint4*>(p)[c];
      } else {
        d[c] = p[c];
      }
    }
  }
  __device__ __forceinline__ void to_float(float (&f)[kN]) const {
    if constexpr (kWords) {
      constexpr int kPerWord = 16 / int(sizeof(U));
#pragma unroll
      for (int c = 0; c < kCount; ++c) {
        const U* e = reinterpret_cast<const U*>(&d[c]);
#pragma unroll
        for (int i = 0; i < kPerWord; ++i) f[c * kPerWord + i] = norm_detail::to_float(e[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kN; ++i) f[i] = norm_detail::to_float(d[i]);
    }
  }
};

// Loads kN consecutive elements as fp32: whole 16-byte words where kN elements fill them (the
// caller guarantees the alignment), else element by element (a weight narrower than the row's
// access, or the scalar path).
template <typename U, int kN>
__device__ __forceinline__ void load_vec(const U* p, float (&f)[kN]) {
  RawVec<U, kN> raw;
  raw.load(p);
  raw.to_float(f);
}

// Stores kN values rounded to U (already rounded when they came from a T value).
template <typename U, int kN>
__device__ __forceinline__ void store_vec(U* p, const float (&f)[kN]) {
  constexpr int kBytes = int(sizeof(U)) * kN;
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPerWord = 16 / int(sizeof(U));
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      uint4 raw;
      U* e = reinterpret_cast<U*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerWord; ++i) e[i] = from_float<U>(f[c * kPerWord + i]);
      reinterpret_cast<uint4*>(p)[c] = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) p[i] = from_float<U>(f[i]);
  }
}

// Sum over the CTA in a fixed order; every thread gets the same value.
__device__ __forceinline__ float block_sum(float v, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nwarps = blockDim.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < nwarps ? smem[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) smem[32] = s;
  }
  __syncthreads();
  return smem[32];
}

// The vector path's launch shape for a row of nacc accesses of 16 bytes. One access per thread for
// rows of 128 to 1024 accesses (the weight then read before the PDL wait), else up to 4 (n = 16384
// needs 512 (16-bit) or 1024 (fp32) threads). Rows under 128 accesses keep the 4-access path: a
// 512-wide 16-bit row then runs on one warp, lane l summing 8l..8l+7 and 256+8l..256+8l+7, the order
// mla_rope_norm_append's kv_a norm reproduces bit for bit (its tests compare the two). The thread
// count is a multiple of 32 and at most 1024.
inline int rms_norm_vec_iters(int64_t nacc) { return (nacc >= 128 && nacc <= 1024) ? 1 : 4; }
inline int rms_norm_vec_threads(int64_t nacc, int iters) {
  return int(std::min<int64_t>(1024, std::max<int64_t>(32, (nacc + iters - 1) / iters + 31) / 32 * 32));
}

// One row of the vector path, run by the whole CTA (blockDim.x threads, a multiple of 32): thread t
// owns accesses j = t + it * blockDim.x (it < kMaxIters, j < nacc) of kVec elements each. Reads the
// weight slice early where kMaxIters == 1 (see rms_norm.cu), waits for the previous kernel
// (pdl_wait), reads the row (fused: adds the residual, rounds the sum to T and stores it back to
// res), reduces the sum of squares, and hands each owned access's normalized fp32 values,
// (x * inv) * weight not yet rounded to T, to store(j, v). Every thread reaches the block-wide
// reduction; store is called under `j < nacc`.
template <typename T, typename W, int kVec, int kMaxIters, bool kFused, typename Store>
__device__ __forceinline__ void rms_norm_row(const T* x, T* res, const W* w, int nacc, int64_t n, float eps,
                                             float* smem, Store&& store) {
  // One access a thread (rows up to 1024 accesses, e.g. R1's 7168 bf16 hidden): this thread's weight
  // slice is read before the wait (see rms_norm.cu's header), kept as raw words until it is used.
  // With four accesses a thread it would not fit the 64 registers of a 1024-thread CTA next to the
  // row: there the weight is read after the reduction.
  constexpr bool kEarlyWeight = kMaxIters == 1;
  RawVec<W, kVec> wraw[kEarlyWeight ? kMaxIters : 1];
  if constexpr (kEarlyWeight) {
#pragma unroll
    for (int it = 0; it < kMaxIters; ++it) {
      const int j = threadIdx.x + it * blockDim.x;
      if (j < nacc) wraw[it].load(w + j * kVec);
    }
  }
  pdl_wait();

  float v[kMaxIters][kVec];
  float ss = 0.0f;
#pragma unroll
  for (int it = 0; it < kMaxIters; ++it) {
    const int j = threadIdx.x + it * blockDim.x;
    if (j < nacc) {
      load_vec<T, kVec>(x + j * kVec, v[it]);
      if constexpr (kFused) {
        float r[kVec];
        load_vec<T, kVec>(res + j * kVec, r);
        // The sum is rounded to T before it is stored *and* before the norm reads it, as the
        // unfused `h = x + a; rms_norm(h)` does.
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[it][i] = to_float(from_float<T>(v[it][i] + r[i]));
        store_vec<T, kVec>(res + j * kVec, v[it]);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) ss = fmaf(v[it][i], v[it][i], ss);
    }
  }
  ss = block_sum(ss, smem);
  // mean = sum / n, then 1 / sqrt with IEEE-rounded division and square root (torch's CPU rsqrt).
  const float inv = 1.0f / sqrtf(ss / float(n) + eps);

#pragma unroll
  for (int it = 0; it < kMaxIters; ++it) {
    const int j = threadIdx.x + it * blockDim.x;
    if (j < nacc) {
      float wf[kVec];
      if constexpr (kEarlyWeight) {
        wraw[it].to_float(wf);
      } else {
        load_vec<W, kVec>(w + j * kVec, wf);
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[it][i] = (v[it][i] * inv) * wf[i];
      store(j, v[it]);
    }
  }
}

}  // namespace norm_detail
}  // namespace flashseek
