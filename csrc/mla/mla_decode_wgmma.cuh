// Paged MLA latent decode, 64-row tiles on Hopper tensor cores (wgmma), bf16 and FP8 latent caches.
//
// Why a second kernel: with mma.sync every warp re-reads its Q, K and V fragments from shared memory
// (~790 KB per 64x64 block, docs/mla-design.md), which caps the h_q = 128 rows near 215 TFLOP/s.
// wgmma reads each operand tile once per warpgroup straight from 128B-swizzled shared memory.
//
// Grid (row tiles, sm parts) and plan semantics are the mma.sync kernel's (mla_decode_kernel.cuh);
// a CTA owns 64 packed query rows. 256 threads = two warpgroups; the 64 x 512 fp32 output lives in
// registers, split by columns: warpgroup 0 owns dims 0..255, warpgroup 1 dims 256..511 (128 fp32
// registers a thread each). Per 64-key block:
//   WG0: S = Q K^T (36 x wgmma m64n64k16, Q and K from shared memory), mask, online softmax in the
//        log2 domain (lazy reference max, kRescaleSlack), rescale O0 (skipped while every row of the
//        warp keeps its reference), P (bf16) and the row factors to shared memory, then
//        O0 += P V[:, :256] (4 x m64n256k16, P from registers: the S accumulator layout is the A
//        fragment layout, so P never round-trips for WG0).
//   WG1: waits for P, rescales O1, O1 += P V[:, 256:] (P and V from shared memory), and owns the
//        KV pipeline: cp.async of block n+2 into the stage block n used, issued while WG0 computes
//        S of block n+1 (two 73,728-byte stages).
// Two named barriers a block: kBarPFull (WG0 arrives after P is stored, WG1 waits) and a full
// rendezvous at the end of the block (both warpgroups done reading the stage; block n+1 landed).
// The rendezvous is what makes phase reuse of kBarPFull safe: WG0 arrives for block n+1 only after
// WG1 has passed block n's wait.
// Per piece (a request's share of the part): Q comes by TMA when q's packed rows have one stride
// (TileMaps, else per-thread loads), and the finished rows leave through a padded tile over the KV
// stages with coalesced 16-byte stores (write_piece_staged): both were ~5 µs a piece from one SM
// with per-thread loads and fragment-order stores (docs/mla-design.md, v5).
//
// Shared memory, each tile in 64-column panels of [rows][128 B] with the 128B swizzle (16-byte
// chunk c of row r at r * 128 + ((c ^ r % 8) << 4)), the layout wgmma descriptors describe:
//   Q 64 x 576 (9 panels, 73,728 B) | K stage 0 | K stage 1 (64 keys x 576) | P 64 x 64 | row factors
// V is K's first 512 columns: for P V it is read as an MN-major operand (dims contiguous), with
// panels 8,192 B apart (leading byte offset) and 8-key groups 1,024 B apart (stride byte offset).
//
// FP8 cache (kFp8): one bf16 stage, dequantized from two cp.async-staged blocks of raw 656-byte
// tokens (WG1 owns the copies and converts half of the next block into registers while it waits
// for P), and P in the stage's rope panel (see Smem). docs/mla-design.md has the measurements.
#pragma once
#include <cuda.h>

#include <cute/arch/cluster_sm90.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cutlass/arch/barrier.h>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <utility>

#include "common/named_barrier.cuh"
#include "mla/mla_cache_token.cuh"
#include "mla/mla_decode_kernel.cuh"
#include "mla/mla_timeline.cuh"

