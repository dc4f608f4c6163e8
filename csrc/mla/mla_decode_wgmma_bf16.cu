// wgmma decode instantiations for the bf16 latent cache, 64-row tiles (q bf16 or fp16).
#include "mla/mla_decode_wgmma.cuh"

namespace flashseek::mla {
void launch_decode_wgmma_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return;
  if (q_fp16) {
    wg::launch_decode_wgmma<__half, false>(p, stream);
  } else {
    wg::launch_decode_wgmma<__nv_bfloat16, false>(p, stream);
  }
}
}  // namespace flashseek::mla
