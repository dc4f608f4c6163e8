// Launchers of the hand-written sm90 FP8 GEMM (fp8_gemm_sm90.cuh): dense and grouped problems, with
// the 128-row instantiation here and the 256-row one in fp8_gemm_sm90_bm256.cu.
#include <algorithm>
#include <cstdlib>

#include "gemm/fp8_gemm.h"
#include "gemm/fp8_gemm_sm90_launch.cuh"

namespace flashseek {
namespace {

using sm90gemm::KernelParams;
using sm90gemm::kClusterN;
using sm90gemm::Problem;

int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s && *s ? std::atoi(s) : fallback;
}

constexpr int kBlockN = sm90gemm::kBlockN;
constexpr int kStagesBm128 = 5;

void launch(const Problem& pr, int block_m, int64_t max_units, cudaStream_t stream) {
  if (block_m == 256) {
    sm90gemm::launch_tiles_bm256(pr, max_units, stream);
  } else {
    sm90gemm::launch_tiles<128, kStagesBm128>(pr, max_units, stream);
  }
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

void launch_fp8_gemm_sm90(const Fp8GemmParams& p, int block_m, cudaStream_t stream) {
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
  launch(pr, block_m, int64_t((p.m + block_m - 1) / block_m) * ((pr.kp.num_n_blocks + kClusterN - 1) / kClusterN),
         stream);
}

bool grouped_fp8_gemm_sm90_supported(const GroupedFp8GemmParams& p) {
  const bool ld_ok = p.k / 128 <= 1 || p.a_scale_ld % 4 == 0;
  const bool estride_ok = p.masked_m == nullptr || p.num_experts <= 1 || p.a_scale_estride % 4 == 0;
  return p.num_experts <= sm90gemm::kMaxGroups && ld_ok && estride_ok &&
         reinterpret_cast<uintptr_t>(p.a_scale) % 16 == 0;
}

void launch_grouped_fp8_gemm_sm90(const GroupedFp8GemmParams& p, int block_m, cudaStream_t stream) {
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
  launch(pr, block_m, INT64_MAX, stream);
}

}  // namespace flashseek
