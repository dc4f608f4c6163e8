// wgmma decode for the bf16 latent cache, 64-row tiles (q bf16 or fp16): the Q-in-registers kernel
// (mla_decode_qreg.cuh), the turn-taking kernel (mla_decode_seesaw.cuh) or the two-warpgroup one
// (mla_decode_wgmma.cuh).
#include <cstdlib>
#include <cstring>

#include "mla/mla_decode_wgmma.cuh"

namespace flashseek::mla {
namespace {
// Which kernel runs a call. FLASHSEEK_MLA_DECODE=wgmma / =seesaw / =qreg, read on every call, forces one
// (tests and A/Bs). By default:
// - two or more row tiles (s_q * h_q > 64) at batch >= 8: the Q-in-registers kernel. Session 19, one
//   H100. Graph replays at s_q = 1, s_k = 4096 (µs, two-warpgroup -> qreg): b=128 h_q=128 299 -> 263,
//   b=64 154.3 -> 134.3, b=16 51.0 -> 46.3, b=32 s_k=1024 34.8 -> 32.8; a tie at b=4 (21.5 / 21.6) and
//   slower at b=1 (14.6 / 15.5), where each CTA runs two blocks and the extra prologue (Q into
//   registers) is not paid back. bench mla (eager, alternating, at the power cap), b=128 h_q=128:
//   s_q = 1 327.6 (two-warpgroup) / 328.0 (turn-taking) / 272.4 (qreg); s_q = 2 causal varlen at 4096
//   keys 655.1 / 602.8 / 567.7 and at 16384 keys 2389.7 / 2127.4 / 2060.7.
// - below batch 8, s_q >= 2 with four or more row tiles: the turn-taking kernel (sessions 7-8: 1-9%
//   faster than the two-warpgroup one at s_q = 2 h_q = 128, slower at every smaller tile count).
// - otherwise the two-warpgroup kernel (one row tile is memory-bound: b=64 h_q=64 121.4 against qreg's
//   122.1, b=128 h_q=32 216.9 / 216.0).
enum class Kernel { kByShape, kWgmma, kSeesaw, kQreg };  // kWgmma: also every rule's fallback
// FLASHSEEK_MLA_DECODE, read once per rule lookup (kernels_to_try: twice a call); values naming other
// tiles' kernels (e.g. staged) leave the choice to the shape.
Kernel forced_kernel() {
  const char* s = std::getenv("FLASHSEEK_MLA_DECODE");
  if (s == nullptr) return Kernel::kByShape;
  if (std::strcmp(s, "wgmma") == 0) return Kernel::kWgmma;
  if (std::strcmp(s, "seesaw") == 0) return Kernel::kSeesaw;
  if (std::strcmp(s, "qreg") == 0) return Kernel::kQreg;
  return Kernel::kByShape;
}
bool qreg_shape(const DecodeParams& p) { return p.rows > wg::kM && p.batch >= 8; }
bool seesaw_shape(const DecodeParams& p) { return p.s_q >= 2 && p.rows >= 4 * wg::kM; }
// The kernels a call tries, in this order: the Q-in-registers one, the turn-taking one, and then always
// the two-warpgroup one.
struct KernelsToTry {
  bool qreg, seesaw;
};
KernelsToTry kernels_to_try(const DecodeParams& p) {
  const Kernel forced = forced_kernel();
  const bool by_shape = forced == Kernel::kByShape;
  return {forced == Kernel::kQreg || (by_shape && qreg_shape(p)),
          forced == Kernel::kSeesaw || (by_shape && seesaw_shape(p))};
}
}  // namespace

bool decode_merges_cluster_pairs(const DecodeParams& p, bool fp8_cache) {
  if (fp8_cache) return p.rows > 32;  // the FP8 wgmma kernel; narrower tiles run the direct kernel
  const KernelsToTry k = kernels_to_try(p);
  return k.qreg || !k.seesaw;  // the turn-taking kernel runs only where the Q-in-registers one is not tried
}

void launch_decode_wgmma_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return;
  // The TMA-fed kernels return false when a map cannot describe q or the cache; the next one is tried.
  const KernelsToTry k = kernels_to_try(p);
  if (k.qreg && launch_decode_qreg_bf16_cache(p, q_fp16, stream)) return;
  if (k.seesaw && launch_decode_seesaw_bf16_cache(p, q_fp16, stream)) return;
  if (q_fp16) {
    wg::launch_decode_wgmma<__half, false>(p, stream);
  } else {
    wg::launch_decode_wgmma<__nv_bfloat16, false>(p, stream);
  }
}
}  // namespace flashseek::mla
