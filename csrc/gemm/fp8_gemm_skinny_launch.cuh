// Host-side launch of one build of the decode GEMM kernel (fp8_gemm_skinny.cuh). Each build is
// instantiated in its own translation unit (fp8_gemm_skinny.cu: direct stores; fp8_gemm_skinny_staged.cu:
// the staged epilogue), so that the two compile in parallel.
#pragma once
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/pdl.cuh"
#include "common/smem_opt_in.h"
#include "gemm/fp8_gemm_skinny.cuh"

namespace flashseek {

// A programmatic dependent launch (common/pdl.cuh): it overlaps whatever precedes it.
template <bool kStaged>
void launch_skinny_kernel(const CUtensorMap& tmap_w, const skinny::TokenMaps& tmap_x, const skinny::Params& kp,
                          int ctas, cudaStream_t stream) {
  constexpr int kSmem = skinny::Smem::kDynamic<kStaged>;
  opt_in_dynamic_smem<skinny::skinny_kernel<kStaged>>(kSmem);
  if (ctas > skinny::kMaxCtas) throw std::runtime_error("flashseek: the decode GEMM runs at most 1024 CTAs (one per SM)");
  launch_pdl(skinny::skinny_kernel<kStaged>, dim3(unsigned(ctas)), dim3(skinny::kThreads), size_t(kSmem), stream,
             tmap_w, tmap_x, kp);
}

// Defined in fp8_gemm_skinny_staged.cu.
void launch_skinny_kernel_staged(const CUtensorMap& tmap_w, const skinny::TokenMaps& tmap_x,
                                 const skinny::Params& kp, int ctas, cudaStream_t stream);

}  // namespace flashseek
