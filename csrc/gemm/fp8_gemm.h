// FP8 block-scaled GEMM launchers (plain CUDA + CUTLASS, no torch headers).
//
// out[m, n] = sum_kb (a[m, kb-block] . b[n, kb-block]) * a_scale[m, kb] * b_scale[n / 128, kb]
// a e4m3 [M, K] K-major, b e4m3 [N, K] K-major, out bf16 [M, N] row-major.
// a_scale fp32, element (i, kb) at a_scale[kb * a_scale_ld + i] (MN-major, a_scale_ld % 4 == 0).
// b_scale fp32 [ceil(N/128), K/128] row-major (K-major).
#pragma once
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>

namespace flashseek {

struct Fp8GemmParams {
  const void* a;
  const float* a_scale;
  int64_t a_scale_ld;
  const void* b;
  const float* b_scale;
  void* out;
  int m, n, k;
  int sm_count;
};

// Which kernel runs a dense problem, and how its K is split (decided on the host from m, n, k).
struct Fp8GemmPlan {
  bool swap_ab;     // tokens in the MMA's N (small m)
  int split_k;      // > 1: fp32 partials in the workspace, then a reduction kernel
  size_t workspace_bytes;
  bool stream_k = false;  // large m: stream-K scheduler instead of the persistent data-parallel one
  bool swap_cluster = false;  // 64 < m <= 128, no split: swapped kernel in 1x2 clusters (fp8_gemm_small_mc.cu)
  bool sm90 = false;          // large m: the hand-written kernel (fp8_gemm_sm90.cu)
  bool skinny = false;        // m <= 64: the stream-K decode kernel (fp8_gemm_skinny.cu)
};

Fp8GemmPlan plan_fp8_gemm(const Fp8GemmParams& p);
void launch_fp8_gemm(const Fp8GemmParams& p, const Fp8GemmPlan& plan, void* workspace, cudaStream_t stream);

// The dense kernels (fp8_gemm_large.cu, fp8_gemm_streamk.cu, fp8_gemm_small.cu, fp8_gemm_small_mc.cu).
size_t fp8_gemm_large_workspace(const Fp8GemmParams& p);
void launch_fp8_gemm_large(const Fp8GemmParams& p, void* workspace, cudaStream_t stream);
size_t fp8_gemm_streamk_workspace(const Fp8GemmParams& p);
void launch_fp8_gemm_streamk(const Fp8GemmParams& p, void* workspace, cudaStream_t stream);
// Swapped operands, K split into `split_k` batches. split_k == 1 writes bf16 `out`; otherwise fp32
// partials [split_k, m, n] go to `partials` and the caller reduces them.
size_t fp8_gemm_small_workspace(const Fp8GemmParams& p, int split_k);
size_t fp8_gemm_small_mc_workspace(const Fp8GemmParams& p);
void launch_fp8_gemm_small_mc(const Fp8GemmParams& p, void* workspace, cudaStream_t stream);
void launch_fp8_gemm_small(const Fp8GemmParams& p, int split_k, float* partials, void* workspace,
                           cudaStream_t stream);
void launch_reduce_split_k(const float* partials, int split_k, int64_t mn, void* out_bf16, cudaStream_t stream);

// Grouped GEMMs. b [E, N, K], b_scale [E, ceil(N/128), K/128], out bf16.
// Contiguous: a [M_total, K], rows of expert e are [offsets[e], offsets[e+1]) (device int32 [E+1]);
//   a_scale (i, kb) at a_scale[kb * a_scale_ld + i]; out [M_total, N]; rows past offsets[E] untouched.
// Masked: a [E, M_max, K]; a_scale (e, i, kb) at a_scale[e * a_scale_estride + kb * a_scale_ld + i];
//   out [E, M_max, N]; rows >= masked_m[e] (device int32 [E]) untouched.
// Offsets / counts are clamped on the device (no host sync): an out-of-range count is clipped to
// [0, M_max]; offsets are clipped to [0, M_total] and a decreasing pair gives an empty group.
struct GroupedFp8GemmParams {
  const void* a;
  const float* a_scale;
  int64_t a_scale_ld;
  int64_t a_scale_estride;  // masked only
  const void* b;
  const float* b_scale;
  void* out;
  const int32_t* expert_offsets;  // contiguous mode when non-null
  const int32_t* masked_m;        // masked mode when non-null
  int num_experts;
  int m_rows;  // contiguous: M_total; masked: M_max
  int n, k;
  int sm_count;
};

// Picks the kernel: masked batches with M_max <= 64 swap the operands (grouped_fp8_gemm_swap.cu),
// everything else keeps the rows in the MMA's M (grouped_fp8_gemm.cu).
size_t grouped_fp8_gemm_workspace(const GroupedFp8GemmParams& p);
void launch_grouped_fp8_gemm(const GroupedFp8GemmParams& p, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

// The hand-written sm90 kernel (fp8_gemm_sm90.cu, 128x128 tiles, one CTA per SM, no workspace): dense
// problems with M > 128, and grouped problems whose scale strides it can TMA-load (supported()).
void launch_fp8_gemm_sm90(const Fp8GemmParams& p, cudaStream_t stream);
bool grouped_fp8_gemm_sm90_supported(const GroupedFp8GemmParams& p);
void launch_grouped_fp8_gemm_sm90(const GroupedFp8GemmParams& p, cudaStream_t stream);

// The decode kernel (fp8_gemm_skinny.cu): weights in the MMA's M, up to 64 tokens in its N, the
// (tile, K block) units of the whole problem split evenly over the SMs (stream-K, fixed-order
// reduction of shared tiles). Dense M <= 64 and masked M_max <= 64.
size_t fp8_gemm_skinny_workspace(int sm_count);
void launch_fp8_gemm_skinny(const Fp8GemmParams& p, void* workspace, cudaStream_t stream);
bool grouped_fp8_gemm_skinny_supported(const GroupedFp8GemmParams& p);
void launch_grouped_fp8_gemm_skinny(const GroupedFp8GemmParams& p, void* workspace, cudaStream_t stream);

size_t grouped_fp8_gemm_rows_workspace(const GroupedFp8GemmParams& p);
void launch_grouped_fp8_gemm_rows(const GroupedFp8GemmParams& p, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream);
size_t grouped_fp8_gemm_swap_workspace(const GroupedFp8GemmParams& p);
void launch_grouped_fp8_gemm_swap(const GroupedFp8GemmParams& p, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream);

}  // namespace flashseek
