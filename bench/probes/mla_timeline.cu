// Per-CTA timeline of back-to-back MLA decode calls (the bf16 dispatch; the two-warpgroup kernel and the
// combine carry the stamps), as CUDA-graph replays like bench/probes/mla_small_batch.py, with
// %globaltimer stamps in every CTA (mla_timeline.cuh). Written for session 17's question: why the same
// pieces run 1-2 us slower in a grid of exactly one CTA per SM than in a smaller or a larger one.
// Build (no torch; the kernels are compiled into this file with the stamps on):
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++20 --expt-relaxed-constexpr -DNDEBUG \
//     -Icsrc -isystem <cutlass>/include bench/probes/mla_timeline.cu csrc/gemm/sm90_tensor_maps.cu -o mla_timeline
// Usage: mla_timeline b h_q s_k num_sm_parts [sets]
//   prints the µs per call (graph replays, no stamps written) and, for each call of one stamped replay,
//   the phases relative to that call's first decode entry; DUMP=file writes every ring row as CSV.
#define FLASHSEEK_MLA_TIMELINE 1
#include "mla/mla_combine.cu"
#include "mla/mla_decode_qreg_bf16.cu"
#include "mla/mla_decode_seesaw_bf16.cu"
#include "mla/mla_decode_wgmma_bf16.cu"
#include "mla/mla_plan.cu"
#include "mla/mla_tile_maps.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

namespace harness {
using u64 = unsigned long long;

__global__ void fill_random(__nv_bfloat16* x, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = __float2bfloat16((h & 0xffff) / 32768.0f - 1.0f);
  }
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

struct Stat {
  double lo, med, hi;
};
Stat stat(std::vector<double> v) {
  if (v.empty()) return {0, 0, 0};
  std::sort(v.begin(), v.end());
  return {v.front(), v[v.size() / 2], v.back()};
}
}  // namespace harness

