// moe_align: (token, k) slots grouped by local expert, in one single-block launch.
//
// One block does count, scan and scatter, so there are no global intermediates, no second launch and
// no host sync (CUDA-graph safe). Determinism without atomics: warp w owns a contiguous chunk of
// slots and keeps private per-expert counters in shared memory; inside a 32-slot step the lanes
// that share an expert find each other with __match_any_sync and the lowest lane updates the
// counter. An exclusive scan of the counters over warps then gives each warp its first row per
// expert, so rows follow ascending slot id within each expert, exactly as the reference.
// One block is enough: even T=16384, topk=8 (131k slots) is a few tens of microseconds, against
// milliseconds of grouped GEMMs at that size; decode sizes take a few microseconds.
#include <cstdint>

#include "common/cuda_check.h"
#include "moe/moe.h"

namespace flashseek {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;
constexpr unsigned kFull = 0xffffffffu;
static_assert(kMoeAlignMaxLocalExperts <= kThreads, "the expert scan gives one thread per expert");

__device__ __forceinline__ int local_expert(const MoeAlignParams& p, int64_t s) {
  const int id = p.topk_ids[s];
  if (id < 0 || id >= p.num_experts) return -1;
  const int e = p.expert_map ? p.expert_map[id] : id;
  return (e >= 0 && e < p.num_local) ? e : -1;
}

// The local experts of this lane's slots base + u*32 + lane (u < kUnroll); -1 past `end`.
__device__ __forceinline__ void load_step_experts(const MoeAlignParams& p, int64_t base, int64_t end, int lane,
                                                  int (&e)[kUnroll]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t s = base + u * 32 + lane;
    e[u] = s < end ? local_expert(p, s) : -1;
  }
}

__global__ void __launch_bounds__(kThreads, 1) moe_align_kernel(const MoeAlignParams p) {
  __shared__ int cnt[kWarps][kMoeAlignMaxLocalExperts];  // counts, then each warp's next row
  __shared__ int offs[kMoeAlignMaxLocalExperts + 1];
  __shared__ int total[kMoeAlignMaxLocalExperts];
  __shared__ int warp_sums[kWarps];

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int E = p.num_local;
  const bool masked = p.max_m > 0;

  // Chunking: as few warps as the slots need (decode: one), each a multiple of 32 slots.
  const int64_t steps = (p.n + 31) / 32;
  const int nw = int(steps < kWarps ? (steps > 0 ? steps : 1) : kWarps);
  const int64_t chunk = (steps + nw - 1) / nw * 32;
  const int64_t beg = int64_t(warp) * chunk;
  const int64_t end = beg + chunk < p.n ? beg + chunk : p.n;

  for (int i = tid; i < kWarps * E; i += kThreads) cnt[i / E][i % E] = 0;
  __syncthreads();

  // Pass 1: per-warp counts.
  if (warp < nw) {
    for (int64_t base = beg; base < end; base += 32 * kUnroll) {
      int e[kUnroll];
      load_step_experts(p, base, end, lane, e);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const unsigned peers = __match_any_sync(kFull, e[u]);
        if (e[u] >= 0 && lane == __ffs(peers) - 1) cnt[warp][e[u]] += __popc(peers);
      }
    }
  }
  __syncthreads();

  // Pass 2: exclusive scan over warps per expert, then the expert starts.
  int mine = 0;
  if (tid < E) {
    int run = 0;
    for (int w = 0; w < nw; ++w) {
      const int c = cnt[w][tid];
      cnt[w][tid] = run;
      run += c;
    }
    total[tid] = run;
    if (masked) {
      p.masked_m[tid] = run < p.max_m ? run : p.max_m;
    } else {
      mine = (run + p.block_m - 1) / p.block_m * p.block_m;
    }
  }
  if (!masked) {
    int incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(kFull, incl, off);
      if (lane >= off) incl += o;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int v = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int o = __shfl_up_sync(kFull, v, off);
        if (lane >= off) v += o;
      }
      if (lane < kWarps) warp_sums[lane] = v;  // inclusive over warps
    }
    __syncthreads();
    const int excl = incl - mine + (warp > 0 ? warp_sums[warp - 1] : 0);
    if (tid < E) offs[tid] = excl;
    if (tid == E - 1) offs[E] = excl + mine;
  }
  __syncthreads();

  // Pass 3: rows. Lanes of one expert read the warp's next row, then its lowest lane advances it.
  if (warp < nw) {
    const unsigned lt = (1u << lane) - 1u;
    for (int64_t base = beg; base < end; base += 32 * kUnroll) {
      int e[kUnroll];
      load_step_experts(p, base, end, lane, e);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t s = base + u * 32 + lane;
        const unsigned peers = __match_any_sync(kFull, e[u]);
        int next = 0;
        if (e[u] >= 0) {
          const int first = cnt[warp][e[u]];
          const int rank = first + __popc(peers & lt);
          next = first + __popc(peers);
          int row;
          if (masked) {
            row = rank < p.max_m ? e[u] * p.max_m + rank : -1;
          } else {
            row = offs[e[u]] + rank;
            p.sorted_ids[row] = int(s);
          }
          p.token_slots[s] = row;
        } else if (s < end) {
          p.token_slots[s] = -1;
        }
        __syncwarp();
        if (e[u] >= 0 && lane == __ffs(peers) - 1) cnt[warp][e[u]] = next;
        __syncwarp();
      }
    }
  }
  if (masked) return;

  // Everything the scatter does not write: padding rows, the unused tail, the block table.
  const int sentinel = int(p.n);
  if (tid < E) {
    for (int r = offs[tid] + total[tid]; r < offs[tid + 1]; ++r) p.sorted_ids[r] = sentinel;
    for (int b = offs[tid] / p.block_m; b < offs[tid + 1] / p.block_m; ++b) p.block_expert_ids[b] = tid;
  }
  if (tid < E) p.expert_offsets[tid] = offs[tid];
  if (tid == E - 1) p.expert_offsets[E] = offs[E];  // E may equal the thread count
  const int64_t used = offs[E];
  for (int64_t r = used + tid; r < p.max_rows; r += kThreads) p.sorted_ids[r] = sentinel;
  for (int64_t b = used / p.block_m + tid; b < p.max_rows / p.block_m; b += kThreads) p.block_expert_ids[b] = -1;
}

}  // namespace

void launch_moe_align(const MoeAlignParams& p, cudaStream_t stream) {
  moe_align_kernel<<<1, kThreads, 0, stream>>>(p);
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek
