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

// Gate GEMM + noaux_tc routing for small T (routing_gate.cu): logits = hidden @ gate_weight^T in
// fp32, accumulated in the fixed order of flashseek/ref/routing.py:gate_logits_fp32, then routed
// exactly like launch_route_noaux_tc on those logits. `route` carries the routing parameters and
// the outputs (route.logits / dtype / stride are set by the launcher to the logits output).
constexpr int kGateMaxT = 64;      // tokens per call
constexpr int kGateKBlock = 512;   // H % kGateKBlock == 0
struct GateRouteParams {
  const void* hidden;       // [T, H] bf16, contiguous, 16-byte aligned
  const void* gate_weight;  // [E, H] bf16, contiguous, 16-byte aligned
  float* logits;            // [T, E] fp32 out, contiguous
  float* partials;          // [H / kGateKBlock, T, E] fp32 scratch
  int H;
  RouteParams route;        // T <= kGateMaxT, E, bias, routing parameters, weights / ids outputs
};
void launch_route_noaux_tc_gate(GateRouteParams p, cudaStream_t stream);
void launch_route_softmax_topk(const RouteParams& p, cudaStream_t stream);

// The MoE router's fp32 logits for decode-sized T (router_logits.cu): out[t, e] = sum_k x[t, k] *
// w[e, k], bf16 products accumulated in fp32 (one launch; above kRouterLogitsMaxT the torch wrapper
// runs a GEMM with fp32 output). Every CTA reads every token row once per weight unit, so the kernel
// pays T times the x traffic: on an H100 it took 3.5 us at T = 1 against the GEMM path's 9.0, but
// 15.1 at T = 8 (9.9) and 55.3 at T = 32 (10.6) (session 9, run 6).
constexpr int kRouterLogitsMaxT = 4;
struct RouterLogitsParams {
  const void* hidden;   // bf16 [T, H], unit stride along H, 16-byte aligned rows
  int64_t x_stride;
  const void* weight;   // bf16 [E, H], unit stride along H, 16-byte aligned rows
  int64_t w_stride;
  float* out;           // fp32 [T, E], unit stride along E
  int64_t out_stride;
  int T, E, H;          // T <= kRouterLogitsMaxT, H % 8 == 0
};
void launch_router_logits(const RouterLogitsParams& p, cudaStream_t stream);

}  // namespace flashseek
