// Merges the split-KV partials (o normalized per split, in q's dtype; lse in log2, fp32) of requests
// with more than one split: out = sum_i 2^(lse_i - lse) o_i, lse = log2 sum_i 2^lse_i (stored as a
// natural log), summed in fp32.
// Two shapes, picked on the host from the expected splits per request (num_sm_parts / batch):
//   narrow (large batches, ~2 splits per request): one warp per packed row, 8 rows per CTA, each lane
//     owning four 4-dim columns (16 dims), splits walked 4 at a time;
//   wide (small batches, many splits): 128 threads per row, 1 row per CTA, one 4-dim column each,
//     splits walked 32 at a time (b=1, h_q=128, 4096 keys: 32 splits, so one round of loads, spread
//     over 128 SMs; 2 rows per CTA and 16 splits a round measured 4.8 µs after the decode grid).
// Either way every load of a group of splits is issued before any is used, and the first group's
// before the lse pass, so a request with n splits costs about n / group memory round trips (v1
// walked them one by one: 32 dependent round trips at b = 1), and a CTA reads each partial row (1 KB
// in a 16-bit q dtype) fully coalesced. The wide shape alone was measured slower at b = 32..128 (more
// threads and lse passes per byte), hence the two.
// The grid is [row groups, entries of the plan's split-request list]: the list holds at most
// num_sm_parts - 1 requests, so a batch larger than that costs CTAs only for requests that can be
// split. Until session 21 the second dimension was the batch whatever the plan held: 4,096 CTAs at
// b=128 h_q=128 (4 rows each), where a uniform batch has no split request at all, cost 5.4 µs a call
// for nothing (docs/performance.md, session 21).
// Launched as a programmatic dependent of the decode kernel: its CTAs are scheduled as decode CTAs
// retire and wait (griddepcontrol.wait) until the whole decode grid's writes are visible, which
// hides most of the launch gap between the two kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "mla/mla_cache_token.cuh"
#include "mla/mla_params.h"
#include "mla/mla_timeline.cuh"

namespace flashseek::mla {
namespace {

constexpr int kCols = kDV / 4;  // 4-dim columns of a row

__device__ __forceinline__ void store4(__nv_bfloat16* dst, float4 v) {
  __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
  uint2 u = make_uint2(*reinterpret_cast<uint32_t*>(&a), *reinterpret_cast<uint32_t*>(&b));
  *reinterpret_cast<uint2*>(dst) = u;
}
__device__ __forceinline__ void store4(__half* dst, float4 v) {
  __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
  uint2 u = make_uint2(*reinterpret_cast<uint32_t*>(&a), *reinterpret_cast<uint32_t*>(&b));
  *reinterpret_cast<uint2*>(dst) = u;
}

// Four packed 16-bit values (8 bytes) -> fp32, through the cache's two-value conversion.
template <typename QT>
__device__ __forceinline__ float4 to_float4(uint2 u) {
  const float2 a = to_float2<QT>(u.x), b = to_float2<QT>(u.y);
  return make_float4(a.x, a.y, b.x, b.y);
}

// kVec 4-dim columns per thread, kRows rows per CTA, kGroup splits per round of loads.
template <typename QT, int kVec, int kRows, int kGroup>
__global__ void __launch_bounds__(kRows * kCols / kVec) mla_combine_kernel(const __grid_constant__ DecodeParams p) {
  constexpr int kRowThreads = kCols / kVec;
  FS_MTL(const unsigned long long tl_entry = timeline::now(); unsigned long long* tl = timeline::combine_row();
         if (tl != nullptr) { tl[3] = 0; tl[4] = timeline::cta(); tl[5] = timeline::smid(); })
  // The next kernel (the next layer's decode, also launched with launch_pdl) may be scheduled once
  // every CTA of this grid has started; it waits for this whole grid before touching memory.
  pdl_launch_dependents();
  const int R = blockIdx.x * kRows + threadIdx.x / kRowThreads;
  const int t = threadIdx.x % kRowThreads;
  // The plan is final before this kernel starts (PlanPart, mla_decode_kernel.cuh), so this CTA's list
  // entry (request, ws_base, num_splits) is read while the decode grid runs; the partials after the wait.
  const int* entry = p.plan + kPlanPartInts * blockIdx.y + 5;
  const int bi = entry[0], base = entry[1];
  // A cluster pair (negative count) was merged by the decode when it ran in clusters.
  const int n = entry[2] >= 0 ? entry[2] : (p.cluster_pairs ? 0 : -entry[2]);
  // Past the list, or merged by the decode: nothing to do, so leave before the wait (a CTA waiting there
  // holds its SM's slot for the next kernel's early CTAs; -1.5 µs at b=64 h_q=128, session 22).
  if (bi < 0 || bi >= p.batch || n <= 1) {
    FS_MTL(if (threadIdx.x == 0 && tl != nullptr) { tl[0] = tl_entry; tl[1] = timeline::now(); })
    return;
  }
  // Wait for the decode grid (a no-op when not launched as a programmatic dependent).
  pdl_wait();
  FS_MTL(if (threadIdx.x == 0 && tl != nullptr) { tl[0] = tl_entry; tl[1] = timeline::now(); })
  if (base < 0 || base + n > workspace_slots(p.num_sm_parts)) return;  // inconsistent plan
  if (R >= p.rows) return;  // whole warps: kRowThreads is a multiple of 32
  FS_MTL(if (tl != nullptr) tl[6] = timeline::now();)
  const int lane = threadIdx.x & 31;
  const float* lse_in = p.ws_lse + static_cast<int64_t>(base) * p.rows + R;
  const int64_t split_stride = static_cast<int64_t>(p.rows) * kDV;
  const QT* src = static_cast<const QT*>(p.ws_o) + (static_cast<int64_t>(base) * p.rows + R) * kDV + t * 4;

  // The first group's partial rows and lse values do not depend on the row's lse: they are loaded
  // before the lse pass, so that a row with at most kGroup splits costs one memory round trip.
  // Raw 8-byte loads, converted where they are summed, so that a group's loads are all in flight.
  uint2 v[kGroup][kVec];
  float l[kGroup];
  auto load_group = [&](int i0) {
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const bool ok = i0 + j < n;
      l[j] = ok ? lse_in[static_cast<int64_t>(i0 + j) * p.rows] : -INFINITY;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        v[j][k] = ok ? *reinterpret_cast<const uint2*>(src + (i0 + j) * split_stride + k * kRowThreads * 4)
                     : make_uint2(0u, 0u);
      }
    }
  };
  load_group(0);

