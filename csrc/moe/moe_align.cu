// moe_align: (token, k) slots grouped by local expert, deterministically, with no host sync.
//
// Determinism without atomics: warp w of a block owns a contiguous chunk of slots and keeps private
// per-expert counters in shared memory; inside a 32-slot step the lanes that share an expert find
// each other with __match_any_sync and the lowest lane updates the counter. An exclusive scan of the
// counters over warps (and, with several blocks, over the blocks first) gives each warp its first
// row per expert, so rows follow ascending slot id within each expert, exactly as the reference.
// Up to kMoeAlignBlockSlots slots (decode) one block does count, scan and scatter in one launch, with
// no global intermediates. More slots (prefill) run the same steps as three launches: per-block
// counts into a [blocks, E] workspace, a one-block scan that also lays out the experts, and the
// scatter; one block alone took 430 us for 131k slots, latency-bound on one SM.
#include <cstdint>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
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

// A block's slots [beg, end), cut into warp chunks of whole 32-slot steps (as few warps as needed).
struct WarpChunks {
  int nw;           // warps with slots
  int64_t beg, end; // this warp's slots
};

__device__ __forceinline__ WarpChunks warp_chunks(int64_t beg, int64_t end, int warp) {
  const int64_t steps = (end - beg + 31) / 32;
  WarpChunks c;
  c.nw = int(steps < kWarps ? (steps > 0 ? steps : 1) : kWarps);
  const int64_t chunk = (steps + c.nw - 1) / c.nw * 32;
  c.beg = beg + int64_t(warp) * chunk;
  c.end = c.beg + chunk < end ? c.beg + chunk : end;
  return c;
}

// Shared state of one block. cnt: per-warp counts, then (after scan_warps) each warp's next rank.
struct AlignSmem {
  int cnt[kWarps][kMoeAlignMaxLocalExperts];
  int offs[kMoeAlignMaxLocalExperts + 1];
  int total[kMoeAlignMaxLocalExperts];
  int warp_sums[kWarps];
};

// Per-warp, per-expert counts of the block's slots.
__device__ void count_block(const MoeAlignParams& p, const WarpChunks& c, AlignSmem& sm) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int E = p.num_local;
  for (int i = tid; i < kWarps * E; i += kThreads) sm.cnt[i / E][i % E] = 0;
  __syncthreads();
  if (warp < c.nw) {
    for (int64_t base = c.beg; base < c.end; base += 32 * kUnroll) {
      int e[kUnroll];
      load_step_experts(p, base, c.end, lane, e);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const unsigned peers = __match_any_sync(kFull, e[u]);
        if (e[u] >= 0 && lane == __ffs(peers) - 1) sm.cnt[warp][e[u]] += __popc(peers);
      }
    }
  }
  __syncthreads();
}

// Exclusive scan over the warps per expert, starting from `base` (the slots of this expert in earlier
// blocks); returns the block's count of expert tid (tid < E).
__device__ __forceinline__ int scan_warps(const MoeAlignParams& p, int nw, int base, AlignSmem& sm) {
  const int tid = threadIdx.x;
  int run = base;
  if (tid < p.num_local) {
    for (int w = 0; w < nw; ++w) {
      const int c = sm.cnt[w][tid];
      sm.cnt[w][tid] = run;
      run += c;
    }
  }
  return run - base;
}

