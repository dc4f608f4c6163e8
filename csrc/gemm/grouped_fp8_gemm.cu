// Grouped FP8 block-scaled GEMM, rows in the MMA's M: 128x128x128 tiles, two consumer warpgroups
// (cooperative), persistent group scheduler, 1x2 clusters: the two CTAs of a cluster compute
// neighbouring N tiles of the same rows and share (TMA-multicast) the activation tile, which halves
// the activation traffic from L2 and works for groups of a single M tile (MoE prefill, ~128 rows per
// expert); along M a cluster would pair tiles that small groups do not have.
// Used for the contiguous (prefill) layout and for masked batches with M_max > 64.
// The shared machinery (prepare kernel, compact scales) is in grouped_fp8_common.cuh.
#include "gemm/grouped_fp8_common.cuh"

namespace flashseek {
namespace {
using namespace cute;
using namespace flashseek::cutlass_fp8;

using RowsInM = GroupedKernelConfig<false, Shape<_128, _128, _128>, Shape<_1, _2, _1>>;

using Runner = GroupedRunner<RowsInM>;

}  // namespace

size_t grouped_fp8_gemm_rows_workspace(const GroupedFp8GemmParams& p) { return Runner::workspace(p); }

void launch_grouped_fp8_gemm_rows(const GroupedFp8GemmParams& p, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  Runner::launch(p, workspace, workspace_bytes, stream);
}

}  // namespace flashseek
