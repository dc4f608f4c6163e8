// Paged MLA latent decode, 64-row tiles, bf16 cache: the two warpgroups take turns on key blocks.
//
// Why: in the two-warpgroup wgmma kernel (mla_decode_wgmma.cuh) warpgroup 0 computes S and the
// softmax of every block while warpgroup 1 waits for P, so the tensor pipe idles through every
// softmax (~0.8x FlashMLA at h_q = 128). Here blocks go in pairs (2i in stage 0, 2i + 1 in stage 1);
// warpgroup 0 computes S and the softmax of the even block, warpgroup 1 of the odd one, so one
// warpgroup's softmax runs while the other's wgmma are queued. The schedule is the one FlashMLA's
// sm90 dense decode kernel uses (docs/mla-design.md, "The schedule to build next"), written here
// in our own terms.
//
// Output columns stay split as before: warpgroup 0 owns O[:, 0:256], warpgroup 1 O[:, 256:512]
// (128 fp32 registers a thread). Per pair, with m the running row max (log2 domain):
//   WG0: mA = max(m, rowmax S_A) -> shared, P_A = exp2(S_A - mA), O0 = O0 * 2^(m - mA) + P_A V_A[:, :256]
//        (P from registers); then, with WG1's mB: P_A * 2^(mA - mB) -> the shared P_A tile (for WG1),
//        O0 = O0 * 2^(mA - mB) + P_B V_B[:, :256] (P_B from shared memory), then S of block 2i + 2.
//   WG1: mB = max(mA, rowmax S_B) -> shared, P_B = exp2(S_B - mB) -> shared (stage 1's rope panel,
//        which S_B no longer needs), O1 = O1 * 2^(m - mB) + P_B V_B[:, 256:] (registers)
//        + P_A V_A[:, 256:] (shared), then S of block 2i + 3.
// "max" is the lazy reference max of wg::lazy_max: it moves only when a block's row max passes it by
// wg::kRescaleSlack, so most factors 2^(..) above are exactly 1 and their O rescale is skipped.
// Row sums stay per warpgroup and are added at the end. Named barriers: mA ready, mB ready, P_A
// stored, P_B stored; each is used once per pair, and each warpgroup passes every one of them in
// the same order, so a barrier is never re-armed before the previous use completed.
//
// Loads: TMA, one box per page (min(page_size, 64) rows x 64 dims, 128B swizzle) and one mbarrier
// per 64-dim panel per stage, so S can start on the panels that landed first. A stage is refilled
// in parts, each as soon as both warpgroups are done with it: by warpgroup 0 the rope panel (stage
// 0: right after S_A; stage 1: once P_B, which it holds, is consumed) and panels 0-3 (after its P V
// of that block retires), by warpgroup 1 panels 4-7. Warpgroup 1 queues both its P V before
// warpgroup 0's P_B V_B (the P_B-stored barrier is passed only after), so it refills early. Page
// ids for the next pair are read at the start of the pair by the issuing warps. Rows past the
// sequence end are zeroed after they land (tail block only): P is 0 there, but 0 * NaN would poison O.
//
// Shared memory: Q 73,728 | stage 0 73,728 | stage 1 73,728 | P_A 8,192 | row vectors | 18 mbarriers.
#pragma once
#include <cuda.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "mla/mla_decode_wgmma.cuh"

