// The 256 x 128 tile instantiation of the hand-written sm90 FP8 GEMM (fp8_gemm_sm90.cuh), in its own
// translation unit so that it compiles beside the 128-row one. Three stages of 49 KB plus the
// 68 KB output staging tile fill the shared memory.
#include "gemm/fp8_gemm_sm90_launch.cuh"

namespace flashseek::sm90gemm {

void launch_tiles_bm256(const Problem& pr, int64_t max_units, cudaStream_t stream) {
  launch_tiles<256, 3>(pr, max_units, stream);
}

}  // namespace flashseek::sm90gemm
