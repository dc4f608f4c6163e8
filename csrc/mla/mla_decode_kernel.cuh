// Paged MLA latent decode kernel (sm_90a, v1: mma.sync m16n8k16 bf16 + ldmatrix + cp.async), FP8 cache
// only: FLASHSEEK_MLA_DECODE=staged, tiles of up to 32 rows. Its bf16-cache path was removed when the
// bf16 cache moved to 64-row wgmma tiles for every shape (session 8; mla_decode_bf16_cache.cu has the
// measurements). The plan and write helpers below are shared with the other kernels.
//
// Grid (row tiles, sm parts); 256 threads = 8 warps; one CTA per SM (up to 225 KB of shared memory).
// A CTA owns kM = 16 * kRG packed query rows (row = s * h_q + h of one request; kRG = 4, 2 or 1 row
// groups, picked from s_q * h_q so small head counts do not pay for padded MMA rows) and walks the
// pieces of its sm part (see mla_params.h), streaming 64-token KV blocks through shared memory.
// The kW = 8 / kRG warps of a row group split the work of their 16 rows:
//   S[16 x 64]  = Q K^T   warp (rg, wc): keys 64/kW * wc ..        (16 / 8 / 4 fp32 regs)
//   online softmax in the log2 domain; row max / sum exchanged between the kW warps via smem
//   O[16 x 512] += P V    warp (rg, wc): dims 512/kW * wc ..       (128 / 64 / 32 fp32 regs)
// P goes through shared memory (each warp needs every key). Tiles of 576 bf16 per row use a
// 16-byte-chunk XOR swizzle (chunk ^ row % 8) so ldmatrix and cp.async are bank-conflict-free.
// 16-row tiles hold each warp's latent Q fragments in registers for the whole request (see kQReg).
// Raw 656-byte tokens are staged by cp.async (three / two / one blocks ahead for 16 / 32 / 64-row
// tiles, as shared memory allows) and dequantized by all threads to one bf16 tile before the MMAs
// (V = the same dequantized values). Block-table reads are issued one iteration ahead of the copies
// they address. docs/mla-design.md has the measurements behind these choices.
// Shared memory (bytes): 64/32/16-row tiles 198656 / 199680 / 221184.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "common/smem_opt_in.h"
#include "common/smem_sm90.cuh"
#include "mla/mla_params.h"

