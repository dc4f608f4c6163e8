// Hand-written Hopper FP8 block-scaled GEMM (1x128 activation scales, 128x128 weight scales,
// fp32 promotion per 128-deep K block, bf16 out), one kernel for dense, contiguous-grouped and
// masked-grouped problems.
//
// Why not CUTLASS's block-wise collective: it tops out near 1050-1100 TFLOP/s on long-K shapes
// (docs/gemm-design.md): its two consumer warpgroups promote in lockstep and its tiles cannot grow.
// Here each math warpgroup runs its own 64-row half of the tile on its own clock, so one
// warpgroup's promotion FFMAs overlap the other's wgmma, and the pipeline is kept deep.
//
// Structure (384 threads, one CTA per SM, persistent):
//   warpgroup 0  producer: one thread issues the TMA loads of A (128 x 128 B), B (BLOCK_N x 128 B)
//                and the 128 activation scales of each K block into a ring of STAGES stages;
//   warpgroups 1-2  math: rows [64 w, 64 w + 64) of the tile. Per K block: 4 wgmma m64nBLOCK_Nk32
//                into a fresh accumulator, then final += acc * (a_scale[row] * b_scale), then
//                release the stage. Epilogue: bf16 through a padded shared tile, 16-byte stores
//                masked to the group's rows and to N.
// Clusters of CLUSTER_N (1 or 2) CTAs take neighbouring n blocks of the same rows: each CTA loads
// 128 / CLUSTER_N rows of the A tile and multicasts them to both, so A's L2->SM traffic halves
// (the bound at ~7 TB/s of L2 reads: 32 KB per 4.2 MFLOP is 6.8 TB/s at 870 TFLOP/s). A stage is
// refilled only when the consumers of every CTA of the cluster have released it.
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
#include <cute/arch/mma_sm90_gmma_ext.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

