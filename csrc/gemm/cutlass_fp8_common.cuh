// Shared CUTLASS 4.2 plumbing of the FP8 block-scaled GEMMs (sm90 block-wise collectives).
#pragma once
#include <atomic>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"

namespace flashseek::cutlass_fp8 {

using ElementFp8 = cutlass::float_e4m3_t;
using ElementAcc = float;
constexpr int kAlignFp8 = 16;  // elements per 16-byte TMA access

inline void check_status(cutlass::Status st, const char* what) {
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("flashseek: CUTLASS ") + what + " failed: " +
                             cutlassGetStatusString(st));
  }
}

// Runs an adapter-wrapped kernel: can_implement, workspace init, TMA descriptors, launch. The
// adapter's initialize() would also raise the dynamic shared-memory limit on every call, a driver
// round trip that decode-sized GEMMs cannot afford; it is done once per device here instead.
template <class Gemm>
void run_gemm(typename Gemm::Arguments const& args, void* workspace, cudaStream_t stream) {
  using Kernel = typename Gemm::GemmKernel;
  check_status(Gemm::can_implement(args), "can_implement");
  check_status(Kernel::initialize_workspace(args, workspace, stream, nullptr), "initialize_workspace");
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, workspace);

  constexpr int kMaxDevices = 64;
  static std::atomic<bool> smem_set[kMaxDevices] = {};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice", __FILE__, __LINE__);
  constexpr int smem = int(Kernel::SharedStorageSize);
  if (smem >= (48 << 10) && (device >= kMaxDevices || !smem_set[device].load(std::memory_order_acquire))) {
    check_cuda(cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
               "cudaFuncSetAttribute", __FILE__, __LINE__);
    if (device < kMaxDevices) smem_set[device].store(true, std::memory_order_release);
  }
  check_status(Gemm::run(params, stream), "run");
}

}  // namespace flashseek::cutlass_fp8