namespace flashseek::mla {
namespace detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowChunks = kDQK / 8;               // 72 chunks of 16 bytes per bf16 row
constexpr int kTileBytes = kBlockN * kDQK * 2;     // 73728: one bf16 KV tile
constexpr int kFp8StageBytes = kBlockN * kFp8TokenBytes;  // 41984
constexpr int kFp8TokenChunks = kFp8TokenBytes / 16;      // 41

template <int kRG>
struct Smem {
  static constexpr int kM = 16 * kRG;              // query rows per CTA
  static constexpr int kW = kWarps / kRG;          // warps per row group
  static constexpr int kQ = 0;
  static constexpr int kK0 = kM * kDQK * 2;
  // Raw token staging buffers, as many as shared memory allows (3 / 2 / 1 for 16 / 32 / 64 rows):
  // the copies of the next kFp8Stages blocks are in flight while a block is dequantized.
  static constexpr int kFp8Stages = kRG == 4 ? 1 : (kRG == 2 ? 2 : 3);
  static constexpr int kK1 = kK0 + kTileBytes;  // the staging buffers, after the dequantized tile
  static constexpr int kP = kK1 + kFp8Stages * kFp8StageBytes;
  static constexpr int kStats = kP + kM * kBlockN * 2;   // P in bf16
  static constexpr int kTotal = kStats + 2 * kW * kM * 4;  // row max and row sum per warp column
};
static_assert(Smem<4>::kTotal <= 232448 && Smem<2>::kTotal <= 232448 && Smem<1>::kTotal <= 232448,
              "shared memory exceeds the sm_90 per-block limit");

// Byte offset of 16-byte chunk c of row r in a swizzled 576-wide bf16 tile.
__device__ __forceinline__ uint32_t tile_off(int r, int c) {
  return static_cast<uint32_t>(r * (kDQK * 2) + ((c ^ (r & 7)) << 4));
}
// Same for the 64-key P tile (8 chunks per row).
__device__ __forceinline__ uint32_t p_off(int r, int c) {
  return static_cast<uint32_t>(r * (kBlockN * 2) + ((c ^ (r & 7)) << 4));
}

__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  // src_bytes == 0 zero-fills the chunk without reading global memory.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(uint32_t addr, uint32_t (&r)[2]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Max over a quad (the 4 lanes that hold one accumulator row's columns), for both of a thread's
// rows; every lane of the quad gets it.
__device__ __forceinline__ void quad_max(float (&m)[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 1));
    m[h] = fmaxf(m[h], __shfl_xor_sync(0xffffffffu, m[h], 2));
  }
}
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ uint32_t pack_bf16(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
using flashseek::smem_u32;

template <typename QT>
__device__ __forceinline__ void store_pair(QT* dst, float a, float b);
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* dst, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(a, b);
}
template <>
__device__ __forceinline__ void store_pair<__half>(__half* dst, float a, float b) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(a, b);
}
// 8 consecutive values to a 16-byte aligned dst in one store.
template <typename QT>
__device__ __forceinline__ void store_8(QT* dst, const float* v) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) store_pair<QT>(reinterpret_cast<QT*>(w + i), v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

// 8 q values -> 8 bf16 (the MMAs run in bf16; fp16 q is rounded to bf16 here).
template <typename QT>
__device__ __forceinline__ uint4 q_to_bf16(uint4 v);
template <>
__device__ __forceinline__ uint4 q_to_bf16<__nv_bfloat16>(uint4 v) {
  return v;
}
template <>
__device__ __forceinline__ uint4 q_to_bf16<__half>(uint4 v) {
  uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(*reinterpret_cast<__half2*>(&w[i]));
    w[i] = pack_bf16(f.x, f.y);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Cache row of `token` of request bi, or nullptr at or past len_eff (the row is then zero-filled).
// len_eff <= max_pages * page_size, so the table index is in range. Page ids are clamped to
// [0, num_pages): a bad table gives wrong values, never an out-of-bounds read.
template <bool kFp8>
__device__ __forceinline__ const char* cache_row(const DecodeParams& p, int bi, int token, int len_eff) {
  if (token >= len_eff) return nullptr;
  const uint32_t page = min(static_cast<uint32_t>(__ldg(p.block_table + bi * p.bt_stride_b + (token >> p.page_size_log2))),
                            static_cast<uint32_t>(p.num_pages - 1));
  const int64_t slot = (static_cast<int64_t>(page) << p.page_size_log2) + (token & ((1 << p.page_size_log2) - 1));
  return static_cast<const char*>(p.kv) + slot * (kFp8 ? kFp8TokenBytes : kDQK * 2);
}
// Source of this thread's raw FP8 token of key block `blk` (thread t: token t / 4), or nullptr past
// len_eff. Split from the copy so the block-table read can be issued an iteration ahead of its use.
__device__ __forceinline__ const char* kv_row_src(const DecodeParams& p, int bi, int blk, int len_eff) {
  return cache_row<true>(p, bi, blk * kBlockN + (threadIdx.x >> 2), len_eff);
}

// Copies (zero-fills) the raw FP8 tokens of one key block into a staging buffer. Thread t handles
// token t / 4, chunks t % 4 + 4 j; src from kv_row_src.
__device__ __forceinline__ void issue_raw_tokens(uint32_t dst, const char* src, const void* kv_base) {
  const int row = threadIdx.x >> 2, sub = threadIdx.x & 3;
  const bool valid = src != nullptr;
  const int bytes = valid ? 16 : 0;
  if (!valid) src = static_cast<const char*>(kv_base);  // never read (src-size 0), but a valid address
#pragma unroll
  for (int j = 0; j < (kFp8TokenChunks + 3) / 4; ++j) {
    const int c = sub + 4 * j;
    if (c < kFp8TokenChunks) cp_async_16(dst + row * kFp8TokenBytes + c * 16, src + (valid ? c * 16 : 0), bytes);
  }
}

// Waits until at most min(pending, kMax) cp.async groups are outstanding (pending >= 0 at run time).
template <int kMax>
__device__ __forceinline__ void cp_async_wait_upto(int pending) {
  if constexpr (kMax >= 2) {
    if (pending >= 2) {
      cp_async_wait<2>();
      return;
    }
  }
  if constexpr (kMax >= 1) {
    if (pending >= 1) {
      cp_async_wait<1>();
      return;
    }
  }
  cp_async_wait<0>();
}

// 8 e4m3 values (two words) times `scale` -> 8 bf16 (one 16-byte chunk). e4m3 -> f16 is exact
// (hardware cvt), the product is formed in fp32 and rounded once to bf16.
__device__ __forceinline__ uint4 dequant8(uint32_t w0, uint32_t w1, float scale) {
  const uint32_t w[2] = {w0, w1};
  uint32_t o[4];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w[k] & 0xffff), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(w[k] >> 16), __NV_E4M3);
    const float2 flo = __half22float2(__half2(lo));
    const float2 fhi = __half22float2(__half2(hi));
    o[2 * k] = pack_bf16(flo.x * scale, flo.y * scale);
    o[2 * k + 1] = pack_bf16(fhi.x * scale, fhi.y * scale);
  }
  return make_uint4(o[0], o[1], o[2], o[3]);
}

