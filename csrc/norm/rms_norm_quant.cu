// RMSNorm fused with the FP8 1x128 activation quantization that follows it wherever the norm's
// output feeds only an FP8 GEMM (the model's input norm before the qkv_a projection, the q_a norm
// before q_b, the post-attention norm before a dense MLP): one kernel writes the e4m3 row and its
// scales, instead of rms_norm writing the 16-bit row and quant_fp8_1x128 reading it back (a launch
// per pair, which is most of the pair's cost at decode sizes).
//
// Bit-identity with quant_fp8_1x128(rms_norm(x)):
//   * The norm is rms_norm's vector path itself: rms_norm_device.cuh's rms_norm_row, launched with
//     rms_norm's shape (rms_norm_vec_iters / rms_norm_vec_threads), so every element has the owner
//     thread it has in rms_norm, the sum of squares rms_norm's order, and the weight is read before
//     the PDL wait on the one-access path exactly as there.
//   * Each normalized value is rounded to x's dtype, as rms_norm stores it, and read back as fp32,
//     as quant_fp8_1x128 loads it.
//   * The quantization is fp8_block_quant.cuh's arithmetic in quant_fp8_1x128's order. A thread's
//     access is 8 consecutive channels (16 bytes); the thread count is a multiple of 32 and n a
//     multiple of 128, so the 16 accesses of a 128-channel block are the 16 lanes of one half-warp in
//     one iteration, lane l holding channels 8l..8l+7 of the block, as in quant_fp8_1x128: the lane's
//     amax over its 8 values in order, then the same half-warp butterfly, scale and e4m3 conversion.
//     A half-warp's accesses are all in the row or all past it, so the shuffles see no missing lane.
//
// Only rms_norm's vector path is implemented: x and residual rows 16-byte aligned (pointer and row
// stride), weight and out 16-byte aligned; the host glue rejects anything else with a message. For
// such inputs rms_norm runs its vector path too, so the comparison holds for every accepted input.
//
// The fused add updates residual as fused_add_rms_norm does (the sum rounded to x's dtype, which
// the norm then reads) and leaves x untouched: the normalized row that fused_add_rms_norm would
// write back to x exists only as the FP8 output, which saves the row's store.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/fp8_block_quant.cuh"
#include "common/pdl.cuh"
#include "norm/norm.h"
#include "norm/rms_norm_device.cuh"

namespace flashseek {
namespace {

using namespace norm_detail;

constexpr int kVec = 8;             // 16 bytes of a 16-bit dtype per access
constexpr int kAccPerBlock = 16;    // accesses (half-warp lanes) per 128-channel scale block

template <typename T, typename W, int kMaxIters, bool kFused>
__global__ void __launch_bounds__(1024) rms_norm_quant_fp8_kernel(RmsNormQuantParams p) {
  static_assert(sizeof(T) * kVec == 16, "one access is 16 bytes");
  __shared__ float smem[33];
  pdl_launch_dependents();
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
  T* res = kFused ? static_cast<T*>(p.residual) + row * p.residual_row_stride : nullptr;
  uint8_t* q = static_cast<uint8_t*>(p.out) + row * p.n;
  rms_norm_row<T, W, kVec, kMaxIters, kFused>(
      x, res, static_cast<const W*>(p.weight), int(p.n / kVec), p.n, p.eps, smem,
      [&](int j, const float (&y)[kVec]) {
        // j % 16 is this lane's place in its half-warp (blockDim is a multiple of 32), j / 16 the block.
        float v[kVec];
        float amax = 0.0f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          v[i] = to_float(from_float<T>(y[i]));  // rms_norm's output value
          amax = max_nan(amax, fabsf(v[i]));
        }
        amax = group_amax<kAccPerBlock>(amax, 0xffffu << (threadIdx.x & 16));
        const float s = fp8_block_scale(amax, p.ue8m0);
        *reinterpret_cast<uint2*>(q + int64_t(j) * kVec) = quantize8_e4m3(v, s);
        if (j % kAccPerBlock == 0) p.scale[int64_t(j / kAccPerBlock) * p.scale_ld + row] = s;
      });
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, typename W, bool kFused>
void launch_typed(const RmsNormQuantParams& p, cudaStream_t stream) {
  const int64_t nacc = p.n / kVec;
  const int iters = rms_norm_vec_iters(nacc);
  const dim3 grid(unsigned(p.m)), block(unsigned(rms_norm_vec_threads(nacc, iters)));
  if (iters == 1) {
    launch_pdl(rms_norm_quant_fp8_kernel<T, W, 1, kFused>, grid, block, 0, stream, p);
  } else {
    launch_pdl(rms_norm_quant_fp8_kernel<T, W, 4, kFused>, grid, block, 0, stream, p);
  }
  FS_CHECK_LAUNCH();
}

template <typename T, bool kFused>
void dispatch_weight(const RmsNormQuantParams& p, cudaStream_t stream) {
  switch (p.weight_dtype) {
    case NormDtype::kBFloat16: return launch_typed<T, __nv_bfloat16, kFused>(p, stream);
    case NormDtype::kFloat16: return launch_typed<T, __half, kFused>(p, stream);
    case NormDtype::kFloat32: return launch_typed<T, float, kFused>(p, stream);
  }
  throw std::invalid_argument("flashseek: rms_norm_quant_fp8: unknown weight dtype");
}

template <bool kFused>
void dispatch(const RmsNormQuantParams& p, cudaStream_t stream) {
  if (p.m == 0) return;
  if (p.n < 128 || p.n > kRmsNormMaxN || p.n % 128 != 0) {
    throw std::invalid_argument("flashseek: rms_norm_quant_fp8: n must be a multiple of 128 in [128, 16384]");
  }
  // Row strides matter only when there is a second row; 16 bytes are 8 elements of either dtype.
  auto rows_ok = [&](const void* ptr, int64_t stride) { return aligned16(ptr) && (p.m <= 1 || stride % 8 == 0); };
  bool ok = rows_ok(p.x, p.x_row_stride) && aligned16(p.weight) && aligned16(p.out) && p.scale != nullptr;
  if (kFused) ok = ok && p.residual != nullptr && rows_ok(p.residual, p.residual_row_stride);
  if (!ok) throw std::invalid_argument("flashseek: rms_norm_quant_fp8: rows, weight and out must be 16-byte aligned");
  switch (p.dtype) {
    case NormDtype::kBFloat16: return dispatch_weight<__nv_bfloat16, kFused>(p, stream);
    case NormDtype::kFloat16: return dispatch_weight<__half, kFused>(p, stream);
    case NormDtype::kFloat32: break;
  }
  throw std::invalid_argument("flashseek: rms_norm_quant_fp8: x must be bf16 or fp16");
}

}  // namespace

void launch_rms_norm_quant_fp8(const RmsNormQuantParams& p, cudaStream_t stream) { dispatch<false>(p, stream); }
void launch_fused_add_rms_norm_quant_fp8(const RmsNormQuantParams& p, cudaStream_t stream) {
  dispatch<true>(p, stream);
}

}  // namespace flashseek
