// Hand-written Hopper FP8 block-scaled GEMM (1x128 activation scales, 128x128 weight scales,
// fp32 promotion per 128-deep K block, bf16 out), one kernel for dense, contiguous-grouped and
// masked-grouped problems.
//
// Status: opt-in (FLASHSEEK_GEMM_IMPL=sm90). Correct on the whole GPU test sweep; it measures
// 0.91-1.12x of the CUTLASS block-wise kernels that run by default, depending on shape, and the same
// within ±4% inside fused_moe. docs/gemm-design.md has the measurements, what each experiment ruled
// out, and the next steps. It exists as the base for a
// DeepGEMM-class kernel: no JIT, one mechanism for dense / contiguous / masked, no scale repacking.
//
// Structure (384 threads, one CTA per SM, persistent, 128 x 128 tiles):
//   warpgroup 0  producer: one thread issues the TMA loads of A (128 x 128 B), B (128 x 128 B) and
//                the activation scales of each K block into a ring of STAGES stages;
//   warpgroups 1-2  math: rows [64 w, 64 w + 64) of the tile. Two accumulator sets alternate over
//                the tile's K blocks: the 4 wgmma m64n128k32 of block kb + 1 are issued, then
//                block kb's stage is released and kb promoted (final += acc * a_scale[row] *
//                b_scale); the next stage's full barrier is probed before the promotion. Epilogue: bf16 into a shared staging tile, written out by a storer warp
//                of warpgroup 0 (16-byte stores masked to the group's rows and to N) while the math
//                warpgroups start the next tile.
// Clusters of CLUSTER_N (1 or 2) CTAs take neighbouring n blocks of the same rows: each CTA loads
// 128 / CLUSTER_N rows of the A tile and multicasts them to both, so A's L2->SM traffic halves
// (32 -> 24.5 KB per 4.2 MFLOP; measured +4%). A stage is refilled only when the consumers of every
// CTA of the cluster have released it.
// Groups: group g owns rows [begin(g), end(g)) of A and out and multiplies weights b[g]. Dense is
// one group [0, M). Every CTA builds the prefix of 128-row blocks per group in shared memory and
// walks the same linearised (m block, n block) tile order in bands of `band` m blocks, so that the
// ~132 tiles in flight share A and B panels in L2.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "common/named_barrier.cuh"
#include "common/smem_sm90.cuh"
#include "common/wgmma_sm90.cuh"