namespace flashseek::mla {
namespace wg {

using detail::cp_async_16;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::fast_exp2;
using detail::pack_bf16;
using detail::q_to_bf16;
using detail::smem_u32;
using detail::store_pair;
using flashseek::mbar_wait;

constexpr int kThreads = 256;
// The kernel's dynamic shared memory window. wgmma's and TMA's 128B swizzle is a function of address
// bits 4-9: tiles must start 1,024-byte aligned. A kernel without static shared memory gets its dynamic window at
// that alignment (CUTLASS's sm90 kernels rely on the same); the 64-row kernels' layouts leave no slack
// to realign, so this checks instead.
__device__ __forceinline__ char* swizzle_aligned_smem() {
  extern __shared__ __align__(1024) char smem[];
  if (smem_u32(smem) & 1023u) __trap();
  return smem;
}
// Lazy rescaling (as FlashAttention 4 does it): a row's reference max (log2 domain) moves only when a
// block's max exceeds it by more than kRescaleSlack, so P stays below 2^8, well inside bf16's range and
// with its usual relative precision, and the final O / l and lse are unchanged in exact arithmetic. Once
// a row's max has settled, the reference stays put, the rescale factor is exactly 1 and a warp whose
// rows all kept theirs skips the 128 FMULs that rescale its O slice (a quarter of a block's instructions
// on the softmax's critical path).
constexpr float kRescaleSlack = 8.f;
__device__ __forceinline__ float lazy_max(float m_ref, float m_block) {
  return m_block > m_ref + kRescaleSlack ? m_block : m_ref;  // m_ref = -inf: any finite m_block moves it
}
// exp2(m_old - m_new), exactly 1 when the reference did not move (m_new = -inf: no key seen yet, 0 * 0).
__device__ __forceinline__ float rescale_factor(float m_old, float m_new) {
  return m_new == m_old ? 1.f : detail::fast_exp2(m_old - (m_new == -INFINITY ? 0.f : m_new));
}
// A thread's 64 x 256 O accumulator slice (rows row0 and row0 + 8) times its rows' factors f0 / f1;
// skipped when every factor in the warp is 1 (a warp vote, so the skip does not diverge).
__device__ __forceinline__ void rescale_o(float (&o)[128], float f0, float f1) {
  if (!__any_sync(0xffffffffu, f0 != 1.f || f1 != 1.f)) return;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    o[4 * j + 0] *= f0;
    o[4 * j + 1] *= f0;
    o[4 * j + 2] *= f1;
    o[4 * j + 3] *= f1;
  }
}
constexpr int kM = 64;
constexpr int kPanelBytes = 64 * 128;               // 64 rows x 64 bf16
constexpr int kTileBytes = kDQK / 64 * kPanelBytes; // 73,728
constexpr int kPanels = kDQK / 64;                  // 9

// bf16 cache: two KV stages and a P tile. FP8 cache: one bf16 stage (dequantized by all threads
// from raw 656-byte tokens, two blocks of which are staged by cp.async) and P in the stage's rope
// panel, which S has finished with: a separate P tile does not fit next to the raw stages.
template <bool kFp8>
struct Smem {
  static constexpr int kQ = 0;
  static constexpr int kK0 = kQ + kTileBytes;
  static constexpr int kK1 = kK0 + kTileBytes;                 // bf16: second stage; FP8: raw stages
  static constexpr int kRawStage = kBlockN * kFp8TokenBytes;   // 41,984
  static constexpr int kP = kFp8 ? kK0 + 8 * kPanelBytes : kK1 + kTileBytes;
  static constexpr int kAlpha = kFp8 ? kK1 + 2 * kRawStage : kP + kM * 64 * 2;  // [64] rescale factor per row
  static constexpr int kLRun = kAlpha + kM * 4;    // [64] final row sum (end of a request)
  static constexpr int kMRun = kLRun + kM * 4;     // [64] final row max (log2 domain)
  static constexpr int kBarQ = kMRun + kM * 4;     // mbarrier of the Q tile's TMA loads
  static constexpr int kTotal = kBarQ + 8;
};
static_assert(Smem<false>::kTotal <= 232448 && Smem<true>::kTotal <= 232448,
              "shared memory exceeds the sm_90 per-block limit");
// write_piece_staged puts a finished piece's rows (64 x kStagedRowBytes) over the KV stages.
constexpr int kStagedRowBytes = kDV * 2 + 16;
static_assert(Smem<false>::kK0 + kM * kStagedRowBytes <= Smem<false>::kAlpha &&
                  Smem<true>::kK0 + kM * kStagedRowBytes <= Smem<true>::kAlpha,
              "the staged rows must stay in the KV stages");

// Named barriers (0 is __syncthreads).
constexpr int kBarPFull = 1;
constexpr int kBarBlockEnd = 2;
constexpr int kBarWG0 = 3;  // FP8: WG0's S reads of the rope panel are done before P overwrites it
constexpr int kBarWG1 = 4;  // FP8: every WG1 thread's raw copies of the next block have landed

// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async) before later
// async-proxy reads (wgmma operands).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ uint32_t swz(int r, int c) {  // chunk c (< 8) of row r inside a panel
  return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
}
// Byte offset of 16-byte chunk c (< 72) of row r in a 576-wide paneled tile.
__device__ __forceinline__ uint32_t tile_chunk(int r, int c) { return (c >> 3) * kPanelBytes + swz(r, c & 7); }

using flashseek::WgmmaDesc;
using flashseek::wgmma_desc_sw128;
using flashseek::wgmma_desc_sw128_tile;

namespace gmma = cute::SM90::GMMA;
using MmaQK = gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
using MmaPVss = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>;
using MmaPVrs = gmma::MMA_64x256x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>;

template <size_t... I>
__device__ __forceinline__ void qk_step(uint64_t da, uint64_t db, float (&d)[32], gmma::ScaleOut sc,
                                        std::index_sequence<I...>) {
  MmaQK::fma(da, db, d[I]..., sc);
}
template <size_t... I>
__device__ __forceinline__ void pv_step_ss(uint64_t da, uint64_t db, float (&d)[128], std::index_sequence<I...>) {
  MmaPVss::fma(da, db, d[I]..., gmma::ScaleOut::One);
}
template <size_t... I>
__device__ __forceinline__ void pv_step_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[128],
                                           std::index_sequence<I...>) {
  MmaPVrs::fma(a[0], a[1], a[2], a[3], db, d[I]..., gmma::ScaleOut::One);
}
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(d[i]);
}

// WG1's part of a KV block copy: 64 tokens x 72 chunks, thread t (0..127) copies chunks
// t % 8 + 8 j (j < 9) of tokens t / 8 + 16 i (i < 4). Eight threads cover one token's 128-byte
// panel row: coalesced 128-byte reads, and the XOR swizzle spreads their stores over all banks.
// Tokens at or past len_eff are zero-filled (never read).
__device__ __forceinline__ void issue_kv_block(const DecodeParams& p, uint32_t dst, int bi, int blk, int len_eff,
                                               int t) {
  const int c0 = t & 7;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = (t >> 3) + 16 * i;
    const char* src = detail::cache_row<false>(p, bi, blk * kBlockN + row, len_eff);
    const int bytes = src ? 16 : 0;
    src = src ? src + c0 * 16 : static_cast<const char*>(p.kv);  // never read (src-size 0), but a valid address
#pragma unroll
    for (int j = 0; j < kPanels; ++j) {
      cp_async_16(dst + j * kPanelBytes + swz(row, c0), src + (bytes ? j * 128 : 0), bytes);
    }
  }
}

