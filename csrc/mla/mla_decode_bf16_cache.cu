// Decode dispatch for the bf16 latent cache (q bf16 or fp16): every tile runs a 64-row wgmma kernel
// (mla_decode_wgmma_bf16.cu), rows past s_q * h_q padded. Session 8 measured it against the 16- and
// 32-row mma.sync tiles on the same inputs (harness, H100): b=128 s_k=4096 h_q=32 219-222 against
// 253 us, h_q=16 216 against 224, s_k=8192 h_q=16 414-416 against 430 (2.93 TB/s), s_q=2 h_q=16 causal
// 240-242 against 267-271, b=1 and b=32 equal within 1 us; FlashMLA pads small head counts the same way.
#include "mla/mla_decode_kernel.cuh"

namespace flashseek::mla {
void launch_decode_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  launch_decode_wgmma_bf16_cache(p, q_fp16, stream);
}
}  // namespace flashseek::mla
