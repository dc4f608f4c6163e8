// TMA tensor maps shared by the hand-written sm90 GEMM kernels (host side, no torch headers).
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cstdint>

namespace flashseek {

// The driver's cuTensorMapEncodeTiled, looked up once per process.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encode_fn();

// Row-major fp8 matrix [rows, k] (k contiguous), loaded as 128-byte-wide boxes of `box_rows` rows
// into 128B-swizzled shared memory. Rows and columns past the matrix read as zeros.
CUtensorMap fp8_rows_map(const void* base, int64_t rows, int64_t k, int box_rows);

}  // namespace flashseek
