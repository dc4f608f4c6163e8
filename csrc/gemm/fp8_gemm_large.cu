// Dense FP8 block-scaled GEMM for M > 128, persistent data-parallel tile scheduler (see
// fp8_gemm_large.cuh for the kernel and fp8_gemm_dispatch.cu for when it runs).
#include "gemm/fp8_gemm_large.cuh"

namespace flashseek {
namespace {
using Large = cutlass_fp8::LargeGemm<cutlass::gemm::PersistentScheduler>;
}  // namespace

size_t fp8_gemm_large_workspace(const Fp8GemmParams& p) { return Large::workspace(p); }

void launch_fp8_gemm_large(const Fp8GemmParams& p, void* workspace, cudaStream_t stream) {
  Large::launch(p, workspace, stream);
}

}  // namespace flashseek