namespace flashseek::sm90gemm {

constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 128;
constexpr int kThreads = 384;
constexpr int kMaxGroups = 1024;
// Named barriers between math warpgroup w and its storer warp (128 + 32 threads): staged tile full /
// staging tile free.
constexpr int kBarDFull = 1;
constexpr int kBarDEmpty = 3;

struct KernelParams {
  const float* b_scale;  // [groups, ceil(n/128), k/128]
  __nv_bfloat16* out;    // rows as A's, leading dimension n
  const int32_t* offsets;   // contiguous: [groups + 1]
  const int32_t* masked_m;  // masked: [groups]
  int num_groups;
  int rows_total;  // rows of the A view (dense M, contiguous M_total, masked groups * m_max)
  int m_max;       // masked
  int n, k;
  int num_n_blocks;
  int band;
};


using MmaOp = cute::SM90::GMMA::MMA_64x128x32_F32E4M3E4M3_SS_TN<>;
constexpr int kAcc = 64;  // fp32 accumulators per thread of a 64 x 128 warpgroup tile

// Shared-memory helpers on 32-bit shared-window addresses (one register each); mbar_wait and
// mbar_arrive come from common/smem_sm90.cuh.
// Non-blocking probe: true once the phase with this parity has completed.
__device__ __forceinline__ bool mbar_test(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar), "r"(cta) : "memory");
}
__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ int lds_s32(uint32_t addr) {
  int v;
  asm volatile("ld.shared.s32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// Rows [begin, end) of group g, with the launcher's clamping rules: contiguous offsets are clipped
// to [0, rows_total] and a decreasing pair is empty; masked counts are clipped to [0, m_max].
__device__ __forceinline__ void group_rows(const KernelParams& p, int g, int& begin, int& end) {
  if (p.offsets != nullptr) {
    begin = min(max(__ldg(p.offsets + g), 0), p.rows_total);
    end = max(min(max(__ldg(p.offsets + g + 1), 0), p.rows_total), begin);
  } else if (p.masked_m != nullptr) {
    begin = g * p.m_max;
    end = begin + min(max(__ldg(p.masked_m + g), 0), p.m_max);
  } else {
    begin = 0;
    end = p.rows_total;
  }
}

template <int STAGES>
struct SmemLayout {
  static constexpr int kABytes = kBlockM * kBlockK;  // 16 KB
  static constexpr int kBBytes = kBlockN * kBlockK;  // 16 KB
  // 132 scales: the TMA box starts at the tile's first row rounded down to 4 (a 16-byte aligned
  // global address, which TMA requires of the innermost coordinate); stages 128-byte aligned.
  static constexpr int kSfaRows = kBlockM + 4;
  static constexpr int kSfaBytes = 640;
  static constexpr int kA = 0;
  static constexpr int kB = kA + STAGES * kABytes;
  static constexpr int kSfa = kB + STAGES * kBBytes;
  static constexpr int kDPitch = kBlockN * 2 + 16;  // bytes per staged output row (bank spread)
  static constexpr int kD = kSfa + STAGES * kSfaBytes;
  static constexpr int kCum = kD + kBlockM * kDPitch;
  static constexpr int kBar = (kCum + (kMaxGroups + 1) * 4 + 7) / 8 * 8;
  static constexpr int kTotal = kBar + 2 * STAGES * 8;
  static constexpr int kDynamic = kTotal + 1024;  // base rounded up to 1024 inside the kernel
  __device__ static uint32_t full(uint32_t base, int s) { return base + kBar + 8 * s; }
  __device__ static uint32_t empty(uint32_t base, int s) { return base + kBar + 8 * (STAGES + s); }
};

__device__ __forceinline__ uint8_t* aligned_smem(uint8_t* raw) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
}

// The tile of cluster rank `rank` in unit t. A unit is one m block x `cluster_n` neighbouring n
// blocks; m blocks are numbered across groups (cum[g] = m blocks of groups < g); units walk bands
// of `band` m blocks, n outer inside a band.
struct Tile {
  int group, row0, row_end, n0;
};
__device__ __forceinline__ Tile locate_tile(const KernelParams& p, uint32_t cum, int t, int cluster_n, int rank) {
  const int total_m = lds_s32(cum + 4 * p.num_groups);
  const int n_units = (p.num_n_blocks + cluster_n - 1) / cluster_n;
  const int per_band = p.band * n_units;
  const int band_idx = t / per_band;
  const int base_m = band_idx * p.band;
  const int band_m = min(p.band, total_m - base_m);
  const int local = t - band_idx * per_band;
  const int m_lin = base_m + local % band_m;
  Tile tile;
  tile.n0 = ((local / band_m) * cluster_n + rank) * kBlockN;
  int lo = 0, hi = p.num_groups - 1;  // last g with cum[g] <= m_lin
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (lds_s32(cum + 4 * mid) <= m_lin) lo = mid; else hi = mid - 1;
  }
  tile.group = lo;
  int begin, end;
  group_rows(p, lo, begin, end);
  tile.row0 = begin + (m_lin - lds_s32(cum + 4 * lo)) * kBlockM;
  tile.row_end = end;
  return tile;
}

__device__ __forceinline__ int total_units(const KernelParams& p, uint32_t cum, int cluster_n) {
  return lds_s32(cum + 4 * p.num_groups) * ((p.num_n_blocks + cluster_n - 1) / cluster_n);
}

// One math warpgroup. Everything is recomputed after setmaxnreg from the kernel parameters and
// shared memory: a value live across it makes ptxas ignore the register split (and cap the math
// warpgroups at the kernel's 168 registers).
template <int STAGES, int CLUSTER_N>
struct MathWarpgroup {
  using L = SmemLayout<STAGES>;
  struct Step {  // one issued K block of a tile
    int t, kb;        // unit, K block
    int n0, row0, row_end, sb_index;  // the tile; sb_index: its weight-scale row in b_scale
    int stage;
    float sa0, sa1;   // a_scale of this thread's two rows
  };

