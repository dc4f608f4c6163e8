// HBM read-stream probe: how fast can every SM pull a weight matrix into shared memory with TMA, with no
// math at all? Compares the decode GEMM's pattern (128-row x 128 B swizzled boxes, 8 x 16 KB ring, one
// CTA per SM, each CTA a contiguous range of row-tile-major units) with other box shapes, ring depths,
// two CTAs per SM, 1D bulk copies and a plain LDG.128 reduction, on 15 MB to 940 MB. Each figure is the
// median of 5 x 20 back-to-back launches alternating two buffers, so it includes each launch's ramp and
// tail: the gap between 117 MB and 940 MB is that fixed cost.
// build: nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 hbm_stream_probe.cu -o hbm_stream_probe
// Results (H100, session 11): docs/performance.md, "HBM read stream".
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <algorithm>

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  fprintf(stderr, "CUDA error %s at %d: %s\n", #x, __LINE__, cudaGetErrorString(e_)); exit(1);} } while (0)

struct P {
  const uint8_t* base;
  int64_t K;          // bytes per row
  int64_t units;      // total units
  int nkb;            // units per tile (K / inner)
  int box_rows, inner, stages, mode;  // mode 0: 2D tensor, 1: 1D bulk
  int64_t unit_bytes;
  unsigned* sink;
};

__device__ __forceinline__ uint32_t su32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint32_t b, int n) { asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(b), "r"(n)); }
__device__ __forceinline__ void mbar_expect(uint32_t b, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t b) { asm volatile("mbarrier.arrive.shared.b64 _, [%0];" ::"r"(b) : "memory"); }
__device__ __forceinline__ void mbar_wait(uint32_t b, uint32_t ph) {
  asm volatile("{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared.b64 p, [%0], %1;\n@!p bra W;\n}\n" ::"r"(b), "r"(ph) : "memory");
}

__global__ void __launch_bounds__(64, 1) tma_kernel(const __grid_constant__ CUtensorMap tm, const P p) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ uint64_t bars[64];
  const int tid = threadIdx.x;
  const uint32_t full0 = su32(bars), empty0 = su32(bars + 32);
  if (tid == 0) {
    for (int s = 0; s < p.stages; ++s) { mbar_init(full0 + 8 * s, 1); mbar_init(empty0 + 8 * s, 1); }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int64_t G = gridDim.x, c = blockIdx.x;
  const int64_t u0 = c * p.units / G, u1 = (c + 1) * p.units / G;
  const uint32_t sbase = su32(smem);
  if (tid == 0) {
    int s = 0; uint32_t ph = 0;
    for (int64_t u = u0; u < u1; ++u) {
      if (u - u0 >= p.stages) mbar_wait(empty0 + 8 * s, ph ^ 1);
      mbar_expect(full0 + 8 * s, uint32_t(p.unit_bytes));
      const uint32_t dst = sbase + s * uint32_t(p.unit_bytes);
      if (p.mode == 0) {
        const int64_t t = u / p.nkb; const int kb = int(u - t * p.nkb);
        int x = kb * p.inner, y = int(t * p.box_rows);
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                     ::"r"(dst), "l"(&tm), "r"(x), "r"(y), "r"(full0 + 8 * s) : "memory");
      } else {
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     ::"r"(dst), "l"(p.base + u * p.unit_bytes), "r"(uint32_t(p.unit_bytes)), "r"(full0 + 8 * s) : "memory");
      }
      if (++s == p.stages) { s = 0; ph ^= 1; }
    }
  } else if (tid == 32) {
    int s = 0; uint32_t ph = 0; unsigned acc = 0;
    for (int64_t u = u0; u < u1; ++u) {
      mbar_wait(full0 + 8 * s, ph);
      acc ^= *reinterpret_cast<volatile unsigned*>(smem + s * p.unit_bytes + (u & 63) * 4);
      mbar_arrive(empty0 + 8 * s);
      if (++s == p.stages) { s = 0; ph ^= 1; }
    }
    if (acc == 0x12345678u) p.sink[c] = acc;
  }
}

__global__ void ldg_kernel(const uint4* __restrict__ x, int64_t n16, unsigned* sink) {
  unsigned acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n16; i += int64_t(gridDim.x) * blockDim.x) {
    uint4 v = __ldg(x + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) sink[threadIdx.x] = acc;
}

typedef CUresult (*EncodeFn)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*, const cuuint64_t*,
                             const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                             CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
static EncodeFn encode() {
  static EncodeFn f = nullptr;
  if (!f) {
    cudaDriverEntryPointQueryResult q;
    CK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", reinterpret_cast<void**>(&f), cudaEnableDefault, &q));
  }
  return f;
}

