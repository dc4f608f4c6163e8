// Decode GEMM (csrc/gemm/fp8_gemm_skinny.cuh) on its own: back-to-back timing and a per-CTA timeline, to
// see where a call's time goes as the token count grows (steady stream rate, ramp, tail). Launches the
// kernel exactly as the library's launcher does (PDL, one CTA per SM, stream-K), on random e4m3 data,
// with the weights in two copies used alternately so that consecutive calls do not share L2 lines.
// Checks 256 random output elements against a float64 host sum (the probe must not time a wrong kernel).
// -DFLASHSEEK_SKINNY_TIMELINE_LIGHT as well keeps only the CTA-level stamps (past the PDL wait, exit).
// build (from the repo root):
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -DFLASHSEEK_SKINNY_TIMELINE -Icsrc \
//     -I<nvidia-cutlass>/include bench/probes/skinny_timeline.cu csrc/gemm/sm90_tensor_maps.cu -o skinny_timeline
// usage: skinny_timeline M N K [calls=20] [rounds=7]
// Prints one JSON object: median µs per call back to back, and the timeline of one call that follows
// a back-to-back run (so the card is warm and the previous grid overlaps its start, as in a layer).
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gemm/fp8_gemm_skinny.cuh"
#include "gemm/sm90_tensor_maps.h"