// WG1's copy of one block of raw FP8 tokens (64 x 41 chunks of 16 bytes): thread t copies chunks
// t % 2 + 2 j of token t / 2. Tokens at or past len_eff are zero-filled (never read).
__device__ __forceinline__ void issue_raw_block(const DecodeParams& p, uint32_t dst, int bi, int blk, int len_eff,
                                                int t) {
  const int row = t >> 1, sub = t & 1;
  const char* src = detail::cache_row<true>(p, bi, blk * kBlockN + row, len_eff);
  const int bytes = src ? 16 : 0;
  if (!src) src = static_cast<const char*>(p.kv);  // never read (src-size 0), but a valid address
#pragma unroll
  for (int j = 0; j < (detail::kFp8TokenChunks + 1) / 2; ++j) {
    const int c = sub + 2 * j;
    if (c < detail::kFp8TokenChunks) cp_async_16(dst + row * kFp8TokenBytes + c * 16, src + (bytes ? c * 16 : 0), bytes);
  }
}

// Raw FP8 tokens (656 bytes: 512 e4m3 | 4 fp32 scales | 64 bf16 rope) -> the paneled bf16 tile.
// Values are detail::dequant8's: e4m3 -> f16 exactly, times the fp32 scale, rounded once to bf16
// (the same values as the mma.sync kernel's tiles). The work is split so that WG1 does part of it
// while it waits for WG0's P (it is idle during S and the softmax): latent chunks 32..63 of the
// next block go to 64 registers of each WG1 thread (16 chunks: c = 32 + t % 32, tokens t / 32 + 4 i)
// and are stored after the rendezvous, while all 256 threads convert chunks 0..31 (c = t % 32,
// tokens t / 32 + 8 i) and copy the rope. A warp reads 256 contiguous bytes of one token.
__device__ __forceinline__ void dequant_upper_to_regs(const char* raw, uint4 (&pre)[16], int t) {
  const int c = 32 + (t & 31), r0 = t >> 5;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const char* tok = raw + (r0 + 4 * i) * kFp8TokenBytes;
    const uint2 w = *reinterpret_cast<const uint2*>(tok + c * 8);
    pre[i] = detail::dequant8(w.x, w.y, *reinterpret_cast<const float*>(tok + kDV + (c >> 4) * 4));
  }
}
__device__ __forceinline__ void store_upper_regs(const uint4 (&pre)[16], char* tile, int t) {
  const int c = 32 + (t & 31), r0 = t >> 5;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    *reinterpret_cast<uint4*>(tile + (c >> 3) * kPanelBytes + swz(r0 + 4 * i, c & 7)) = pre[i];
  }
}
__device__ __forceinline__ void dequant_lower_and_rope(const char* raw, char* tile) {
  const int c = threadIdx.x & 31, r0 = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int row = r0 + 8 * i;
    const char* tok = raw + row * kFp8TokenBytes;
    const uint2 w = *reinterpret_cast<const uint2*>(tok + c * 8);
    *reinterpret_cast<uint4*>(tile + (c >> 3) * kPanelBytes + swz(row, c & 7)) =
        detail::dequant8(w.x, w.y, *reinterpret_cast<const float*>(tok + kDV + (c >> 4) * 4));
  }
#pragma unroll
  for (int i = 0; i < kBlockN * 8 / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int row = idx >> 3, rc = idx & 7;
    *reinterpret_cast<uint4*>(tile + 8 * kPanelBytes + swz(row, rc)) =
        *reinterpret_cast<const uint4*>(raw + row * kFp8TokenBytes + kDV + 16 + rc * 16);
  }
}

// Request bi's 64 packed query rows of row tile m_tile -> the paneled bf16 Q tile, by all threads
// (rows past s_q * h_q are zeros). Shared by the 64-row wgmma kernels.
template <typename QT>
__device__ __forceinline__ void load_q_tile(const DecodeParams& p, int bi, int m_tile, char* q_tile) {
  const QT* qb = static_cast<const QT*>(p.q) + bi * p.q_stride_b;
  constexpr int kQChunks = kM * kDQK / 8;
#pragma unroll 6
  for (int i = 0; i < kQChunks / kThreads; ++i) {
    const int idx = threadIdx.x + i * kThreads;
    const int row = idx / (kDQK / 8), c = idx % (kDQK / 8);
    const int R = m_tile * kM + row;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (R < p.rows) {
      const int s = R / p.h_q, h = R - s * p.h_q;
      v = q_to_bf16<QT>(__ldg(reinterpret_cast<const uint4*>(qb + s * p.q_stride_s + h * p.q_stride_h + c * 8)));
    }
    *reinterpret_cast<uint4*>(q_tile + tile_chunk(row, c)) = v;
  }
}

