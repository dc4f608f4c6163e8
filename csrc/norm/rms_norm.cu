// RMSNorm, plain and fused with the residual add that precedes it in every decoder layer.
//
// One CTA per row. The row is read once into registers (each thread owns up to kMaxIters accesses
// of kVec elements, strided by blockDim so a warp's accesses are contiguous), the fp32 sum of
// squares is reduced over the CTA, and the row is scaled and written from the registers: x and
// residual cross DRAM exactly once each way, which is all this memory-bound op can save.
//
// Determinism: every element has a fixed owner thread, each thread sums its elements in a fixed
// order, warps reduce with a fixed butterfly and warp 0 sums the per-warp partials in warp order, so
// the result does not depend on scheduling (it does differ from torch's summation order, see
// ref/norm.py for the tolerance that implies).
//
// Paths: 16-byte accesses (kVec = 16 / sizeof(T)) when n, the row strides and the pointers allow it;
// otherwise one element per access (odd hidden sizes, misaligned views), with more of them per thread.
//
// Launch: a programmatic dependent (launch_pdl), letting its own dependents launch at once. A decode
// step's norm is one row: its cost is latency (launch, two dependent memory reads, a block-wide
// reduction), so the one-access path (rows of 128 to 1024 accesses, e.g. R1's 1536 and 7168) reads
// its weight slice before griddepcontrol.wait, overlapping the previous kernel's tail. That read is
// the one exception to pdl.cuh's wait-first contract, and it is safe because the weight is not
// written by any kernel that triggers its dependents early (flashseek's); a torch kernel writing it
// would still complete before this one starts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "norm/norm.h"

