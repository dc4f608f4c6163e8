// wgmma issue helper shared by the hand-written sm_90a GEMM kernels.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>

#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>

namespace flashseek {

// One wgmma of the cute SM90 GMMA op `Op` (both operands in shared memory, by descriptor) into the
// N fp32 accumulators `d`; call with std::make_index_sequence<N>{}. accumulate = false overwrites d.
template <class Op, int N, size_t... I>
__device__ __forceinline__ void wgmma_ss(uint64_t desc_a, uint64_t desc_b, float (&d)[N], bool accumulate,
                                         std::index_sequence<I...>) {
  Op::fma(desc_a, desc_b, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}

}  // namespace flashseek
