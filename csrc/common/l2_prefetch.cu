// Why: at decode batch sizes the MLA decode reads a few MB of latent cache in ~14 us and leaves most
// of the bandwidth idle, while the W_UV^T projection after it has to read 16.8 MB of weights (R1) and
// cannot start its loads earlier: the decode's CTAs hold every SM's registers until they finish.
// Prefetching those weights into L2 (50 MB on an H100) between the W_UK projection and the decode
// moves their HBM reads into the decode's shadow.
#include "common/cuda_check.h"
#include "common/l2_prefetch.h"
#include "common/pdl.cuh"

namespace flashseek {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kChunk = 64 << 10;  // bytes per prefetch instruction

__global__ void __launch_bounds__(kThreads) l2_prefetch_kernel(const char* ptr, int64_t bytes) {
  pdl_launch_dependents();
  // Waiting keeps the PDL contract (a kernel after this one that waits on it also waits for the one
  // before it) and keeps the prefetch off the previous kernel's bandwidth.
  pdl_wait();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int64_t off = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kChunk;
  if (off < bytes) {
    const uint32_t size = uint32_t(min(kChunk, bytes - off)) & ~15u;
    if (size > 0) {
      asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(ptr + off), "r"(size) : "memory");
    }
  }
#endif
}

}  // namespace

void launch_l2_prefetch(const void* ptr, int64_t bytes, cudaStream_t stream) {
  if (bytes < 16) return;
  const int64_t chunks = (bytes + kChunk - 1) / kChunk;
  const int64_t ctas = (chunks + kThreads - 1) / kThreads;
  launch_pdl(l2_prefetch_kernel, dim3(unsigned(ctas)), dim3(kThreads), 0, stream, static_cast<const char*>(ptr),
             bytes);
}

}  // namespace flashseek