namespace flashseek {
namespace {

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
        for (int i = 0; i < kPerWord; ++i) f[c * kPerWord + i] = ::flashseek::to_float(e[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kN; ++i) f[i] = ::flashseek::to_float(d[i]);
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

template <typename T, typename W, int kVec, int kMaxIters, bool kFused>
__global__ void __launch_bounds__(1024) rms_norm_kernel(RmsNormParams p) {
  __shared__ float smem[33];
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const int nacc = int(p.n / kVec);
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  T* res = kFused ? static_cast<T*>(p.residual) + row * p.residual_row_stride : nullptr;

  // One access a thread (rows up to 1024 accesses, e.g. R1's 7168 bf16 hidden): this thread's weight
  // slice is read before the wait (see the header), kept as raw words until it is used. With four
  // accesses a thread it would not fit the 64 registers of a 1024-thread CTA next to the row: there
  // the weight is read after the reduction.
  const W* w = static_cast<const W*>(p.weight);
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
  const float inv = 1.0f / sqrtf(ss / float(p.n) + p.eps);

  T* y = kFused ? static_cast<T*>(p.x) + row * p.x_row_stride : static_cast<T*>(p.out) + row * p.out_row_stride;
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
      store_vec<T, kVec>(y + j * kVec, v[it]);
    }
  }
}

// The fallback for rows that cannot take 16-byte accesses: one element per access and two passes
// over the row (the second re-reads what this thread read or wrote in the first, from L1/L2), so
// the per-thread state stays small for any n. Same rounding points as the vector path.
template <typename T, typename W, bool kFused>
__global__ void __launch_bounds__(1024) rms_norm_scalar_kernel(RmsNormParams p) {
  __shared__ float smem[33];
  pdl_launch_dependents();
  pdl_wait();
  const int64_t row = blockIdx.x;
  const int n = int(p.n);
  T* x = static_cast<T*>(p.x) + row * p.x_row_stride;
  T* res = kFused ? static_cast<T*>(p.residual) + row * p.residual_row_stride : nullptr;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    float v = to_float(x[j]);
    if constexpr (kFused) {
      const T r = from_float<T>(v + to_float(res[j]));
      res[j] = r;
      v = to_float(r);
    }
    ss = fmaf(v, v, ss);
  }
  ss = block_sum(ss, smem);
  const float inv = 1.0f / sqrtf(ss / float(p.n) + p.eps);
  const W* w = static_cast<const W*>(p.weight);
  // The normalized row goes to x (fused, in place) or out; the source is the stored sum or x.
  const T* src = kFused ? res : x;
  T* y = kFused ? x : static_cast<T*>(p.out) + row * p.out_row_stride;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    y[j] = from_float<T>((to_float(src[j]) * inv) * to_float(w[j]));
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, typename W, bool kFused>
void launch_typed(const RmsNormParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / int(sizeof(T));
  const int64_t esize = int64_t(sizeof(T));
  // Row strides matter only when there is a second row.
  auto stride_ok = [&](int64_t s) { return p.m <= 1 || (s * esize) % 16 == 0; };
  bool vec = p.n % kVec == 0 && aligned16(p.x) && stride_ok(p.x_row_stride) && aligned16(p.weight);
  if (kFused) {
    vec = vec && aligned16(p.residual) && stride_ok(p.residual_row_stride);
  } else {
    vec = vec && aligned16(p.out) && stride_ok(p.out_row_stride);
  }
  const dim3 grid(unsigned(p.m));
  if (vec) {
    // One access per thread for rows of 128 to 1024 accesses (the weight then read before the PDL
    // wait), else up to 4 (n = 16384 needs 512 (16-bit) or 1024 (fp32) threads). Rows under 128
    // accesses keep the 4-access path: a 512-wide 16-bit row then runs on one warp, lane l summing
    // 8l..8l+7 and 256+8l..256+8l+7, the order mla_rope_norm_append's kv_a norm reproduces bit for
    // bit (its tests compare the two).
    const int64_t nacc = p.n / kVec;
    auto threads_for = [&](int iters) {
      return int(std::min<int64_t>(1024, std::max<int64_t>(32, (nacc + iters - 1) / iters + 31) / 32 * 32));
    };
    if (nacc >= 128 && nacc <= 1024) {
      launch_pdl(rms_norm_kernel<T, W, kVec, 1, kFused>, grid, dim3(unsigned(threads_for(1))), 0, stream, p);
    } else {
      launch_pdl(rms_norm_kernel<T, W, kVec, 4, kFused>, grid, dim3(unsigned(threads_for(4))), 0, stream, p);
    }
  } else {
    // About 8 elements per thread, as the vector path's typical load.
    const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(32, (p.n + 7) / 8 + 31) / 32 * 32));
    launch_pdl(rms_norm_scalar_kernel<T, W, kFused>, grid, dim3(unsigned(threads)), 0, stream, p);
  }
  FS_CHECK_LAUNCH();
}

template <typename T, bool kFused>
void dispatch_weight(const RmsNormParams& p, cudaStream_t stream) {
  switch (p.weight_dtype) {
    case NormDtype::kBFloat16: return launch_typed<T, __nv_bfloat16, kFused>(p, stream);
    case NormDtype::kFloat16: return launch_typed<T, __half, kFused>(p, stream);
    case NormDtype::kFloat32: return launch_typed<T, float, kFused>(p, stream);
  }
  throw std::invalid_argument("flashseek: rms_norm: unknown weight dtype");
}

template <bool kFused>
void dispatch(const RmsNormParams& p, cudaStream_t stream) {
  if (p.m == 0) return;
  if (p.n < 1 || p.n > kRmsNormMaxN) throw std::invalid_argument("flashseek: rms_norm: n out of range");
  switch (p.dtype) {
    case NormDtype::kBFloat16: return dispatch_weight<__nv_bfloat16, kFused>(p, stream);
    case NormDtype::kFloat16: return dispatch_weight<__half, kFused>(p, stream);
    case NormDtype::kFloat32: return dispatch_weight<float, kFused>(p, stream);
  }
  throw std::invalid_argument("flashseek: rms_norm: unknown dtype");
}

}  // namespace

void launch_rms_norm(const RmsNormParams& p, cudaStream_t stream) { dispatch<false>(p, stream); }
void launch_fused_add_rms_norm(const RmsNormParams& p, cudaStream_t stream) { dispatch<true>(p, stream); }

}  // namespace flashseek
