// Shape-class dispatch of the dense FP8 GEMM and the split-K reduction (no CUTLASS here).
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "common/cuda_check.h"
#include "gemm/fp8_gemm.h"

namespace flashseek {
namespace {

constexpr int kSwapMaxM = 128;     // at or below: tokens in the MMA's N (fp8_gemm_small.cu)
constexpr int kSwapTileN = 64;     // token tile of the swapped kernel
constexpr int kMaxSplitK = 16;
constexpr int kSkinnyMaxM = 64;    // at or below: the decode kernel (fp8_gemm_skinny.cu)
constexpr int kGroupedSwapMaxM = 64;  // masked M_max at or below: grouped kernel with swapped operands
constexpr size_t kAlign = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// Split K only as far as the extra tiles still fit in one wave: a decode GEMM reads each weight once,
// so what matters is how many SMs pull weights at the same time.
int choose_split_k(const Fp8GemmParams& p) {
  const int tiles = ((p.n + 127) / 128) * ((p.m + kSwapTileN - 1) / kSwapTileN);
  const int kb = p.k / 128;
  int best = 1;
  for (int d = 2; d <= kMaxSplitK && d <= kb; ++d) {
    if (kb % d == 0 && tiles * d <= p.sm_count) best = d;
  }
  return best;
}

// Large M: the persistent data-parallel kernel walks 128x128 tiles (M tiles rounded up to the 2x1
// cluster) in waves of sm_count CTAs. When the last wave would be less than half full, the stream-K
// kernel runs instead: it keeps the full waves but one, and spreads the remaining tiles' K blocks
// over every SM (CUTLASS's hybrid stream-K; with <= 8 K blocks per tile CUTLASS splits nothing, so
// the plain kernel runs). FLASHSEEK_GEMM_STREAMK=0|1 forces the choice (for A/B measurements).
bool choose_stream_k(const Fp8GemmParams& p) {
  static const int forced = [] {
    const char* s = std::getenv("FLASHSEEK_GEMM_STREAMK");
    return s && (s[0] == '0' || s[0] == '1') ? s[0] - '0' : -1;
  }();
  if (forced >= 0) return forced == 1;
  const int64_t tiles_m = ((p.m + 127) / 128 + 1) / 2 * 2;
  const int64_t tiles = tiles_m * ((p.n + 127) / 128);
  const int64_t wave = std::max(p.sm_count / 2 * 2, 2);
  const int64_t tail = tiles % wave;
  return p.k / 128 > 8 && tail != 0 && 2 * tail < wave;
}

// 64 < M <= 128 without split-K: two 64-token tiles per 128-row weight tile. Without a cluster both
// CTAs read the weight tile from L2; the 1x2-cluster kernel multicasts it (L2 reads of 128x7168x16384:
// 352 -> 235 MB, the bound at ~7 TB/s of L2 bandwidth: ~50 -> ~34-40 us). With split-K (small N) the
// plain kernel keeps its fp32-partials path. FLASHSEEK_GEMM_SMALL_MC=0 disables it (A/B).
bool choose_swap_cluster(const Fp8GemmParams& p, int split_k) {
  static const bool enabled = [] {
    const char* s = std::getenv("FLASHSEEK_GEMM_SMALL_MC");
    return !(s && s[0] == '0');
  }();
  return enabled && p.m > kSwapTileN && split_k == 1;
}

// Rows-in-M problems (dense M > 128, grouped except the swapped masked path): which kernel family.
// CUTLASS kernels by default: the hand-written sm90 kernel (fp8_gemm_sm90.cuh) is correct and measures
// 0.91-1.12x of them depending on shape, no clear win yet (docs/gemm-design.md). FLASHSEEK_GEMM_IMPL=sm90 selects it; read on every call (a getenv,
// ~100 ns) so that one test process can check both paths.
bool use_sm90() {
  const char* s = std::getenv("FLASHSEEK_GEMM_IMPL");
  return s != nullptr && std::string(s) == "sm90";
}

// Decode problems (dense M <= 64, masked M_max <= 64): the hand-written stream-K kernel
// (fp8_gemm_skinny.cuh) or CUTLASS's swapped kernels. Measured on the H100 (graph replays of 20 calls,
// same process, session 10, since shared tiles are reduced inside the kernel): the stream-K kernel wins
// every masked shape and the large weight streams (36864x7168: 93.0 vs 107-110 us at 1 and 16 tokens),
// the single-token shapes (1x2112x7168 9.9 vs 11.5, 1x24576x1536 17.9 vs 18.4, 1x7168x16384 45.3 vs
// 46.4, 1x7168x18432 50.0 vs 51.3) and 16x2112x7168 (10.3 vs 11.7), but not 64 tokens on the smaller
// matrices (64x2112x7168 13.9 vs 12.4, 64x24576x1536 23.2 vs 18.7, 64x7168x16384 50.3 vs 49.3: the
// reducer adds 8 column groups of partials). At 16 tokens the two tie alone on q_b (16x24576x1536: 18.0-18.1
// vs 17.9-18.2 us) but the stream-K kernel, a programmatic dependent, takes 1.8 us off the b=16 dense layer
// (308.3 vs 310.1, six alternating rounds, session 13): up to 16 tokens it runs every K >= 1536.
// Since session 16 the kernel stages a finished tile in shared memory above 16 tokens (fp8_gemm_skinny.cuh,
// kStageMinTokens), which took 0.8-1.9 us off 64 tokens (skinny_timeline probe, back to back: 64x2112x7168
// 11.9 -> 11.1, 64x7168x16384 49.6 -> 48.7, 64x7168x18432 54.7 -> 53.9, 64x24576x1536 21.7 -> 20.5): it
// now also runs every K >= kSkinnyMinK (qkv_a, o_proj and down of a decode step), where the long tiles
// amortise their epilogues, while q_b (K = 1536) stays on CUTLASS past 16 tokens.
// FLASHSEEK_GEMM_SKINNY=0 / 1 forces CUTLASS / the stream-K kernel for every decode problem, and
// FLASHSEEK_GEMM_SKINNY_MIN_K replaces kSkinnyMinK (A/B measurements); both are read on every call, so
// that one process can check every path.
constexpr int64_t kSkinnyMinWeight = int64_t(1) << 27;
constexpr int kSkinnyFewTokens = 16;
constexpr int kSkinnyFewTokensMinK = 1536;
constexpr int kSkinnyMinK = 4096;

int skinny_override() {
  const char* s = std::getenv("FLASHSEEK_GEMM_SKINNY");
  return s != nullptr && (s[0] == '0' || s[0] == '1') ? s[0] - '0' : -1;
}

int skinny_min_k() {
  const char* s = std::getenv("FLASHSEEK_GEMM_SKINNY_MIN_K");
  return s != nullptr && s[0] != '\0' ? std::atoi(s) : kSkinnyMinK;
}

bool use_skinny_dense(const Fp8GemmParams& p) {
  const int forced = skinny_override();
  if (forced >= 0) return forced == 1;
  return int64_t(p.n) * p.k >= kSkinnyMinWeight || p.k >= skinny_min_k() ||
         (p.m <= kSkinnyFewTokens && p.k >= kSkinnyFewTokensMinK);
}

__global__ void reduce_split_k_kernel(const float4* __restrict__ partials, int split_k, int64_t mn4,
                                      uint2* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= mn4) return;
  float4 acc = partials[i];
  for (int s = 1; s < split_k; ++s) {
    float4 v = partials[s * mn4 + i];
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  __nv_bfloat162 lo = __floats2bfloat162_rn(acc.x, acc.y);
  __nv_bfloat162 hi = __floats2bfloat162_rn(acc.z, acc.w);
  out[i] = make_uint2(*reinterpret_cast<uint32_t*>(&lo), *reinterpret_cast<uint32_t*>(&hi));
}

}  // namespace

void launch_reduce_split_k(const float* partials, int split_k, int64_t mn, void* out_bf16, cudaStream_t stream) {
  const int64_t mn4 = mn / 4;  // n % 16 == 0
  if (mn4 == 0) return;
  const int threads = 256;
  reduce_split_k_kernel<<<dim3(unsigned((mn4 + threads - 1) / threads)), threads, 0, stream>>>(
      reinterpret_cast<const float4*>(partials), split_k, mn4, static_cast<uint2*>(out_bf16));
  FS_CHECK_LAUNCH();
}

Fp8GemmPlan plan_fp8_gemm(const Fp8GemmParams& p) {
  Fp8GemmPlan plan{false, 1, 0};
  if (p.m == 0) return plan;
  if (p.m <= kSkinnyMaxM && use_skinny_dense(p)) {
    plan.skinny = true;
    plan.workspace_bytes = fp8_gemm_skinny_workspace(p.sm_count);
  } else if (p.m <= kSwapMaxM) {
    plan.swap_ab = true;
    plan.split_k = choose_split_k(p);
    plan.swap_cluster = choose_swap_cluster(p, plan.split_k);
    size_t partial_bytes = plan.split_k > 1 ? align_up(size_t(plan.split_k) * p.m * p.n * sizeof(float)) : 0;
    plan.workspace_bytes = partial_bytes + align_up(plan.swap_cluster ? fp8_gemm_small_mc_workspace(p)
                                                                      : fp8_gemm_small_workspace(p, plan.split_k));
  } else if (use_sm90()) {
    plan.sm90 = true;
  } else {
    plan.stream_k = choose_stream_k(p);
    plan.workspace_bytes = align_up(plan.stream_k ? fp8_gemm_streamk_workspace(p) : fp8_gemm_large_workspace(p));
  }
  return plan;
}

void launch_fp8_gemm(const Fp8GemmParams& p, const Fp8GemmPlan& plan, void* workspace, cudaStream_t stream) {
  if (p.m == 0) return;
  char* ws = static_cast<char*>(workspace);
  if (plan.skinny) {
    launch_fp8_gemm_skinny(p, ws, stream);
    return;
  }
  if (!plan.swap_ab) {
    if (plan.sm90) {
      launch_fp8_gemm_sm90(p, stream);
    } else if (plan.stream_k) {
      launch_fp8_gemm_streamk(p, ws, stream);
    } else {
      launch_fp8_gemm_large(p, ws, stream);
    }
    return;
  }
  if (plan.swap_cluster) {
    launch_fp8_gemm_small_mc(p, ws, stream);
    return;
  }
  if (plan.split_k == 1) {
    launch_fp8_gemm_small(p, 1, nullptr, ws, stream);
    return;
  }
  float* partials = reinterpret_cast<float*>(ws);
  char* cutlass_ws = ws + align_up(size_t(plan.split_k) * p.m * p.n * sizeof(float));
  launch_fp8_gemm_small(p, plan.split_k, partials, cutlass_ws, stream);
  launch_reduce_split_k(partials, plan.split_k, int64_t(p.m) * p.n, p.out, stream);
}

namespace {
bool grouped_swap(const GroupedFp8GemmParams& p) {
  return p.masked_m != nullptr && p.m_rows <= kGroupedSwapMaxM;
}
bool grouped_skinny(const GroupedFp8GemmParams& p) {
  return skinny_override() != 0 && grouped_fp8_gemm_skinny_supported(p);
}
bool grouped_sm90(const GroupedFp8GemmParams& p) {
  return !grouped_swap(p) && use_sm90() && grouped_fp8_gemm_sm90_supported(p);
}
}  // namespace

size_t grouped_fp8_gemm_workspace(const GroupedFp8GemmParams& p) {
  if (grouped_skinny(p)) return fp8_gemm_skinny_workspace(p.sm_count);
  if (grouped_sm90(p)) return 0;
  return grouped_swap(p) ? grouped_fp8_gemm_swap_workspace(p) : grouped_fp8_gemm_rows_workspace(p);
}

void launch_grouped_fp8_gemm(const GroupedFp8GemmParams& p, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  if (grouped_skinny(p)) {
    launch_grouped_fp8_gemm_skinny(p, workspace, stream);
  } else if (grouped_sm90(p)) {
    launch_grouped_fp8_gemm_sm90(p, stream);
  } else if (grouped_swap(p)) {
    launch_grouped_fp8_gemm_swap(p, workspace, workspace_bytes, stream);
  } else {
    launch_grouped_fp8_gemm_rows(p, workspace, workspace_bytes, stream);
  }
}

}  // namespace flashseek