  const KernelParams& p;
  uint32_t base;  // 1024-aligned shared base
  int mw, lane, r_local, num_kb, num_units, num_clusters, rank;
  uint64_t a_desc0, b_desc0;  // wgmma descriptors of this warpgroup's A rows and of B in stage 0
  int stage = 0;
  uint32_t phase = 0;

  __device__ __forceinline__ void locate(Step& s) const {
    const Tile tile = locate_tile(p, base + L::kCum, s.t, CLUSTER_N, rank);
    const int nsb = (p.n + 127) / 128;
    s.n0 = tile.n0;
    s.row0 = tile.row0;
    s.row_end = tile.row_end;
    // A cluster's surplus tile past N (odd n-block count) computes on any valid scales; nothing is stored.
    s.sb_index = (tile.group * nsb + min(tile.n0 / 128, nsb - 1)) * num_kb;
  }

  // Waits for the stage (unless the probe that set `ready` saw this very stage full; the flag is
  // consumed), issues its 4 wgmma into `acc` and reads the activation scales.
  __device__ __forceinline__ void issue(float (&acc)[kAcc], Step& s, bool& ready) {
    s.stage = stage;
    if (!ready) mbar_wait(L::full(base, stage), phase);
    ready = false;
    // The scales' first row sits at row0 % 4 inside the 16-byte aligned TMA box (masked groups start
    // at multiples of 128).
    const int shift = p.masked_m != nullptr ? 0 : (s.row0 & 3);
    const uint32_t sfa = base + L::kSfa + stage * L::kSfaBytes + 4 * (64 * mw + shift + r_local);
    s.sa0 = lds_f32(sfa);
    s.sa1 = lds_f32(sfa + 32);
    // Descriptors of stage 0 plus the stage and K-step offsets (in 16-byte units, below the 14-bit
    // address field's limit): two adds instead of rebuilding each descriptor.
    const uint64_t stage_off = uint64_t(stage) * (L::kABytes >> 4);
    cute::warpgroup_arrive();
#pragma unroll
    for (int ks = 0; ks < kBlockK / 32; ++ks) {
      wgmma_ss<MmaOp>(a_desc0 + stage_off + ks * 2, b_desc0 + stage_off + ks * 2, acc, ks > 0,
                      std::make_index_sequence<kAcc>{});
    }
    cute::warpgroup_commit_batch();
    if (++stage == STAGES) {
      stage = 0;
      phase ^= 1;
    }
  }

