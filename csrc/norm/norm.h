// RMSNorm and fused residual-add + RMSNorm launchers (plain CUDA, no torch headers).
// Semantics and rounding points: python/flashseek/ref/norm.py.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace flashseek {

enum class NormDtype : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

struct RmsNormParams {
  // rms_norm: x is read, out written. fused_add_rms_norm: x is read then overwritten with the
  // normalized sum, residual read then overwritten with the sum; out is unused.
  void* x;
  int64_t x_row_stride;         // elements between rows; unit stride along a row (all row tensors)
  void* out;
  int64_t out_row_stride;
  void* residual;               // nullptr for the plain norm
  int64_t residual_row_stride;
  const void* weight;           // [n], contiguous
  int64_t m;                    // rows; one CTA each
  int64_t n;                    // 1 <= n <= kRmsNormMaxN
  float eps;
  NormDtype dtype;              // of x, out and residual
  NormDtype weight_dtype;
};

constexpr int64_t kRmsNormMaxN = 16384;

void launch_rms_norm(const RmsNormParams& p, cudaStream_t stream);
void launch_fused_add_rms_norm(const RmsNormParams& p, cudaStream_t stream);

}  // namespace flashseek
