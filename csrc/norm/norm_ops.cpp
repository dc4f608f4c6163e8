// Host glue for the RMSNorm kernels (plain, and fused with the FP8 1x128 quantization): validates
// inputs (the same rules as flashseek/ops.py's checks) and calls the launchers.
#include "common/torch_checks.h"
#include "norm/norm.h"
#include "registration.h"

namespace flashseek {
namespace {

NormDtype norm_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return NormDtype::kBFloat16;
    case at::kHalf: return NormDtype::kFloat16;
    case at::kFloat: return NormDtype::kFloat32;
    default: FS_CHECK(false, name, " must have dtype bfloat16, float16 or float32, got ", t.scalar_type());
  }
  return NormDtype::kFloat32;  // unreachable
}

// A [m, n] row tensor: x's shape and dtype, unit stride along the row, any row stride.
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& x) {
  FS_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  FS_CHECK(t.sizes() == x.sizes(), name, " must have shape ", x.sizes(), ", got ", t.sizes());
  FS_CHECK(t.scalar_type() == x.scalar_type(), name, " must have dtype ", x.scalar_type(), ", got ",
           t.scalar_type());
  FS_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name,
           " must have a unit stride in its last dimension, got strides ", t.strides());
  FS_CHECK_SAME_DEVICE(x, t);
}

RmsNormParams check_common(const at::Tensor& x, const at::Tensor& weight, double eps) {
  FS_CHECK_CUDA(x);
  RmsNormParams p{};
  p.dtype = norm_dtype(x, "x");
  FS_CHECK(x.dim() == 2, "x must be 2-D, got shape ", x.sizes());
  FS_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "x must have a unit stride in its last dimension, got strides ",
           x.strides());
  const int64_t n = x.size(1);
  FS_CHECK(n >= 1 && n <= kRmsNormMaxN, "x's last dimension must lie in [1, ", kRmsNormMaxN, "], got ", n);
  // One CTA per row along gridDim.x.
  FS_CHECK(x.size(0) <= INT32_MAX, "x must have at most 2^31 - 1 rows, got ", x.size(0));
  p.weight_dtype = norm_dtype(weight, "weight");
  FS_CHECK_SHAPE(weight, n);
  FS_CHECK_CONTIGUOUS(weight);
  FS_CHECK_SAME_DEVICE(x, weight);
  FS_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.weight = weight.data_ptr();
  p.m = x.size(0);
  p.n = n;
  p.eps = float(eps);
  return p;
}

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out) {
  RmsNormParams p = check_common(x, weight, eps);
  check_rows(out, "out", x);
  if (p.m == 0) return;
  p.out = out.data_ptr();
  p.out_row_stride = out.stride(0);
  c10::cuda::CUDAGuard guard(x.device());
  launch_rms_norm(p, current_stream(x));
}

void fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  RmsNormParams p = check_common(x, weight, eps);
  check_rows(residual, "residual", x);
  if (p.m == 0) return;
  FS_CHECK(!x.is_same(residual) && x.data_ptr() != residual.data_ptr(), "x and residual must not alias");
  p.residual = residual.data_ptr();
  p.residual_row_stride = residual.stride(0);
  c10::cuda::CUDAGuard guard(x.device());
  launch_fused_add_rms_norm(p, current_stream(x));
}

// ---- RMSNorm + FP8 1x128 quantization (rms_norm_quant.cu) ----

// x's extra rules for the fused quantization: a 16-bit dtype, whole 128-channel blocks, and the
// 16-byte rows of rms_norm's vector path (the kernel implements that path only).
void check_quant_rows(const at::Tensor& t, const char* name) {
  FS_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, name,
           " must have dtype bfloat16 or float16, got ", t.scalar_type());
  FS_CHECK(t.size(0) <= 1 || t.stride(0) % 8 == 0, name, "'s row stride must be a multiple of 8 elements, got ",
           t.stride(0));
  FS_CHECK(aligned16(t), name, " must be 16-byte aligned");
}

RmsNormQuantParams check_quant(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out,
                               const at::Tensor& scale, bool ue8m0) {
  const RmsNormParams c = check_common(x, weight, eps);
  const int64_t m = x.size(0), n = x.size(1);
  FS_CHECK(n % 128 == 0, "x's last dimension must be a multiple of 128, got ", n);
  check_quant_rows(x, "x");
  FS_CHECK(aligned16(weight), "weight must be 16-byte aligned");
  FS_CHECK_DTYPE(out, at::kFloat8_e4m3fn);
  FS_CHECK_SHAPE(out, m, n);
  FS_CHECK_CONTIGUOUS(out);
  FS_CHECK(aligned16(out), "out must be 16-byte aligned");
  FS_CHECK_SAME_DEVICE(x, out);
  check_act_scale(scale, m, n / 128);
  FS_CHECK_SAME_DEVICE(x, scale);
  RmsNormQuantParams p{};
  p.x = c.x;
  p.x_row_stride = c.x_row_stride;
  p.weight = c.weight;
  p.out = out.data_ptr();
  p.scale = scale.data_ptr<float>();
  // A single column of scales never steps to a next column: any leading dimension will do.
  p.scale_ld = (n / 128 > 1) ? scale.stride(1) : std::max<int64_t>(m, 1);
  p.m = m;
  p.n = n;
  p.eps = c.eps;
  p.dtype = c.dtype;
  p.weight_dtype = c.weight_dtype;
  p.ue8m0 = ue8m0;
  return p;
}

void rms_norm_quant_fp8(const at::Tensor& x, const at::Tensor& weight, double eps, const at::Tensor& out,
                        const at::Tensor& scale, bool ue8m0) {
  RmsNormQuantParams p = check_quant(x, weight, eps, out, scale, ue8m0);
  if (p.m == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  launch_rms_norm_quant_fp8(p, current_stream(x));
}

void fused_add_rms_norm_quant_fp8(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                                  double eps, const at::Tensor& out, const at::Tensor& scale, bool ue8m0) {
  RmsNormQuantParams p = check_quant(x, weight, eps, out, scale, ue8m0);
  check_rows(residual, "residual", x);
  check_quant_rows(residual, "residual");
  if (p.m == 0) return;
  FS_CHECK(!x.is_same(residual) && x.data_ptr() != residual.data_ptr(), "x and residual must not alias");
  p.residual = residual.data_ptr();
  p.residual_row_stride = residual.stride(0);
  c10::cuda::CUDAGuard guard(x.device());
  launch_fused_add_rms_norm_quant_fp8(p, current_stream(x));
}

}  // namespace

void register_norm_cuda(torch::Library& m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rms_norm_quant_fp8", &rms_norm_quant_fp8);
  m.impl("fused_add_rms_norm_quant_fp8", &fused_add_rms_norm_quant_fp8);
}
}  // namespace flashseek
