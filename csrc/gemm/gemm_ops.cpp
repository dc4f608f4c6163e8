// Host glue for the gemm kernels: validates inputs and calls the launchers.
#include "common/torch_checks.h"
#include "gemm/fp8_gemm.h"
#include "registration.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

namespace flashseek {
namespace {

int sm_count(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
}

void check_fp8_operand(const at::Tensor& t, const char* name) {
  FS_CHECK(t.scalar_type() == at::kFloat8_e4m3fn, name, " must have dtype float8_e4m3fn, got ", t.scalar_type());
  FS_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
  FS_CHECK(aligned16(t), name, " must be 16-byte aligned (TMA)");
}

void check_out(const at::Tensor& out) {
  FS_CHECK(out.scalar_type() == at::kBFloat16, "out must have dtype bfloat16, got ", out.scalar_type());
  FS_CHECK(out.is_contiguous(), "out must be contiguous, got strides ", out.strides());
  FS_CHECK(aligned16(out), "out must be 16-byte aligned (TMA)");
}

void check_k_n(int64_t k, int64_t n) {
  FS_CHECK(k > 0 && k % 128 == 0, "K (the last dimension of a and b) must be a positive multiple of 128, got ", k);
  FS_CHECK(n % 16 == 0, "N (b's rows) must be a multiple of 16, got ", n);
}

// Activation scales [m, kb]: column-major, element (i, j) at j * ld + i (see empty_act_scale).
void check_act_scale_2d(const at::Tensor& s, const char* name, int64_t m, int64_t kb) {
  FS_CHECK(s.scalar_type() == at::kFloat, name, " must have dtype float32, got ", s.scalar_type());
  FS_CHECK(s.dim() == 2 && s.size(0) == m && s.size(1) == kb, name, " must have shape [", m, ", ", kb, "], got ",
           s.sizes());
  FS_CHECK(m <= 1 || s.stride(0) == 1, name,
           " must be column-major (stride(0) == 1, see flashseek.ops.empty_act_scale), got strides ", s.strides());
  FS_CHECK(kb <= 1 || s.stride(1) >= m, name, " must have a leading dimension (stride(1)) >= ", m, ", got strides ",
           s.strides());
}

void check_weight_scale(const at::Tensor& s, const char* name, std::vector<int64_t> shape) {
  FS_CHECK(s.scalar_type() == at::kFloat, name, " must have dtype float32, got ", s.scalar_type());
  FS_CHECK(s.sizes() == c10::IntArrayRef(shape), name, " must have shape ", c10::IntArrayRef(shape), ", got ",
           s.sizes());
  FS_CHECK(s.is_contiguous(), name, " must be contiguous (row-major per 128x128 block), got strides ", s.strides());
}

void fp8_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
              const at::Tensor& out) {
  FS_CHECK_CUDA(a);
  for (auto* t : {&a_scale, &b, &b_scale, &out}) {
    FS_CHECK(t->device() == a.device(), "all arguments must be on a's device ", a.device(), ", got ", t->device());
  }
  FS_CHECK_DIM(a, 2);
  FS_CHECK_DIM(b, 2);
  check_fp8_operand(a, "a");
  check_fp8_operand(b, "b");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(0);
  FS_CHECK(b.size(1) == k, "b must have shape [N, ", k, "] (K-major, same K as a), got ", b.sizes());
  check_k_n(k, n);
  const int64_t kb = k / 128;
  check_act_scale_2d(a_scale, "a_scale", m, kb);
  check_weight_scale(b_scale, "b_scale", {(n + 127) / 128, kb});
  FS_CHECK_SHAPE(out, m, n);
  check_out(out);
  FS_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "sizes must fit in int32");
  if (m == 0 || n == 0) return;

  c10::cuda::CUDAGuard guard(a.device());
  // The kernels TMA-load the activation scales in columns of round_up(M, 4) rows, which needs a
  // 16-byte multiple leading dimension, a 16-byte aligned base and storage for the padding rows (the
  // empty_act_scale layout has all three); other layouts (e.g. torch's [M, K/128] with stride (1, M))
  // are repacked into that layout first, a copy of M * K/128 floats.
  at::Tensor sa = a_scale;
  const int64_t m4 = (m + 3) / 4 * 4;
  int64_t ld = kb > 1 ? a_scale.stride(1) : m4;
  const int64_t storage_floats = int64_t(a_scale.storage().nbytes() / sizeof(float));
  const bool fits = a_scale.storage_offset() + (kb - 1) * ld + m4 <= storage_floats;
  if ((kb > 1 && ld % 4 != 0) || !aligned16(a_scale) || !fits) {
    ld = m4;
    at::Tensor padded = at::empty({kb, ld}, a_scale.options());
    padded.narrow(1, 0, m).copy_(a_scale.t());
    sa = padded;
  }
  Fp8GemmParams p;
  p.a = a.data_ptr();
  p.a_scale = sa.data_ptr<float>();
  p.a_scale_ld = ld;
  p.b = b.data_ptr();
  p.b_scale = b_scale.data_ptr<float>();
  p.out = out.data_ptr();
  p.m = int(m);
  p.n = int(n);
  p.k = int(k);
  p.sm_count = sm_count(a);
  Fp8GemmPlan plan = plan_fp8_gemm(p);
  at::Tensor ws = at::empty({int64_t(std::max<size_t>(plan.workspace_bytes, 1))}, a.options().dtype(at::kByte));
  launch_fp8_gemm(p, plan, ws.data_ptr(), current_stream(a));
}

void check_grouped_weights(const at::Tensor& b, const at::Tensor& b_scale, int64_t k, int64_t* e, int64_t* n) {
  FS_CHECK_DIM(b, 3);
  check_fp8_operand(b, "b");
  *e = b.size(0);
  *n = b.size(1);
  FS_CHECK(b.size(2) == k, "b must have shape [E, N, ", k, "] (K-major, same K as a), got ", b.sizes());
  check_k_n(k, *n);
  check_weight_scale(b_scale, "b_scale", {*e, (*n + 127) / 128, k / 128});
}

void run_grouped(GroupedFp8GemmParams& p, const at::Tensor& a) {
  p.sm_count = sm_count(a);
  const size_t bytes = grouped_fp8_gemm_workspace(p);
  at::Tensor ws = at::empty({int64_t(std::max<size_t>(bytes, 1))}, a.options().dtype(at::kByte));
  launch_grouped_fp8_gemm(p, ws.data_ptr(), bytes, current_stream(a));
}

void grouped_fp8_gemm_contiguous(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                 const at::Tensor& b_scale, const at::Tensor& expert_offsets, const at::Tensor& out) {
  FS_CHECK_CUDA(a);
  for (auto* t : {&a_scale, &b, &b_scale, &expert_offsets, &out}) {
    FS_CHECK(t->device() == a.device(), "all arguments must be on a's device ", a.device(), ", got ", t->device());
  }
  FS_CHECK_DIM(a, 2);
  check_fp8_operand(a, "a");
  const int64_t m = a.size(0), k = a.size(1);
  int64_t e, n;
  check_grouped_weights(b, b_scale, k, &e, &n);
  check_act_scale_2d(a_scale, "a_scale", m, k / 128);
  FS_CHECK(expert_offsets.scalar_type() == at::kInt, "expert_offsets must have dtype int32, got ",
           expert_offsets.scalar_type());
  FS_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) == e + 1, "expert_offsets must have shape [", e + 1,
           "] (E + 1), got ", expert_offsets.sizes());
  FS_CHECK_CONTIGUOUS(expert_offsets);
  FS_CHECK_SHAPE(out, m, n);
  check_out(out);
  FS_CHECK(m <= INT32_MAX, "M_total must fit in int32");
  if (m == 0 || n == 0 || e == 0) return;

  c10::cuda::CUDAGuard guard(a.device());
  GroupedFp8GemmParams p{};
  p.a = a.data_ptr();
  p.a_scale = a_scale.data_ptr<float>();
  p.a_scale_ld = k / 128 > 1 ? a_scale.stride(1) : m;
  p.b = b.data_ptr();
  p.b_scale = b_scale.data_ptr<float>();
  p.out = out.data_ptr();
  p.expert_offsets = expert_offsets.data_ptr<int32_t>();
  p.num_experts = int(e);
  p.m_rows = int(m);
  p.n = int(n);
  p.k = int(k);
  run_grouped(p, a);
}