// The Q tile's TMA map for the 64-row kernels (built per call by make_tile_maps, mla_tile_maps.cu).
// q_tma = 0 where q's packed rows have no single stride (e.g. every other head of a larger tensor) or
// are not 16-byte aligned (the torch op rejects those; other callers of the launcher may not): the
// tile is then loaded per thread.
struct TileMaps {
  CUtensorMap q;   // packed query rows [batch * rows, 576] (16-bit), boxes of 64 x 64, 128B swizzle
  int q_tma;
};
// q_tma = 0 when the map cannot be built (never throws: the per-thread path remains).
void make_tile_maps(const DecodeParams& p, bool q_fp16, TileMaps& maps);

// The Q tile of request bi, row tile m_tile by TMA: nine 64-column boxes of the packed rows, armed on
// bar_q by thread 0. Rows past the request's s_q * h_q hold the next request's rows (or zeros past the
// tensor); their outputs are never written. Called by thread 0 only. The eight latent panels land at
// `latent`, the rope panel at `rope` (latent + 8 panels in a plain Q tile; the qreg kernel parks the
// latent panels in a KV stage and keeps the rope panel apart).
__device__ __forceinline__ void issue_q_panels(const TileMaps& maps, const DecodeParams& p, int bi, int m_tile,
                                               char* latent, char* rope, uint64_t* bar_q) {
  cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bar_q, kTileBytes);
  const int row = bi * p.rows + m_tile * kM;
#pragma unroll
  for (int j = 0; j < kPanels; ++j) {
    cute::SM90_TMA_LOAD_2D::copy(&maps.q, bar_q, static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL),
                                 j < kPanels - 1 ? latent + j * kPanelBytes : rope, j * 64, row);
  }
}
__device__ __forceinline__ void issue_q_tile(const TileMaps& maps, const DecodeParams& p, int bi, int m_tile, char* q_tile,
                                             uint64_t* bar_q) {
  issue_q_panels(maps, p, bi, m_tile, q_tile, q_tile + (kPanels - 1) * kPanelBytes, bar_q);
}
// After the Q tile's TMA landed: an fp16 q becomes bf16 in place (elementwise, so the swizzled
// positions stay), by all threads; the caller's barrier publishes it.
template <typename QT>
__device__ __forceinline__ void q_tile_to_bf16(char* q_tile) {
  if constexpr (std::is_same_v<QT, __half>) {
#pragma unroll 6
    for (int i = 0; i < kTileBytes / 16 / kThreads; ++i) {
      uint4* c = reinterpret_cast<uint4*>(q_tile) + threadIdx.x + i * kThreads;
      *c = q_to_bf16<QT>(*c);
    }
    fence_async_smem();
  }
}

// Where a finished piece goes (direct to out / lse, or split slot), looked up when the piece starts:
// plan.destination is a dependent read of the plan in global memory, whose latency then hides under
// the piece's blocks instead of opening the write.
struct PieceDest {
  bool ok, direct;
  int slot;
};
__device__ __forceinline__ PieceDest piece_dest(const DecodeParams& p, const detail::PlanPart& plan, int bi) {
  PieceDest d;
  d.ok = plan.destination(p, bi, d.direct, d.slot);
  return d;
}

// A finished 64-row piece through shared memory: every thread puts its normalised values into a
// row-padded tile in q's dtype (the output's and the split partials' dtype alike) over the KV stages,
// free after the piece's last block, and then copies 16-byte chunks of whole rows to out or to the
// workspace, so that each warp store covers 512 contiguous bytes. Writing the accumulator fragments
// straight out (4- and 8-byte stores, 16 or 32 bytes contiguous) took 2.9-3.6 µs for a 128 KB fp32
// partial and 4.6-5.0 µs for a 64 KB bf16 output from one SM (session-7 timeline, b=1); one bulk copy
// per row took ~4.8 / ~3.8 µs (run 1 of session 8), and a microbenchmark measured 55 GB/s out of one
// SM for bulk copies of any size against 66 GB/s for coalesced 16-byte stores, which also leave the
// shared memory free as soon as they issue. Row stride kStagedRowBytes = 1,040 B (260 words = 4 mod
// 32 banks): a warp's 4-byte stores hit distinct banks. Called by every thread (two barriers).
// Split in two for kernels whose output owners are not "warpgroup w owns columns [256 w, + 256)"
// (qreg: warpgroup 0 owns 64 columns, warpgroup 1 the other 448 as 256 + 192): stage_piece_rows puts
// an accumulator of kCols columns starting at column col0 into the tile (the caller holding column 0
// also writes the lse), copy_piece_rows is called by every thread of the CTA (kNThreads), from both
// warpgroups' branches in qreg: its barriers are the non-aligned forms (common/named_barrier.cuh).
template <typename QT, int kCols, typename MaxOf, typename SumOf>
__device__ __forceinline__ void stage_piece_rows(const DecodeParams& p, const PieceDest& dest, int bi, int m_tile,
                                                 const float (&o)[kCols / 2], int col0, MaxOf m_log2, SumOf l,
                                                 char* tile) {
  const int lane = threadIdx.x & 31, q4 = lane & 3;
  const int row0 = ((threadIdx.x & 127) >> 5) * 16 + (lane >> 2);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + 8 * h, R = m_tile * kM + r;
    const float lsum = l(h, r);
    const bool seen = lsum > 0.f;
    const float inv = seen ? 1.f / lsum : 0.f;
    QT* dst = reinterpret_cast<QT*>(tile + r * kStagedRowBytes) + col0 + 2 * q4;
#pragma unroll
    for (int j = 0; j < kCols / 8; ++j) store_pair<QT>(dst + 8 * j, o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
    if (col0 == 0 && q4 == 0 && R < p.rows) {
      const float lse2 = seen ? m_log2(h, r) + __log2f(lsum) : -INFINITY;  // log2 domain
      detail::store_row_lse(p, bi, R, dest.direct, dest.slot, lse2);
    }
  }
}
// Whether request bi's piece is half of a cluster pair (mla_params.h): the decode runs in 2-CTA clusters
// along the parts (grid y), this part holds only bi, and bi's other piece is the peer part's only one.
__device__ __forceinline__ bool is_cluster_pair(const DecodeParams& p, int bi) {
  if (!p.cluster_pairs) return false;
  const int part = blockIdx.y, even = part & ~1;
  const int* e0 = p.plan + kPlanPartInts * even;
  const int* per_req = p.plan + kPlanPartInts * p.num_sm_parts;
  return cluster_pair_candidate(e0, e0 + kPlanPartInts, p.batch) == bi && per_req[2 * bi + 1] == 2;
}

