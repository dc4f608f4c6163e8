// Host side of the 64-row decode kernels' Q tile loads: its TMA map (mla_decode_wgmma.cuh, TileMaps).
#include <cstring>

#include "gemm/sm90_tensor_maps.h"
#include "mla/mla_decode_wgmma.cuh"

namespace flashseek::mla::wg {
namespace {

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// One 2D map covers q when packed row R = s * h_q + h of request b sits at (b * rows + R) * stride_h:
// the layout of a contiguous [b, s_q, h_q, 576] tensor and of a head-strided view of one.
bool q_tensor_map(const DecodeParams& p, bool q_fp16, CUtensorMap& map) {
  const int64_t sh = p.q_stride_h;
  const bool packed = (p.s_q == 1 || p.q_stride_s == int64_t(p.h_q) * sh) &&
                      (p.batch == 1 || p.q_stride_b == int64_t(p.rows) * sh);
  const int64_t total_rows = int64_t(p.batch) * p.rows;
  if (!packed || sh < kDQK || (sh * 2) % 16 != 0 || !aligned16(p.q) || total_rows > INT32_MAX) return false;
  const cuuint64_t dims[2] = {cuuint64_t(kDQK), cuuint64_t(total_rows)};
  const cuuint64_t strides[1] = {cuuint64_t(sh) * 2};
  const cuuint32_t box[2] = {64, kM};
  const cuuint32_t elem[2] = {1, 1};
  return tensor_map_encode_fn()(&map, q_fp16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
                                const_cast<void*>(p.q), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

void make_tile_maps(const DecodeParams& p, bool q_fp16, TileMaps& maps) {
  std::memset(&maps, 0, sizeof(maps));
  maps.q_tma = q_tensor_map(p, q_fp16, maps.q) ? 1 : 0;
}

}  // namespace flashseek::mla::wg
