// Every flashseek op schema, in one place.
//
// Conventions:
//   * Ops write into caller-provided outputs (`Tensor(a!)`) and return nothing, so engines can
//     preallocate and CUDA-graph capture, and torch.compile functionalizes them. The Python
//     wrappers in flashseek/ops.py allocate outputs when the caller passes none.
//   * The CPU implementation of each op is its pure-torch reference (flashseek/ref), registered
//     from Python together with the fake (meta) implementation.
//   * CUDA implementations are registered per kernel family by csrc/<family>/<family>_ops.cpp.
//     An op with no CUDA kernel in this build falls back to the reference on CUDA tensors.
#include <torch/extension.h>
#include <torch/library.h>

#include "registration.h"

TORCH_LIBRARY(flashseek, m) {
  // ---- FP8 1x128 activation quantization (csrc/quant) ----
  // x [M, K] bf16/fp16, K % 128 == 0 -> out e4m3 [M, K], scale fp32 [M, K/128] (column-major, see ops.py).
  m.def("quant_fp8_1x128(Tensor x, Tensor(a!) out, Tensor(b!) scale, bool ue8m0=False) -> ()");
  // gate_up [M, 2N] -> silu(gate) * up quantized: out e4m3 [M, N], scale fp32 [M, N/128]. With
  // masked_m int32 [E] (E divides M): rows [e * M/E + masked_m[e], (e + 1) * M/E) are left untouched.
  m.def("silu_mul_quant_fp8(Tensor gate_up, Tensor(a!) out, Tensor(b!) scale, bool ue8m0=False, "
        "Tensor? masked_m=None) -> ()");

  // ---- FP8 block-scaled GEMM (csrc/gemm) ----
  // out[M, N] = (a [M, K] * a_scale [M, K/128]) @ (b [N, K] * b_scale [ceil(N/128), K/128])^T
  m.def("fp8_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor(a!) out) -> ()");
  // Rows of expert e are a[expert_offsets[e] : expert_offsets[e+1]]; b [E, N, K].
  m.def(
      "grouped_fp8_gemm_contiguous(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, "
      "Tensor expert_offsets, Tensor(a!) out) -> ()");
  // a [E, M_max, K]; only the first masked_m[e] rows of expert e are computed and written.
  m.def(
      "grouped_fp8_gemm_masked(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, "
      "Tensor masked_m, Tensor(a!) out) -> ()");

  // ---- Routing (csrc/routing) ----
  m.def(
      "route_noaux_tc(Tensor logits, Tensor bias, int n_group, int topk_group, int topk, "
      "float routed_scaling_factor, bool renormalize, Tensor(a!) topk_weights, "
      "Tensor(b!) topk_ids) -> ()");
  m.def(
      "route_softmax_topk(Tensor logits, int topk, bool renormalize, Tensor(a!) topk_weights, "
      "Tensor(b!) topk_ids) -> ()");
  // The router's fp32 logits for T <= 4: out [T, E] = hidden [T, H] bf16 @ weight [E, H] bf16 ^T,
  // accumulated in fp32 (the wrapper, flashseek.ops.router_logits, runs a GEMM above 4 tokens).
  m.def("router_logits(Tensor hidden, Tensor weight, Tensor(a!) out) -> ()");
  // Gate GEMM + route_noaux_tc for T <= 64: hidden [T, H] bf16, gate_weight [E, H] bf16, H % 512 == 0;
  // logits [T, E] fp32 out (accumulation order: flashseek/ref/routing.py gate_logits_fp32).
  m.def(
      "route_noaux_tc_gate(Tensor hidden, Tensor gate_weight, Tensor bias, int n_group, int topk_group, "
      "int topk, float routed_scaling_factor, bool renormalize, Tensor(a!) topk_weights, "
      "Tensor(b!) topk_ids, Tensor(c!) logits) -> ()");

  // ---- MoE dispatch and combine (csrc/moe) ----
  // Contiguous layout; token_slots [T, topk] = the row of each (token, k) slot, -1 if dropped.
  m.def(
      "moe_align(Tensor topk_ids, int num_experts, int block_m, Tensor? expert_map, "
      "Tensor(a!) sorted_ids, Tensor(b!) block_expert_ids, Tensor(c!) expert_offsets, "
      "Tensor(d!) token_slots) -> ()");
  // Masked layout [E_local, max_m, ...]: masked_m [E_local], token_slots = e * max_m + rank or -1.
  m.def(
      "moe_align_masked(Tensor topk_ids, int num_experts, int max_m, Tensor? expert_map, "
      "Tensor(a!) masked_m, Tensor(b!) token_slots) -> ()");
  m.def(
      "moe_gather_quant(Tensor hidden, Tensor sorted_ids, int topk, Tensor(a!) out, "
      "Tensor(b!) scale, bool ue8m0=False) -> ()");
  // Each token quantized once, stored to rows token_slots[t, :] of out [G, M, H] / scale [G, M, H/128].
  m.def(
      "moe_scatter_quant(Tensor hidden, Tensor token_slots, Tensor(a!) out, Tensor(b!) scale, "
      "bool ue8m0=False) -> ()");
  // route_noaux_tc + moe_align_masked + moe_scatter_quant in one launch for T <= 32 (fused_moe's masked
  // front end), bit-identical to that chain: E = logits.size(1) global experts, E_local =
  // masked_m.size(0) - num_shared, max_m = a.size(1); a e4m3 [E_local + num_shared, max_m, H], a_scale
  // fp32 [E_local + num_shared, max_m, H/128] (empty_grouped_act_scale); rows no slot points at are left
  // untouched. The num_shared experts after the routed ones take every token t at row t (masked_m = T).
  m.def(
      "moe_route_dispatch(Tensor hidden, Tensor logits, Tensor bias, int n_group, int topk_group, int topk, "
      "float routed_scaling_factor, bool renormalize, Tensor? expert_map, Tensor(a!) topk_weights, "
      "Tensor(b!) topk_ids, Tensor(c!) masked_m, Tensor(d!) token_slots, Tensor(e!) a, Tensor(f!) a_scale, "
      "int num_shared=0, bool ue8m0=False) -> ()");
  m.def(
      "moe_combine(Tensor expert_out, Tensor topk_weights, Tensor token_slots, "
      "Tensor? shared_out, Tensor(a!) out) -> ()");

  // ---- Paged MLA latent decode (csrc/mla) ----
  m.def("mla_decode_plan(Tensor cache_seqlens, int s_q, int h_q, int num_sm_parts) -> Tensor");
  m.def(
      "mla_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor cache_seqlens, "
      "Tensor plan, float softmax_scale, bool causal, Tensor(a!) out, Tensor(b!) lse) -> ()");
  m.def(
      "mla_cache_append(Tensor latent, Tensor k_rope, Tensor(a!) kv_cache, "
      "Tensor slot_mapping) -> ()");
  // Pre-attention glue of an MLA layer, for T tokens and h heads: latent = rms_norm(kv[:, :512])
  // and k_pe = rope(kv[:, 512:]) written to kv_cache slot slot_mapping[t] (negative: skipped);
  // q_out [T, h, 64] = rope(q_pe) (e.g. the tail of the absorbed q [T, h, 576]). Rope: DeepSeek's
  // interleaved pairs at positions[t] from cos/sin [max_positions, 32] fp32 tables.
  m.def(
      "mla_rope_norm_append(Tensor kv, Tensor q_pe, Tensor positions, Tensor cos, Tensor sin, "
      "Tensor norm_weight, float eps, Tensor slot_mapping, Tensor(a!) kv_cache, Tensor(b!) q_out) -> ()");
  // The decode step's glue and W_UK absorption in one launch, for 1-16 tokens: q [T, h, nope + 64] ->
  // q_lat [T, h, 576] = [q_nope @ w_uk [h, nope, 512] | rope(q_pe)], plus mla_rope_norm_append's cache
  // append (bf16 q, kv and norm_weight).
  m.def(
      "mla_absorb_rope_append(Tensor q, Tensor kv, Tensor w_uk, Tensor positions, Tensor cos, Tensor sin, "
      "Tensor norm_weight, float eps, Tensor slot_mapping, Tensor(a!) kv_cache, Tensor(b!) q_lat) -> ()");

  // The absorbed MLA's per-head projections for T <= 8: out [H, T, N] = a [H, T, K] @ w [H, K, N]
  // (bf16, fp32 accumulation; q_nope @ W_UK and o_lat @ W_UV^T). flashseek.ops.mla_head_gemv runs
  // torch.bmm above 8 tokens.
  m.def("mla_head_gemv(Tensor a, Tensor w, Tensor(a!) out) -> ()");
  // The same product for N = 128 (W_UV^T: each head's output is one 1x128 block of the o_proj input),
  // written as FP8: out [T, H * 128] e4m3 and scale [T, H] fp32 (flashseek.ops.empty_act_scale layout),
  // equal to quant_fp8_1x128 of mla_head_gemv's bf16 output laid out as [T, H * 128].
  m.def("mla_head_gemv_quant_fp8(Tensor a, Tensor w, Tensor(a!) out, Tensor(b!) scale, bool ue8m0=False) -> ()");

  // ---- RMSNorm (csrc/norm) ----
  // x [M, N] bf16/fp16/fp32, weight [N] bf16/fp16/fp32 -> out [M, N] in x's dtype:
  // out = T(float(x) * rsqrt(mean(float(x)^2) + eps) * float(weight)). Rows may be strided.
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  // In place: residual = T(float(x) + float(residual)), then x = rms_norm(residual) (the rounded sum).
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  // RMSNorm + FP8 1x128 quantization of its output, for a norm that feeds an FP8 GEMM: x [M, N]
  // bf16/fp16 with N % 128 == 0, weight [N] bf16/fp16/fp32 -> out e4m3 [M, N], scale fp32 [M, N/128]
  // (column-major, as quant_fp8_1x128's), bit-identical to quant_fp8_1x128(rms_norm(x, weight, eps),
  // ue8m0): the normalized value is rounded to x's dtype before it is quantized. Rows of x (and
  // residual) may be strided but must be 16-byte aligned.
  m.def("rms_norm_quant_fp8(Tensor x, Tensor weight, float eps, Tensor(a!) out, Tensor(b!) scale, "
        "bool ue8m0=False) -> ()");
  // residual = T(float(x) + float(residual)) in place, as fused_add_rms_norm; out/scale = the
  // quantization of rms_norm(residual) as above. x is left untouched (fused_add_rms_norm would
  // overwrite it with the normalized sum; here that row exists only as out).
  m.def("fused_add_rms_norm_quant_fp8(Tensor x, Tensor(a!) residual, Tensor weight, float eps, Tensor(b!) out, "
        "Tensor(c!) scale, bool ue8m0=False) -> ()");
}

#if FLASHSEEK_WITH_CUDA
TORCH_LIBRARY_IMPL(flashseek, CUDA, m) {
  flashseek::register_quant_cuda(m);
  flashseek::register_gemm_cuda(m);
  flashseek::register_routing_cuda(m);
  flashseek::register_moe_cuda(m);
  flashseek::register_mla_cuda(m);
  flashseek::register_norm_cuda(m);
}
#endif

namespace {
bool built_with_cuda() { return FLASHSEEK_WITH_CUDA != 0; }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "flashseek: Hopper kernels for DeepSeek-V3/R1 (ops live under torch.ops.flashseek)";
  mod.def("built_with_cuda", &built_with_cuda, "True when the sm_90a CUDA kernels were compiled in");
}