void grouped_fp8_gemm_masked(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                             const at::Tensor& b_scale, const at::Tensor& masked_m, const at::Tensor& out) {
  FS_CHECK_CUDA(a);
  for (auto* t : {&a_scale, &b, &b_scale, &masked_m, &out}) {
    FS_CHECK(t->device() == a.device(), "all arguments must be on a's device ", a.device(), ", got ", t->device());
  }
  FS_CHECK_DIM(a, 3);
  check_fp8_operand(a, "a");
  const int64_t m_max = a.size(1), k = a.size(2);
  int64_t e, n;
  check_grouped_weights(b, b_scale, k, &e, &n);
  FS_CHECK(a.size(0) == e, "a must have shape [E=", e, ", M_max, K] (E from b), got ", a.sizes());
  const int64_t kb = k / 128;
  FS_CHECK(a_scale.scalar_type() == at::kFloat, "a_scale must have dtype float32, got ", a_scale.scalar_type());
  FS_CHECK_SHAPE(a_scale, e, m_max, kb);
  FS_CHECK(m_max <= 1 || a_scale.stride(1) == 1,
           "a_scale must be column-major per expert (stride(1) == 1, see flashseek.ops.empty_grouped_act_scale), "
           "got strides ", a_scale.strides());
  FS_CHECK(kb <= 1 || a_scale.stride(2) >= m_max, "a_scale must have a per-expert leading dimension (stride(2)) >= ",
           m_max, ", got strides ", a_scale.strides());
  FS_CHECK(masked_m.scalar_type() == at::kInt, "masked_m must have dtype int32, got ", masked_m.scalar_type());
  FS_CHECK(masked_m.dim() == 1 && masked_m.size(0) == e, "masked_m must have shape [", e, "] (E), got ",
           masked_m.sizes());
  FS_CHECK_CONTIGUOUS(masked_m);
  FS_CHECK_SHAPE(out, e, m_max, n);
  check_out(out);
  FS_CHECK(e * m_max <= INT32_MAX, "E * M_max must fit in int32");
  if (m_max == 0 || n == 0 || e == 0) return;

  c10::cuda::CUDAGuard guard(a.device());
  GroupedFp8GemmParams p{};
  p.a = a.data_ptr();
  p.a_scale = a_scale.data_ptr<float>();
  p.a_scale_ld = kb > 1 ? a_scale.stride(2) : m_max;
  p.a_scale_estride = a_scale.stride(0);
  p.b = b.data_ptr();
  p.b_scale = b_scale.data_ptr<float>();
  p.out = out.data_ptr();
  p.masked_m = masked_m.data_ptr<int32_t>();
  p.num_experts = int(e);
  p.m_rows = int(m_max);
  p.n = int(n);
  p.k = int(k);
  run_grouped(p, a);
}

}  // namespace

void register_gemm_cuda(torch::Library& m) {
  m.impl("fp8_gemm", &fp8_gemm);
  m.impl("grouped_fp8_gemm_contiguous", &grouped_fp8_gemm_contiguous);
  m.impl("grouped_fp8_gemm_masked", &grouped_fp8_gemm_masked);
}
}  // namespace flashseek