namespace flashseek::mla {
namespace seesaw {

// Stall accounting for the standalone harness only (-DFLASHSEEK_MLA_TIMELINE; the library never
// defines it): per CTA and warpgroup, clock64 cycles in the kernel, in TMA waits, in named-barrier
// waits and in wgmma waits, then the TMA waits per panel (9), written to
// g_mla_timeline[(cta * 2 + wg) * 16 ..] when it is set.
#ifdef FLASHSEEK_MLA_TIMELINE
__device__ unsigned long long* g_mla_timeline = nullptr;
#define FS_TL(...) __VA_ARGS__
#else
#define FS_TL(...)
#endif

using detail::fast_exp2;
using detail::pack_bf16;
using detail::smem_u32;
using wg::fence_async_smem;
using wg::fence_regs;
using wg::kM;
using wg::kPanelBytes;
using wg::kPanels;
using wg::kThreads;
using wg::kTileBytes;
using wg::swz;
using wg::WgmmaDesc;
using wg::wgmma_desc_sw128_tile;
namespace gmma = wg::gmma;

struct Smem {
  static constexpr int kQ = 0;
  static constexpr int kStage0 = kTileBytes;
  static constexpr int kStage1 = 2 * kTileBytes;
  static constexpr int kPA = 3 * kTileBytes;       // P of the even block, rescaled to mB
  static constexpr int kMaxA = kPA + kPanelBytes;  // [64] row max after the even block
  static constexpr int kMaxB = kMaxA + kM * 4;     // [64] ... after the odd block
  static constexpr int kRowSum = kMaxB + kM * 4;   // [2][64] final row sums of the two warpgroups
  static constexpr int kBars = kRowSum + 2 * kM * 4;
  static constexpr int kBarQ = kBars + 2 * kPanels * 8;  // mbarrier (stage, panel) at kBars + 8 (9 stage + panel)
  static constexpr int kTotal = kBarQ + 8;                // then the Q tile's mbarrier
};
static_assert(Smem::kTotal <= 232448, "shared memory exceeds the sm_90 per-block limit");
static_assert(Smem::kStage0 + kM * wg::kStagedRowBytes <= Smem::kPA, "wg::write_piece_staged's rows must stay in the stages");

constexpr int kBarMaxA = 1;
constexpr int kBarMaxB = 2;
constexpr int kBarPA = 3;
constexpr int kBarPB = 4;
constexpr int kBarWG = 5;  // + warpgroup: the warpgroup's zeroed tail rows are written

constexpr uint32_t kPanelsLow = 0x00F;   // panels 0-3: refilled by warpgroup 0
constexpr uint32_t kPanelRope = 0x100;   // the rope panel: refilled by warpgroup 0
constexpr uint32_t kPanelsHigh = 0x0F0;  // panels 4-7: refilled by warpgroup 1
constexpr uint32_t kPanelsAll = 0x1FF;

// First cache row of box `box` of key block `blk` (boxes of 2^box_log2 tokens, inside one page), or
// -1 when the box starts at or past len_eff (not loaded). Page ids are clamped to [0, num_pages): a bad
// table gives wrong values, never an out-of-bounds read (as in detail::cache_row).
// box_page is the table load alone and box_row_from finishes the row from it: a caller that needs the
// row later issues the load early and finishes it where it is used. Computed in one go, the clamp right
// behind the load stalls the warp for the load's whole latency (ncu, session 19).
__device__ __forceinline__ int box_page(const DecodeParams& p, int bi, int blk, int box, int box_log2, int len_eff) {
  const int t0 = blk * kBlockN + (box << box_log2);
  return t0 < len_eff ? __ldg(p.block_table + bi * p.bt_stride_b + (t0 >> p.page_size_log2)) : 0;
}
__device__ __forceinline__ int box_row_from(const DecodeParams& p, int page, int blk, int box, int box_log2,
                                            int len_eff) {
  const int t0 = blk * kBlockN + (box << box_log2);
  if (t0 >= len_eff) return -1;
  const uint32_t pg = min(static_cast<uint32_t>(page), static_cast<uint32_t>(p.num_pages - 1));
  return static_cast<int>((pg << p.page_size_log2) + (t0 & ((1 << p.page_size_log2) - 1)));
}
__device__ __forceinline__ int box_row(const DecodeParams& p, int bi, int blk, int box, int box_log2, int len_eff) {
  return box_row_from(p, box_page(p, bi, blk, box, box_log2, len_eff), blk, box, box_log2, len_eff);
}

// One warp issues the TMA loads of the panels in kMask of a key block into a stage. Box b's cache
// row is in lane lane0 + b of `rows` (-1: past the end, not loaded); lane 0 arms each panel's
// mbarrier with the bytes that will land. kMulticast (a 2-CTA cluster reading the same blocks,
// mla_decode_qreg.cuh): this CTA loads only the panels pn with pn % 2 == rank, into the same stage of
// both CTAs; it still arms its barriers for every panel, since the peer's half lands on them too.
template <uint32_t kMask, bool kMulticast = false>
__device__ __forceinline__ void issue_block(const CUtensorMap* map, char* stage, uint64_t* bars, int rows, int lane0,
                                            int nbox, int box_log2, int lane, int rank = 0) {
  constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
  const int row = __shfl_sync(0xffffffffu, rows, lane0 + (lane & 7));
  const bool mine = lane < nbox && row >= 0;
  const uint32_t bytes = static_cast<uint32_t>(__popc(__ballot_sync(0xffffffffu, mine))) << (box_log2 + 7);
  if (lane == 0) {
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) {
      if (kMask >> pn & 1) cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(bars + pn, bytes);
    }
  }
  __syncwarp();
  if (mine) {
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) {
      if (!(kMask >> pn & 1)) continue;
      char* dst = stage + pn * kPanelBytes + (lane << (box_log2 + 7));
      if constexpr (kMulticast) {
        if ((pn & 1) == rank) cute::SM90_TMA_LOAD_MULTICAST_2D::copy(map, bars + pn, uint16_t(0x3), kHint, dst, pn * 64, row);
      } else {
        cute::SM90_TMA_LOAD_2D::copy(map, bars + pn, kHint, dst, pn * 64, row);
      }
    }
  }
}

