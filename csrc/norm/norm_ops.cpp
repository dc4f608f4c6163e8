// Host glue for the RMSNorm kernels: validates inputs (the same rules as flashseek/ops.py's
// checks) and calls the launchers.
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

}  // namespace

void register_norm_cuda(torch::Library& m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
}
}  // namespace flashseek