// Raw FP8 tokens (staging) -> swizzled bf16 tile, by all 256 threads. Latent: 64 tokens x 64
// output chunks (8 e4m3 -> 8 bf16); thread t always converts chunk c = t % 64 of tokens t / 64 + 4 i
// (i < 16), so every address is a per-thread base plus a compile-time offset (the swizzle term
// (c ^ row % 8) takes two values, by the parity of i): about 28 instructions per chunk instead of the
// 42 that the generic index arithmetic cost (the dequant was half of the FP8 kernel's instructions).
// A warp covers 32 consecutive chunks of one token: its 8-byte loads are contiguous and its 16-byte
// stores hit 8 distinct chunk columns per 8 lanes (the XOR is a bijection on chunk % 8), so there are
// no bank conflicts. Rope: 64 tokens x 8 chunks copied as is.
__device__ __forceinline__ void dequant_fp8_block(const char* stage, char* tile) {
  constexpr int kRowStep = kThreads / 64;                    // 4 tokens per pass
  const int c = threadIdx.x & 63, r0 = threadIdx.x >> 6;     // r0 < 4: row % 8 is r0 or r0 + 4
  const char* src = stage + r0 * kFp8TokenBytes + c * 8;
  const float* scl = reinterpret_cast<const float*>(stage + r0 * kFp8TokenBytes + kDV) + (c >> 4);
  char* dst_even = tile + tile_off(r0, c);
  char* dst_odd = tile + tile_off(r0 + kRowStep, c) - kRowStep * kDQK * 2;
#pragma unroll 8
  for (int i = 0; i < kBlockN / kRowStep; ++i) {
    const uint2 raw = *reinterpret_cast<const uint2*>(src + i * kRowStep * kFp8TokenBytes);
    const float scale = scl[i * kRowStep * kFp8TokenBytes / 4];
    char* dst = (i & 1 ? dst_odd : dst_even) + i * kRowStep * kDQK * 2;
    *reinterpret_cast<uint4*>(dst) = dequant8(raw.x, raw.y, scale);
  }
#pragma unroll
  for (int i = 0; i < kBlockN * 8 / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int row = idx >> 3, rc = idx & 7;
    const uint4 raw = *reinterpret_cast<const uint4*>(stage + row * kFp8TokenBytes + kDV + 16 + rc * 16);
    *reinterpret_cast<uint4*>(tile + tile_off(row, kDV / 8 + rc)) = raw;
  }
}

__device__ __forceinline__ void prefetch_l1(const void* ptr) { asm volatile("prefetch.global.L1 [%0];" ::"l"(ptr)); }

