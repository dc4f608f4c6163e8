// wgmma decode for the bf16 latent cache, 64-row tiles (q bf16 or fp16): the turn-taking kernel
// (mla_decode_seesaw.cuh) or the two-warpgroup one (mla_decode_wgmma.cuh).
#include <cstdlib>
#include <cstring>

#include "mla/mla_decode_wgmma.cuh"

namespace flashseek::mla {
namespace {
// FLASHSEEK_MLA_DECODE=wgmma forces the two-warpgroup kernel; read on every call so that one test
// process can check both kernels. The turn-taking kernel is opt-in (=seesaw) until measured.
bool use_seesaw() {
  const char* s = std::getenv("FLASHSEEK_MLA_DECODE");
  return s != nullptr && std::strcmp(s, "seesaw") == 0;
}
}  // namespace

void launch_decode_wgmma_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return;
  if (use_seesaw() && launch_decode_seesaw_bf16_cache(p, q_fp16, stream)) return;
  if (q_fp16) {
    wg::launch_decode_wgmma<__half, false>(p, stream);
  } else {
    wg::launch_decode_wgmma<__nv_bfloat16, false>(p, stream);
  }
}
}  // namespace flashseek::mla
