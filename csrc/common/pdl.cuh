// Programmatic dependent launch (sm_90): a kernel launched with launch_pdl may start while the
// previous kernel on its stream is still running, as soon as that kernel has executed
// pdl_launch_dependents() (or finished); its launch latency and prologue then overlap that tail.
// The contract, for every kernel launched this way: call pdl_wait() before the first access to
// global memory (it returns once the previous kernel has completed and its writes are visible), so
// the launch is safe after any kernel, including ones that know nothing of PDL.
#pragma once
#include <cuda_runtime.h>

#include <utility>

#include "common/cuda_check.h"

namespace flashseek {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel on the stream (if launched with launch_pdl) start its launch now.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

namespace detail {
// cudaLaunchKernelEx with programmatic stream serialization, and a cluster dimension when `cluster` is
// not null.
template <typename... KernelArgs, typename... Args>
void launch_pdl_ex(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                   const dim3* cluster, Args&&... args) {
  cudaLaunchAttribute attrs[2]{};
  attrs[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[0].val.programmaticStreamSerializationAllowed = 1;
  if (cluster != nullptr) {
    attrs[1].id = cudaLaunchAttributeClusterDimension;
    attrs[1].val.clusterDim.x = cluster->x;
    attrs[1].val.clusterDim.y = cluster->y;
    attrs[1].val.clusterDim.z = cluster->z;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = cluster != nullptr ? 2 : 1;
  FS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}
}  // namespace detail

template <typename... KernelArgs, typename... Args>
void launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                Args&&... args) {
  detail::launch_pdl_ex(kernel, grid, block, smem_bytes, stream, nullptr, std::forward<Args>(args)...);
}

// launch_pdl in thread-block clusters of `cluster` CTAs.
template <typename... KernelArgs, typename... Args>
void launch_pdl_clusters(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                         dim3 cluster, Args&&... args) {
  detail::launch_pdl_ex(kernel, grid, block, smem_bytes, stream, &cluster, std::forward<Args>(args)...);
}

}  // namespace flashseek