  // `s` is complete in `acc`: release its stage and promote it into `fin` (sb: its weight scale).
  __device__ __forceinline__ void retire(const float (&acc)[kAcc], float (&fin)[kAcc], const Step& s,
                                         float sb) const {
    if (lane == 0) {
      const uint32_t bar = L::empty(base, s.stage);
      if constexpr (CLUSTER_N > 1) {
#pragma unroll
        for (int c = 0; c < CLUSTER_N; ++c) mbar_arrive_cluster(bar, c);
      } else {
        mbar_arrive(bar);
      }
    }
    const float s0 = s.sa0 * sb, s1 = s.sa1 * sb;
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
      fin[4 * j + 0] = fmaf(acc[4 * j + 0], s0, fin[4 * j + 0]);
      fin[4 * j + 1] = fmaf(acc[4 * j + 1], s0, fin[4 * j + 1]);
      fin[4 * j + 2] = fmaf(acc[4 * j + 2], s1, fin[4 * j + 2]);
      fin[4 * j + 3] = fmaf(acc[4 * j + 3], s1, fin[4 * j + 3]);
    }
  }

  // This warpgroup's 64 x 128 half goes to its shared staging tile as bf16, and a storer warp of
  // the producer warpgroup writes it out (storer()), so the math warpgroups return to the tensor
  // pipe after 64 shared stores instead of a tile's worth of global stores.
  __device__ __forceinline__ void epilogue(const float (&fin)[kAcc]) const {
    const uint32_t d_tile = base + L::kD + mw * 64 * L::kDPitch;
    named_barrier_sync(kBarDEmpty + mw, 160);  // the storer is done with it
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
      const uint32_t col_bytes = 2 * (8 * j + 2 * (lane % 4));
      const __nv_bfloat162 lo = __floats2bfloat162_rn(fin[4 * j + 0], fin[4 * j + 1]);
      const __nv_bfloat162 hi = __floats2bfloat162_rn(fin[4 * j + 2], fin[4 * j + 3]);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(d_tile + r_local * L::kDPitch + col_bytes),
                   "r"(*reinterpret_cast<const uint32_t*>(&lo)) : "memory");
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(d_tile + (r_local + 8) * L::kDPitch + col_bytes),
                   "r"(*reinterpret_cast<const uint32_t*>(&hi)) : "memory");
    }
    named_barrier_arrive(kBarDFull + mw, 160);
  }

  // One tile. The full barrier of the next K block is probed right after this one's wgmma complete,
  // so the probe's latency hides behind the promotion instead of delaying the next issue.
  __device__ __forceinline__ void finish(const float (&acc)[kAcc], float (&fin)[kAcc], const Step& s, float sb,
                                         bool& ready) {
    ready = mbar_test(L::full(base, stage), phase);
    retire(acc, fin, s, sb);
  }

  // One tile. Two accumulator sets alternate over its K blocks: block kb + 1 is issued before block
  // kb is promoted, so this warpgroup keeps the tensor pipe fed through its own promotion. Every
  // branch around a wgmma depends only on kernel parameters (K), which ptxas sees as warp-uniform.
  // The loop body is the pair of steps written out, (acc -> acc2) then (acc2 -> acc), so that each
  // step names its registers statically (a runtime-indexed pair would live in local memory).
  __device__ __forceinline__ void run_tile(float (&acc)[kAcc], float (&acc2)[kAcc], float (&fin)[kAcc], int t,
                                           bool& ready) {
    Step s;
    s.t = t;
    locate(s);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) fin[i] = 0.f;
    s.kb = 0;
    float sb = __ldg(p.b_scale + s.sb_index);
    issue(acc, s, ready);
    while (true) {
      if (s.kb + 1 == num_kb) {
        cute::warpgroup_wait<0>();
        fence(acc);
        finish(acc, fin, s, sb, ready);
        break;
      }
      Step n = s;
      n.kb = s.kb + 1;
      const float sb_n = __ldg(p.b_scale + s.sb_index + n.kb);
      issue(acc2, n, ready);
      cute::warpgroup_wait<1>();
      fence(acc);
      finish(acc, fin, s, sb, ready);
      s = n;
      sb = sb_n;
      if (s.kb + 1 == num_kb) {
        cute::warpgroup_wait<0>();
        fence(acc2);
        finish(acc2, fin, s, sb, ready);
        break;
      }
      n = s;
      n.kb = s.kb + 1;
      const float sb_n2 = __ldg(p.b_scale + s.sb_index + n.kb);
      issue(acc, n, ready);
      cute::warpgroup_wait<1>();
      fence(acc2);
      finish(acc2, fin, s, sb, ready);
      s = n;
      sb = sb_n2;
    }
    epilogue(fin);
  }

  __device__ __forceinline__ static void fence(float (&acc)[kAcc]) {
#pragma unroll
    for (int i = 0; i < kAcc; ++i) cute::warpgroup_fence_operand(acc[i]);
  }
};

template <int STAGES, int CLUSTER_N>
__device__ __forceinline__ void math_warpgroups(const KernelParams& p, uint8_t* smem_raw) {
  cutlass::arch::warpgroup_reg_alloc<232>();
  const uint32_t base = smem_u32(aligned_smem(smem_raw));
  const int tid = threadIdx.x, wg = warpgroup_index();
  MathWarpgroup<STAGES, CLUSTER_N> m{p, base};
  m.mw = wg - 1;  // math warpgroup: rows [64 mw, 64 mw + 64) of the tile
  m.lane = tid % 32;
  m.r_local = 16 * ((tid % 128) / 32) + m.lane / 4;  // and r_local + 8
  m.num_kb = p.k / kBlockK;
  m.num_clusters = gridDim.x / CLUSTER_N;
  m.num_units = total_units(p, base + SmemLayout<STAGES>::kCum, CLUSTER_N);
  m.rank = CLUSTER_N > 1 ? int(cute::block_rank_in_cluster()) : 0;
  static_assert(SmemLayout<STAGES>::kABytes == SmemLayout<STAGES>::kBBytes, "one stage stride for A and B");
  // K-major operands of 128-byte rows: 8-row core groups 1024 B apart.
  m.a_desc0 = wgmma_desc_sw128(base + SmemLayout<STAGES>::kA + m.mw * 64 * kBlockK, 16, 1024);
  m.b_desc0 = wgmma_desc_sw128(base + SmemLayout<STAGES>::kB, 16, 1024);
  float acc[kAcc], acc2[kAcc], fin[kAcc];
  bool ready = false;
  for (int t = blockIdx.x / CLUSTER_N; t < m.num_units; t += m.num_clusters) m.run_tile(acc, acc2, fin, t, ready);
  // Takes the storer's last "buffer free" signal, so no arrival is left pending on the barrier.
  named_barrier_sync(kBarDEmpty + m.mw, 160);
  if constexpr (CLUSTER_N > 1) cute::cluster_sync();
}

