// Dense FP8 block-scaled GEMM for M > 128: CUTLASS sm90 block-wise FP8 mainloop, 128x128x128
// tiles, two consumer warpgroups (cooperative), 2x1 clusters so that the two CTAs of a cluster share
// (TMA-multicast) the weight tile. Templated on the tile scheduler; each instantiation lives in its
// own translation unit (CI compiles them in parallel):
//   fp8_gemm_large.cu    persistent data-parallel scheduler (full waves of tiles)
//   fp8_gemm_streamk.cu  stream-K scheduler (tile counts that leave a mostly empty last wave)
// The dispatch rule is in fp8_gemm_dispatch.cu and docs/gemm-design.md.
//
// Operand mapping: A = activations [M, K] (K-major), B = weights [N, K] (K-major), D = out [M, N].
// Scale layouts match ours without conversion: SFA granularity 1x128, MN-major with our padded
// leading dimension (CUTLASS takes the layout from the arguments); SFB 128x128, K-major, which is
// exactly the row-major [ceil(N/128), K/128] weight-scale tensor.
#pragma once
#include <type_traits>

#include "common/cuda_check.h"
#include "gemm/cutlass_fp8_common.cuh"
#include "gemm/fp8_gemm.h"

namespace flashseek::cutlass_fp8 {

// The scheduler-independent parts live at namespace scope (the host compiler rejects the epilogue
// builder as a non-dependent member of a class template).
namespace large_gemm {
using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
using ElementD = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::RowMajor;
using ScaleConfig =
    cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::MN, cute::GMMA::Major::K>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

using Collectives =
    BlockScaledCollectives<TileShape, ClusterShape, LayoutA, LayoutSFA, LayoutB, LayoutSFB, ElementD, LayoutD>;
using CollectiveEpilogue = Collectives::Epilogue;
using CollectiveMainloop = Collectives::Mainloop;

}  // namespace large_gemm

template <class SchedulerTag>
struct LargeGemm {
  using TileShape = large_gemm::TileShape;
  using ElementD = large_gemm::ElementD;
  using ScaleConfig = large_gemm::ScaleConfig;
  using LayoutSFA = large_gemm::LayoutSFA;
  using LayoutSFB = large_gemm::LayoutSFB;
  using CollectiveMainloop = large_gemm::CollectiveMainloop;
  using CollectiveEpilogue = large_gemm::CollectiveEpilogue;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue, SchedulerTag>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static constexpr bool kStreamK = std::is_same_v<SchedulerTag, cutlass::gemm::StreamKScheduler>;

  // Tile-walk swizzle of the persistent kernel (docs/gemm-design.md): CUTLASS walks stripes of
  // `swizzle` tiles across the raster direction, so a wave of 132 CTAs touches ~16 x 8 tiles instead
  // of 32 x 4 (4096 x 7168: 49 MB of A and B rows per wave instead of 72 MB). CUTLASS rounds both tile
  // counts up to multiples of swizzle x cluster and runs the extra tiles as zero-filled mainloops, so
  // a swizzle is only used where it divides both counts. Stream-K keeps the plain walk.
  static int auto_swizzle(const Fp8GemmParams& p) {
    if (kStreamK) return 1;
    const int tiles_m = (p.m + 127) / 128, tiles_n = (p.n + 127) / 128;
    for (int s : {8, 4, 2}) {
      if (tiles_m % (2 * s) == 0 && tiles_n % s == 0 && tiles_m >= 2 * s && tiles_n >= 2 * s) return s;
    }
    return 1;
  }

  static SchedTuning tuning(const Fp8GemmParams& p) {
    static const SchedTuning env = sched_tuning_from_env("FLASHSEEK_GEMM");
    SchedTuning t = env;
    if (t.swizzle == 0) t.swizzle = auto_swizzle(p);
    return t;
  }

  static typename Gemm::Arguments make_args(const Fp8GemmParams& p) {
    using namespace cute;
    using StrideA = typename GemmKernel::StrideA;
    using StrideB = typename GemmKernel::StrideB;
    using StrideD = typename GemmKernel::StrideD;
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
    hw.device_id = current_device();
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
    apply_tuning(args.scheduler, tuning(p));
    return args;
  }

  static LaunchKey key(const Fp8GemmParams& p) {
    LaunchKey k;
    const SchedTuning t = tuning(p);
    k.add(p.a).add(p.a_scale).add(p.a_scale_ld).add(p.b).add(p.b_scale).add(p.out);
    k.add(p.m).add(p.n).add(p.k).add(p.sm_count).add(t.swizzle).add(t.raster);
    return k;
  }

  static size_t workspace(const Fp8GemmParams& p) { return Gemm::get_workspace_size(make_args(p)); }

  static void launch(const Fp8GemmParams& p, void* workspace, cudaStream_t stream) {
    run_gemm<Gemm>(make_args(p), key(p), workspace, stream);
    FS_CHECK_LAUNCH();
  }
};

}  // namespace flashseek::cutlass_fp8
