// The Q-in-registers decode kernel (mla_decode_qreg.cuh) for the bf16 cache, q bf16 or fp16.
#include "mla/mla_decode_qreg.cuh"

namespace flashseek::mla {

bool launch_decode_qreg_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  CUtensorMap map;
  if (!seesaw::kv_tensor_map(p, map)) return false;
  return q_fp16 ? qreg::launch_decode_qreg<__half>(p, map, stream)
                : qreg::launch_decode_qreg<__nv_bfloat16>(p, map, stream);
}

}  // namespace flashseek::mla
