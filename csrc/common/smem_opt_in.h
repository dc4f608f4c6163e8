// A kernel that uses more than 48 KB of dynamic shared memory must opt in through
// cudaFuncSetAttribute, on every device it runs on. The attribute persists, so launchers call
// opt_in_dynamic_smem before each launch and only the first call on a device (or one asking for more
// bytes than before) reaches the driver; the others cost an atomic load. The one mechanism for every
// launcher (they had five variants: per launch, call_once per device modulo 64, flags).
#pragma once
#include <cuda_runtime.h>

#include <atomic>

#include "common/cuda_check.h"

namespace flashseek {

template <auto kKernel>
void opt_in_dynamic_smem(int bytes) {
  constexpr int kMaxDevices = 64;  // devices past this simply call the driver every time
  static std::atomic<int> granted[kMaxDevices] = {};
  int device = 0;
  FS_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && granted[device].load(std::memory_order_acquire) >= bytes) return;
  FS_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (cached) {
    int seen = granted[device].load(std::memory_order_relaxed);
    while (seen < bytes && !granted[device].compare_exchange_weak(seen, bytes, std::memory_order_release)) {
    }
  }
}

}  // namespace flashseek
