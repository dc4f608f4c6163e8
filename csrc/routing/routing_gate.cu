// Gate GEMM + noaux_tc routing in one cooperative launch, for decode-sized T (<= kGateMaxT = 64).
//
// Stage 1 (all CTAs): logits partials. The gate weight [E, H] (R1: 256 x 7168 bf16 = 3.7 MB) is
// cut into units of 32 expert rows x one k-block of kGateKBlock = 512 columns (R1: 8 x 14 = 112
// units, one per CTA). A CTA (4 warps, 8 rows each) first issues its weight loads straight into
// registers (each lane: 8 rows x 2 16-byte chunks, columns 8 * lane + 256 * s), then stages the
// unit's hidden columns of all T tokens in shared memory (cp.async, T KB), converts the weights
// to fp32 once and runs tiles of 4 tokens x 8 rows: per lane 2 x 8 FMAs per (row, token), then a
// reduce-scatter butterfly over the 32 lanes (5 shuffle steps, 31 exchanges for 32 outputs) leaves
// output (row lane / 4, token lane % 4) on lane `lane`, stored to partials[kb][t][e] (fp32 scratch).
// CUDA cores, not tensor cores: an MMA's internal fp32 accumulation is not IEEE round-to-nearest,
// so its result could not be reproduced by a reference; bf16 x bf16 products are exact in fp32, so
// every FMA here is one correctly rounded add, and the order below is the whole numerical spec.
//
// Numerical spec (flashseek/ref/routing.py:gate_logits_fp32 reproduces it bit for bit): with
// k = 512 kb + 256 s + 8 l + i (kb < H / 512, s < 2, l < 32, i < 8),
//   lane partial  P[kb][l] = fp32 sum over (s, i) in lexicographic order, starting from 0;
//   block partial Q[kb]    = pairwise tree over l: halves (l, l + 16), then (l, l + 8), ... (l, l + 1);
//   logit                  = Q[0] + Q[1] + ... + Q[H/512 - 1], left to right.
// (The fma equals the add of the rounded product as long as no product x * w is subnormal or
// overflows, |x * w| >= 2^-126 or 0, which holds for any sane activations and weights.)
//
// Grid barrier: cooperative_groups::this_grid().sync() (cooperative launch, grid sized by the
// occupancy API: all CTAs co-resident; a CTA grid-strides over units if there are more).
// Stage 2, R1 shape (E 256, 8 groups, top-4 groups, top-8): warp w of the grid takes token w: lane L
// sums experts 8L..8L+7 over the k-blocks (coherent loads, L2), writes the fp32 logits and runs
// r1::route_token_regs, the same per-token function as route_noaux_tc's R1 kernel, so ids and
// weights equal route_noaux_tc on these logits. Other shapes: stage 2 writes the logits and the
// host launches route_noaux_tc's kernel on them (two launches).
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_check.h"
#include "routing/routing.h"
#include "routing/routing_device.cuh"

