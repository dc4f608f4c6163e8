// Paged MLA latent decode: parameters and launch API of the kernels (no torch headers here).
//
// Shapes and semantics: python/flashseek/ref/mla.py is the specification. The constants below are
// mirrored there (BLOCK_M, BLOCK_N, FIXED_SPLIT_COST, MIN_SPLIT_BLOCKS, PLAN_PART_INTS) and must stay in sync.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace flashseek::mla {

constexpr int kDQK = 576;            // 512 latent + 64 rope
constexpr int kDV = 512;             // V = first 512 dims of each cached token
constexpr int kDRope = 64;
constexpr int kFp8TokenBytes = 656;  // 512 e4m3 | 4 fp32 scales | 64 bf16 rope
constexpr int kBlockM = 64;          // packed query rows (s * h_q + h) per CTA
constexpr int kBlockN = 64;          // keys per pipeline step; also the unit of the schedule
constexpr int kFixedSplitCost = 5;   // one split costs this many key blocks (Q load, fill, combine)
constexpr int kMinSplitBlocks = 2;   // a part's share is at least this many key blocks (tiny totals)
constexpr int kPlanPartInts = 8;     // per sm part: b0, blk0, b1, blk1, split0, split_req, its ws_base, its n

// Plan layout (int32): [num_sm_parts][8] then [batch][2] = (ws_base, num_splits).
// Part p covers requests b0..b1 (none when b1 < b0), key blocks [blk0, ..) of b0 through
// [.., blk1) of b1; split0 is the split ordinal of the part's first piece within b0.
// split_req of part p is the p-th request (in order) with num_splits > 1, or -1 past the last (then
// 0, 0), followed by that request's ws_base and num_splits: the combine's work list. Each such
// request holds one of the num_sm_parts - 1 part boundaries, so the list always ends with a -1.
// A request with num_splits > 1 writes its partials to workspace slots ws_base + split ordinal;
// the slots of any plan fit in workspace_slots(num_sm_parts).
constexpr int workspace_slots(int num_sm_parts) { return 2 * num_sm_parts; }

// Cluster pairs. A request whose two pieces are exactly parts 2c and 2c + 1 (each part holding nothing
// else) can be merged by a decode launched in 2-CTA clusters along the parts: the two CTAs exchange their
// staged rows through distributed shared memory and each writes half of the final rows, with no workspace
// round trip and nothing left for the combine. The plan marks such a request in the split list with a
// negative split count (-2); the combine skips it when the decode ran clustered (DecodeParams::cluster_pairs).
// e0, e1: the plan entries of parts 2c and 2c + 1. Returns the one request both parts hold, or -1; it is a
// cluster pair if it has two splits (the caller checks, from wherever it keeps the split counts).
__host__ __device__ inline int cluster_pair_candidate(const int* e0, const int* e1, int batch) {
  const int r = e0[0];
  return r >= 0 && r < batch && e0[2] == r && e1[0] == r && e1[2] == r ? r : -1;
}

struct PlanParams {
  const int* seqlens;  // [batch]
  int* plan;           // [8 * num_sm_parts + 2 * batch]
  int batch;
  int num_sm_parts;
};

struct DecodeParams {
  const void* q;                  // [b, s_q, h_q, 576] bf16/fp16, strides in elements
  int64_t q_stride_b, q_stride_s, q_stride_h;
  const void* kv;                 // bf16 [num_pages, page_size, 576] or uint8 [.., .., 656], contiguous
  int num_pages;
  int page_size_log2;             // page_size = 1 << page_size_log2 (16, 32, 64, 128)
  const int* block_table;         // [b, max_pages], unit last stride
  int64_t bt_stride_b;
  int max_pages;
  const int* seqlens;             // [b]
  const int* plan;                // see above
  int num_sm_parts;
  void* out;                      // [b, s_q, h_q, 512] q's dtype, strides in elements
  int64_t o_stride_b, o_stride_s, o_stride_h;
  float* lse;                     // [b, h_q, s_q] contiguous, natural log
  void* ws_o;                     // [workspace_slots, rows, 512] split partials in q's dtype (null if 1 part)
  float* ws_lse;                  // [workspace_slots, rows], log2 domain
  int batch, s_q, h_q, rows;      // rows = s_q * h_q
  // Launched in 2-CTA clusters along the parts (even num_sm_parts; a kernel that merges cluster pairs):
  // requests the plan marks as cluster pairs are merged in the decode (cluster_pair_candidate).
  int cluster_pairs;
  float scale_log2;               // softmax_scale * log2(e)
  int causal;
};

struct AppendParams {
  const void* latent;             // [tokens, 512] bf16/fp16, unit last stride
  int64_t latent_stride;
  const void* k_rope;             // [tokens, 64] same dtype as latent
  int64_t rope_stride;
  const int64_t* slot_mapping;    // [tokens]
  void* kv;                       // the cache, contiguous
  int64_t capacity;               // num_pages * page_size
  int tokens;
  int fp16_input;
};

// The pre-attention glue of an MLA layer in one launch (spec: flashseek/ref/mla.py,
// mla_rope_norm_append): per token, latent = rms_norm(kv[:512]) and k_pe = rope(kv[512:]) are
// written to cache slot slot_mapping[t] (negative or >= capacity: skipped), and every head's
// q_pe = rope(q_pe) to q_out. Rope: interleaved pairs, fp32, rounded to the input dtype.
enum class WeightDtype : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

