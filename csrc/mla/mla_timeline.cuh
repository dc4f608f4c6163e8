// %globaltimer stamps for the standalone MLA harness only (bench/probes/mla_timeline.cu compiles the
// kernels with -DFLASHSEEK_MLA_TIMELINE; the library never defines it, so its SASS is unchanged). Per
// CTA, one row of a ring: the decode kernel's phase stamps, the combine's entry / wait / exit stamps.
#pragma once
#include <cstdint>

#ifdef FLASHSEEK_MLA_TIMELINE
namespace flashseek::mla::timeline {
// Decode (first piece of the CTA): entry, piece read, block 0 in, Q in, blocks done, rows written, exit,
// n_iter, past the PDL wait, CTA index, SM id. Combine: entry, past the PDL wait, exit, worked, CTA index, SM id, plan
// read, lse pass done, partials summed.
constexpr int kDecodeStamps = 11;
constexpr int kCombineStamps = 9;
// Rings filled in the order the CTAs enter (every CTA of a call enters before any of the next call's:
// a programmatic dependent launches only once all of its primary's CTAs have started), so that
// back-to-back calls, graph replays included, each leave their own rows. The harness sets the
// pointers and the capacity and zeroes the counters.
__device__ unsigned long long* g_decode = nullptr;
__device__ unsigned long long* g_combine = nullptr;
__device__ unsigned int g_decode_n = 0;
__device__ unsigned int g_combine_n = 0;
__device__ unsigned int g_cap = 0;
__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned int smid() {
  unsigned int r;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
  return r;
}
// Thread 0's row of the ring (null for the other threads, without a ring, or past its capacity).
__device__ __forceinline__ unsigned long long* ring_row(unsigned long long* ring, unsigned int* count, int stamps) {
  if (ring == nullptr || threadIdx.x != 0) return nullptr;
  const unsigned int i = atomicAdd(count, 1u);
  return i < g_cap ? ring + static_cast<size_t>(i) * stamps : nullptr;
}
__device__ __forceinline__ unsigned long long* decode_row() { return ring_row(g_decode, &g_decode_n, kDecodeStamps); }
__device__ __forceinline__ unsigned long long* combine_row() {
  return ring_row(g_combine, &g_combine_n, kCombineStamps);
}
__device__ __forceinline__ unsigned long long cta() { return blockIdx.y * gridDim.x + blockIdx.x; }
// A decode CTA's exit: its stamps (exit, CTA, SM filled in here) into its ring row.
__device__ __forceinline__ void write_decode_row(unsigned long long* row, unsigned long long (&t)[kDecodeStamps]) {
  if (row == nullptr) return;
  t[6] = now();
  t[9] = cta();
  t[10] = smid();
  for (int i = 0; i < kDecodeStamps; ++i) row[i] = t[i];
}
}  // namespace flashseek::mla::timeline
#define FS_MTL(...) __VA_ARGS__
#else
#define FS_MTL(...)
#endif
