// Dense FP8 block-scaled GEMM for M > 128: CUTLASS sm90 block-wise FP8 mainloop, 128x128x128
// tiles, two consumer warpgroups (cooperative), persistent tile scheduler, 2x1 clusters so that the
// two CTAs of a cluster share (TMA-multicast) the weight tile.
//
// Operand mapping: A = activations [M, K] (K-major), B = weights [N, K] (K-major), D = out [M, N].
// Scale layouts match ours without conversion: SFA granularity 1x128, MN-major with our padded
// leading dimension (CUTLASS takes the layout from the arguments); SFB 128x128, K-major, which is
// exactly the row-major [ceil(N/128), K/128] weight-scale tensor.
#include "common/cuda_check.h"
#include "gemm/cutlass_fp8_common.cuh"
#include "gemm/fp8_gemm.h"

namespace flashseek {
namespace {
using namespace cute;
using namespace flashseek::cutlass_fp8;

using TileShape = Shape<_128, _128, _128>;
using ClusterShape = Shape<_2, _1, _1>;
using ElementD = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::MN, cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
    void, LayoutD, 8,  // no C operand
    ElementD, LayoutD, 8, cutlass::epilogue::TmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementFp8, cute::tuple<LayoutA, LayoutSFA>, kAlignFp8,
    ElementFp8, cute::tuple<LayoutB, LayoutSFB>, kAlignFp8, ElementAcc, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename CollectiveEpilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum>::CollectiveOp;

using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                        CollectiveEpilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

typename Gemm::Arguments make_args(const Fp8GemmParams& p) {
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  const int m = p.m, n = p.n, k = p.k, kb = p.k / 128;
  StrideA stride_a = cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, k, 1));
  StrideB stride_b = cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, k, 1));
  StrideD stride_d = cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1));
  const int32_t ld = int32_t(p.a_scale_ld);
  // The scales are TMA-loaded, which CUTLASS only accepts for a row count that is a multiple of 4;
  // the padded layout has those rows (the host glue guarantees it), and the extra rows only scale
  // accumulator rows past M, which are never stored.
  const int32_t m4 = (m + 3) / 4 * 4;
  LayoutSFA layout_sfa = make_layout(make_shape(make_shape(_1{}, m4), make_shape(_128{}, int32_t(kb)), int32_t(1)),
                                     make_stride(make_stride(_0{}, _1{}), make_stride(_0{}, ld), int32_t(ld * kb)));
  LayoutSFB layout_sfb = ScaleConfig::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));

  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = p.sm_count;

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {m, n, k, 1},
      {static_cast<const ElementFp8*>(p.a), stride_a, static_cast<const ElementFp8*>(p.b), stride_b, p.a_scale,
       layout_sfa, p.b_scale, layout_sfb},
      {{}, nullptr, stride_d, static_cast<ElementD*>(p.out), stride_d},
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

}  // namespace

size_t fp8_gemm_large_workspace(const Fp8GemmParams& p) { return Gemm::get_workspace_size(make_args(p)); }

void launch_fp8_gemm_large(const Fp8GemmParams& p, void* workspace, cudaStream_t stream) {
  run_gemm<Gemm>(make_args(p), workspace, stream);
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek
