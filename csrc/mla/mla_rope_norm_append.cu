// The pre-attention glue of an MLA layer in one launch (spec: flashseek/ref/mla.py,
// mla_rope_norm_append), replacing the kv_a RMSNorm, two rope applications (each ~8 torch kernels)
// and the cache append. The first ceil(T / 4) CTAs take one token a warp (kv_token), the others
// 16 heads of one token each (q_rope); the pieces and their exactness are in mla_rope_device.cuh.
#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "mla/mla_params.h"
#include "mla/mla_rope_device.cuh"

namespace flashseek::mla {
namespace {

using namespace rope_dev;

constexpr int kThreads = 128;
constexpr int kTokensPerKvCta = kThreads / 32;
constexpr int kHeadsPerQCta = kThreads / kThreadsPerHead;   // 16
template <typename T, typename W, bool kFp8>
__global__ void __launch_bounds__(kThreads) mla_rope_norm_append_kernel(const __grid_constant__ RopeNormAppendParams p) {
  // A programmatic dependent launch (common/pdl.cuh): it starts during q_b's GEMM, and lets the W_UK
  // projection after it start (and read its weights) during its own run. The metadata, tables and
  // weights are read before the wait, so only kv / q_pe (q_b's and qkv_a's outputs) are left behind it:
  // one L2 round trip after the wait instead of two (positions, then cos/sin). Session 25, H200 A/B:
  // -1.1 us in the b=1 MoE layer, -0.9 in the b=16 dense one, a tie in the b=1 dense one.
  pdl_launch_dependents();
  const int kv_ctas = (p.tokens + kTokensPerKvCta - 1) / kTokensPerKvCta;
  if (int(blockIdx.x) < kv_ctas) {
    const int tok = blockIdx.x * kTokensPerKvCta + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (tok >= p.tokens) {
      pdl_wait();
      return;
    }
    const KvPre k = kv_pre<W>(p, tok, lane);
    pdl_wait();
    kv_token<T, W, kFp8>(p, k, tok, lane);
    return;
  }
  const int q_ctas_per_token = (p.heads + kHeadsPerQCta - 1) / kHeadsPerQCta;
  const int qb = blockIdx.x - kv_ctas;
  const int tok = qb / q_ctas_per_token;
  const int head = (qb % q_ctas_per_token) * kHeadsPerQCta + threadIdx.x / kThreadsPerHead;
  const int part = threadIdx.x % kThreadsPerHead;
  const QPre q = q_pre(p, tok, part);
  pdl_wait();
  if (head < p.heads) q_rope<T>(p, q, tok, head, part);
}

template <typename T, typename W>
void launch_typed(const RopeNormAppendParams& p, bool fp8_cache, cudaStream_t stream) {
  const int64_t kv_ctas = (p.tokens + kTokensPerKvCta - 1) / kTokensPerKvCta;
  const int64_t q_ctas = int64_t(p.tokens) * ((p.heads + kHeadsPerQCta - 1) / kHeadsPerQCta);
  const dim3 grid(unsigned(kv_ctas + q_ctas));  // < 2^31: checked by the host glue
  if (fp8_cache) {
    launch_pdl(mla_rope_norm_append_kernel<T, W, true>, grid, dim3(kThreads), 0, stream, p);
  } else {
    launch_pdl(mla_rope_norm_append_kernel<T, W, false>, grid, dim3(kThreads), 0, stream, p);
  }
  FS_CHECK_LAUNCH();
}

template <typename T>
void launch_weight(const RopeNormAppendParams& p, bool fp8_cache, cudaStream_t stream) {
  switch (p.weight_dtype) {
    case WeightDtype::kBFloat16: launch_typed<T, __nv_bfloat16>(p, fp8_cache, stream); break;
    case WeightDtype::kFloat16: launch_typed<T, __half>(p, fp8_cache, stream); break;
    case WeightDtype::kFloat32: launch_typed<T, float>(p, fp8_cache, stream); break;
  }
}

}  // namespace

void launch_rope_norm_append(const RopeNormAppendParams& p, bool fp8_cache, cudaStream_t stream) {
  if (p.tokens == 0) return;
  if (p.fp16_input) {
    launch_weight<__half>(p, fp8_cache, stream);
  } else {
    launch_weight<__nv_bfloat16>(p, fp8_cache, stream);
  }
}

}  // namespace flashseek::mla
