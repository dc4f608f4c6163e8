// Device building blocks of the routing kernels (routing.cu), shared with the kernels that route
// tokens themselves (routing_gate.cu, moe/moe_route_dispatch.cu): the same per-token functions give
// the same ids and weights. See routing.cu's header comment for the key format, the selection rounds
// and the exactness rules.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "routing/routing.h"

namespace flashseek {
namespace routing_dev {

constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ uint32_t ordered_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  return u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
}
__device__ __forceinline__ float unordered_bits(uint32_t k) {
  return __uint_as_float(k ^ ((k & 0x80000000u) ? 0x80000000u : 0xffffffffu));
}
// A key's low word is VPL - 1 - slot (larger for a lower id; the id is the lane's start + slot).
// Constants, unlike the ids themselves, so nothing per lane stays live across tokens.
template <int VPL>
__device__ __forceinline__ uint64_t make_key(uint32_t score_word, int slot) {
  return (uint64_t(score_word) << 32) | uint32_t(VPL - 1 - slot);
}
// Key of an empty slot, a spent lane or a sentinel: score word 0, slot 0 (so that even a NaN tie
// at score word 0 yields an in-range id: the lane's start).
template <int VPL>
constexpr uint64_t kNoKey = uint64_t(VPL - 1);
__device__ __forceinline__ uint32_t key_hi(uint64_t k) { return uint32_t(k >> 32); }
__device__ __forceinline__ uint32_t key_lo(uint64_t k) { return uint32_t(k); }

template <typename In>
__device__ __forceinline__ float to_f32(In v);
template <>
__device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

// Loads this lane's `cnt` consecutive logits (as fp32) into x[0..VPL); missing slots get `fill`.
template <int VPL, typename In>
__device__ __forceinline__ void load_row(const In* row, int start, int cnt, bool vec, float fill, float (&x)[VPL]) {
  constexpr int kBytes = VPL * int(sizeof(In));
  if constexpr (kBytes >= 16) {
    if (vec && cnt == VPL) {
      uint4 buf[kBytes / 16];
      const uint4* src = reinterpret_cast<const uint4*>(row + start);
#pragma unroll
      for (int c = 0; c < kBytes / 16; ++c) buf[c] = __ldg(src + c);
      if constexpr (std::is_same_v<In, __nv_bfloat16>) {
        // bf16 -> fp32 is a 16-bit shift: one integer op per value.
        const uint32_t* w = reinterpret_cast<const uint32_t*>(buf);
#pragma unroll
        for (int i = 0; i < VPL / 2; ++i) {
          x[2 * i] = __uint_as_float(w[i] << 16);
          x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
      } else {
        const In* b = reinterpret_cast<const In*>(buf);
#pragma unroll
        for (int i = 0; i < VPL; ++i) x[i] = to_f32(b[i]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i) x[i] = (i < cnt) ? to_f32(row[start + i]) : fill;
}

// s[i] = 1 / (1 + expf(-x[i])), bit-identical to __fdiv_rn(1, __fadd_rn(1, expf(-x))): both are
// the correctly rounded reciprocal. Fast path = __frcp_rn's own (MUFU.RCP, e = d*r - 1, r - r*e),
// valid for normal d below 2^126; d >= 1 here, so one compare per slot guards it.
template <int VPL>
__device__ __forceinline__ void sigmoid_ref(float (&s)[VPL]) {
  float d[VPL];
  bool fast = true;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    d[i] = __fadd_rn(1.0f, expf(-s[i]));
    fast = fast && (d[i] < 0x1p126f);
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d[i]));
    const float e = __fmaf_rn(d[i], r, -1.0f);
    s[i] = __fmaf_rn(r, -e, r);
  }
  if (!fast) {
#pragma unroll
    for (int i = 0; i < VPL; ++i) s[i] = __frcp_rn(d[i]);
  }
}

// Descending sort of N (a power of two) keys: Batcher's odd-even merge network (19 compare-
// exchanges for N = 8), fully unrolled.
// One 64-bit compare and four selects on a single predicate (written in PTX so that nvcc does
// not turn it into a separate max and min, which costs a second compare).
__device__ __forceinline__ void cmp_swap(uint64_t& a, uint64_t& b) {
  asm("{\n\t.reg .pred p;\n\t.reg .b64 t;\n\t"
      "setp.gt.u64 p, %1, %0;\n\t"
      "selp.b64 t, %1, %0, p;\n\t"
      "selp.b64 %1, %0, %1, p;\n\t"
      "mov.b64 %0, t;\n\t}"
      : "+l"(a), "+l"(b));
}
struct SortNet {
  int n = 0;
  int a[256] = {}, b[256] = {};
};
constexpr SortNet make_sort_net(int N) {
  SortNet s;
  for (int p = 1; p < N; p += p)
    for (int k = p; k > 0; k /= 2)
      for (int j = k % p; j + k < N; j += k + k)
        for (int i = 0; i < k && i + j + k < N; ++i)
          if ((i + j) / (p + p) == (i + j + k) / (p + p)) {
            s.a[s.n] = i + j;
            s.b[s.n] = i + j + k;
            ++s.n;
          }
  return s;
}
template <int N>
__device__ __forceinline__ void sort_desc(uint64_t (&v)[N]) {
  static constexpr SortNet net = make_sort_net(N);
  static_assert(net.n <= 256);
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (cmp_swap(v[net.a[I]], v[net.b[I]]), ...);
  }(std::make_integer_sequence<int, net.n>{});
}



// ---- The generic noaux_tc / softmax path (any E <= 512, grouping and topk <= 16) ----

constexpr int kMaxTopk = 16;
constexpr int kMaxExperts = 512;

struct Layout {
  int n_layout;  // groups in the lane layout
  int group;     // experts per group (G)
  int lpg;       // lanes per group, power of two
  int lpg_log2;
  int vpl;       // experts per lane (<= the VPL template)
  bool vec;      // every lane's slice is full and aligned for vector loads
};

// Per-warp shared memory. `val` holds the weight numerators by expert id; `list` holds each lane's
// sorted keys 1..VPL-1 (slot-major, so a pop is a conflict-free LDS.64) and then an all-zero
// sentinel slot, written once per warp, on which a spent lane's pointer stays; `picks` the ids in
// pick order and `pval` their weight numerators (zero-padded to a multiple of 4).
template <int VPL>
struct WarpSmem {
  float val[(32 * VPL < kMaxExperts) ? 32 * VPL : kMaxExperts];
  uint2 list[VPL][32];
  uint32_t picks[kMaxTopk];
  float pval[kMaxTopk];
};

__host__ __device__ inline Layout make_layout(int E, int n_layout) {
  Layout l;
  l.n_layout = n_layout;
  l.group = E / n_layout;
  int lpg = 1, lg = 0;
  while (lpg * 2 * n_layout <= 32) {
    lpg *= 2;
    ++lg;
  }
  l.lpg = lpg;
  l.lpg_log2 = lg;
  l.vpl = (l.group + lpg - 1) / lpg;
  l.vec = false;
  return l;
}

// Writes this lane's sentinel slot (once per warp; the per-token keys never overwrite it).
template <int VPL>
__device__ __forceinline__ void init_list(WarpSmem<VPL>& sm, int lane) {
  sm.list[VPL - 1][lane] = make_uint2(key_hi(kNoKey<VPL>), key_lo(kNoKey<VPL>));
}

// topk rounds of a warp-wide argmax over the lanes' sorted keys (v: this lane's keys, sorted
// descending, slots relative to `start`; kept = false takes the lane out). Leaves the picked ids in
// sm.picks[0..topk).
// Rounds run in straight-line blocks of 4 (no per-round branch); a block's rounds past topk
// change nothing.
template <int VPL>
__device__ __forceinline__ void select_topk(const uint64_t (&v)[VPL], bool kept, WarpSmem<VPL>& sm, int lane,
                                            int start, int topk) {
  const uint32_t id_base = uint32_t(start + VPL - 1);
#pragma unroll
  for (int s = 1; s < VPL; ++s) sm.list[s - 1][lane] = make_uint2(key_hi(v[s]), key_lo(v[s]));
  uint32_t hk = kept ? key_hi(v[0]) : 0u, hl = key_lo(v[0]);
  uint32_t next = uint32_t(__cvta_generic_to_shared(&sm.list[0][lane]));
  const uint32_t last = uint32_t(__cvta_generic_to_shared(&sm.list[VPL - 1][lane]));
  const uint32_t lower_lanes = (1u << lane) - 1u;
  for (int j0 = 0; j0 < topk; j0 += 4) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int j = j0 + u;
      const uint32_t kmax = __reduce_max_sync(kFull, hk);
      const bool tie = hk == kmax;
      const uint32_t tied = __ballot_sync(kFull, tie);
      // The lowest tied lane holds the lowest id.
      if (tie && (tied & lower_lanes) == 0u && (u == 0 || j < topk)) {
        sm.picks[j] = id_base - hl;
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(hk), "=r"(hl) : "r"(next) : "memory");
        next = min(next + 32u * uint32_t(sizeof(uint2)), last);
      }
    }
  }
}

