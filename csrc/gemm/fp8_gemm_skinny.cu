// Launchers of the decode GEMM (fp8_gemm_skinny.cuh): dense M <= 64 and masked-grouped M_max <= 64.
#include <algorithm>
#include <mutex>

#include "common/cuda_check.h"
#include "gemm/fp8_gemm.h"
#include "gemm/fp8_gemm_skinny.cuh"
#include "gemm/sm90_tensor_maps.h"

namespace flashseek {
namespace {

using skinny::Params;

size_t records_bytes(int sm_count) { return (size_t(sm_count) * sizeof(skinny::ReduceRecord) + 255) / 256 * 256; }

// Workspace: per-CTA records (masked) | fp32 partials (fp8_gemm_skinny_workspace).
void bind_workspace(Params& kp, void* workspace, int sm_count) {
  char* w = static_cast<char*>(workspace);
  kp.records = reinterpret_cast<skinny::ReduceRecord*>(w);
  kp.partials = reinterpret_cast<float*>(w + records_bytes(sm_count));
}

skinny::TokenMaps token_maps(const void* a, int64_t rows, int64_t k) {
  skinny::TokenMaps maps;
  for (int i = 0; i < 4; ++i) maps.rows[i] = fp8_rows_map(a, rows, k, 8 << i);
  return maps;
}

// Both kernels are programmatic dependent launches (common/pdl.cuh): the reduction's launch overlaps
// the main kernel, and the main kernel's overlaps whatever precedes it.
void launch(const CUtensorMap& tmap_w, const skinny::TokenMaps& tmap_x, const Params& kp, int ctas, bool reduce,
            cudaStream_t stream) {
  static std::once_flag attr_once[64];
  int device = 0;
  FS_CUDA_CHECK(cudaGetDevice(&device));
  std::call_once(attr_once[device % 64], [] {
    FS_CUDA_CHECK(cudaFuncSetAttribute(skinny::skinny_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       skinny::Smem::kDynamic));
  });
  launch_pdl(skinny::skinny_kernel, dim3(unsigned(ctas)), dim3(skinny::kThreads), size_t(skinny::Smem::kDynamic),
             stream, tmap_w, tmap_x, kp);
  if (!reduce) return;
  // One reduction CTA per main CTA and 8-token column group that can hold tokens (M_max = 1: one).
  const int column_groups = std::min(skinny::kTokens, kp.m_rows + 7) / 8;
  launch_pdl(skinny::reduce_kernel, dim3(unsigned(ctas), unsigned(column_groups)), dim3(skinny::kMathThreads),
             size_t(ctas + 1) * sizeof(int64_t), stream, kp);
}

}  // namespace

size_t fp8_gemm_skinny_workspace(int sm_count) {
  return records_bytes(sm_count) + size_t(2) * sm_count * skinny::kSlotFloats * sizeof(float);
}

void launch_fp8_gemm_skinny(const Fp8GemmParams& p, void* workspace, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return;
  Params kp{};
  kp.a_scale = p.a_scale;
  kp.a_scale_ld = p.a_scale_ld;
  kp.b_scale = p.b_scale;
  kp.out = static_cast<__nv_bfloat16*>(p.out);
  kp.num_groups = 1;
  kp.m_rows = p.m;
  kp.n = p.n;
  kp.k = p.k;
  bind_workspace(kp, workspace, p.sm_count);
  const int64_t num_kb = p.k / skinny::kBlockK;
  const int64_t units = int64_t((p.n + skinny::kRows - 1) / skinny::kRows) * num_kb;
  const int ctas = int(std::min<int64_t>(p.sm_count, units));
  // The reduction runs only if some CTA boundary falls inside a tile.
  bool reduce = false;
  for (int c = 1; c < ctas && !reduce; ++c) reduce = (int64_t(c) * units / ctas) % num_kb != 0;
  launch(fp8_rows_map(p.b, p.n, p.k, skinny::kRows), token_maps(p.a, p.m, p.k), kp, ctas, reduce,
         stream);
}

bool grouped_fp8_gemm_skinny_supported(const GroupedFp8GemmParams& p) {
  return p.masked_m != nullptr && p.m_rows <= skinny::kTokens && p.num_experts <= skinny::kMaxGroups;
}

void launch_grouped_fp8_gemm_skinny(const GroupedFp8GemmParams& p, void* workspace, cudaStream_t stream) {
  if (p.m_rows == 0 || p.n == 0 || p.num_experts == 0) return;
  Params kp{};
  kp.a_scale = p.a_scale;
  kp.a_scale_ld = p.a_scale_ld;
  kp.a_scale_estride = p.a_scale_estride;
  kp.b_scale = p.b_scale;
  kp.out = static_cast<__nv_bfloat16*>(p.out);
  kp.masked_m = p.masked_m;
  kp.num_groups = p.num_experts;
  kp.m_rows = p.m_rows;
  kp.n = p.n;
  kp.k = p.k;
  bind_workspace(kp, workspace, p.sm_count);
  // Which experts have tokens is only known on the device: every SM runs, idle ones get empty ranges.
  const int64_t e = p.num_experts;
  launch(fp8_rows_map(p.b, e * p.n, p.k, skinny::kRows), token_maps(p.a, e * p.m_rows, p.k), kp,
         p.sm_count, true, stream);
}

}  // namespace flashseek
