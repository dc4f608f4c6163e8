// Paged MLA latent decode, 64-row tiles, bf16 cache: Q in registers, three KV stages, and a P V
// warpgroup that runs one block behind the softmax warpgroup.
//
// Why: at h_q = 128 the 64-row kernels are compute-bound, and the two-warpgroup kernel
// (mla_decode_wgmma.cuh) leaves the tensor pipe idle through every softmax. Hiding the softmax means
// holding a block's stage until late in the next block, and with Q (72 KB) beside two 72 KB stages
// the refills then have too little lead to cover an HBM trip under load (the turn-taking kernel,
// mla_decode_seesaw.cuh, and docs/mla-design.md, sessions 14-15). Here Q's latent part (64 x 512) lives
// in warpgroup 0's registers as the A operand of S (128 registers a thread), which frees room for a
// third stage.
//
// Roles (256 threads, two warpgroups of up to 255 registers):
//   WG0: S(j) = Q K(j)^T (32 wgmma with A from registers over the latent panels, 4 from shared memory
//        over the rope panel), mask, online softmax (lazy reference max, wg::lazy_max), P(j) in bf16
//        into stage j's rope panel (S(j) was its only reader) with the O rescale factor, and
//        O[:, 0:64] += P(j) V(j)[:, 0:64] (P from registers); it issues S(j + 1) right behind that
//        before it signals P(j), so that WG1's P V of block j queues behind S(j + 1) and runs during
//        WG0's next softmax. Registers: Q 128, S 32, P 16, its O slice 32. Its per-block path is the
//        kernel's pace, so nothing else runs on it: it issues only the first three blocks of a piece.
//   WG1: O[:, 64:512] (224 fp32 registers a thread, as m64n256 + m64n192 accumulators): waits for P(j),
//        rescales, eight wgmma with P and V from shared memory, then releases stage j; its warp 0
//        refills the stage with block j + 3 once both warpgroups are done with it (TMA, one box per
//        page and panel, as the turn-taking kernel loads; table entries read an iteration early).
// Per block the tensor pipe sees P V(j)[:, :64] and S(j + 1) (1,280 cycles), then P V(j)[:, 64:] (896)
// during WG0's softmax of block j + 1; a refill has one to two blocks of lead.
//
// Measured (session 19, H100, graph replays of the whole call at s_k = 4096; docs/mla-design.md):
// b=128 h_q=128 238.4 µs with the KV in L2 (two-warpgroup 274.3, turn-taking 236.5) and 263.3 from HBM
// (299.0): the third stage keeps the HBM loss to ~25 µs. The refill first ran on WG0's warp 0; taking it
// off WG0 cut a block from ~4,200 to ~3,500 cycles (290 -> 238 µs in L2). Session 20: with the warpgroup
// index broadcast (warpgroup_index), S's descriptors stay in uniform registers instead of an R2UR before
// each HGMMA, and WG0's P V takes P from registers: 246.2 -> 226.6 µs in L2, 265.8 -> 256.3 from HBM.
// Measured slower and dropped (docs/mla-design.md, session 20): S in 32-key halves, an L2 prefetch
// from WG1, one test of all panel barriers, and P signalled later or earlier than here.
// Dispatch: see mla_decode_wgmma_bf16.cu. Multicast pairs (kMc, mbar_arrive_peer): where the batch
// fills the parts, the two row tiles of a part run as a 2-CTA cluster that loads each key block once for
// both (multicast_pairs).
//
// Shared memory: stage 0 | stage 1 | stage 2 (73,728 B each, 9 panels of [64 rows][128 B], 128B
// swizzle) | Q's rope panel | row vectors | mbarriers. Each piece's Q lands by TMA in the stage that
// block 2 will use (its latent panels) and the Q rope slot; WG0 reads its fragments and block 2's
// load follows. Blocks are numbered per CTA across pieces: block g uses stage g % 3 with phase
// parity (g / 3) & 1 on every mbarrier of that stage (panel full, P ready, stage empty).
#pragma once
#include <cuda.h>

#include <cstdlib>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>

#include "mla/mla_decode_seesaw.cuh"

namespace flashseek::mla {
namespace qreg {

using detail::fast_exp2;
using detail::pack_bf16;
using detail::smem_u32;
using wg::fence_async_smem;
using wg::fence_regs;
using wg::kM;
using wg::kPanelBytes;
using wg::kPanels;
using wg::kTileBytes;
using wg::swz;
using wg::WgmmaDesc;
using wg::wgmma_desc_sw128_tile;
namespace gmma = wg::gmma;

constexpr int kThreads = 256;
constexpr int kStages = 3;
constexpr int kCols0 = 64;                 // WG0's output columns; WG1 owns the rest
constexpr int kColsA = 256, kColsB = 192;  // WG1's two accumulators: columns 64-319 and 320-511

struct Smem {
  static constexpr int kStage0 = 0;                             // stage s at s * kTileBytes
  static constexpr int kQRope = kStages * kTileBytes;           // Q's rope panel (64 x 64)
  static constexpr int kAlpha = kQRope + kPanelBytes;           // [stage][64] O rescale factor of its block
  static constexpr int kLRun = kAlpha + kStages * kM * 4;       // [64] final row sum
  static constexpr int kMRun = kLRun + kM * 4;                  // [64] final reference max (log2 domain)
  static constexpr int kBarFull = kMRun + kM * 4;               // [stage][panel] TMA landed
  static constexpr int kBarP = kBarFull + kStages * kPanels * 8;  // [stage] P and its factors stored
  static constexpr int kBarEmpty = kBarP + kStages * 8;           // [stage] every reader done
  static constexpr int kBarQ = kBarEmpty + kStages * 8;           // the Q tile's TMA
  static constexpr int kBarPeerQ = kBarQ + 8;  // multicast pairs only (kMc): the peer read its Q out of block 2's stage
  static constexpr int kTotal = kBarPeerQ + 8;
};
static_assert(Smem::kTotal <= 232448, "shared memory exceeds the sm_90 per-block limit");
static_assert(kM * wg::kStagedRowBytes <= kTileBytes, "the staged output rows must stay in stage 0");

// Named barriers of warpgroup 0 (128 threads).
constexpr int kBarQRead = 1;    // Q's fragments read out of block 2's stage, an fp16 rope converted
constexpr int kBarZeroed = 2;   // a tail block's V rows zeroed by every warp, before this warpgroup's P V

using MmaQKrs = gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::K>;
// Warpgroup 0's P V over its 64 columns, P from registers.
template <size_t... I>
__device__ __forceinline__ void pv64_step_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[32], std::index_sequence<I...>) {
  gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>::fma(a[0], a[1], a[2], a[3], db, d[I]...,
                                                                           gmma::ScaleOut::One);
}
template <size_t... I>
__device__ __forceinline__ void qk_step_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[32], gmma::ScaleOut sc,
                                           std::index_sequence<I...>) {
  MmaQKrs::fma(a[0], a[1], a[2], a[3], db, d[I]..., sc);
}
// P V over N output columns (P: 64 x 16 keys, K-major; V: MN-major), both from shared memory.
template <int N> struct PvMma;
template <> struct PvMma<192> { using T = gmma::MMA_64x192x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>; };
template <> struct PvMma<256> { using T = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>; };
template <int N, size_t... I>
__device__ __forceinline__ void pv_step(uint64_t da, uint64_t db, float (&d)[N / 2], std::index_sequence<I...>) {
  PvMma<N>::T::fma(da, db, d[I]..., gmma::ScaleOut::One);
}
// O slice (N columns, rows row0 / row0 + 8) times the rows' factors; skipped when the whole warp keeps
// its reference max (see wg::rescale_o).
template <int N>
__device__ __forceinline__ void rescale_cols(float (&o)[N], float f0, float f1) {
  if (!__any_sync(0xffffffffu, f0 != 1.f || f1 != 1.f)) return;
#pragma unroll
  for (int j = 0; j < N / 4; ++j) {
    o[4 * j + 0] *= f0;
    o[4 * j + 1] *= f0;
    o[4 * j + 2] *= f1;
    o[4 * j + 3] *= f1;
  }
}

// S = Q K^T of one block: the latent panels with Q from registers, then the rope panel with Q from
// shared memory, each panel once its TMA landed (the wgmma fence after each wait: see seesaw::s_panel).
// One wait for the whole block (one mbarrier a stage) measured slower: 300.8 against 290.7 µs at
// b=128 h_q=128 with the KV in L2 (session 19, run 4; ptxas then spilled in the loop).
__device__ __forceinline__ void s_block(const uint32_t (&qf)[32][4], WgmmaDesc dQr, WgmmaDesc dK, uint32_t bars,
                                        uint32_t parity, float (&sacc)[32]) {
#pragma unroll
  for (int pn = 0; pn < kPanels - 1; ++pn) {
    mbar_wait(bars + 8 * pn, parity);
    cute::warpgroup_arrive();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      qk_step_rs(qf[4 * pn + kk], dK.at(pn * kPanelBytes + kk * 32), sacc,
                 pn == 0 && kk == 0 ? gmma::ScaleOut::Zero : gmma::ScaleOut::One, std::make_index_sequence<32>{});
    }
  }
  mbar_wait(bars + 8 * (kPanels - 1), parity);
  cute::warpgroup_arrive();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    wg::qk_step(dQr.at(kk * 32), dK.at((kPanels - 1) * kPanelBytes + kk * 32), sacc, gmma::ScaleOut::One,
                std::make_index_sequence<32>{});
  }
}

