// Host glue for the routing kernels: validates inputs and calls the launchers.
#include "common/torch_checks.h"
#include "registration.h"

namespace flashseek {
void register_routing_cuda(torch::Library& m) {
  // No CUDA kernels registered yet: the op runs its reference implementation on CUDA tensors.
}
}  // namespace flashseek
