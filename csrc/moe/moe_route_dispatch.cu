// The front of fused_moe's masked (decode) path in one launch: route_noaux_tc -> moe_align_masked ->
// moe_scatter_quant, for T <= kMoeRouteDispatchMaxT (32) tokens, bit-identical to that chain.
//
// Redundant routing, no grid barrier. Every CTA routes all T tokens itself (one warp per token, or
// warps looping over tokens where the per-warp scratch is large), with the per-token functions of
// route_noaux_tc (routing/routing_device.cuh: r1::route_token for the DeepSeek shape, else
// noaux_route_token) chosen by the same rules (r1::use_r1_path, noaux_layout, vectorize_layout), so
// ids and weights are route_noaux_tc's by construction. Each CTA then knows every slot's row and
// quantizes its own share of the (token, 128-column block) units; CTA 0 alone writes topk_weights,
// topk_ids, masked_m and token_slots. Each CTA issues the loads of its first hidden block before it
// routes, so they overlap the routing. Its setup (the bias in shared memory, the routing tables) runs
// before the PDL wait, and the first token's logits are requested right after it, beside the hidden
// block: one L2 round trip between the wait and the routing (session 25, H200: -1.0 us in the b=1 MoE
// layer).
//
// Rows. T <= 32 makes a token set one 32-bit word: tokmask[e] bit t = token t picked local expert e.
// When no token picks the same local expert twice (always, unless NaN logits or an expert_map that
// maps two global experts to one local one), the rank of slot (t, j) among expert e's slots in
// ascending slot order is popc(tokmask[e] & (2^t - 1)) and the count is popc(tokmask[e]). Otherwise
// (detected with __match_any_sync over each token's slots) one warp walks the slots in order, 32 at
// a time, exactly like moe_align's scatter. Either way row = e * max_m + rank, -1 if e < 0 or rank
// >= max_m, as moe_align_masked.
//
// Quantization: moe_dev::quantize_chunk, the half-warp block quantization of moe_scatter_quant (one
// 16-byte load a lane, amax over the half-warp, 8 e4m3 bytes a lane), stored to the token's rows.
// Rows nobody points at keep their contents, as with moe_scatter_quant. Shared experts (after the
// routed ones) get every token's row t, from the same quantized chunk.
//
// Grid: units = T x H/128, at least kMinUnitsPerCta a CTA and at most kMaxCtas CTAs (R1, H 7168:
// T = 1 -> 4 CTAs of 14 units, T = 8 -> 28 of 16, T = 32 -> 64 of 28); a CTA has max(T, units / 2)
// warps (capped by the per-warp scratch of the routing path), so each half-warp holds one unit.
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "common/smem_opt_in.h"
#include "moe/moe.h"
#include "moe/moe_quant_device.cuh"
#include "routing/routing_device.cuh"

