// The FP8-cache decode kernel for tiles of up to 32 rows (mla_decode_fp8_direct.cuh).
#include "mla/mla_decode_fp8_direct.cuh"

namespace flashseek::mla {
void launch_decode_fp8_direct(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return;
  if (p.rows <= 16) {
    q_fp16 ? direct::launch<__half, 1>(p, stream) : direct::launch<__nv_bfloat16, 1>(p, stream);
  } else {
    q_fp16 ? direct::launch<__half, 2>(p, stream) : direct::launch<__nv_bfloat16, 2>(p, stream);
  }
}
}  // namespace flashseek::mla
