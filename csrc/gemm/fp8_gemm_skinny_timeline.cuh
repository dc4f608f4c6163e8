// Per-CTA timeline of the decode GEMM (fp8_gemm_skinny.cuh), compiled in only with
// -DFLASHSEEK_SKINNY_TIMELINE (a standalone harness defines it; the library never does, so its kernels
// are the same instructions with or without this file). Each CTA stamps %globaltimer (ns, common to
// all SMs, coarse on some parts) and %clock64 (its SM's cycles, fine but per-SM) at the points below
// into g_cta[blockIdx.x]. Nothing is recorded while the pointer is null. The host sets them with cudaMemcpyToSymbol, in
// the translation unit that includes the kernels (the variables have internal linkage).
#pragma once
#include <cstdint>

namespace flashseek::skinny::timeline {

enum Point : int {
  kEntry,      // thread 0, first instruction
  kPdl,        // thread 0, past griddepcontrol.wait
  kSetup,      // thread 0, token counts staged, active groups listed, unit range known
  kTmaFirst,   // producer lane 0, first unit's TMA issued
  kTmaLast,    // producer lane 0, last unit's TMA issued (cycles only)
  kFullFirst,  // math thread 0 (warpgroup 0), first full barrier completed (first data landed)
  kFullLast,   // math thread 0, last full barrier completed (cycles only)
  kEpiStart,   // math thread 0, last tile's epilogue begins (its wgmma chain is done; cycles only)
  kEpiEnd,     // math thread 0, last tile's stores (bf16 or fp32 partial) issued (cycles only)
  kExit,       // thread 0, after a __syncthreads() at the end of the kernel
  kProducer,   // producer lane 0, entering the producer (past griddepcontrol.launch_dependents)
  kTmaPre,     // producer lane 0, first unit: its empty barrier passed, before the TMA instructions
  kPoints
};

struct Cta {
  uint64_t ns[kPoints];
  uint64_t clk[kPoints];
  int64_t unit_begin, unit_end;  // the CTA's stream-K range [begin, end)
  uint64_t epi_clk;              // cycles in all of its epilogues (math thread 0)
  uint32_t smid;
  uint32_t tiles_whole, tiles_partial;  // epilogues that stored bf16 / wrote an fp32 partial
  uint32_t last_whole;                  // the last epilogue stored bf16
};

static __device__ Cta* g_cta = nullptr;

struct Stamp {
  uint64_t ns, clk;
};

// The "memory" clobbers keep a stamp in program order with the loads and stores around it.
__device__ __forceinline__ Stamp now() {
  Stamp s;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(s.ns)::"memory");
  asm volatile("mov.u64 %0, %%clock64;\n" : "=l"(s.clk)::"memory");
  return s;
}

// The SM's cycle counter alone (ns = 0): cheap enough for a stamp per unit. A %globaltimer read per unit
// slowed the kernel by 15-35% (session 16), so only the first unit and the CTA-level points read it.
__device__ __forceinline__ Stamp clk_now() {
  Stamp s{0, 0};
  asm volatile("mov.u64 %0, %%clock64;\n" : "=l"(s.clk)::"memory");
  return s;
}

__device__ __forceinline__ uint32_t smid() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%smid;\n" : "=r"(r));
  return r;
}

template <class Rec>
__device__ __forceinline__ void put(Rec* r, int point, Stamp s) {
  r->ns[point] = s.ns;
  r->clk[point] = s.clk;
}

}  // namespace flashseek::skinny::timeline