namespace flashseek::sm90gemm {

constexpr int kBlockM = 128;
constexpr int kBlockK = 128;
constexpr int kThreads = 384;
constexpr int kMaxGroups = 1024;

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

// The wgmma m64nNk32 e4m3 x e4m3 -> f32 atom for each tile width used.
template <int N> struct Mma;
template <> struct Mma<128> { using Op = cute::SM90::GMMA::MMA_64x128x32_F32E4M3E4M3_SS_TN<>; };
template <> struct Mma<160> { using Op = cute::SM90::GMMA::MMA_64x160x32_F32E4M3E4M3_SS_TN<>; };

template <class Op, int N, size_t... I>
__device__ __forceinline__ void wgmma_step(uint64_t da, uint64_t db, float (&d)[N], bool accumulate,
                                           std::index_sequence<I...>) {
  Op::fma(da, db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}

// K-major operand, 128-byte rows, 128B swizzle (what TMA writes with CU_TENSOR_MAP_SWIZZLE_128B):
// 8-row core groups 1024 B apart; the leading byte offset is ignored for this layout.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
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

struct Tile {
  int group, row0, row_end, n_block;
};

// Linear unit t -> tile (group, first row, row end, n block) of cluster rank `rank`. A unit is one
// m block x `cluster_n` neighbouring n blocks; m blocks are numbered across groups (cum[g] = m
// blocks of groups < g); units walk bands of `band` m blocks, n outer inside a band.
__device__ __forceinline__ Tile locate_tile(const KernelParams& p, const int* cum, int t, int cluster_n, int rank) {
  const int total_m = cum[p.num_groups];
  const int n_units = (p.num_n_blocks + cluster_n - 1) / cluster_n;
  const int per_band = p.band * n_units;
  const int band_idx = t / per_band;
  const int base_m = band_idx * p.band;
  const int band_m = min(p.band, total_m - base_m);
  const int local = t - band_idx * per_band;
  const int m_lin = base_m + local % band_m;
  Tile tile;
  tile.n_block = (local / band_m) * cluster_n + rank;
  int lo = 0, hi = p.num_groups - 1;  // last g with cum[g] <= m_lin
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (cum[mid] <= m_lin) lo = mid; else hi = mid - 1;
  }
  tile.group = lo;
  int begin, end;
  group_rows(p, lo, begin, end);
  tile.row0 = begin + (m_lin - cum[lo]) * kBlockM;
  tile.row_end = end;
  return tile;
}

template <int BLOCK_N, int STAGES>
struct SmemLayout {
  static constexpr int kABytes = kBlockM * kBlockK;   // 16 KB
  static constexpr int kBBytes = BLOCK_N * kBlockK;
  // 132 scales: the TMA box starts at the tile's first row rounded down to 4 (a 16-byte aligned
  // global address, which TMA requires of the innermost coordinate); stages 128-byte aligned.
  static constexpr int kSfaRows = kBlockM + 4;
  static constexpr int kSfaBytes = 640;
  static constexpr int kDPitch = BLOCK_N * 2 + 16;     // bytes per staged output row (bank spread)
  static constexpr int kA = 0;
  static constexpr int kB = kA + STAGES * kABytes;
  static constexpr int kSfa = kB + STAGES * kBBytes;
  static constexpr int kD = kSfa + STAGES * kSfaBytes;
  static constexpr int kCum = kD + kBlockM * kDPitch;
  static constexpr int kBar = kCum + (kMaxGroups + 1) * 4 + 4;  // 8-byte aligned below
  static constexpr int kBarAligned = (kBar + 7) / 8 * 8;
  static constexpr int kTotal = kBarAligned + 2 * STAGES * 8;
  static constexpr int kDynamic = kTotal + 1024;  // base rounded up to 1024 inside the kernel
  static_assert(kBBytes % 1024 == 0, "B stages must stay 1024-aligned for the 128B swizzle");
};

template <int BLOCK_N, int STAGES, int CLUSTER_N>
__device__ __forceinline__ void math_warpgroups(const KernelParams& p, uint8_t* smem, const int* cum,
                                                uint64_t* full_bar, uint64_t* empty_bar, int total_units,
                                                int cluster_id, int num_clusters, int rank) {
  using L = SmemLayout<BLOCK_N, STAGES>;
  using Op = typename Mma<BLOCK_N>::Op;
  constexpr int kAcc = BLOCK_N / 2;  // fp32 accumulators per thread of a 64 x BLOCK_N warpgroup tile
  const int tid = threadIdx.x, lane = tid % 32, wg = tid / 128;
  const int num_kb = p.k / kBlockK;
  const bool masked = p.masked_m != nullptr;
  cutlass::arch::warpgroup_reg_alloc<232>();
  const int mw = wg - 1;                       // math warpgroup: rows [64 mw, 64 mw + 64) of the tile
  const int wtid = tid - 128 * wg;             // thread in its warpgroup
  const int r_local = 16 * (wtid / 32) + (lane / 4);  // and r_local + 8
  const int n_scale_blocks = (p.n + 127) / 128;
  int stage = 0;
  uint32_t phase = 0;
  float acc[kAcc];
  float fin[kAcc];

  for (int t = cluster_id; t < total_units; t += num_clusters) {
    const Tile tile = locate_tile(p, cum, t, CLUSTER_N, rank);
    const int n0 = tile.n_block * BLOCK_N;
    // The scales' first row sits at this offset inside the 16-byte aligned TMA box.
    const int sfa_shift = (masked ? tile.row0 - tile.group * p.m_max : tile.row0) & 3;
    // Weight scales of this tile: columns below `split` use block n0 / 128, the rest the next one. A
    // cluster's surplus tile past N (odd n-block count) computes on any valid scales; nothing is stored.
    const float* sb_row =
        p.b_scale + (int64_t(tile.group) * n_scale_blocks + min(n0 / 128, n_scale_blocks - 1)) * num_kb;
    const int split = min(128 - n0 % 128, BLOCK_N);
    const bool two_blocks = split < BLOCK_N && n0 / 128 + 1 < n_scale_blocks;
    const float* sb_row2 = two_blocks ? sb_row + num_kb : sb_row;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) fin[i] = 0.f;
    float sb_next = __ldg(sb_row), sb2_next = __ldg(sb_row2);

    for (int kb = 0; kb < num_kb; ++kb) {
      const float sb = sb_next, sb2 = sb2_next;
      if (kb + 1 < num_kb) {
        sb_next = __ldg(sb_row + kb + 1);
        sb2_next = __ldg(sb_row2 + kb + 1);
      }
      cutlass::arch::ClusterTransactionBarrier::wait(full_bar + stage, phase);
      const float* sfa = reinterpret_cast<const float*>(smem + L::kSfa + stage * L::kSfaBytes) + 64 * mw + sfa_shift;
      const float sa0 = sfa[r_local], sa1 = sfa[r_local + 8];
      const uint32_t a_addr = smem_u32(smem + L::kA + stage * L::kABytes + mw * 64 * kBlockK);
      const uint32_t b_addr = smem_u32(smem + L::kB + stage * L::kBBytes);
#pragma unroll
      for (int i = 0; i < kAcc; ++i) cute::warpgroup_fence_operand(acc[i]);
      cute::warpgroup_arrive();
#pragma unroll
      for (int ks = 0; ks < kBlockK / 32; ++ks) {
        wgmma_step<Op>(smem_desc(a_addr + ks * 32), smem_desc(b_addr + ks * 32), acc, ks > 0,
                       std::make_index_sequence<kAcc>{});
      }
      cute::warpgroup_commit_batch();
      cute::warpgroup_wait<0>();
#pragma unroll
      for (int i = 0; i < kAcc; ++i) cute::warpgroup_fence_operand(acc[i]);
      if (lane == 0) {
#pragma unroll
        for (int c = 0; c < CLUSTER_N; ++c) {
          if constexpr (CLUSTER_N > 1) {
            cutlass::arch::ClusterBarrier::arrive(empty_bar + stage, c, 1);
          } else {
            cutlass::arch::ClusterBarrier::arrive(empty_bar + stage);
          }
        }
      }
      if (++stage == STAGES) {
        stage = 0;
        phase ^= 1;
      }
      const float s00 = sa0 * sb, s10 = sa1 * sb, s01 = sa0 * sb2, s11 = sa1 * sb2;
#pragma unroll
      for (int j = 0; j < kAcc / 4; ++j) {
        const bool first = (BLOCK_N <= 128 && 128 % BLOCK_N == 0) || 8 * j < split;
        fin[4 * j + 0] += acc[4 * j + 0] * (first ? s00 : s01);
        fin[4 * j + 1] += acc[4 * j + 1] * (first ? s00 : s01);
        fin[4 * j + 2] += acc[4 * j + 2] * (first ? s10 : s11);
        fin[4 * j + 3] += acc[4 * j + 3] * (first ? s10 : s11);
      }
    }

    // Epilogue: this warpgroup's 64 x BLOCK_N half through shared memory, then 16-byte stores.
    uint8_t* d_tile = smem + L::kD + mw * 64 * L::kDPitch;
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + mw) : "memory");  // previous tile's reads are done
#pragma unroll
    for (int j = 0; j < kAcc / 4; ++j) {
      const int col = 8 * j + 2 * (lane % 4);
      __nv_bfloat162 lo = __floats2bfloat162_rn(fin[4 * j + 0], fin[4 * j + 1]);
      __nv_bfloat162 hi = __floats2bfloat162_rn(fin[4 * j + 2], fin[4 * j + 3]);
      *reinterpret_cast<__nv_bfloat162*>(d_tile + r_local * L::kDPitch + col * 2) = lo;
      *reinterpret_cast<__nv_bfloat162*>(d_tile + (r_local + 8) * L::kDPitch + col * 2) = hi;
    }
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + mw) : "memory");
    constexpr int kChunksPerRow = BLOCK_N / 8;
    const int row_base = tile.row0 + 64 * mw;
