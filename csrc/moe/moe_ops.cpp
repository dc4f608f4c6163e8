// Host glue for the moe kernels: validates inputs and calls the launchers.
#include "common/torch_checks.h"
#include "moe/moe.h"
#include "registration.h"
#include "routing/routing_checks.h"
#include <ATen/ATen.h>

namespace flashseek {
namespace {

int64_t align_max_rows(int64_t n, int64_t num_local, int64_t block_m) {
  const int64_t rows = n + std::min(num_local, n) * (block_m - 1);
  return (rows + block_m - 1) / block_m * block_m;
}

void check_i32_1d(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  FS_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be a CUDA tensor on ", ref.device(), ", got ",
           t.device());
  FS_CHECK(t.scalar_type() == at::kInt, name, " must have dtype int32, got ", t.scalar_type());
  FS_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  FS_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The global -> local expert map (on ref's device) against the number of global and local experts.
void check_expert_map(const std::optional<at::Tensor>& expert_map, int64_t num_experts, int64_t num_local,
                      const at::Tensor& ref) {
  FS_CHECK(num_experts >= 1 && num_experts < (int64_t(1) << 31), "num_experts must be >= 1, got ", num_experts);
  FS_CHECK(num_local >= 1 && num_local <= kMoeAlignMaxLocalExperts, "the number of local experts must be in [1, ",
           kMoeAlignMaxLocalExperts, "], got ", num_local);
  if (expert_map.has_value()) {
    const at::Tensor& em = *expert_map;
    check_i32_1d(em, "expert_map", ref);
    FS_CHECK(em.size(0) == num_experts, "expert_map must have shape [", num_experts, "], got ", em.sizes());
  } else {
    FS_CHECK(num_local == num_experts, "without expert_map the local experts (", num_local,
             ", from the outputs' shapes) must equal num_experts (", num_experts, ")");
  }
}

void check_align_common(const at::Tensor& topk_ids, int64_t num_experts, const std::optional<at::Tensor>& expert_map,
                        int64_t num_local, const at::Tensor& token_slots) {
  FS_CHECK_CUDA(topk_ids);
  FS_CHECK_DTYPE(topk_ids, at::kInt);
  FS_CHECK_DIM(topk_ids, 2);
  FS_CHECK_CONTIGUOUS(topk_ids);
  FS_CHECK(topk_ids.numel() <= kMoeAlignMaxSlots, "topk_ids may hold at most ", kMoeAlignMaxSlots,
           " slots (T * topk), got ", topk_ids.numel());
  check_expert_map(expert_map, num_experts, num_local, topk_ids);
  FS_CHECK_SAME_DEVICE(topk_ids, token_slots);
  FS_CHECK_DTYPE(token_slots, at::kInt);
  FS_CHECK(token_slots.sizes() == topk_ids.sizes(), "token_slots must have shape ", topk_ids.sizes(), ", got ",
           token_slots.sizes());
  FS_CHECK_CONTIGUOUS(token_slots);
}

MoeAlignParams align_params(const at::Tensor& topk_ids, int64_t num_experts,
                            const std::optional<at::Tensor>& expert_map, int64_t num_local, at::Tensor& token_slots) {
  MoeAlignParams p{};
  p.topk_ids = topk_ids.data_ptr<int32_t>();
  p.n = topk_ids.numel();
  p.num_experts = static_cast<int>(num_experts);
  p.expert_map = expert_map.has_value() ? expert_map->data_ptr<int32_t>() : nullptr;
  p.num_local = static_cast<int>(num_local);
  p.token_slots = token_slots.data_ptr<int32_t>();
  return p;
}

// The multi-block path's per-block counts come from the caching allocator (stream-ordered, graph safe).
void launch_align(MoeAlignParams& p, const at::Tensor& topk_ids) {
  const int64_t ws = moe_align_workspace_ints(p.n, p.num_local);
  at::Tensor workspace;
  if (ws > 0) {
    workspace = at::empty({ws}, topk_ids.options().dtype(at::kInt));
    p.workspace = workspace.data_ptr<int32_t>();
  }
  launch_moe_align(p, current_stream(topk_ids));
}

void moe_align_cuda(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m,
                    const std::optional<at::Tensor>& expert_map, at::Tensor& sorted_ids, at::Tensor& block_expert_ids,
                    at::Tensor& expert_offsets, at::Tensor& token_slots) {
  check_i32_1d(expert_offsets, "expert_offsets", topk_ids);
  const int64_t num_local = expert_offsets.size(0) - 1;
  check_align_common(topk_ids, num_experts, expert_map, num_local, token_slots);
  FS_CHECK(block_m >= 1 && block_m <= 1024, "block_m must be in [1, 1024], got ", block_m);
  check_i32_1d(sorted_ids, "sorted_ids", topk_ids);
  const int64_t rows = sorted_ids.size(0);
  const int64_t need = align_max_rows(topk_ids.numel(), num_local, block_m);
  FS_CHECK(rows % block_m == 0 && rows >= need, "sorted_ids must have a multiple of block_m=", block_m,
           " rows, at least ", need, " (moe_align_max_rows), got ", rows);
  FS_CHECK(rows < (int64_t(1) << 31), "sorted_ids must have fewer than 2^31 rows");
  check_i32_1d(block_expert_ids, "block_expert_ids", topk_ids);
  FS_CHECK(block_expert_ids.size(0) == rows / block_m, "block_expert_ids must have shape [", rows / block_m,
           "], got ", block_expert_ids.sizes());
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  MoeAlignParams p = align_params(topk_ids, num_experts, expert_map, num_local, token_slots);
  p.block_m = static_cast<int>(block_m);
  p.max_m = 0;
  p.sorted_ids = sorted_ids.data_ptr<int32_t>();
  p.max_rows = rows;
  p.block_expert_ids = block_expert_ids.data_ptr<int32_t>();
  p.expert_offsets = expert_offsets.data_ptr<int32_t>();
  launch_align(p, topk_ids);
}

void moe_align_masked_cuda(const at::Tensor& topk_ids, int64_t num_experts, int64_t max_m,
                           const std::optional<at::Tensor>& expert_map, at::Tensor& masked_m, at::Tensor& token_slots) {
  check_i32_1d(masked_m, "masked_m", topk_ids);
  const int64_t num_local = masked_m.size(0);
  check_align_common(topk_ids, num_experts, expert_map, num_local, token_slots);
  FS_CHECK(max_m >= 0, "max_m must be >= 0, got ", max_m);
  FS_CHECK(num_local * max_m < (int64_t(1) << 31), "num_local * max_m must fit in int32, got ", num_local, " x ",
           max_m);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  if (max_m == 0) {  // the kernel's masked mode needs max_m > 0; nothing can be placed anyway
    masked_m.zero_();
    token_slots.fill_(-1);
    return;
  }
  MoeAlignParams p = align_params(topk_ids, num_experts, expert_map, num_local, token_slots);
  p.block_m = 1;
  p.max_m = static_cast<int>(max_m);
  p.masked_m = masked_m.data_ptr<int32_t>();
  launch_align(p, topk_ids);
}

void check_hidden(const at::Tensor& hidden) {
  FS_CHECK_CUDA(hidden);
  FS_CHECK_DTYPE(hidden, at::kBFloat16);
  FS_CHECK_DIM(hidden, 2);
  FS_CHECK(hidden.size(1) % 128 == 0, "hidden's last dimension must be a multiple of 128, got ", hidden.size(1));
  FS_CHECK(hidden.stride(1) == 1 && (hidden.size(0) <= 1 || hidden.stride(0) % 8 == 0),
           "hidden must have a unit stride along H and a row stride that is a multiple of 8, got strides ",
           hidden.strides());
  FS_CHECK(aligned16(hidden), "hidden's data must be 16-byte aligned");
}

// The masked-layout quantized rows of hidden's tokens: out e4m3 [G, M, H] (contiguous, 8-byte aligned)
// and scale fp32 [G, M, H/128] in the empty_grouped_act_scale layout, on hidden's device.
void check_grouped_out(const at::Tensor& hidden, const at::Tensor& out, const at::Tensor& scale, const char* out_name,
                       const char* scale_name) {
  const int64_t H = hidden.size(1), kb = H / 128;
  FS_CHECK(out.device() == hidden.device(), "hidden and ", out_name, " must be on the same device, got ",
           hidden.device(), " and ", out.device());
  FS_CHECK(scale.device() == hidden.device(), "hidden and ", scale_name, " must be on the same device, got ",
           hidden.device(), " and ", scale.device());
  FS_CHECK(out.scalar_type() == at::kFloat8_e4m3fn, out_name, " must have dtype ", at::kFloat8_e4m3fn, ", got ",
           out.scalar_type());
  FS_CHECK(out.dim() == 3, out_name, " must be 3-D, got shape ", out.sizes());
  FS_CHECK(out.size(2) == H, out_name, " must have shape [G, M, ", H, "], got ", out.sizes());
  FS_CHECK(out.is_contiguous(), out_name, " must be contiguous, got strides ", out.strides());
  FS_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 8 == 0, out_name, "'s data must be 8-byte aligned");
  const int64_t g = out.size(0), m = out.size(1);
  FS_CHECK(scale.scalar_type() == at::kFloat, scale_name, " must have dtype ", at::kFloat, ", got ",
           scale.scalar_type());
  FS_CHECK(scale.sizes() == c10::IntArrayRef({g, m, kb}), scale_name, " must have shape [",
           c10::IntArrayRef({g, m, kb}), "], got ", scale.sizes());
  FS_CHECK(m <= 1 || scale.stride(1) == 1, scale_name, " must be column-major per group (stride(1) == 1, see "
           "empty_grouped_act_scale), got strides ", scale.strides());
  FS_CHECK(kb <= 1 || scale.stride(2) >= m, scale_name, " must have a leading dimension (stride(2)) >= ", m,
           ", got strides ", scale.strides());
  FS_CHECK(g * m < (int64_t(1) << 31), out_name, " must have fewer than 2^31 rows");
}

MoeQuantParams quant_params(const at::Tensor& hidden, bool ue8m0) {
  MoeQuantParams p{};
  p.ue8m0 = ue8m0;
  p.hidden = hidden.data_ptr();
  p.hidden_stride = hidden.stride(0);
  p.T = hidden.size(0);
  p.H = hidden.size(1);
  return p;
}

void moe_gather_quant_cuda(const at::Tensor& hidden, const at::Tensor& sorted_ids, int64_t topk, at::Tensor& out,
                           at::Tensor& scale, bool ue8m0) {
  check_hidden(hidden);
  FS_CHECK(topk >= 1, "topk must be >= 1, got ", topk);
  check_i32_1d(sorted_ids, "sorted_ids", hidden);
  const int64_t rows = sorted_ids.size(0), H = hidden.size(1), kb = H / 128;
  FS_CHECK(rows < (int64_t(1) << 31), "sorted_ids must have fewer than 2^31 rows");
  FS_CHECK_SAME_DEVICE(hidden, out);
  FS_CHECK_SAME_DEVICE(hidden, scale);
  FS_CHECK_DTYPE(out, at::kFloat8_e4m3fn);
  FS_CHECK_SHAPE(out, rows, H);
  FS_CHECK_CONTIGUOUS(out);
  FS_CHECK_DTYPE(scale, at::kFloat);
  FS_CHECK_SHAPE(scale, rows, kb);
  FS_CHECK(rows <= 1 || scale.stride(0) == 1, "scale must be column-major (stride(0) == 1, see empty_act_scale), got "
           "strides ", scale.strides());
  FS_CHECK(kb <= 1 || scale.stride(1) >= rows, "scale must have a leading dimension >= ", rows, ", got strides ",
           scale.strides());
  FS_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 8 == 0, "out's data must be 8-byte aligned");
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  MoeQuantParams p = quant_params(hidden, ue8m0);
  p.topk = static_cast<int>(topk);
  p.sorted_ids = sorted_ids.data_ptr<int32_t>();
  p.rows = rows;
  p.rows_per_group = rows;
  p.out = reinterpret_cast<uint8_t*>(out.data_ptr());
  p.out_gstride = 0;
  p.out_rstride = H;
  p.scale = scale.data_ptr<float>();
  p.s_gstride = 0;
  p.s_ld = kb > 1 ? scale.stride(1) : rows;
  launch_moe_gather_quant(p, current_stream(hidden));
}

void moe_scatter_quant_cuda(const at::Tensor& hidden, const at::Tensor& token_slots, at::Tensor& out,
                            at::Tensor& scale, bool ue8m0) {
  check_hidden(hidden);
  FS_CHECK_SAME_DEVICE(hidden, token_slots);
  FS_CHECK_DTYPE(token_slots, at::kInt);
  FS_CHECK_DIM(token_slots, 2);
  FS_CHECK(token_slots.size(0) == hidden.size(0), "token_slots must have shape [T=", hidden.size(0),
           ", topk], got ", token_slots.sizes());
  FS_CHECK_CONTIGUOUS(token_slots);
  FS_CHECK(token_slots.size(1) >= 1 && token_slots.size(1) <= 64, "topk (token_slots' second dimension) must be in "
           "[1, 64], got ", token_slots.size(1));
  const int64_t H = hidden.size(1), kb = H / 128;
  check_grouped_out(hidden, out, scale, "out", "scale");
  const int64_t g = out.size(0), m = out.size(1);
  if (hidden.size(0) == 0 || g * m == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  MoeQuantParams p = quant_params(hidden, ue8m0);
  p.topk = static_cast<int>(token_slots.size(1));
  p.token_slots = token_slots.data_ptr<int32_t>();
  p.token_slots_stride = token_slots.stride(0);
  p.rows = g * m;
  p.rows_per_group = m;
  p.out = reinterpret_cast<uint8_t*>(out.data_ptr());
  p.out_gstride = m * H;
  p.out_rstride = H;
  p.scale = scale.data_ptr<float>();
  p.s_gstride = scale.stride(0);
  p.s_ld = kb > 1 ? scale.stride(2) : m;
  launch_moe_scatter_quant(p, current_stream(hidden));
}

void moe_route_dispatch_cuda(const at::Tensor& hidden, const at::Tensor& logits, const at::Tensor& bias, int64_t n_group,
                             int64_t topk_group, int64_t topk, double routed_scaling_factor, bool renormalize,
                             const std::optional<at::Tensor>& expert_map, at::Tensor& topk_weights,
                             at::Tensor& topk_ids, at::Tensor& masked_m, at::Tensor& token_slots, at::Tensor& a,
                             at::Tensor& a_scale, int64_t num_shared, bool ue8m0) {
  check_noaux_params(logits, bias, n_group, topk_group, topk);
  check_route_outputs(logits, topk, topk_weights, topk_ids);
  const int64_t T = logits.size(0);
  FS_CHECK(T <= kMoeRouteDispatchMaxT, "moe_route_dispatch takes at most ", kMoeRouteDispatchMaxT, " tokens, got ", T,
           " (fused_moe runs route_noaux_tc + moe_align_masked + moe_scatter_quant above that)");
  check_hidden(hidden);
  FS_CHECK_SAME_DEVICE(logits, hidden);
  FS_CHECK(hidden.size(0) == T, "hidden must have T=", T, " rows (logits' rows), got shape ", hidden.sizes());
  check_i32_1d(masked_m, "masked_m", logits);
  FS_CHECK(num_shared >= 0 && num_shared <= kMoeRouteDispatchMaxShared && num_shared < masked_m.size(0),
           "num_shared must be in [0, ", kMoeRouteDispatchMaxShared, "] and leave at least one routed expert in "
           "masked_m (size ", masked_m.size(0), "), got ", num_shared);
  const int64_t num_local = masked_m.size(0) - num_shared;
  check_expert_map(expert_map, logits.size(1), num_local, logits);
  FS_CHECK_SAME_DEVICE(logits, token_slots);
  FS_CHECK_DTYPE(token_slots, at::kInt);
  FS_CHECK_SHAPE(token_slots, T, topk);
  FS_CHECK_CONTIGUOUS(token_slots);
  check_grouped_out(hidden, a, a_scale, "a", "a_scale");
  FS_CHECK(a.size(0) == masked_m.size(0), "a must have shape [E_local + num_shared=", masked_m.size(0),
           " (masked_m's size), max_m, ", hidden.size(1), "], got ", a.sizes());
  const int64_t max_m = a.size(1);
  FS_CHECK(num_shared == 0 || max_m >= T, "with shared experts every token needs a row: max_m (a.size(1) = ", max_m,
           ") must be >= T=", T);
  FS_CHECK(a.size(0) * max_m < (int64_t(1) << 31), "(E_local + num_shared) * max_m must fit in int32, got ",
           a.size(0), " x ", max_m);
  const c10::cuda::CUDAGuard guard(logits.device());
  MoeRouteDispatchParams p{};
  p.route = noaux_route_params(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize,
                               topk_weights, topk_ids);
  p.expert_map = expert_map.has_value() ? expert_map->data_ptr<int32_t>() : nullptr;
  p.num_local = static_cast<int>(num_local);
  p.num_shared = static_cast<int>(num_shared);
  p.max_m = static_cast<int>(max_m);
  p.hidden = hidden.data_ptr();
  p.hidden_stride = hidden.stride(0);
  p.H = hidden.size(1);
  p.masked_m = masked_m.data_ptr<int32_t>();
  p.token_slots = token_slots.data_ptr<int32_t>();
  p.a = reinterpret_cast<uint8_t*>(a.data_ptr());
  p.a_scale = a_scale.data_ptr<float>();
  p.s_gstride = a_scale.stride(0);
  p.s_ld = a_scale.size(2) > 1 ? a_scale.stride(2) : max_m;
  p.ue8m0 = ue8m0;
  launch_moe_route_dispatch(p, current_stream(logits));
}

void moe_combine_cuda(const at::Tensor& expert_out, const at::Tensor& topk_weights, const at::Tensor& token_slots,
                      const std::optional<at::Tensor>& shared_out, at::Tensor& out) {
  FS_CHECK_CUDA(expert_out);
  FS_CHECK_DTYPE(expert_out, at::kBFloat16);
  FS_CHECK_DIM(expert_out, 2);
  const int64_t H = expert_out.size(1);
  FS_CHECK(H % 8 == 0, "expert_out's last dimension must be a multiple of 8, got ", H);
  FS_CHECK(expert_out.stride(1) == 1 && (expert_out.size(0) <= 1 || expert_out.stride(0) % 8 == 0),
           "expert_out must have a unit stride along H and a row stride multiple of 8, got strides ",
           expert_out.strides());
  FS_CHECK(aligned16(expert_out), "expert_out's data must be 16-byte aligned");
  FS_CHECK_SAME_DEVICE(expert_out, token_slots);
  FS_CHECK_DTYPE(token_slots, at::kInt);
  FS_CHECK_DIM(token_slots, 2);
  FS_CHECK_CONTIGUOUS(token_slots);
  const int64_t T = token_slots.size(0), k = token_slots.size(1);
  FS_CHECK(k >= 1 && k <= 64, "topk (token_slots' second dimension) must be in [1, 64], got ", k);
  FS_CHECK_SAME_DEVICE(expert_out, topk_weights);
  FS_CHECK_DTYPE(topk_weights, at::kFloat);
  FS_CHECK_SHAPE(topk_weights, T, k);
  FS_CHECK_CONTIGUOUS(topk_weights);
  if (shared_out.has_value()) {
    const at::Tensor& sh = *shared_out;
    FS_CHECK_SAME_DEVICE(expert_out, sh);
    FS_CHECK_DTYPE(sh, at::kBFloat16);
    FS_CHECK_SHAPE(sh, T, H);
    FS_CHECK_CONTIGUOUS(sh);
    FS_CHECK(aligned16(sh), "shared_out's data must be 16-byte aligned");
  }
  FS_CHECK_SAME_DEVICE(expert_out, out);
  FS_CHECK_DTYPE(out, at::kBFloat16);
  FS_CHECK_SHAPE(out, T, H);
  FS_CHECK_CONTIGUOUS(out);
  FS_CHECK(aligned16(out), "out's data must be 16-byte aligned");
  if (T == 0 || H == 0) return;
  const c10::cuda::CUDAGuard guard(expert_out.device());
  MoeCombineParams p{};
  p.expert_out = expert_out.data_ptr();
  p.eo_stride = expert_out.stride(0);
  p.rows = expert_out.size(0);
  p.weights = topk_weights.data_ptr<float>();
  p.w_stride = topk_weights.stride(0);
  p.token_slots = token_slots.data_ptr<int32_t>();
  p.ts_stride = token_slots.stride(0);
  p.shared_out = shared_out.has_value() ? shared_out->data_ptr() : nullptr;
  p.sh_stride = shared_out.has_value() ? shared_out->stride(0) : 0;
  p.out = out.data_ptr();
  p.out_stride = out.stride(0);
  p.T = T;
  p.H = H;
  p.topk = static_cast<int>(k);
  launch_moe_combine(p, current_stream(expert_out));
}

}  // namespace

void register_moe_cuda(torch::Library& m) {
  m.impl("moe_align", &moe_align_cuda);
  m.impl("moe_align_masked", &moe_align_masked_cuda);
  m.impl("moe_gather_quant", &moe_gather_quant_cuda);
  m.impl("moe_scatter_quant", &moe_scatter_quant_cuda);
  m.impl("moe_route_dispatch", &moe_route_dispatch_cuda);
  m.impl("moe_combine", &moe_combine_cuda);
}
}  // namespace flashseek