namespace flashseek {
namespace {

using namespace routing_dev;
using moe_dev::QuantizedChunk;
using moe_dev::quantize_chunk;

constexpr int kMinUnitsPerCta = 16;
constexpr int kMaxCtas = 64;
static_assert(kMoeRouteDispatchMaxT <= 32, "a token set is one 32-bit word");
static_assert(kMaxTopk <= 16, "a token's slots fit in a half-warp");

// Compile-time configuration of one instantiation: the R1 path, or the generic one with VPL keys a
// lane. Warps are capped where the routing's registers (R1: 40, generic VPL 8: 48, 16: 71, 32: 127)
// or per-warp scratch (10 KB at VPL 32) would not fit a larger block.
template <bool kR1, int VPL>
struct Cfg {
  using Smem = std::conditional_t<kR1, r1::WarpSmem, WarpSmem<VPL>>;
  static constexpr int kMaxWarps = (kR1 || VPL <= 8) ? 32 : (VPL == 16 ? 16 : 8);
};

constexpr int round16(int x) { return (x + 15) / 16 * 16; }

// Dynamic shared memory, in bytes from the start (every part 16-byte aligned).
struct SmemLayout {
  int bias, ktable, ids, local, row, wscratch, tokmask, count, flag, total;
};

__host__ __device__ inline SmemLayout smem_layout(int warps, int warp_bytes, int E, int n_slots, int num_local) {
  SmemLayout s;
  s.bias = round16(warps * warp_bytes);
  s.ktable = s.bias + round16(E * 4);
  s.ids = s.ktable + 256 * 4;
  s.local = s.ids + round16(n_slots * 4);
  s.row = s.local + round16(n_slots * 4);
  s.wscratch = s.row + round16(n_slots * 4);
  s.tokmask = s.wscratch + round16(n_slots * 4);
  s.count = s.tokmask + round16(num_local * 4);
  s.flag = s.count + round16(num_local * 4);
  s.total = s.flag + 16;
  return s;
}

// moe_align's rule: ids outside [0, E) and experts mapped outside [0, num_local) are dropped (-1).
__device__ __forceinline__ int local_expert(const MoeRouteDispatchParams& p, int id) {
  if (id < 0 || id >= p.route.E) return -1;
  const int e = p.expert_map ? __ldg(p.expert_map + id) : id;
  return (e >= 0 && e < p.num_local) ? e : -1;
}

__device__ __forceinline__ uint4 load_chunk(const MoeRouteDispatchParams& p, int token, int kb, int hl) {
  const __nv_bfloat16* src = static_cast<const __nv_bfloat16*>(p.hidden) + int64_t(token) * p.hidden_stride +
                             int64_t(kb) * 128 + hl * 8;
  return __ldg(reinterpret_cast<const uint4*>(src));
}

__device__ __forceinline__ void store_chunk(const MoeRouteDispatchParams& p, int row, int kb, int hl,
                                            const QuantizedChunk& c) {
  const int e = row / p.max_m, m = row - e * p.max_m;
  uint8_t* dst = p.a + int64_t(row) * p.H + int64_t(kb) * 128 + hl * 8;  // a is contiguous
  *reinterpret_cast<uint2*>(dst) = c.q;
  if (hl == 0) p.a_scale[int64_t(e) * p.s_gstride + m + int64_t(kb) * p.s_ld] = c.scale;
}

template <bool kR1, int VPL, typename In>
__global__ void __launch_bounds__(Cfg<kR1, VPL>::kMaxWarps * 32)
    moe_route_dispatch_kernel(const MoeRouteDispatchParams p, const Layout l, int units_per_cta) {
  using Smem = typename Cfg<kR1, VPL>::Smem;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = int(blockDim.x) >> 5;
  const RouteParams& r = p.route;
  const int T = int(r.T), k = r.topk, n = T * k, num_local = p.num_local, max_m = p.max_m;
  const SmemLayout L = smem_layout(nw, int(sizeof(Smem)), kR1 ? r1::kE : r.E, n, num_local);
  Smem& wsm = reinterpret_cast<Smem*>(smem)[warp];
  float* sbias = reinterpret_cast<float*>(smem + L.bias);
  uint32_t* ktable = reinterpret_cast<uint32_t*>(smem + L.ktable);
  int32_t* sid = reinterpret_cast<int32_t*>(smem + L.ids);        // [n] expert ids
  int32_t* slocal = reinterpret_cast<int32_t*>(smem + L.local);   // [n] local expert or -1
  int32_t* srow = reinterpret_cast<int32_t*>(smem + L.row);       // [n] rows (only with duplicates)
  float* wscratch = reinterpret_cast<float*>(smem + L.wscratch);  // [n] weights of CTAs other than 0
  uint32_t* tokmask = reinterpret_cast<uint32_t*>(smem + L.tokmask);
  int32_t* scount = reinterpret_cast<int32_t*>(smem + L.count);   // [num_local] (only with duplicates)
  volatile int* sdup = reinterpret_cast<volatile int*>(smem + L.flag);

  // Everything up to the wait reads only the bias (a weight, never written by a kernel that lets its
  // dependents start early: see rms_norm.cu) and shared memory, so it overlaps the previous kernel's end.
  for (int e = tid; e < num_local; e += blockDim.x) tokmask[e] = 0u;
  if (tid == 0) *sdup = 0;
  if constexpr (kR1) {
    for (int e = tid; e < r1::kE; e += blockDim.x) {
      sbias[e] = __ldg(r.bias + e);
      ktable[e] = r1::kept_table_entry(uint32_t(e));
    }
  } else {
    for (int e = tid; e < r.E; e += blockDim.x) sbias[e] = __ldg(r.bias + e);
  }
  // Per-warp routing setup (R1: the sentinel slot; generic: the lane's layout and sentinel).
  [[maybe_unused]] r1::Lane rl;
  [[maybe_unused]] NoauxLane nl;
  if constexpr (kR1) {
    rl = r1::make_lane(wsm, lane);
  } else {
    nl = make_noaux_lane(l, lane);
    init_list<VPL>(wsm, lane);
  }

  pdl_wait();
  pdl_launch_dependents();

  // This CTA's units [u0, u1) of (token, 128-column block), token-major; half-warp hw takes u0 + hw,
  // u0 + hw + n_hw, ... Its first block is loaded now, under the routing.
  const int KB = int(p.H / 128);
  const int u0 = int(blockIdx.x) * units_per_cta;
  const int u1 = min(u0 + units_per_cta, T * KB);
  const int hl = tid & 15, n_hw = int(blockDim.x) >> 4;
  int u = u0 + (tid >> 4);
  uint4 raw = make_uint4(0u, 0u, 0u, 0u);
  if (u < u1) raw = load_chunk(p, u / KB, u % KB, hl);
  // R1: the warp's first token's logits are requested alongside, before the barrier (one L2 round
  // trip after the wait instead of two).
  [[maybe_unused]] float s_logits[8];
  if constexpr (kR1) {
    if (warp < T)
      load_row<8, In>(static_cast<const In*>(r.logits) + int64_t(warp) * r.logits_stride, 8 * lane, 8, true, 0.0f,
                      s_logits);
  }
  __syncthreads();

  // Route; then lane j < topk owns slot (t, j): its id, its local expert, the token's bit.
  const bool writer = blockIdx.x == 0;
  const bool grouped = r.topk_group < r.n_group;
  for (int t = warp; t < T; t += nw) {
    const In* row = static_cast<const In*>(r.logits) + int64_t(t) * r.logits_stride;
    float* w_out = writer ? r.weights + int64_t(t) * r.weights_stride : wscratch + t * k;
    int32_t* id_out = sid + t * k;
    if constexpr (kR1) {
      if (t != warp) load_row<8, In>(row, 8 * lane, 8, true, 0.0f, s_logits);
      r1::route_token_regs(s_logits, sbias, ktable, wsm, rl, r.scale, r.renormalize, w_out, id_out);
    } else {
      noaux_route_token<VPL, In>(row, l, nl, sbias, wsm, grouped, r.topk_group, k, r.scale, r.renormalize, w_out,
                                 id_out);
    }
    int e = -1;
    if (lane < k) {
      const int id = id_out[lane];  // this lane's own write
      if (writer) r.ids[int64_t(t) * r.ids_stride + lane] = id;
      e = local_expert(p, id);
      slocal[t * k + lane] = e;
    }
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0) {
      atomicOr(tokmask + e, 1u << t);
      if (__popc(peers) > 1) *sdup = 1;  // the token holds local expert e twice
    }
  }
  __syncthreads();

