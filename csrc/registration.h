// Each kernel family registers its CUDA implementations in csrc/<family>/<family>_ops.cpp.
#pragma once
#include <torch/library.h>

namespace flashseek {
void register_quant_cuda(torch::Library& m);
void register_gemm_cuda(torch::Library& m);
void register_routing_cuda(torch::Library& m);
void register_moe_cuda(torch::Library& m);
void register_mla_cuda(torch::Library& m);
void register_norm_cuda(torch::Library& m);
}  // namespace flashseek
