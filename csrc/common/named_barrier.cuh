// Named barriers between the roles of one CTA: a producer's arrive and a consumer's sync, or two
// warpgroups' branches meeting at the end of a block. PTX's bar.sync / bar.arrive are
// barrier.sync.aligned / barrier.arrive.aligned, which require every participating thread to execute
// the same instruction (otherwise the behaviour is undefined); roles that meet from different places in
// the code need the non-aligned forms below. compute-sanitizer synccheck reports the aligned forms there
// as "divergent thread(s) in block".
// The SASS keeps the plain BAR.SYNC / BAR.ARV on the converged path and adds a divergence fallback
// branch, which can cost registers; one barrier pair in the Q-in-registers MLA kernel keeps the aligned
// form for that reason (mla_decode_qreg.cuh).
#pragma once

namespace flashseek {

// Waits until `threads` threads (a multiple of 32, warps whole) have arrived at barrier `id` (0-15;
// 0 is __syncthreads') by named_barrier_sync or named_barrier_arrive.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("barrier.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Arrives at barrier `id` without waiting: the thread's earlier shared-memory accesses are ordered
// before the accesses that the waiting threads make after the barrier completes.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("barrier.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// __syncthreads for code that the CTA's roles reach from different instructions (a helper inlined into
// both branches of `if (warpgroup == 0)`): barrier 0, every thread of the CTA.
__device__ __forceinline__ void cta_barrier_sync() { asm volatile("barrier.sync 0;\n" ::: "memory"); }
// One warpgroup's own barrier (128 threads) where all of them reach each use of it at the same
// instruction: the aligned form is valid there and spares the divergence fallback on hot paths.
__device__ __forceinline__ void warpgroup_barrier_sync(int id) {
  asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory");
}
// cute::cluster_sync (barrier.cluster arrive + wait, release / acquire) for the same case.
__device__ __forceinline__ void cluster_barrier_sync() {
  asm volatile("barrier.cluster.arrive;\nbarrier.cluster.wait;\n" ::: "memory");
}

}  // namespace flashseek
