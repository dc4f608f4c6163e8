// Host glue for the routing kernels: validates inputs and calls the launchers.
#include "common/torch_checks.h"
#include "registration.h"
#include "routing/routing.h"
#include "routing/routing_checks.h"

#include <ATen/ATen.h>

namespace flashseek {

RouteDtype route_dtype(const at::Tensor& logits) {
  switch (logits.scalar_type()) {
    case at::kFloat: return RouteDtype::kF32;
    case at::kBFloat16: return RouteDtype::kBF16;
    case at::kHalf: return RouteDtype::kF16;
    default: FS_CHECK(false, "logits must have dtype float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  return RouteDtype::kF32;
}

void check_route_outputs(const at::Tensor& logits, int64_t topk, const at::Tensor& topk_weights,
                         const at::Tensor& topk_ids) {
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

namespace {

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

}  // namespace

// The grouped top-k's parameters against the logits [T, E] (and the selection bias [E]).
void check_noaux_params(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                        int64_t topk) {
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
}

RouteParams noaux_route_params(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                               int64_t topk, double routed_scaling_factor, bool renormalize, at::Tensor& topk_weights,
                               at::Tensor& topk_ids) {
  RouteParams p = base_params(logits, topk, renormalize, topk_weights, topk_ids);
  p.bias = bias.data_ptr<float>();
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.scale = static_cast<float>(routed_scaling_factor);
  return p;
}

namespace {

void route_noaux_tc_cuda(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                         int64_t topk, double routed_scaling_factor, bool renormalize, at::Tensor& topk_weights,
                         at::Tensor& topk_ids) {
  check_noaux_params(logits, bias, n_group, topk_group, topk);
  check_route_outputs(logits, topk, topk_weights, topk_ids);
  if (logits.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const RouteParams p = noaux_route_params(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize,
                                           topk_weights, topk_ids);
  launch_route_noaux_tc(p, current_stream(logits));
}

void route_softmax_topk_cuda(const at::Tensor& logits, int64_t topk, bool renormalize, at::Tensor& topk_weights,
                             at::Tensor& topk_ids) {
  check_logits(logits, topk);
  check_route_outputs(logits, topk, topk_weights, topk_ids);
  if (logits.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  RouteParams p = base_params(logits, topk, renormalize, topk_weights, topk_ids);
  launch_route_softmax_topk(p, current_stream(logits));
}

void route_noaux_tc_gate_cuda(const at::Tensor& hidden, const at::Tensor& gate_weight, const at::Tensor& bias,
                              int64_t n_group, int64_t topk_group, int64_t topk, double routed_scaling_factor,
                              bool renormalize, at::Tensor& topk_weights, at::Tensor& topk_ids, at::Tensor& logits) {
  FS_CHECK_CUDA(hidden);
  FS_CHECK_CUDA(gate_weight);
  FS_CHECK_SAME_DEVICE(hidden, gate_weight);
  FS_CHECK_DTYPE(hidden, at::kBFloat16);
  FS_CHECK_DTYPE(gate_weight, at::kBFloat16);
  FS_CHECK_DIM(hidden, 2);
  FS_CHECK_DIM(gate_weight, 2);
  FS_CHECK_CONTIGUOUS(hidden);
  FS_CHECK_CONTIGUOUS(gate_weight);
  const int64_t T = hidden.size(0), H = hidden.size(1), E = gate_weight.size(0);
  FS_CHECK(gate_weight.size(1) == H, "gate_weight must have shape [E, H=", H, "], got ", gate_weight.sizes());
  FS_CHECK(H > 0 && H % kGateKBlock == 0, "the hidden size must be a positive multiple of ", kGateKBlock, ", got ",
           H);
  FS_CHECK(T <= kGateMaxT, "route_noaux_tc_gate takes at most ", kGateMaxT, " tokens, got ", T,
           " (flashseek.ops.route_noaux_tc_gate falls back to a GEMM + route_noaux_tc above that)");
  FS_CHECK(aligned16(hidden) && aligned16(gate_weight),
           "hidden and gate_weight must be 16-byte aligned");
  FS_CHECK_CUDA(logits);
  FS_CHECK_SAME_DEVICE(hidden, logits);
  FS_CHECK_DTYPE(logits, at::kFloat);
  FS_CHECK_SHAPE(logits, T, E);
  FS_CHECK_CONTIGUOUS(logits);
  FS_CHECK(aligned16(logits), "logits must be 16-byte aligned");
  // The routing checks, on the logits output (its shape is [T, E]).
  check_noaux_params(logits, bias, n_group, topk_group, topk);
  check_route_outputs(logits, topk, topk_weights, topk_ids);
  if (T == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor partials = at::empty({H / kGateKBlock, T, E}, logits.options());
  GateRouteParams p{};
  p.hidden = hidden.data_ptr();
  p.gate_weight = gate_weight.data_ptr();
  p.logits = logits.data_ptr<float>();
  p.partials = partials.data_ptr<float>();
  p.H = static_cast<int>(H);
  p.route = base_params(logits, topk, renormalize, topk_weights, topk_ids);
  p.route.bias = bias.data_ptr<float>();
  p.route.n_group = static_cast<int>(n_group);
  p.route.topk_group = static_cast<int>(topk_group);
  p.route.scale = static_cast<float>(routed_scaling_factor);
  launch_route_noaux_tc_gate(p, current_stream(hidden));
}

void router_logits_cuda(const at::Tensor& hidden, const at::Tensor& weight, at::Tensor& out) {
  FS_CHECK_CUDA(hidden);
  FS_CHECK_CUDA(weight);
  FS_CHECK_CUDA(out);
  FS_CHECK_SAME_DEVICE(hidden, weight);
  FS_CHECK_SAME_DEVICE(hidden, out);
  FS_CHECK_DTYPE(hidden, at::kBFloat16);
  FS_CHECK_DTYPE(weight, at::kBFloat16);
  FS_CHECK_DTYPE(out, at::kFloat);
  FS_CHECK_DIM(hidden, 2);
  FS_CHECK_DIM(weight, 2);
  const int64_t T = hidden.size(0), H = hidden.size(1), E = weight.size(0);
  FS_CHECK(weight.size(1) == H, "weight must have shape [E, H=", H, "], got ", weight.sizes());
  FS_CHECK(H % 8 == 0, "the hidden size must be a multiple of 8, got ", H);
  FS_CHECK(T <= kRouterLogitsMaxT, "router_logits takes at most ", kRouterLogitsMaxT, " tokens, got ", T,
           " (flashseek.ops.router_logits runs a GEMM above that)");
  FS_CHECK(E <= (int64_t(1) << 20), "router_logits: too many experts (", E, ")");
  auto rows_ok = [](const at::Tensor& t) {
    return t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) % 8 == 0) && aligned16(t);
  };
  FS_CHECK(rows_ok(hidden), "hidden must have a unit stride along H, a row stride multiple of 8 and 16-byte "
           "alignment, got strides ", hidden.strides());
  FS_CHECK(rows_ok(weight), "weight must have a unit stride along H, a row stride multiple of 8 and 16-byte "
           "alignment, got strides ", weight.strides());
  FS_CHECK_SHAPE(out, T, E);
  FS_CHECK(out.stride(1) == 1 || E <= 1, "out must have a unit stride along E, got strides ", out.strides());
  if (T == 0 || E == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  RouterLogitsParams p{};
  p.hidden = hidden.data_ptr();
  p.x_stride = hidden.stride(0);
  p.weight = weight.data_ptr();
  p.w_stride = weight.stride(0);
  p.out = out.data_ptr<float>();
  p.out_stride = out.stride(0);
  p.T = static_cast<int>(T);
  p.E = static_cast<int>(E);
  p.H = static_cast<int>(H);
  launch_router_logits(p, current_stream(hidden));
}

}  // namespace

void register_routing_cuda(torch::Library& m) {
  m.impl("router_logits", &router_logits_cuda);
  m.impl("route_noaux_tc", &route_noaux_tc_cuda);
  m.impl("route_softmax_topk", &route_softmax_topk_cuda);
  m.impl("route_noaux_tc_gate", &route_noaux_tc_gate_cuda);
}
}  // namespace flashseek
