// The turn-taking decode kernel (mla_decode_seesaw.cuh) for the bf16 cache: its TMA map and
// instantiations (q bf16 or fp16).
#include "gemm/sm90_tensor_maps.h"
#include "mla/mla_decode_seesaw.cuh"

namespace flashseek::mla {
namespace seesaw {

bool kv_tensor_map(const DecodeParams& p, CUtensorMap& map) {
  const int64_t rows = int64_t(p.num_pages) << p.page_size_log2;
  if (rows > INT32_MAX || reinterpret_cast<uintptr_t>(p.kv) % 16 != 0) return false;
  const cuuint64_t dims[2] = {cuuint64_t(kDQK), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(kDQK) * 2};
  const cuuint32_t box[2] = {64, cuuint32_t(1) << (p.page_size_log2 < 6 ? p.page_size_log2 : 6)};
  const cuuint32_t elem[2] = {1, 1};
  return tensor_map_encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(p.kv), dims, strides, box,
                                elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace seesaw

bool launch_decode_seesaw_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.cluster_pairs) return false;  // it does not merge cluster pairs (decode_merges_cluster_pairs)
  CUtensorMap map;
  if (!seesaw::kv_tensor_map(p, map)) return false;
  if (q_fp16) {
    seesaw::launch_decode_seesaw<__half>(p, map, stream);
  } else {
    seesaw::launch_decode_seesaw<__nv_bfloat16>(p, map, stream);
  }
  return true;
}

}  // namespace flashseek::mla
