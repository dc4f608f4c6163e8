// Dense FP8 block-scaled GEMM for M <= 128 without a cluster: bf16 out, or fp32 split-K partials
// (the kernel template and the swapped mapping are in fp8_gemm_small.cuh).
#include "gemm/fp8_gemm_small.cuh"

namespace flashseek {
namespace {
using namespace flashseek::cutlass_fp8;
using small_gemm::SwapGemm;

using GemmBf16 = SwapGemm<cutlass::bfloat16_t, 1>;
using GemmF32 = SwapGemm<float, 1>;

}  // namespace

size_t fp8_gemm_small_workspace(const Fp8GemmParams& p, int split_k) {
  if (split_k == 1) return GemmBf16::Gemm::get_workspace_size(GemmBf16::make_args(p, 1, nullptr));
  return GemmF32::Gemm::get_workspace_size(GemmF32::make_args(p, split_k, nullptr));
}

void launch_fp8_gemm_small(const Fp8GemmParams& p, int split_k, float* partials, void* workspace,
                           cudaStream_t stream) {
  if (split_k == 1) {
    auto* d = static_cast<cutlass::bfloat16_t*>(p.out);
    run_gemm<GemmBf16::Gemm>(GemmBf16::make_args(p, 1, d), GemmBf16::key(p, 1, d), workspace, stream);
  } else {
    run_gemm<GemmF32::Gemm>(GemmF32::make_args(p, split_k, partials), GemmF32::key(p, split_k, partials), workspace,
                            stream);
  }
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek
