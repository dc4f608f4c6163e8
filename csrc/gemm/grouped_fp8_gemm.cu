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

struct RowsInM {
  static constexpr bool kSwap = false;
  using TileShape = Shape<_128, _128, _128>;
  using ClusterShape = Shape<_1, _2, _1>;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  using ScaleConfig =
      cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::MN, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
      void, LayoutD*, 8,  // no C operand
      ElementD, LayoutD*, 8, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementFp8, cute::tuple<LayoutA*, LayoutSFA*>,
      kAlignFp8, ElementFp8, cute::tuple<LayoutB*, LayoutSFB*>, kAlignFp8, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8BlockScaledAccum>::CollectiveOp;

  using GemmKernel =
      cutlass::gemm::kernel::GemmUniversal<GroupedProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
};

using Runner = GroupedRunner<RowsInM>;

}  // namespace

size_t grouped_fp8_gemm_rows_workspace(const GroupedFp8GemmParams& p) { return Runner::workspace(p); }

void launch_grouped_fp8_gemm_rows(const GroupedFp8GemmParams& p, void* workspace, size_t workspace_bytes,
                                  cudaStream_t stream) {
  Runner::launch(p, workspace, workspace_bytes, stream);
}

}  // namespace flashseek