// From the per-expert totals (thread e holds total[e]): masked_m, or the padded expert offsets (also
// left in sm.offs) and the sentinel in every sorted_ids row the scatter does not write. The block
// table is filled by fill_block_table (in the one-block kernel, or spread over the scatter's blocks).
__device__ void finish_layout(const MoeAlignParams& p, int total, AlignSmem& sm) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int E = p.num_local;
  if (p.max_m > 0) {
    if (tid < E) p.masked_m[tid] = total < p.max_m ? total : p.max_m;
    return;
  }
  const int mine = tid < E ? (total + p.block_m - 1) / p.block_m * p.block_m : 0;
  int incl = mine;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int o = __shfl_up_sync(kFull, incl, off);
    if (lane >= off) incl += o;
  }
  if (lane == 31) sm.warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int v = lane < kWarps ? sm.warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(kFull, v, off);
      if (lane >= off) v += o;
    }
    if (lane < kWarps) sm.warp_sums[lane] = v;  // inclusive over warps
  }
  __syncthreads();
  const int excl = incl - mine + (warp > 0 ? sm.warp_sums[warp - 1] : 0);
  if (tid < E) {
    sm.offs[tid] = excl;
    sm.total[tid] = total;
  }
  if (tid == E - 1) sm.offs[E] = excl + mine;
  __syncthreads();

  const int sentinel = int(p.n);
  if (tid < E) {
    for (int r = sm.offs[tid] + sm.total[tid]; r < sm.offs[tid + 1]; ++r) p.sorted_ids[r] = sentinel;
    p.expert_offsets[tid] = sm.offs[tid];
  }
  if (tid == E - 1) p.expert_offsets[E] = sm.offs[E];  // E may equal the thread count
  const int64_t used = sm.offs[E];
  for (int64_t r = used + tid; r < p.max_rows; r += kThreads) p.sorted_ids[r] = sentinel;
}

// block_expert_ids[b] for b = first, first + stride, ...: the expert whose rows [offs[e], offs[e+1])
// hold row b * block_m (the largest e with offs[e] <= row; empty experts share their successor's
// start), -1 past offs[E]. Consecutive threads write consecutive entries: one expert per thread
// writing its whole range took 136 us at 131k single-row blocks (uncoalesced, one SM).
__device__ void fill_block_table(const MoeAlignParams& p, const int* offs, int64_t first, int64_t stride) {
  const int E = p.num_local;
  const int64_t blocks = p.max_rows / p.block_m;
  for (int64_t b = first; b < blocks; b += stride) {
    const int64_t row = b * p.block_m;
    int expert = -1;
    if (row < offs[E]) {
      int lo = 0, hi = E - 1;  // offs[lo] <= row < offs[E]
      while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (offs[mid] <= row) lo = mid; else hi = mid - 1;
      }
      expert = lo;
    }
    p.block_expert_ids[b] = expert;
  }
}

// Rows of the block's slots: lanes of one expert read the warp's next rank, then its lowest lane
// advances it. sm.cnt holds each warp's first rank per expert; offs the expert starts (contiguous).
__device__ void scatter_block(const MoeAlignParams& p, const WarpChunks& c, AlignSmem& sm, const int* offs) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (warp >= c.nw) return;
  const bool masked = p.max_m > 0;
  const unsigned lt = (1u << lane) - 1u;
  for (int64_t base = c.beg; base < c.end; base += 32 * kUnroll) {
    int e[kUnroll];
    load_step_experts(p, base, c.end, lane, e);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = base + u * 32 + lane;
      const unsigned peers = __match_any_sync(kFull, e[u]);
      int next = 0;
      if (e[u] >= 0) {
        const int first = sm.cnt[warp][e[u]];
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
      } else if (s < c.end) {
        p.token_slots[s] = -1;
      }
      __syncwarp();
      if (e[u] >= 0 && lane == __ffs(peers) - 1) sm.cnt[warp][e[u]] = next;
      __syncwarp();
    }
  }
}

// Up to kMoeAlignBlockSlots slots: count, scan and scatter in one block, one launch.
__global__ void __launch_bounds__(kThreads, 1) moe_align_kernel(const MoeAlignParams p) {
  __shared__ AlignSmem sm;
  pdl_wait();
  pdl_launch_dependents();
  const WarpChunks c = warp_chunks(0, p.n, threadIdx.x >> 5);
  count_block(p, c, sm);
  const int total = scan_warps(p, c.nw, 0, sm);
  finish_layout(p, total, sm);
  __syncthreads();
  if (p.max_m == 0) fill_block_table(p, sm.offs, threadIdx.x, kThreads);
  scatter_block(p, c, sm, sm.offs);
}

