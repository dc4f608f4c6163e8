// Input validation for the host glue: every failure names the argument and what was expected.
#pragma once
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#define FS_CHECK(cond, ...) TORCH_CHECK(cond, "flashseek: ", __VA_ARGS__)

#define FS_CHECK_CUDA(t) FS_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got device ", (t).device())
#define FS_CHECK_DTYPE(t, dt) \
  FS_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())
#define FS_CHECK_DIM(t, n) FS_CHECK((t).dim() == (n), #t " must be ", (n), "-D, got shape ", (t).sizes())
#define FS_CHECK_CONTIGUOUS(t) \
  FS_CHECK((t).is_contiguous(), #t " must be contiguous, got strides ", (t).strides())
#define FS_CHECK_SAME_DEVICE(a, b)                                                           \
  FS_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device, got ", \
           (a).device(), " and ", (b).device())
#define FS_CHECK_SHAPE(t, ...)                                                           \
  FS_CHECK((t).sizes() == c10::IntArrayRef({__VA_ARGS__}), #t " must have shape [", \
           c10::IntArrayRef({__VA_ARGS__}), "], got ", (t).sizes())
#define FS_CHECK_LAST_DIM_CONTIGUOUS(t) \
  FS_CHECK((t).stride(-1) == 1, #t " must have a unit stride in its last dimension, got strides ", (t).strides())

namespace flashseek {
inline cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
// The data pointer's 16-byte alignment (16-byte vector accesses, TMA).
inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }
// Activation scales [m, kb] written by the quantization kernels: column-major (stride(0) == 1, see
// flashseek.ops.empty_act_scale), leading dimension >= m.
inline void check_act_scale(const at::Tensor& scale, int64_t m, int64_t kb) {
  FS_CHECK_DTYPE(scale, at::kFloat);
  FS_CHECK_SHAPE(scale, m, kb);
  FS_CHECK(m <= 1 || scale.stride(0) == 1,
           "scale must be column-major (stride(0) == 1, see empty_act_scale), got strides ", scale.strides());
  FS_CHECK(kb <= 1 || scale.stride(1) >= m, "scale must have a leading dimension >= ", m, ", got strides ",
           scale.strides());
}
}  // namespace flashseek
