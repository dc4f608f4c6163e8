// Host glue for the paged MLA decode kernels: validates inputs and calls the launchers.
//
// Index safety without a host sync: values inside block_table and cache_seqlens are not read here.
// The decode kernel clamps each length to the table's capacity (max_pages * page_size) and each
// page id to [0, num_pages), so a bad table yields wrong values but never an out-of-bounds access;
// the append kernels skip slots outside the cache and mla_rope_norm_append clamps positions to its
// cos/sin tables. flashseek.ops.mla_decode(validate=True) checks
// the values on the host (and the CPU reference always does).
#include <ATen/ATen.h>

#include <climits>
#include <cmath>

#include "common/torch_checks.h"
#include "mla/mla_params.h"
#include "registration.h"

namespace flashseek {
namespace {

using namespace flashseek::mla;

int page_size_log2(int64_t page_size) {
  switch (page_size) {
    case 16: return 4;
    case 32: return 5;
    case 64: return 6;
    case 128: return 7;
    default: return -1;
  }
}

// Returns true for the FP8 layout.
bool check_cache(const at::Tensor& kv_cache) {
  FS_CHECK_CUDA(kv_cache);
  FS_CHECK_DIM(kv_cache, 3);
  const bool fp8 = kv_cache.scalar_type() == at::kByte;
  FS_CHECK(fp8 || kv_cache.scalar_type() == at::kBFloat16,
           "kv_cache must have dtype BFloat16 (576-wide tokens) or Byte (656-byte FP8 tokens), got ",
           kv_cache.scalar_type());
  const int64_t width = fp8 ? kFp8TokenBytes : kDQK;
  FS_CHECK(kv_cache.size(2) == width, "kv_cache must be [num_pages, page_size, ", width, "] for dtype ",
           kv_cache.scalar_type(), " (bf16: 512 latent + 64 rope; uint8: the 656-byte FP8 token layout), got ",
           kv_cache.sizes());
  FS_CHECK(page_size_log2(kv_cache.size(1)) >= 0, "kv_cache's page size (dim 1) must be 16, 32, 64 or 128, got ",
           kv_cache.size(1));
  FS_CHECK(kv_cache.size(0) >= 1 && kv_cache.size(0) <= INT_MAX,
           "kv_cache must have between 1 and 2^31 - 1 pages, got ", kv_cache.size(0));
  FS_CHECK_CONTIGUOUS(kv_cache);
  FS_CHECK(aligned16(kv_cache), "kv_cache's data must be 16-byte aligned");
  return fp8;
}

// The tokens' cache slots: int64 [tokens] (values are checked by the kernels, which skip slots
// outside the cache).
void check_slot_mapping(const at::Tensor& slot_mapping, int64_t tokens) {
  FS_CHECK_CUDA(slot_mapping);
  FS_CHECK_DTYPE(slot_mapping, at::kLong);
  FS_CHECK_SHAPE(slot_mapping, tokens);
  FS_CHECK_CONTIGUOUS(slot_mapping);
}

void check_rows16(const at::Tensor& t, const char* name) {
  for (int d = 0; d + 1 < t.dim(); ++d) {  // a size-1 dimension's stride is never used
    FS_CHECK(t.size(d) == 1 || t.stride(d) % 8 == 0, name, "'s strides must be multiples of 8 elements (16-byte rows), got ",
             t.strides());
  }
  FS_CHECK(aligned16(t), name, "'s data must be 16-byte aligned");
}

void check_seqlens(const at::Tensor& cache_seqlens, int64_t b) {
  FS_CHECK_CUDA(cache_seqlens);
  FS_CHECK_DTYPE(cache_seqlens, at::kInt);
  FS_CHECK_SHAPE(cache_seqlens, b);
  FS_CHECK_CONTIGUOUS(cache_seqlens);
}

at::Tensor mla_decode_plan(const at::Tensor& cache_seqlens, int64_t s_q, int64_t h_q, int64_t num_sm_parts) {
  FS_CHECK_CUDA(cache_seqlens);
  FS_CHECK_DIM(cache_seqlens, 1);
  const int64_t b = cache_seqlens.size(0);
  check_seqlens(cache_seqlens, b);
  FS_CHECK(s_q >= 1 && s_q <= 64, "s_q must lie in [1, 64], got ", s_q);
  FS_CHECK(h_q >= 1 && h_q <= 1024, "h_q must lie in [1, 1024], got ", h_q);
  FS_CHECK(num_sm_parts >= 1 && num_sm_parts <= 4096, "num_sm_parts must lie in [1, 4096], got ", num_sm_parts);
  FS_CHECK(b <= 32768, "batch must be <= 32768, got ", b);
  const c10::cuda::CUDAGuard guard(cache_seqlens.device());
  at::Tensor plan = at::empty({kPlanPartInts * num_sm_parts + 2 * b}, cache_seqlens.options());
  PlanParams p{cache_seqlens.data_ptr<int>(), plan.data_ptr<int>(), static_cast<int>(b),
               static_cast<int>(num_sm_parts)};
  launch_plan(p, current_stream(cache_seqlens));
  return plan;
}

void mla_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_table,
                const at::Tensor& cache_seqlens, const at::Tensor& plan, double softmax_scale, bool causal,
                at::Tensor& out, at::Tensor& lse) {
  FS_CHECK_CUDA(q);
  FS_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
           "q must have dtype BFloat16 or Half, got ", q.scalar_type());
  FS_CHECK_DIM(q, 4);
  const int64_t b = q.size(0), s_q = q.size(1), h_q = q.size(2);
  FS_CHECK(q.size(3) == kDQK, "q's head dim must be 576 (512 latent + 64 rope), got ", q.size(3));
  FS_CHECK_LAST_DIM_CONTIGUOUS(q);
  check_rows16(q, "q");
  FS_CHECK(s_q >= 1 && s_q <= 64 && h_q >= 1 && h_q <= 1024,
           "q must have 1 <= s_q <= 64 and 1 <= h_q <= 1024, got ", q.sizes());
  FS_CHECK(b <= 65535, "batch must be <= 65535, got ", b);
  const bool fp8 = check_cache(kv_cache);

