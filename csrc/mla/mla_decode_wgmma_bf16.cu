// wgmma decode for the bf16 latent cache, 64-row tiles (q bf16 or fp16): the Q-in-registers kernel
// (mla_decode_qreg.cuh), the turn-taking kernel (mla_decode_seesaw.cuh) or the two-warpgroup one
// (mla_decode_wgmma.cuh).
#include <cstdlib>
#include <cstring>

#include "mla/mla_decode_wgmma.cuh"

namespace flashseek::mla {
namespace {
// The turn-taking kernel for s_q >= 2 with at least four row tiles (h_q = 128 and up), the
// two-warpgroup one otherwise. Bench runs of sessions 7-8 had the turn-taking kernel 1-9% faster at
// s_q = 2 h_q = 128 (causal, varlen; s_k = 16384: 2207-2231 vs 2358-2422 us) and slower at s_q = 1 and
// at every smaller s_q >= 2 tile count measured (harness, run 22: s_q = 2 h_q = 64 352-356 vs 316-325
// us, s_q = 4 h_q = 16 281 vs 256, s_q = 2 h_q = 32 277-278 vs 253). FLASHSEEK_MLA_DECODE=seesaw /
// =wgmma / =qreg, read on every call, force one of them (tests and A/Bs).
const char* forced_kernel() { return std::getenv("FLASHSEEK_MLA_DECODE"); }
bool forced(const char* name) {
  const char* s = forced_kernel();
  return s != nullptr && std::strcmp(s, name) == 0;
}
bool use_seesaw(const DecodeParams& p) {
  if (forced("seesaw")) return true;
  if (forced("wgmma") || forced("qreg")) return false;
  return p.s_q >= 2 && p.rows >= 4 * wg::kM;
}
bool use_qreg(const DecodeParams&) { return forced("qreg"); }
}  // namespace

void launch_decode_wgmma_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return;
  if (use_qreg(p) && launch_decode_qreg_bf16_cache(p, q_fp16, stream)) return;
  if (use_seesaw(p) && launch_decode_seesaw_bf16_cache(p, q_fp16, stream)) return;
  if (q_fp16) {
    wg::launch_decode_wgmma<__half, false>(p, stream);
  } else {
    wg::launch_decode_wgmma<__nv_bfloat16, false>(p, stream);
  }
}
}  // namespace flashseek::mla
