// Shared-memory addressing and mbarrier helpers shared by the sm_90a kernels (MLA decode, FP8 GEMMs).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace flashseek {

// 32-bit shared-window address of a generic pointer into shared memory (one register).
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// This thread's warpgroup (threadIdx.x / 128), broadcast from lane 0 so that ptxas knows it is
// warp-uniform. Under a branch on the plain quotient, ptxas treats the branch as divergent and keeps
// every value computed inside in vector registers: each wgmma descriptor then went through an R2UR
// (and its latency) right before its HGMMA, 79 of 88 in the MLA Q-in-registers kernel (session 20).
// Broadcast, the descriptors stay in uniform registers. The same idea as CUTLASS's
// canonical_warp_group_idx.
__device__ __forceinline__ int warpgroup_index() { return __shfl_sync(0xffffffffu, threadIdx.x / 128, 0); }

// wgmma shared-memory matrix descriptor for a 128B-swizzled operand (what TMA writes with
// CU_TENSOR_MAP_SWIZZLE_128B, or the same XOR layout written by hand): start address, leading and
// stride byte offsets (16-byte units, 14 bits each). K-major tiles ignore the leading byte offset.
__device__ __forceinline__ uint64_t wgmma_desc_sw128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// The same descriptor built once for a tile's base address and stepped through the tile by byte
// offsets. The start address is bits 0-13 of the low word, in 16-byte units; a shared-memory address
// (< 2^18 bytes) stays below 2^14 such units, so base + offset never carries into the leading byte
// offset and a step is one 32-bit add. Rebuilding the descriptor from the address cost ~10
// instructions a wgmma in the MLA kernels' SASS, issued from the schedulers the softmax also needs.
struct WgmmaDesc {
  uint32_t lo, hi;
  __device__ __forceinline__ uint64_t at(uint32_t byte_offset) const {
    return (static_cast<uint64_t>(hi) << 32) | (lo + (byte_offset >> 4));
  }
};
__device__ __forceinline__ WgmmaDesc wgmma_desc_sw128_tile(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  const uint64_t d = wgmma_desc_sw128(addr, lbo, sbo);
  return {static_cast<uint32_t>(d), static_cast<uint32_t>(d >> 32)};
}

// mbarrier wait on a phase parity (the try_wait loop, with the suspend-time hint CUTLASS uses) and a
// plain arrive, on 32-bit shared-window addresses.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1, 0x989680;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// A TMA bulk copy global -> shared (16-byte aligned, a multiple of 16 bytes) completing on `bar`.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

}  // namespace flashseek