  // Every warp reduces the n split lse values itself (n is small; the reads hit L1): no barrier.
  float m = -INFINITY;
  for (int i = lane; i < n; i += 32) m = fmaxf(m, lse_in[static_cast<int64_t>(i) * p.rows]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float sum = 0.f;
  if (m != -INFINITY) {
    for (int i = lane; i < n; i += 32) sum += exp2f(lse_in[static_cast<int64_t>(i) * p.rows] - m);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float lse2 = m == -INFINITY ? -INFINITY : m + log2f(sum);
  FS_MTL(if (tl != nullptr) tl[7] = timeline::now();)

  float4 acc[kVec];
#pragma unroll
  for (int k = 0; k < kVec; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (lse2 != -INFINITY) {
    for (int i0 = 0;; i0 += kGroup) {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (i0 + j >= n) break;
        const float w = exp2f(l[j] - lse2);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const float4 x = to_float4<QT>(v[j][k]);
          acc[k].x += w * x.x;
          acc[k].y += w * x.y;
          acc[k].z += w * x.z;
          acc[k].w += w * x.w;
        }
      }
      if (i0 + kGroup >= n) break;
      load_group(i0 + kGroup);
    }
  }
  FS_MTL(if (tl != nullptr) tl[8] = timeline::now();)
  const int s = R / p.h_q, h = R - s * p.h_q;
  QT* dst = static_cast<QT*>(p.out) + bi * p.o_stride_b + s * p.o_stride_s + h * p.o_stride_h + t * 4;
#pragma unroll
  for (int k = 0; k < kVec; ++k) store4(dst + k * kRowThreads * 4, acc[k]);
  if (t == 0) p.lse[(static_cast<int64_t>(bi) * p.h_q + h) * p.s_q + s] = lse2 * 0.69314718055994531f;
  FS_MTL(if (threadIdx.x == 0 && tl != nullptr) { tl[2] = timeline::now(); tl[3] = 1; })
}

template <typename QT, int kVec, int kRows, int kGroup>
void launch_combine_shape(const DecodeParams& p, cudaStream_t stream) {
  const int entries = p.batch < p.num_sm_parts - 1 ? p.batch : p.num_sm_parts - 1;
  launch_pdl(mla_combine_kernel<QT, kVec, kRows, kGroup>, dim3((p.rows + kRows - 1) / kRows, entries),
             dim3(kRows * kCols / kVec), 0, stream, p);
}

template <typename QT>
void launch_combine_t(const DecodeParams& p, cudaStream_t stream) {
  // The plan spreads about num_sm_parts + batch pieces over the batch.
  if (p.num_sm_parts >= 8 * p.batch) {
    launch_combine_shape<QT, 1, 1, 32>(p, stream);
  } else {
    launch_combine_shape<QT, 4, 8, 4>(p, stream);
  }
}

}  // namespace

void launch_combine(const DecodeParams& p, bool q_fp16, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0 || p.ws_o == nullptr || p.num_sm_parts < 2) return;
  if (q_fp16) {
    launch_combine_t<__half>(p, stream);
  } else {
    launch_combine_t<__nv_bfloat16>(p, stream);
  }
}

}  // namespace flashseek::mla