__device__ __forceinline__ uint32_t peer_smem(uint32_t addr, uint32_t peer) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(addr), "r"(peer));
  return remote;
}
__device__ __forceinline__ float ld_peer_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ uint4 ld_peer_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared::cluster.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr) : "memory");
  return v;
}

// A cluster pair's merge: both CTAs have staged their normalised rows (tile) and row statistics (s_m: row
// max, log2 domain; s_l: row sum) in shared memory; CTA rank k writes final rows [32 k, 32 k + 32) of the
// tile from its own rows and the peer's (read through distributed shared memory). The sums are the
// combine's, in split order (rank 0 holds the request's first piece), so either rank computes the same.
// Called by every thread of both CTAs; the second cluster barrier keeps each tile alive until the peer
// has read it.
template <typename QT, int kNThreads>
__device__ __forceinline__ void merge_cluster_pair(const DecodeParams& p, int bi, int m_tile, const char* tile,
                                                   const float* s_m, const float* s_l) {
  static_assert(kNThreads == 8 * (kM / 2), "eight threads a row");
  cluster_barrier_sync();  // both tiles and row statistics written (release / acquire)
  const uint32_t rank = cute::block_rank_in_cluster(), peer = rank ^ 1;
  const int r = (kM / 2) * rank + (threadIdx.x >> 3), q = threadIdx.x & 7, R = m_tile * kM + r;
  if (R < p.rows) {
    const float m_own = s_m[r], l_own = s_l[r];
    const float m_peer = ld_peer_f32(peer_smem(smem_u32(s_m + r), peer));
    const float l_peer = ld_peer_f32(peer_smem(smem_u32(s_l + r), peer));
    const float lse_own = l_own > 0.f ? m_own + __log2f(l_own) : -INFINITY;
    const float lse_peer = l_peer > 0.f ? m_peer + __log2f(l_peer) : -INFINITY;
    const float l0 = rank == 0 ? lse_own : lse_peer, l1 = rank == 0 ? lse_peer : lse_own;
    const float mx = fmaxf(l0, l1);
    const float lse2 = mx == -INFINITY ? -INFINITY : mx + log2f(exp2f(l0 - mx) + exp2f(l1 - mx));
    const float w0 = lse2 == -INFINITY ? 0.f : exp2f(l0 - lse2), w1 = lse2 == -INFINITY ? 0.f : exp2f(l1 - lse2);
    const char* own_row = tile + r * kStagedRowBytes;
    const uint32_t peer_row = peer_smem(smem_u32(own_row), peer);
    QT* dst = detail::piece_row<QT>(p, bi, R, true, 0);
    uint4 vp[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) vp[j] = ld_peer_v4(peer_row + (q + 8 * j) * 16);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int c = q + 8 * j;
      const uint4 vo = *reinterpret_cast<const uint4*>(own_row + c * 16);
      float x0[8], x1[8], o[8];
      to_float8<QT>(rank == 0 ? vo : vp[j], x0);
      to_float8<QT>(rank == 0 ? vp[j] : vo, x1);
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = w0 * x0[k] + w1 * x1[k];
      detail::store_8<QT>(dst + c * 8, o);
    }
    if (q == 0) {
      const int s = R / p.h_q, h = R - s * p.h_q;
      p.lse[(static_cast<int64_t>(bi) * p.h_q + h) * p.s_q + s] = lse2 * 0.69314718055994531f;
    }
  }
  cluster_barrier_sync();  // the peer is done reading this CTA's tile and statistics
}

