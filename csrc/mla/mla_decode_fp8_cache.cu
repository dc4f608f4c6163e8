// Decode dispatch for the FP8 latent cache (656-byte tokens; q bf16 or fp16): 64-row tiles
// (s_q * h_q > 32) run the wgmma kernel (mla_decode_wgmma_fp8.cu), smaller tiles the mma.sync kernel.
#include "mla/mla_decode_kernel.cuh"

namespace flashseek::mla {
void launch_decode_fp8_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.rows > 32) {
    launch_decode_wgmma_fp8_cache(p, q_fp16, stream);
  } else if (q_fp16) {
    detail::launch_decode<__half, true>(p, stream);
  } else {
    detail::launch_decode<__nv_bfloat16, true>(p, stream);
  }
}
}  // namespace flashseek::mla
