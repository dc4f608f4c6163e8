// Paged MLA latent decode, 64-row tiles on Hopper tensor cores (wgmma), bf16 latent cache.
//
// Why a second kernel: with mma.sync every warp re-reads its Q, K and V fragments from shared memory
// (~790 KB per 64x64 block, docs/mla-design.md), which caps the h_q = 128 rows near 215 TFLOP/s.
// wgmma reads each operand tile once per warpgroup straight from 128B-swizzled shared memory.
//
// Grid (row tiles, sm parts) and plan semantics are the mma.sync kernel's (mla_decode_kernel.cuh);
// a CTA owns 64 packed query rows. 384 threads = three warpgroups with split roles:
//   WG0 (S, softmax; 192 registers): the latent part of Q lives in its registers for the whole
//        request (A fragments, 128 registers), so S = Q K^T (32 x wgmma m64n64k16 with A from
//        registers + 4 rope k steps from shared memory) reads only K from shared memory. Then the
//        mask and online softmax in the log2 domain; P (bf16) goes into the stage's rope panel,
//        which S no longer needs, with the per-row rescale factor beside it.
//   WG1, WG2 (P V, loads; 160 registers): each owns 256 of the 512 output dims as 128 fp32
//        registers a thread; O_half += P V_half (4 x m64n256k16, P and V from shared memory). After
//        both halves are done with a stage they refill it with the block three ahead (cp.async,
//        completion signalled on the stage's mbarrier).
// Three 73,728-byte KV stages: WG0 computes S of block n+1 (and its softmax) while WG1/WG2 run
// P V of block n, and block n+2 is in flight. Synchronisation is by mbarriers with phase parity
// (kfull: the 256 loader threads' cp.async completions; pfull: WG0's P and factors written) and a
// named barrier between WG1 and WG2 before a stage is refilled; a running block counter gives each
// block its stage and parity across requests.
//
// Shared memory, each tile in 64-column panels of [rows][128 B] with the 128B swizzle (16-byte
// chunk c of row r at r * 128 + ((c ^ r % 8) << 4)), the layout wgmma descriptors describe:
//   3 K stages (64 keys x 576; panel 8 = rope, then P) | Q rope 64 x 64 | factors | stats | mbarriers
// V is K's first 512 columns: for P V it is read as an MN-major operand (dims contiguous), with
// panels 8,192 B apart (leading byte offset) and 8-key groups 1,024 B apart (stride byte offset).
#pragma once
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <utility>

#include "mla/mla_decode_kernel.cuh"