#define CK(x)                                                                                       \
  do {                                                                                              \
    cudaError_t e_ = (x);                                                                           \
    if (e_ != cudaSuccess) {                                                                        \
      fprintf(stderr, "CUDA error %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e_));            \
      exit(1);                                                                                      \
    }                                                                                               \
  } while (0)

namespace sk = flashseek::skinny;

static double e4m3_to_double(uint8_t b) {
  const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  const double v = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -v : v;
}

#ifdef FLASHSEEK_SKINNY_TIMELINE
// min / p10 / median / p90 / max of v as a JSON object ("null" when empty).
static std::string stats(std::vector<double> v) {
  if (v.empty()) return "null";
  std::sort(v.begin(), v.end());
  char buf[200];
  snprintf(buf, sizeof buf, "{\"min\": %.3f, \"p10\": %.3f, \"med\": %.3f, \"p90\": %.3f, \"max\": %.3f}",
           v.front(), v[v.size() / 10], v[v.size() / 2], v[v.size() * 9 / 10], v.back());
  return buf;
}
#endif

static int run_one(int m, int n, int k, int calls, int rounds) {
  if (m < 1 || m > sk::kTokens || n % 16 || k % 128) {
    fprintf(stderr, "need 1 <= M <= 64, N %% 16 == 0, K %% 128 == 0\n");
    return 2;
  }
  int sms = 0;
  CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int kb = k / 128, nsb = (n + 127) / 128;
  const int64_t units = int64_t(nsb) * kb;
  const int ctas = int(std::min<int64_t>(sms, units));

  std::mt19937 rng(1234);
  uint64_t state = 0x9e3779b97f4a7c15ull * uint64_t(m * 131 + n + k);
  auto rand_fp8 = [&](size_t count) {  // magnitudes 2^-6 .. 1.875, both signs: no NaN, no overflow
    std::vector<uint8_t> v(count);
    for (size_t i = 0; i < count; i += 8) {  // splitmix64, 8 bytes a step (hundreds of MB of weights)
      uint64_t z = (state += 0x9e3779b97f4a7c15ull);
      z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
      z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
      z ^= z >> 31;
      for (size_t b = 0; b < 8 && i + b < count; ++b) {
        const uint8_t r = uint8_t(z >> (8 * b));
        v[i + b] = uint8_t((r & 0x80) | (8 + (r & 0x7f) % 56));
      }
    }
    return v;
  };
  std::uniform_real_distribution<float> uni(0.5f, 2.0f);
  const std::vector<uint8_t> hw = rand_fp8(size_t(n) * k), hx = rand_fp8(size_t(m) * k);
  const int sa_ld = (m + 3) / 4 * 4;
  std::vector<float> hsa(size_t(kb) * sa_ld), hsb(size_t(nsb) * kb);
  for (auto& f : hsa) f = uni(rng) / 448.f;
  for (auto& f : hsb) f = uni(rng) / 448.f;

  uint8_t *dw[2], *dx;
  float *dsa, *dsb;
  __nv_bfloat16* dout;
  void* dpart;
  int* dcount;
  for (auto& w : dw) {
    CK(cudaMalloc(&w, hw.size()));
    CK(cudaMemcpy(w, hw.data(), hw.size(), cudaMemcpyHostToDevice));
  }
  CK(cudaMalloc(&dx, hx.size()));
  CK(cudaMemcpy(dx, hx.data(), hx.size(), cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dsa, hsa.size() * 4));
  CK(cudaMemcpy(dsa, hsa.data(), hsa.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dsb, hsb.size() * 4));
  CK(cudaMemcpy(dsb, hsb.data(), hsb.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&dout, size_t(m) * n * 2));
  CK(cudaMemset(dout, 0xff, size_t(m) * n * 2));  // NaN: an unwritten element fails the check
  CK(cudaMalloc(&dpart, size_t(sms) * sk::kSlotFloats * 4));
  CK(cudaMalloc(&dcount, sk::kMaxCtas * 4));
  CK(cudaMemset(dcount, 0, sk::kMaxCtas * 4));
#ifdef FLASHSEEK_SKINNY_TIMELINE
  sk::timeline::Cta* dcta;
  CK(cudaMalloc(&dcta, sizeof(sk::timeline::Cta) * ctas));
  CK(cudaMemset(dcta, 0, sizeof(sk::timeline::Cta) * ctas));

#endif
  sk::Params p{};
  p.a_scale = dsa;
  p.a_scale_ld = sa_ld;
  p.b_scale = dsb;
  p.out = dout;
  p.num_groups = 1;
  p.m_rows = m;
  p.n = n;
  p.k = k;
  p.partials = static_cast<float4*>(dpart);
  p.tile_counters = dcount;
  CUtensorMap tw[2];
  for (int i = 0; i < 2; ++i) tw[i] = flashseek::fp8_rows_map(dw[i], n, k, sk::kRows);
  sk::TokenMaps tx;
  for (int i = 0; i < 4; ++i) tx.rows[i] = flashseek::fp8_rows_map(dx, m, k, 8 << i);
  CK(cudaFuncSetAttribute(sk::skinny_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, sk::Smem::kDynamic<false>));
  CK(cudaFuncSetAttribute(sk::skinny_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, sk::Smem::kDynamic<true>));
  cudaStream_t stream;
  CK(cudaStreamCreate(&stream));
  // The build the library's launcher picks (sk::kStageMinTokens), or STAGED=0 / 1.
  const char* forced = getenv("STAGED");
  const bool staged = forced && *forced ? forced[0] == '1' : m >= sk::kStageMinTokens;
  auto launch = [&](int i) {
    if (staged) {
      flashseek::launch_pdl(sk::skinny_kernel<true>, dim3(ctas), dim3(sk::kThreads), size_t(sk::Smem::kDynamic<true>),
                            stream, tw[i & 1], tx, p);
    } else {
      flashseek::launch_pdl(sk::skinny_kernel<false>, dim3(ctas), dim3(sk::kThreads),
                            size_t(sk::Smem::kDynamic<false>), stream, tw[i & 1], tx, p);
    }
  };

  launch(0);
  CK(cudaStreamSynchronize(stream));
  // Check 256 outputs.
  std::vector<uint16_t> hout(size_t(m) * n);
  CK(cudaMemcpy(hout.data(), dout, hout.size() * 2, cudaMemcpyDeviceToHost));
  double max_rel = 0;
  int bad = 0;
  for (int s = 0; s < 256; ++s) {
    const int t = rng() % m, r = rng() % n;
    double ref = 0;
    for (int b = 0; b < kb; ++b) {
      double acc = 0;
      for (int j = 0; j < 128; ++j)
        acc += e4m3_to_double(hx[size_t(t) * k + b * 128 + j]) * e4m3_to_double(hw[size_t(r) * k + b * 128 + j]);
      ref += acc * hsa[size_t(b) * sa_ld + t] * hsb[size_t(r / 128) * kb + b];
    }
    uint32_t bits = uint32_t(hout[size_t(t) * n + r]) << 16;
    float got;
    memcpy(&got, &bits, 4);
    const double rel = std::fabs(got - ref) / std::max(1e-3, std::fabs(ref));
    if (!(rel < 2e-2)) ++bad;  // bf16 output: 2^-8 relative, plus fp32 accumulation of K terms
    if (rel > max_rel || std::isnan(got)) max_rel = std::isnan(got) ? INFINITY : rel;
  }

  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<float> per_call;
  for (int r = 0; r < rounds; ++r) {
    CK(cudaEventRecord(e0, stream));
    for (int i = 0; i < calls; ++i) launch(i);
    CK(cudaEventRecord(e1, stream));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    per_call.push_back(ms * 1000.f / calls);
  }
  std::sort(per_call.begin(), per_call.end());
  const float us = per_call[per_call.size() / 2];

#ifdef FLASHSEEK_SKINNY_TIMELINE
  // Timeline: calls-1 untimed launches, then one with the stamps on (it overlaps the previous tail), or
  // with TL_ISOLATED=1 after a synchronisation (no overlap). TL_REPEAT=n repeats it (are the slow CTAs'
  // SMs the same each time?); DUMP=1 adds every CTA's [smid, units, rate GB/s, first data us, last data
  // us, exit us]. Per-unit stamps read only %clock64 (a %globaltimer read per unit slowed the kernel by
  // 15-35%); each CTA's cycles are converted with its own clock rate between its first data and its exit.
  const int repeat = getenv("TL_REPEAT") ? atoi(getenv("TL_REPEAT")) : 1;
  const bool isolated = getenv("TL_ISOLATED") && getenv("TL_ISOLATED")[0] == '1';
  const bool dump = getenv("DUMP") && getenv("DUMP")[0] == '1';
  sk::timeline::Cta* null_ptr = nullptr;
  const double roof_bytes = double(n) * k + double(m) * k + double(m) * n * 2;
  for (int rep = 0; rep < repeat; ++rep) {
    CK(cudaMemset(dcta, 0, sizeof(sk::timeline::Cta) * ctas));
    for (int i = 0; i < calls - 1; ++i) launch(i);
    if (isolated) CK(cudaStreamSynchronize(stream));
    CK(cudaMemcpyToSymbolAsync(sk::timeline::g_cta, &dcta, sizeof(dcta), 0, cudaMemcpyHostToDevice, stream));
    launch(calls - 1);
    CK(cudaMemcpyToSymbolAsync(sk::timeline::g_cta, &null_ptr, sizeof(null_ptr), 0, cudaMemcpyHostToDevice, stream));
    CK(cudaStreamSynchronize(stream));
    std::vector<sk::timeline::Cta> tl(ctas);
    CK(cudaMemcpy(tl.data(), dcta, sizeof(sk::timeline::Cta) * ctas, cudaMemcpyDeviceToHost));
    namespace T = sk::timeline;
#ifdef FLASHSEEK_SKINNY_TIMELINE_LIGHT
    {  // CTA-level stamps only: when each CTA got past griddepcontrol.wait (math thread 0) and exited.
      uint64_t p0 = ~0ull;
      for (auto& c : tl) p0 = std::min(p0, c.ns[T::kPdl]);
      std::vector<double> pdl, ex, work;
      std::string cta_dump;
      for (auto& c : tl) {
        const double pd = (c.ns[T::kPdl] - p0) / 1e3, e = (c.ns[T::kExit] - p0) / 1e3;
        pdl.push_back(pd);
        ex.push_back(e);
        work.push_back(e - pd);
        if (dump) {
          char buf[96];
          snprintf(buf, sizeof buf, "%s[%u, %lld, %.2f, %.2f]", cta_dump.empty() ? "" : ", ", c.smid,
                   (long long)(c.unit_end - c.unit_begin), pd, e);
          cta_dump += buf;
        }
      }
      printf("{\"light\": 1, \"staged\": %d, \"m\": %d, \"n\": %d, \"k\": %d, \"ctas\": %d, \"us\": %.2f, \"isolated\": %d, "
             "\"rep\": %d, \"pdl_us\": %s, \"exit_us\": %s, \"exit_minus_pdl_us\": %s%s%s%s}\n",
             int(staged), m, n, k, ctas, us, int(isolated), rep, stats(pdl).c_str(), stats(ex).c_str(),
             stats(work).c_str(), dump ? ", \"ctas_dump\": [" : "", cta_dump.c_str(), dump ? "]" : "");
      continue;
    }
#endif
    uint64_t t0 = ~0ull, t_end = 0;
    for (auto& c : tl) {
      t0 = std::min(t0, c.ns[T::kFullFirst]);
      t_end = std::max(t_end, c.ns[T::kExit]);
    }
    std::vector<double> rate, first_full, last_full, exit_t, epi_us, tail;
    std::string cta_dump;
    const double unit_bytes = double(sk::kRows) * 128;
    for (auto& c : tl) {
      const double nu = double(c.unit_end - c.unit_begin);
      const double ghz = double(c.clk[T::kExit] - c.clk[T::kFullFirst]) /
                         std::max(1.0, double(c.ns[T::kExit] - c.ns[T::kFullFirst]));
      const double span_ns = double(c.clk[T::kFullLast] - c.clk[T::kFullFirst]) / ghz;
      const double r = nu > 1 && span_ns > 0 ? (nu - 1) * unit_bytes / span_ns : 0;  // GB/s
      if (r > 0) rate.push_back(r);
      const double ff = (c.ns[T::kFullFirst] - t0) / 1e3, lf = ff + span_ns / 1e3, ex = (c.ns[T::kExit] - t0) / 1e3;
      first_full.push_back(ff);
      last_full.push_back(lf);
      exit_t.push_back(ex);
      tail.push_back(ex - lf);
      epi_us.push_back(c.epi_clk / ghz / 1e3);
      if (dump) {
        char buf[128];
        snprintf(buf, sizeof buf, "%s[%u, %lld, %.1f, %.2f, %.2f, %.2f]", cta_dump.empty() ? "" : ", ", c.smid,
                 (long long)nu, r, ff, lf, ex);
        cta_dump += buf;
      }
    }
    double sum_rate = 0;
    for (double r : rate) sum_rate += r;
    printf("{\"staged\": %d, \"m\": %d, \"n\": %d, \"k\": %d, \"ctas\": %d, \"units\": %lld, \"us\": %.2f, "
           "\"tbps\": %.3f, \"check_bad\": %d, \"check_max_rel\": %.2e, \"isolated\": %d, \"rep\": %d, "
           "\"span_first_data_to_exit_us\": %.2f, \"sum_cta_rate_tbps\": %.3f, \"cta_rate_gbps\": %s, "
           "\"first_full_us\": %s, \"last_full_us\": %s, \"exit_us\": %s, \"tail_us\": %s, \"epilogue_us\": %s%s%s%s}\n",
           int(staged), m, n, k, ctas, (long long)units, us, roof_bytes / (us * 1e6), bad, max_rel, int(isolated), rep,
           (t_end - t0) / 1e3, sum_rate / 1e3, stats(rate).c_str(), stats(first_full).c_str(), stats(last_full).c_str(),
           stats(exit_t).c_str(), stats(tail).c_str(), stats(epi_us).c_str(), dump ? ", \"ctas_dump\": [" : "",
           cta_dump.c_str(), dump ? "]" : "");
  }
  CK(cudaFree(dcta));
#else
  const double roof_bytes = double(n) * k + double(m) * k + double(m) * n * 2;
  printf("{\"staged\": %d, \"m\": %d, \"n\": %d, \"k\": %d, \"ctas\": %d, \"units\": %lld, \"us\": %.2f, \"tbps\": %.3f, "
         "\"check_bad\": %d, \"check_max_rel\": %.2e}\n",
         int(staged), m, n, k, ctas, (long long)units, us, roof_bytes / (us * 1e6), bad, max_rel);
#endif
  for (auto* ptr : {(void*)dw[0], (void*)dw[1], (void*)dx, (void*)dsa, (void*)dsb, (void*)dout, dpart, (void*)dcount})
    CK(cudaFree(ptr));
  CK(cudaStreamDestroy(stream));
  return bad ? 1 : 0;
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s M,N,K [M,N,K ...]   (env CALLS=20 ROUNDS=7)\n", argv[0]);
    return 2;
  }
  const int calls = getenv("CALLS") ? atoi(getenv("CALLS")) : 20;
  const int rounds = getenv("ROUNDS") ? atoi(getenv("ROUNDS")) : 7;
  int rc = 0;
  for (int i = 1; i < argc; ++i) {
    int m, n, k;
    if (sscanf(argv[i], "%d,%d,%d", &m, &n, &k) != 3) return 2;
    rc |= run_one(m, n, k, calls, rounds);
  }
  return rc;
}
