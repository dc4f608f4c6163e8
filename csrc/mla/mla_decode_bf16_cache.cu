// Decode dispatch for the bf16 latent cache (q bf16 or fp16): 64-row tiles (s_q * h_q > 32) run the
// wgmma kernel (mla_decode_wgmma_bf16.cu), smaller tiles the mma.sync kernel.
#include "mla/mla_decode_kernel.cuh"

namespace flashseek::mla {
void launch_decode_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.rows > 32) {
    launch_decode_wgmma_bf16_cache(p, q_fp16, stream);
  } else if (q_fp16) {
    detail::launch_decode<__half, false>(p, stream);
  } else {
    detail::launch_decode<__nv_bfloat16, false>(p, stream);
  }
}
}  // namespace flashseek::mla