namespace flashseek {
namespace {

namespace cg = cooperative_groups;
using namespace routing_dev;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 8;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // 32
constexpr int kTokTile = 4;                           // kRowsPerWarp x kTokTile = 32 outputs per tile
constexpr int kSteps = kGateKBlock / 256;             // 16-byte chunks per lane per row
constexpr int kMaxDynSmem = kGateMaxT * kGateKBlock * 2;
static_assert(kRowsPerWarp * kTokTile == 32, "one output per lane after the reduce-scatter");

__device__ __forceinline__ void bf16x8_to_f32(const uint4 v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// Streamed once: no L1 allocation.
__device__ __forceinline__ uint4 ld_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = uint32_t(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

// One reduce-scatter step over the first N values: lanes with bit N/2 set keep the upper half.
// After the steps N = 32, 16, ..., 2, v[0] holds output `lane`, summed over all 32 lanes as the
// pairwise tree (l, l ^ 16), then (l, l ^ 8), ..., (l, l ^ 1) (fp32 add commutes: any lane of a
// pair gets the same bits).
template <int N>
__device__ __forceinline__ void rs_step(float (&v)[32], int lane) {
  constexpr int kHalf = N / 2;
  const bool up = (lane & kHalf) != 0;
#pragma unroll
  for (int i = 0; i < kHalf; ++i) {
    const float send = up ? v[i] : v[i + kHalf];
    const float keep = up ? v[i + kHalf] : v[i];
    v[i] = __fadd_rn(keep, __shfl_xor_sync(kFull, send, kHalf));
  }
}

template <bool kRouteR1>
__global__ void __launch_bounds__(kThreads, 1) gate_route_kernel(const GateRouteParams p) {
  extern __shared__ __align__(16) unsigned char xs_raw[];  // [T][kGateKBlock] bf16
  __shared__ r1::WarpSmem rsm[kRouteR1 ? kWarps : 1];
  __shared__ __align__(16) float sbias[kRouteR1 ? r1::kE : 4];
  __shared__ uint32_t ktable[kRouteR1 ? 256 : 1];
  __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(xs_raw);

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int T = int(p.route.T), E = p.route.E, H = p.H;
  const int n_kb = H / kGateKBlock;
  const int n_rb = (E + kRowsPerBlock - 1) / kRowsPerBlock;
  const int units = n_kb * n_rb;
  const __nv_bfloat16* hid = static_cast<const __nv_bfloat16*>(p.hidden);
  const __nv_bfloat16* gw = static_cast<const __nv_bfloat16*>(p.gate_weight);

  for (int u = blockIdx.x; u < units; u += gridDim.x) {
    const int kb = u / n_rb, rb = u - kb * n_rb;
    const int k0 = kb * kGateKBlock;
    const int row0 = rb * kRowsPerBlock + warp * kRowsPerWarp;
    // Weights first: the HBM stream, in flight while the hidden columns are staged.
    uint4 wv[kRowsPerWarp][kSteps];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        wv[r][s] = row0 + r < E ? ld_stream(gw + size_t(row0 + r) * H + k0 + 256 * s + 8 * lane)
                                : make_uint4(0u, 0u, 0u, 0u);
      }
    }
    __syncthreads();  // the previous unit's readers of xs are done
    for (int c = threadIdx.x; c < T * (kGateKBlock / 8); c += kThreads) {
      const int t = c / (kGateKBlock / 8), col = c - t * (kGateKBlock / 8);
      cp_async16(xs + t * kGateKBlock + 8 * col, hid + size_t(t) * H + k0 + 8 * col);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    __syncthreads();

    float wf[kRowsPerWarp][8 * kSteps];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int s = 0; s < kSteps; ++s) bf16x8_to_f32(wv[r][s], &wf[r][8 * s]);
    }

    for (int t0 = 0; t0 < T; t0 += kTokTile) {
      float acc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
#pragma unroll
        for (int j = 0; j < kTokTile; ++j) {
          float x[8];
          if (t0 + j < T) {
            bf16x8_to_f32(*reinterpret_cast<const uint4*>(xs + (t0 + j) * kGateKBlock + 256 * s + 8 * lane), x);
          } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] = 0.0f;
          }
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[r * kTokTile + j] = __fmaf_rn(wf[r][8 * s + i], x[i], acc[r * kTokTile + j]);
          }
        }
      }
      rs_step<32>(acc, lane);
      rs_step<16>(acc, lane);
      rs_step<8>(acc, lane);
      rs_step<4>(acc, lane);
      rs_step<2>(acc, lane);
      const int t = t0 + (lane & (kTokTile - 1)), e = row0 + lane / kTokTile;
      if (t < T && e < E) p.partials[(size_t(kb) * T + t) * E + e] = acc[0];
    }
  }

  if constexpr (kRouteR1) {
    for (int e = threadIdx.x; e < r1::kE; e += kThreads) {
      sbias[e] = __ldg(p.route.bias + e);
      ktable[e] = r1::kept_table_entry(uint32_t(e));
    }
  }
  cg::this_grid().sync();  // every partial is written (and visible: the barrier orders memory)

  const size_t kb_stride = size_t(T) * E;
  if constexpr (kRouteR1) {
    const r1::Lane l = r1::make_lane(rsm[warp], lane);
    __syncthreads();  // sbias, ktable
    const int ws = int(p.route.weights_stride), is = int(p.route.ids_stride);
    for (int t = int(blockIdx.x) * kWarps + warp; t < T; t += int(gridDim.x) * kWarps) {
      const float* src = p.partials + size_t(t) * E + 8 * lane;
      float x[8];
      {
        const float4 a = __ldcg(reinterpret_cast<const float4*>(src));
        const float4 b = __ldcg(reinterpret_cast<const float4*>(src) + 1);
        x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
      }
#pragma unroll 7
      for (int kb = 1; kb < n_kb; ++kb) {
        const float4 a = __ldcg(reinterpret_cast<const float4*>(src + kb * kb_stride));
        const float4 b = __ldcg(reinterpret_cast<const float4*>(src + kb * kb_stride) + 1);
        x[0] = __fadd_rn(x[0], a.x), x[1] = __fadd_rn(x[1], a.y), x[2] = __fadd_rn(x[2], a.z);
        x[3] = __fadd_rn(x[3], a.w), x[4] = __fadd_rn(x[4], b.x), x[5] = __fadd_rn(x[5], b.y);
        x[6] = __fadd_rn(x[6], b.z), x[7] = __fadd_rn(x[7], b.w);
      }
      float4* out = reinterpret_cast<float4*>(p.logits + size_t(t) * E + 8 * lane);
      out[0] = make_float4(x[0], x[1], x[2], x[3]);
      out[1] = make_float4(x[4], x[5], x[6], x[7]);
      r1::route_token_regs(x, sbias, ktable, rsm[warp], l, p.route.scale, p.route.renormalize,
                           p.route.weights + t * ws, p.route.ids + t * is);
    }
  } else {
    const int n = T * E;
    for (int i = int(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int(gridDim.x) * kThreads) {
      float acc = __ldcg(p.partials + i);
      for (int kb = 1; kb < n_kb; ++kb) acc = __fadd_rn(acc, __ldcg(p.partials + kb * kb_stride + i));
      p.logits[i] = acc;
    }
  }
}

