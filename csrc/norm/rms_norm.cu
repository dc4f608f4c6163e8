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
//
// The vector path's row code and launch shape live in rms_norm_device.cuh, shared with
// rms_norm_quant.cu, whose output must be this kernel's output quantized, bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "norm/norm.h"
#include "norm/rms_norm_device.cuh"

namespace flashseek {
namespace {

using namespace norm_detail;

template <typename T, typename W, int kVec, int kMaxIters, bool kFused>
__global__ void __launch_bounds__(1024) rms_norm_kernel(RmsNormParams p) {
  __shared__ float smem[33];
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  T* res = kFused ? static_cast<T*>(p.residual) + row * p.residual_row_stride : nullptr;
  rms_norm_row<T, W, kVec, kMaxIters, kFused>(
      x, res, static_cast<const W*>(p.weight), int(p.n / kVec), p.n, p.eps, smem, [&](int j, const float (&v)[kVec]) {
        // Fused: the normalized sum goes back to x, in place. (Formed here, after the reduction, as
        // before the row code moved to rms_norm_device.cuh: formed up front, it changed the SASS.)
        T* y = kFused ? static_cast<T*>(p.x) + row * p.x_row_stride : static_cast<T*>(p.out) + row * p.out_row_stride;
        store_vec<T, kVec>(y + j * kVec, v);
      });
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
    // The launch shape (accesses per thread, threads) is rms_norm_device.cuh's, which
    // rms_norm_quant.cu shares so that its sums of squares are this kernel's.
    const int64_t nacc = p.n / kVec;
    const int threads = rms_norm_vec_threads(nacc, rms_norm_vec_iters(nacc));
    if (rms_norm_vec_iters(nacc) == 1) {
      launch_pdl(rms_norm_kernel<T, W, kVec, 1, kFused>, grid, dim3(unsigned(threads)), 0, stream, p);
    } else {
      launch_pdl(rms_norm_kernel<T, W, kVec, 4, kFused>, grid, dim3(unsigned(threads)), 0, stream, p);
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
