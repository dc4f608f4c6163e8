// The inner step shared by both head GEMV kernels (mla_head_gemv.cu, mla_head_gemv_smem.cu): one weight
// row k (8 consecutive bf16 columns) into every token's 8 fp32 accumulators, with the tokens' rows of a
// staged in shared memory as [T][K] bf16. One definition keeps the two kernels' sums the same fmaf chain.
#pragma once
#include <cuda_bf16.h>

#include "mla/mla_cache_token.cuh"

namespace flashseek::mla {

template <int kT>
__device__ __forceinline__ void fma_weight_row(float (&acc)[kT][8], const uint4& w, const __nv_bfloat16* sa, int K,
                                               int T, int k) {
  float wf[8];
  to_float8<__nv_bfloat16>(w, wf);
#pragma unroll
  for (int t = 0; t < kT; ++t) {
    if (t < T) {
      const float av = __bfloat162float(sa[t * K + k]);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[t][j] = fmaf(av, wf[j], acc[t][j]);
    }
  }
}

}  // namespace flashseek::mla
