// Launchers of the hand-written sm90 FP8 GEMM (fp8_gemm_sm90.cuh): dense and grouped problems.
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/smem_opt_in.h"
#include "gemm/fp8_gemm.h"
#include "gemm/fp8_gemm_sm90.cuh"
#include "gemm/sm90_tensor_maps.h"

namespace flashseek {
namespace {

using sm90gemm::KernelParams;

// Activation scales: element (row, kb, plane) at plane * plane_stride + kb * ld + row (floats), loaded
// as `box_rows` consecutive rows of one K block; rows past `rows` read as zeros.
CUtensorMap scale_map(const float* base, int64_t rows, int64_t kb, int64_t planes, int64_t ld, int64_t plane_stride,
                      int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {cuuint64_t(rows), cuuint64_t(kb), cuuint64_t(planes)};
  // Strides of size-1 dimensions are never used but must still be 16-byte multiples.
  const int64_t ld_bytes = kb > 1 ? ld * 4 : (rows * 4 + 15) / 16 * 16;
  const int64_t plane_bytes = planes > 1 ? plane_stride * 4 : ld_bytes * kb;
  const cuuint64_t strides[2] = {cuuint64_t(ld_bytes), cuuint64_t(plane_bytes)};
  const cuuint32_t box[3] = {cuuint32_t(box_rows), 1, 1};
  const cuuint32_t elem[3] = {1, 1, 1};
  CUresult r = tensor_map_encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, const_cast<float*>(base), dims,
                                      strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                                      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) throw std::runtime_error("flashseek: cuTensorMapEncodeTiled (activation scales) failed: " +
                                                  std::to_string(int(r)));
  return map;
}

int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s && *s ? std::atoi(s) : fallback;
}

constexpr int kBlockN = sm90gemm::kBlockN;
constexpr int kStages = 5;
constexpr int kClusterN = 2;

struct Problem {
  const void* a;
  int64_t a_rows;
  const float* a_scale;
  int64_t scale_rows, scale_ld, scale_planes, scale_plane_stride;
  const void* b;
  int64_t b_rows;
  KernelParams kp;
  int sm_count;
};

// Clusters of kClusterN CTAs that can be resident at once (GPC packing can leave SMs unused).
int resident_clusters(const void* kernel, int smem_bytes, int sm_count) {
  static std::mutex mu;
  static int cached_device = -1, cached = 0;
  int device = 0;
  FS_CUDA_CHECK(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  if (device != cached_device) {
    cudaLaunchConfig_t cfg{};
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = kClusterN;
    attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
    cfg.gridDim = dim3(unsigned(sm_count / kClusterN * kClusterN));
    cfg.blockDim = dim3(sm90gemm::kThreads);
    cfg.dynamicSmemBytes = size_t(smem_bytes);
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    FS_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg));
    cached = std::max(clusters, 1);
    cached_device = device;
  }
  return cached;
}

void launch(const Problem& pr, int64_t max_units, cudaStream_t stream) {
  using L = sm90gemm::SmemLayout<kStages>;
  auto kernel = sm90gemm::fp8_gemm_sm90_kernel<kStages, kClusterN>;
  opt_in_dynamic_smem<sm90gemm::fp8_gemm_sm90_kernel<kStages, kClusterN>>(L::kDynamic);
  const int clusters = int(std::min<int64_t>(
      std::max<int64_t>(max_units, 1), resident_clusters(reinterpret_cast<const void*>(kernel), L::kDynamic,
                                                         pr.sm_count)));
  const CUtensorMap ta = fp8_rows_map(pr.a, pr.a_rows, pr.kp.k, sm90gemm::kBlockM / kClusterN);
  const CUtensorMap tb = fp8_rows_map(pr.b, pr.b_rows, pr.kp.k, kBlockN);
  const CUtensorMap ts = scale_map(pr.a_scale, pr.scale_rows, pr.kp.k / 128, pr.scale_planes, pr.scale_ld,
                                   pr.scale_plane_stride, L::kSfaRows);
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = kClusterN;
  attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
  cfg.gridDim = dim3(unsigned(clusters * kClusterN));
  cfg.blockDim = dim3(sm90gemm::kThreads);
  cfg.dynamicSmemBytes = size_t(L::kDynamic);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  FS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, ta, tb, ts, pr.kp));
}

KernelParams base_params(const float* b_scale, void* out, int n, int k) {
  KernelParams kp{};
  kp.b_scale = b_scale;
  kp.out = static_cast<__nv_bfloat16*>(out);
  kp.n = n;
  kp.k = k;
  kp.num_n_blocks = (n + kBlockN - 1) / kBlockN;
  kp.band = std::max(1, env_int("FLASHSEEK_SM90_BAND", 16));
  return kp;
}

}  // namespace

void launch_fp8_gemm_sm90(const Fp8GemmParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return;
  Problem pr{};
  pr.a = p.a;
  pr.a_rows = p.m;
  pr.a_scale = p.a_scale;
  pr.scale_rows = p.m;
  pr.scale_ld = p.a_scale_ld;
  pr.scale_planes = 1;
  pr.scale_plane_stride = 0;
  pr.b = p.b;
  pr.b_rows = p.n;
  pr.kp = base_params(p.b_scale, p.out, p.n, p.k);
  pr.kp.num_groups = 1;
  pr.kp.rows_total = p.m;
  pr.sm_count = p.sm_count;
  launch(pr, int64_t((p.m + 127) / 128) * ((pr.kp.num_n_blocks + kClusterN - 1) / kClusterN), stream);
}

bool grouped_fp8_gemm_sm90_supported(const GroupedFp8GemmParams& p) {
  const bool ld_ok = p.k / 128 <= 1 || p.a_scale_ld % 4 == 0;
  const bool estride_ok = p.masked_m == nullptr || p.num_experts <= 1 || p.a_scale_estride % 4 == 0;
  return p.num_experts <= sm90gemm::kMaxGroups && ld_ok && estride_ok &&
         reinterpret_cast<uintptr_t>(p.a_scale) % 16 == 0;
}

void launch_grouped_fp8_gemm_sm90(const GroupedFp8GemmParams& p, cudaStream_t stream) {
  const bool masked = p.masked_m != nullptr;
  const int64_t a_rows = masked ? int64_t(p.num_experts) * p.m_rows : p.m_rows;
  if (a_rows == 0 || p.n == 0 || p.num_experts == 0) return;
  Problem pr{};
  pr.a = p.a;
  pr.a_rows = a_rows;
  pr.a_scale = p.a_scale;
  pr.scale_rows = p.m_rows;
  pr.scale_ld = p.a_scale_ld;
  pr.scale_planes = masked ? p.num_experts : 1;
  pr.scale_plane_stride = masked ? p.a_scale_estride : 0;
  pr.b = p.b;
  pr.b_rows = int64_t(p.num_experts) * p.n;
  pr.kp = base_params(p.b_scale, p.out, p.n, p.k);
  pr.kp.offsets = masked ? nullptr : p.expert_offsets;
  pr.kp.masked_m = masked ? p.masked_m : nullptr;
  pr.kp.num_groups = p.num_experts;
  pr.kp.rows_total = int(a_rows);
  pr.kp.m_max = masked ? p.m_rows : 0;
  pr.sm_count = p.sm_count;
  // Units (row blocks x n-block pairs) are only known on the device: every resident cluster runs.
  launch(pr, INT64_MAX, stream);
}

}  // namespace flashseek