int main(int argc, char** argv) {
  int sms; CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const int64_t big = int64_t(1) << 30;
  uint8_t* buf[2];
  for (auto& b : buf) { CK(cudaMalloc(&b, big)); CK(cudaMemset(b, 0x5a, big)); }
  unsigned* sink; CK(cudaMalloc(&sink, 1 << 20));
  CK(cudaFuncSetAttribute(tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (227 << 10) - 1024));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  printf("# %d SMs; us = median of 5 x (20 back-to-back launches alternating two buffers) / 20\n", sms);
  auto timeit = [&](auto&& launch, int reps = 20) {
    for (int i = 0; i < 3; ++i) launch(i & 1);
    CK(cudaDeviceSynchronize());
    std::vector<float> r;
    for (int k = 0; k < 5; ++k) {
      CK(cudaEventRecord(e0));
      for (int i = 0; i < reps; ++i) launch(i & 1);
      CK(cudaEventRecord(e1)); CK(cudaEventSynchronize(e1));
      float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); r.push_back(ms * 1000 / reps);
    }
    std::sort(r.begin(), r.end());
    CK(cudaGetLastError());
    return r[2];
  };
  struct Cfg { const char* name; int mode, box_rows, inner, stages, ctas_per_sm; CUtensorMapSwizzle sw; };
  const Cfg cfgs[] = {
    {"2D 128r x128B sw128 8st (skinny)", 0, 128, 128, 8, 1, CU_TENSOR_MAP_SWIZZLE_128B},
    {"2D 128r x128B sw128 4st", 0, 128, 128, 4, 1, CU_TENSOR_MAP_SWIZZLE_128B},
    {"2D 128r x128B sw128 12st", 0, 128, 128, 12, 1, CU_TENSOR_MAP_SWIZZLE_128B},
    {"2D 64r x128B sw128 16st", 0, 64, 128, 16, 1, CU_TENSOR_MAP_SWIZZLE_128B},
    {"2D 256r x128B sw128 6st", 0, 256, 128, 6, 1, CU_TENSOR_MAP_SWIZZLE_128B},
    {"2D 128r x128B sw128 6st x2cta", 0, 128, 128, 6, 2, CU_TENSOR_MAP_SWIZZLE_128B},
    {"2D 64r x256B nosw 8st", 0, 64, 256, 8, 1, CU_TENSOR_MAP_SWIZZLE_NONE},
    {"2D 128r x256B nosw 6st", 0, 128, 256, 6, 1, CU_TENSOR_MAP_SWIZZLE_NONE},
    {"1D 16KB 8st", 1, 128, 128, 8, 1, CU_TENSOR_MAP_SWIZZLE_NONE},
    {"1D 32KB 6st", 1, 256, 128, 6, 1, CU_TENSOR_MAP_SWIZZLE_NONE},
    {"1D 16KB 12st", 1, 128, 128, 12, 1, CU_TENSOR_MAP_SWIZZLE_NONE},
  };
  struct Shape { int64_t N, K; };
  const Shape shapes[] = {{16384, 7168}, {7168, 16384}, {2112, 7168}, {131072, 7168}};
  for (const Shape& sh : shapes) {
    const int64_t bytes = sh.N * sh.K;
    printf("== %lld x %lld = %.1f MB (%.2f us at 3.0 TB/s)\n", (long long)sh.N, (long long)sh.K, bytes / 1e6, bytes / 3e6);
    for (int g : {sms * 4, sms * 8}) {
      float us = timeit([&](int i) { ldg_kernel<<<g, 512>>>(reinterpret_cast<const uint4*>(buf[i]), bytes / 16, sink); });
      printf("  %-34s %9.2f us %6.3f TB/s\n", g == sms * 4 ? "LDG.128 4x512/SM" : "LDG.128 8x512/SM", us, bytes / us / 1e6);
    }
    for (const Cfg& cf : cfgs) {
      CUtensorMap tm[2];
      P p{};
      p.K = sh.K; p.box_rows = cf.box_rows; p.inner = cf.inner; p.stages = cf.stages; p.mode = cf.mode;
      p.unit_bytes = int64_t(cf.box_rows) * cf.inner; p.nkb = int(sh.K / cf.inner);
      p.units = bytes / p.unit_bytes; p.sink = sink;
      for (int i = 0; i < 2; ++i) {
        cuuint64_t dims[2] = {cuuint64_t(sh.K), cuuint64_t(sh.N)}, strides[1] = {cuuint64_t(sh.K)};
        cuuint32_t box[2] = {cuuint32_t(cf.inner), cuuint32_t(cf.box_rows)}, es[2] = {1, 1};
        CUresult r = encode()(&tm[i], CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, buf[i], dims, strides, box, es,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, cf.sw, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
        if (r != CUDA_SUCCESS) { printf("  %s: encode failed %d\n", cf.name, int(r)); goto next; }
      }
      {
        const size_t smem = size_t(cf.stages) * p.unit_bytes + 1024;
        float us = timeit([&](int i) {
          P q = p; q.base = buf[i];
          tma_kernel<<<sms * cf.ctas_per_sm, 64, smem>>>(tm[i], q);
        });
        printf("  %-34s %9.2f us %6.3f TB/s\n", cf.name, us, bytes / us / 1e6);
      }
    next:;
    }
  }
  return 0;
}