// More slots: the same three steps over blocks of kMoeAlignBlockSlots slots, with the per-block
// counts in the workspace [blocks, E] between three launches. Slot order within an expert is still
// ascending: block b's rows follow every earlier block's.
__device__ __forceinline__ WarpChunks block_warp_chunks(const MoeAlignParams& p) {
  const int64_t beg = int64_t(blockIdx.x) * kMoeAlignBlockSlots;
  const int64_t end = beg + kMoeAlignBlockSlots < p.n ? beg + kMoeAlignBlockSlots : p.n;
  return warp_chunks(beg, end, threadIdx.x >> 5);
}

// This block's count of expert threadIdx.x (threadIdx.x < E): its total, then (after the scan
// kernel) the slots of that expert in earlier blocks.
__device__ __forceinline__ int* block_count(const MoeAlignParams& p) {
  return p.workspace + int64_t(blockIdx.x) * p.num_local + threadIdx.x;
}

__global__ void __launch_bounds__(kThreads, 1) moe_align_count_kernel(const MoeAlignParams p) {
  __shared__ AlignSmem sm;
  pdl_wait();
  pdl_launch_dependents();
  const WarpChunks c = block_warp_chunks(p);
  count_block(p, c, sm);
  const int total = scan_warps(p, c.nw, 0, sm);
  if (threadIdx.x < p.num_local) *block_count(p) = total;
}

__global__ void __launch_bounds__(kThreads, 1) moe_align_scan_kernel(const MoeAlignParams p, int blocks) {
  __shared__ AlignSmem sm;
  pdl_wait();
  pdl_launch_dependents();
  const int e = threadIdx.x;
  int run = 0;
  if (e < p.num_local) {
    int* w = p.workspace + e;
    const int64_t E = p.num_local;
    int b = 0;
    for (; b + 4 <= blocks; b += 4) {  // four loads in flight, then the four exclusive prefixes
      const int c0 = w[b * E], c1 = w[(b + 1) * E], c2 = w[(b + 2) * E], c3 = w[(b + 3) * E];
      w[b * E] = run;
      w[(b + 1) * E] = run + c0;
      w[(b + 2) * E] = run + c0 + c1;
      w[(b + 3) * E] = run + c0 + c1 + c2;
      run += c0 + c1 + c2 + c3;
    }
    for (; b < blocks; ++b) {
      const int c = w[b * E];
      w[b * E] = run;
      run += c;
    }
  }
  finish_layout(p, run, sm);
}

__global__ void __launch_bounds__(kThreads, 1) moe_align_scatter_kernel(const MoeAlignParams p) {
  __shared__ AlignSmem sm;
  pdl_wait();
  pdl_launch_dependents();
  const WarpChunks c = block_warp_chunks(p);
  count_block(p, c, sm);
  const int base = threadIdx.x < p.num_local ? *block_count(p) : 0;
  scan_warps(p, c.nw, base, sm);
  if (p.max_m == 0) {
    for (int i = threadIdx.x; i <= p.num_local; i += kThreads) sm.offs[i] = p.expert_offsets[i];
  }
  __syncthreads();
  if (p.max_m == 0) {
    fill_block_table(p, sm.offs, int64_t(blockIdx.x) * kThreads + threadIdx.x, int64_t(gridDim.x) * kThreads);
  }
  scatter_block(p, c, sm, sm.offs);
}

}  // namespace

int64_t moe_align_workspace_ints(int64_t n, int num_local) {
  const int64_t blocks = (n + kMoeAlignBlockSlots - 1) / kMoeAlignBlockSlots;
  return blocks > 1 ? blocks * num_local : 0;
}

void launch_moe_align(const MoeAlignParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.n + kMoeAlignBlockSlots - 1) / kMoeAlignBlockSlots;
  if (blocks <= 1) {
    launch_pdl(moe_align_kernel, dim3(1), dim3(kThreads), 0, stream, p);
    return;
  }
  if (p.workspace == nullptr) throw std::invalid_argument("flashseek: moe_align needs a workspace for this many slots");
  launch_pdl(moe_align_count_kernel, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, p);
  launch_pdl(moe_align_scan_kernel, dim3(1), dim3(kThreads), 0, stream, p, int(blocks));
  launch_pdl(moe_align_scatter_kernel, dim3(unsigned(blocks)), dim3(kThreads), 0, stream, p);
}

}  // namespace flashseek
