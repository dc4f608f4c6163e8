// Shared machinery of the grouped FP8 GEMMs (MoE experts) on CUTLASS's sm90 pointer-array
// block-wise FP8 kernel, contiguous and masked layouts.
//
// No host sync and CUDA-graph capturable: a small prepare kernel reads expert_offsets / masked_m on
// the device and writes the per-group problem shapes, pointers and strides that CUTLASS reads; the
// problem shapes are device-only (the scheduler launches one CTA per SM and walks the groups).
//
// Scale layouts: the weight scales [E, ceil(N/128), K/128] are K-major per group, which CUTLASS
// reads directly. CUTLASS's grouped mainloop derives each group's activation-scale layout from the
// group's own row count (MN-major, leading dimension M_e), which our padded layout cannot express,
// so the prepare kernel also copies each group's valid scale rows into that compact layout. The cost
// is one read + write of the valid rows' scales: M*K/128*8 bytes, 1/16 of the A operand's bytes.
//
// Cfg::kSwap puts the tokens in the MMA's N (A' = weights, B' = activations, D' = out^T), which is
// the same compact scale layout seen as the B' operand's MN-major scales.
#pragma once
#include <algorithm>
#include <type_traits>

#include "common/cuda_check.h"
#include "gemm/cutlass_fp8_common.cuh"
#include "gemm/fp8_gemm.h"

namespace flashseek::cutlass_fp8 {

using GroupedProblemShape = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;

// The CUTLASS kernel of a grouped block-scaled FP8 GEMM. The rows-in-M and the swapped (tokens in
// the MMA's N) variants differ only in the choices taken as parameters; each variant is instantiated
// in its own translation unit so that they compile in parallel.
//   kSwap = false: A = activations [M_e, K], B = weights [N, K], D = out [M_e, N] row-major;
//                  activation scales 1x128 MN-major (SFA), weight scales 128x128 K-major (SFB).
//   kSwap = true:  A' = weights, B' = activations, D' = out^T column-major; the scale roles swap.
template <bool Swap, class TileShape_, class ClusterShape_>
struct GroupedKernelConfig {
  static constexpr bool kSwap = Swap;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;
  using ElementD = cutlass::bfloat16_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = std::conditional_t<Swap, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;
  using ScaleConfig = std::conditional_t<
      Swap, cutlass::detail::Sm90BlockwiseScaleConfig<128, 1, 128, cute::GMMA::Major::K, cute::GMMA::Major::MN>,
      cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::MN, cute::GMMA::Major::K>>;
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

template <class Cfg>
struct GroupedRunner {
  using Gemm = typename Cfg::Gemm;
  using GemmKernel = typename Gemm::GemmKernel;
  using ElementD = typename Cfg::ElementD;
  using UnderlyingShape = typename GroupedProblemShape::UnderlyingProblemShape;
  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  static constexpr size_t kAlign = 256;
  static size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

  // Per-group arrays the prepare kernel writes, carved out of one workspace buffer.
  struct Arrays {
    UnderlyingShape* shapes;
    const ElementFp8** ptr_a;
    const ElementFp8** ptr_b;
    const float** ptr_sfa;
    const float** ptr_sfb;
    ElementD** ptr_d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    float* compact_scale;
    char* cutlass_ws;
    size_t end;
  };

  static Arrays carve(const GroupedFp8GemmParams& p, char* base) {
    Arrays g{};
    const size_t e = size_t(p.num_experts);
    // The compact scales hold every row of a in either layout.
    const size_t rows = p.masked_m ? e * size_t(p.m_rows) : size_t(p.m_rows);
    size_t off = 0;
    auto take = [&](size_t bytes) {
      char* ptr = base ? base + off : nullptr;
      off += align_up(bytes);
      return ptr;
    };
    g.shapes = reinterpret_cast<UnderlyingShape*>(take(e * sizeof(UnderlyingShape)));
    g.ptr_a = reinterpret_cast<const ElementFp8**>(take(e * sizeof(void*)));
    g.ptr_b = reinterpret_cast<const ElementFp8**>(take(e * sizeof(void*)));
    g.ptr_sfa = reinterpret_cast<const float**>(take(e * sizeof(void*)));
    g.ptr_sfb = reinterpret_cast<const float**>(take(e * sizeof(void*)));
    g.ptr_d = reinterpret_cast<ElementD**>(take(e * sizeof(void*)));
    g.stride_a = reinterpret_cast<StrideA*>(take(e * sizeof(StrideA)));
    g.stride_b = reinterpret_cast<StrideB*>(take(e * sizeof(StrideB)));
    g.stride_d = reinterpret_cast<StrideD*>(take(e * sizeof(StrideD)));
    g.compact_scale = reinterpret_cast<float*>(take(rows * (p.k / 128) * sizeof(float)));
    g.cutlass_ws = base ? base + off : nullptr;
    g.end = off;
    return g;
  }

  static typename Gemm::Arguments make_args(const GroupedFp8GemmParams& p, const Arrays& g) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = current_device();
    hw.sm_count = p.sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {p.num_experts, g.shapes, nullptr},
        {g.ptr_a, g.stride_a, g.ptr_b, g.stride_b, g.ptr_sfa, nullptr, g.ptr_sfb, nullptr},
        {{}, nullptr, nullptr, g.ptr_d, g.stride_d},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    apply_tuning(args.scheduler, tuning());
    return args;
  }