// half2 -> bf16x2 (q in fp16; bf16 passes through).
template <typename QT>
__device__ __forceinline__ uint32_t frag_to_bf16(uint32_t v) {
  if constexpr (std::is_same_v<QT, __half>) {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&v));
    return pack_bf16(f.x, f.y);
  } else {
    return v;
  }
}

// Multicast pairs (kMc): the two row tiles of one part run as a 2-CTA cluster and read the same key
// blocks, so each CTA loads half of a block's panels into both CTAs' stages with one multicast TMA
// (seesaw::issue_block): the L2 serves each block once per pair instead of once per row tile. Every warp
// of both CTAs releases a stage on both CTAs' "empty" barriers, so a refill waits for one local barrier as
// before; block 2 of a piece waits until the peer read its Q out of that stage (kBarPeerQ), and a new
// piece starts behind a cluster barrier (its first blocks land in stages the peer's previous piece used,
// and stage 0 held its staged output rows). mbar_arrive_peer: an arrive on the peer CTA's copy of the
// mbarrier at local address `bar` (the default release semantics, as CUTLASS's multicast pipelines: with
// .release.cluster every warp's release cost 16% at b=128, docs/performance.md, session 23, run 2).
__device__ __forceinline__ void mbar_arrive_peer(uint32_t bar, uint32_t peer) {
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(wg::peer_smem(bar, peer)) : "memory");
}

// An fp16 Q's rope panel -> bf16 in place, by warpgroup 0 (elementwise: the swizzled positions stay).
template <typename QT>
__device__ __forceinline__ void q_rope_to_bf16(char* rope, int tw) {
  if constexpr (std::is_same_v<QT, __half>) {
#pragma unroll
    for (int i = 0; i < kPanelBytes / 16 / 128; ++i) {
      uint4* c = reinterpret_cast<uint4*>(rope) + tw + i * 128;
      *c = detail::q_to_bf16<QT>(*c);
    }
  }
}

// A P V accumulator slice of N columns, times the rows' 1 / l, into the staged rows (row0 at `tile`,
// row0 + 8 at tile + 8 rows), in q's dtype.
template <typename QT, int N>
__device__ __forceinline__ void stage_scaled(float (&o)[N / 2], const float (&inv)[2], char* tile) {
#pragma unroll
  for (int j = 0; j < N / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[4 * j + e] *= inv[e >> 1];
    detail::store_pair<QT>(reinterpret_cast<QT*>(tile) + 8 * j, o[4 * j], o[4 * j + 1]);
    detail::store_pair<QT>(reinterpret_cast<QT*>(tile + 8 * wg::kStagedRowBytes) + 8 * j, o[4 * j + 2], o[4 * j + 3]);
  }
}

// Runs step<true>(j) for every block but the last and step<false> for the last one: the S of the next
// block is a wgmma batch, which must not sit under a run-time condition (ptxas would serialise every
// wgmma of the kernel; see seesaw::run_pairs).
template <typename Step>
__device__ __forceinline__ void run_blocks(Step& step, int n) {
  for (int j = 0; j + 1 < n; ++j) step.template operator()<true>(j);
  if (n > 0) step.template operator()<false>(n - 1);
}

// A request's piece of this CTA's part, and where its blocks go: block j is the CTA's block gblk + j,
// in stage (gblk + j) % 3 with phase parity ((gblk + j) / 3) & 1 on every mbarrier of that stage.
struct Piece {
  int len, len_eff, blk_begin, n, bi, gblk;
  wg::PieceDest dest;
  __device__ __forceinline__ Piece(const DecodeParams& p, const detail::PlanPart& plan, int bi_, int gblk_)
      : bi(bi_), gblk(gblk_) {
    plan.piece(p, bi, len, len_eff, blk_begin, n);
    dest = wg::piece_dest(p, plan, bi);
  }
  __device__ __forceinline__ int stage(int j) const { return (gblk + j) % kStages; }
  __device__ __forceinline__ uint32_t parity(int j) const { return static_cast<uint32_t>(((gblk + j) / kStages) & 1); }
  // Cache row of box `box` of block j (-1 past the sequence or past the piece).
  __device__ __forceinline__ int rows(const DecodeParams& p, int nbox, int box_log2, int j, int box) const {
    return box < nbox && j < n ? seesaw::box_row(p, bi, blk_begin + j, box, box_log2, len_eff) : -1;
  }
};