  const bool dup = *sdup != 0;  // uniform over the CTA
  if (dup) {
    // moe_align's scatter on one warp: slots in ascending order, 32 at a time; the lanes of one
    // expert take consecutive ranks, then its lowest lane advances the expert's count.
    if (warp == 0) {
      for (int e = lane; e < num_local; e += 32) scount[e] = 0;
      __syncwarp();
      const unsigned lower = (1u << lane) - 1u;
      for (int base = 0; base < n; base += 32) {
        const int s = base + lane;
        const int e = s < n ? slocal[s] : -1;
        const unsigned peers = __match_any_sync(kFull, e);
        int next = 0;
        if (e >= 0) {
          const int first = scount[e];
          const int rank = first + __popc(peers & lower);
          next = first + __popc(peers);
          srow[s] = rank < max_m ? e * max_m + rank : -1;
        } else if (s < n) {
          srow[s] = -1;
        }
        __syncwarp();
        if (e >= 0 && lane == __ffs(peers) - 1) scount[e] = next;
        __syncwarp();
      }
    }
    __syncthreads();
  }
  // The row of slot s = (t, j).
  auto slot_row = [&](int s, int t) -> int {
    if (dup) return srow[s];
    const int e = slocal[s];
    if (e < 0) return -1;
    const int rank = __popc(tokmask[e] & ((1u << t) - 1u));
    return rank < max_m ? e * max_m + rank : -1;
  };

  if (writer) {
    for (int s = tid; s < n; s += blockDim.x) p.token_slots[s] = slot_row(s, s / k);
    for (int e = tid; e < num_local; e += blockDim.x) {
      const int count = dup ? scount[e] : __popc(tokmask[e]);
      p.masked_m[e] = count < max_m ? count : max_m;
    }
    for (int j = tid; j < p.num_shared; j += blockDim.x) p.masked_m[num_local + j] = T;  // max_m >= T
  }

