// Input validation and parameter set-up of the routing ops (routing_ops.cpp), shared with the ops
// that route inside a larger kernel (moe/moe_ops.cpp): one set of checks and messages.
#pragma once
#include <ATen/ATen.h>

#include "routing/routing.h"

namespace flashseek {

// The logits' dtype (float32, bfloat16 or float16; anything else fails the check).
RouteDtype route_dtype(const at::Tensor& logits);
// topk_weights fp32 / topk_ids int32 [T, topk] on the logits' device, unit stride along topk.
void check_route_outputs(const at::Tensor& logits, int64_t topk, const at::Tensor& topk_weights,
                         const at::Tensor& topk_ids);
// route_noaux_tc's parameters against the logits [T, E] and the selection bias [E].
void check_noaux_params(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                        int64_t topk);
// launch_route_noaux_tc's parameters (after the checks above).
RouteParams noaux_route_params(const at::Tensor& logits, const at::Tensor& bias, int64_t n_group, int64_t topk_group,
                               int64_t topk, double routed_scaling_factor, bool renormalize, at::Tensor& topk_weights,
                               at::Tensor& topk_ids);

}  // namespace flashseek