// Sum over j < topk of lane j's x, sequentially in j (the reference's order); every lane gets it.
// Lanes publish x (zero past topk: adding +0 changes nothing) and read them back 4 at a time.
// Lane j < topk takes pick j (its expert id and weight numerator) once select_topk has written them.
template <int VPL>
__device__ __forceinline__ void read_pick(const WarpSmem<VPL>& sm, int lane, int topk, int& id, float& val) {
  __syncwarp();
  id = 0;
  val = 0.0f;
  if (lane < topk) {
    id = int(sm.picks[lane]);
    val = sm.val[id];
  }
}

template <int VPL>
__device__ __forceinline__ float seq_sum(WarpSmem<VPL>& sm, float x, int lane, int topk) {
  if (lane < kMaxTopk) sm.pval[lane] = lane < topk ? x : 0.0f;
  __syncwarp();
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < kMaxTopk / 4; ++c) {
    if (4 * c >= topk) break;
    const float4 q = reinterpret_cast<const float4*>(sm.pval)[c];
    sum = c == 0 ? q.x : __fadd_rn(sum, q.x);
    sum = __fadd_rn(__fadd_rn(__fadd_rn(sum, q.y), q.z), q.w);
  }
  return sum;
}

// Per-token elementwise stage of noaux_tc: logits -> sigmoid (into sm.val, by expert id) -> keys.
// FULL: every lane holds VPL experts, loaded with 16-byte vectors (lanes past the layout alias
// lane 0's slice: same values, and the caller never keeps them).
template <bool FULL, int VPL, typename In>
__device__ __forceinline__ void noaux_prep(const In* row, int start, int cnt, const float* sbias,
                                           WarpSmem<VPL>& sm, uint64_t (&key)[VPL]) {
  float s[VPL], b[VPL];
  if constexpr (FULL) {
    load_row<VPL, In>(row, start, VPL, true, 0.0f, s);
#pragma unroll
    for (int c = 0; c < VPL / 4; ++c) {
      const float4 v = reinterpret_cast<const float4*>(sbias + start)[c];
      b[4 * c] = v.x;
      b[4 * c + 1] = v.y;
      b[4 * c + 2] = v.z;
      b[4 * c + 3] = v.w;
    }
  } else {
    load_row<VPL, In>(row, start, cnt, false, 0.0f, s);
#pragma unroll
    for (int i = 0; i < VPL; ++i) b[i] = i < cnt ? sbias[start + i] : 0.0f;
  }
  sigmoid_ref<VPL>(s);
#pragma unroll
  for (int i = 0; i < VPL; ++i) key[i] = make_key<VPL>(ordered_bits(__fadd_rn(s[i], b[i])), i);
  if constexpr (FULL) {
#pragma unroll
    for (int c = 0; c < VPL / 4; ++c)
      reinterpret_cast<float4*>(sm.val + start)[c] = make_float4(s[4 * c], s[4 * c + 1], s[4 * c + 2], s[4 * c + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      if (i < cnt) {
        sm.val[start + i] = s[i];
      } else {
        key[i] = kNoKey<VPL>;
      }
    }
  }
}

// Completes a layout for rows of `in_bytes`-byte logits: vec (16-byte vector loads of every lane's
// full slice) when the slice is a power of two of 16-byte multiples, every group splits evenly and
// the rows are 16-byte aligned. Returns the VPL template (the power of two >= vpl).
inline int vectorize_layout(Layout& l, bool rows_aligned16, int in_bytes) {
  int vpl_t = 1;
  while (vpl_t < l.vpl) vpl_t *= 2;
  l.vec = (vpl_t == l.vpl) && (l.group % l.vpl == 0) && rows_aligned16 && (l.vpl * in_bytes) % 16 == 0;
  return vpl_t;
}

// The lane layout of route_noaux_tc's generic kernel: with every group kept the group stage is a
// no-op, and one 32-lane group then gives the best layout.
inline Layout noaux_layout(int E, int n_group, int topk_group) {
  return make_layout(E, topk_group < n_group ? n_group : 1);
}

inline int route_dtype_bytes(RouteDtype d) { return d == RouteDtype::kF32 ? 4 : 2; }

inline bool logits_rows_aligned16(const RouteParams& p) {
  return (reinterpret_cast<uintptr_t>(p.logits) % 16 == 0) &&
         ((p.logits_stride * int64_t(route_dtype_bytes(p.dtype))) % 16 == 0);
}

// Per-lane constants of the generic noaux_tc kernel (set up once per warp).
struct NoauxLane {
  int lane;
  int g, q;        // this lane's group in the layout and its place inside the group
  int start, cnt;  // its experts start .. start + cnt - 1 (cnt = 0 past the layout)
  int n_cmp;       // group stage: this lane compares its group with groups q, q + lpg, ... (n_cmp)
};

__device__ __forceinline__ NoauxLane make_noaux_lane(const Layout& l, int lane) {
  NoauxLane n;
  n.lane = lane;
  n.g = lane >> l.lpg_log2;
  n.q = lane & (l.lpg - 1);
  n.start = 0;
  n.cnt = 0;
  if (n.g < l.n_layout) {
    n.start = n.g * l.group + n.q * l.vpl;
    n.cnt = min(l.vpl, l.group - n.q * l.vpl);
    n.cnt = n.cnt < 0 ? 0 : n.cnt;
  }
  n.n_cmp = (l.n_layout + l.lpg - 1) >> l.lpg_log2;
  return n;
}

// One token on one warp (warp-collective): row = its E logits, sbias = the bias in shared memory
// (16-byte aligned), sm = this warp's scratch (init_list done). grouped = topk_group < n_group.
// Lanes < topk write w_out[lane] and id_out[lane].
template <int VPL, typename In>
__device__ __forceinline__ void noaux_route_token(const In* row, const Layout& l, const NoauxLane& n,
                                                  const float* sbias, WarpSmem<VPL>& sm, bool grouped,
                                                  int topk_group, int topk, float scale, bool renormalize,
                                                  float* w_out, int32_t* id_out) {
  const int lane = n.lane;
  uint64_t key[VPL];
  if constexpr (VPL * sizeof(In) >= 16 && VPL % 4 == 0) {
    if (l.vec) {
      noaux_prep<true, VPL, In>(row, n.start, n.cnt, sbias, sm, key);
    } else {
      noaux_prep<false, VPL, In>(row, n.start, n.cnt, sbias, sm, key);
    }
  } else {
    noaux_prep<false, VPL, In>(row, n.start, n.cnt, sbias, sm, key);
  }
  sort_desc<VPL>(key);

  bool kept = n.g < l.n_layout;
  if (grouped) {
    // Group score: the sum of the group's two largest biased scores (values only, so the
    // butterfly merge of per-lane top-2 pairs is exact). The lane's top-2 are its first keys.
    const float ninf = -__int_as_float(0x7f800000);
    float m1 = n.cnt >= 1 ? unordered_bits(key_hi(key[0])) : ninf;
    float m2 = ninf;
    if constexpr (VPL >= 2) m2 = n.cnt >= 2 ? unordered_bits(key_hi(key[1])) : ninf;
    for (int off = 1; off < l.lpg; off <<= 1) {
      const float o1 = __shfl_xor_sync(kFull, m1, off);
      const float o2 = __shfl_xor_sync(kFull, m2, off);
      const float n2 = fmaxf(fminf(m1, o1), fmaxf(m2, o2));
      m1 = fmaxf(m1, o1);
      m2 = n2;
    }
    const float gs = __fadd_rn(m1, m2);  // the same in all lpg lanes of a group
    // Rank of this lane's group: groups with a larger score, or an equal score and a lower id.
    // The group's lanes split the other groups between them, then add up their counts.
    int rank = 0;
#pragma unroll 2
    for (int c = 0; c < n.n_cmp; ++c) {
      const int h = (c << l.lpg_log2) + n.q;
      const float o = __shfl_sync(kFull, gs, (h << l.lpg_log2) & 31);
      const bool better = (o > gs) | ((o == gs) & (h < n.g));
      rank += int(better & (h < l.n_layout));
    }
    for (int off = 1; off < l.lpg; off <<= 1) rank += __shfl_xor_sync(kFull, rank, off);
    kept = kept && rank < topk_group;
  }

  select_topk<VPL>(key, kept, sm, lane, n.start, topk);
  int my_id;
  float my_val;
  read_pick(sm, lane, topk, my_id, my_val);
  float w = my_val;
  if (renormalize) w = __fdiv_rn(my_val, __fadd_rn(seq_sum(sm, my_val, lane, topk), 1e-20f));
  if (lane < topk) {
    w_out[lane] = __fmul_rn(w, scale);
    id_out[lane] = my_id;
  }
  __syncwarp();  // every lane has read val / picks before the next token rewrites them
}


// ---- The DeepSeek-V3/R1 shape at compile time: E = 256, 8 groups of 32, top-4 groups, top-8 ----
//
// Stage 1 (all 256 experts): lane L holds experts 8L..8L+7 (group L/4), loaded as 16-byte vectors;
// sigmoid and biased scores go to shared memory by expert id, and the group scores (sum of a group's
// top-2 biased scores) come from a per-lane top-2 (20 fmin/fmax) and a 4-lane butterfly; the rank of
// group h = L%8 is counted by lanes h, h+8, h+16, h+24 (two groups each) and one ballot gives the
// kept-group mask. Stage 2 (the 128 experts of the 4 kept groups, compacted): lane L takes experts
// 4(L%8)..+3 of the (L/8)-th kept group in id order (a 1 KB shared table maps the mask to the
// groups), so lane order is still id order; its 4 keys are sorted (5 compare-exchanges instead of
// the 19 that 8 keys need) and the 8 selection rounds run as in the generic kernel.
namespace r1 {
constexpr int kE = 256;
constexpr int kGroups = 8;
constexpr int kTopkGroup = 4;
constexpr int kTopk = 8;
constexpr int kVpl = 4;  // keys per lane in the selection stage

// The routing parameters this compile-time path implements (host and device).
__host__ __device__ constexpr bool is_r1_shape(int E, int n_group, int topk_group, int topk) {
  return E == kE && n_group == kGroups && topk_group == kTopkGroup && topk == kTopk;
}

struct __align__(16) WarpSmem {
  float sval[kE];          // sigmoid by expert id (the weight numerators)
  float bval[kE];          // biased score by expert id (read back by the compacted layout)
  uint2 list[kVpl - 1][32];  // each lane's sorted keys 2..3 as (score word, id), then its sentinel
  uint32_t picks[kTopk];
  float pval[kTopk];
};

// Byte r of kept_table_entry(m) is 32 x (the r-th set bit of m), for r < 4 (0 past m's set bits);
// kernels keep the 256 entries in shared memory (built at block start: no constant-cache miss).
__host__ __device__ constexpr uint32_t kept_table_entry(uint32_t m) {
  uint32_t v = 0;
  int r = 0;
  for (uint32_t g = 0; g < 8 && r < 4; ++g)
    if (m >> g & 1u) v |= (32u * g) << (8 * r++);
  return v;
}
// Per-lane constants (set up once per warp).
struct Lane {
  int lane;
  uint32_t lower;       // lanes below this one
  int src_h, src_c;     // shuffle sources: group lane % 8 (lane 4h), group lane / 8 (and + 4: src_c + 16)
  bool c0_lower, c1_lower;  // group lane / 8 (resp. + 4) has a lower id than group lane % 8
  uint32_t sel;         // __byte_perm selector: byte lane / 8 of the table entry, zeros above
  uint32_t sub;         // 4 * (lane % 8): first expert of this lane's chunk inside its kept group
  uint32_t list0;       // shared address of list[0][lane]
};

__device__ __forceinline__ Lane make_lane(WarpSmem& sm, int lane) {
  Lane l;
  l.lane = lane;
  l.lower = (1u << lane) - 1u;
  l.src_h = (lane & 7) * 4;
  l.src_c = (lane >> 3) * 4;
  l.c0_lower = (lane >> 3) < (lane & 7);
  l.c1_lower = (lane >> 3) + 4 < (lane & 7);
  l.sel = 0x4440u | uint32_t(lane >> 3);
  l.sub = uint32_t(lane & 7) * 4u;
  l.list0 = uint32_t(__cvta_generic_to_shared(&sm.list[0][lane]));
  // The sentinel slot (score word 0: never beats a real key; an in-range id), written once per warp.
  sm.list[kVpl - 2][lane] = make_uint2(key_hi(kNoKey<kVpl>), key_lo(kNoKey<kVpl>));
  return l;
}

// (a1 >= a2) merged with (b1 >= b2): the top-2 of the four values.
__device__ __forceinline__ void merge_top2(float& a1, float& a2, float b1, float b2) {
  const float n2 = fmaxf(fminf(a1, b1), fmaxf(a2, b2));
  a1 = fmaxf(a1, b1);
  a2 = n2;
}

// One token on one warp (warp-collective), from logits already in registers: s = this lane's
// logits of experts 8 * lane .. 8 * lane + 7 (as fp32), sbias = the bias in shared memory (16-byte
// aligned), ktable = the 256 kept_table_entry values (shared memory).
// Lanes < 8 write w_out[lane] and id_out[lane].
__device__ __forceinline__ void route_token_regs(float (&s)[8], const float* sbias, const uint32_t* ktable,
                                                 WarpSmem& sm, const Lane& l, float scale, bool renormalize,
                                                 float* w_out, int32_t* id_out) {
  const int lane = l.lane;
  const float4 bias0 = reinterpret_cast<const float4*>(sbias)[2 * lane];
  const float4 bias1 = reinterpret_cast<const float4*>(sbias)[2 * lane + 1];
  sigmoid_ref<8>(s);
  float b[8] = {__fadd_rn(s[0], bias0.x), __fadd_rn(s[1], bias0.y), __fadd_rn(s[2], bias0.z),
                __fadd_rn(s[3], bias0.w), __fadd_rn(s[4], bias1.x), __fadd_rn(s[5], bias1.y),
                __fadd_rn(s[6], bias1.z), __fadd_rn(s[7], bias1.w)};
  reinterpret_cast<float4*>(sm.sval)[2 * lane] = make_float4(s[0], s[1], s[2], s[3]);
  reinterpret_cast<float4*>(sm.sval)[2 * lane + 1] = make_float4(s[4], s[5], s[6], s[7]);
  reinterpret_cast<float4*>(sm.bval)[2 * lane] = make_float4(b[0], b[1], b[2], b[3]);
  reinterpret_cast<float4*>(sm.bval)[2 * lane + 1] = make_float4(b[4], b[5], b[6], b[7]);

  // Group score: the sum of the group's two largest biased scores (values only: exact).
  float m1[4], m2[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m1[i] = fmaxf(b[2 * i], b[2 * i + 1]);
    m2[i] = fminf(b[2 * i], b[2 * i + 1]);
  }
  merge_top2(m1[0], m2[0], m1[1], m2[1]);
  merge_top2(m1[2], m2[2], m1[3], m2[3]);
  merge_top2(m1[0], m2[0], m1[2], m2[2]);
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    const float o1 = __shfl_xor_sync(kFull, m1[0], off);
    const float o2 = __shfl_xor_sync(kFull, m2[0], off);
    merge_top2(m1[0], m2[0], o1, o2);
  }
  const float gs = __fadd_rn(m1[0], m2[0]);  // the same in the 4 lanes of a group

  // Rank of group h = lane % 8: the groups with a larger score, or an equal one and a lower id.
  // Lane h + 8c compares it with groups c and c + 4; the four lanes of h add up their counts.
  const float gh = __shfl_sync(kFull, gs, l.src_h);
  const float g0 = __shfl_sync(kFull, gs, l.src_c);
  const float g1 = __shfl_sync(kFull, gs, l.src_c + 16);
  int better = int((g0 > gh) | ((g0 == gh) & l.c0_lower)) + int((g1 > gh) | ((g1 == gh) & l.c1_lower));
  better += __shfl_xor_sync(kFull, better, 8);
  better += __shfl_xor_sync(kFull, better, 16);
  const uint32_t kept = __ballot_sync(kFull, better < kTopkGroup) & 0xffu;  // bit h: group h kept

  // Compacted layout: this lane's 4 experts of the (lane / 8)-th kept group.
  const uint32_t e0 = __byte_perm(ktable[kept], 0u, l.sel) | l.sub;
  __syncwarp();  // bval complete
  const float4 v = *reinterpret_cast<const float4*>(sm.bval + e0);
  uint64_t key[kVpl] = {make_key<kVpl>(ordered_bits(v.x), 0), make_key<kVpl>(ordered_bits(v.y), 1),
                        make_key<kVpl>(ordered_bits(v.z), 2), make_key<kVpl>(ordered_bits(v.w), 3)};
  sort_desc<kVpl>(key);
  // The head and the next key live in registers, keys 2..3 and the sentinel in shared memory: a win
  // moves the next key up and prefetches the one after it, off the rounds' dependency chain.
  const uint32_t id_base = e0 + uint32_t(kVpl - 1);  // a key's id is id_base - its low word
  uint32_t hk = key_hi(key[0]), hid = id_base - key_lo(key[0]);
  uint32_t nk = key_hi(key[1]), nid = id_base - key_lo(key[1]);
#pragma unroll
  for (int i = 2; i < kVpl; ++i) sm.list[i - 2][lane] = make_uint2(key_hi(key[i]), id_base - key_lo(key[i]));
  uint32_t next = l.list0;
  const uint32_t picks = uint32_t(__cvta_generic_to_shared(sm.picks));
  // A spent lane's head is the sentinel (score word 0). No real key has score word 0 (that is the
  // image of the float 0xffffffff, which no fp32 add returns: NaN results are 0x7fffffff), and the
  // 128 real keys outnumber the 8 rounds, so a spent lane never wins again: at most kVpl pops a
  // lane, the last of which prefetches (and never uses) the word after the sentinel, inside smem.
#pragma unroll
  for (int j = 0; j < kTopk; ++j) {
    const uint32_t kmax = __reduce_max_sync(kFull, hk);
    const bool tie = hk == kmax;
    const uint32_t tied = __ballot_sync(kFull, tie);
    // The lowest tied lane holds the lowest id: it records it, moves its next key up and prefetches
    // the one after (in place, predicated, so that no copies are needed).
    const uint32_t win = uint32_t(tie && (tied & l.lower) == 0u);
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "setp.ne.u32 p, %5, 0;\n\t"
        "@p st.shared.u32 [%6], %1;\n\t"
        "@p mov.b32 %0, %2;\n\t"
        "@p mov.b32 %1, %3;\n\t"
        "@p ld.shared.v2.u32 {%2, %3}, [%4];\n\t"
        "@p add.u32 %4, %4, 256;\n\t}"
        : "+r"(hk), "+r"(hid), "+r"(nk), "+r"(nid), "+r"(next)
        : "r"(win), "r"(picks + 4u * uint32_t(j))
        : "memory");
  }
  __syncwarp();

  int my_id = 0;
  float my_val = 0.0f;
  if (lane < kTopk) {
    my_id = int(sm.picks[lane]);
    my_val = sm.sval[my_id];
  }
  float w = my_val;
  if (renormalize) {
    if (lane < kTopk) sm.pval[lane] = my_val;
    __syncwarp();
    const float4 q0 = reinterpret_cast<const float4*>(sm.pval)[0];
    const float4 q1 = reinterpret_cast<const float4*>(sm.pval)[1];
    float sum = __fadd_rn(__fadd_rn(__fadd_rn(q0.x, q0.y), q0.z), q0.w);
    sum = __fadd_rn(__fadd_rn(__fadd_rn(__fadd_rn(sum, q1.x), q1.y), q1.z), q1.w);
    w = __fdiv_rn(my_val, __fadd_rn(sum, 1e-20f));
  }
  if (lane < kTopk) {
    w_out[lane] = __fmul_rn(w, scale);
    id_out[lane] = my_id;
  }
  __syncwarp();  // every lane has read sval / picks / pval before the next token rewrites them
}

