// FP8 1x128 activation quantization launchers (plain CUDA, no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace flashseek {

struct QuantFp8Params {
  const void* x;         // [m, n] (quant) or gate_up [m, 2n] (silu_mul), bf16 or fp16
  int64_t x_row_stride;  // elements between rows of x; unit stride along a row
  void* out;             // e4m3 [m, n], contiguous
  float* scale;          // element (i, kb) at scale[kb * scale_ld + i]
  int64_t scale_ld;
  int64_t m;
  int64_t n;             // output columns, a multiple of 128
  bool fp16;             // input dtype: fp16 when true, else bf16
  bool ue8m0;            // round each scale up to a power of two
  // Masked rows (silu_mul in the masked MoE layout): rows come in groups of rows_per_group and only
  // the first masked_m[group] rows of each are computed. Null: every row.
  const int32_t* masked_m = nullptr;
  int64_t rows_per_group = 0;
};

void launch_quant_fp8_1x128(const QuantFp8Params& p, cudaStream_t stream);
void launch_silu_mul_quant_fp8(const QuantFp8Params& p, cudaStream_t stream);

}  // namespace flashseek
