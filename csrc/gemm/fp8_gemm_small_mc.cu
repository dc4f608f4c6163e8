// Dense FP8 block-scaled GEMM for 64 < M <= 128 without split-K: the swapped 128x64 kernel in 1x2
// clusters along the tokens, so that the two token tiles of every 128-row weight tile receive the
// weight tile through one TMA multicast instead of two L2 reads (the L2 read traffic of
// 128x7168x16384 drops from 2 x 117 MB weights + 117 MB activations to 117 + 117 MB).
#include "gemm/fp8_gemm_small.cuh"

namespace flashseek {
namespace {
using GemmMc = cutlass_fp8::small_gemm::SwapGemm<cutlass::bfloat16_t, 2>;
}  // namespace

size_t fp8_gemm_small_mc_workspace(const Fp8GemmParams& p) {
  return GemmMc::Gemm::get_workspace_size(GemmMc::make_args(p, 1, nullptr));
}

void launch_fp8_gemm_small_mc(const Fp8GemmParams& p, void* workspace, cudaStream_t stream) {
  auto* d = static_cast<cutlass::bfloat16_t*>(p.out);
  cutlass_fp8::run_gemm<GemmMc::Gemm>(GemmMc::make_args(p, 1, d), GemmMc::key(p, 1, d), workspace, stream);
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek
