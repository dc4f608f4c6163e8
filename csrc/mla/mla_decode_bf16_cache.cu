// Decode instantiations for the bf16 latent cache (q bf16 or fp16).
#include "mla/mla_decode_kernel.cuh"

namespace flashseek::mla {
void launch_decode_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (q_fp16) {
    detail::launch_decode<__half, false>(p, stream);
  } else {
    detail::launch_decode<__nv_bfloat16, false>(p, stream);
  }
}
}  // namespace flashseek::mla
