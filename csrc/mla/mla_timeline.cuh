// %globaltimer stamps for the standalone MLA harness only (-DFLASHSEEK_MLA_TIMELINE; the library never
// defines it, so the default build compiles to the same SASS). Per CTA: the decode kernel writes its
// phase stamps to g_decode[cta * kDecodeStamps + i], the combine its entry / wait / exit stamps to
// g_combine[cta * kCombineStamps + i], when the harness has set the pointers.
#pragma once
#include <cstdint>

#ifdef FLASHSEEK_MLA_TIMELINE
namespace flashseek::mla::timeline {
constexpr int kDecodeStamps = 8;   // entry, piece read, q + block 0 in, first block done, loop done, written, exit, n_iter
constexpr int kCombineStamps = 4;  // entry, after the grid dependency wait, exit, worked
__device__ unsigned long long* g_decode = nullptr;
__device__ unsigned long long* g_combine = nullptr;
__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned long long* decode_row() {
  return g_decode == nullptr ? nullptr : g_decode + (blockIdx.y * gridDim.x + blockIdx.x) * kDecodeStamps;
}
}  // namespace flashseek::mla::timeline
#define FS_MTL(...) __VA_ARGS__
#else
#define FS_MTL(...)
#endif