// Storer warp w (warp 1 + w of the producer warpgroup): writes math warpgroup w's staged 64 x 128
// bf16 half of every tile with 16-byte stores, masked to the group's rows and to N.
template <int STAGES, int CLUSTER_N>
__device__ __forceinline__ void storer(const KernelParams& p, uint32_t base, int w) {
  using L = SmemLayout<STAGES>;
  const int lane = threadIdx.x % 32;
  const int rank = CLUSTER_N > 1 ? int(cute::block_rank_in_cluster()) : 0;
  const int num_clusters = gridDim.x / CLUSTER_N;
  const int num_units = total_units(p, base + L::kCum, CLUSTER_N);
  const uint32_t d_tile = base + L::kD + w * 64 * L::kDPitch;
  constexpr int kChunksPerRow = kBlockN / 8;
  named_barrier_arrive(kBarDEmpty + w, 160);  // the tile starts free
  for (int t = blockIdx.x / CLUSTER_N; t < num_units; t += num_clusters) {
    const Tile tile = locate_tile(p, base + L::kCum, t, CLUSTER_N, rank);
    const int row_base = tile.row0 + 64 * w;
    named_barrier_sync(kBarDFull + w, 160);
#pragma unroll 4
    for (int i = lane; i < 64 * kChunksPerRow; i += 32) {
      const int r = i / kChunksPerRow, ch = i % kChunksPerRow;
      const int row = row_base + r, col = tile.n0 + ch * 8;
      if (row < tile.row_end && col < p.n) {
        uint4 v;
        asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "r"(d_tile + r * L::kDPitch + ch * 16));
        *reinterpret_cast<uint4*>(p.out + int64_t(row) * p.n + col) = v;
      }
    }
    named_barrier_arrive(kBarDEmpty + w, 160);
  }
}

// The producer warpgroup: one thread walks the same units as the math warpgroups and keeps the
// stage ring full (recomputing everything after setmaxnreg, like the math warpgroups).
template <int STAGES, int CLUSTER_N>
__device__ __forceinline__ void producer(const CUtensorMap* tmap_a, const CUtensorMap* tmap_b,
                                         const CUtensorMap* tmap_sfa, const KernelParams& p, uint8_t* smem_raw) {
  using L = SmemLayout<STAGES>;
  constexpr int kARowsPerCta = kBlockM / CLUSTER_N;
  cutlass::arch::warpgroup_reg_dealloc<40>();
  const int warp = threadIdx.x / 32;
  if (warp == 1 || warp == 2) storer<STAGES, CLUSTER_N>(p, smem_u32(aligned_smem(smem_raw)), warp - 1);
  if (threadIdx.x == 0) {
    uint8_t* smem = aligned_smem(smem_raw);
    const uint32_t base = smem_u32(smem);
    uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + L::kBar);
    const int rank = CLUSTER_N > 1 ? int(cute::block_rank_in_cluster()) : 0;
    const int num_clusters = gridDim.x / CLUSTER_N;
    const int num_units = total_units(p, base + L::kCum, CLUSTER_N);
    const int num_kb = p.k / kBlockK;
    constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
    const bool masked = p.masked_m != nullptr;
    int stage = 0;
    uint32_t phase = 0;
    for (int t = blockIdx.x / CLUSTER_N; t < num_units; t += num_clusters) {
      const Tile tile = locate_tile(p, base + L::kCum, t, CLUSTER_N, rank);
      const int b_row = tile.group * p.n + tile.n0;
      const int sfa_row = (masked ? tile.row0 - tile.group * p.m_max : tile.row0) & ~3;
      const int sfa_plane = masked ? tile.group : 0;
      for (int kb = 0; kb < num_kb; ++kb) {
        mbar_wait(L::empty(base, stage), phase ^ 1);
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full_bar + stage,
                                                                       L::kABytes + L::kBBytes + L::kSfaRows * 4);
        uint8_t* a_dst = smem + L::kA + stage * L::kABytes + rank * kARowsPerCta * kBlockK;
        if constexpr (CLUSTER_N > 1) {
          cute::SM90_TMA_LOAD_MULTICAST_2D::copy(tmap_a, full_bar + stage, uint16_t((1 << CLUSTER_N) - 1), kHint,
                                                 a_dst, kb * kBlockK, tile.row0 + rank * kARowsPerCta);
        } else {
          cute::SM90_TMA_LOAD_2D::copy(tmap_a, full_bar + stage, kHint, a_dst, kb * kBlockK, tile.row0);
        }
        cute::SM90_TMA_LOAD_2D::copy(tmap_b, full_bar + stage, kHint, smem + L::kB + stage * L::kBBytes,
                                     kb * kBlockK, b_row);
        cute::SM90_TMA_LOAD_3D::copy(tmap_sfa, full_bar + stage, kHint, smem + L::kSfa + stage * L::kSfaBytes,
                                     sfa_row, kb, sfa_plane);
        if (++stage == STAGES) {
          stage = 0;
          phase ^= 1;
        }
      }
    }
  }
  if constexpr (CLUSTER_N > 1) cute::cluster_sync();
}