// S += Q K^T over one 64-dim panel (4 wgmma m64n64k16), once the panel has landed. The wgmma fence
// after the wait is explicit: otherwise ptxas inserts one behind the wait loop (a branch) and then
// serialises every wgmma of the kernel (C7520).
template <int kPanel, bool kFirst>
__device__ __forceinline__ void s_panel(WgmmaDesc dQ, WgmmaDesc dK, uint32_t bars, uint32_t parity, float (&sacc)[32],
                                        long long (&tma_wait_cycles)[kPanels]) {
  FS_TL(const long long t0 = clock64());
  mbar_wait(bars + 8 * kPanel, parity);
  FS_TL(tma_wait_cycles[kPanel] += clock64() - t0);
  cute::warpgroup_arrive();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t off = kPanel * kPanelBytes + kk * 32;
    wg::qk_step(dQ.at(off), dK.at(off), sacc, kFirst && kk == 0 ? gmma::ScaleOut::Zero : gmma::ScaleOut::One,
                std::make_index_sequence<32>{});
  }
}

// S over the listed panels in that order (kZero: the first one starts the accumulation).
template <bool kZero, int kFirst, int... kRest>
__device__ __forceinline__ void s_panels(WgmmaDesc dQ, WgmmaDesc dK, uint32_t bars, uint32_t parity, float (&sacc)[32],
                                         long long (&tma_wait_cycles)[kPanels]) {
  s_panel<kFirst, kZero>(dQ, dK, bars, parity, sacc, tma_wait_cycles);
  (s_panel<kRest, false>(dQ, dK, bars, parity, sacc, tma_wait_cycles), ...);
}

// -inf over the S entries of block blk (64 keys; this thread's columns blk * 64 + 2 * q4 + 8c + {0, 1},
// rows row0 / row0 + 8) past each row's visible keys limit[0] / limit[1]. A block that every row of the
// tile sees in full (min_limit: the tile's first row sees the fewest keys) is left as it is.
__device__ __forceinline__ void mask_block(float (&sacc)[32], int blk, int q4, const int (&limit)[2], int min_limit) {
  if ((blk + 1) * kBlockN <= min_limit) return;
  const int key0 = blk * kBlockN + 2 * q4;
#pragma unroll
  for (int c = 0; c < 8; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (key0 + 8 * c + (e & 1) >= limit[e >> 1]) sacc[4 * c + e] = -INFINITY;
    }
  }
}

// Rows [valid, 64) of a stage's V panels (0-7) := 0, by one warpgroup.
__device__ __forceinline__ void zero_tail_rows(char* stage, int valid, int tw) {
  for (int idx = tw; idx < (kBlockN - valid) * 64; idx += 128) {
    const int row = valid + (idx >> 6), c = idx & 63;
    *reinterpret_cast<uint4*>(stage + (c >> 3) * kPanelBytes + swz(row, c & 7)) = make_uint4(0, 0, 0, 0);
  }
  fence_async_smem();
}