// s_m / s_l: the piece's row statistics in shared memory (max in the log2 domain, sum), read only when
// the piece is half of a cluster pair.
template <typename QT, int kNThreads>
__device__ __forceinline__ void copy_piece_rows(const DecodeParams& p, const PieceDest& dest, int bi, int m_tile,
                                                const char* tile, const float* s_m, const float* s_l) {
  cta_barrier_sync();
  if (!dest.direct && is_cluster_pair(p, bi)) {
    merge_cluster_pair<QT, kNThreads>(p, bi, m_tile, tile, s_m, s_l);
  } else {
    // 64 chunks a row: a warp stores half a row.
    const int valid = min(kM, p.rows - m_tile * kM);
    for (int i = threadIdx.x; i < valid * 64; i += kNThreads) {
      const int r = i >> 6, c = i & 63, R = m_tile * kM + r;
      QT* dst = detail::piece_row<QT>(p, bi, R, dest.direct, dest.slot);
      *reinterpret_cast<uint4*>(dst + c * 8) = *reinterpret_cast<const uint4*>(tile + r * kStagedRowBytes + c * 16);
    }
  }
  // The tile's reads are done and its generic-proxy writes ordered before the next piece's TMA
  // writes (async proxy) into the same stages.
  fence_async_smem();
  cta_barrier_sync();
}
// s_m / s_l: as copy_piece_rows (null in a kernel never launched in cluster pairs).
template <typename QT, typename MaxOf, typename SumOf>
__device__ __forceinline__ void write_piece_staged(const DecodeParams& p, const PieceDest& dest, int bi, int m_tile,
                                                   const float (&o)[128], MaxOf m_log2, SumOf l, char* tile,
                                                   const float* s_m, const float* s_l) {
  if (!dest.ok) return;
  stage_piece_rows<QT, 256>(p, dest, bi, m_tile, o, (threadIdx.x >> 7) * 256, m_log2, l, tile);
  copy_piece_rows<QT, kThreads>(p, dest, bi, m_tile, tile, s_m, s_l);
}

