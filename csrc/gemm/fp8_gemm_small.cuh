// Dense FP8 block-scaled GEMM for M <= 128 (decode): the operands are swapped so that the tokens sit
// in the MMA's N dimension (64-wide tiles) and the weight rows fill the 128-row M tiles; the weight
// read dominates, so K is split into batches when the tiles alone cannot fill the SMs.
//
// Swapped mapping: A' = weights [N, K] (K-major), B' = activations [M, K] (K-major),
// D' = out^T, i.e. [N, M] column-major, which is our row-major out [M, N].
// Scales without conversion: SFA' = weight scales 128x128, K-major (row-major [ceil(N/128), K/128]);
// SFB' = activation scales 1x128, MN-major with our padded leading dimension.
// Split-K: batch l covers K blocks [l*K/S, (l+1)*K/S); every operand gets a batch stride pointing at
// its own K slice and the fp32 partials land in [S, M, N].
//
// Instantiations: fp8_gemm_small.cu (no cluster; bf16 out, and fp32 partials for split-K) and
// fp8_gemm_small_mc.cu (1x2 cluster along the tokens, bf16, no split: 64 < M <= 128, where the two
// token tiles of a weight tile share one multicast weight read; see docs/gemm-design.md).
#pragma once
#include "common/cuda_check.h"
#include "gemm/cutlass_fp8_common.cuh"
#include "gemm/fp8_gemm.h"

namespace flashseek::cutlass_fp8::small_gemm {
using namespace cute;

using TileShape = Shape<_128, _64, _128>;
using LayoutA = cutlass::layout::RowMajor;
using LayoutB = cutlass::layout::ColumnMajor;
using LayoutD = cutlass::layout::ColumnMajor;
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<128, 1, 128, cute::GMMA::Major::K, cute::GMMA::Major::MN>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

template <class ElementD, int ClusterN>
struct SwapGemm {
  using ClusterShape = Shape<_1, Int<ClusterN>, _1>;
  using Collectives = BlockScaledCollectives<TileShape, ClusterShape, LayoutA, LayoutSFA, LayoutB, LayoutSFB,
                                             ElementD, LayoutD>;
  using CollectiveEpilogue = typename Collectives::Epilogue;
  using CollectiveMainloop = typename Collectives::Mainloop;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                          CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static typename Gemm::Arguments make_args(const Fp8GemmParams& p, int split, ElementD* d) {
    using StrideA = typename GemmKernel::StrideA;
    using StrideB = typename GemmKernel::StrideB;
    using StrideD = typename GemmKernel::StrideD;
    const int m = p.m, n = p.n, k = p.k;
    const int kb = k / 128, kb_split = kb / split, k_split = k / split;
    const int nb = (n + 127) / 128;
    const int32_t ld = int32_t(p.a_scale_ld);
    // Every batch keeps the full matrices' row strides and starts k_split further along K.
    StrideA stride_a = make_stride(int64_t(k), _1{}, int64_t(k_split));
    StrideB stride_b = make_stride(int64_t(k), _1{}, int64_t(k_split));
    StrideD stride_d = make_stride(_1{}, int64_t(n), int64_t(n) * m);
    LayoutSFA layout_sfa = make_layout(
        make_shape(make_shape(_128{}, int32_t(nb)), make_shape(_128{}, int32_t(kb_split)), int32_t(split)),
        make_stride(make_stride(_0{}, int32_t(kb)), make_stride(_0{}, _1{}), int32_t(kb_split)));
    // TMA-loaded: CUTLASS wants a multiple of 4 rows; the padded layout has them and the extra
    // rows only scale accumulator columns past M, which are never stored.
    const int32_t m4 = (m + 3) / 4 * 4;
    LayoutSFB layout_sfb = make_layout(
        make_shape(make_shape(_1{}, m4), make_shape(_128{}, int32_t(kb_split)), int32_t(split)),
        make_stride(make_stride(_0{}, _1{}), make_stride(_0{}, ld), int32_t(ld * kb_split)));

    cutlass::KernelHardwareInfo hw;
    hw.device_id = current_device();
    hw.sm_count = p.sm_count;

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kBatched,
        {n, m, k_split, split},
        {static_cast<const ElementFp8*>(p.b), stride_a, static_cast<const ElementFp8*>(p.a), stride_b, p.b_scale,
         layout_sfa, p.a_scale, layout_sfb},
        {{}, nullptr, stride_d, d, stride_d},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    return args;
  }

  static LaunchKey key(const Fp8GemmParams& p, int split, ElementD* d) {
    LaunchKey k;
    k.add(p.a).add(p.a_scale).add(p.a_scale_ld).add(p.b).add(p.b_scale).add(d);
    k.add(p.m).add(p.n).add(p.k).add(p.sm_count).add(split);
    return k;
  }
};

}  // namespace flashseek::cutlass_fp8::small_gemm