// Runs a warpgroup's pair body over a piece of n blocks: the pairs with both blocks and a full next
// pair, then the last one or two (compile-time variants <has odd block, next even, next odd>: a wgmma
// batch under a run-time condition makes ptxas serialise every wgmma). Force-inlined: as a lambda
// it became a called function, and ptxas serialised the wgmma.
template <typename PairBody>
__device__ __forceinline__ void run_pairs(PairBody& pair, int n) {
  int i = 0;
  for (; 2 * i + 3 < n; ++i) pair.template operator()<true, true, true>(i);
  const int r = n - 2 * i;
  if (r == 3) {
    pair.template operator()<true, true, false>(i);
    pair.template operator()<false, false, false>(i + 1);
  } else if (r == 2) {
    pair.template operator()<true, false, false>(i);
  } else if (r == 1) {
    pair.template operator()<false, false, false>(i);
  }
}

template <typename QT>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_seesaw_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap tmap_kv,
                             const __grid_constant__ wg::TileMaps maps) {
  // The combine kernel (programmatic dependent) waits for this whole grid before reading partials.
  pdl_launch_dependents();
  char* smem = wg::swizzle_aligned_smem();
  const uint32_t s_base = smem_u32(smem);
  float* s_maxA = reinterpret_cast<float*>(smem + Smem::kMaxA);
  float* s_maxB = reinterpret_cast<float*>(smem + Smem::kMaxB);
  float* s_rowsum = reinterpret_cast<float*>(smem + Smem::kRowSum);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Smem::kBars);  // [stage][panel]
  uint64_t* bar_q = reinterpret_cast<uint64_t*>(smem + Smem::kBarQ);
  uint32_t q_parity = 0;  // of the Q tile loads so far
  char* const stage0 = smem + Smem::kStage0;
  char* const stage1 = smem + Smem::kStage1;

  const int m_tile = blockIdx.x, part = blockIdx.y;
  const int wg = threadIdx.x >> 7, tw = threadIdx.x & 127;
  const int warp = tw >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q4 = lane & 3;
  const int row0 = warp * 16 + g;  // this thread's accumulator rows: row0 and row0 + 8
  const int box_log2 = min(p.page_size_log2, 6);
  const int nbox = kBlockN >> box_log2;

  if (threadIdx.x == 0) {
    for (int i = 0; i < 2 * kPanels + 1; ++i) cutlass::arch::ClusterTransactionBarrier::init(bars + i, 1);
    cutlass::arch::fence_barrier_init();
    cute::prefetch_tma_descriptor(&tmap_kv);
    if (maps.q_tma) cute::prefetch_tma_descriptor(&maps.q);
  }
  __syncthreads();

  const uint32_t stA = s_base + Smem::kStage0, stB = s_base + Smem::kStage1;  // even / odd blocks
  // wgmma descriptors, stepped by offsets: Q, the stages as K (K-major) and as V (MN-major), P_A.
  const WgmmaDesc dQ = wgmma_desc_sw128_tile(s_base + Smem::kQ, 16, 1024);
  const WgmmaDesc dKA = wgmma_desc_sw128_tile(stA, 16, 1024), dKB = wgmma_desc_sw128_tile(stB, 16, 1024);
  const WgmmaDesc dVA = wgmma_desc_sw128_tile(stA, kPanelBytes, 1024), dVB = wgmma_desc_sw128_tile(stB, kPanelBytes, 1024);
  const WgmmaDesc dPA = wgmma_desc_sw128_tile(s_base + Smem::kPA, 16, 1024);
  const uint32_t barsA = s_base + Smem::kBars, barsB = barsA + 8 * kPanels;
  // Loads into each stage before the current request: block j of a request lands in stage j % 2 as that
  // stage's load number base[j % 2] + j / 2, whose mbarrier phase parity is that number's low bit.
  int base0 = 0, base1 = 0;

  long long tl_tma[kPanels] = {};
  FS_TL(long long tl_bar = 0; long long tl_mma = 0; const long long tl_start = clock64();)
  auto bar_wait = [&](int id) {
    FS_TL(const long long t0 = clock64());
    named_barrier_sync(id, kThreads);
    FS_TL(tl_bar += clock64() - t0);
  };
  auto mma_wait_all = [&]() {
    FS_TL(const long long t0 = clock64());
    cute::warpgroup_wait<0>();
    FS_TL(tl_mma += clock64() - t0);
  };

  // The plan may be read before the wait (detail::PlanPart). Launched as a programmatic dependent
  // (launch_pdl): nothing else written by an earlier kernel (q, the block table, the cache, the
  // workspace the previous combine may still read) is touched before this.
  const detail::PlanPart plan(p, part);
  plan.warm(p);
  if (plan.empty()) return;  // before the wait (PlanPart::empty)
  pdl_wait();
  for (int bi = plan.b0; bi <= plan.b1; ++bi) {
    int len, len_eff, blk_begin, n;
    plan.piece(p, bi, len, len_eff, blk_begin, n);
    const wg::PieceDest dest = wg::piece_dest(p, plan, bi);
    const int limit[2] = {detail::visible_keys(p, m_tile * kM + row0, len, len_eff),
                          detail::visible_keys(p, m_tile * kM + row0 + 8, len, len_eff)};
    const int min_limit = detail::visible_keys(p, m_tile * kM, len, len_eff);  // the tile's first row
    auto parity = [&](int j) { return static_cast<uint32_t>(((j & 1 ? base1 : base0) + (j >> 1)) & 1); };
    // Block j's valid rows, when it is the tail block (rows at or past len_eff): they are zeroed.
    auto zero_if_tail = [&](int j) {
      const int valid = len_eff - (blk_begin + j) * kBlockN;
      if (valid < kBlockN) {
        zero_tail_rows(j & 1 ? stage1 : stage0, max(valid, 0), tw);
        warpgroup_barrier_sync(kBarWG + wg);
      }
    };

    // Zeroed so that no path reaches a wgmma with sacc undefined (ptxas then inserts register moves and
    // a warpgroup.arrive that serialise the wgmma).
    float sacc[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) sacc[i] = 0.f;
    if (n > 0) {
      if (maps.q_tma && threadIdx.x == 0) wg::issue_q_tile(maps, p, bi, m_tile, smem + Smem::kQ, bar_q);
      if (warp == 0 && wg < n) {  // block 0 -> stage 0 (warpgroup 0's warp 0), block 1 -> stage 1
        const int rows = lane < nbox ? box_row(p, bi, blk_begin + wg, lane, box_log2, len_eff) : -1;
        issue_block<kPanelsAll>(&tmap_kv, wg ? stage1 : stage0, bars + wg * kPanels, rows, 0, nbox, box_log2, lane);
      }
      // Q tile, converted to bf16, while the first blocks land.
      if (maps.q_tma) {
        mbar_wait(smem_u32(bar_q), q_parity);
        q_parity ^= 1;
        wg::q_tile_to_bf16<QT>(smem + Smem::kQ);
      } else {
        wg::load_q_tile<QT>(p, bi, m_tile, smem + Smem::kQ);
        fence_async_smem();
      }
      __syncthreads();  // Q visible to the async proxy
      if (wg < n) {     // S of block wg (warpgroup 0: block 0, warpgroup 1: block 1)
        const uint32_t bb = wg ? barsB : barsA, ph = parity(wg);
        fence_regs(sacc);
        s_panels<true, 0, 1, 2, 3, 4, 5, 6, 7, 8>(dQ, wg ? dKB : dKA, bb, ph, sacc, tl_tma);
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_regs(sacc);
        zero_if_tail(wg);
      }
    }

    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    // Warp 0 of each warpgroup: cache rows of the boxes of blocks j, j + 1 (lanes 0-7, 8-15).
    auto rows_of_pair = [&](int j) {
      const int jj = j + (lane >> 3), box = lane & 7;
      return lane < 16 && box < nbox && jj < n ? box_row(p, bi, blk_begin + jj, box, box_log2, len_eff) : -1;
    };
    // The rows of pair i + 1's blocks (2i + 2, 2i + 3), read at the start of pair i.
    int next_rows = -1;

    // Row max of block j's raw S (rows row0, row0 + 8), scaled to the log2 domain and combined with
    // m_in into the lazy reference (wg::lazy_max). Blocks that every row of the tile sees in full skip the mask (the tile's first row sees
    // the fewest keys); others get -inf past each row's visible length. sacc stays unscaled: the
    // scale is folded into exp2's argument.
    auto row_max = [&](int j, const float (&m_in)[2], float (&m_out)[2]) {
      mask_block(sacc, blk_begin + j, q4, limit, min_limit);
      float mx[2][8];  // pairwise tree: depth 4 instead of a 16-long chain
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        mx[0][c] = fmaxf(sacc[4 * c], sacc[4 * c + 1]);
        mx[1][c] = fmaxf(sacc[4 * c + 2], sacc[4 * c + 3]);
      }
#pragma unroll
      for (int step = 4; step >= 1; step >>= 1) {
#pragma unroll
        for (int c = 0; c < step; ++c) {
          mx[0][c] = fmaxf(mx[0][c], mx[0][c + step]);
          mx[1][c] = fmaxf(mx[1][c], mx[1][c + step]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = fmaxf(mx[h][0], __shfl_xor_sync(0xffffffffu, mx[h][0], 1));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
        m_out[h] = wg::lazy_max(m_in[h], v * p.scale_log2);  // scale_log2 > 0: max commutes with it
      }
    };
    // sacc := exp2(sacc * scale - m_use) (fp32 P); sum += this thread's part of the row sums (the
    // quad's four parts are added once, at the end of the piece); pf := P as bf16 A fragments.
    auto exp_rows = [&](const float (&m_use)[2], float (&sum)[2], uint32_t (&pf)[16]) {
#pragma unroll
      for (int c = 0; c < 8; ++c) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sacc[4 * c + e] = fast_exp2(fmaf(sacc[4 * c + e], p.scale_log2, -m_use[e >> 1]));
          sum[e >> 1] += sacc[4 * c + e];
        }
        pf[2 * c] = pack_bf16(sacc[4 * c], sacc[4 * c + 1]);
        pf[2 * c + 1] = pack_bf16(sacc[4 * c + 2], sacc[4 * c + 3]);
      }
    };

    // ---- warpgroup 0: the even block of each pair ----
    auto wg0_pair = [&]<bool kHasB, bool kNextA, bool kNextB>(int i) {
      const int ja = 2 * i;
      if (warp == 0 && (kNextA || kNextB)) next_rows = rows_of_pair(ja + 2);
      float mA[2];
      row_max(ja, m_run, mA);
      if (q4 == 0) {
        s_maxA[row0] = mA[0];
        s_maxA[row0 + 8] = mA[1];
      }
      named_barrier_arrive(kBarMaxA, kThreads);
      float mAu[2], alpha[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mAu[h] = mA[h] == -INFINITY ? 0.f : mA[h];  // no key seen yet: avoid (-inf) - (-inf)
        alpha[h] = wg::rescale_factor(m_run[h], mA[h]);
        l_run[h] *= alpha[h];
      }
      uint32_t pf[16];
      exp_rows(mAu, l_run, pf);
      wg::rescale_o(o, alpha[0], alpha[1]);
      // O0 += P_A V_A[:, 0:256]
      fence_regs(o);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint32_t a[4] = {pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3]};
        wg::pv_step_rs(a, dVA.at(kk * 2048), o, std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      // Stage 0's rope panel was read only by S_A: refill it first, so that S of block 2i + 2 can start
      // on it while panels 0-3 are in flight.
      if constexpr (kNextA) {
        if (warp == 0) issue_block<kPanelRope>(&tmap_kv, stage0, bars, next_rows, 0, nbox, box_log2, lane);
      }
      float mB[2] = {mA[0], mA[1]}, beta[2] = {1.f, 1.f};
      if constexpr (kHasB) {
        bar_wait(kBarMaxB);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mB[h] = s_maxB[row0 + 8 * h];
          // mA = -inf: P_A, O0 and l are all 0, any finite factor will do.
          beta[h] = mA[h] == -INFINITY ? 0.f : wg::rescale_factor(mA[h], mB[h]);
        }
      }
      // P_A at mB -> the shared tile for warpgroup 1.
      char* sPA = smem + Smem::kPA;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        *reinterpret_cast<uint32_t*>(sPA + swz(row0, c) + q4 * 4) = pack_bf16(sacc[4 * c] * beta[0], sacc[4 * c + 1] * beta[0]);
        *reinterpret_cast<uint32_t*>(sPA + swz(row0 + 8, c) + q4 * 4) =
            pack_bf16(sacc[4 * c + 2] * beta[1], sacc[4 * c + 3] * beta[1]);
      }
      fence_async_smem();
      named_barrier_arrive(kBarPA, kThreads);
      mma_wait_all();
      fence_regs(o);
      // Stage 0's panels 0-3 (read only by this P V) are free.
      if constexpr (kNextA) {
        if (warp == 0) issue_block<kPanelsLow>(&tmap_kv, stage0, bars, next_rows, 0, nbox, box_log2, lane);
      }
      if constexpr (kHasB) {
#pragma unroll
        for (int h = 0; h < 2; ++h) l_run[h] *= beta[h];
        wg::rescale_o(o, beta[0], beta[1]);
        bar_wait(kBarPB);
        // O0 += P_B V_B[:, 0:256], P_B from stage 1's rope panel
        fence_regs(o);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          wg::pv_step_ss(dKB.at(8 * kPanelBytes + kk * 32), dVB.at(kk * 2048), o, std::make_index_sequence<128>{});
        }
        cute::warpgroup_commit_batch();
      }
      if constexpr (kNextA) {  // S of block 2i + 2 over the panels this warpgroup just reloaded
        const uint32_t ph = parity(ja + 2);
        fence_regs(sacc);
        s_panels<true, 8, 0, 1, 2, 3>(dQ, dKA, barsA, ph, sacc, tl_tma);
        cute::warpgroup_commit_batch();
      }
      if constexpr (kHasB) {
        cute::warpgroup_wait<kNextA ? 1 : 0>();
        fence_regs(o);
        // Stage 1's panels 0-3 and its rope panel (P_B) are free.
        if constexpr (kNextB) {
          if (warp == 0) {
            issue_block<kPanelsLow | kPanelRope>(&tmap_kv, stage1, bars + kPanels, next_rows, 8, nbox, box_log2, lane);
          }
        }
      }
      if constexpr (kNextA) {
        const uint32_t ph = parity(ja + 2);
        s_panels<false, 4, 5, 6, 7>(dQ, dKA, barsA, ph, sacc, tl_tma);
        cute::warpgroup_commit_batch();
        mma_wait_all();
        fence_regs(sacc);
        zero_if_tail(ja + 2);
      }
      m_run[0] = mB[0];
      m_run[1] = mB[1];
    };

    // ---- warpgroup 1: the odd block of each pair ----
    auto wg1_pair = [&]<bool kHasB, bool kNextA, bool kNextB>(int i) {
      const int jb = 2 * i + 1;
      if (warp == 0 && (kNextA || kNextB)) next_rows = rows_of_pair(jb + 1);
      bar_wait(kBarMaxA);
      float mA[2] = {s_maxA[row0], s_maxA[row0 + 8]};
      float mB[2] = {mA[0], mA[1]};
      if constexpr (kHasB) {
        row_max(jb, mA, mB);
        if (q4 == 0) {
          s_maxB[row0] = mB[0];
          s_maxB[row0 + 8] = mB[1];
        }
      }
      float mBu[2], gamma[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mBu[h] = mB[h] == -INFINITY ? 0.f : mB[h];
        gamma[h] = wg::rescale_factor(m_run[h], mB[h]);
        l_run[h] *= gamma[h];
      }
      wg::rescale_o(o, gamma[0], gamma[1]);
      if constexpr (kHasB) {
        uint32_t pf[16];
        exp_rows(mBu, l_run, pf);
        // P_B -> stage 1's rope panel (S_B, its only reader, has retired) for warpgroup 0.
        char* sPB = stage1 + 8 * kPanelBytes;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          *reinterpret_cast<uint32_t*>(sPB + swz(row0, c) + q4 * 4) = pf[2 * c];
          *reinterpret_cast<uint32_t*>(sPB + swz(row0 + 8, c) + q4 * 4) = pf[2 * c + 1];
        }
        // mB is signalled only now, after the whole softmax: warpgroup 0's P_A store and TMA issue
        // would otherwise compete with this critical exp for the same schedulers (as FlashMLA orders it).
        named_barrier_arrive(kBarMaxB, kThreads);
        // O1 += P_B V_B[:, 256:512], P_B from registers (its shared-memory copy is fenced below)
        fence_regs(o);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          const uint32_t a[4] = {pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3]};
          wg::pv_step_rs(a, dVB.at(4 * kPanelBytes + kk * 2048), o, std::make_index_sequence<128>{});
        }
        cute::warpgroup_commit_batch();
      }
      bar_wait(kBarPA);
      // O1 += P_A V_A[:, 256:512], P_A (already at mB) from shared memory
      fence_regs(o);
      cute::warpgroup_arrive();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        wg::pv_step_ss(dPA.at(kk * 32), dVA.at(4 * kPanelBytes + kk * 2048), o, std::make_index_sequence<128>{});
      }
      cute::warpgroup_commit_batch();
      // P_B is stored, and this warpgroup's P V are queued ahead of warpgroup 0's P_B V_B: it finishes
      // them first and can refill its panels (FlashMLA orders its two warpgroups' P V the same way).
      if constexpr (kHasB) {
        fence_async_smem();  // the P_B stores, before warpgroup 0's wgmma reads them
        named_barrier_arrive(kBarPB, kThreads);
      }
      if constexpr (kHasB) {
        cute::warpgroup_wait<1>();
        // Stage 1's panels 4-7 are free (warpgroup 0 never reads them after S).
        if constexpr (kNextB) {
          if (warp == 0) issue_block<kPanelsHigh>(&tmap_kv, stage1, bars + kPanels, next_rows, 8, nbox, box_log2, lane);
        }
      }
      mma_wait_all();
      fence_regs(o);
      if constexpr (kNextA) {
        if (warp == 0) issue_block<kPanelsHigh>(&tmap_kv, stage0, bars, next_rows, 0, nbox, box_log2, lane);
      }
      if constexpr (kNextB) {  // S of block 2i + 3: this warpgroup's panels first
        const uint32_t ph = parity(jb + 2);
        fence_regs(sacc);
        s_panels<true, 4, 5, 6, 7, 8, 0, 1, 2, 3>(dQ, dKB, barsB, ph, sacc, tl_tma);
        cute::warpgroup_commit_batch();
        mma_wait_all();
        fence_regs(sacc);
        zero_if_tail(jb + 2);
      }
      m_run[0] = mB[0];
      m_run[1] = mB[1];
    };

    if (wg == 0) {
      run_pairs(wg0_pair, n);
    } else {
      run_pairs(wg1_pair, n);
    }
    base0 += (n + 1) >> 1;
    base1 += n >> 1;

