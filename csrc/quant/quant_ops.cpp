// Host glue for the quant kernels: validates inputs and calls the launchers.
#include "common/torch_checks.h"
#include "quant/quant.h"
#include "registration.h"

namespace flashseek {
namespace {

QuantFp8Params make_params(const at::Tensor& x, const at::Tensor& out, const at::Tensor& scale, int64_t n,
                           bool ue8m0) {
  QuantFp8Params p;
  p.x = x.data_ptr();
  p.x_row_stride = x.stride(0);
  p.out = out.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.m = x.size(0);
  p.n = n;
  // A single column of scales never steps to a next column: any leading dimension will do.
  p.scale_ld = (n / 128 > 1) ? scale.stride(1) : std::max<int64_t>(p.m, 1);
  p.fp16 = x.scalar_type() == at::kHalf;
  p.ue8m0 = ue8m0;
  return p;
}

void check_common(const at::Tensor& x, const char* x_name, const at::Tensor& out, const at::Tensor& scale) {
  FS_CHECK_CUDA(x);
  FS_CHECK_SAME_DEVICE(x, out);
  FS_CHECK_SAME_DEVICE(x, scale);
  FS_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, x_name,
           " must have dtype bfloat16 or float16, got ", x.scalar_type());
  FS_CHECK(x.dim() == 2, x_name, " must be 2-D, got shape ", x.sizes());
  FS_CHECK(x.stride(-1) == 1, x_name, " must have a unit stride in its last dimension, got strides ", x.strides());
  // The kernel reads 16 bytes per lane.
  FS_CHECK(x.size(0) <= 1 || x.stride(0) % 8 == 0, x_name, "'s row stride must be a multiple of 8 elements, got ",
           x.stride(0));
  FS_CHECK(aligned16(x), x_name, " must be 16-byte aligned");
  FS_CHECK_DTYPE(out, at::kFloat8_e4m3fn);
  FS_CHECK_CONTIGUOUS(out);
}

void quant_fp8_1x128(const at::Tensor& x, const at::Tensor& out, const at::Tensor& scale, bool ue8m0) {
  check_common(x, "x", out, scale);
  const int64_t m = x.size(0), k = x.size(1);
  FS_CHECK(k % 128 == 0, "x's last dimension must be a multiple of 128, got ", k);
  FS_CHECK_SHAPE(out, m, k);
  check_act_scale(scale, m, k / 128);
  if (m == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  launch_quant_fp8_1x128(make_params(x, out, scale, k, ue8m0), current_stream(x));
}

void silu_mul_quant_fp8(const at::Tensor& gate_up, const at::Tensor& out, const at::Tensor& scale, bool ue8m0,
                        const c10::optional<at::Tensor>& masked_m) {
  check_common(gate_up, "gate_up", out, scale);
  const int64_t m = gate_up.size(0), n2 = gate_up.size(1);
  FS_CHECK(n2 % 256 == 0, "gate_up's last dimension must be 2*N with N a multiple of 128, got ", n2);
  FS_CHECK_SHAPE(out, m, n2 / 2);
  check_act_scale(scale, m, n2 / 256);
  if (masked_m.has_value()) {
    const at::Tensor& mm = *masked_m;
    FS_CHECK_SAME_DEVICE(gate_up, mm);
    FS_CHECK(mm.scalar_type() == at::kInt, "masked_m must have dtype int32, got ", mm.scalar_type());
    FS_CHECK(mm.dim() == 1 && mm.size(0) > 0 && m % mm.size(0) == 0,
             "masked_m must be 1-D with a length E that divides gate_up's rows (", m, "), got shape ", mm.sizes());
    FS_CHECK_CONTIGUOUS(mm);
  }
  if (m == 0) return;
  c10::cuda::CUDAGuard guard(gate_up.device());
  QuantFp8Params p = make_params(gate_up, out, scale, n2 / 2, ue8m0);
  if (masked_m.has_value()) {
    p.masked_m = masked_m->data_ptr<int32_t>();
    p.rows_per_group = m / masked_m->size(0);
  }
  launch_silu_mul_quant_fp8(p, current_stream(gate_up));
}

}  // namespace

void register_quant_cuda(torch::Library& m) {
  m.impl("quant_fp8_1x128", &quant_fp8_1x128);
  m.impl("silu_mul_quant_fp8", &silu_mul_quant_fp8);
}
}  // namespace flashseek