  FS_CHECK_CUDA(block_table);
  FS_CHECK_DTYPE(block_table, at::kInt);
  FS_CHECK_DIM(block_table, 2);
  FS_CHECK(block_table.size(0) == b && block_table.size(1) >= 1, "block_table must be [", b,
           ", max_pages >= 1], got ", block_table.sizes());
  FS_CHECK_LAST_DIM_CONTIGUOUS(block_table);
  FS_CHECK(block_table.size(1) * kv_cache.size(1) <= INT_MAX,
           "block_table's capacity (max_pages * page_size) must be < 2^31 tokens, got ",
           block_table.size(1) * kv_cache.size(1));
  check_seqlens(cache_seqlens, b);

  FS_CHECK_CUDA(plan);
  FS_CHECK_DTYPE(plan, at::kInt);
  FS_CHECK_DIM(plan, 1);
  FS_CHECK_CONTIGUOUS(plan);
  const int64_t rest = plan.size(0) - 2 * b;
  FS_CHECK(rest >= kPlanPartInts && rest % kPlanPartInts == 0 && rest / kPlanPartInts <= 4096,
           "plan must come from mla_decode_plan for this batch of ", b, ": 8 * num_sm_parts + 2 * ", b,
           " int32, got ", plan.size(0));
  const int num_sm_parts = static_cast<int>(rest / kPlanPartInts);
  FS_CHECK(softmax_scale > 0 && std::isfinite(softmax_scale), "softmax_scale must be positive and finite, got ",
           softmax_scale);

