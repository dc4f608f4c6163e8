// Does compute-sanitizer racecheck model the CTA barrier patterns of flashseek's kernels? Each kernel
// below is race-free under the PTX memory model; run the binary under
//   compute-sanitizer --tool racecheck ./racecheck_barriers <case>
// and see which ones it reports (session 27: the decode GEMM's signal-warp slots and the MLA piece
// staging were reported, with no race found by reading the code).
//   arrive   warp 0 writes, barrier.arrive 1; warp 1 barrier.sync 1, then reads (producer / consumer)
//   twosync  warp 0 writes, barrier.sync 1 at one instruction; warp 1 barrier.sync 1 at another, reads
//   plain    warp 0 writes, __syncthreads; warp 1 reads
//   roles    two warpgroups loop in their own branches over named barriers 1-2 (arrive / sync, as the
//            MLA two-warpgroup kernel), then all threads stage rows, __syncthreads, read them back,
//            __syncthreads, for three pieces
// Build: nvcc -arch=sm_90a -lineinfo -o racecheck_barriers bench/probes/racecheck_barriers.cu
#include <cstdio>
#include <cstring>

__device__ __forceinline__ void bsync(int id, int n) { asm volatile("barrier.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void barrive(int id, int n) { asm volatile("barrier.arrive %0, %1;" ::"r"(id), "r"(n) : "memory"); }

// arrive (kArrive) or twosync: warp 0 writes and arrives or syncs, warp 1 syncs at another instruction and reads.
template <bool kArrive>
__global__ void k_pair(int* out) {
  __shared__ int s[32];
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (w == 0) {
    s[l] = l + 1;
    if (kArrive) barrive(1, 64); else bsync(1, 64);
  } else {
    bsync(1, 64);
    out[l] = s[31 - l];
  }
}

__global__ void k_plain(int* out) {
  __shared__ int s[32];
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  if (w == 0) s[l] = l + 1;
  __syncthreads();
  if (w == 1) out[l] = s[31 - l];
}

__global__ void k_roles(int* out) {
  __shared__ float p[64];
  __shared__ float tile[256];
  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
  float acc = 0.f;
  for (int piece = 0; piece < 3; ++piece) {
    for (int it = 0; it < 4; ++it) {
      if (wg == 0) {
        if (t < 64) p[t] = float(piece * 4 + it + t);
        barrive(1, 256);  // P full
        acc += 1.f;
        bsync(2, 256);    // block end
      } else {
        bsync(1, 256);
        acc += p[t % 64];
        bsync(2, 256);
      }
    }
    __syncthreads();
    tile[(threadIdx.x * 7) % 256] = acc;  // stage
    __syncthreads();
    acc += tile[255 - threadIdx.x];       // copy
    __syncthreads();
  }
  out[threadIdx.x] = int(acc);
}

int main(int argc, char** argv) {
  const char* c = argc > 1 ? argv[1] : "arrive";
  int* out = nullptr;
  cudaMalloc(&out, 1024 * sizeof(int));
  if (!strcmp(c, "arrive")) k_pair<true><<<1, 64>>>(out);
  else if (!strcmp(c, "twosync")) k_pair<false><<<1, 64>>>(out);
  else if (!strcmp(c, "plain")) k_plain<<<1, 64>>>(out);
  else if (!strcmp(c, "roles")) k_roles<<<1, 256>>>(out);
  else { fprintf(stderr, "unknown case %s\n", c); return 2; }
  const cudaError_t e = cudaDeviceSynchronize();
  printf("%s: %s\n", c, cudaGetErrorString(e));
  return e == cudaSuccess ? 0 : 1;
}
