// Launch-error checking for kernel translation units (no torch headers here).
#pragma once
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace flashseek {
inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flashseek: CUDA error in ") + what + " at " + file + ":" +
                             std::to_string(line) + ": " + cudaGetErrorString(err));
  }
}
}  // namespace flashseek

#define FS_CUDA_CHECK(expr) ::flashseek::check_cuda((expr), #expr, __FILE__, __LINE__)
#define FS_CHECK_LAUNCH() ::flashseek::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)
