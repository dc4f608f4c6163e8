// Grouped FP8 block-scaled GEMM for decode-sized groups (masked layout, M_max <= 64): the operands
// are swapped so that each expert's few tokens sit in the MMA's N (64-wide tiles) and the expert's
// weight rows fill 128-row M tiles; the whole step is a weight read, and the narrower token tile
// leaves shared memory for deeper weight pipelining than 128x128 tiles.
// A' = weights [N, K] (K-major), B' = activations [M_e, K] (K-major), D' = out^T [N, M_e] column-major.
// Scales: SFA' = the weight scales (128x128, K-major); SFB' = the compact per-group activation
// scales (1x128, MN-major with leading dimension M_e), written by the shared prepare kernel.
#include "gemm/grouped_fp8_common.cuh"

namespace flashseek {
namespace {
using namespace cute;
using namespace flashseek::cutlass_fp8;

using TokensInN = GroupedKernelConfig<true, Shape<_128, _64, _128>, Shape<_1, _1, _1>>;

using Runner = GroupedRunner<TokensInN>;

}  // namespace

size_t grouped_fp8_gemm_swap_workspace(const GroupedFp8GemmParams& p) { return Runner::workspace(p); }

void launch_grouped_fp8_gemm_swap(const GroupedFp8GemmParams& p, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  Runner::launch(p, workspace, workspace_bytes, stream);
}

}  // namespace flashseek