  // Grouped-scheduler knobs (FLASHSEEK_GROUPED_SWIZZLE / _RASTER; default: swizzle 1, along M).
  static SchedTuning tuning() {
    static const SchedTuning t = [] {
      SchedTuning s = sched_tuning_from_env("FLASHSEEK_GROUPED");
      // CUTLASS rounds every group's tile counts up to multiples of the swizzle (times the cluster),
      // and the rounded-up tiles run a full (zero-filled) mainloop; group sizes are device-side, so
      // no swizzle by default.
      if (s.swizzle == 0) s.swizzle = 1;
      if (s.raster == 0) s.raster = 1;  // CUTLASS's grouped default; no heuristic for groups
      return s;
    }();
    return t;
  }

  // The arguments hold only workspace-derived device arrays (the prepare kernel fills them on every
  // launch), so the Params depend on the workspace pointer, the group count and the sizes.
  static LaunchKey key(const GroupedFp8GemmParams& p) {
    const SchedTuning t = tuning();
    LaunchKey k;
    k.add(p.num_experts).add(p.m_rows).add(p.n).add(p.k).add(p.sm_count).add(p.masked_m != nullptr ? 1 : 0);
    k.add(t.swizzle).add(t.raster);
    return k;
  }

  static size_t workspace(const GroupedFp8GemmParams& p) {
    Arrays g = carve(p, nullptr);
    return g.end + align_up(Gemm::get_workspace_size(make_args(p, g)));
  }

  static void launch(const GroupedFp8GemmParams& p, void* workspace_ptr, size_t workspace_bytes,
                     cudaStream_t stream);
};

template <class Cfg>
__global__ void prepare_groups_kernel(GroupedFp8GemmParams p, typename GroupedRunner<Cfg>::Arrays g) {
  using R = GroupedRunner<Cfg>;
  const int e = blockIdx.x;
  const int kb_count = p.k / 128;
  int64_t start;  // first row of the group in a / out viewed as [rows, K] / [rows, N]
  int rows;
  const float* src_scale;  // (i, kb) at src_scale[kb * ld + i]
  if (p.masked_m) {
    rows = min(max(p.masked_m[e], 0), p.m_rows);
    start = int64_t(e) * p.m_rows;
    src_scale = p.a_scale + int64_t(e) * p.a_scale_estride;
  } else {
    const int lo = min(max(p.expert_offsets[e], 0), p.m_rows);
    const int hi = min(max(p.expert_offsets[e + 1], lo), p.m_rows);
    rows = hi - lo;
    start = lo;
    src_scale = p.a_scale + lo;
  }
  // Groups with valid offsets own disjoint row ranges, so their compact scales never overlap.
  float* dst_scale = g.compact_scale + start * kb_count;
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    const ElementFp8* act = static_cast<const ElementFp8*>(p.a) + start * p.k;
    const ElementFp8* wgt = static_cast<const ElementFp8*>(p.b) + int64_t(e) * p.n * p.k;
    const float* wgt_scale = p.b_scale + int64_t(e) * ((p.n + 127) / 128) * kb_count;
    g.ptr_d[e] = static_cast<typename R::ElementD*>(p.out) + start * p.n;
    if constexpr (Cfg::kSwap) {
      g.shapes[e] = typename R::UnderlyingShape(p.n, rows, p.k);
      g.ptr_a[e] = wgt;
      g.ptr_b[e] = act;
      g.ptr_sfa[e] = wgt_scale;
      g.ptr_sfb[e] = dst_scale;
      g.stride_a[e] = cutlass::make_cute_packed_stride(typename R::StrideA{}, cute::make_shape(p.n, p.k, 1));
      g.stride_b[e] = cutlass::make_cute_packed_stride(typename R::StrideB{}, cute::make_shape(rows, p.k, 1));
      g.stride_d[e] = cutlass::make_cute_packed_stride(typename R::StrideD{}, cute::make_shape(p.n, rows, 1));
    } else {
      g.shapes[e] = typename R::UnderlyingShape(rows, p.n, p.k);
      g.ptr_a[e] = act;
      g.ptr_b[e] = wgt;
      g.ptr_sfa[e] = dst_scale;
      g.ptr_sfb[e] = wgt_scale;
      g.stride_a[e] = cutlass::make_cute_packed_stride(typename R::StrideA{}, cute::make_shape(rows, p.k, 1));
      g.stride_b[e] = cutlass::make_cute_packed_stride(typename R::StrideB{}, cute::make_shape(p.n, p.k, 1));
      g.stride_d[e] = cutlass::make_cute_packed_stride(typename R::StrideD{}, cute::make_shape(rows, p.n, 1));
    }
  }
  for (int kb = blockIdx.y; kb < kb_count; kb += gridDim.y) {
    const float* src = src_scale + int64_t(kb) * p.a_scale_ld;
    float* dst = dst_scale + int64_t(kb) * rows;
    for (int i = threadIdx.x; i < rows; i += blockDim.x) dst[i] = src[i];
  }
}

template <class Cfg>
void GroupedRunner<Cfg>::launch(const GroupedFp8GemmParams& p, void* workspace_ptr, size_t workspace_bytes,
                                cudaStream_t stream) {
  if (p.num_experts == 0 || p.m_rows == 0) return;
  Arrays g = carve(p, static_cast<char*>(workspace_ptr));
  if (g.end + align_up(Gemm::get_workspace_size(make_args(p, g))) > workspace_bytes) {
    throw std::runtime_error("flashseek: grouped_fp8_gemm workspace too small");
  }
  const int kb_count = p.k / 128;
  const int blocks_y = std::clamp(2048 / p.num_experts, 1, kb_count);
  prepare_groups_kernel<Cfg><<<dim3(p.num_experts, blocks_y), 256, 0, stream>>>(p, g);
  FS_CHECK_LAUNCH();
  run_gemm<Gemm>(make_args(p, g), key(p), g.cutlass_ws, stream);
  FS_CHECK_LAUNCH();
}

}  // namespace flashseek::cutlass_fp8