#pragma unroll 4
    for (int c = wtid; c < 64 * kChunksPerRow; c += 128) {
      const int r = c / kChunksPerRow, ch = c % kChunksPerRow;
      const int row = row_base + r, col = n0 + ch * 8;
      if (row < tile.row_end && col < p.n) {
        const uint4 v = *reinterpret_cast<const uint4*>(d_tile + r * L::kDPitch + ch * 16);
        *reinterpret_cast<uint4*>(p.out + int64_t(row) * p.n + col) = v;
      }
    }
  }
}

template <int BLOCK_N, int STAGES, int CLUSTER_N>
__global__ void __launch_bounds__(kThreads, 1)
    fp8_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                         const __grid_constant__ CUtensorMap tmap_sfa, const KernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using L = SmemLayout<BLOCK_N, STAGES>;
  constexpr int kARowsPerCta = kBlockM / CLUSTER_N;
  static_assert(CLUSTER_N == 1 || CLUSTER_N == 2, "clusters of 1 or 2 CTAs");
  static_assert(BLOCK_N % 128 == 0 || 128 % BLOCK_N == 0 || BLOCK_N == 160, "scale-block crossing rule");

  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  int* cum = reinterpret_cast<int*>(smem + L::kCum);
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + L::kBarAligned);
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

  const int rank = CLUSTER_N > 1 ? int(cute::block_rank_in_cluster()) : 0;
  const int cluster_id = blockIdx.x / CLUSTER_N, num_clusters = gridDim.x / CLUSTER_N;
  const int total_units = cum[p.num_groups] * ((p.num_n_blocks + CLUSTER_N - 1) / CLUSTER_N);
  const int num_kb = p.k / kBlockK;
  const int wg = tid / 128;

  if (wg == 0) {
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (tid == 0) {
      constexpr uint64_t kHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
      const bool masked = p.masked_m != nullptr;
      int stage = 0;
      uint32_t phase = 0;
      for (int t = cluster_id; t < total_units; t += num_clusters) {
        const Tile tile = locate_tile(p, cum, t, CLUSTER_N, rank);
        const int b_row = tile.group * p.n + tile.n_block * BLOCK_N;
        const int sfa_row = (masked ? tile.row0 - tile.group * p.m_max : tile.row0) & ~3;
        const int sfa_plane = masked ? tile.group : 0;
        for (int kb = 0; kb < num_kb; ++kb) {
          cutlass::arch::ClusterBarrier::wait(empty_bar + stage, phase ^ 1);
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(
              full_bar + stage, L::kABytes + L::kBBytes + L::kSfaRows * 4);
          uint8_t* a_dst = smem + L::kA + stage * L::kABytes + rank * kARowsPerCta * kBlockK;
          if constexpr (CLUSTER_N > 1) {
            cute::SM90_TMA_LOAD_MULTICAST_2D::copy(&tmap_a, full_bar + stage, uint16_t((1 << CLUSTER_N) - 1), kHint,
                                                   a_dst, kb * kBlockK, tile.row0 + rank * kARowsPerCta);
          } else {
            cute::SM90_TMA_LOAD_2D::copy(&tmap_a, full_bar + stage, kHint, a_dst, kb * kBlockK, tile.row0);
          }
          cute::SM90_TMA_LOAD_2D::copy(&tmap_b, full_bar + stage, kHint, smem + L::kB + stage * L::kBBytes,
                                       kb * kBlockK, b_row);
          cute::SM90_TMA_LOAD_3D::copy(&tmap_sfa, full_bar + stage, kHint,
                                       smem + L::kSfa + stage * L::kSfaBytes, sfa_row, kb, sfa_plane);
          if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
    // No CTA may leave while its peer can still multicast into it or arrive on its barriers. Each role
    // waits on its own: code shared after setmaxnreg would make ptxas ignore the register split.
    if constexpr (CLUSTER_N > 1) cute::cluster_sync();
  } else {
    math_warpgroups<BLOCK_N, STAGES, CLUSTER_N>(p, smem, cum, full_bar, empty_bar, total_units, cluster_id,
                                                num_clusters, rank);
    if constexpr (CLUSTER_N > 1) cute::cluster_sync();
  }
#endif
}

}  // namespace flashseek::sm90gemm