// This CTA's part of the split-KV plan (mla_params.h): requests b0..b1 and, for each, its piece of
// key blocks. Shared by the mma.sync and the wgmma kernels.
// (per_req and the slot count are re-derived from the parameters where used: the 16-row FP8
// kernel sits at 255 registers, and keeping them live made it spill.)
//
// The decode kernels build it, and warm() the first request's entries, before griddepcontrol.wait, so
// that the plan's round trips are off the path to the first loads. That is safe because every kernel
// queued after mla_decode_plan's kernel starts after the plan is written and visible: that kernel is a
// plain launch that never lets its dependents start early, and it fences its writes before it exits
// (mla_plan.cu). cache_seqlens is older still (the plan kernel reads it) and must hold the same values
// until mla_decode (the op's contract). A line cached in L1 here therefore holds the final values.
// q, the block table and the cache are read only after the wait.
struct PlanPart {
  const int* meta;  // this part's entries
  int b0, b1, blk0, blk1, cap;

  __device__ __forceinline__ PlanPart(const DecodeParams& p, int part) : meta(p.plan + kPlanPartInts * part) {
    b0 = max(meta[0], 0);
    b1 = min(meta[2], p.batch - 1);
    blk0 = meta[1];
    blk1 = meta[3];
    cap = p.max_pages << p.page_size_log2;
  }
  // Request bi's piece: key blocks [blk_begin, blk_begin + n_iter) of its len keys (len_eff: the
  // length clamped to the block table's capacity).
  __device__ __forceinline__ void piece(const DecodeParams& p, int bi, int& len, int& len_eff, int& blk_begin,
                                        int& n_iter) const {
    len = max(p.seqlens[bi], 0);
    len_eff = min(len, cap);
    const int nblk = (len + kBlockN - 1) / kBlockN;
    blk_begin = bi == meta[0] ? max(blk0, 0) : 0;
    const int blk_end = bi == meta[2] ? min(blk1, nblk) : nblk;
    n_iter = max(blk_end - blk_begin, 0);
  }
  // The plan left this part no piece. Such a CTA leaves before its PDL wait: its SM is then free for the
  // combine's CTAs, which cannot share one with a decode CTA (registers), while the previous kernel still
  // runs (docs/performance.md, session 22).
  __device__ __forceinline__ bool empty() const { return b0 > b1; }
  // Requests request b0's length and plan entries into L1 (no registers held).
  __device__ __forceinline__ void warm(const DecodeParams& p) const {
    if (!empty()) {
      prefetch_l1(p.seqlens + b0);
      prefetch_l1(p.plan + kPlanPartInts * p.num_sm_parts + 2 * b0);
      if (p.cluster_pairs) prefetch_l1(p.plan + kPlanPartInts * (blockIdx.y ^ 1));  // the cluster peer's part
    }
  }
  // Where request bi's piece goes: straight to out / lse (one split) or workspace slot `slot`.
  // False for an inconsistent plan (slot out of range, or no workspace): nothing is written.
  __device__ __forceinline__ bool destination(const DecodeParams& p, int bi, bool& direct, int& slot) const {
    const int* per_req = p.plan + kPlanPartInts * p.num_sm_parts;  // [batch][2]: (ws_base, num_splits)
    direct = per_req[2 * bi + 1] <= 1;
    slot = per_req[2 * bi] + (bi == meta[0] ? meta[4] : 0);
    return direct || (slot >= 0 && slot < workspace_slots(p.num_sm_parts) && p.ws_o != nullptr);
  }
};

// Keys visible to packed row R of a request with len keys (len_eff after clamping to the table):
// causal rows see len - s_q + s + 1 (bottom-right aligned); padding rows past s_q * h_q use s_q - 1.
__device__ __forceinline__ int visible_keys(const DecodeParams& p, int R, int len, int len_eff) {
  const int s = min(R / p.h_q, p.s_q - 1);
  return min(p.causal ? len - p.s_q + s + 1 : len, len_eff);
}