// The same from a row in global memory: row = the token's 256 logits (16-byte aligned, read-only
// during the kernel: loaded through the non-coherent path).
template <typename In>
__device__ __forceinline__ void route_token(const In* row, const float* sbias, const uint32_t* ktable, WarpSmem& sm,
                                            const Lane& l,
                                            float scale, bool renormalize, float* w_out, int32_t* id_out) {
  float s[8];
  load_row<8, In>(row, 8 * l.lane, 8, true, 0.0f, s);
  route_token_regs(s, sbias, ktable, sm, l, scale, renormalize, w_out, id_out);
}
// One rule for route_noaux_tc's choice of kernel: the R1 shape with 16-byte aligned logits rows and
// T x (largest row stride) < 2^31 (the R1 kernel's 32-bit offsets) runs the compile-time path.
inline bool use_r1_path(const RouteParams& p) {
  int64_t max_stride = p.logits_stride > p.weights_stride ? p.logits_stride : p.weights_stride;
  max_stride = max_stride > p.ids_stride ? max_stride : p.ids_stride;
  max_stride = max_stride > 1 ? max_stride : 1;
  return is_r1_shape(p.E, p.n_group, p.topk_group, p.topk) && logits_rows_aligned16(p) &&
         p.T * max_stride < (int64_t(1) << 31);
}
}  // namespace r1

}  // namespace routing_dev
}  // namespace flashseek
