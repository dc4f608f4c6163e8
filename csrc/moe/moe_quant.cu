// Token rows -> FP8 1x128 rows of the grouped-GEMM input, fused with the dispatch permutation.
//
// A half-warp owns one 128-column block: 16 lanes x 8 bf16 (one 16-byte load each), the block amax
// by four xor-shuffles that stay inside the half-warp, then 8 e4m3 bytes per lane. The math is
// flashseek/ref/quant.py step for step (s = max(amax, 1e-4) / 448 and x / s with IEEE division,
// NaN-propagating amax, RNE + SATFINITE as the reference's clamp + cast), so rows are bit-identical.
// Scatter mode quantizes each token once and stores it to its topk rows: prefill reads the hidden
// states once instead of topk times, and decode writes only the rows that exist.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "moe/moe.h"
#include "moe/moe_quant_device.cuh"

namespace flashseek {
namespace {

constexpr int kBlocksPerCta = 16;  // 128-column blocks per CTA (two per warp)
constexpr int kThreads = kBlocksPerCta * 16;
using moe_dev::QuantizedChunk;
using moe_dev::quantize_chunk;

__device__ __forceinline__ void store_row_chunk(const MoeQuantParams& p, int64_t row, int kb, int hl,
                                                const QuantizedChunk& c) {
  const int64_t g = row / p.rows_per_group, m = row - g * p.rows_per_group;
  uint8_t* dst = p.out + g * p.out_gstride + m * p.out_rstride + int64_t(kb) * 128 + hl * 8;
  *reinterpret_cast<uint2*>(dst) = c.q;
  if (hl == 0) p.scale[g * p.s_gstride + m + int64_t(kb) * p.s_ld] = c.scale;
}

__device__ __forceinline__ uint4 load_chunk(const MoeQuantParams& p, int64_t token, int kb, int hl) {
  const __nv_bfloat16* src = static_cast<const __nv_bfloat16*>(p.hidden) + token * p.hidden_stride +
                             int64_t(kb) * 128 + hl * 8;
  return __ldg(reinterpret_cast<const uint4*>(src));
}

__global__ void __launch_bounds__(kThreads) moe_gather_quant_kernel(const MoeQuantParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const int kb = blockIdx.y * kBlocksPerCta + (threadIdx.x >> 4);
  const int hl = threadIdx.x & 15;
  if (kb * 128 >= p.H) return;  // whole half-warps leave together; shuffles stay inside one
  const int64_t slot = p.sorted_ids[row];
  const bool real = slot >= 0 && slot < p.T * p.topk;
  const uint4 raw = real ? load_chunk(p, slot / p.topk, kb, hl) : make_uint4(0, 0, 0, 0);
  store_row_chunk(p, row, kb, hl, quantize_chunk(raw, p.ue8m0));
}

__global__ void __launch_bounds__(kThreads) moe_scatter_quant_kernel(const MoeQuantParams p) {
  pdl_wait();
  pdl_launch_dependents();
  const int64_t token = blockIdx.x;
  const int kb = blockIdx.y * kBlocksPerCta + (threadIdx.x >> 4);
  const int hl = threadIdx.x & 15;
  if (kb * 128 >= p.H) return;
  const QuantizedChunk c = quantize_chunk(load_chunk(p, token, kb, hl), p.ue8m0);
  const int32_t* slots = p.token_slots + token * p.token_slots_stride;
  for (int j = 0; j < p.topk; ++j) {
    const int64_t row = __ldg(slots + j);
    if (row >= 0 && row < p.rows) store_row_chunk(p, row, kb, hl, c);
  }
}

}  // namespace

void launch_moe_gather_quant(const MoeQuantParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.H == 0) return;
  const dim3 grid(unsigned(p.rows), unsigned((p.H / 128 + kBlocksPerCta - 1) / kBlocksPerCta));
  launch_pdl(moe_gather_quant_kernel, grid, dim3(kThreads), 0, stream, p);
}

void launch_moe_scatter_quant(const MoeQuantParams& p, cudaStream_t stream) {
  if (p.T == 0 || p.H == 0 || p.rows == 0) return;
  const dim3 grid(unsigned(p.T), unsigned((p.H / 128 + kBlocksPerCta - 1) / kBlocksPerCta));
  launch_pdl(moe_scatter_quant_kernel, grid, dim3(kThreads), 0, stream, p);
}

}  // namespace flashseek
