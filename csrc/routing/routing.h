// Top-k routing launchers (plain CUDA, no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace flashseek {

enum class RouteDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct RouteParams {
  const void* logits;      // [T, E], unit stride along E
  int64_t logits_stride;   // elements between rows
  RouteDtype dtype;
  const float* bias;       // [E] fp32, noaux_tc only
  float* weights;          // [T, topk] fp32
  int64_t weights_stride;
  int32_t* ids;            // [T, topk] int32
  int64_t ids_stride;
  int64_t T;
  int E;                   // <= 512
  int n_group;             // noaux_tc: E % n_group == 0, E / n_group >= 2, n_group <= 32
  int topk_group;          // noaux_tc: 1..n_group
  int topk;                // 1..16, <= experts in the kept groups
  float scale;             // routed_scaling_factor (noaux_tc)
  bool renormalize;
};

void launch_route_noaux_tc(const RouteParams& p, cudaStream_t stream);
void launch_route_softmax_topk(const RouteParams& p, cudaStream_t stream);

}  // namespace flashseek