namespace flashseek::mla {
namespace wg {

using detail::cp_async_16;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::fast_exp2;
using detail::pack_bf16;
using detail::q_to_bf16;
using detail::smem_u32;
using detail::store_pair;

constexpr int kThreads = 384;
constexpr int kM = 64;
constexpr int kStages = 3;
constexpr int kPanelBytes = 64 * 128;                // 64 rows x 64 bf16
constexpr int kPanels = kDQK / 64;                   // 9; panel 8 holds the rope dims, then P
constexpr int kTileBytes = kPanels * kPanelBytes;    // 73,728
// Registers per thread of each role. setmaxnreg.inc only takes what .dec released within the CTA,
// so the three must average the launch allocation (168 for 384 threads): 184 + 160 + 160 = 504.
constexpr int kRegsS = 184;                          // WG0
constexpr int kRegsPV = 160;                         // WG1 (152: ptxas ignores the setmaxnreg)
constexpr int kRegsLoad = 160;                       // WG2: P V and the KV loads (152 is too few)
static_assert(kRegsS + kRegsPV + kRegsLoad <= 3 * 168, "setmaxnreg budget");

struct Smem {
  static constexpr int kK = 0;                                  // [kStages] tiles
  static constexpr int kQRope = kK + kStages * kTileBytes;      // 64 x 64 rope part of Q
  static constexpr int kAlpha = kQRope + kPanelBytes;           // [kStages][2 halves][64] rescale factors
  // [64] visible keys of each row (int) during a request, then the final row max (log2 domain).
  static constexpr int kLimit = kAlpha + kStages * 2 * kM * 4;
  static constexpr int kMRun = kLimit;
  static constexpr int kLRun = kLimit + kM * 4;                 // [64] final row sum
  static constexpr int kBars = kLRun + kM * 4;                  // kfull, pfull, pvdone [kStages] each
  static constexpr int kUsed = kBars + 3 * kStages * 8;
  static constexpr int kTotal = kUsed;
};
static_assert(Smem::kTotal <= 232448, "shared memory exceeds the sm_90 per-block limit");

// Named barriers (0 is __syncthreads).
constexpr int kBarWG0 = 1;       // WG0's four warps (S reads of the rope panel done before P overwrites it)
constexpr int kBarRequest = 2;   // all: request boundary

__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory"); }
// Orders generic-proxy shared-memory accesses (st.shared, cp.async) and async-proxy ones (wgmma).
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` when all of this thread's earlier cp.async copies have landed (no count increment:
// the barrier's expected count already includes this thread).
__device__ __forceinline__ void mbar_arrive_on_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// 32-bit shared-memory store: the generic 64-bit pointer costs WG0 registers it does not have.
__device__ __forceinline__ void st_shared(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t swz(int r, int c) {  // chunk c (< 8) of row r inside a panel
  return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
}

// wgmma shared-memory descriptor, 128B swizzle. K-major tiles ignore the leading byte offset.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// A byte offset within a tile as a descriptor increment (start address field, 16-byte units). Tiles
// lie below 256 KB, so the 14-bit field never carries into the next one.
__device__ __forceinline__ constexpr uint64_t desc_off(uint32_t bytes) { return bytes >> 4; }

namespace gmma = cute::SM90::GMMA;
using MmaQKrs = gmma::MMA_64x32x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::K>;
using MmaQKss = gmma::MMA_64x32x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>;
using MmaPV = gmma::MMA_64x256x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::MN>;

template <size_t... I>
__device__ __forceinline__ void qk_step_rs(const uint32_t (&a)[4], uint64_t db, float (&d)[16], gmma::ScaleOut sc,
                                           std::index_sequence<I...>) {
  MmaQKrs::fma(a[0], a[1], a[2], a[3], db, d[I]..., sc);
}
template <size_t... I>
__device__ __forceinline__ void qk_step_ss(uint64_t da, uint64_t db, float (&d)[16], std::index_sequence<I...>) {
  MmaQKss::fma(da, db, d[I]..., gmma::ScaleOut::One);
}
template <size_t... I>
__device__ __forceinline__ void pv_step(uint64_t da, uint64_t db, float (&d)[128], std::index_sequence<I...>) {
  MmaPV::fma(da, db, d[I]..., gmma::ScaleOut::One);
}
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(d[i]);
}
template <int N>
__device__ __forceinline__ void fence_regs(uint32_t (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(d[i]);
}

// A KV block copy by WG2: 64 tokens x 72 chunks over 128 threads; thread t copies
// chunks t % 8 + 8 j (j < 9) of tokens t / 8 + 16 i (i < 4). Eight threads cover one token's
// 128-byte panel row: coalesced reads, and the XOR swizzle spreads their stores over all banks.
// Tokens at or past len_eff are zero-filled (never read). Arrives on `full` when the copies land.
__device__ __forceinline__ void issue_kv_block(const DecodeParams& p, uint32_t dst, uint32_t full, int bi, int blk,
                                               int len_eff, int t) {
  const int c0 = t & 7;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = (t >> 3) + 16 * i;
    const int token = blk * kBlockN + row;
    const char* src = static_cast<const char*>(p.kv);
    int bytes = 0;
    if (token < len_eff) {
      // len_eff <= max_pages * page_size keeps the table index in range; page ids are clamped to
      // [0, num_pages): a bad table gives wrong values, never an out-of-bounds read.
      const uint32_t page = min(static_cast<uint32_t>(__ldg(p.block_table + bi * p.bt_stride_b + (token >> p.page_size_log2))),
                                static_cast<uint32_t>(p.num_pages - 1));
      const int64_t slot = (static_cast<int64_t>(page) << p.page_size_log2) + (token & ((1 << p.page_size_log2) - 1));
      src += slot * (kDQK * 2) + c0 * 16;
      bytes = 16;
    }
#pragma unroll
    for (int j = 0; j < kPanels; ++j) {
      cp_async_16(dst + j * kPanelBytes + swz(row, c0), src + (bytes ? j * 128 : 0), bytes);
    }
  }
  mbar_arrive_on_copies(full);
}

// Two q values (a bf16 pair of the A fragment) from global memory; fp16 q is rounded to bf16.
template <typename QT>
__device__ __forceinline__ uint32_t load_q_pair(const QT* src);
template <>
__device__ __forceinline__ uint32_t load_q_pair<__nv_bfloat16>(const __nv_bfloat16* src) {
  return __ldg(reinterpret_cast<const unsigned int*>(src));
}
template <>
__device__ __forceinline__ uint32_t load_q_pair<__half>(const __half* src) {
  const unsigned int w = __ldg(reinterpret_cast<const unsigned int*>(src));
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
  return pack_bf16(f.x, f.y);
}

// What every role derives from the launch. Each role computes it after its setmaxnreg: a value
// kept live across setmaxnreg may sit in a register above the new limit, and ptxas then ignores
// the setmaxnreg (and serialises every wgmma of the kernel).
struct Ctx {
  uint32_t s_base;  // shared memory, 1,024-byte aligned
  char* smem;
  int m_tile, tw, q4, row0;  // row0: this thread's accumulator rows are row0 and row0 + 8
  int b0, b1, blk0, blk1, meta0, meta2, cap;
  const int* meta;

  __device__ __forceinline__ explicit Ctx(const DecodeParams& p) {
    // wgmma's 128B swizzle is a function of address bits 4-9: tiles must start 1,024-byte aligned.
    // A kernel without static shared memory gets its dynamic window at that alignment (CUTLASS's
    // sm90 kernels rely on the same); no slack is left to realign, so a violation stops the kernel.
    extern __shared__ __align__(1024) char smem_raw[];
    s_base = smem_u32(smem_raw);
    if (s_base & 1023u) __trap();
    smem = smem_raw;
    m_tile = blockIdx.x;
    tw = threadIdx.x & 127;
    const int lane = threadIdx.x & 31;
    q4 = lane & 3;
    row0 = (tw >> 5) * 16 + (lane >> 2);
    meta = p.plan + kPlanPartInts * blockIdx.y;
    meta0 = meta[0], meta2 = meta[2];
    b0 = max(meta0, 0), blk0 = meta[1], b1 = min(meta2, p.batch - 1), blk1 = meta[3];
    cap = p.max_pages << p.page_size_log2;
  }
  __device__ __forceinline__ uint32_t bar_full(uint32_t st) const { return s_base + Smem::kBars + 8 * st; }
  __device__ __forceinline__ uint32_t bar_p(uint32_t st) const { return s_base + Smem::kBars + 8 * (kStages + st); }
  __device__ __forceinline__ uint32_t bar_pv(uint32_t st) const { return s_base + Smem::kBars + 8 * (2 * kStages + st); }
  // Request bi's piece of this part: key blocks [blk_begin, blk_begin + n_iter).
  __device__ __forceinline__ void piece(const DecodeParams& p, int bi, int& len, int& len_eff, int& blk_begin,
                                        int& n_iter) const {
    len = max(p.seqlens[bi], 0);
    len_eff = min(len, cap);  // a length beyond the table's capacity is clamped
    const int nblk = (len + kBlockN - 1) / kBlockN;
    blk_begin = bi == meta0 ? max(blk0, 0) : 0;
    const int blk_end = bi == meta2 ? min(blk1, nblk) : nblk;
    n_iter = max(blk_end - blk_begin, 0);
  }
};

// WG0: Q in registers, S = Q K^T, mask, online softmax; P and the row factors to the P V roles.
template <typename QT>
__device__ __forceinline__ void s_role(const DecodeParams& p) {
  const Ctx c(p);
  const uint32_t s_base = c.s_base;
  char* smem = c.smem;
  const int m_tile = c.m_tile, tw = c.tw, q4 = c.q4, row0 = c.row0, b0 = c.b0, b1 = c.b1;
  int* s_limit = reinterpret_cast<int*>(smem + Smem::kLimit);
  float* s_mrun = reinterpret_cast<float*>(smem + Smem::kMRun);
  float* s_lrun = reinterpret_cast<float*>(smem + Smem::kLRun);
  uint32_t gblk = 0;
  for (int bi = b0; bi <= b1; ++bi) {
    int len, len_eff, blk_begin, n_iter;
    c.piece(p, bi, len, len_eff, blk_begin, n_iter);
    const QT* qb = static_cast<const QT*>(p.q) + bi * p.q_stride_b;
    // ---- Q: latent A fragments into registers, rope part into shared memory ----
    uint32_t qf[kDV / 16][4];
    if (n_iter > 0) {
      // The rope part first: while the 128 fragment registers fill, nothing else may be live.
      for (int idx = tw; idx < kM * 8; idx += 128) {
        const int row = idx >> 3, c = idx & 7;
        const int R = m_tile * kM + row;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (R < p.rows) {
          const int s = R / p.h_q, hh = R - s * p.h_q;
          v = q_to_bf16<QT>(__ldg(reinterpret_cast<const uint4*>(qb + s * p.q_stride_s + hh * p.q_stride_h + kDV + c * 8)));
        }
        *reinterpret_cast<uint4*>(smem + Smem::kQRope + swz(row, c)) = v;
      }
      const QT* qrow[2];
      bool valid[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int R = m_tile * kM + row0 + 8 * h;
        valid[h] = R < p.rows;
        const int s = valid[h] ? R / p.h_q : 0, hh = valid[h] ? R - s * p.h_q : 0;
        qrow[h] = qb + s * p.q_stride_s + hh * p.q_stride_h + 2 * q4;
      }
#pragma unroll
      for (int kk = 0; kk < kDV / 16; ++kk) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e & 1, col = 16 * kk + 8 * (e >> 1);
          qf[kk][e] = valid[h] ? load_q_pair<QT>(qrow[h] + col) : 0u;
        }
      }
      fence_async_smem();
      bar_sync(kBarWG0, 128);
    }
    // Visible keys of each row, kept in shared memory: WG0 has no registers to spare across the loop.
    if (tw < kM) {
      const int R = m_tile * kM + tw;
      const int s = min(R / p.h_q, p.s_q - 1);
      s_limit[tw] = min(p.causal ? len - p.s_q + s + 1 : len, len_eff);
    }
    bar_sync(kBarWG0, 128);
    float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
    const uint64_t desc_qrope = make_desc(s_base + Smem::kQRope, 16, 1024);
    for (int it = 0; it < n_iter; ++it) {
      const uint32_t G = gblk + it, st = G % kStages;
      const uint32_t sK = s_base + Smem::kK + st * kTileBytes;
      const uint64_t desc_k = make_desc(sK, 16, 1024);
      mbar_wait(c.bar_full(st), (G / kStages) & 1);
      fence_async_smem();
      // ---- S = Q K^T: 32 latent k steps with Q from registers, 4 rope k steps from shared memory ----
      // Two 32-key halves, each its own online-softmax step: 16 accumulator registers instead of 32
      // (WG0 holds 128 registers of Q; with 32 more ptxas spilled and serialised every wgmma).
      // Half 0's P waits in 8 registers: the rope panel it goes to is still read by half 1's S.
      const int key0 = (blk_begin + it) * kBlockN + 2 * q4;
      const int vis[2] = {s_limit[row0] - key0, s_limit[row0 + 8] - key0};
      const uint32_t sP = s_base + Smem::kK + st * kTileBytes + 8 * kPanelBytes;
      uint32_t p_lo[8];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float sacc[16];
        fence_regs(sacc);
#pragma unroll
        for (int kk = 0; kk < kDV / 16; ++kk) fence_regs(qf[kk]);  // Q's loads stay before the wgmma fence
        cute::warpgroup_arrive();
        const uint64_t desc_kh = desc_k + desc_off(half * 32 * 128);  // keys 32 * half ..
#pragma unroll
        for (int kk = 0; kk < kDV / 16; ++kk) {
          qk_step_rs(qf[kk], desc_kh + desc_off((kk >> 2) * kPanelBytes + (kk & 3) * 32), sacc,
                     kk == 0 ? gmma::ScaleOut::Zero : gmma::ScaleOut::One, std::make_index_sequence<16>{});
        }
#pragma unroll
        for (int kk = 0; kk < kDRope / 16; ++kk) {
          qk_step_ss(desc_qrope + desc_off(kk * 32), desc_kh + desc_off(8 * kPanelBytes + kk * 32), sacc,
                     std::make_index_sequence<16>{});
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_regs(sacc);

        // ---- mask + online softmax step (log2 domain); a warp owns all keys of its 16 rows ----
        float mloc[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float v = 32 * half + 8 * j + (e & 1) < vis[e >> 1] ? sacc[4 * j + e] * p.scale_log2 : -INFINITY;
            sacc[4 * j + e] = v;
            mloc[e >> 1] = fmaxf(mloc[e >> 1], v);
          }
        }
        float alpha[2], m_use[2], sloc[2] = {0.f, 0.f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          mloc[h] = fmaxf(mloc[h], __shfl_xor_sync(0xffffffffu, mloc[h], 1));
          mloc[h] = fmaxf(mloc[h], __shfl_xor_sync(0xffffffffu, mloc[h], 2));
          const float m_new = fmaxf(m_run[h], mloc[h]);
          m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: avoid (-inf) - (-inf)
          alpha[h] = fast_exp2(m_run[h] - m_use[h]);
          m_run[h] = m_new;
        }
        if (half == 1) {
          // Every warp's S wgmma has read the rope panel before P overwrites it.
          bar_sync(kBarWG0, 128);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            st_shared(sP + swz(row0, j) + q4 * 4, p_lo[2 * j]);
            st_shared(sP + swz(row0 + 8, j) + q4 * 4, p_lo[2 * j + 1]);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float p0 = fast_exp2(sacc[4 * j + 0] - m_use[0]);
          const float p1 = fast_exp2(sacc[4 * j + 1] - m_use[0]);
          const float p2 = fast_exp2(sacc[4 * j + 2] - m_use[1]);
          const float p3 = fast_exp2(sacc[4 * j + 3] - m_use[1]);
          sloc[0] += p0 + p1;
          sloc[1] += p2 + p3;
          if (half == 0) {
            p_lo[2 * j] = pack_bf16(p0, p1);
            p_lo[2 * j + 1] = pack_bf16(p2, p3);
          } else {
            st_shared(sP + swz(row0, 4 + j) + q4 * 4, pack_bf16(p0, p1));
            st_shared(sP + swz(row0 + 8, 4 + j) + q4 * 4, pack_bf16(p2, p3));
          }
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          sloc[h] += __shfl_xor_sync(0xffffffffu, sloc[h], 1);
          sloc[h] += __shfl_xor_sync(0xffffffffu, sloc[h], 2);
          l_run[h] = l_run[h] * alpha[h] + sloc[h];
        }
        if (q4 == 0) {  // the P V warpgroups rescale O by each half's factor
          const uint32_t a = s_base + Smem::kAlpha + ((st * 2 + half) * kM + row0) * 4;
          st_shared(a, __float_as_uint(alpha[0]));
          st_shared(a + 32, __float_as_uint(alpha[1]));
        }
      }
      fence_async_smem();
      mbar_arrive(c.bar_p(st));
    }
    bar_sync(kBarWG0, 128);  // every row limit read before the row max replaces it
    if (q4 == 0) {
      s_mrun[row0] = m_run[0];
      s_mrun[row0 + 8] = m_run[1];
      s_lrun[row0] = l_run[0];
      s_lrun[row0 + 8] = l_run[1];
    }
    bar_sync(kBarRequest, kThreads);  // statistics visible; WG1/WG2 write the outputs
    bar_sync(kBarRequest, kThreads);  // ... and are done reading them
    gblk += n_iter;
  }
}

// WG1 / WG2: O_half += P V_half over the blocks, then the output; the loader (WG2) also owns the
// KV pipeline.
template <typename QT, bool kLoader>
__device__ __forceinline__ void pv_role(const DecodeParams& p) {
  const Ctx c(p);
  const uint32_t s_base = c.s_base;
  char* smem = c.smem;
  const int m_tile = c.m_tile, tw = c.tw, q4 = c.q4, row0 = c.row0, b0 = c.b0, b1 = c.b1;
  const float* s_alpha = reinterpret_cast<const float*>(smem + Smem::kAlpha);
  const float* s_lrun = reinterpret_cast<const float*>(smem + Smem::kLRun);
  const float* s_mrun = reinterpret_cast<const float*>(smem + Smem::kMRun);
  const int* per_req = p.plan + kPlanPartInts * p.num_sm_parts;
  const int split0 = c.meta[4];
  const int n_slots = workspace_slots(p.num_sm_parts);
  const int half = kLoader ? 1 : 0;
  uint32_t gblk = 0;
  for (int bi = b0; bi <= b1; ++bi) {
    int len, len_eff, blk_begin, n_iter;
    c.piece(p, bi, len, len_eff, blk_begin, n_iter);
    if constexpr (kLoader) {
#pragma unroll 1
      for (int i = 0; i < kStages && i < n_iter; ++i) {
        const uint32_t st = (gblk + i) % kStages;
        issue_kv_block(p, s_base + Smem::kK + st * kTileBytes, c.bar_full(st), bi, blk_begin + i, len_eff, tw);
      }
    }
    float o[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) o[i] = 0.f;
    for (int it = 0; it < n_iter; ++it) {
      const uint32_t G = gblk + it, st = G % kStages, parity = (G / kStages) & 1;
      const uint32_t sK = s_base + Smem::kK + st * kTileBytes;
      const uint64_t desc_p = make_desc(sK + 8 * kPanelBytes, 16, 1024);
      const uint64_t desc_v = make_desc(sK + 4 * half * kPanelBytes, kPanelBytes, 1024);
      mbar_wait(c.bar_p(st), parity);
      fence_async_smem();
      // Keys 0..31 then 32..63, each after rescaling O by its half's factor (WG0's softmax steps).
#pragma unroll
      for (int half_k = 0; half_k < 2; ++half_k) {
        const float alpha0 = s_alpha[(st * 2 + half_k) * kM + row0], alpha1 = s_alpha[(st * 2 + half_k) * kM + row0 + 8];
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          o[4 * j + 0] *= alpha0;
          o[4 * j + 1] *= alpha0;
          o[4 * j + 2] *= alpha1;
          o[4 * j + 3] *= alpha1;
        }
        fence_regs(o);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kk = 2 * half_k; kk < 2 * half_k + 2; ++kk) {
          pv_step(desc_p + desc_off(kk * 32), desc_v + desc_off(kk * 2048), o, std::make_index_sequence<128>{});
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_regs(o);
      }
      if constexpr (kLoader) {
        if (it + kStages < n_iter) {
          // WG1's half is done with this stage too (and WG0 finished with it before pfull).
          mbar_wait(c.bar_pv(st), parity);
          issue_kv_block(p, sK, c.bar_full(st), bi, blk_begin + it + kStages, len_eff, tw);
        }
      } else {
        mbar_arrive(c.bar_pv(st));
      }
    }
    bar_sync(kBarRequest, kThreads);

    // ---- write this piece: straight to out/lse, or a split partial to the workspace ----
    const int nsplit = per_req[2 * bi + 1];
    const int slot = per_req[2 * bi] + (bi == c.meta0 ? split0 : 0);
    const bool direct = nsplit <= 1;
    const bool writable = direct || (slot >= 0 && slot < n_slots && p.ws_o != nullptr);  // else: inconsistent plan
    const int col0 = half * 256 + 2 * q4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + 8 * h;
      const int R = m_tile * kM + r;
      if (!writable || R >= p.rows) continue;
      const float l = s_lrun[r], m = s_mrun[r];
      const bool seen = l > 0.f;
      const float inv = seen ? 1.f / l : 0.f;
      const float lse2 = seen ? m + __log2f(l) : -INFINITY;  // log2 domain
      if (direct) {
        const int s = R / p.h_q, hh = R - s * p.h_q;
        QT* dst = static_cast<QT*>(p.out) + bi * p.o_stride_b + s * p.o_stride_s + hh * p.o_stride_h + col0;
#pragma unroll
        for (int j = 0; j < 32; ++j) store_pair<QT>(dst + 8 * j, o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
        if (half == 0 && q4 == 0) p.lse[(static_cast<int64_t>(bi) * p.h_q + hh) * p.s_q + s] = lse2 * 0.69314718055994531f;
      } else {
        float* dst = p.ws_o + (static_cast<int64_t>(slot) * p.rows + R) * kDV + col0;
#pragma unroll
        for (int j = 0; j < 32; ++j) {
          *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
        }
        if (half == 0 && q4 == 0) p.ws_lse[static_cast<int64_t>(slot) * p.rows + R] = lse2;
      }
    }
    bar_sync(kBarRequest, kThreads);
    gblk += n_iter;
  }
}

template <typename QT>
__global__ void __launch_bounds__(kThreads, 1) mla_decode_wgmma_kernel(const __grid_constant__ DecodeParams p) {
  // The combine kernel (programmatic dependent) may be scheduled as SMs free up; it waits for this
  // whole grid before reading any partial.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  if (threadIdx.x == 0) {
    const Ctx c(p);
#pragma unroll
    for (uint32_t st = 0; st < kStages; ++st) {
      mbar_init(c.bar_full(st), 128);
      mbar_init(c.bar_p(st), 128);
      mbar_init(c.bar_pv(st), 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // The roles never rejoin: each warpgroup runs its own loop over the requests. gblk (in each role)
  // counts the blocks of this CTA over all its requests: a block's stage and mbarrier parity.
  if (threadIdx.x < 128) {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegsS));
    s_role<QT>(p);
  } else if (threadIdx.x < 256) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegsPV));
    pv_role<QT, false>(p);
  } else {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegsLoad));
    pv_role<QT, true>(p);
  }
}

template <typename QT>
void launch_decode_wgmma(const DecodeParams& p, cudaStream_t stream) {
  constexpr int smem = Smem::kTotal;
  auto kernel = mla_decode_wgmma_kernel<QT>;
  FS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.rows + kM - 1) / kM, p.num_sm_parts);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  FS_CHECK_LAUNCH();
}

}  // namespace wg
}  // namespace flashseek::mla
