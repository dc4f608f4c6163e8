// Fused top-k routing: one warp per token, everything in registers, one launch per call.
//
// Lane layout. A token's E experts are split into `n_layout` groups of G consecutive experts; each
// group owns `lpg` consecutive lanes (a power of two, so butterfly shuffles stay inside it) and each
// lane holds up to `vpl` consecutive experts of its group. Without a group stage (softmax, or every
// group kept) there is one group of E experts over all 32 lanes. Keeping a lane's experts consecutive
// gives 16-byte loads for the R1 shape (8 groups of 32 experts: 4 lanes x 8 bf16 per group) and
// means a lane's slots are in ascending id order, which the lower-id tie rule relies on.
//
// Exactness. Expert ids must be bit-identical to flashseek/ref/routing.py, so every value that a
// comparison sees is computed with the reference's fp32 operations: sigmoid = 1 / (1 + expf(-x)),
// IEEE division, explicit __fadd_rn so that nvcc cannot contract a multiply inside expf with the
// following add into an fma. Selection compares (score, id) keys: a monotone uint32 image of the
// score, then the smaller id; -0.0 is folded into +0.0 because torch's sort treats them as equal.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "routing/routing.h"

namespace flashseek {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

struct Layout {
  int n_layout;  // groups in the lane layout
  int group;     // experts per group (G)
  int lpg;       // lanes per group, power of two
  int vpl;       // experts per lane (<= the VPL template)
  bool vec;      // every lane's slice is full and aligned for vector loads
};

__device__ __forceinline__ uint32_t ordered_key(float f) {
  f = (f == 0.0f) ? 0.0f : f;
  uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename In>
__device__ __forceinline__ float to_f32(In v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

// Loads this lane's `cnt` consecutive logits (as fp32) into x[0..VPL); missing slots get -inf.
template <int VPL, typename In>
__device__ __forceinline__ void load_row(const In* row, int start, int cnt, bool vec, float (&x)[VPL]) {
  constexpr int kBytes = VPL * int(sizeof(In));
  if constexpr (kBytes >= 16) {
    if (vec && cnt == VPL) {
      In buf[VPL];
      const uint4* src = reinterpret_cast<const uint4*>(row + start);
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c) reinterpret_cast<uint4*>(buf)[c] = __ldg(src + c);
#pragma unroll
      for (int i = 0; i < VPL; ++i) x[i] = to_f32(buf[i]);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i) x[i] = (i < cnt) ? to_f32(row[start + i]) : -__int_as_float(0x7f800000);
}

__device__ __forceinline__ float sigmoid_ref(float x) {
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x)));
}

__host__ __device__ inline Layout make_layout(int E, int n_layout) {
  Layout l;
  l.n_layout = n_layout;
  l.group = E / n_layout;
  int lpg = 1;
  while (lpg * 2 * n_layout <= 32) lpg *= 2;
  l.lpg = lpg;
  l.vpl = (l.group + lpg - 1) / lpg;
  l.vec = false;
  return l;
}

// Picks the best available slot of this lane: the largest key, the lowest slot on ties.
template <int VPL>
__device__ __forceinline__ void local_best(const uint32_t (&key)[VPL], const float (&val)[VPL], uint32_t avail,
                                           uint32_t& best_key, int& best_slot, float& best_val) {
  best_slot = -1;
  best_key = 0;
  best_val = 0.0f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const bool ok = (avail >> i) & 1u;
    if (ok && (best_slot < 0 || key[i] > best_key)) {
      best_key = key[i];
      best_slot = i;
      best_val = val[i];
    }
  }
}

// k rounds of a warp-wide argmax over (key, -id). __reduce_max_sync on the key, then on the
// complemented id among the lanes holding the maximum key: two REDUX per round instead of ten
// shuffles. The round's winner broadcasts its `val` (the weight numerator); lane j keeps pick j.
template <int VPL>
__device__ __forceinline__ void select_topk(const uint32_t (&key)[VPL], const float (&val)[VPL], uint32_t avail,
                                            int first_id, int lane, int topk, int& my_id, float& my_val,
                                            float& sum) {
  uint32_t best_key;
  int best_slot;
  float best_val;
  local_best<VPL>(key, val, avail, best_key, best_slot, best_val);
  my_id = 0;
  my_val = 0.0f;
  sum = 0.0f;
  for (int j = 0; j < topk; ++j) {
    const bool have = best_slot >= 0;
    const uint32_t kmax = __reduce_max_sync(kFull, have ? best_key : 0u);
    const uint32_t lo = (have && best_key == kmax) ? ~uint32_t(first_id + best_slot) : 0u;
    const uint32_t lomax = __reduce_max_sync(kFull, lo);
    const bool win = have && lo == lomax;
    const int src = __ffs(__ballot_sync(kFull, win)) - 1;
    const float v = __shfl_sync(kFull, best_val, src < 0 ? 0 : src);
    const int id = int(~lomax);
    if (lane == j) {
      my_id = id;
      my_val = v;
    }
    sum = __fadd_rn(sum, v);
    if (win) {
      avail &= ~(1u << best_slot);
      local_best<VPL>(key, val, avail, best_key, best_slot, best_val);
    }
  }
}

template <int VPL, typename In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_noaux_tc_kernel(const RouteParams p, const Layout l) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= p.T) return;  // whole warps exit together

  const int g = lane / l.lpg;
  const int q = lane % l.lpg;
  int start = 0, cnt = 0;
  if (g < l.n_layout) {
    start = g * l.group + q * l.vpl;
    cnt = min(l.vpl, l.group - q * l.vpl);
    cnt = cnt < 0 ? 0 : cnt;
  }
  const In* row = static_cast<const In*>(p.logits) + t * p.logits_stride;
  float s[VPL];
  load_row<VPL, In>(row, start, cnt, l.vec, s);

  float bsc[VPL];
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    s[i] = sigmoid_ref(s[i]);
    bsc[i] = (i < cnt) ? __fadd_rn(s[i], __ldg(p.bias + start + i)) : -__int_as_float(0x7f800000);
  }

  bool kept = g < l.n_layout;
  if (p.topk_group < p.n_group) {
    // Group score: the sum of the group's two largest biased scores (values only, so the
    // butterfly merge of per-lane top-2 pairs is exact).
    float m1 = -__int_as_float(0x7f800000), m2 = m1;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const float v = bsc[i];
      if (v > m1) {
        m2 = m1;
        m1 = v;
      } else if (v > m2) {
        m2 = v;
      }
    }
    for (int off = 1; off < l.lpg; off <<= 1) {
      const float o1 = __shfl_xor_sync(kFull, m1, off);
      const float o2 = __shfl_xor_sync(kFull, m2, off);
      const float n2 = fmaxf(fminf(m1, o1), fmaxf(m2, o2));
      m1 = fmaxf(m1, o1);
      m2 = n2;
    }
    const float gs = __fadd_rn(m1, m2);
    // Rank of this lane's group: groups with a larger score, or an equal score and a lower id.
    int rank = 0;
    for (int h = 0; h < l.n_layout; ++h) {
      const float o = __shfl_sync(kFull, gs, h * l.lpg);
      rank += (o > gs || (o == gs && h < g)) ? 1 : 0;
    }
    kept = kept && rank < p.topk_group;
  }

  uint32_t key[VPL];
  uint32_t avail = 0;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    key[i] = ordered_key(bsc[i]);
    if (kept && i < cnt) avail |= 1u << i;
  }
  int my_id;
  float my_val, sum;
  select_topk<VPL>(key, s, avail, start, lane, p.topk, my_id, my_val, sum);
  if (lane < p.topk) {
    float w = p.renormalize ? __fdiv_rn(my_val, __fadd_rn(sum, 1e-20f)) : my_val;
    w = __fmul_rn(w, p.scale);
    p.weights[t * p.weights_stride + lane] = w;
    p.ids[t * p.ids_stride + lane] = my_id;
  }
}

template <int VPL, typename In>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    route_softmax_topk_kernel(const RouteParams p, const Layout l) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (t >= p.T) return;

  const int start = lane * l.vpl;
  int cnt = min(l.vpl, p.E - start);
  cnt = cnt < 0 ? 0 : cnt;
  const In* row = static_cast<const In*>(p.logits) + t * p.logits_stride;
  float x[VPL];
  load_row<VPL, In>(row, start, cnt, l.vec, x);

  float m = -__int_as_float(0x7f800000);
#pragma unroll
  for (int i = 0; i < VPL; ++i) m = fmaxf(m, x[i]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(kFull, m, off));

  float e[VPL];
  uint32_t key[VPL];
  uint32_t avail = 0;
  float lsum = 0.0f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    e[i] = (i < cnt) ? expf(__fsub_rn(x[i], m)) : 0.0f;
    lsum = __fadd_rn(lsum, e[i]);
    key[i] = ordered_key(x[i]);
    if (i < cnt) avail |= 1u << i;
  }
  int my_id;
  float my_val, sel_sum;
  select_topk<VPL>(key, e, avail, start, lane, p.topk, my_id, my_val, sel_sum);
  if (!p.renormalize) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) lsum = __fadd_rn(lsum, __shfl_xor_sync(kFull, lsum, off));
  }
  if (lane < p.topk) {
    const float w = __fdiv_rn(my_val, p.renormalize ? sel_sum : lsum);
    p.weights[t * p.weights_stride + lane] = w;
    p.ids[t * p.ids_stride + lane] = my_id;
  }
}

template <typename In>
bool aligned16(const RouteParams& p) {
  return (reinterpret_cast<uintptr_t>(p.logits) % 16 == 0) && ((p.logits_stride * int64_t(sizeof(In))) % 16 == 0);
}

template <typename In, bool kSoftmax>
void launch_typed(const RouteParams& p, Layout l, cudaStream_t stream) {
  int vpl_t = 1;
  while (vpl_t < l.vpl) vpl_t *= 2;
  l.vec = (vpl_t == l.vpl) && (l.group % l.vpl == 0) && aligned16<In>(p) &&
          (l.vpl * int(sizeof(In))) % 16 == 0;
  const dim3 grid(unsigned((p.T + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarpsPerBlock * 32);
#define FS_ROUTE_CASE(V)                                                      \
  case V:                                                                     \
    if constexpr (kSoftmax) {                                                 \
      route_softmax_topk_kernel<V, In><<<grid, block, 0, stream>>>(p, l);     \
    } else {                                                                  \
      route_noaux_tc_kernel<V, In><<<grid, block, 0, stream>>>(p, l);         \
    }                                                                         \
    break;
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
  // With every group kept the group stage is a no-op; one 32-lane group then gives the best layout.
  const Layout l = make_layout(p.E, p.topk_group < p.n_group ? p.n_group : 1);
  launch_any<false>(p, l, stream);
}

void launch_route_softmax_topk(const RouteParams& p, cudaStream_t stream) {
  if (p.T == 0) return;
  launch_any<true>(p, make_layout(p.E, 1), stream);
}

}  // namespace flashseek