template <typename QT, bool kMc>
__global__ void __launch_bounds__(kThreads, 1)
    mla_decode_qreg_kernel(const __grid_constant__ DecodeParams p, const __grid_constant__ CUtensorMap tmap_kv,
                           const __grid_constant__ wg::TileMaps maps) {
  // The combine kernel (programmatic dependent) waits for this whole grid before reading partials.
  pdl_launch_dependents();
  char* smem = wg::swizzle_aligned_smem();
  const uint32_t s_base = smem_u32(smem);
  float* s_alpha = reinterpret_cast<float*>(smem + Smem::kAlpha);
  float* s_lrun = reinterpret_cast<float*>(smem + Smem::kLRun);
  float* s_mrun = reinterpret_cast<float*>(smem + Smem::kMRun);
  uint64_t* bar_full = reinterpret_cast<uint64_t*>(smem + Smem::kBarFull);
  uint64_t* bar_q = reinterpret_cast<uint64_t*>(smem + Smem::kBarQ);
  const uint32_t bar_full_u = s_base + Smem::kBarFull, bar_p_u = s_base + Smem::kBarP;
  const uint32_t bar_empty_u = s_base + Smem::kBarEmpty, bar_q_u = s_base + Smem::kBarQ;
  const uint32_t bar_peer_q_u = s_base + Smem::kBarPeerQ;

  const int m_tile = blockIdx.x, part = blockIdx.y;
  const int wg = warpgroup_index(), tw = threadIdx.x & 127;
  const int warp = tw >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q4 = lane & 3;
  const int row0 = warp * 16 + g;  // this thread's accumulator rows: row0 and row0 + 8
  const int box_log2 = min(p.page_size_log2, 6);
  const int nbox = kBlockN >> box_log2;
  const int rank = kMc ? m_tile & 1 : 0;  // the cluster is (2, 1, 1): rank = m_tile % 2
  // This thread (kMc: its warp, on both CTAs' barriers) is done with stage st.
  auto release_stage = [&](int st) {
    if constexpr (kMc) {
      __syncwarp();
      if (lane == 0) {
        mbar_arrive(bar_empty_u + 8 * st);
        mbar_arrive_peer(bar_empty_u + 8 * st, rank ^ 1);
      }
    } else {
      mbar_arrive(bar_empty_u + 8 * st);
    }
  };
  // All nine panels of one block into stage st: box b's cache row in lane lane0 + b of `rows` (one warp);
  // kMc: this CTA's half of them, into both CTAs.
  auto issue_block = [&](int rows, int lane0, int st) {
    seesaw::issue_block<seesaw::kPanelsAll, kMc>(&tmap_kv, smem + st * kTileBytes, bar_full + st * kPanels, rows, lane0,
                                                 nbox, box_log2, lane, rank);
  };

  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages * kPanels; ++i) cutlass::arch::ClusterTransactionBarrier::init(bar_full + i, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_p_u + 8 * s, 128);
      // Every thread after its own wgmma reading the stage retired; kMc: every warp of both CTAs.
      mbar_init(bar_empty_u + 8 * s, kMc ? 2 * kThreads / 32 : kThreads);
    }
    cutlass::arch::ClusterTransactionBarrier::init(bar_q, 1);
    if constexpr (kMc) mbar_init(bar_peer_q_u, 1);
    cutlass::arch::fence_barrier_init();
    cute::prefetch_tma_descriptor(&tmap_kv);
    cute::prefetch_tma_descriptor(&maps.q);
  }
  __syncthreads();

  auto stage_off = [](int s) { return s * kTileBytes; };
  uint32_t q_parity = 0;
  int gblk = 0;  // blocks this CTA has run before the current piece

  // The plan may be read before the wait (detail::PlanPart). Launched as a programmatic dependent
  // (launch_pdl): nothing else written by an earlier kernel (q, the block table, the cache, the
  // workspace the previous combine may still read) is touched before this.
  const detail::PlanPart plan(p, part);
  plan.warm(p);
  if (plan.empty()) return;  // before the wait (PlanPart::empty); kMc: both CTAs of a pair share the part
  if constexpr (kMc) cute::cluster_sync();  // the peer's barriers are initialised before any remote arrive or copy
  pdl_wait();
  if (wg == 0) {
    uint32_t peer_q_parity = 0;
    for (int bi = plan.b0; bi <= plan.b1; ++bi) {
      if constexpr (kMc) {
        if (bi > plan.b0) cluster_barrier_sync();  // both CTAs are done with the previous piece
      }
      const Piece pc(p, plan, bi, gblk);
      const int len = pc.len, len_eff = pc.len_eff, blk_begin = pc.blk_begin, n = pc.n;
      const wg::PieceDest& dest = pc.dest;
      // ---- softmax warpgroup ----
      const int limit[2] = {detail::visible_keys(p, m_tile * kM + row0, len, len_eff),
                            detail::visible_keys(p, m_tile * kM + row0 + 8, len, len_eff)};
      const int min_limit = detail::visible_keys(p, m_tile * kM, len, len_eff);  // the tile's first row
      float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
      float o0[kCols0 / 2];
#pragma unroll
      for (int i = 0; i < kCols0 / 2; ++i) o0[i] = 0.f;
      uint32_t qf[32][4];
      // Zeroed so that no path reaches a wgmma with sacc undefined (see seesaw).
      float sacc[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) sacc[i] = 0.f;
      const WgmmaDesc dQr = wgmma_desc_sw128_tile(s_base + Smem::kQRope, 16, 1024);
      if (n > 0) {
        if (threadIdx.x == 0) {  // Q: latent panels into block 2's stage, rope panel into its slot
          wg::issue_q_panels(maps, p, bi, m_tile, smem + stage_off(pc.stage(2)), smem + Smem::kQRope, bar_q);
        }
        if (warp == 0) {  // blocks 0 and 1 at once (lanes 0-7 / 8-15 hold their boxes' rows)
          const int rows = lane < 16 ? pc.rows(p, nbox, box_log2, lane >> 3, lane & 7) : -1;
          issue_block(rows, 0, pc.stage(0));
          if (n > 1) issue_block(rows, 8, pc.stage(1));
        }
        const int rows2 = warp == 0 ? pc.rows(p, nbox, box_log2, 2, lane) : -1;
        mbar_wait(bar_q_u, q_parity);
        q_parity ^= 1;
        const char* qs = smem + stage_off(pc.stage(2));
#pragma unroll
        for (int kk = 0; kk < 32; ++kk) {
          const char* panel = qs + (kk >> 2) * kPanelBytes;
          const int c0 = 2 * (kk & 3);
          qf[kk][0] = frag_to_bf16<QT>(*reinterpret_cast<const uint32_t*>(panel + swz(row0, c0) + q4 * 4));
          qf[kk][1] = frag_to_bf16<QT>(*reinterpret_cast<const uint32_t*>(panel + swz(row0 + 8, c0) + q4 * 4));
          qf[kk][2] = frag_to_bf16<QT>(*reinterpret_cast<const uint32_t*>(panel + swz(row0, c0 + 1) + q4 * 4));
          qf[kk][3] = frag_to_bf16<QT>(*reinterpret_cast<const uint32_t*>(panel + swz(row0 + 8, c0 + 1) + q4 * 4));
        }
        q_rope_to_bf16<QT>(smem + Smem::kQRope, tw);
        fence_async_smem();  // the reads above before block 2's TMA; an fp16 rope's rewrite before S
        warpgroup_barrier_sync(kBarQRead);  // every warp has its fragments (and its part of the rope converted)
        if constexpr (kMc) {
          if (tw == 0) mbar_arrive_peer(bar_peer_q_u, rank ^ 1);  // the peer may now load block 2 into this stage
          if (warp == 0 && n > 2) mbar_wait(bar_peer_q_u, peer_q_parity);
          peer_q_parity ^= 1;
        }
        if (warp == 0 && n > 2) issue_block(rows2, 0, pc.stage(2));
        fence_regs(sacc);
        s_block(qf, dQr, wgmma_desc_sw128_tile(s_base + stage_off(pc.stage(0)), 16, 1024),
                bar_full_u + 8 * kPanels * pc.stage(0), pc.parity(0), sacc);
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();  // every batch retires in the region that issued it (see s_block)
        fence_regs(sacc);
      }
      auto step = [&]<bool kNext>(int j) {
        const int st = pc.stage(j);
        char* stage = smem + stage_off(st);
        const int blk = blk_begin + j;
        const int valid = len_eff - blk * kBlockN;
        if (valid < kBlockN) seesaw::zero_tail_rows(stage, max(valid, 0), tw);  // 0 * NaN would poison O
        // Row max of raw S (masked only in blocks some row does not see in full), lazy reference.
        seesaw::mask_block(sacc, blk, q4, limit, min_limit);
        float mx[2][2];  // two chains a row: few registers beside Q's fragments
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          mx[0][c] = fmaxf(sacc[4 * c], sacc[4 * c + 1]);
          mx[1][c] = fmaxf(sacc[4 * c + 2], sacc[4 * c + 3]);
        }
#pragma unroll
        for (int c = 2; c < 8; ++c) {
          mx[0][c & 1] = fmaxf(mx[0][c & 1], fmaxf(sacc[4 * c], sacc[4 * c + 1]));
          mx[1][c & 1] = fmaxf(mx[1][c & 1], fmaxf(sacc[4 * c + 2], sacc[4 * c + 3]));
        }
        float m_use[2], alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v = fmaxf(mx[h][0], mx[h][1]);
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
          v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
          const float m_new = wg::lazy_max(m_run[h], v * p.scale_log2);  // scale_log2 > 0: max commutes
          m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: avoid (-inf) - (-inf)
          alpha[h] = wg::rescale_factor(m_run[h], m_new);
          m_run[h] = m_new;
          l_run[h] *= alpha[h];
        }
        // P = exp2(S * scale - m) in bf16 over the rope panel; this thread's part of the row sums (the
        // quad's parts are added once, at the end of the piece).
        char* sP = stage + (kPanels - 1) * kPanelBytes;
        uint32_t pf[16];
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          float pv[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            pv[e] = fast_exp2(fmaf(sacc[4 * c + e], p.scale_log2, -m_use[e >> 1]));
            l_run[e >> 1] += pv[e];
          }
          pf[2 * c] = pack_bf16(pv[0], pv[1]);
          pf[2 * c + 1] = pack_bf16(pv[2], pv[3]);
          *reinterpret_cast<uint32_t*>(sP + swz(row0, c) + q4 * 4) = pf[2 * c];
          *reinterpret_cast<uint32_t*>(sP + swz(row0 + 8, c) + q4 * 4) = pf[2 * c + 1];
        }
        if (q4 == 0) {
          s_alpha[st * kM + row0] = alpha[0];
          s_alpha[st * kM + row0 + 8] = alpha[1];
        }
        rescale_cols(o0, alpha[0], alpha[1]);
        fence_async_smem();  // P (and zeroed tail rows) before any wgmma reads them
        // This warpgroup's P V takes P from registers (the S accumulator layout is the A fragment
        // layout), so only a tail block, whose V rows every warp zeroed in part, needs a barrier first.
        // Against P from shared memory behind a barrier every block: 226.6 against 228.8 µs at b=128
        // h_q=128 with the KV in L2, 256.3 against 260.3 from HBM (session 20, run 1).
        if (valid < kBlockN) warpgroup_barrier_sync(kBarZeroed);
        // O[:, 0:64] += P V[:, 0:64], then S of the next block.
        const uint32_t sb = s_base + stage_off(st);
        const WgmmaDesc dV = wgmma_desc_sw128_tile(sb, kPanelBytes, 1024);
        fence_regs(o0);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          const uint32_t a[4] = {pf[4 * kk], pf[4 * kk + 1], pf[4 * kk + 2], pf[4 * kk + 3]};
          pv64_step_rs(a, dV.at(kk * 2048), o0, std::make_index_sequence<kCols0 / 2>{});
        }
        if constexpr (kNext) {
          const int sn = pc.stage(j + 1);
          fence_regs(sacc);
          s_block(qf, dQr, wgmma_desc_sw128_tile(s_base + stage_off(sn), 16, 1024), bar_full_u + 8 * kPanels * sn,
                  pc.parity(j + 1), sacc);
        }
        cute::warpgroup_commit_batch();
        mbar_arrive(bar_p_u + 8 * st);
        // Block j - 1's stage, once warpgroup 1's P V of it retired (it ran during this softmax), takes
        // block j + 2. The tensor pipe has S(j + 1) queued meanwhile.

        // S(j + 1) (and this P V) retire here, not across the loop's back edge: a wgmma batch in flight
        // across a branch or a loop iteration makes ptxas serialise every wgmma (C7518).
        cute::warpgroup_wait<0>();
        fence_regs(sacc);
        fence_regs(o0);
        release_stage(st);  // this warpgroup is done with stage j
      };
      run_blocks(step, n);
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // the quad's parts of each row sum
        l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
        l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
      }
      if (q4 == 0) {
        s_lrun[row0] = l_run[0];
        s_lrun[row0 + 8] = l_run[1];
        s_mrun[row0] = m_run[0];
        s_mrun[row0 + 8] = m_run[1];
      }
      // The one CTA barrier of this kernel that the two branches reach from their own instructions
      // (WG1's twin is below) and that keeps its aligned form: the non-aligned one (cta_barrier_sync)
      // pushed the register-bound kernel to a spill and cost 2.5% at s_q = 2 and ~4% at b = 16 (H200,
      // session 27, run 6), and an mbarrier in its place spilled too. Every warp reaches it whole and
      // converged, which is what the hardware counts; compute-sanitizer synccheck reports the pair as
      // "divergent thread(s) in block" (docs/mla-design.md, session 27).
      __syncthreads();  // row statistics visible; every wgmma of the piece retired
      if (dest.ok) {
        wg::stage_piece_rows<QT, kCols0>(p, dest, bi, m_tile, o0, 0, [&](int h, int) { return m_run[h]; },
                                         [&](int, int r) { return s_lrun[r]; }, smem + Smem::kStage0);
        wg::copy_piece_rows<QT, kThreads>(p, dest, bi, m_tile, smem + Smem::kStage0, s_mrun, s_lrun);
      }
      gblk += n;
    }
  } else {
    for (int bi = plan.b0; bi <= plan.b1; ++bi) {
      if constexpr (kMc) {
        if (bi > plan.b0) cluster_barrier_sync();
      }
      const Piece pc(p, plan, bi, gblk);
      const int len_eff = pc.len_eff, blk_begin = pc.blk_begin, n = pc.n;
      const wg::PieceDest& dest = pc.dest;
      // ---- P V warpgroup: output columns 64-511 ----
      float oa[kColsA / 2], ob[kColsB / 2];
#pragma unroll
      for (int i = 0; i < kColsA / 2; ++i) oa[i] = 0.f;
#pragma unroll
      for (int i = 0; i < kColsB / 2; ++i) ob[i] = 0.f;
      // Warp 0, lane b: the table entry of box b of block j + 3 during iteration j.
      int next_page = warp == 0 && lane < nbox && 3 < n ? seesaw::box_page(p, bi, blk_begin + 3, lane, box_log2, len_eff) : 0;
      for (int j = 0; j < n; ++j) {
        const int st = pc.stage(j);
        const uint32_t ph = pc.parity(j);
        mbar_wait(bar_p_u + 8 * st, ph);
        const float f0 = s_alpha[st * kM + row0], f1 = s_alpha[st * kM + row0 + 8];
        rescale_cols(oa, f0, f1);
        rescale_cols(ob, f0, f1);
        const uint32_t sb = s_base + stage_off(st);
        const WgmmaDesc dP = wgmma_desc_sw128_tile(sb + (kPanels - 1) * kPanelBytes, 16, 1024);
        const WgmmaDesc dV = wgmma_desc_sw128_tile(sb + kCols0 / 64 * kPanelBytes, kPanelBytes, 1024);
        fence_regs(oa);
        fence_regs(ob);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          pv_step<kColsA>(dP.at(kk * 32), dV.at(kk * 2048), oa, std::make_index_sequence<kColsA / 2>{});
          pv_step<kColsB>(dP.at(kk * 32), dV.at(kColsA / 64 * kPanelBytes + kk * 2048), ob, std::make_index_sequence<kColsB / 2>{});
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_regs(oa);
        fence_regs(ob);
        release_stage(st);
        // Warp 0 refills the stage with block j + 3 once warpgroup 0 is done with it too (its P V of block
        // j retired at the end of its step j, long before). The refill stays off warpgroup 0, whose serial
        // path sets the pace; the table entries were loaded an iteration ago (next_page).
        if (warp == 0) {
          if (j + 3 < n) {
            const int rows = lane < nbox ? seesaw::box_row_from(p, next_page, blk_begin + j + 3, lane, box_log2, len_eff) : -1;
            mbar_wait(bar_empty_u + 8 * st, ph);  // kMc: the peer's readers too (this refill lands in both)
            issue_block(rows, 0, st);
          }
          next_page = lane < nbox && j + 4 < n ? seesaw::box_page(p, bi, blk_begin + j + 4, lane, box_log2, len_eff) : 0;
        }
      }
      // The last kStages blocks' stage releases have no refill to wait for them; waiting here anyway leaves
      // no completed mbarrier phase unobserved (synccheck reports one as "missing wait" once the next piece
      // arrives on that barrier). The CTA barrier below would order the stages' reuse without it.
      if (warp == 0) {
        for (int j = max(n - kStages, 0); j < n; ++j) mbar_wait(bar_empty_u + 8 * pc.stage(j), pc.parity(j));
      }
      __syncthreads();  // WG0's row statistics visible (aligned: see warpgroup 0's twin)
      if (dest.ok) {
        // WG0 writes the lse. Here: scale in place, then store, so that no second copy of the
        // accumulators is ever live.
        float inv[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float lsum = s_lrun[row0 + 8 * h];
          inv[h] = lsum > 0.f ? 1.f / lsum : 0.f;
        }
        char* tile = smem + Smem::kStage0 + row0 * wg::kStagedRowBytes + (kCols0 + 2 * q4) * 2;
        stage_scaled<QT, kColsA>(oa, inv, tile);
        stage_scaled<QT, kColsB>(ob, inv, tile + kColsA * 2);
        wg::copy_piece_rows<QT, kThreads>(p, dest, bi, m_tile, smem + Smem::kStage0, s_mrun, s_lrun);
      }
      gblk += n;
    }
  }
  // No CTA of a pair leaves while the peer's multicast copies into it or its arrives may be in flight.
  if constexpr (kMc) cute::cluster_sync();
}

// Whether the row tiles run as multicast pairs (kMc): they must pair up, and the parts' 2-CTA clusters
// along the keys (cluster pairs, DecodeParams::cluster_pairs) take precedence. By default only where the
// batch fills the parts (batch >= num_sm_parts: long pieces, about one whole request or more a part).
// Same-run graph replays, session 23 (docs/mla-design.md): b=128 h_q=128 250.2 -> 247.5 µs, varlen
// 285.5 -> 279.7, KV in L2 223.9 -> 216.5; b=64 a tie; b=16 +1.2 and b=8 +4.1 µs (the cluster launch,
// the barriers at piece starts and ends, the peer's Q read before block 2). Sustained at the 700 W cap,
// where the L2 bytes saved turn into clock: +6.3% at b=128 h_q=128, +4.4% at s_q = 2 causal.
// FLASHSEEK_MLA_MULTICAST=0 / =1, read on every call, forces it off / on (where the tiles pair up), for
// tests and A/B runs.
inline bool multicast_pairs(const DecodeParams& p, int m_tiles) {
  if (m_tiles % 2 != 0 || p.cluster_pairs) return false;
  const char* forced = std::getenv("FLASHSEEK_MLA_MULTICAST");
  if (forced != nullptr && (forced[0] == '0' || forced[0] == '1') && forced[1] == '\0') return forced[0] == '1';
  return p.batch >= p.num_sm_parts;
}