  FS_CHECK_CUDA(out);
  FS_CHECK_DTYPE(out, q.scalar_type());
  FS_CHECK_SHAPE(out, b, s_q, h_q, kDV);
  FS_CHECK_LAST_DIM_CONTIGUOUS(out);
  check_rows16(out, "out");
  FS_CHECK_CUDA(lse);
  FS_CHECK_DTYPE(lse, at::kFloat);
  FS_CHECK_SHAPE(lse, b, h_q, s_q);
  FS_CHECK_CONTIGUOUS(lse);
  const std::initializer_list<const at::Tensor*> others{&kv_cache, &block_table, &cache_seqlens, &plan, &out, &lse};
  for (const at::Tensor* t : others) {
    FS_CHECK(t->device() == q.device(), "every tensor must be on q's device ", q.device(), ", got ", t->device());
  }
  if (b == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  const int rows = static_cast<int>(s_q * h_q);
  // Fixed-size split workspace from the caching allocator: graph-capturable. One part never splits.
  at::Tensor ws_o, ws_lse;
  if (num_sm_parts > 1) {
    const int64_t slots = workspace_slots(num_sm_parts);
    // Partials in q's dtype (FlashInfer keeps its split partials in the output dtype too): half the
    // bytes of fp32 for the one-SM row writes and the combine's reads, for one more rounding of each
    // normalised partial (<= 2^-8 relative in bf16; tests/test_mla.py counts it in the budget).
    ws_o = at::empty({slots * rows * kDV}, q.options());
    ws_lse = at::empty({slots * rows}, q.options().dtype(at::kFloat));
  }
  DecodeParams p{};
  p.q = q.data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_s = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.kv = kv_cache.data_ptr();
  p.num_pages = static_cast<int>(kv_cache.size(0));
  p.page_size_log2 = page_size_log2(kv_cache.size(1));
  p.block_table = block_table.data_ptr<int>();
  p.bt_stride_b = block_table.stride(0);
  p.max_pages = static_cast<int>(block_table.size(1));
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.plan = plan.data_ptr<int>();
  p.num_sm_parts = num_sm_parts;
  p.out = out.data_ptr();
  p.o_stride_b = out.stride(0);
  p.o_stride_s = out.stride(1);
  p.o_stride_h = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.ws_o = num_sm_parts > 1 ? ws_o.data_ptr() : nullptr;
  p.ws_lse = num_sm_parts > 1 ? ws_lse.data_ptr<float>() : nullptr;
  p.batch = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.rows = rows;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal ? 1 : 0;
  // 2-CTA clusters (cluster pairs, mla_params.h) only where the plan is likely to pair requests: between
  // 2 and 2.5 parts a request. With uniform lengths the plan pairs every request for batches from ~0.35 P
  // (1,024 keys) or ~0.47 P (4,096 keys) to P / 2, and none outside. A cluster launch without pairs cost
  // 1.0-1.4 µs (b=40 h_q=128, 4,096 keys: 98.8 against 97.4 µs; b=64 h_q=2: 111.6 against 110.6, where the
  // combine has two rows a request), with pairs it saved 3.7-4.4 µs (b=32 s_k=1024, b=64 h_q=64) and
  // 0.7-1.6 at h_q = 8-32 (H100, graph replays, docs/performance.md, session 22).
  p.cluster_pairs = num_sm_parts % 2 == 0 && 5 * b > 2 * num_sm_parts && 2 * b <= num_sm_parts && rows >= 8 &&
                    decode_merges_cluster_pairs(p, fp8);
  const bool q_fp16 = q.scalar_type() == at::kHalf;
  const cudaStream_t stream = current_stream(q);
  if (fp8) {
    launch_decode_fp8_cache(p, q_fp16, stream);
  } else {
    launch_decode_bf16_cache(p, q_fp16, stream);
  }
  launch_combine(p, q_fp16, stream);
}

void mla_cache_append(const at::Tensor& latent, const at::Tensor& k_rope, at::Tensor& kv_cache,
                      const at::Tensor& slot_mapping) {
  FS_CHECK_CUDA(latent);
  FS_CHECK(latent.scalar_type() == at::kBFloat16 || latent.scalar_type() == at::kHalf,
           "latent must have dtype BFloat16 or Half, got ", latent.scalar_type());
  FS_CHECK_DIM(latent, 2);
  const int64_t t = latent.size(0);
  FS_CHECK_SHAPE(latent, t, kDV);
  FS_CHECK_CUDA(k_rope);
  FS_CHECK_DTYPE(k_rope, latent.scalar_type());
  FS_CHECK_SHAPE(k_rope, t, kDRope);
  FS_CHECK_LAST_DIM_CONTIGUOUS(latent);
  FS_CHECK_LAST_DIM_CONTIGUOUS(k_rope);
  check_rows16(latent, "latent");
  check_rows16(k_rope, "k_rope");
  FS_CHECK(t <= INT_MAX, "at most 2^31 - 1 tokens, got ", t);
  const bool fp8 = check_cache(kv_cache);
  check_slot_mapping(slot_mapping, t);
  FS_CHECK_SAME_DEVICE(kv_cache, latent);
  FS_CHECK_SAME_DEVICE(kv_cache, k_rope);
  FS_CHECK_SAME_DEVICE(kv_cache, slot_mapping);
  if (t == 0) return;
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  AppendParams p{};
  p.latent = latent.data_ptr();
  p.latent_stride = latent.stride(0);
  p.k_rope = k_rope.data_ptr();
  p.rope_stride = k_rope.stride(0);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.kv = kv_cache.data_ptr();
  p.capacity = kv_cache.size(0) * kv_cache.size(1);
  p.tokens = static_cast<int>(t);
  p.fp16_input = latent.scalar_type() == at::kHalf ? 1 : 0;
  launch_cache_append(p, fp8, current_stream(kv_cache));
}


// mla_rope_norm_append's inputs checked and packed (also for mla_absorb_rope_append); *fp8 = the cache's kind.
RopeNormAppendParams check_rope_norm_append_inputs(const at::Tensor& kv, const at::Tensor& q_pe,
                                                   const at::Tensor& positions, const at::Tensor& cos,
                                                   const at::Tensor& sin, const at::Tensor& norm_weight, double eps,
                                                   const at::Tensor& slot_mapping, const at::Tensor& kv_cache,
                                                   const at::Tensor& q_out, bool* fp8_cache) {
  FS_CHECK_CUDA(kv);
  FS_CHECK(kv.scalar_type() == at::kBFloat16 || kv.scalar_type() == at::kHalf,
           "kv must have dtype BFloat16 or Half, got ", kv.scalar_type());
  FS_CHECK_DIM(kv, 2);
  const int64_t t = kv.size(0);
  FS_CHECK(kv.size(1) == kDQK, "kv must be [tokens, 576] (512 latent + 64 k_pe), got ", kv.sizes());
  FS_CHECK_LAST_DIM_CONTIGUOUS(kv);
  check_rows16(kv, "kv");
  FS_CHECK(t <= INT_MAX, "at most 2^31 - 1 tokens, got ", t);
  FS_CHECK_CUDA(q_pe);
  FS_CHECK_DTYPE(q_pe, kv.scalar_type());
  FS_CHECK_DIM(q_pe, 3);
  const int64_t h = q_pe.size(1);
  FS_CHECK(q_pe.size(0) == t && q_pe.size(2) == kDRope && h >= 1 && h <= 1024,
           "q_pe must be [", t, ", heads in [1, 1024], 64], got ", q_pe.sizes());
  FS_CHECK_LAST_DIM_CONTIGUOUS(q_pe);
  check_rows16(q_pe, "q_pe");
  FS_CHECK_CUDA(q_out);
  FS_CHECK_DTYPE(q_out, kv.scalar_type());
  FS_CHECK_SHAPE(q_out, t, h, kDRope);
  FS_CHECK_LAST_DIM_CONTIGUOUS(q_out);
  check_rows16(q_out, "q_out");
  FS_CHECK_CUDA(positions);
  FS_CHECK_DTYPE(positions, at::kLong);
  FS_CHECK_SHAPE(positions, t);
  FS_CHECK_CONTIGUOUS(positions);
  FS_CHECK_CUDA(cos);
  FS_CHECK_DTYPE(cos, at::kFloat);
  FS_CHECK_DIM(cos, 2);
  FS_CHECK(cos.size(0) >= 1 && cos.size(1) == kDRope / 2, "cos must be [max_positions >= 1, 32], got ", cos.sizes());
  FS_CHECK_CONTIGUOUS(cos);
  FS_CHECK(aligned16(cos), "cos's data must be 16-byte aligned");
  FS_CHECK_CUDA(sin);
  FS_CHECK_DTYPE(sin, at::kFloat);
  FS_CHECK(sin.sizes() == cos.sizes(), "sin must have cos's shape ", cos.sizes(), ", got ", sin.sizes());
  FS_CHECK_CONTIGUOUS(sin);
  FS_CHECK(aligned16(sin), "sin's data must be 16-byte aligned");
  FS_CHECK_CUDA(norm_weight);
  WeightDtype wdt = WeightDtype::kFloat32;
  switch (norm_weight.scalar_type()) {
    case at::kBFloat16: wdt = WeightDtype::kBFloat16; break;
    case at::kHalf: wdt = WeightDtype::kFloat16; break;
    case at::kFloat: wdt = WeightDtype::kFloat32; break;
    default: FS_CHECK(false, "norm_weight must have dtype BFloat16, Half or Float, got ", norm_weight.scalar_type());
  }
  FS_CHECK_SHAPE(norm_weight, kDV);
  FS_CHECK_CONTIGUOUS(norm_weight);
  FS_CHECK(aligned16(norm_weight), "norm_weight's data must be 16-byte aligned");
  FS_CHECK(eps >= 0 && std::isfinite(eps), "eps must be >= 0 and finite, got ", eps);
  check_slot_mapping(slot_mapping, t);
  const bool fp8 = check_cache(kv_cache);
  const std::initializer_list<const at::Tensor*> others{&q_pe, &positions, &cos, &sin, &norm_weight, &slot_mapping,
                                                        &kv_cache, &q_out};
  for (const at::Tensor* x : others) {
    FS_CHECK(x->device() == kv.device(), "every tensor must be on kv's device ", kv.device(), ", got ", x->device());
  }
  const int64_t ctas = (t + 3) / 4 + t * ((h + 15) / 16);
  FS_CHECK(ctas <= INT_MAX, "too many tokens x heads for one launch: ", t, " x ", h);
  *fp8_cache = fp8;
  RopeNormAppendParams p{};
  p.kv = kv.data_ptr();
  p.kv_stride = kv.stride(0);
  p.q_pe = q_pe.data_ptr();
  p.q_stride_t = q_pe.stride(0);
  p.q_stride_h = q_pe.stride(1);
  p.q_out = q_out.data_ptr();
  p.qo_stride_t = q_out.stride(0);
  p.qo_stride_h = q_out.stride(1);
  p.positions = positions.data_ptr<int64_t>();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.num_positions = cos.size(0);
  p.weight = norm_weight.data_ptr();
  p.weight_dtype = wdt;
  p.eps = static_cast<float>(eps);
  p.slot_mapping = slot_mapping.data_ptr<int64_t>();
  p.kv_cache = kv_cache.data_ptr();
  p.capacity = kv_cache.size(0) * kv_cache.size(1);
  p.tokens = static_cast<int>(t);
  p.heads = static_cast<int>(h);
  p.fp16_input = kv.scalar_type() == at::kHalf ? 1 : 0;
  return p;
}

void mla_rope_norm_append(const at::Tensor& kv, const at::Tensor& q_pe, const at::Tensor& positions,
                          const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& norm_weight, double eps,
                          const at::Tensor& slot_mapping, at::Tensor& kv_cache, at::Tensor& q_out) {
  bool fp8 = false;
  const RopeNormAppendParams p = check_rope_norm_append_inputs(kv, q_pe, positions, cos, sin, norm_weight, eps,
                                                               slot_mapping, kv_cache, q_out, &fp8);
  if (p.tokens == 0) return;
  const c10::cuda::CUDAGuard guard(kv.device());
  launch_rope_norm_append(p, fp8, current_stream(kv));
}

// a [H, T, K] and w [H, K, N] as both head-GEMV ops take them (the same rules as flashseek/ops.py).
HeadGemvParams check_head_gemv_inputs(const at::Tensor& a, const at::Tensor& w) {
  FS_CHECK_CUDA(a);
  FS_CHECK_CUDA(w);
  FS_CHECK_SAME_DEVICE(a, w);
  FS_CHECK_DTYPE(a, at::kBFloat16);
  FS_CHECK_DTYPE(w, at::kBFloat16);
  FS_CHECK_DIM(a, 3);
  FS_CHECK_DIM(w, 3);
  const int64_t H = a.size(0), T = a.size(1), K = a.size(2), N = w.size(2);
  FS_CHECK(w.size(0) == H && w.size(1) == K, "w must have shape [H=", H, ", K=", K, ", N], got ", w.sizes());
  FS_CHECK(T <= kHeadGemvMaxT, "mla_head_gemv takes at most ", kHeadGemvMaxT, " tokens, got ", T,
           " (flashseek.ops.mla_head_gemv runs torch.bmm above that)");
  FS_CHECK(K > 0 && K % 32 == 0 && K <= kHeadGemvMaxK, "K must be a positive multiple of 32 up to ", kHeadGemvMaxK,
           ", got ", K);
  FS_CHECK(N > 0 && N % 64 == 0, "N must be a positive multiple of 64, got ", N);
  FS_CHECK(a.stride(2) == 1 && a.stride(0) % 8 == 0 && (T <= 1 || a.stride(1) % 8 == 0) && aligned16(a),
           "a must have a unit last stride, other strides multiples of 8 and 16-byte alignment, got strides ",
           a.strides());
  FS_CHECK(w.stride(2) == 1 && w.stride(1) == N && w.stride(0) % 8 == 0 && aligned16(w),
           "w must have contiguous rows [K, N] per head and 16-byte alignment, got strides ", w.strides());
  HeadGemvParams p{};
  p.a = a.data_ptr();
  p.a_hstride = a.stride(0);
  p.a_tstride = a.stride(1);
  p.w = w.data_ptr();
  p.w_hstride = w.stride(0);
  p.H = static_cast<int>(H);
  p.T = static_cast<int>(T);
  p.K = static_cast<int>(K);
  p.N = static_cast<int>(N);
  return p;
}

void mla_head_gemv(const at::Tensor& a, const at::Tensor& w, at::Tensor& out) {
  HeadGemvParams p = check_head_gemv_inputs(a, w);
  FS_CHECK_CUDA(out);
  FS_CHECK_SAME_DEVICE(a, out);
  FS_CHECK_DTYPE(out, at::kBFloat16);
  FS_CHECK_DIM(out, 3);
  FS_CHECK_SHAPE(out, p.H, p.T, p.N);
  FS_CHECK(out.stride(2) == 1, "out must have a unit last stride, got strides ", out.strides());
  if (p.H == 0 || p.T == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  p.out = out.data_ptr();
  p.o_hstride = out.stride(0);
  p.o_tstride = out.stride(1);
  launch_head_gemv(p, current_stream(a));
}

void mla_head_gemv_quant_fp8(const at::Tensor& a, const at::Tensor& w, at::Tensor& out, at::Tensor& scale,
                             bool ue8m0) {
  HeadGemvParams p = check_head_gemv_inputs(a, w);
  FS_CHECK(p.N == 128, "mla_head_gemv_quant_fp8 needs N = 128 (one 1x128 block per head), got ", p.N);
  FS_CHECK(p.K <= kHeadGemvQuantMaxK, "mla_head_gemv_quant_fp8 takes K <= ", kHeadGemvQuantMaxK,
           " (a head's [K, 128] weights must fit one CTA's shared memory), got ", p.K);
  FS_CHECK_CUDA(out);
  FS_CHECK_CUDA(scale);
  FS_CHECK_SAME_DEVICE(a, out);
  FS_CHECK_SAME_DEVICE(a, scale);
  FS_CHECK_DTYPE(out, at::kFloat8_e4m3fn);
  FS_CHECK_DTYPE(scale, at::kFloat);
  FS_CHECK_DIM(out, 2);
  FS_CHECK_DIM(scale, 2);
  FS_CHECK_SHAPE(out, p.T, int64_t(p.H) * 128);
  FS_CHECK_SHAPE(scale, p.T, p.H);
  FS_CHECK(out.stride(1) == 1 && out.stride(0) % 4 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0,
           "out must have rows of unit stride, 4-byte aligned, got strides ", out.strides());
  FS_CHECK(scale.stride(0) == 1 && (p.H <= 1 || scale.stride(1) >= p.T),
           "scale must be column-major ([T, H] with stride (1, ld >= T)) as flashseek.ops.empty_act_scale makes it, "
           "got strides ", scale.strides());
  if (p.H == 0 || p.T == 0) return;
  const c10::cuda::CUDAGuard guard(a.device());
  p.q = static_cast<uint8_t*>(out.data_ptr());
  p.q_tstride = out.stride(0);
  p.scale = scale.data_ptr<float>();
  p.scale_ld = p.H <= 1 ? p.T : scale.stride(1);
  p.ue8m0 = ue8m0;
  launch_head_gemv(p, current_stream(a));
}

// q [T, H, K + 64] (q_nope | q_pe), kv [T, 576], w_uk [H, K, 512] -> q_lat [T, H, 576] = [q_nope @ W_UK |
// rope(q_pe)] and the cache append: mla_rope_norm_append and mla_head_gemv in one launch.
void mla_absorb_rope_append(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& w_uk,
                            const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& norm_weight, double eps, const at::Tensor& slot_mapping,
                            at::Tensor& kv_cache, at::Tensor& q_lat) {
  FS_CHECK_CUDA(q);
  FS_CHECK_DTYPE(q, at::kBFloat16);
  FS_CHECK_DIM(q, 3);
  const int64_t t = q.size(0), h = q.size(1), nope = q.size(2) - kDRope;
  FS_CHECK(nope > 0, "q must be [T, H, qk_nope + 64], got ", q.sizes());
  FS_CHECK(t >= 1 && t <= kAbsorbRopeAppendMaxT, "mla_absorb_rope_append takes 1 to ", kAbsorbRopeAppendMaxT,
           " tokens, got ", t, " (flashseek.ops.mla_absorb_rope_append runs the two ops above that)");
  FS_CHECK_CUDA(q_lat);
  FS_CHECK_DTYPE(q_lat, at::kBFloat16);
  FS_CHECK_SHAPE(q_lat, t, h, kDQK);
  FS_CHECK(norm_weight.scalar_type() == at::kBFloat16, "norm_weight must have dtype BFloat16 here, got ",
           norm_weight.scalar_type(), " (flashseek.ops.mla_absorb_rope_append runs the two ops for other dtypes)");
  bool fp8 = false;
  const RopeNormAppendParams r = check_rope_norm_append_inputs(
      kv, q.narrow(2, nope, kDRope), positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache,
      q_lat.narrow(2, kDV, kDRope), &fp8);
  HeadGemvParams p = check_head_gemv_inputs(q.narrow(2, 0, nope).transpose(0, 1), w_uk);
  FS_CHECK(p.N == kDV, "w_uk must be [H, qk_nope, 512], got ", w_uk.sizes());
  const at::Tensor out = q_lat.narrow(2, 0, kDV).transpose(0, 1);
  FS_CHECK(out.stride(2) == 1, "q_lat must have a unit last stride, got strides ", q_lat.strides());
  FS_CHECK_SAME_DEVICE(q, q_lat);
  FS_CHECK_SAME_DEVICE(q, kv);
  p.out = out.data_ptr();
  p.o_hstride = out.stride(0);
  p.o_tstride = out.stride(1);
  FS_CHECK(absorb_rope_append_fits(p), "mla_absorb_rope_append needs W_UK's [", p.K,
           ", 512] head slice to fit one CTA (qk_nope <= 160), got ", w_uk.sizes());
  const c10::cuda::CUDAGuard guard(q.device());
  launch_absorb_rope_append(p, r, fp8, current_stream(q));
}

}  // namespace

void register_mla_cuda(torch::Library& m) {
  m.impl("mla_head_gemv", &mla_head_gemv);
  m.impl("mla_head_gemv_quant_fp8", &mla_head_gemv_quant_fp8);
  m.impl("mla_decode_plan", &mla_decode_plan);
  m.impl("mla_decode", &mla_decode);
  m.impl("mla_cache_append", &mla_cache_append);
  m.impl("mla_rope_norm_append", &mla_rope_norm_append);
  m.impl("mla_absorb_rope_append", &mla_absorb_rope_append);
}

}  // namespace flashseek