// Co-resident grid (cooperative launch): occupancy at the largest dynamic smem, cached per device.
template <bool kRouteR1>
int gate_grid(int units) {
  static int blocks_per_sm[64] = {};
  static int sm_count[64] = {};
  int dev = 0;
  FS_CUDA_CHECK(cudaGetDevice(&dev));
  const int d = dev & 63;
  if (blocks_per_sm[d] <= 0) {
    auto kernel = gate_route_kernel<kRouteR1>;
    FS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxDynSmem));
    int b = 0;
    FS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, kThreads, kMaxDynSmem));
    FS_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count[d], cudaDevAttrMultiProcessorCount, dev));
    if (b <= 0) throw std::runtime_error("flashseek: route_noaux_tc_gate kernel cannot be resident on this device");
    blocks_per_sm[d] = b;
  }
  return std::min(units, blocks_per_sm[d] * sm_count[d]);
}

template <bool kRouteR1>
void launch_gate(GateRouteParams& p, cudaStream_t stream) {
  const int units = (p.H / kGateKBlock) * ((p.route.E + kRowsPerBlock - 1) / kRowsPerBlock);
  const dim3 grid(unsigned(gate_grid<kRouteR1>(units)));
  void* args[] = {&p};
  FS_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(gate_route_kernel<kRouteR1>), grid,
                                            dim3(kThreads), args, size_t(p.route.T) * kGateKBlock * 2, stream));
  FS_CHECK_LAUNCH();
}

}  // namespace

void launch_route_noaux_tc_gate(GateRouteParams p, cudaStream_t stream) {
  if (p.route.T == 0) return;
  if (p.route.T > kGateMaxT || p.H % kGateKBlock != 0 || p.H <= 0)
    throw std::runtime_error("flashseek: route_noaux_tc_gate needs T <= 64 and H % 512 == 0");
  p.route.logits = p.logits;
  p.route.logits_stride = p.route.E;
  p.route.dtype = RouteDtype::kF32;
  const RouteParams& r = p.route;
  if (r1::is_r1_shape(r.E, r.n_group, r.topk_group, r.topk)) {
    launch_gate<true>(p, stream);
  } else {
    launch_gate<false>(p, stream);
    launch_route_noaux_tc(p.route, stream);
  }
}

}  // namespace flashseek