// TMA map of the bf16 cache (seesaw::kv_tensor_map) and the Q tile map (wg::make_tile_maps): false when
// either cannot be built; the caller then runs another kernel.
template <typename QT>
bool launch_decode_qreg(const DecodeParams& p, const CUtensorMap& map, cudaStream_t stream) {
  wg::TileMaps maps;
  wg::make_tile_maps(p, std::is_same_v<QT, __half>, maps);
  if (!maps.q_tma) return false;
  constexpr int smem = Smem::kTotal;
  opt_in_dynamic_smem<mla_decode_qreg_kernel<QT, false>>(smem);
  opt_in_dynamic_smem<mla_decode_qreg_kernel<QT, true>>(smem);
  const dim3 grid((p.rows + kM - 1) / kM, p.num_sm_parts);
  if (p.cluster_pairs) {
    launch_pdl_clusters(mla_decode_qreg_kernel<QT, false>, grid, dim3(kThreads), smem, stream, dim3(1, 2, 1), p, map, maps);
  } else if (multicast_pairs(p, static_cast<int>(grid.x))) {
    launch_pdl_clusters(mla_decode_qreg_kernel<QT, true>, grid, dim3(kThreads), smem, stream, dim3(2, 1, 1), p, map, maps);
  } else {
    launch_pdl(mla_decode_qreg_kernel<QT, false>, grid, dim3(kThreads), smem, stream, p, map, maps);
  }
  FS_CHECK_LAUNCH();
  return true;
}

}  // namespace qreg
}  // namespace flashseek::mla
