// Host side of the hand-written sm90 FP8 GEMM (fp8_gemm_sm90.cuh): one launcher template per tile
// height, instantiated in its own translation unit (fp8_gemm_sm90.cu: 128 rows,
// fp8_gemm_sm90_bm256.cu: 256 rows) so that the two kernels compile side by side.
#pragma once
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "gemm/fp8_gemm_sm90.cuh"
#include "gemm/sm90_tensor_maps.h"

namespace flashseek::sm90gemm {

constexpr int kClusterN = 2;

// One dense or grouped problem as the kernel sees it.
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

// Activation scales: element (row, kb, plane) at plane * plane_stride + kb * ld + row (floats), loaded
// as `box_rows` consecutive rows of one K block; rows past `rows` read as zeros.
inline CUtensorMap scale_map(const float* base, int64_t rows, int64_t kb, int64_t planes, int64_t ld,
                             int64_t plane_stride, int box_rows) {
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

// Clusters of kClusterN CTAs of this kernel that can be resident at once (GPC packing can leave SMs
// unused); cached per instantiation and device.
template <int BM, int STAGES>
int resident_clusters(int sm_count) {
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
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = size_t(SmemLayout<BM, STAGES>::kDynamic);
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    FS_CUDA_CHECK(cudaOccupancyMaxActiveClusters(
        &clusters, reinterpret_cast<const void*>(fp8_gemm_sm90_kernel<BM, STAGES, kClusterN>), &cfg));
    cached = std::max(clusters, 1);
    cached_device = device;
  }
  return cached;
}

// max_units: the problem's units (m blocks x n-block pairs) when the host knows them, else INT64_MAX
// (every resident cluster runs and walks the device-side group table).
template <int BM, int STAGES>
void launch_tiles(const Problem& pr, int64_t max_units, cudaStream_t stream) {
  using L = SmemLayout<BM, STAGES>;
  auto kernel = fp8_gemm_sm90_kernel<BM, STAGES, kClusterN>;
  static std::once_flag attr_once[64];
  int device = 0;
  FS_CUDA_CHECK(cudaGetDevice(&device));
  std::call_once(attr_once[device % 64], [&] {
    FS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kDynamic));
  });
  const int clusters =
      int(std::min<int64_t>(std::max<int64_t>(max_units, 1), resident_clusters<BM, STAGES>(pr.sm_count)));
  const CUtensorMap ta = fp8_rows_map(pr.a, pr.a_rows, pr.kp.k, BM / kClusterN);
  const CUtensorMap tb = fp8_rows_map(pr.b, pr.b_rows, pr.kp.k, kBlockN);
  const CUtensorMap ts = scale_map(pr.a_scale, pr.scale_rows, pr.kp.k / 128, pr.scale_planes, pr.scale_ld,
                                   pr.scale_plane_stride, L::kSfaBox);
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = kClusterN;
  attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
  cfg.gridDim = dim3(unsigned(clusters * kClusterN));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = size_t(L::kDynamic);
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  FS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, ta, tb, ts, pr.kp));
}

// The 256-row instantiation (fp8_gemm_sm90_bm256.cu).
void launch_tiles_bm256(const Problem& pr, int64_t max_units, cudaStream_t stream);

}  // namespace flashseek::sm90gemm
