// Dense FP8 block-scaled GEMM for M <= 64 (decode), stream-K scheduler: the swapped 128x64 kernel of
// fp8_gemm_small.cuh, with CUTLASS spreading the weight tiles' K blocks over every SM and reducing the
// partial tiles in the kernel (fixed-order reduction in the workspace, deterministic). A decode GEMM
// is a weight stream: what matters is that every SM pulls weights until the end. Against the split-K
// path (fp32 partials, then a reduction kernel) it saves the second launch and the partials'
// round trip, and it also balances tile counts that leave a partial last wave (e.g. 24576x1536:
// 192 tiles on 132 SMs).
#include "gemm/fp8_gemm_small.cuh"

namespace flashseek {
namespace {
using GemmSk = cutlass_fp8::small_gemm::SwapGemm<cutlass::bfloat16_t, 1, cutlass::gemm::StreamKScheduler>;
}  // namespace

size_t fp8_gemm_small_streamk_workspace(const Fp8GemmParams& p) {
  return GemmSk::Gemm::get_workspace_size(GemmSk::make_args(p, 1, nullptr));
}

void launch_fp8_gemm_small_streamk(const Fp8GemmParams& p, void* workspace, cudaStream_t stream) {
  auto* d = static_cast<cutlass::bfloat16_t*>(p.out);
  cutlass_fp8::run_gemm<GemmSk::Gemm>(GemmSk::make_args(p, 1, d), GemmSk::key(p, 1, d), workspace, stream);
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek
