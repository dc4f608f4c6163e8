// Fused top-k routing: one warp per token, everything in registers plus a few KB of shared memory,
// one launch per call. Warps loop over tokens (grid capped at the resident-block count), so the
// lane layout and the bias are set up once per warp, not once per token.
//
// Lane layout. A token's E experts are split into `n_layout` groups of G consecutive experts; each
// group owns `lpg` consecutive lanes (a power of two, so butterfly shuffles stay inside it) and each
// lane holds up to `vpl` consecutive experts of its group. Without a group stage (softmax, or every
// group kept) there is one group of E experts over all 32 lanes. Keeping a lane's experts consecutive
// gives 16-byte loads for the R1 shape (8 groups of 32 experts: 4 lanes x 8 bf16 per group) and
// means that lane order is expert-id order, which the lower-id tie rule relies on.
//
// Selection. Every candidate is a 64-bit key (monotone uint32 image of its score << 32 | VPL-1-slot),
// so comparing keys compares (score, -id) within a lane. Each lane sorts its VPL keys once (Batcher
// network), keeps its head in registers and parks the rest in shared memory. A round is one
// REDUX.MAX of the heads' score words plus a ballot: the lowest lane holding the maximum has the
// lowest id (lane order = id order, and a lane's own ties are already ordered by id). The winner
// records its id and pops its next key from shared memory. Non-candidates (dropped groups, empty
// slots, spent lanes) have score word 0, which only a NaN score (all ones) shares, so with topk <=
// candidates a non-candidate never wins, and a NaN still yields in-range ids. The per-lane top-2 for
// the group scores comes out of the sort for free. The bias lives in shared memory (once a block).
//
// Exactness. Expert ids must be bit-identical to flashseek/ref/routing.py, so every value that a
// comparison sees is computed with the reference's fp32 operations: sigmoid = 1 / (1 + expf(-x))
// with an IEEE (round-to-nearest) reciprocal, explicit __fadd_rn so that nvcc cannot contract the
// multiply at the end of expf with the following add into an fma. The reciprocal runs the same
// MUFU.RCP + one fma Newton step as __frcp_rn's own fast path, which is exact for 1 <= d < 2^126;
// a lane with any d outside that range (x < -87, or NaN) recomputes its row with __frcp_rn. -0.0 is
// folded into +0.0 (softmax keys) because torch's sort treats them as equal; a biased sigmoid score
// s + b (s >= +0) is never -0.0.
//
// The R1 shape (E 256, 8 groups, top-4 groups, top-8; rows 16-byte aligned) runs a compile-time
// kernel instead (routing_device.cuh, namespace r1): the group stage is straight-line, and after it
// the 128 candidates of the kept groups are compacted to 4 per lane (lane order = id order still),
// so each lane sorts 4 keys instead of 8; the selection rounds keep the next key in registers and
// prefetch the one after. ~420 SASS instructions a token instead of ~700, 40 registers (12 blocks,
// 48 warps an SM). Everything else (E up to 512, any grouping, topk up to 16) runs the generic one.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "routing/routing.h"
#include "routing/routing_device.cuh"

namespace flashseek {
namespace {

constexpr int kWarpsPerBlock = 4;
using namespace routing_dev;

template <int VPL, typename In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_noaux_tc_kernel(const RouteParams p, const Layout l) {
  constexpr int kVal = (32 * VPL < kMaxExperts) ? 32 * VPL : kMaxExperts;
  __shared__ WarpSmem<VPL> smem[kWarpsPerBlock];
  __shared__ __align__(16) float sbias[kVal];
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  WarpSmem<VPL>& sm = smem[warp];

  const NoauxLane n = make_noaux_lane(l, lane);
  for (int e = threadIdx.x; e < p.E; e += kWarpsPerBlock * 32) sbias[e] = __ldg(p.bias + e);
  init_list<VPL>(sm, lane);
  __syncthreads();
  const bool grouped = p.topk_group < p.n_group;
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + warp; t < p.T; t += stride) {
    noaux_route_token<VPL, In>(static_cast<const In*>(p.logits) + t * p.logits_stride, l, n, sbias, sm, grouped,
                               p.topk_group, p.topk, p.scale, p.renormalize, p.weights + t * p.weights_stride,
                               p.ids + t * p.ids_stride);
  }
}

template <int VPL, typename In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_softmax_topk_kernel(const RouteParams p, const Layout l) {
  __shared__ WarpSmem<VPL> smem[kWarpsPerBlock];
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  WarpSmem<VPL>& sm = smem[warp];

  const int start = lane * l.vpl;
  int cnt = min(l.vpl, p.E - start);
  cnt = cnt < 0 ? 0 : cnt;
  init_list<VPL>(sm, lane);
  const int64_t stride = int64_t(gridDim.x) * kWarpsPerBlock;

  for (int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + warp; t < p.T; t += stride) {
    const In* row = static_cast<const In*>(p.logits) + t * p.logits_stride;
    float x[VPL];
    load_row<VPL, In>(row, start, cnt, l.vec, -__int_as_float(0x7f800000), x);

    float m = -__int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < VPL; ++i) m = fmaxf(m, x[i]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, off));

    uint64_t key[VPL];
    float lsum = 0.0f;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const float e = (i < cnt) ? expf(__fsub_rn(x[i], m)) : 0.0f;
      lsum = __fadd_rn(lsum, e);
      if (i < cnt) sm.val[start + i] = e;
      // x + 0 folds -0.0 into +0.0 (torch's sort treats them as equal).
      key[i] = (i < cnt) ? make_key<VPL>(ordered_bits(__fadd_rn(x[i], 0.0f)), i) : kNoKey<VPL>;
    }
    sort_desc<VPL>(key);
    select_topk<VPL>(key, true, sm, lane, start, p.topk);
    int my_id;
    float my_val;
    read_pick(sm, lane, p.topk, my_id, my_val);
    float den;
    if (p.renormalize) {
      den = seq_sum(sm, my_val, lane, p.topk);
    } else {
      den = lsum;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) den = __fadd_rn(den, __shfl_xor_sync(kFull, den, off));
    }
    if (lane < p.topk) {
      p.weights[t * p.weights_stride + lane] = __fdiv_rn(my_val, den);
      p.ids[t * p.ids_stride + lane] = my_id;
    }
    __syncwarp();
  }
}

// The R1 shape (routing_device.cuh, r1): everything at compile time, candidates compacted to the
// kept groups before the sort. 12 blocks of 4 warps per SM (40 registers).
template <typename In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32, 12) route_noaux_tc_r1_kernel(const RouteParams p) {
  __shared__ r1::WarpSmem smem[kWarpsPerBlock];
  __shared__ __align__(16) float sbias[r1::kE];
  __shared__ uint32_t ktable[256];
  pdl_wait();
  pdl_launch_dependents();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  r1::WarpSmem& sm = smem[warp];
#pragma unroll
  for (int e = threadIdx.x; e < r1::kE; e += kWarpsPerBlock * 32) {
    sbias[e] = __ldg(p.bias + e);
    ktable[e] = r1::kept_table_entry(uint32_t(e));
  }
  const r1::Lane l = r1::make_lane(sm, lane);
  __syncthreads();
  // 32-bit element offsets: the launcher checks that T x stride fits.
  const int T = int(p.T), ls = int(p.logits_stride), ws = int(p.weights_stride), is = int(p.ids_stride);
  const int stride = int(gridDim.x) * kWarpsPerBlock;
  for (int t = int(blockIdx.x) * kWarpsPerBlock + warp; t < T; t += stride) {
    r1::route_token<In>(static_cast<const In*>(p.logits) + t * ls, sbias, ktable, sm, l, p.scale, p.renormalize,
                        p.weights + t * ws, p.ids + t * is);
  }
}

// Resident blocks per SM of `kernel` (cached by the caller) times the SM count of the current device.
template <typename Kernel>
int64_t max_grid(Kernel kernel, int& blocks_per_sm) {
  if (blocks_per_sm <= 0) {
    int b = 0;
    FS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, kWarpsPerBlock * 32, 0));
    blocks_per_sm = b > 0 ? b : 1;
  }
  static int sm_count[64] = {};
  int dev = 0;
  FS_CUDA_CHECK(cudaGetDevice(&dev));
  int& n = sm_count[dev & 63];
  if (n <= 0) FS_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return int64_t(blocks_per_sm) * n;
}

// One rule (r1::use_r1_path): the R1 shape (E 256, 8 groups, top-4 groups, top-8) with 16-byte
// aligned logits rows (and T x stride < 2^31) runs the compile-time kernel; everything else the
// generic one.
template <typename In>
bool launch_r1(const RouteParams& p, cudaStream_t stream) {
  if (!r1::use_r1_path(p)) return false;
  static int occ = 0;
  const int64_t blocks = (p.T + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const dim3 grid(unsigned(std::min(blocks, max_grid(route_noaux_tc_r1_kernel<In>, occ))));
  launch_pdl(route_noaux_tc_r1_kernel<In>, grid, dim3(kWarpsPerBlock * 32), 0, stream, p);
  return true;
}

template <typename In, bool kSoftmax>
void launch_typed(const RouteParams& p, Layout l, cudaStream_t stream) {
  const int vpl_t = vectorize_layout(l, logits_rows_aligned16(p), int(sizeof(In)));
  const int64_t blocks = (p.T + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const dim3 block(kWarpsPerBlock * 32);
#define FS_ROUTE_CASE(V)                                                                         \
  case V: {                                                                                      \
    static int occ = 0;                                                                          \
    auto kernel = kSoftmax ? route_softmax_topk_kernel<V, In> : route_noaux_tc_kernel<V, In>;    \
    const dim3 grid(unsigned(std::min(blocks, max_grid(kernel, occ))));                          \
    launch_pdl(kernel, grid, block, 0, stream, p, l);                                            \
    break;                                                                                       \
  }
  switch (vpl_t) {
    FS_ROUTE_CASE(1)
    FS_ROUTE_CASE(2)
    FS_ROUTE_CASE(4)
    FS_ROUTE_CASE(8)
    FS_ROUTE_CASE(16)
    FS_ROUTE_CASE(32)
    default:
      throw std::runtime_error("flashseek: routing layout needs more than 32 experts per lane");
  }
#undef FS_ROUTE_CASE
  FS_CHECK_LAUNCH();
}

template <bool kSoftmax>
void launch_any(const RouteParams& p, const Layout& l, cudaStream_t stream) {
  switch (p.dtype) {
    case RouteDtype::kF32: launch_typed<float, kSoftmax>(p, l, stream); break;
    case RouteDtype::kBF16: launch_typed<__nv_bfloat16, kSoftmax>(p, l, stream); break;
    case RouteDtype::kF16: launch_typed<__half, kSoftmax>(p, l, stream); break;
  }
}

}  // namespace

void launch_route_noaux_tc(const RouteParams& p, cudaStream_t stream) {
  if (p.T == 0) return;
  switch (p.dtype) {
    case RouteDtype::kF32: if (launch_r1<float>(p, stream)) return; break;
    case RouteDtype::kBF16: if (launch_r1<__nv_bfloat16>(p, stream)) return; break;
    case RouteDtype::kF16: if (launch_r1<__half>(p, stream)) return; break;
  }
  launch_any<false>(p, noaux_layout(p.E, p.n_group, p.topk_group), stream);
}

void launch_route_softmax_topk(const RouteParams& p, cudaStream_t stream) {
  if (p.T == 0) return;
  launch_any<true>(p, make_layout(p.E, 1), stream);
}

}  // namespace flashseek