  // Quantize each unit once and store it to the token's rows (lane hl < topk holds slot (t, hl)'s
  // row; the half-warp broadcasts them in j order).
  const unsigned half = 0xffffu << (tid & 16);
  for (; u < u1; u += n_hw) {
    const int t = u / KB, kb = u - t * KB;
    const QuantizedChunk c = quantize_chunk(raw, p.ue8m0);
    const int un = u + n_hw;
    if (un < u1) raw = load_chunk(p, un / KB, un % KB, hl);
    const int my_row = hl < k ? slot_row(t * k + hl, t) : -1;
    for (int j = 0; j < k; ++j) {
      const int row = __shfl_sync(half, my_row, j, 16);
      if (row >= 0) store_chunk(p, row, kb, hl, c);
    }
    for (int j = 0; j < p.num_shared; ++j) store_chunk(p, (num_local + j) * max_m + t, kb, hl, c);
  }
}

template <bool kR1, int VPL, typename In>
void launch_typed(const MoeRouteDispatchParams& p, const Layout& l, cudaStream_t stream) {
  using C = Cfg<kR1, VPL>;
  auto kernel = moe_route_dispatch_kernel<kR1, VPL, In>;
  const int T = int(p.route.T);
  const int E = kR1 ? r1::kE : p.route.E;
  const int units = T * int(p.H / 128);
  int ctas = 1, per_cta = 0;
  if (units > 0) {
    ctas = (units + kMinUnitsPerCta - 1) / kMinUnitsPerCta;
    ctas = ctas < kMaxCtas ? ctas : kMaxCtas;
    per_cta = (units + ctas - 1) / ctas;
    ctas = (units + per_cta - 1) / per_cta;
  }
  int warps = (per_cta + 1) / 2;
  warps = warps > T ? warps : T;
  warps = warps < 1 ? 1 : (warps > C::kMaxWarps ? C::kMaxWarps : warps);
  const int bytes = smem_layout(warps, int(sizeof(typename C::Smem)), E, T * p.route.topk, p.num_local).total;
  opt_in_dynamic_smem<moe_route_dispatch_kernel<kR1, VPL, In>>(bytes);
  launch_pdl(kernel, dim3(unsigned(ctas)), dim3(unsigned(warps * 32)), size_t(bytes), stream, p, l, per_cta);
}

template <typename In>
void launch_in(const MoeRouteDispatchParams& p, cudaStream_t stream) {
  if (r1::use_r1_path(p.route)) {
    launch_typed<true, 1, In>(p, Layout{}, stream);
    return;
  }
  Layout l = noaux_layout(p.route.E, p.route.n_group, p.route.topk_group);
  switch (vectorize_layout(l, logits_rows_aligned16(p.route), int(sizeof(In)))) {
    case 1: launch_typed<false, 1, In>(p, l, stream); break;
    case 2: launch_typed<false, 2, In>(p, l, stream); break;
    case 4: launch_typed<false, 4, In>(p, l, stream); break;
    case 8: launch_typed<false, 8, In>(p, l, stream); break;
    case 16: launch_typed<false, 16, In>(p, l, stream); break;
    case 32: launch_typed<false, 32, In>(p, l, stream); break;
    default: throw std::runtime_error("flashseek: routing layout needs more than 32 experts per lane");
  }
}

}  // namespace

void launch_moe_route_dispatch(const MoeRouteDispatchParams& p, cudaStream_t stream) {
  if (p.route.T < 0 || p.route.T > kMoeRouteDispatchMaxT)
    throw std::invalid_argument("flashseek: moe_route_dispatch takes at most 32 tokens");
  if (p.route.topk < 1 || p.route.topk > kMaxTopk || p.num_local < 1 || p.num_local > kMoeAlignMaxLocalExperts ||
      p.route.E < 1 || p.route.E > kMaxExperts || p.H % 128 != 0 || p.max_m < 0 || p.num_shared < 0 ||
      p.num_shared > kMoeRouteDispatchMaxShared || (p.num_shared > 0 && p.max_m < p.route.T))
    throw std::invalid_argument("flashseek: moe_route_dispatch parameters out of range");
  switch (p.route.dtype) {
    case RouteDtype::kF32: launch_in<float>(p, stream); break;
    case RouteDtype::kBF16: launch_in<__nv_bfloat16>(p, stream); break;
    case RouteDtype::kF16: launch_in<__half>(p, stream); break;
  }
}

}  // namespace flashseek
