// Shared CUTLASS 4.2 plumbing of the FP8 block-scaled GEMMs (sm90 block-wise collectives).
#pragma once
#include <array>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/cuda_check.h"
#include "common/smem_opt_in.h"

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/numeric_types.h"
#include "cutlass/util/packed_stride.hpp"

namespace flashseek::cutlass_fp8 {

using ElementFp8 = cutlass::float_e4m3_t;
using ElementAcc = float;
constexpr int kAlignFp8 = 16;  // elements per 16-byte TMA access

inline void check_status(cutlass::Status st, const char* what) {
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("flashseek: CUTLASS ") + what + " failed: " +
                             cutlassGetStatusString(st));
  }
}

// The dense kernels' collectives: no C operand, D stored by TMA, and the cooperative warp-specialized
// FP8 block-scaled mainloop with as many stages as the shared memory left by the epilogue allows.
// Only the operand / scale layouts, the tile and cluster shapes and D differ between the large-M
// (rows in M) and the swapped small-M kernels.
template <class TileShape, class ClusterShape, class LayoutA, class LayoutSFA, class LayoutB, class LayoutSFB,
          class ElementD, class LayoutD>
struct BlockScaledCollectives {
  static constexpr int kAlignD = 16 / int(sizeof(ElementD));
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
      void, LayoutD, kAlignD,  // no C operand
      ElementD, LayoutD, kAlignD, cutlass::epilogue::TmaWarpSpecializedCooperative,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementFp8, cute::tuple<LayoutA, LayoutSFA>, kAlignFp8,
      ElementFp8, cute::tuple<LayoutB, LayoutSFB>, kAlignFp8, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum>::CollectiveOp;
};

// Everything a kernel's Params are computed from (pointers, sizes, strides, device, workspace,
// scheduler knobs), packed as integers. Two launches with equal keys get identical Params.
struct LaunchKey {
  static constexpr int kMax = 24;
  std::array<int64_t, kMax> v{};
  int n = 0;
  LaunchKey& add(int64_t x) {
    if (n == kMax) throw std::logic_error("flashseek: LaunchKey overflow");
    v[n++] = x;
    return *this;
  }
  LaunchKey& add(const void* ptr) { return add(int64_t(reinterpret_cast<intptr_t>(ptr))); }
  bool operator==(const LaunchKey& o) const { return n == o.n && v == o.v; }
};

// A small LRU cache of computed kernel Params. Building Params encodes the TMA descriptors on the
// host (CUTLASS looks the driver entry point up by name and calls cuTensorMapEncodeTiled once per
// operand, 4-5 times per launch), which costs several microseconds: as much as the whole GPU time of
// a decode GEMM. Steady-state callers (a model's layers, a benchmark loop) reuse the same buffers, so
// their launches hit the cache and skip the encoding; a miss costs what every call cost before.
template <class Kernel>
class ParamsCache {
 public:
  using Params = typename Kernel::Params;
  bool find(const LaunchKey& key, Params* out) {
    std::lock_guard<std::mutex> lock(mu_);
    for (Slot& s : slots_) {
      if (s.used && s.key == key) {
        s.stamp = ++clock_;
        *out = s.params;
        return true;
      }
    }
    return false;
  }
  void insert(const LaunchKey& key, const Params& params) {
    std::lock_guard<std::mutex> lock(mu_);
    Slot* victim = &slots_[0];
    for (Slot& s : slots_) {
      if (!s.used) {
        victim = &s;
        break;
      }
      if (s.stamp < victim->stamp) victim = &s;
    }
    victim->key = key;
    victim->params = params;
    victim->used = true;
    victim->stamp = ++clock_;
  }

 private:
  struct Slot {
    LaunchKey key;
    Params params;
    uint64_t stamp = 0;
    bool used = false;
  };
  std::mutex mu_;
  std::array<Slot, 32> slots_{};
  uint64_t clock_ = 0;
};

inline int current_device() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice", __FILE__, __LINE__);
  return device;
}

// Runs an adapter-wrapped kernel: can_implement, workspace init, TMA descriptors, launch. The
// adapter's initialize() would also raise the dynamic shared-memory limit on every call, a driver
// round trip that decode-sized GEMMs cannot afford; it is done once per device here instead.
// `key` must cover everything `args` is built from plus the workspace pointer (the device is added
// here): a cache hit skips can_implement and the host-side descriptor encoding.
template <class Gemm>
void run_gemm(typename Gemm::Arguments const& args, LaunchKey key, void* workspace, cudaStream_t stream) {
  using Kernel = typename Gemm::GemmKernel;
  static ParamsCache<Kernel> cache;
  const int device = current_device();
  key.add(device).add(workspace);
  // Workspace init runs on every launch (a no-op for the persistent and grouped schedulers; the
  // stream-K scheduler zeroes its reduction locks).
  typename Kernel::Params params;
  if (!cache.find(key, &params)) {
    check_status(Gemm::can_implement(args), "can_implement");
    check_status(Kernel::initialize_workspace(args, workspace, stream, nullptr), "initialize_workspace");
    params = Kernel::to_underlying_arguments(args, workspace);
    cache.insert(key, params);
  } else {
    check_status(Kernel::initialize_workspace(args, workspace, stream, nullptr), "initialize_workspace");
  }

  constexpr int smem = int(Kernel::SharedStorageSize);
  if constexpr (smem >= (48 << 10)) opt_in_dynamic_smem<cutlass::device_kernel<Kernel>>(smem);
  check_status(Gemm::run(params, stream), "run");
}

// Persistent-scheduler knobs, overridable from the environment for sweeps (read once per process):
// <prefix>_SWIZZLE = 1|2|4|8 (tile-walk swizzle; unset: the caller's rule), <prefix>_RASTER = m|n
// (which tile coordinate moves fastest; unset: CUTLASS's heuristic for dense, along M for grouped).
struct SchedTuning {
  int swizzle = 0;  // 0: not set, the caller decides
  int raster = 0;   // 0 default, 1 along M, 2 along N
};

inline SchedTuning sched_tuning_from_env(const char* prefix) {
  SchedTuning t;
  auto env = [&](const char* what) -> const char* {
    std::string name = std::string(prefix) + "_" + what;
    return std::getenv(name.c_str());
  };
  if (const char* s = env("SWIZZLE")) {
    const int v = std::atoi(s);
    if (v == 1 || v == 2 || v == 4 || v == 8) t.swizzle = v;
  }
  if (const char* r = env("RASTER")) {
    if (r[0] == 'm' || r[0] == 'M') t.raster = 1;
    if (r[0] == 'n' || r[0] == 'N') t.raster = 2;
  }
  return t;
}

template <class SchedulerArgs>
void apply_tuning(SchedulerArgs& s, const SchedTuning& t) {
  using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
  s.max_swizzle_size = t.swizzle;
  if (t.raster == 1) s.raster_order = Raster::AlongM;
  if (t.raster == 2) s.raster_order = Raster::AlongN;
}

}  // namespace flashseek::cutlass_fp8
