// Split-KV schedule of the MLA decode kernel, computed on the device (no host sync, fixed-size
// output: CUDA-graph capturable). Same greedy as flashseek.ref.mla.mla_decode_plan, bit for bit.
#include <climits>

#include "common/cuda_check.h"
#include "common/smem_opt_in.h"
#include "mla/mla_params.h"

namespace flashseek::mla {
namespace {

constexpr int kPlanThreads = 256;
// Candidate payloads tried at once, one per warp: the search range [lo, hi] below has at most
// kFixedSplitCost + 1 values.
constexpr int kPayloadCandidates = kFixedSplitCost + 1;
static_assert(kPayloadCandidates * 32 <= kPlanThreads, "one warp per candidate payload");

// Whether the greedy walk with `payload` cost units per part covers every request within P parts
// (it stops counting there: O(batch + P)).
__device__ bool walk_fits(const int* nblk, int b, long long payload, int P) {
  int i = 0, blk = 0;
  for (int part = 0; part < P && i < b; ++part) {
    long long rem = payload;
    while (i < b) {
      const int rest = nblk[i] - blk;
      if (rest + kFixedSplitCost <= rem) {
        rem -= rest + kFixedSplitCost;
        ++i;
        blk = 0;
      } else {
        const long long take = rem - kFixedSplitCost;
        if (take > 0) blk += static_cast<int>(take);
        break;
      }
    }
  }
  return i >= b;
}

__global__ void __launch_bounds__(kPlanThreads) mla_plan_kernel(PlanParams p) {
  // Per request: its key blocks during the walk; then (ws_base << 16) | num_splits (both <= 2P + 1
  // <= 8193 for P <= 4096, checked by the host), so one int per request fits 32768 requests.
  extern __shared__ int s_req[];
  __shared__ long long s_total;
  const int b = p.batch, P = p.num_sm_parts;
  if (threadIdx.x == 0) s_total = 0;
  __syncthreads();
  long long local = 0;
  for (int i = threadIdx.x; i < b; i += kPlanThreads) {
    const int len = max(p.seqlens[i], 0);
    const int nb = (len + kBlockN - 1) / kBlockN;
    s_req[i] = nb;
    local += nb + kFixedSplitCost;
  }
  atomicAdd(reinterpret_cast<unsigned long long*>(&s_total), static_cast<unsigned long long>(local));
  __syncthreads();

  // The payload: the smallest number of cost units per part with which the walk fits in P parts
  // (the makespan of the cost model), at least kMinSplitBlocks + kFixedSplitCost. P parts of `lo`
  // units cannot hold the total, and hi (FlashMLA's payload, which let small batches leave SMs idle:
  // b=2 h_q=128 used 44 of 66 parts with 3-block pieces) is taken when no smaller one fits. The
  // candidates are walked in parallel, one warp each.
  __shared__ int s_fits[kPayloadCandidates];
  const long long per_part = (s_total + P - 1) / P;
  const long long hi = max(per_part, static_cast<long long>(kMinSplitBlocks)) + kFixedSplitCost;
  const long long lo = max(per_part, static_cast<long long>(kMinSplitBlocks + kFixedSplitCost));
  if ((threadIdx.x & 31) == 0 && threadIdx.x / 32 < kPayloadCandidates) {
    const long long c = lo + threadIdx.x / 32;
    s_fits[threadIdx.x / 32] = c <= hi && walk_fits(s_req, b, c, P);
  }
  __syncthreads();

  if (threadIdx.x == 0) {
    long long payload = hi;
    for (int k = kPayloadCandidates - 1; k >= 0; --k) {
      if (s_fits[k]) payload = lo + k;
    }
    // The walk is inherently sequential (each part starts where the previous one stopped); from
    // shared memory it costs a few cycles per request and part, so one thread does it.
    int i = 0, blk = 0, cur_split = 0;
    for (int part = 0; part < P; ++part) {
      // The last part takes whatever is left, so every block is covered for any rounding.
      long long rem = part < P - 1 ? payload : LLONG_MAX;
      const int b0 = i, blk0 = blk, split0 = cur_split;
      int last_b = b0 - 1, last_blk = 0;
      while (i < b) {
        const int rest = s_req[i] - blk;
        if (rest + kFixedSplitCost <= rem) {
          rem -= rest + kFixedSplitCost;
          last_b = i;
          last_blk = s_req[i];
          s_req[i] = cur_split + 1;  // request i is finished: its slot now holds num_splits
          ++i;
          blk = 0;
          cur_split = 0;
        } else {
          const long long take = rem - kFixedSplitCost;
          if (take > 0) {  // take < rest here, so a piece never ends a request early
            blk += static_cast<int>(take);
            ++cur_split;
            last_b = i;
            last_blk = blk;
          }
          break;
        }
      }
      int* out = p.plan + kPlanPartInts * part;
      out[0] = b0;
      out[1] = blk0;
      out[2] = last_b;
      out[3] = last_blk;
      out[4] = split0;
      out[5] = -1;
      out[6] = out[7] = 0;
    }
    // Cluster pairs (mla_params.h): marked in bit 15 of the request's slot (num_splits <= 8193 fits below).
    constexpr int kPairBit = 1 << 15;
    for (int c = 0; c + 1 < P; c += 2) {
      const int* e0 = p.plan + kPlanPartInts * c;
      const int r = cluster_pair_candidate(e0, e0 + kPlanPartInts, b);
      if (r >= 0 && s_req[r] == 2) s_req[r] |= kPairBit;
    }
    int ws = 0, n_split = 0;
    for (int r = 0; r < b; ++r) {
      const int n = s_req[r] & ~kPairBit;
      const bool pair = s_req[r] & kPairBit;
      s_req[r] = (ws << 16) | n;
      if (n > 1) {
        ws += n;
        // The combine's work list (at most P - 1 entries: each holds a part boundary), with the
        // request's workspace base and split count (negative for a cluster pair), so that the combine
        // reads one entry.
        if (n_split < P) {
          int* e = p.plan + kPlanPartInts * n_split++;
          e[5] = r;
          e[6] = ws - n;
          e[7] = pair ? -n : n;
        }
      }
    }
  }
  __syncthreads();
  int* per_req = p.plan + kPlanPartInts * P;
  for (int r = threadIdx.x; r < b; r += kPlanThreads) {
    const int v = s_req[r];
    per_req[2 * r] = v >> 16;
    per_req[2 * r + 1] = v & 0xffff;
  }
  // The decode and combine kernels read the plan before their griddepcontrol.wait (PlanPart in
  // mla_decode_kernel.cuh). This kernel is a plain launch that never triggers its dependents, so they
  // start only once it has exited; the fence makes its writes visible device-wide before that.
  __threadfence();
}

}  // namespace

void launch_plan(const PlanParams& p, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(p.batch) * sizeof(int);
  if (smem > 48 * 1024) opt_in_dynamic_smem<mla_plan_kernel>(static_cast<int>(smem));
  mla_plan_kernel<<<1, kPlanThreads, smem, stream>>>(p);
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek::mla