#pragma unroll
    for (int h = 0; h < 2; ++h) {  // the quad's parts of each row sum (see exp_rows)
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
      l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    }
    if (q4 == 0) {
      s_rowsum[wg * kM + row0] = l_run[0];
      s_rowsum[wg * kM + row0 + 8] = l_run[1];
    }
    __syncthreads();  // both row sums visible; every read of Q and the stages done

    wg::write_piece_staged<QT>(p, dest, bi, m_tile, o, [&](int h, int) { return m_run[h]; },
                               [&](int, int r) { return s_rowsum[r] + s_rowsum[kM + r]; }, smem + Smem::kStage0,
                               nullptr, nullptr);  // never launched in cluster pairs
    __syncthreads();  // s_rowsum is rewritten by the next request
  }
  FS_TL(if (tw == 0 && g_mla_timeline != nullptr) {
    unsigned long long* r = g_mla_timeline + ((blockIdx.y * gridDim.x + blockIdx.x) * 2 + wg) * 16;
    r[0] = clock64() - tl_start;
    r[1] = 0;
    for (int pn = 0; pn < kPanels; ++pn) {
      r[1] += tl_tma[pn];
      r[4 + pn] = tl_tma[pn];
    }
    r[2] = tl_bar;
    r[3] = tl_mma;
  })
}

// TMA map of the bf16 cache as rows of 576 values: boxes of min(page_size, 64) rows x 64 values.
// False when the cache cannot be described (row count past int32 coordinates, misaligned base).
bool kv_tensor_map(const DecodeParams& p, CUtensorMap& map);

template <typename QT>
void launch_decode_seesaw(const DecodeParams& p, const CUtensorMap& map, cudaStream_t stream) {
  constexpr int smem = Smem::kTotal;
  auto kernel = mla_decode_seesaw_kernel<QT>;
  opt_in_dynamic_smem<mla_decode_seesaw_kernel<QT>>(smem);
  wg::TileMaps maps;
  wg::make_tile_maps(p, std::is_same_v<QT, __half>, maps);
  const dim3 grid((p.rows + kM - 1) / kM, p.num_sm_parts);
  launch_pdl(kernel, grid, dim3(kThreads), smem, stream, p, map, maps);
  FS_CHECK_LAUNCH();
}

}  // namespace seesaw
}  // namespace flashseek::mla
