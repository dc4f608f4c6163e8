// The staged-epilogue build of the decode GEMM kernel (fp8_gemm_skinny.cuh, kStageMinTokens).
#include "gemm/fp8_gemm_skinny_launch.cuh"

namespace flashseek {

void launch_skinny_kernel_staged(const CUtensorMap& tmap_w, const skinny::TokenMaps& tmap_x,
                                 const skinny::Params& kp, int ctas, cudaStream_t stream) {
  launch_skinny_kernel<true>(tmap_w, tmap_x, kp, ctas, stream);
}

}  // namespace flashseek