struct RopeNormAppendParams {
  const void* kv;                 // [tokens, 576] bf16/fp16 (512 latent | 64 k_pe), unit last stride
  int64_t kv_stride;
  const void* q_pe;               // [tokens, heads, 64] kv's dtype, unit last stride
  int64_t q_stride_t, q_stride_h;
  void* q_out;                    // [tokens, heads, 64] kv's dtype, unit last stride (may be q_lat's tail)
  int64_t qo_stride_t, qo_stride_h;
  const int64_t* positions;       // [tokens]; clamped to [0, num_positions)
  const float* cos;               // [num_positions, 32] contiguous (attention factor included)
  const float* sin;
  int64_t num_positions;
  const void* weight;             // [512] kv_a RMSNorm weight, contiguous
  WeightDtype weight_dtype;
  float eps;
  const int64_t* slot_mapping;    // [tokens]
  void* kv_cache;                 // the cache, contiguous
  int64_t capacity;               // num_pages * page_size
  int tokens, heads;
  int fp16_input;
};

// The absorbed MLA's per-head projections for decode-sized T (mla_head_gemv.cu): out[h, t, :] =
// a[h, t, :] @ w[h], bf16 in/out, fp32 accumulation (q_nope @ W_UK, o_lat @ W_UV^T).
constexpr int kHeadGemvMaxT = 64;
constexpr int kHeadGemvMaxK = 1024;  // the token rows are staged in shared memory (per 8 or 16 kMT tokens)
// mla_head_gemv_quant_fp8: one CTA holds a head's whole [K, 128] bf16 slice (144 KB of shared memory), so
// its 128 outputs per token are one 1x128 block it can quantize alone.
constexpr int kHeadGemvQuantMaxK = 576;
struct HeadGemvParams {
  const void* a;        // bf16 [H, T, K], unit stride along K, 16-byte aligned rows
  int64_t a_hstride, a_tstride;
  const void* w;        // bf16 [H, K, N], rows contiguous (stride N), 16-byte aligned
  int64_t w_hstride;
  void* out;            // bf16 [H, T, N], unit stride along N
  int64_t o_hstride, o_tstride;
  int H, T, K, N;       // T <= kHeadGemvMaxT, K % 32 == 0, K <= kHeadGemvMaxK, N % 64 == 0
  // FP8 output instead of out (mla_head_gemv_quant_fp8; N == 128, one 1x128 block per head):
  // q [T, H * 128] e4m3 (row stride q_tstride), scale (t, h) at scale[h * scale_ld + t], the bf16-rounded
  // product quantized exactly as quant_fp8_1x128 quantizes it.
  uint8_t* q = nullptr;
  int64_t q_tstride = 0;
  float* scale = nullptr;
  int64_t scale_ld = 0;
  bool ue8m0 = false;
};
void launch_head_gemv(const HeadGemvParams& p, cudaStream_t stream);
// The shared-memory kernel (mla_head_gemv_smem.cu): a CTA's whole weight slice lands by TMA bulk copies
// issued before the PDL wait. Columns per CTA for a [K, N] head weight, 0 if no slice fits.
int head_gemv_smem_cols(int K, int N);
void launch_head_gemv_smem(const HeadGemvParams& p, cudaStream_t stream);
// mla_absorb_rope_append (mla_head_gemv_smem.cu): the W_UK product (p: q_nope, W_UK [H, K, 512], out =
// q_lat's latent part) and mla_rope_norm_append's work (r; bf16 input and norm weight) in one launch, for
// 1 <= T <= kAbsorbRopeAppendMaxT tokens and a [K, 512] head slice that fits one CTA.
constexpr int kAbsorbRopeAppendMaxT = 16;
bool absorb_rope_append_fits(const HeadGemvParams& p);
void launch_absorb_rope_append(const HeadGemvParams& p, const RopeNormAppendParams& r, bool fp8_cache,
                               cudaStream_t stream);

void launch_plan(const PlanParams& p, cudaStream_t stream);
// Decode of every (row tile, sm part); requests with one split are written to out/lse directly.
void launch_decode_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream);
void launch_decode_fp8_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream);
// The wgmma kernels for 64-row tiles (the bf16 cache uses them for every shape, the FP8 cache for
// s_q * h_q > 32).
void launch_decode_wgmma_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream);
void launch_decode_wgmma_fp8_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream);
// FP8 cache, tiles of up to 32 rows: dequantization into the MMA fragments (mla_decode_fp8_direct.cuh).
void launch_decode_fp8_direct(const DecodeParams& p, bool q_fp16, cudaStream_t stream);
// The turn-taking wgmma kernel for 64-row tiles, bf16 cache (mla_decode_seesaw.cuh). False (nothing
// launched) when the cache cannot be described by a TMA map.
bool launch_decode_seesaw_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream);
// Q in registers, three stages, a softmax and a P V warpgroup (mla_decode_qreg.cuh), bf16 cache.
// False (nothing launched) when the cache or q cannot be described by TMA maps.
bool launch_decode_qreg_bf16_cache(const DecodeParams& p, bool q_fp16, cudaStream_t stream);
// Merges the partials of requests with more than one split into out/lse.
void launch_combine(const DecodeParams& p, bool q_fp16, cudaStream_t stream);
// Whether the kernel launch_decode_bf16_cache / launch_decode_fp8_cache will run for p can merge cluster
// pairs (the 64-row two-warpgroup and Q-in-registers kernels; not the turn-taking one or the narrow FP8 tiles).
bool decode_merges_cluster_pairs(const DecodeParams& p, bool fp8_cache);
void launch_cache_append(const AppendParams& p, bool fp8_cache, cudaStream_t stream);
void launch_rope_norm_append(const RopeNormAppendParams& p, bool fp8_cache, cudaStream_t stream);

}  // namespace flashseek::mla