template <int STAGES, int CLUSTER_N>
__global__ void __launch_bounds__(kThreads, 1)
    fp8_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                         const __grid_constant__ CUtensorMap tmap_sfa, const __grid_constant__ KernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using L = SmemLayout<STAGES>;
  static_assert(CLUSTER_N == 1 || CLUSTER_N == 2, "clusters of 1 or 2 CTAs");
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = aligned_smem(smem_raw);
  int* cum = reinterpret_cast<int*>(smem + L::kCum);
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + L::kBar);
  uint64_t* empty_bar = full_bar + STAGES;
  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;

  // Prefix of 128-row blocks per group.
  for (int g = tid; g < p.num_groups; g += kThreads) {
    int begin, end;
    group_rows(p, g, begin, end);
    cum[g + 1] = (end - begin + kBlockM - 1) / kBlockM;
  }
  if (tid == 0) {
    cum[0] = 0;
    for (int s = 0; s < STAGES; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(full_bar + s, 1);
      cutlass::arch::ClusterBarrier::init(empty_bar + s, 8 * CLUSTER_N);  // every math warp of the cluster
    }
    cutlass::arch::fence_barrier_init();
  }
  if (warp == 0 && lane == 0) {
    cute::prefetch_tma_descriptor(&tmap_a);
    cute::prefetch_tma_descriptor(&tmap_b);
    cute::prefetch_tma_descriptor(&tmap_sfa);
  }
  __syncthreads();
  if (warp == 0) {  // inclusive scan of cum[1..G] by one warp, lanes own contiguous chunks
    const int per = (p.num_groups + 31) / 32;
    const int lo = 1 + lane * per, hi = min(lo + per, p.num_groups + 1);
    int run = 0;
    for (int i = lo; i < hi; ++i) run += cum[i];
    int incl = run;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    int acc = incl - run;
    for (int i = lo; i < hi; ++i) {
      acc += cum[i];
      cum[i] = acc;
    }
  }
  __syncthreads();
  // The peer's multicasts and barrier arrivals may only start once every barrier of the cluster exists.
  if constexpr (CLUSTER_N > 1) cute::cluster_sync();

  // Each role ends with its own cluster barrier (no CTA may leave while its peer can still multicast
  // into it or arrive on its barriers): code shared after setmaxnreg makes ptxas ignore the split.
  if (warpgroup_index() == 0) {  // broadcast: the math warpgroups' descriptors stay uniform (smem_sm90.cuh)
    producer<STAGES, CLUSTER_N>(&tmap_a, &tmap_b, &tmap_sfa, p, smem_raw);
  } else {
    math_warpgroups<STAGES, CLUSTER_N>(p, smem_raw);
  }
#endif
}

}  // namespace flashseek::sm90gemm
