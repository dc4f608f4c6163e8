// Launchers of the decode GEMM (fp8_gemm_skinny.cuh): dense M <= 64 and masked-grouped M_max <= 64.
#include <algorithm>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>

#include "common/cuda_check.h"
#include "gemm/fp8_gemm.h"
#include "gemm/fp8_gemm_skinny_launch.cuh"
#include "gemm/sm90_tensor_maps.h"

namespace flashseek {
namespace {

using skinny::Params;

// The shared-tile counters (fp8_gemm_skinny.cuh, "Shared tiles"): zero-initialised once per
// (device, stream, capture) and left at zero by every call, so they cannot come from the per-call
// workspace. A stream being captured gets its own array per capture: the graph keeps the pointer, and
// two graphs captured on one stream may later be replayed on two streams at once. The arrays are
// never freed (4 KB each; one per stream an engine uses, plus one per captured graph).
int* tile_counters(cudaStream_t stream) {
  int device = 0;
  FS_CUDA_CHECK(cudaGetDevice(&device));
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  FS_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &capture_id));
  const auto key = std::make_tuple(device, reinterpret_cast<uintptr_t>(stream),
                                   status == cudaStreamCaptureStatusActive ? capture_id : 0ull);
  static std::mutex mutex;
  static std::map<std::tuple<int, uintptr_t, unsigned long long>, int*> arrays;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = arrays.find(key);
  if (it != arrays.end()) return it->second;
  // Allocating and zeroing are not stream work of the caller: under a capture (whose default mode
  // forbids cudaMalloc) switch this thread to relaxed mode, and zero on a private stream.
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  FS_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  int* counters = nullptr;
  cudaError_t err = cudaMalloc(&counters, skinny::kMaxCtas * sizeof(int));
  cudaStream_t side = nullptr;
  if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaMemsetAsync(counters, 0, skinny::kMaxCtas * sizeof(int), side);
  if (err == cudaSuccess) err = cudaStreamSynchronize(side);
  if (side != nullptr) cudaStreamDestroy(side);
  cudaThreadExchangeStreamCaptureMode(&mode);
  FS_CUDA_CHECK(err);
  arrays.emplace(key, counters);
  return counters;
}

// Workspace: the fp32 partials of shared tiles (fp8_gemm_skinny_workspace).
void bind_workspace(Params& kp, void* workspace, cudaStream_t stream) {
  kp.partials = static_cast<float4*>(workspace);
  kp.tile_counters = tile_counters(stream);
}

skinny::TokenMaps token_maps(const void* a, int64_t rows, int64_t k) {
  skinny::TokenMaps maps;
  for (int i = 0; i < 4; ++i) maps.rows[i] = fp8_rows_map(a, rows, k, 8 << i);
  return maps;
}

// Either build of the kernel (fp8_gemm_skinny.cuh, kStageMinTokens): `tokens` is M, or M_max of a
// masked problem.
void launch(const CUtensorMap& tmap_w, const skinny::TokenMaps& tmap_x, const Params& kp, int ctas, int tokens,
            cudaStream_t stream) {
  if (tokens >= skinny::kStageMinTokens) {
    launch_skinny_kernel_staged(tmap_w, tmap_x, kp, ctas, stream);
  } else {
    launch_skinny_kernel<false>(tmap_w, tmap_x, kp, ctas, stream);
  }
}

}  // namespace

size_t fp8_gemm_skinny_workspace(int sm_count) {
  return size_t(sm_count) * skinny::kSlotFloats * sizeof(float);  // one partial a CTA
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
  bind_workspace(kp, workspace, stream);
  const int64_t num_kb = p.k / skinny::kBlockK;
  const int64_t units = int64_t((p.n + skinny::kRows - 1) / skinny::kRows) * num_kb;
  const int ctas = int(std::min<int64_t>(p.sm_count, units));
  launch(fp8_rows_map(p.b, p.n, p.k, skinny::kRows), token_maps(p.a, p.m, p.k), kp, ctas, p.m, stream);
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
  bind_workspace(kp, workspace, stream);
  // Which experts have tokens is only known on the device: every SM runs, idle ones get empty ranges.
  const int64_t e = p.num_experts;
  launch(fp8_rows_map(p.b, e * p.n, p.k, skinny::kRows), token_maps(p.a, e * p.m_rows, p.k), kp,
         p.sm_count, p.m_rows, stream);
}

}  // namespace flashseek
