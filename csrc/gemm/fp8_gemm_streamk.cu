// Dense FP8 block-scaled GEMM for M > 128, stream-K tile scheduler: the same 128x128x128 cooperative
// 2x1-cluster kernel as fp8_gemm_large.cu, but the tiles that would form a mostly empty last wave
// are split along K across all SMs (CUTLASS's hybrid decomposition: full data-parallel waves, then
// stream-K units of >= 8 K blocks whose fp32 partials are reduced in the workspace in a fixed order,
// so results are deterministic). Chosen by fp8_gemm_dispatch.cu when the data-parallel tiling wastes
// a large part of its last wave (e.g. 4096x2112: 544 tiles on 132 SMs = 4.12 waves).
#include "gemm/fp8_gemm_large.cuh"

namespace flashseek {
namespace {
using StreamK = cutlass_fp8::LargeGemm<cutlass::gemm::StreamKScheduler>;
}  // namespace

size_t fp8_gemm_streamk_workspace(const Fp8GemmParams& p) { return StreamK::workspace(p); }

void launch_fp8_gemm_streamk(const Fp8GemmParams& p, void* workspace, cudaStream_t stream) {
  StreamK::launch(p, workspace, stream);
}

}  // namespace flashseek
