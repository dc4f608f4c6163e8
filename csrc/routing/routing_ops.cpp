// Host glue for the routing kernels: validates inputs and calls the launchers.
#include "common/torch_checks.h"
#include "registration.h"
#include "routing/routing.h"

namespace flashseek {
namespace {

RouteDtype route_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return RouteDtype::kF32;
    case at::kBFloat16: return RouteDtype::kBF16;
    case at::kHalf: return RouteDtype::kF16;
    default: FS_CHECK(false, "logits must have dtype float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  return RouteDtype::kF32;
}

void check_outputs(const at::Tensor& logits, int64_t topk, const at::Tensor& topk_weights, const at::Tensor& topk_ids) {
  const int64_t T = logits.size(0);
  FS_CHECK_CUDA(topk_weights);
  FS_CHECK_CUDA(topk_ids);
  FS_CHECK_SAME_DEVICE(logits, topk_weights);
  FS_CHECK_SAME_DEVICE(logits, topk_ids);
  FS_CHECK_DTYPE(topk_weights, at::kFloat);
  FS_CHECK_DTYPE(topk_ids, at::kInt);
  FS_CHECK_SHAPE(topk_weights, T, topk);
  FS_CHECK_SHAPE(topk_ids, T, topk);
  FS_CHECK_LAST_DIM_CONTIGUOUS(topk_weights);
  FS_CHECK_LAST_DIM_CONTIGUOUS(topk_ids);
}

RouteParams base_params(const at::Tensor& logits, int64_t topk, bool renormalize, at::Tensor& topk_weights,
                        at::Tensor& topk_ids) {
  RouteParams p{};
  p.logits = logits.data_ptr();
  p.logits_stride = logits.stride(0);
  p.dtype = route_dtype(logits);
  p.weights = topk_weights.data_ptr<float>();
  p.weights_stride = topk_weights.stride(0);
  p.ids = topk_ids.data_ptr<int32_t>();
  p.ids_stride = topk_ids.stride(0);
  p.T = logits.size(0);
  p.E = static_cast<int>(logits.size(1));
  p.topk = static_cast<int>(topk);
  p.renormalize = renormalize;
  p.n_group = 1;
  p.topk_group = 1;
  p.scale = 1.0f;
  return p;
}

void check_logits(const at::Tensor& logits, int64_t topk) {
  FS_CHECK_CUDA(logits);
  FS_CHECK_DIM(logits, 2);
  route_dtype(logits);
  FS_CHECK_LAST_DIM_CONTIGUOUS(logits);
  const int64_t E = logits.size(1);
  FS_CHECK(E >= 1 && E <= 512, "logits must have 1 to 512 experts (columns), got ", E);
  FS_CHECK(topk >= 1 && topk <= 16, "topk must be in [1, 16], got ", topk);
  FS_CHECK(topk <= E, "topk (", topk, ") must not exceed the number of experts (", E, ")");
}

void route_noaux_tc_cuda(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                         int64_t topk, double routed_scaling_factor, bool renormalize, at::Tensor& topk_weights,
                         at::Tensor& topk_ids) {
  check_logits(logits, topk);
  const int64_t E = logits.size(1);
  FS_CHECK_CUDA(bias);
  FS_CHECK_SAME_DEVICE(logits, bias);
  FS_CHECK_DTYPE(bias, at::kFloat);
  FS_CHECK_SHAPE(bias, E);
  FS_CHECK_CONTIGUOUS(bias);
  FS_CHECK(n_group >= 1 && n_group <= 32, "n_group must be in [1, 32], got ", n_group);
  FS_CHECK(E % n_group == 0, "the number of experts (", E, ") must be divisible by n_group (", n_group, ")");
  FS_CHECK(E / n_group >= 2, "each group needs at least 2 experts (its score is a top-2 sum), got E=", E,
           " n_group=", n_group);
  FS_CHECK(topk_group >= 1 && topk_group <= n_group, "topk_group must be in [1, n_group=", n_group, "], got ",
           topk_group);
  FS_CHECK(topk <= topk_group * (E / n_group), "topk (", topk, ") must not exceed the experts in the kept groups (",
           topk_group, " x ", E / n_group, ")");
  check_outputs(logits, topk, topk_weights, topk_ids);
  if (logits.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  RouteParams p = base_params(logits, topk, renormalize, topk_weights, topk_ids);
  p.bias = bias.data_ptr<float>();
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.scale = static_cast<float>(routed_scaling_factor);
  launch_route_noaux_tc(p, current_stream(logits));
}

void route_softmax_topk_cuda(const at::Tensor& logits, int64_t topk, bool renormalize, at::Tensor& topk_weights,
                             at::Tensor& topk_ids) {
  check_logits(logits, topk);
  check_outputs(logits, topk, topk_weights, topk_ids);
  if (logits.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  RouteParams p = base_params(logits, topk, renormalize, topk_weights, topk_ids);
  launch_route_softmax_topk(p, current_stream(logits));
}

}  // namespace

void register_routing_cuda(torch::Library& m) {
  m.impl("route_noaux_tc", &route_noaux_tc_cuda);
  m.impl("route_softmax_topk", &route_softmax_topk_cuda);
}
}  // namespace flashseek
