// Device queries shared by the launchers (cached: cudaGetDeviceProperties is slow, and launchers
// must not call it per launch).
#include "common/device_info.h"

#include <array>

#include "common/cuda_check.h"

namespace flashseek {
int device_sm_count(int device) {
  static std::array<int, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) return 0;
  if (cache[device] == 0) {
    int sms = 0;
    FS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device] = sms;
  }
  return cache[device];
}
}  // namespace flashseek
