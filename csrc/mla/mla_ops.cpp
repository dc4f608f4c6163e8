// Host glue for the mla kernels: validates inputs and calls the launchers.
#include "common/torch_checks.h"
#include "registration.h"

namespace flashseek {
void register_mla_cuda(torch::Library& m) {
  // No CUDA kernels registered yet: the op runs its reference implementation on CUDA tensors.
}
}  // namespace flashseek