// Where packed row R (s * h_q + h) of request bi goes when a piece finishes: straight to out when the
// piece is the whole request (`direct`), else to workspace slot `slot`. Both hold q's dtype. The lse
// goes to lse in natural log, or to the workspace in log2 (what the combine's exp2 wants). Every
// piece writer (the two 64-row wgmma kernels, the mma.sync kernel, the FP8 direct kernel) uses these.
template <typename QT>
__device__ __forceinline__ QT* piece_row(const DecodeParams& p, int bi, int R, bool direct, int slot) {
  if (direct) {
    const int s = R / p.h_q, hh = R - s * p.h_q;
    return static_cast<QT*>(p.out) + bi * p.o_stride_b + s * p.o_stride_s + hh * p.o_stride_h;
  }
  return static_cast<QT*>(p.ws_o) + (static_cast<int64_t>(slot) * p.rows + R) * kDV;
}
__device__ __forceinline__ void store_row_lse(const DecodeParams& p, int bi, int R, bool direct, int slot,
                                              float lse2) {
  if (direct) {
    const int s = R / p.h_q, hh = R - s * p.h_q;
    p.lse[(static_cast<int64_t>(bi) * p.h_q + hh) * p.s_q + s] = lse2 * 0.69314718055994531f;
  } else {
    p.ws_lse[static_cast<int64_t>(slot) * p.rows + R] = lse2;
  }
}

// Writes this thread's part of output row R (packed s * h_q + h) of request bi: kPairs pairs of
// columns col0 + 8 j, values pair(j) (unnormalised), scaled by 1 / l, to out or to workspace slot
// `slot` (in q's dtype either way); the thread with write_lse also writes the row's lse (natural log
// to lse, log2 to the workspace). Rows with no visible key get out 0 and lse -inf.
template <typename QT, int kPairs, typename Pair>
__device__ __forceinline__ void write_piece_row(const DecodeParams& p, int bi, int R, bool direct, int slot, int col0,
                                                float m_log2, float l, bool write_lse, Pair pair) {
  const bool seen = l > 0.f;
  const float inv = seen ? 1.f / l : 0.f;
  const float lse2 = seen ? m_log2 + __log2f(l) : -INFINITY;  // log2 domain
  QT* dst = piece_row<QT>(p, bi, R, direct, slot) + col0;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    const float2 v = pair(j);
    store_pair<QT>(dst + 8 * j, v.x * inv, v.y * inv);
  }
  if (write_lse) store_row_lse(p, bi, R, direct, slot, lse2);
}

