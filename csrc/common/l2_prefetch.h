// L2 prefetch of a buffer that a later kernel will read (plain CUDA, no torch headers).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace flashseek {

// Issues cp.async.bulk.prefetch.L2 for [ptr, ptr + bytes) (ptr 16-byte aligned; a tail under 16 bytes
// is left out). A programmatic dependent launch that issues nothing before the previous kernel has
// completed, so that it takes no bandwidth from it, and that lets the next kernel launch at once.
void launch_l2_prefetch(const void* ptr, int64_t bytes, cudaStream_t stream);

}  // namespace flashseek