template <typename QT, bool kFp8>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_wgmma_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ TileMaps maps) {
  using S = Smem<kFp8>;
  FS_MTL(unsigned long long* tl = timeline::decode_row();
         unsigned long long tl_t[timeline::kDecodeStamps] = {timeline::now()}; bool tl_first = true;)
  // The combine kernel (programmatic dependent) may be scheduled as SMs free up; it waits for this
  // whole grid before reading any partial.
  pdl_launch_dependents();
  char* smem = swizzle_aligned_smem();
  const uint32_t s_base = smem_u32(smem);
  float* s_alpha = reinterpret_cast<float*>(smem + S::kAlpha);
  float* s_lrun = reinterpret_cast<float*>(smem + S::kLRun);
  float* s_mrun = reinterpret_cast<float*>(smem + S::kMRun);
  uint64_t* bar_q = reinterpret_cast<uint64_t*>(smem + S::kBarQ);
  uint32_t q_parity = 0;  // of the Q tile loads so far
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterTransactionBarrier::init(bar_q, 1);
    cutlass::arch::fence_barrier_init();
    if (maps.q_tma) cute::prefetch_tma_descriptor(&maps.q);
  }
  __syncthreads();

  const int m_tile = blockIdx.x, part = blockIdx.y;
  const int wg = warpgroup_index(), tw = threadIdx.x & 127;  // warpgroup, thread within it
  const int warp = tw >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q4 = lane & 3;
  const int row0 = warp * 16 + g;  // this thread's accumulator rows: row0 and row0 + 8

  // The plan may be read before the wait (detail::PlanPart). Launched as a programmatic dependent
  // (launch_pdl): nothing else written by an earlier kernel (q, the block table, the cache, the
  // workspace the previous combine may still read) is touched before this.
  const detail::PlanPart plan(p, part);
  plan.warm(p);
  if (plan.empty()) {  // before the wait (PlanPart::empty)
    FS_MTL(tl_t[8] = timeline::now(); timeline::write_decode_row(tl, tl_t);)
    return;
  }
  pdl_wait();
  FS_MTL(tl_t[8] = timeline::now();)
  for (int bi = plan.b0; bi <= plan.b1; ++bi) {
    int len, len_eff, blk_begin, n_iter;
    plan.piece(p, bi, len, len_eff, blk_begin, n_iter);
    const PieceDest dest = piece_dest(p, plan, bi);
    FS_MTL(if (tl_first) { tl_t[1] = timeline::now(); tl_t[7] = n_iter; })

    if (n_iter > 0) {
      if (maps.q_tma && threadIdx.x == 0) issue_q_tile(maps, p, bi, m_tile, smem + S::kQ, bar_q);
      if (kFp8 && wg == 1) {  // WG1 stages the raw tokens of blocks 0 and 1
        issue_raw_block(p, s_base + S::kK1, bi, blk_begin, len_eff, tw);
        cp_async_commit();
        if (n_iter > 1) issue_raw_block(p, s_base + S::kK1 + S::kRawStage, bi, blk_begin + 1, len_eff, tw);
        cp_async_commit();  // possibly empty: keeps the group count uniform
      } else if (!kFp8 && wg == 1) {
        issue_kv_block(p, s_base + S::kK0, bi, blk_begin, len_eff, tw);
        cp_async_commit();
        if (n_iter > 1) issue_kv_block(p, s_base + S::kK1, bi, blk_begin + 1, len_eff, tw);
        cp_async_commit();  // possibly empty: keeps the group count uniform
      }
      // Q tile, converted to bf16, while the first blocks land.
      if (maps.q_tma) {
        mbar_wait(smem_u32(bar_q), q_parity);
        q_parity ^= 1;
        q_tile_to_bf16<QT>(smem + S::kQ);
      } else {
        load_q_tile<QT>(p, bi, m_tile, smem + S::kQ);  // rows past s_q * h_q are zeros
      }
      FS_MTL(if (tl_first) tl_t[3] = timeline::now();)
      if (!kFp8 && wg == 1) cp_async_wait<1>();  // block 0 landed
      fence_async_smem();
      __syncthreads();  // Q and (bf16) block 0 visible to the async proxy
      FS_MTL(if (tl_first) tl_t[2] = timeline::now();)
    }

    float o[128];  // this warpgroup's 64 x 256 output slice
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

    // FP8: block `it`'s raw tokens -> the bf16 stage. WG1 owns the raw copies (one cp.async group per
    // block, empty past the end, so block it's group is complete when at most one newer group is
    // pending); the upper half of the latent chunks was dequantized into WG1's registers during the
    // previous block (fp8_predequant; for the first block, here) and is only stored here.
    uint4 pre[kFp8 ? 16 : 1];
    auto fp8_stage = [&](int it) {
      if constexpr (kFp8) {
        if (wg == 1) cp_async_wait<1>();
        named_barrier_sync(0, kThreads);  // raw tokens visible; the previous block is done with the stage
        char* raw = smem + S::kK1 + (it & 1) * S::kRawStage;
        if (it == 0 && wg == 1) dequant_upper_to_regs(raw, pre, tw);  // no earlier block to do it during
        dequant_lower_and_rope(raw, smem + S::kK0);
        if (wg == 1) store_upper_regs(pre, smem + S::kK0, tw);
        fence_async_smem();
        named_barrier_sync(0, kThreads);  // the stage complete; raw buffer it % 2 free
        if (wg == 1) {
          if (it + 2 < n_iter) issue_raw_block(p, s_base + S::kK1 + (it & 1) * S::kRawStage, bi, blk_begin + it + 2, len_eff, tw);
          cp_async_commit();
        }
      }
    };
    // WG1, before it waits for block it's P: the upper latent half of block it + 1 into registers.
    auto fp8_predequant = [&](int it) {
      if constexpr (kFp8) {
        if (it + 1 < n_iter) {
          cp_async_wait<1>();       // block it + 1 landed (it + 2 may be pending)
          warpgroup_barrier_sync(kBarWG1);   // ... for every WG1 thread's copies
          dequant_upper_to_regs(smem + S::kK1 + ((it + 1) & 1) * S::kRawStage, pre, tw);
        }
      }
    };

    if (wg == 0) {
      const int limit[2] = {detail::visible_keys(p, m_tile * kM + row0, len, len_eff),  // this thread's two rows
                            detail::visible_keys(p, m_tile * kM + row0 + 8, len, len_eff)};
      const WgmmaDesc dQ = wgmma_desc_sw128_tile(s_base + S::kQ, 16, 1024);
      // K-major (S) and MN-major (P V) descriptors of both stages; a block picks its stage's pair.
      const WgmmaDesc dK0 = wgmma_desc_sw128_tile(s_base + S::kK0, 16, 1024);
      const WgmmaDesc dK1 = wgmma_desc_sw128_tile(s_base + (kFp8 ? S::kK0 : S::kK1), 16, 1024);
      const WgmmaDesc dV0 = wgmma_desc_sw128_tile(s_base + S::kK0, kPanelBytes, 1024);
      const WgmmaDesc dV1 = wgmma_desc_sw128_tile(s_base + (kFp8 ? S::kK0 : S::kK1), kPanelBytes, 1024);
      for (int it = 0; it < n_iter; ++it) {
        const int blk = blk_begin + it;
        fp8_stage(it);
        const WgmmaDesc dKs = (it & 1) ? dK1 : dK0, dVs = (it & 1) ? dV1 : dV0;
        // ---- S = Q K^T ----
        float sacc[32];
        fence_regs(sacc);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 0; kk < kDQK / 16; ++kk) {
          const uint32_t off = (kk >> 2) * kPanelBytes + (kk & 3) * 32;
          qk_step(dQ.at(off), dKs.at(off), sacc, kk == 0 ? gmma::ScaleOut::Zero : gmma::ScaleOut::One,
                  std::make_index_sequence<32>{});
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_regs(sacc);

        // ---- mask + online softmax (log2 domain); a warp owns all 64 keys of its 16 rows ----
        float mloc[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = blk * kBlockN + 8 * j + 2 * q4 + (e & 1);
            const float v = key < limit[e >> 1] ? sacc[4 * j + e] * p.scale_log2 : -INFINITY;
            sacc[4 * j + e] = v;
            mloc[e >> 1] = fmaxf(mloc[e >> 1], v);
          }
        }
        float alpha[2], m_use[2], sloc[2] = {0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mloc[h] = fmaxf(mloc[h], __shfl_xor_sync(0xffffffffu, mloc[h], 1));
          mloc[h] = fmaxf(mloc[h], __shfl_xor_sync(0xffffffffu, mloc[h], 2));
          const float m_new = lazy_max(m_run[h], mloc[h]);
          m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: avoid (-inf) - (-inf)
          alpha[h] = rescale_factor(m_run[h], m_new);
          m_run[h] = m_new;
        }
        uint32_t pf[16];  // P as bf16 pairs, in the A-fragment order of the P V wgmma
        char* sP = smem + S::kP;
        if constexpr (kFp8) warpgroup_barrier_sync(kBarWG0);  // P overwrites the rope panel every warp's S read
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float p0 = fast_exp2(sacc[4 * j + 0] - m_use[0]);
          const float p1 = fast_exp2(sacc[4 * j + 1] - m_use[0]);
          const float p2 = fast_exp2(sacc[4 * j + 2] - m_use[1]);
          const float p3 = fast_exp2(sacc[4 * j + 3] - m_use[1]);
          sloc[0] += p0 + p1;
          sloc[1] += p2 + p3;
          pf[2 * j] = pack_bf16(p0, p1);
          pf[2 * j + 1] = pack_bf16(p2, p3);
          *reinterpret_cast<uint32_t*>(sP + swz(row0, j) + q4 * 4) = pf[2 * j];
          *reinterpret_cast<uint32_t*>(sP + swz(row0 + 8, j) + q4 * 4) = pf[2 * j + 1];
        }
        if (q4 == 0) {
          s_alpha[row0] = alpha[0];
          s_alpha[row0 + 8] = alpha[1];
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          sloc[h] += __shfl_xor_sync(0xffffffffu, sloc[h], 1);
          sloc[h] += __shfl_xor_sync(0xffffffffu, sloc[h], 2);
          l_run[h] = l_run[h] * alpha[h] + sloc[h];
        }
        fence_async_smem();
        named_barrier_arrive(kBarPFull, kThreads);
        rescale_o(o, alpha[0], alpha[1]);
        // ---- O0 += P V[:, 0:256] ----
        fence_regs(o);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          const uint32_t a[4] = {pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3]};
          pv_step_rs(a, dVs.at(kk * 2048), o, std::make_index_sequence<128>{});
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_regs(o);
        named_barrier_sync(kBarBlockEnd, kThreads);
      }
      if (q4 == 0) {
        s_lrun[row0] = l_run[0];
        s_lrun[row0 + 8] = l_run[1];
        s_mrun[row0] = m_run[0];
        s_mrun[row0 + 8] = m_run[1];
      }
    } else {
      const WgmmaDesc dP = wgmma_desc_sw128_tile(s_base + S::kP, 16, 1024);
      const WgmmaDesc dV0 = wgmma_desc_sw128_tile(s_base + S::kK0 + 4 * kPanelBytes, kPanelBytes, 1024);
      const WgmmaDesc dV1 = wgmma_desc_sw128_tile(s_base + (kFp8 ? S::kK0 : S::kK1) + 4 * kPanelBytes, kPanelBytes, 1024);
      for (int it = 0; it < n_iter; ++it) {
        fp8_stage(it);
        fp8_predequant(it);
        const uint32_t sK = s_base + ((!kFp8 && (it & 1)) ? S::kK1 : S::kK0);
        const WgmmaDesc dVs = (it & 1) ? dV1 : dV0;
        named_barrier_sync(kBarPFull, kThreads);
        rescale_o(o, s_alpha[row0], s_alpha[row0 + 8]);
        // ---- O1 += P V[:, 256:512] ----
        fence_regs(o);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          pv_step_ss(dP.at(kk * 32), dVs.at(kk * 2048), o, std::make_index_sequence<128>{});
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_regs(o);
        if (!kFp8 && it + 1 < n_iter) {
          cp_async_wait<0>();  // block it + 1 landed (block it + 2 is not issued yet)
          fence_async_smem();
        }
        named_barrier_sync(kBarBlockEnd, kThreads);
        // Both warpgroups are done with this stage: refill it with block it + 2.
        if (!kFp8 && it + 2 < n_iter) {
          issue_kv_block(p, sK, bi, blk_begin + it + 2, len_eff, tw);
          cp_async_commit();
        }
      }
    }
    __syncthreads();  // final row statistics visible to WG1; every read of Q / K / P done
    FS_MTL(if (tl_first) tl_t[4] = timeline::now();)

    // ---- write this piece: straight to out/lse, or a split partial to the workspace ----
    write_piece_staged<QT>(p, dest, bi, m_tile, o, [&](int, int r) { return s_mrun[r]; },
                           [&](int, int r) { return s_lrun[r]; }, smem + S::kK0, s_mrun, s_lrun);
    // s_lrun / s_mrun are rewritten by the next request (at once when it has no blocks here).
    __syncthreads();
    FS_MTL(if (tl_first) { tl_t[5] = timeline::now(); tl_first = false; })
  }
  FS_MTL(timeline::write_decode_row(tl, tl_t);)
}

template <typename QT, bool kFp8>
void launch_decode_wgmma(const DecodeParams& p, cudaStream_t stream) {
  constexpr int smem = Smem<kFp8>::kTotal;
  auto kernel = mla_decode_wgmma_kernel<QT, kFp8>;
  opt_in_dynamic_smem<mla_decode_wgmma_kernel<QT, kFp8>>(smem);
  TileMaps maps;
  make_tile_maps(p, std::is_same_v<QT, __half>, maps);
  const dim3 grid((p.rows + kM - 1) / kM, p.num_sm_parts);
  if (p.cluster_pairs) {
    launch_pdl_clusters(kernel, grid, dim3(kThreads), smem, stream, dim3(1, 2, 1), p, maps);
  } else {
    launch_pdl(kernel, grid, dim3(kThreads), smem, stream, p, maps);
  }
  FS_CHECK_LAUNCH();
}

}  // namespace wg
}  // namespace flashseek::mla