using namespace flashseek::mla;
using namespace harness;
namespace tl = flashseek::mla::timeline;

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s b h_q s_k num_sm_parts [sets]\n", argv[0]);
    return 2;
  }
  const int b = std::atoi(argv[1]), h_q = std::atoi(argv[2]), s_k = std::atoi(argv[3]), P = std::atoi(argv[4]);
  const int sets = argc > 5 ? std::atoi(argv[5]) : 8;
  if (b < 1 || h_q < 1 || h_q > 128 || s_k < 1 || P < 1 || sets < 1) {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  const int rows = h_q, pages_per = (s_k + 63) / 64, pages = b * pages_per;
  const int m_tiles = (rows + 63) / 64, grid = m_tiles * P;
  // launch_combine_t's two shapes: [row groups, entries of the plan's split list (<= min(b, P - 1))]
  const int entries = std::min(b, P - 1);
  const int combine_grid = P >= 8 * b ? rows * entries : (rows + 7) / 8 * entries;

  std::vector<__nv_bfloat16*> q(sets), kv(sets);
  for (int s = 0; s < sets; ++s) {
    check(cudaMalloc(&q[s], size_t(b) * rows * kDQK * 2), "malloc q");
    check(cudaMalloc(&kv[s], size_t(pages) * 64 * kDQK * 2), "malloc kv");
    fill_random<<<1024, 256>>>(q[s], size_t(b) * rows * kDQK, 17u + s);
    fill_random<<<4096, 256>>>(kv[s], size_t(pages) * 64 * kDQK, 1000u + s);
  }
  std::vector<int> perm(pages);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(7));
  std::vector<int> lens(b, s_k);
  int *d_table, *d_lens, *d_plan;
  check(cudaMalloc(&d_table, pages * 4), "malloc table");
  check(cudaMalloc(&d_lens, b * 4), "malloc lens");
  check(cudaMalloc(&d_plan, (8 * P + 2 * b) * 4), "malloc plan");
  check(cudaMemcpy(d_table, perm.data(), pages * 4, cudaMemcpyHostToDevice), "table");
  check(cudaMemcpy(d_lens, lens.data(), b * 4, cudaMemcpyHostToDevice), "lens");
  void* d_out;
  float *d_lse, *d_ws_lse;
  void* d_ws_o;
  check(cudaMalloc(&d_out, size_t(b) * rows * kDV * 2), "malloc out");
  check(cudaMalloc(&d_lse, size_t(b) * rows * 4), "malloc lse");
  check(cudaMalloc(&d_ws_o, size_t(workspace_slots(P)) * rows * kDV * 2), "malloc ws");
  check(cudaMalloc(&d_ws_lse, size_t(workspace_slots(P)) * rows * 4), "malloc ws lse");

  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
  launch_plan(PlanParams{d_lens, d_plan, b, P}, stream);
  std::vector<DecodeParams> ps(sets);
  for (int s = 0; s < sets; ++s) {
    DecodeParams& p = ps[s];
    p = DecodeParams{};
    p.q = q[s];
    p.q_stride_h = kDQK;
    p.q_stride_s = int64_t(h_q) * kDQK;
    p.q_stride_b = int64_t(h_q) * kDQK;
    p.kv = kv[s];
    p.num_pages = pages;
    p.page_size_log2 = 6;
    p.block_table = d_table + 0;
    p.bt_stride_b = pages_per;
    p.max_pages = pages_per;
    p.seqlens = d_lens;
    p.plan = d_plan;
    p.num_sm_parts = P;
    p.out = d_out;
    p.o_stride_h = kDV;
    p.o_stride_s = int64_t(h_q) * kDV;
    p.o_stride_b = int64_t(h_q) * kDV;
    p.lse = d_lse;
    p.ws_o = P > 1 ? d_ws_o : nullptr;
    p.ws_lse = P > 1 ? d_ws_lse : nullptr;
    p.batch = b;
    p.s_q = 1;
    p.h_q = h_q;
    p.rows = rows;
    p.scale_log2 = 0.0721687836f * 1.44269504f;  // 1/sqrt(192) in the log2 domain, as bench mla
    p.causal = 0;
  }
  // The block table rows: request i owns perm[i * pages_per ...].
  check(cudaStreamSynchronize(stream), "plan");

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
  for (int s = 0; s < sets; ++s) {
    launch_decode_wgmma_bf16_cache(ps[s], false, stream);
    launch_combine(ps[s], false, stream);
  }
  check(cudaStreamEndCapture(stream, &graph), "end capture");
  check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  for (int i = 0; i < 20; ++i) check(cudaGraphLaunch(exec, stream), "warm-up");
  check(cudaStreamSynchronize(stream), "warm-up sync");

  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  std::vector<float> per_call;
  for (int r = 0; r < 200; ++r) {
    cudaEventRecord(e0, stream);
    cudaGraphLaunch(exec, stream);
    cudaEventRecord(e1, stream);
    cudaEventSynchronize(e1);
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    per_call.push_back(ms * 1000.f / sets);
  }
  std::sort(per_call.begin(), per_call.end());
  std::printf("b=%d h_q=%d s_k=%d P=%d grid=%d combine_grid=%d sets=%d: %.2f us per call (median of 200 replays; p10 %.2f)\n",
              b, h_q, s_k, P, grid, combine_grid, sets, per_call[100], per_call[20]);

  // One stamped replay (the stamps cost a few instructions per CTA: read the figures above).
  const unsigned cap = unsigned(sets) * std::max(grid, combine_grid);
  u64 *d_dec, *d_comb;
  check(cudaMalloc(&d_dec, size_t(cap) * tl::kDecodeStamps * 8), "malloc ring");
  check(cudaMalloc(&d_comb, size_t(cap) * tl::kCombineStamps * 8), "malloc ring");
  check(cudaMemset(d_dec, 0, size_t(cap) * tl::kDecodeStamps * 8), "zero ring");
  check(cudaMemset(d_comb, 0, size_t(cap) * tl::kCombineStamps * 8), "zero ring");
  const unsigned zero = 0;
  check(cudaMemcpyToSymbol(tl::g_decode, &d_dec, sizeof(d_dec)), "symbol");
  check(cudaMemcpyToSymbol(tl::g_combine, &d_comb, sizeof(d_comb)), "symbol");
  check(cudaMemcpyToSymbol(tl::g_cap, &cap, sizeof(cap)), "symbol");
  check(cudaMemcpyToSymbol(tl::g_decode_n, &zero, sizeof(zero)), "symbol");
  check(cudaMemcpyToSymbol(tl::g_combine_n, &zero, sizeof(zero)), "symbol");
  check(cudaGraphLaunch(exec, stream), "stamped replay");
  check(cudaStreamSynchronize(stream), "stamped replay sync");
  std::vector<u64> dec(size_t(cap) * tl::kDecodeStamps), comb(size_t(cap) * tl::kCombineStamps);
  cudaMemcpy(dec.data(), d_dec, dec.size() * 8, cudaMemcpyDeviceToHost);
  cudaMemcpy(comb.data(), d_comb, comb.size() * 8, cudaMemcpyDeviceToHost);

  if (const char* path = std::getenv("DUMP")) {
    FILE* f = std::fopen(path, "w");
    // Decode rows: kind,call, then mla_timeline.cuh's 11 decode stamps (entry, piece read, block 0 in, Q in,
    // blocks done, written, exit, n_iter, past the wait, cta, smid); combine rows: its 9 stamps.
    std::fprintf(f, "kind,call,s0,s1,s2,s3,s4,s5,s6,s7,s8,s9,s10\n");
    for (int s = 0; s < sets; ++s)
      for (int i = 0; i < grid; ++i) {
        const u64* r = &dec[(size_t(s) * grid + i) * tl::kDecodeStamps];
        std::fprintf(f, "decode,%d", s);
        for (int k : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10}) std::fprintf(f, ",%llu", r[k]);
        std::fprintf(f, "\n");
      }
    for (int s = 0; s < sets; ++s)
      for (int i = 0; i < combine_grid; ++i) {
        const u64* r = &comb[(size_t(s) * combine_grid + i) * tl::kCombineStamps];
        std::fprintf(f, "combine,%d,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu\n", s, r[0], r[1], r[2], r[3], r[4], r[5],
                     r[6], r[7], r[8]);
      }
    std::fclose(f);
  }

  // Per call, µs after the call's first decode entry: decode entries, past the PDL wait (busy / empty
  // CTAs), the busy CTAs' first block done and rows written, their exits; the combine's entries, past
  // its wait, exits; then the next call's first decode entry.
  std::printf("call | dec entry lo/hi | wait busy lo/hi | wait empty hi | Q in med | written hi | exit busy hi | "
              "comb entry lo/med/hi | comb wait lo/hi | comb exit hi | next dec entry\n");
  for (int s = 0; s < sets; ++s) {
    const u64* d = &dec[size_t(s) * grid * tl::kDecodeStamps];
    const u64* c = &comb[size_t(s) * combine_grid * tl::kCombineStamps];
    u64 t0 = ~0ull;
    for (int i = 0; i < grid; ++i) t0 = std::min(t0, d[i * tl::kDecodeStamps]);
    auto us = [&](u64 t) { return t == 0 ? -1.0 : (double(t) - double(t0)) / 1000.0; };
    std::vector<double> entry, wait_busy, wait_empty, block0, written, exit_busy, centry, cwait, cexit;
    for (int i = 0; i < grid; ++i) {
      const u64* r = &d[i * tl::kDecodeStamps];
      entry.push_back(us(r[0]));
      const bool busy = r[1] != 0;
      (busy ? wait_busy : wait_empty).push_back(us(r[8]));
      if (busy) {
        block0.push_back(us(r[3]));
        written.push_back(us(r[5]));
        exit_busy.push_back(us(r[6]));
      }
    }
    for (int i = 0; i < combine_grid; ++i) {
      const u64* r = &c[i * tl::kCombineStamps];
      centry.push_back(us(r[0]));
      cwait.push_back(us(r[1]));
      if (r[3]) cexit.push_back(us(r[2]));
    }
    double next = -1;
    if (s + 1 < sets) {
      u64 t1 = ~0ull;
      for (int i = 0; i < grid; ++i) t1 = std::min(t1, dec[(size_t(s + 1) * grid + i) * tl::kDecodeStamps]);
      next = us(t1);
    }
    const Stat se = stat(entry), swb = stat(wait_busy), swe = stat(wait_empty), sb = stat(block0),
               sw = stat(written), sx = stat(exit_busy), sce = stat(centry), scw = stat(cwait), scx = stat(cexit);
    std::printf("%4d | %6.2f %6.2f | %6.2f %6.2f | %6.2f | %6.2f | %6.2f | %6.2f | %6.2f %6.2f %6.2f | %6.2f %6.2f | %6.2f | %6.2f\n",
                s, se.lo, se.hi, swb.lo, swb.hi, swe.hi, sb.med, sw.hi, sx.hi, sce.lo, sce.med, sce.hi, scw.lo, scw.hi,
                scx.hi, next);
  }
  // Phases inside the CTAs that worked (thread 0), µs after each CTA's own PDL wait, calls 2 on:
  // median / max of stamp column `cols[k]` over the rows whose column `worked` is non-zero.
  auto phases = [&](const char* what, const std::vector<u64>& ring, int rows_per_call, int stamps, int worked,
                    int wait, std::initializer_list<std::pair<const char*, int>> cols) {
    std::printf("%s, after its wait (median / max, us):", what);
    for (const auto& [name, col] : cols) {
      std::vector<double> v;
      for (int s = 1; s < sets; ++s)
        for (int i = 0; i < rows_per_call; ++i) {
          const u64* r = &ring[(size_t(s) * rows_per_call + i) * stamps];
          if (r[worked]) v.push_back((double(r[col]) - double(r[wait])) / 1000.0);
        }
      const Stat st = stat(v);
      std::printf(" %s %.2f / %.2f,", name, st.med, st.hi);
    }
    std::printf("\n");
  };
  // The combine: the plan read, the lse pass (its first group of loads landed), the partials summed, the
  // exit once the stores are issued.
  phases("combine", comb, combine_grid, tl::kCombineStamps, 3, 1,
         {{"plan read", 6}, {"lse pass", 7}, {"summed", 8}, {"exit", 2}});
  // The decode's first piece: Q landed, block 0 landed, its last block's P V done, its rows written.
  phases("decode", dec, grid, tl::kDecodeStamps, 1, 8,
         {{"Q in", 3}, {"block 0 in", 2}, {"blocks done", 4}, {"written", 5}});
  // The busy CTAs' SMs in the last call (placement: which GPCs the pieces landed on).
  {
    const u64* d = &dec[size_t(sets - 1) * grid * tl::kDecodeStamps];
    std::printf("busy CTAs' SMs, last call:");
    for (int i = 0; i < grid; ++i)
      if (d[i * tl::kDecodeStamps + 1] != 0) std::printf(" %llu", d[i * tl::kDecodeStamps + 10]);
    std::printf("\n");
  }
  return 0;
}
