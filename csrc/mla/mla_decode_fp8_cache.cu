// Decode dispatch for the FP8 latent cache (656-byte tokens; q bf16 or fp16): 64-row tiles
// (s_q * h_q > 32) run the wgmma kernel (mla_decode_wgmma_fp8.cu); tiles of up to 32 rows the kernel
// that dequantizes into the MMA fragments (mla_decode_fp8_direct.cu).
#include <cstdlib>
#include <cstring>

#include "mla/mla_decode_kernel.cuh"

namespace flashseek::mla {
namespace {
// FLASHSEEK_MLA_DECODE=staged picks the mma.sync kernel that dequantizes each block into a bf16 tile
// first (read on every call, so one test process and one benchmark run can check and time both).
bool use_staged() {
  const char* s = std::getenv("FLASHSEEK_MLA_DECODE");
  return s != nullptr && std::strcmp(s, "staged") == 0;
}
}  // namespace

void launch_decode_fp8_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.rows > 32) {
    launch_decode_wgmma_fp8_cache(p, q_fp16, stream);
  } else if (!use_staged()) {
    launch_decode_fp8_direct(p, q_fp16, stream);
  } else if (q_fp16) {
    detail::launch_decode<__half>(p, stream);
  } else {
    detail::launch_decode<__nv_bfloat16>(p, stream);
  }
}
}  // namespace flashseek::mla