template <typename QT, int kRG>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_kernel(const __grid_constant__ DecodeParams p) {
  using S = Smem<kRG>;
  constexpr int kM = S::kM, kW = S::kW;
  constexpr int kKeys = kBlockN / kW;  // keys of S per warp: 32, 16, 8
  constexpr int kNT = kKeys / 8;       // n-tiles of S per warp
  constexpr int kDims = kDV / kW;      // output dims per warp: 256, 128, 64
  constexpr int kONT = kDims / 8;      // n-tiles of O per warp
  // 16-row tiles keep the warp's latent Q fragments (16 rows x 512) in 128 registers for the whole
  // request: every warp would otherwise re-read all of Q from shared memory for each key block
  // (18 KB per warp, 147 KB per block, more than the K and V reads together). The 4 rope k steps
  // still read shared memory (registers are full).
  constexpr bool kQReg = kRG == 1;
  constexpr int kQRegSteps = kQReg ? kDV / 16 : 0;
  // Independent accumulator chains for S: a single n-tile would be one chain of 36 dependent MMAs.
  constexpr int kChains = kNT == 1 ? 4 : (kNT == 2 ? 2 : 1);
  static_assert((kDQK / 16) % kChains == 0, "k steps per chain");
  static_assert(kRG == 1 || kRG == 2 || kRG == 4, "row groups");

  // Lets the combine kernel (a programmatic dependent, see mla_combine.cu) be scheduled as soon as SMs
  // free up; it waits for this whole grid to finish before reading any partial.
  pdl_launch_dependents();
  extern __shared__ __align__(128) char smem[];
  const uint32_t s_base = smem_u32(smem);
  const uint32_t sQ = s_base + S::kQ;
  float* s_max = reinterpret_cast<float*>(smem + S::kStats);  // [kW][kM]
  float* s_sum = s_max + kW * kM;                              // [kW][kM]

  const int m_tile = blockIdx.x, part = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rg = warp % kRG, wc = warp / kRG;  // row group (16 rows); warp column within it
  const int g = lane >> 2, q4 = lane & 3;
  const int row0 = rg * 16 + g;                // this thread's rows: row0 and row0 + 8

  // The plan may be read before the wait (PlanPart). Launched as a programmatic dependent (launch_pdl):
  // nothing else written by an earlier kernel (q, the block table, the cache, the workspace the previous
  // combine may still read) is touched before this.
  const PlanPart plan(p, part);
  plan.warm(p);
  pdl_wait();
  for (int bi = plan.b0; bi <= plan.b1; ++bi) {
    int len, len_eff, blk_begin, n_iter;
    plan.piece(p, bi, len, len_eff, blk_begin, n_iter);

    // Source row of the next block to copy, looked up one iteration ahead (see kv_row_src).
    const char* next_src = nullptr;
    if (n_iter > 0) {
#pragma unroll
      for (int st = 0; st < S::kFp8Stages; ++st) {
        if (st < n_iter) {
          issue_raw_tokens(s_base + S::kK1 + st * kFp8StageBytes, kv_row_src(p, bi, blk_begin + st, len_eff),
                               p.kv);
          cp_async_commit();
        }
      }
      next_src = kv_row_src(p, bi, blk_begin + S::kFp8Stages, len_eff);
      // Q tile (rows past s_q * h_q are zeros), converted to bf16, while the first block lands.
      const QT* qb = static_cast<const QT*>(p.q) + bi * p.q_stride_b;
      constexpr int kQChunks = kM * kRowChunks;
#pragma unroll 6
      for (int i = 0; i < (kQChunks + kThreads - 1) / kThreads; ++i) {
        const int idx = threadIdx.x + i * kThreads;
        if (kQChunks % kThreads != 0 && idx >= kQChunks) break;
        const int row = idx / kRowChunks, c = idx % kRowChunks;
        const int R = m_tile * kM + row;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (R < p.rows) {
          const int s = R / p.h_q, h = R - s * p.h_q;
          v = q_to_bf16<QT>(__ldg(reinterpret_cast<const uint4*>(qb + s * p.q_stride_s + h * p.q_stride_h + c * 8)));
        }
        *reinterpret_cast<uint4*>(smem + S::kQ + tile_off(row, c)) = v;
      }
    }

    const int limit[2] = {visible_keys(p, m_tile * kM + row0, len, len_eff),  // this thread's two rows
                          visible_keys(p, m_tile * kM + row0 + 8, len, len_eff)};

    float o[kONT][4];
#pragma unroll
    for (int t = 0; t < kONT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    uint32_t qf[kQReg ? kQRegSteps : 1][4];  // latent Q A-fragments of this warp's 16 rows (kQReg only)

    for (int it = 0; it < n_iter; ++it) {
      const int blk = blk_begin + it;
      // Groups committed so far: blocks 0 .. min(n_iter, it + stages) - 1, one group each; block
      // `it` must be done, so min(n_iter - 1 - it, stages - 1) may stay in flight.
      cp_async_wait_upto<S::kFp8Stages - 1>(min(n_iter - 1 - it, S::kFp8Stages - 1));
      __syncthreads();  // staged tokens visible; the previous block's MMAs are done with sK
      const int st = it % S::kFp8Stages;
      dequant_fp8_block(smem + S::kK1 + st * kFp8StageBytes, smem + S::kK0);
      __syncthreads();  // sK complete; staging buffer st free
      if (it + S::kFp8Stages < n_iter) {
        issue_raw_tokens(s_base + S::kK1 + st * kFp8StageBytes, next_src, p.kv);
        cp_async_commit();
        next_src = kv_row_src(p, bi, blk + S::kFp8Stages + 1, len_eff);
      }
      const uint32_t sK = s_base + S::kK0;

      // ---- S = Q K^T for rows rg*16.., keys wc*kKeys.. ----
      float sacc[kNT][4];
      {
        const int a_row = rg * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int a_chunk = lane >> 4;
        if constexpr (kQReg) {
          if (it == 0) {  // the Q tile is visible after the barrier above
#pragma unroll
            for (int kk = 0; kk < kQRegSteps; ++kk) ldsm_x4(sQ + tile_off(a_row, 2 * kk + a_chunk), qf[kk]);
          }
        }
        // x4: matrices (keys 0-7, dims lo), (keys 0-7, hi), (keys 8-15, lo), (keys 8-15, hi);
        // x2 (one n-tile): lanes 0-15 address (keys 0-7, lo), (keys 0-7, hi).
        const int b_row = wc * kKeys + (lane & 7) + (kNT >= 2 ? (lane >> 4) * 8 : 0);
        const int b_chunk = (lane >> 3) & 1;
        float cacc[kChains][kNT][4];
#pragma unroll
        for (int ch = 0; ch < kChains; ++ch)
#pragma unroll
          for (int j = 0; j < kNT; ++j) cacc[ch][j][0] = cacc[ch][j][1] = cacc[ch][j][2] = cacc[ch][j][3] = 0.f;
        // k step kk feeds chain kk % kChains; the loop body covers kChains consecutive steps.
#pragma unroll(kQReg ? kDQK / 16 / kChains : (kChains == 1 ? 4 : 2))
        for (int k0 = 0; k0 < kDQK / 16; k0 += kChains) {
#pragma unroll
          for (int ch = 0; ch < kChains; ++ch) {
            const int kk = k0 + ch;
            uint32_t a[4];
            if (kk < kQRegSteps) {  // resolved at compile time (the loop is fully unrolled when kQReg)
              a[0] = qf[kk][0], a[1] = qf[kk][1], a[2] = qf[kk][2], a[3] = qf[kk][3];
            } else {
              ldsm_x4(sQ + tile_off(a_row, 2 * kk + a_chunk), a);
            }
            if constexpr (kNT >= 2) {
#pragma unroll
              for (int jp = 0; jp < kNT / 2; ++jp) {
                uint32_t bb[4];
                ldsm_x4(sK + tile_off(b_row + jp * 16, 2 * kk + b_chunk), bb);
                mma_bf16(cacc[ch][2 * jp], a, bb[0], bb[1]);
                mma_bf16(cacc[ch][2 * jp + 1], a, bb[2], bb[3]);
              }
            } else {
              uint32_t bb[2];
              ldsm_x2(sK + tile_off(b_row, 2 * kk + b_chunk), bb);
              mma_bf16(cacc[ch][0], a, bb[0], bb[1]);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float v = cacc[0][j][e];
#pragma unroll
            for (int ch = 1; ch < kChains; ++ch) v += cacc[ch][j][e];
            sacc[j][e] = v;
          }
      }

      // ---- online softmax (log2 domain) ----
      const int key0 = blk * kBlockN + wc * kKeys + 2 * q4;
      float mloc[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + j * 8 + (e & 1);
          const float v = key < limit[e >> 1] ? sacc[j][e] * p.scale_log2 : -INFINITY;
          sacc[j][e] = v;
          mloc[e >> 1] = fmaxf(mloc[e >> 1], v);
        }
      }
      quad_max(mloc);
      if (q4 == 0) {
        s_max[wc * kM + row0] = mloc[0];
        s_max[wc * kM + row0 + 8] = mloc[1];
      }
      __syncthreads();
      float alpha[2], m_use[2], sloc[2] = {0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // fmaxf is exact: every warp of the row group gets the same max.
        float m_new = m_run[h];
#pragma unroll
        for (int w = 0; w < kW; ++w) m_new = fmaxf(m_new, s_max[w * kM + row0 + 8 * h]);
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: avoid (-inf) - (-inf)
        alpha[h] = fast_exp2(m_run[h] - m_use[h]);
        m_run[h] = m_new;
      }
      char* sP = smem + S::kP;
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        const float p0 = fast_exp2(sacc[j][0] - m_use[0]);
        const float p1 = fast_exp2(sacc[j][1] - m_use[0]);
        const float p2 = fast_exp2(sacc[j][2] - m_use[1]);
        const float p3 = fast_exp2(sacc[j][3] - m_use[1]);
        sloc[0] += p0 + p1;
        sloc[1] += p2 + p3;
        const int c = wc * kNT + j;  // 8-key chunk of the P row
        *reinterpret_cast<uint32_t*>(sP + p_off(row0, c) + q4 * 4) = pack_bf16(p0, p1);
        *reinterpret_cast<uint32_t*>(sP + p_off(row0 + 8, c) + q4 * 4) = pack_bf16(p2, p3);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sloc[h] += __shfl_xor_sync(0xffffffffu, sloc[h], 1);
        sloc[h] += __shfl_xor_sync(0xffffffffu, sloc[h], 2);
      }
      if (q4 == 0) {
        s_sum[wc * kM + row0] = sloc[0];
        s_sum[wc * kM + row0 + 8] = sloc[1];
      }
#pragma unroll
      for (int t = 0; t < kONT; ++t) {
        o[t][0] *= alpha[0];
        o[t][1] *= alpha[0];
        o[t][2] *= alpha[1];
        o[t][3] *= alpha[1];
      }
      __syncthreads();  // P and the row sums of every warp column visible
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Summed in the same order by every warp of the row group, so l_run stays identical.
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < kW; ++w) total += s_sum[w * kM + row0 + 8 * h];
        l_run[h] = l_run[h] * alpha[h] + total;
      }

      // ---- O += P V for rows rg*16.., dims wc*kDims.. ----
      {
        const uint32_t sPu = s_base + S::kP;
        const int a_row = rg * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int a_chunk = lane >> 4;
        // x4.trans: matrices (keys 0-7, dims lo), (keys 8-15, lo), (keys 0-7, hi), (keys 8-15, hi).
        const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8;
        const int v_chunk = wc * (kDims / 8) + (lane >> 4);
#pragma unroll 1
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[4];
          ldsm_x4(sPu + p_off(a_row, 2 * kk + a_chunk), a);
#pragma unroll
          for (int np = 0; np < kONT / 2; ++np) {
            uint32_t bb[4];
            ldsm_x4_t(sK + tile_off(kk * 16 + v_row, v_chunk + 2 * np), bb);
            mma_bf16(o[2 * np], a, bb[0], bb[1]);
            mma_bf16(o[2 * np + 1], a, bb[2], bb[3]);
          }
        }
      }
      // Every warp is done with sK, sP and the row statistics. (For FP8 the next iteration's first
      // barrier would already order every later write; dropping this one measured no gain.)
      __syncthreads();
    }

    // ---- write this piece: straight to out/lse, or a split partial to the workspace ----
    bool direct;
    int slot;
    if (!plan.destination(p, bi, direct, slot)) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int R = m_tile * kM + row0 + 8 * h;
      if (R >= p.rows) continue;
      write_piece_row<QT, kONT>(p, bi, R, direct, slot, wc * kDims + 2 * q4, m_run[h], l_run[h], wc == 0 && q4 == 0,
                                [&](int t) { return make_float2(o[t][2 * h], o[t][2 * h + 1]); });
    }
  }
}

