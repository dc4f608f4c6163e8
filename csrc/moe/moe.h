// MoE dispatch / combine launchers (plain CUDA, no torch headers).
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "routing/routing.h"

namespace flashseek {

constexpr int kMoeAlignMaxLocalExperts = 512;
constexpr int64_t kMoeAlignMaxSlots = int64_t(1) << 22;
// Slots one block of moe_align handles; more take three launches and a workspace.
constexpr int64_t kMoeAlignBlockSlots = 4096;

// Groups the n = T * topk (token, k) slots by local expert, ascending slot id within an expert.
// Contiguous mode (max_m == 0): expert e owns rows [expert_offsets[e], expert_offsets[e+1]), its
// count padded up to a multiple of block_m; sorted_ids[row] = slot or the sentinel n;
// block_expert_ids[b] = expert of rows [b*block_m, (b+1)*block_m) or -1. Masked mode (max_m > 0):
// slot -> row e * max_m + rank, masked_m[e] = min(count, max_m). Both: token_slots[slot] = row or -1.
// Ids outside [0, num_experts) and experts mapped outside [0, num_local) are dropped (row -1).
struct MoeAlignParams {
  const int32_t* topk_ids;   // [n], contiguous
  int64_t n;
  int num_experts;           // global id range
  const int32_t* expert_map; // [num_experts] or null (identity)
  int num_local;             // <= kMoeAlignMaxLocalExperts
  int block_m;               // contiguous mode
  int max_m;                 // > 0 selects masked mode
  int32_t* sorted_ids;       // [max_rows]
  int64_t max_rows;          // multiple of block_m, >= n + min(num_local, n) * (block_m - 1)
  int32_t* block_expert_ids; // [max_rows / block_m]
  int32_t* expert_offsets;   // [num_local + 1]
  int32_t* masked_m;         // [num_local]
  int32_t* token_slots;      // [n]
  int32_t* workspace;        // [moe_align_workspace_ints(n, num_local)], null when that is 0
};
int64_t moe_align_workspace_ints(int64_t n, int num_local);
void launch_moe_align(const MoeAlignParams& p, cudaStream_t stream);

// FP8 1x128 quantization of bf16 token rows into a row buffer viewed as [groups, rows_per_group, H]
// (row r at group r / rows_per_group). Gather mode: one output row per sorted_ids entry (the
// sentinel or any id outside [0, T*topk) gives the quantization of a zero row). Scatter mode: each
// token's row is quantized once and written to every row token_slots[t, j] >= 0.
struct MoeQuantParams {
  const void* hidden;        // bf16 [T, H], unit stride along H
  int64_t hidden_stride;
  int64_t T;
  int64_t H;                 // multiple of 128
  int topk;
  const int32_t* sorted_ids; // gather mode: [rows]
  const int32_t* token_slots;// scatter mode: [T, topk], row stride token_slots_stride
  int64_t token_slots_stride;
  int64_t rows;              // total output rows (groups * rows_per_group)
  int64_t rows_per_group;
  uint8_t* out;              // e4m3, row r at out + (r / rpg) * out_gstride + (r % rpg) * out_rstride
  int64_t out_gstride, out_rstride;
  float* scale;              // (r, kb) at scale + (r / rpg) * s_gstride + (r % rpg) + kb * s_ld
  int64_t s_gstride, s_ld;
  bool ue8m0;                // round each scale up to a power of two (DeepSeek-V3.1 scale_fmt: ue8m0)
};
void launch_moe_gather_quant(const MoeQuantParams& p, cudaStream_t stream);
void launch_moe_scatter_quant(const MoeQuantParams& p, cudaStream_t stream);

// route_noaux_tc -> moe_align_masked -> moe_scatter_quant in one launch, for decode batches (T <=
// kMoeRouteDispatchMaxT): the outputs are bit-identical to that chain's (moe_route_dispatch.cu runs
// the same per-token routing code and the same block quantization). route: the logits, bias,
// routing parameters and the weights / ids outputs ([T, topk], unit stride along topk), exactly as
// launch_route_noaux_tc takes them. Dispatch: slot (t, j) -> row e * max_m + rank of local expert e
// = map(ids[t, j]) (expert_map, or the identity), rank = its place among the slots of e in
// ascending slot order; -1 if dropped (no local expert, or rank >= max_m). masked_m[e] =
// min(count, max_m). Rows of `a` / `a_scale` that no slot points at are not written.
// Shared experts: local experts num_local .. num_local + num_shared - 1 follow the routed ones in
// masked_m / a / a_scale and take every token: token t's row in shared expert num_local + j is
// (num_local + j) * max_m + t (max_m >= T), masked_m = T. They have no slot in token_slots (the
// caller adds their output: moe_combine's shared_out is that expert's [T, H] slab).
constexpr int kMoeRouteDispatchMaxT = 32;
constexpr int kMoeRouteDispatchMaxShared = 4;
struct MoeRouteDispatchParams {
  RouteParams route;          // T <= kMoeRouteDispatchMaxT, dtype, E, n_group, ...; bias required
  const int32_t* expert_map;  // [route.E] global -> local id (-1 = elsewhere), or null (identity)
  int num_local;              // routed local experts, 1..kMoeAlignMaxLocalExperts
  int num_shared;             // shared experts after them, 0..kMoeRouteDispatchMaxShared (max_m >= T if > 0)
  int max_m;                  // rows per expert in a / a_scale (>= 0, (num_local + num_shared) * max_m < 2^31)
  const void* hidden;         // bf16 [T, H], unit stride along H, 16-byte aligned rows
  int64_t hidden_stride;
  int64_t H;                  // multiple of 128
  int32_t* masked_m;          // [num_local + num_shared]
  int32_t* token_slots;       // [T, topk], contiguous
  uint8_t* a;                 // e4m3 [num_local + num_shared, max_m, H], contiguous, 8-byte aligned
  float* a_scale;             // (e, m, kb) at a_scale + e * s_gstride + m + kb * s_ld
  int64_t s_gstride, s_ld;
  bool ue8m0;                 // power-of-two scales, as MoeQuantParams::ue8m0
};
void launch_moe_route_dispatch(const MoeRouteDispatchParams& p, cudaStream_t stream);

// out[t] = bf16( sum_j w[t,j] * expert_out[token_slots[t,j]] (j ascending, rows < 0 or >= rows
// skipped) + shared_out[t] ), all in fp32 with separate multiply and add roundings.
struct MoeCombineParams {
  const void* expert_out;    // bf16 [rows, H]
  int64_t eo_stride;
  int64_t rows;
  const float* weights;      // [T, topk]
  int64_t w_stride;
  const int32_t* token_slots;// [T, topk]
  int64_t ts_stride;
  const void* shared_out;    // bf16 [T, H] or null
  int64_t sh_stride;
  void* out;                 // bf16 [T, H]
  int64_t out_stride;
  int64_t T, H;              // H multiple of 8, 16-byte aligned rows
  int topk;
};
void launch_moe_combine(const MoeCombineParams& p, cudaStream_t stream);

}  // namespace flashseek
