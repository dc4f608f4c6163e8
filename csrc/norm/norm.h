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

// RMSNorm fused with the FP8 1x128 activation quantization after it (rms_norm_quant.cu): q and scale
// are quant_fp8_1x128(rms_norm(x)) bit for bit (the fused add: of rms_norm(residual + x)), the
// normalized row never leaving the registers. The kernel runs rms_norm's vector path, so it takes
// only what that path takes: 16-byte aligned rows (pointer and row stride) and weight.
struct RmsNormQuantParams {
  const void* x;                // [m, n], read only (the fused add leaves it untouched too)
  int64_t x_row_stride;         // elements between rows; unit stride along a row
  void* residual;               // fused add: [m, n] in x's dtype, overwritten with x + residual; else nullptr
  int64_t residual_row_stride;
  const void* weight;           // [n], contiguous
  void* out;                    // e4m3 [m, n], contiguous
  float* scale;                 // element (i, kb) at scale[kb * scale_ld + i] (flashseek.ops.empty_act_scale)
  int64_t scale_ld;
  int64_t m;                    // rows; one CTA each
  int64_t n;                    // a multiple of 128, at most kRmsNormMaxN
  float eps;
  NormDtype dtype;              // of x and residual: bf16 or fp16
  NormDtype weight_dtype;
  bool ue8m0;                   // round each scale up to a power of two
};

void launch_rms_norm_quant_fp8(const RmsNormQuantParams& p, cudaStream_t stream);
void launch_fused_add_rms_norm_quant_fp8(const RmsNormQuantParams& p, cudaStream_t stream);

}  // namespace flashseek