template <typename QT, int kRG>
void launch_decode_rg(const DecodeParams& p, cudaStream_t stream) {
  constexpr int smem = Smem<kRG>::kTotal;
  auto kernel = mla_decode_kernel<QT, kRG>;
  opt_in_dynamic_smem<mla_decode_kernel<QT, kRG>>(smem);
  constexpr int kM = Smem<kRG>::kM;
  const dim3 grid((p.rows + kM - 1) / kM, p.num_sm_parts);
  launch_pdl(kernel, grid, dim3(kThreads), smem, stream, p);
  FS_CHECK_LAUNCH();
}

// Row tiles of 16 or 32 rows for s_q * h_q <= 32 (e.g. 16 heads of a TP-8 shard), else 64. For
// s_q * h_q <= 64 there is one row tile either way, so the plan's default part count
// (SMs / ceil(s_q * h_q / 64), flashseek.ops.default_num_sm_parts) fills the GPU in every case.
template <typename QT>
void launch_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.rows == 0) return;
  if (p.rows <= 16) {
    launch_decode_rg<QT, 1>(p, stream);
  } else if (p.rows <= 32) {
    launch_decode_rg<QT, 2>(p, stream);
  } else {
    launch_decode_rg<QT, 4>(p, stream);
  }
}

}  // namespace detail
}  // namespace flashseek::mla
