"""Documented Python wrappers for torch.ops.flashseek.*, with their fake (meta) implementations.

Every op's schema is defined once, in csrc/torch_bindings.cpp. Ops write into caller-provided
outputs; the wrappers here allocate them when none are given. For each op this module registers:
  * the fake implementation (shape/dtype checks only), for torch.compile and CUDA graphs;
  * the pure-torch reference from flashseek.ref as the CPU kernel, and as the CUDA kernel where
    this build compiled none, so every op runs everywhere.
The same Python checks guard the reference path that the C++ host glue applies to the kernels, so a
bad input gets the same clear error on CPU and GPU.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from flashseek.ref import quant as ref_quant

FP8 = torch.float8_e4m3fn
OP_NAMES: list[str] = []


# --------------------------------------------------------------------------------------------
# Registration framework
# --------------------------------------------------------------------------------------------
def has_cuda_kernel(name: str) -> bool:
    """True when the C++ library registered a CUDA kernel (not the reference) for flashseek::name."""
    return name in _CUDA_FROM_CPP


def _cpp_has_cuda(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"flashseek::{name}", "CUDA")


_CUDA_FROM_CPP: set[str] = set()


def _register(name: str, check: Callable, reference: Callable) -> None:
    """Registers `check` as the fake impl and `check` + `reference` as the CPU (and fallback CUDA) impl.

    `check(*args)` validates the arguments and returns nothing; it runs on fake tensors too, so it
    must only read shapes, dtypes, devices and strides. `reference(*args)` writes the outputs.
    """
    qualname = f"flashseek::{name}"
    OP_NAMES.append(name)
    if _cpp_has_cuda(name):
        _CUDA_FROM_CPP.add(name)

    def fake(*args, **kwargs):
        return check(*args, **kwargs)

    def run_reference(*args, **kwargs):
        check(*args, **kwargs)
        with torch.no_grad():
            return reference(*args, **kwargs)

    torch.library.register_fake(qualname)(fake)
    devices = ("cpu",) if name in _CUDA_FROM_CPP else ("cpu", "cuda")
    torch.library.register_kernel(qualname, devices)(run_reference)


def _fail(msg: str):
    raise ValueError(f"flashseek: {msg}")


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        _fail(msg)


def _expect_dtype(t: torch.Tensor, name: str, dtypes) -> None:
    dtypes = dtypes if isinstance(dtypes, (tuple, list)) else (dtypes,)
    _expect(t.dtype in dtypes, f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")


def _expect_shape(t: torch.Tensor, name: str, shape) -> None:
    _expect(tuple(t.shape) == tuple(shape), f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def _expect_dim(t: torch.Tensor, name: str, ndim: int) -> None:
    _expect(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {list(t.shape)}")


def _expect_same_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    for name, t in others.items():
        if t is not None:
            _expect(t.device == ref.device,
                    f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _storage_aligned16(t: torch.Tensor) -> bool:
    """16-byte alignment of t's data pointer, read from its storage offset (allocations are aligned):
    what a wrapper must know before it hands a view to a kernel that loads 16 bytes at a time, and
    what the op's checks cannot test on fake tensors."""
    return t.storage_offset() * t.element_size() % 16 == 0


def _expect_contiguous(t: torch.Tensor, name: str) -> None:
    _expect(t.is_contiguous(), f"{name} must be contiguous, got strides {tuple(t.stride())}")


# --------------------------------------------------------------------------------------------
# FP8 1x128 quantization
# --------------------------------------------------------------------------------------------
def empty_act_scale(m: int, k_blocks: int, device) -> torch.Tensor:
    """Allocates activation scales [m, k_blocks] fp32 in the layout the FP8 GEMMs read fastest.

    The layout is column-major with a leading dimension padded to 4 rows (16 bytes), as DeepGEMM
    and cuBLASLt's block-wise scaled_mm expect: element (i, j) lives at j * round_up(m, 4) + i.
    """
    ld = (m + 3) // 4 * 4
    return torch.empty((k_blocks, ld), dtype=torch.float32, device=device)[:, :m].t()


def _check_act_scale(scale: torch.Tensor, name: str, m: int, k_blocks: int) -> None:
    _expect_dtype(scale, name, torch.float32)
    _expect_shape(scale, name, (m, k_blocks))
    _expect(m <= 1 or scale.stride(0) == 1,
            f"{name} must be column-major (stride(0) == 1, see empty_act_scale), got strides {tuple(scale.stride())}")
    _expect(k_blocks <= 1 or scale.stride(1) >= m,
            f"{name} must have a leading dimension >= {m}, got strides {tuple(scale.stride())}")


def _check_quant_fp8_1x128(x, out, scale, ue8m0=False):
    _expect_dtype(x, "x", (torch.bfloat16, torch.float16))
    _expect_dim(x, "x", 2)
    m, k = x.shape
    _expect(k % 128 == 0, f"x's last dimension must be a multiple of 128, got {k}")
    _expect(x.stride(-1) == 1, f"x must have a unit stride in its last dimension, got strides {tuple(x.stride())}")
    _expect_dtype(out, "out", FP8)
    _expect_shape(out, "out", (m, k))
    _expect_contiguous(out, "out")
    _check_act_scale(scale, "scale", m, k // 128)
    _expect_same_device(x, "x", out=out, scale=scale)


def _ref_quant_fp8_1x128(x, out, scale, ue8m0=False):
    q, s = ref_quant.quant_fp8_1x128(x, ue8m0)
    out.copy_(q)
    scale.copy_(s)


_register("quant_fp8_1x128", _check_quant_fp8_1x128, _ref_quant_fp8_1x128)


def quant_fp8_1x128(x: torch.Tensor, ue8m0: bool = False, out: Optional[torch.Tensor] = None,
                    scale: Optional[torch.Tensor] = None):
    """Quantizes activations to FP8 e4m3 with one fp32 scale per row per 128 channels.

    Args:
        x: [M, K] bf16 or fp16, K a multiple of 128, unit stride in K.
        ue8m0: round each scale up to a power of two (DeepSeek-V3.1 `scale_fmt: ue8m0`).
        out: optional e4m3 [M, K] output.
        scale: optional fp32 [M, K/128] output in the `empty_act_scale` layout.
    Returns:
        (x_fp8 [M, K] e4m3, scale [M, K/128] fp32) where x ~= x_fp8 * scale per 128-block and
        scale = max(amax, 1e-4) / 448.
    """
    m, k = x.shape
    out = torch.empty((m, k), dtype=FP8, device=x.device) if out is None else out
    scale = empty_act_scale(m, k // 128, x.device) if scale is None else scale
    torch.ops.flashseek.quant_fp8_1x128(x, out, scale, ue8m0)
    return out, scale


def _check_silu_mul_quant_fp8(gate_up, out, scale, ue8m0=False, masked_m=None):
    _expect_dtype(gate_up, "gate_up", (torch.bfloat16, torch.float16))
    _expect_dim(gate_up, "gate_up", 2)
    m, n2 = gate_up.shape
    _expect(n2 % 256 == 0, f"gate_up's last dimension must be 2*N with N a multiple of 128, got {n2}")
    _expect(gate_up.stride(-1) == 1,
            f"gate_up must have a unit stride in its last dimension, got strides {tuple(gate_up.stride())}")
    _expect_dtype(out, "out", FP8)
    _expect_shape(out, "out", (m, n2 // 2))
    _expect_contiguous(out, "out")
    _check_act_scale(scale, "scale", m, n2 // 256)
    _expect_same_device(gate_up, "gate_up", out=out, scale=scale)
    if masked_m is not None:
        _expect_dtype(masked_m, "masked_m", torch.int32)
        _expect(masked_m.dim() == 1 and masked_m.numel() > 0 and m % masked_m.numel() == 0,
                f"masked_m must be 1-D with a length E that divides gate_up's rows ({m}), got shape "
                f"{tuple(masked_m.shape)}")
        _expect_same_device(gate_up, "gate_up", masked_m=masked_m)


def _ref_silu_mul_quant_fp8(gate_up, out, scale, ue8m0=False, masked_m=None):
    q, s = ref_quant.silu_mul_quant_fp8(gate_up, ue8m0)
    if masked_m is None:
        out.copy_(q)
        scale.copy_(s)
        return
    per = gate_up.shape[0] // masked_m.numel()
    for g, c in enumerate(masked_m.tolist()):
        rows = slice(g * per, g * per + min(max(c, 0), per))
        out[rows] = q[rows]
        scale[rows] = s[rows]


_register("silu_mul_quant_fp8", _check_silu_mul_quant_fp8, _ref_silu_mul_quant_fp8)


def silu_mul_quant_fp8(gate_up: torch.Tensor, ue8m0: bool = False, out: Optional[torch.Tensor] = None,
                       scale: Optional[torch.Tensor] = None, masked_m: Optional[torch.Tensor] = None):
    """Fused `quant_fp8_1x128(silu(gate) * up)` for gate_up [M, 2N] (gate first), N % 128 == 0.

    The product is formed in fp32 and never rounded to bf16 before quantization.
    Returns (out e4m3 [M, N], scale fp32 [M, N/128]) in the `empty_act_scale` layout.
    masked_m (int32 [E], E dividing M; the masked MoE layout, read on the device): the rows come in E
    groups of M/E and only the first masked_m[e] rows of group e are computed; the others of `out`
    and `scale` are left as they were.
    """
    m, n2 = gate_up.shape
    out = torch.empty((m, n2 // 2), dtype=FP8, device=gate_up.device) if out is None else out
    scale = empty_act_scale(m, n2 // 256, gate_up.device) if scale is None else scale
    torch.ops.flashseek.silu_mul_quant_fp8(gate_up, out, scale, ue8m0, masked_m)
    return out, scale


# --------------------------------------------------------------------------------------------
# FP8 block-scaled GEMM (dense, grouped contiguous, grouped masked)   [section: gemm]
# --------------------------------------------------------------------------------------------
# @section-gemm
from flashseek.ref import gemm as ref_gemm  # noqa: E402


def empty_grouped_act_scale(e: int, m_max: int, k_blocks: int, device) -> torch.Tensor:
    """Allocates masked-layout activation scales [e, m_max, k_blocks] fp32: each expert's
    [m_max, k_blocks] slice in the `empty_act_scale` layout (column-major, leading dimension
    round_up(m_max, 4)): element (x, i, j) lives at (x * k_blocks + j) * round_up(m_max, 4) + i."""
    ld = (m_max + 3) // 4 * 4
    return torch.empty((e, k_blocks, ld), dtype=torch.float32, device=device)[:, :, :m_max].transpose(1, 2)


def quantize_weight_fp8_128x128(w: torch.Tensor):
    """Quantizes a weight [N, K] to e4m3 with one fp32 scale per 128x128 block.

    Returns (w_fp8 [N, K], scale [ceil(N/128), ceil(K/128)]) with w ~= w_fp8 * scale per block and
    scale = max(amax, 1e-4) / 448 (DeepSeek's `weight_scale_inv`). Pure torch, any device; the
    layout is the one fp8_gemm and the grouped GEMMs read (stack per expert for [E, ...]).
    """
    return ref_gemm.quantize_weight_fp8_128x128(w)


def _check_fp8_operand(t, name):
    _expect_dtype(t, name, FP8)
    _expect_contiguous(t, name)


def _check_k_n(k, n):
    _expect(k > 0 and k % 128 == 0, f"K (the last dimension of a and b) must be a positive multiple of 128, got {k}")
    _expect(n % 16 == 0, f"N (b's rows) must be a multiple of 16, got {n}")


def _check_weight_scale(s, name, shape):
    _expect_dtype(s, name, torch.float32)
    _expect_shape(s, name, shape)
    _expect_contiguous(s, name)


def _check_gemm_out(out, shape):
    _expect_dtype(out, "out", torch.bfloat16)
    _expect_shape(out, "out", shape)
    _expect_contiguous(out, "out")


def _check_fp8_gemm(a, a_scale, b, b_scale, out):
    _expect_dim(a, "a", 2)
    _expect_dim(b, "b", 2)
    _check_fp8_operand(a, "a")
    _check_fp8_operand(b, "b")
    m, k = a.shape
    n = b.shape[0]
    _expect(b.shape[1] == k, f"b must have shape [N, {k}] (K-major, same K as a), got {list(b.shape)}")
    _check_k_n(k, n)
    _check_act_scale(a_scale, "a_scale", m, k // 128)
    _check_weight_scale(b_scale, "b_scale", ((n + 127) // 128, k // 128))
    _check_gemm_out(out, (m, n))
    _expect_same_device(a, "a", a_scale=a_scale, b=b, b_scale=b_scale, out=out)


def _ref_fp8_gemm(a, a_scale, b, b_scale, out):
    out.copy_(ref_gemm.fp8_gemm(a, a_scale, b, b_scale, out.dtype))


_register("fp8_gemm", _check_fp8_gemm, _ref_fp8_gemm)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Block-scaled FP8 GEMM: out = (a * a_scale) @ (b * b_scale)^T with fp32 accumulation.

    Args:
        a: e4m3 [M, K], contiguous, K a positive multiple of 128 (M may be 0).
        a_scale: fp32 [M, K/128] 1x128 activation scales in the `empty_act_scale` layout (as
            quant_fp8_1x128 returns them). Other column-major layouts are accepted; on CUDA a leading
            dimension that is not a multiple of 4 costs a repacking copy.
        b: e4m3 [N, K] weights (K-major, contiguous), N a multiple of 16 (partial 128-blocks allowed).
        b_scale: fp32 [ceil(N/128), K/128] 128x128 block scales, row-major (quantize_weight_fp8_128x128).
        out_dtype: only torch.bfloat16.
        out: optional bf16 [M, N] output.
    Returns:
        out bf16 [M, N].
    CUDA kernels: M <= 64 runs the hand-written stream-K decode kernel when the weight has at least
    2^27 elements or K >= 4096, and M <= 16 also when K >= 1536 (see grouped_fp8_gemm_masked;
    FLASHSEEK_GEMM_SKINNY=1 / 0 forces it / CUTLASS for every M <= 64). Otherwise CUTLASS sm90
    block-wise FP8: M <= 128 swaps the operands (tokens in the MMA's N, 128x64 tiles, split-K over K
    when the tiles alone cannot fill the SMs, else for 64 < M 1x2 clusters that multicast each weight
    tile to both token tiles); larger M uses 128x128x128 cooperative tiles in 2x1 clusters with a
    persistent scheduler, or a stream-K scheduler where the last wave of tiles would be less than half
    full (deterministic reduction). docs/gemm-design.md has the per-shape rule.
    """
    _expect(out_dtype == torch.bfloat16, f"fp8_gemm supports out_dtype=torch.bfloat16 only, got {out_dtype}")
    if out is None:
        out = torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    torch.ops.flashseek.fp8_gemm(a, a_scale, b, b_scale, out)
    return out


def _check_grouped_weights(b, b_scale, k):
    _expect_dim(b, "b", 3)
    _check_fp8_operand(b, "b")
    e, n, kk = b.shape
    _expect(kk == k, f"b must have shape [E, N, {k}] (K-major, same K as a), got {list(b.shape)}")
    _check_k_n(k, n)
    _check_weight_scale(b_scale, "b_scale", (e, (n + 127) // 128, k // 128))
    return e, n


def _check_grouped_fp8_gemm_contiguous(a, a_scale, b, b_scale, expert_offsets, out):
    _expect_dim(a, "a", 2)
    _check_fp8_operand(a, "a")
    m, k = a.shape
    e, n = _check_grouped_weights(b, b_scale, k)
    _check_act_scale(a_scale, "a_scale", m, k // 128)
    _expect_dtype(expert_offsets, "expert_offsets", torch.int32)
    _expect_shape(expert_offsets, "expert_offsets", (e + 1,))
    _expect_contiguous(expert_offsets, "expert_offsets")
    _check_gemm_out(out, (m, n))
    _expect_same_device(a, "a", a_scale=a_scale, b=b, b_scale=b_scale, expert_offsets=expert_offsets, out=out)


def _ref_grouped_fp8_gemm_contiguous(a, a_scale, b, b_scale, expert_offsets, out):
    ref_gemm.grouped_fp8_gemm_contiguous(a, a_scale, b, b_scale, expert_offsets, out)


_register("grouped_fp8_gemm_contiguous", _check_grouped_fp8_gemm_contiguous, _ref_grouped_fp8_gemm_contiguous)


def grouped_fp8_gemm_contiguous(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                                expert_offsets: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped FP8 GEMM, contiguous (prefill) layout: rows grouped by expert.

    Args:
        a: e4m3 [M_total, K]; the rows of expert e are a[expert_offsets[e]:expert_offsets[e+1]].
        a_scale: fp32 [M_total, K/128] in the `empty_act_scale` layout.
        b: e4m3 [E, N, K]; b_scale: fp32 [E, ceil(N/128), K/128].
        expert_offsets: int32 [E+1] on a's device, nondecreasing, offsets[0] == 0, offsets[E] <= M_total.
            No alignment is required (moe_align's 128-row padding is fine but not needed); padding
            rows inside a group are computed like any other row.
        out: optional bf16 [M_total, N]; rows at or past offsets[E] are not written.
    The offsets are read on the device (no host sync). The reference path raises on offsets out of
    order or past M_total; the CUDA kernel cannot check them and instead clips each group to
    [offsets[e] clamped to [0, M_total], max(offsets[e+1], that) clamped to M_total] (no memory
    outside the tensors is touched; the results of an invalid layout are unspecified).
    """
    if out is None:
        out = torch.empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    torch.ops.flashseek.grouped_fp8_gemm_contiguous(a, a_scale, b, b_scale, expert_offsets, out)
    return out


def _check_grouped_fp8_gemm_masked(a, a_scale, b, b_scale, masked_m, out):
    _expect_dim(a, "a", 3)
    _check_fp8_operand(a, "a")
    _, m_max, k = a.shape
    e, n = _check_grouped_weights(b, b_scale, k)
    _expect(a.shape[0] == e, f"a must have shape [E={e}, M_max, K] (E from b), got {list(a.shape)}")
    kb = k // 128
    _expect_dtype(a_scale, "a_scale", torch.float32)
    _expect_shape(a_scale, "a_scale", (e, m_max, kb))
    _expect(m_max <= 1 or a_scale.stride(1) == 1,
            "a_scale must be column-major per expert (stride(1) == 1, see empty_grouped_act_scale), "
            f"got strides {tuple(a_scale.stride())}")
    _expect(kb <= 1 or a_scale.stride(2) >= m_max,
            f"a_scale must have a per-expert leading dimension (stride(2)) >= {m_max}, got strides {tuple(a_scale.stride())}")
    _expect_dtype(masked_m, "masked_m", torch.int32)
    _expect_shape(masked_m, "masked_m", (e,))
    _expect_contiguous(masked_m, "masked_m")
    _check_gemm_out(out, (e, m_max, n))
    _expect_same_device(a, "a", a_scale=a_scale, b=b, b_scale=b_scale, masked_m=masked_m, out=out)


def _ref_grouped_fp8_gemm_masked(a, a_scale, b, b_scale, masked_m, out):
    ref_gemm.grouped_fp8_gemm_masked(a, a_scale, b, b_scale, masked_m, out)


_register("grouped_fp8_gemm_masked", _check_grouped_fp8_gemm_masked, _ref_grouped_fp8_gemm_masked)


def grouped_fp8_gemm_masked(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                            masked_m: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped FP8 GEMM, masked (decode) layout.

    Args:
        a: e4m3 [E, M_max, K]; a_scale: fp32 [E, M_max, K/128] (`empty_grouped_act_scale` layout).
        b: e4m3 [E, N, K]; b_scale: fp32 [E, ceil(N/128), K/128].
        masked_m: int32 [E] on a's device; only rows < masked_m[e] of expert e are computed and written.
        out: optional bf16 [E, M_max, N]; rows >= masked_m[e] keep their contents.
    The counts are read on the device (no host sync, CUDA-graph capturable). The reference path
    raises on masked_m outside [0, M_max]; the CUDA kernel clamps each count to that range.
    CUDA kernels: M_max <= 64 runs the hand-written decode kernel (weights in the MMA's M, 128-row
    tiles, up to 64 tokens in its N; the (tile, 128-deep K block) units of the experts that have
    tokens are split evenly over the SMs, shared tiles reduced in a fixed order, so the result is
    deterministic); larger M_max uses CUTLASS 128x128x128 pointer-array tiles like the contiguous
    layout, whose per-expert arguments a tiny prepare kernel writes from masked_m.
    FLASHSEEK_GEMM_SKINNY=0 runs CUTLASS's swapped 128x64 kernel for M_max <= 64 instead.
    """
    if out is None:
        out = torch.empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.bfloat16, device=a.device)
    torch.ops.flashseek.grouped_fp8_gemm_masked(a, a_scale, b, b_scale, masked_m, out)
    return out


# --------------------------------------------------------------------------------------------
# Routing (noaux_tc grouped top-k, softmax top-k)   [section: routing]
# --------------------------------------------------------------------------------------------
# @section-routing
from flashseek.ref import routing as ref_routing  # noqa: E402


def _check_route_common(logits, topk, topk_weights, topk_ids):
    _expect_dtype(logits, "logits", (torch.float32, torch.bfloat16, torch.float16))
    _expect_dim(logits, "logits", 2)
    t, e = logits.shape
    _expect(logits.stride(-1) == 1 or e <= 1,
            f"logits must have a unit stride in its last dimension, got strides {tuple(logits.stride())}")
    _expect(1 <= e <= 512, f"logits must have 1 to 512 experts (columns), got {e}")
    _expect(1 <= topk <= 16, f"topk must be in [1, 16], got {topk}")
    _expect(topk <= e, f"topk ({topk}) must not exceed the number of experts ({e})")
    _expect_dtype(topk_weights, "topk_weights", torch.float32)
    _expect_dtype(topk_ids, "topk_ids", torch.int32)
    _expect_shape(topk_weights, "topk_weights", (t, topk))
    _expect_shape(topk_ids, "topk_ids", (t, topk))
    _expect(topk_weights.stride(-1) == 1 or topk <= 1, "topk_weights must have a unit stride in its last dimension")
    _expect(topk_ids.stride(-1) == 1 or topk <= 1, "topk_ids must have a unit stride in its last dimension")
    _expect_same_device(logits, "logits", topk_weights=topk_weights, topk_ids=topk_ids)


def _check_route_noaux_tc(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize,
                          topk_weights, topk_ids):
    _check_route_common(logits, topk, topk_weights, topk_ids)
    e = logits.shape[1]
    _expect_dtype(bias, "bias", torch.float32)
    _expect_shape(bias, "bias", (e,))
    _expect_contiguous(bias, "bias")
    _expect_same_device(logits, "logits", bias=bias)
    _expect(1 <= n_group <= 32, f"n_group must be in [1, 32], got {n_group}")
    _expect(e % n_group == 0, f"the number of experts ({e}) must be divisible by n_group ({n_group})")
    _expect(e // n_group >= 2,
            f"each group needs at least 2 experts (its score is a top-2 sum), got E={e} n_group={n_group}")
    _expect(1 <= topk_group <= n_group, f"topk_group must be in [1, n_group={n_group}], got {topk_group}")
    _expect(topk <= topk_group * (e // n_group),
            f"topk ({topk}) must not exceed the experts in the kept groups ({topk_group} x {e // n_group})")


def _ref_route_noaux_tc(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize,
                        topk_weights, topk_ids):
    w, ids = ref_routing.route_noaux_tc(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize)
    topk_weights.copy_(w)
    topk_ids.copy_(ids)


_register("route_noaux_tc", _check_route_noaux_tc, _ref_route_noaux_tc)


def route_noaux_tc(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, topk: int,
                   routed_scaling_factor: float, renormalize: bool = True,
                   topk_weights: Optional[torch.Tensor] = None, topk_ids: Optional[torch.Tensor] = None):
    """DeepSeek-V3 `noaux_tc` router: grouped top-k on sigmoid scores with a selection-only bias.

    Args:
        logits: [T, E] fp32, bf16 or fp16 router logits (unit stride along E), E <= 512.
        bias: [E] fp32 `e_score_correction_bias`, added to the scores for selection only.
        n_group: groups of E / n_group consecutive experts (E % n_group == 0, n_group <= 32).
        topk_group: groups kept per token, ranked by the sum of their two best biased scores.
        topk: experts per token (<= 16), chosen among the kept groups by biased score.
        routed_scaling_factor: multiplies the weights (2.5 for DeepSeek-R1).
        renormalize: divide the weights by their sum (+ 1e-20) first (`norm_topk_prob`).
    Returns:
        (topk_weights fp32 [T, topk], topk_ids int32 [T, topk]); weights come from the unbiased scores.
        Ids are in selection order (descending biased score); ties go to the lower group id and the
        lower expert id. The CUDA kernel matches flashseek.ref.routing bit for bit on CUDA tensors.
    """
    t = logits.shape[0]
    topk_weights = torch.empty((t, topk), dtype=torch.float32, device=logits.device) if topk_weights is None \
        else topk_weights
    topk_ids = torch.empty((t, topk), dtype=torch.int32, device=logits.device) if topk_ids is None else topk_ids
    torch.ops.flashseek.route_noaux_tc(logits, bias, n_group, topk_group, topk, float(routed_scaling_factor),
                                       renormalize, topk_weights, topk_ids)
    return topk_weights, topk_ids


def _check_route_softmax_topk(logits, topk, renormalize, topk_weights, topk_ids):
    _check_route_common(logits, topk, topk_weights, topk_ids)


def _ref_route_softmax_topk(logits, topk, renormalize, topk_weights, topk_ids):
    w, ids = ref_routing.route_softmax_topk(logits, topk, renormalize)
    topk_weights.copy_(w)
    topk_ids.copy_(ids)


_register("route_softmax_topk", _check_route_softmax_topk, _ref_route_softmax_topk)


def route_softmax_topk(logits: torch.Tensor, topk: int, renormalize: bool = True,
                       topk_weights: Optional[torch.Tensor] = None, topk_ids: Optional[torch.Tensor] = None):
    """Softmax top-k router (Mixtral / Qwen-MoE style).

    logits [T, E] (fp32/bf16/fp16, E <= 512) -> (topk_weights fp32 [T, topk], topk_ids int32 [T, topk]).
    Ids: the topk largest logits in descending order, ties to the lower id. Weights: the softmax
    probabilities of those experts, renormalized over the selection when `renormalize`.
    """
    t = logits.shape[0]
    topk_weights = torch.empty((t, topk), dtype=torch.float32, device=logits.device) if topk_weights is None \
        else topk_weights
    topk_ids = torch.empty((t, topk), dtype=torch.int32, device=logits.device) if topk_ids is None else topk_ids
    torch.ops.flashseek.route_softmax_topk(logits, topk, renormalize, topk_weights, topk_ids)
    return topk_weights, topk_ids


#: router_logits' token limit for the one-launch kernel (kRouterLogitsMaxT, csrc/routing/routing.h): on
#: an H100 (R1 gate, graph replays) 3.5 us at T = 1 against 9.0 for the GEMM path, but 15.1 vs 9.9 at T = 8.
ROUTER_LOGITS_MAX_T = 4


def _check_router_logits(hidden, weight, out):
    _expect_dtype(hidden, "hidden", torch.bfloat16)
    _expect_dtype(weight, "weight", torch.bfloat16)
    _expect_dim(hidden, "hidden", 2)
    _expect_dim(weight, "weight", 2)
    t, h = hidden.shape
    e = weight.shape[0]
    _expect(weight.shape[1] == h, f"weight must have shape [E, H={h}], got {list(weight.shape)}")
    _expect(h % 8 == 0, f"the hidden size must be a multiple of 8, got {h}")
    _expect(t <= ROUTER_LOGITS_MAX_T,
            f"router_logits takes at most {ROUTER_LOGITS_MAX_T} tokens, got {t} "
            "(flashseek.ops.router_logits runs a GEMM above that)")
    for name, x in (("hidden", hidden), ("weight", weight)):  # (16-byte alignment: checked by the kernel's op)
        _expect(x.stride(1) == 1 and (x.shape[0] <= 1 or x.stride(0) % 8 == 0),
                f"{name} must have a unit stride along H and a row stride multiple of 8, "
                f"got strides {tuple(x.stride())}")
    _expect_dtype(out, "out", torch.float32)
    _expect_shape(out, "out", (t, e))
    _expect(out.stride(1) == 1 or e <= 1, f"out must have a unit stride along E, got strides {tuple(out.stride())}")
    _expect_same_device(hidden, "hidden", weight=weight, out=out)


def _ref_router_logits(hidden, weight, out):
    out.copy_(ref_routing.router_logits(hidden, weight))


_register("router_logits", _check_router_logits, _ref_router_logits)


def router_logits(hidden: torch.Tensor, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The MoE router's logits, fp32 [T, E] = hidden @ weight^T, bf16 products accumulated in fp32 and
    never rounded to bf16 (as Hugging Face's DeepSeek-V3 router computes them in fp32).

    Args:
        hidden: bf16 [T, H], H % 8 == 0; weight: bf16 [E, H] (the gate); out: optional fp32 [T, E].
    For T <= ROUTER_LOGITS_MAX_T one kernel launch (every SM streams a slice of the weight); above it
    a GEMM with fp32 output (cuBLAS on CUDA). Spec: flashseek.ref.routing.router_logits.
    """
    t = hidden.shape[0]
    if out is None:
        out = torch.empty((t, weight.shape[0]), dtype=torch.float32, device=hidden.device)
    if t <= ROUTER_LOGITS_MAX_T:
        torch.ops.flashseek.router_logits(hidden, weight, out)
    elif hidden.is_cuda and hidden.dtype == weight.dtype == torch.bfloat16:
        out.copy_(torch.mm(hidden, weight.t(), out_dtype=torch.float32))  # bf16 GEMM, fp32 out (torch >= 2.8)
    else:
        out.copy_(ref_routing.router_logits(hidden, weight))
    return out


#: route_noaux_tc_gate's token limit (the kernel's, csrc/routing/routing.h): the wrapper runs the
#: bf16 GEMM + route_noaux_tc above it. `flashseek bench routing` times both paths.
ROUTE_GATE_MAX_T = ref_routing.GATE_MAX_T
#: The wrapper's default cut-over: measured on an H100 (CUDA-graph replays, R1 shapes, same run) the
#: fused op takes 8.1 / 8.6 / 11.7 / 15.7 / 23.8 us at T = 1 / 4 / 16 / 32 / 64 against 12.1 / 12.8 /
#: 13.1 / 13.9 / 14.1 us for the bf16 matmul + route_noaux_tc: faster up to T = 16 only.
ROUTE_GATE_DEFAULT_MAX_T = 16


def _check_route_noaux_tc_gate(hidden, gate_weight, bias, n_group, topk_group, topk, routed_scaling_factor,
                               renormalize, topk_weights, topk_ids, logits):
    _expect_dtype(hidden, "hidden", torch.bfloat16)
    _expect_dtype(gate_weight, "gate_weight", torch.bfloat16)
    _expect_dim(hidden, "hidden", 2)
    _expect_dim(gate_weight, "gate_weight", 2)
    _expect_contiguous(hidden, "hidden")
    _expect_contiguous(gate_weight, "gate_weight")
    t, h = hidden.shape
    e = gate_weight.shape[0]
    _expect(gate_weight.shape[1] == h, f"gate_weight must have shape [E, H={h}], got {list(gate_weight.shape)}")
    _expect(h > 0 and h % ref_routing.GATE_K_BLOCK == 0,
            f"the hidden size must be a positive multiple of {ref_routing.GATE_K_BLOCK}, got {h}")
    _expect(t <= ROUTE_GATE_MAX_T,
            f"route_noaux_tc_gate takes at most {ROUTE_GATE_MAX_T} tokens, got {t} "
            "(flashseek.ops.route_noaux_tc_gate falls back to a GEMM + route_noaux_tc above that)")
    _expect_same_device(hidden, "hidden", gate_weight=gate_weight, logits=logits)
    _expect_dtype(logits, "logits", torch.float32)
    _expect_shape(logits, "logits", (t, e))
    _expect_contiguous(logits, "logits")
    _check_route_noaux_tc(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize,
                          topk_weights, topk_ids)


def _ref_route_noaux_tc_gate(hidden, gate_weight, bias, n_group, topk_group, topk, routed_scaling_factor,
                             renormalize, topk_weights, topk_ids, logits):
    w, ids, lg = ref_routing.route_noaux_tc_gate(hidden, gate_weight, bias, n_group, topk_group, topk,
                                                 routed_scaling_factor, renormalize)
    logits.copy_(lg)
    topk_weights.copy_(w)
    topk_ids.copy_(ids)


_register("route_noaux_tc_gate", _check_route_noaux_tc_gate, _ref_route_noaux_tc_gate)


def route_noaux_tc_gate(hidden: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, n_group: int,
                        topk_group: int, topk: int, routed_scaling_factor: float, renormalize: bool = True,
                        topk_weights: Optional[torch.Tensor] = None, topk_ids: Optional[torch.Tensor] = None,
                        logits: Optional[torch.Tensor] = None, max_t: int = ROUTE_GATE_DEFAULT_MAX_T):
    """Router GEMM + `route_noaux_tc` in one launch for decode-sized batches.

    Args:
        hidden: [T, H] bf16, contiguous, H % 512 == 0.
        gate_weight: [E, H] bf16, contiguous (the router's weight), E <= 512.
        bias, n_group, topk_group, topk, routed_scaling_factor, renormalize: as route_noaux_tc.
        topk_weights, topk_ids, logits: optional outputs (fp32 [T, topk], int32 [T, topk], fp32 [T, E]).
        max_t: the fused op runs for T <= min(max_t, ROUTE_GATE_MAX_T).
    Returns:
        (topk_weights, topk_ids, logits).
    Semantics: for T <= the limit, logits = hidden @ gate_weight^T accumulated in fp32 in the fixed
    order of flashseek.ref.routing.gate_logits_fp32 (never rounded to bf16), and (weights, ids) =
    route_noaux_tc(logits, ...) bit for bit. Above it: logits = (hidden @ gate_weight^T) as a bf16
    GEMM (cuBLAS order, rounded to bf16, as MoE.router_logits computes them), then route_noaux_tc.
    """
    t = hidden.shape[0]
    e = gate_weight.shape[0]
    dev = hidden.device
    topk_weights = torch.empty((t, topk), dtype=torch.float32, device=dev) if topk_weights is None else topk_weights
    topk_ids = torch.empty((t, topk), dtype=torch.int32, device=dev) if topk_ids is None else topk_ids
    if t > min(max_t, ROUTE_GATE_MAX_T):
        lg = (hidden @ gate_weight.t()).float()
        if logits is not None:
            logits.copy_(lg)
            lg = logits
        route_noaux_tc(lg, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize, topk_weights,
                       topk_ids)
        return topk_weights, topk_ids, lg
    logits = torch.empty((t, e), dtype=torch.float32, device=dev) if logits is None else logits
    torch.ops.flashseek.route_noaux_tc_gate(hidden, gate_weight, bias, n_group, topk_group, topk,
                                            float(routed_scaling_factor), renormalize, topk_weights, topk_ids,
                                            logits)
    return topk_weights, topk_ids, logits


# --------------------------------------------------------------------------------------------
# MoE dispatch, combine and the fused MoE layer   [section: moe]
# --------------------------------------------------------------------------------------------
# @section-moe
from flashseek.ref import moe as ref_moe  # noqa: E402

MOE_ALIGN_MAX_LOCAL_EXPERTS = 512


MOE_ALIGN_MAX_SLOTS = 1 << 22
moe_align_max_rows = ref_moe.moe_align_max_rows


def _check_topk_ids(topk_ids):
    _expect_dtype(topk_ids, "topk_ids", torch.int32)
    _expect_dim(topk_ids, "topk_ids", 2)
    _expect_contiguous(topk_ids, "topk_ids")
    _expect(topk_ids.numel() <= MOE_ALIGN_MAX_SLOTS,
            f"topk_ids may hold at most {MOE_ALIGN_MAX_SLOTS} slots (T * topk), got {topk_ids.numel()}")


def _check_expert_map(expert_map, num_experts, topk_ids, num_local):
    _expect(num_experts >= 1, f"num_experts must be >= 1, got {num_experts}")
    _expect(1 <= num_local <= MOE_ALIGN_MAX_LOCAL_EXPERTS,
            f"the number of local experts must be in [1, {MOE_ALIGN_MAX_LOCAL_EXPERTS}], got {num_local}")
    if expert_map is None:
        _expect(num_local == num_experts,
                f"without expert_map the local experts ({num_local}, from the outputs' shapes) must equal "
                f"num_experts ({num_experts})")
        return
    _expect_dtype(expert_map, "expert_map", torch.int32)
    _expect_shape(expert_map, "expert_map", (num_experts,))
    _expect_contiguous(expert_map, "expert_map")
    _expect_same_device(topk_ids, "topk_ids", expert_map=expert_map)


def _check_token_slots(token_slots, shape, name="token_slots"):
    _expect_dtype(token_slots, name, torch.int32)
    _expect_shape(token_slots, name, shape)
    _expect_contiguous(token_slots, name)


def _check_moe_align(topk_ids, num_experts, block_m, expert_map, sorted_ids, block_expert_ids, expert_offsets,
                     token_slots):
    _check_topk_ids(topk_ids)
    _expect(1 <= block_m <= 1024, f"block_m must be in [1, 1024], got {block_m}")
    _expect_dtype(expert_offsets, "expert_offsets", torch.int32)
    _expect_dim(expert_offsets, "expert_offsets", 1)
    _expect_contiguous(expert_offsets, "expert_offsets")
    num_local = expert_offsets.shape[0] - 1
    _check_expert_map(expert_map, num_experts, topk_ids, num_local)
    _expect_dtype(sorted_ids, "sorted_ids", torch.int32)
    _expect_dim(sorted_ids, "sorted_ids", 1)
    _expect_contiguous(sorted_ids, "sorted_ids")
    rows = sorted_ids.shape[0]
    need = moe_align_max_rows(topk_ids.numel(), num_local, block_m)
    _expect(rows % block_m == 0 and rows >= need,
            f"sorted_ids must have a multiple of block_m={block_m} rows, at least {need} "
            f"(moe_align_max_rows), got {rows}")
    _expect_dtype(block_expert_ids, "block_expert_ids", torch.int32)
    _expect_shape(block_expert_ids, "block_expert_ids", (rows // block_m,))
    _expect_contiguous(block_expert_ids, "block_expert_ids")
    _check_token_slots(token_slots, topk_ids.shape)
    _expect_same_device(topk_ids, "topk_ids", sorted_ids=sorted_ids, block_expert_ids=block_expert_ids,
                        expert_offsets=expert_offsets, token_slots=token_slots)


def _ref_moe_align(topk_ids, num_experts, block_m, expert_map, sorted_ids, block_expert_ids, expert_offsets,
                   token_slots):
    res = ref_moe.moe_align(topk_ids, num_experts, block_m, expert_map, expert_offsets.shape[0] - 1,
                            sorted_ids.shape[0])
    for dst, src in zip((sorted_ids, block_expert_ids, expert_offsets, token_slots), res):
        dst.copy_(src)

_register("moe_align", _check_moe_align, _ref_moe_align)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int = 128, expert_map: Optional[torch.Tensor] = None,
              num_local: Optional[int] = None, max_rows: Optional[int] = None):
    """Groups the (token, k) slots by local expert for the contiguous grouped GEMM, on the device.

    Args:
        topk_ids: int32 [T, topk] global expert ids (contiguous), slot s = t * topk + k.
        num_experts: global expert count; ids must lie in [0, num_experts).
        block_m: each expert's rows are padded to a multiple of this.
        expert_map: optional int32 [num_experts]: global -> local id, -1 for experts held elsewhere
            (their slots are dropped).
        num_local: local expert count, at most 512 (default num_experts; pass it with expert_map).
        max_rows: rows to allocate (default and minimum: moe_align_max_rows(T * topk, num_local, block_m),
            a static bound, so nothing syncs).
    Returns:
        (sorted_ids int32 [max_rows]: the slot of each row, T * topk for padding and unused rows;
         block_expert_ids int32 [max_rows / block_m]: expert of each block of rows, -1 past the end;
         expert_offsets int32 [num_local + 1]: padded group starts, offsets[-1] = rows used;
         token_slots int32 [T, topk]: the row of each slot, -1 if dropped).
    Rows within an expert follow ascending slot id. Out-of-range ids raise in the reference path;
    the CUDA kernel cannot check values and drops such slots (row -1).
    """
    num_local = num_experts if num_local is None else num_local
    _expect(1 <= block_m <= 1024, f"block_m must be in [1, 1024], got {block_m}")
    need = moe_align_max_rows(topk_ids.numel(), num_local, block_m)
    max_rows = need if max_rows is None else max_rows
    dev = topk_ids.device
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert_ids = torch.empty(max_rows // block_m, dtype=torch.int32, device=dev)
    expert_offsets = torch.empty(num_local + 1, dtype=torch.int32, device=dev)
    token_slots = torch.empty(topk_ids.shape, dtype=torch.int32, device=dev)
    torch.ops.flashseek.moe_align(topk_ids, num_experts, block_m, expert_map, sorted_ids, block_expert_ids,
                                  expert_offsets, token_slots)
    return sorted_ids, block_expert_ids, expert_offsets, token_slots


def _check_moe_align_masked(topk_ids, num_experts, max_m, expert_map, masked_m, token_slots):
    _check_topk_ids(topk_ids)
    _expect(max_m >= 0, f"max_m must be >= 0, got {max_m}")
    _expect_dtype(masked_m, "masked_m", torch.int32)
    _expect_dim(masked_m, "masked_m", 1)
    _expect_contiguous(masked_m, "masked_m")
    num_local = masked_m.shape[0]
    _check_expert_map(expert_map, num_experts, topk_ids, num_local)
    _expect(num_local * max_m < 2**31, f"num_local * max_m must fit in int32, got {num_local} x {max_m}")
    _check_token_slots(token_slots, topk_ids.shape)
    _expect_same_device(topk_ids, "topk_ids", masked_m=masked_m, token_slots=token_slots)


def _ref_moe_align_masked(topk_ids, num_experts, max_m, expert_map, masked_m, token_slots):
    m, slots = ref_moe.moe_align_masked(topk_ids, num_experts, max_m, expert_map, masked_m.shape[0])
    masked_m.copy_(m)
    token_slots.copy_(slots)

_register("moe_align_masked", _check_moe_align_masked, _ref_moe_align_masked)


def moe_align_masked(topk_ids: torch.Tensor, num_experts: int, max_m: int, expert_map: Optional[torch.Tensor] = None,
                     num_local: Optional[int] = None):
    """Slot -> row map for the masked (decode) grouped layout [num_local, max_m, ...], on the device.

    Returns (masked_m int32 [num_local] = min(count, max_m), token_slots int32 [T, topk] =
    e * max_m + rank within the expert in ascending slot order, -1 if dropped or rank >= max_m).
    max_m = T is always enough when each token's ids are distinct (as the routers guarantee).
    """
    num_local = num_experts if num_local is None else num_local
    masked_m = torch.empty(num_local, dtype=torch.int32, device=topk_ids.device)
    token_slots = torch.empty(topk_ids.shape, dtype=torch.int32, device=topk_ids.device)
    torch.ops.flashseek.moe_align_masked(topk_ids, num_experts, max_m, expert_map, masked_m, token_slots)
    return masked_m, token_slots


def _check_moe_hidden(hidden):
    _expect_dtype(hidden, "hidden", torch.bfloat16)
    _expect_dim(hidden, "hidden", 2)
    h = hidden.shape[1]
    _expect(h % 128 == 0, f"hidden's last dimension must be a multiple of 128, got {h}")
    _expect(hidden.stride(-1) == 1 and (hidden.shape[0] <= 1 or hidden.stride(0) % 8 == 0),
            f"hidden must have a unit stride along H and a row stride that is a multiple of 8, got strides "
            f"{tuple(hidden.stride())}")
    return h


def _check_moe_gather_quant(hidden, sorted_ids, topk, out, scale, ue8m0=False):
    h = _check_moe_hidden(hidden)
    _expect(topk >= 1, f"topk must be >= 1, got {topk}")
    _expect_dtype(sorted_ids, "sorted_ids", torch.int32)
    _expect_dim(sorted_ids, "sorted_ids", 1)
    _expect_contiguous(sorted_ids, "sorted_ids")
    rows = sorted_ids.shape[0]
    _expect_dtype(out, "out", FP8)
    _expect_shape(out, "out", (rows, h))
    _expect_contiguous(out, "out")
    _check_act_scale(scale, "scale", rows, h // 128)
    _expect_same_device(hidden, "hidden", sorted_ids=sorted_ids, out=out, scale=scale)


def _ref_moe_gather_quant(hidden, sorted_ids, topk, out, scale, ue8m0=False):
    q, s = ref_moe.gather_quant(hidden, sorted_ids, topk, ue8m0)
    out.copy_(q)
    scale.copy_(s)


_register("moe_gather_quant", _check_moe_gather_quant, _ref_moe_gather_quant)


def moe_gather_quant(hidden: torch.Tensor, sorted_ids: torch.Tensor, topk: int, out: Optional[torch.Tensor] = None,
                     scale: Optional[torch.Tensor] = None, ue8m0: bool = False):
    """Row r of the output = FP8 1x128 quantization of hidden[sorted_ids[r] // topk] (bit-identical
    to quant_fp8_1x128 with the same ue8m0); rows whose id is outside [0, T * topk) (moe_align's
    sentinel) get the quantization of a zero row (zeros, scale 1e-4 / 448, or 2^-22 with ue8m0).
    hidden bf16 [T, H] (H % 128 == 0) -> (out e4m3 [R, H], scale fp32 [R, H/128] `empty_act_scale`)."""
    rows, h = sorted_ids.shape[0], hidden.shape[1]
    out = torch.empty((rows, h), dtype=FP8, device=hidden.device) if out is None else out
    scale = empty_act_scale(rows, h // 128, hidden.device) if scale is None else scale
    torch.ops.flashseek.moe_gather_quant(hidden, sorted_ids, topk, out, scale, ue8m0)
    return out, scale


def _check_grouped_rows(out, scale, h, out_name="out", scale_name="scale"):
    """out e4m3 [G, M, H] (contiguous) with scale fp32 [G, M, H/128] in the empty_grouped_act_scale layout."""
    _expect_dtype(out, out_name, FP8)
    _expect_dim(out, out_name, 3)
    g, m, hh = out.shape
    _expect(hh == h, f"{out_name} must have shape [G, M, {h}], got {list(out.shape)}")
    _expect_contiguous(out, out_name)
    _expect_dtype(scale, scale_name, torch.float32)
    _expect_shape(scale, scale_name, (g, m, h // 128))
    _expect(m <= 1 or scale.stride(1) == 1,
            f"{scale_name} must be column-major per group (stride(1) == 1, see empty_grouped_act_scale), got "
            f"strides {tuple(scale.stride())}")
    _expect(h // 128 <= 1 or scale.stride(2) >= m,
            f"{scale_name} must have a leading dimension (stride(2)) >= {m}, got strides {tuple(scale.stride())}")


def _check_moe_scatter_quant(hidden, token_slots, out, scale, ue8m0=False):
    h = _check_moe_hidden(hidden)
    _expect_dtype(token_slots, "token_slots", torch.int32)
    _expect_dim(token_slots, "token_slots", 2)
    _expect(token_slots.shape[0] == hidden.shape[0],
            f"token_slots must have shape [T={hidden.shape[0]}, topk], got {list(token_slots.shape)}")
    _expect_contiguous(token_slots, "token_slots")
    _check_grouped_rows(out, scale, h)
    _expect_same_device(hidden, "hidden", token_slots=token_slots, out=out, scale=scale)


def _ref_moe_scatter_quant(hidden, token_slots, out, scale, ue8m0=False):
    ref_moe.scatter_quant_(hidden, token_slots, out, scale, ue8m0)

_register("moe_scatter_quant", _check_moe_scatter_quant, _ref_moe_scatter_quant)


def moe_scatter_quant(hidden: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor, scale: torch.Tensor,
                      ue8m0: bool = False):
    """Quantizes each token once (FP8 1x128, bit-identical to quant_fp8_1x128 with the same ue8m0) and
    stores it to the rows token_slots[t, :] (>= 0) of `out`; rows nobody points at keep their contents.

    out: e4m3 [R, H] with scale fp32 [R, H/128] (`empty_act_scale`, the contiguous layout), or
    e4m3 [G, M, H] with scale [G, M, H/128] (`empty_grouped_act_scale`, the masked layout), where a
    row index r means group r // M, row r % M. Returns (out, scale).
    """
    o, s = (out.unsqueeze(0), scale.unsqueeze(0)) if out.dim() == 2 else (out, scale)
    torch.ops.flashseek.moe_scatter_quant(hidden, token_slots, o, s, ue8m0)
    return out, scale


#: moe_route_dispatch's token limit (kMoeRouteDispatchMaxT, csrc/moe/moe.h): every CTA routes all the
#: batch's tokens, and a token set is one 32-bit word.
MOE_ROUTE_DISPATCH_MAX_T = 32


#: moe_route_dispatch's largest num_shared (kMoeRouteDispatchMaxShared, csrc/moe/moe.h).
MOE_ROUTE_DISPATCH_MAX_SHARED = 4


def _check_moe_route_dispatch(hidden, logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize,
                              expert_map, topk_weights, topk_ids, masked_m, token_slots, a, a_scale, num_shared=0,
                              ue8m0=False):
    _check_route_noaux_tc(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize, topk_weights,
                          topk_ids)
    t, e = logits.shape
    _expect(t <= MOE_ROUTE_DISPATCH_MAX_T,
            f"moe_route_dispatch takes at most {MOE_ROUTE_DISPATCH_MAX_T} tokens, got {t} "
            "(fused_moe runs route_noaux_tc + moe_align_masked + moe_scatter_quant above that)")
    h = _check_moe_hidden(hidden)
    _expect(hidden.shape[0] == t, f"hidden must have T={t} rows (logits' rows), got shape {list(hidden.shape)}")
    _expect_dtype(masked_m, "masked_m", torch.int32)
    _expect_dim(masked_m, "masked_m", 1)
    _expect_contiguous(masked_m, "masked_m")
    _expect(0 <= num_shared <= MOE_ROUTE_DISPATCH_MAX_SHARED and num_shared < masked_m.shape[0],
            f"num_shared must be in [0, {MOE_ROUTE_DISPATCH_MAX_SHARED}] and leave at least one routed expert in "
            f"masked_m (size {masked_m.shape[0]}), got {num_shared}")
    num_local = masked_m.shape[0] - num_shared
    _check_expert_map(expert_map, e, topk_ids, num_local)
    _check_token_slots(token_slots, (t, topk))
    _check_grouped_rows(a, a_scale, h, "a", "a_scale")
    _expect(a.shape[0] == masked_m.shape[0],
            f"a must have shape [E_local + num_shared={masked_m.shape[0]} (masked_m's size), max_m, {h}], "
            f"got {list(a.shape)}")
    _expect(num_shared == 0 or a.shape[1] >= t,
            f"with shared experts every token needs a row: max_m (a.shape[1] = {a.shape[1]}) must be >= T={t}")
    _expect(a.shape[0] * a.shape[1] < 2**31,
            f"(E_local + num_shared) * max_m must fit in int32, got {a.shape[0]} x {a.shape[1]}")
    _expect_same_device(logits, "logits", hidden=hidden, masked_m=masked_m, token_slots=token_slots, a=a,
                        a_scale=a_scale)


def _ref_moe_route_dispatch(hidden, logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize,
                            expert_map, topk_weights, topk_ids, masked_m, token_slots, a, a_scale, num_shared=0,
                            ue8m0=False):
    w, ids, m, slots = ref_moe.route_dispatch_(hidden, logits, bias, n_group, topk_group, topk, routed_scaling_factor,
                                               renormalize, expert_map, a, a_scale, num_shared, ue8m0)
    topk_weights.copy_(w)
    topk_ids.copy_(ids)
    masked_m.copy_(m)
    token_slots.copy_(slots)


_register("moe_route_dispatch", _check_moe_route_dispatch, _ref_moe_route_dispatch)


def moe_route_dispatch(hidden: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int,
                       topk: int, routed_scaling_factor: float, renormalize: bool = True,
                       expert_map: Optional[torch.Tensor] = None, num_local: Optional[int] = None,
                       max_m: Optional[int] = None, num_shared: int = 0, ue8m0: bool = False):
    """route_noaux_tc -> moe_align_masked -> moe_scatter_quant in one launch, for decode batches.

    The front of fused_moe's masked path for T <= MOE_ROUTE_DISPATCH_MAX_T tokens; every output is
    bit-identical to that three-op chain (spec: flashseek.ref.moe.route_dispatch_).

    Args:
        hidden: bf16 [T, H], H % 128 == 0, unit stride along H (as moe_scatter_quant).
        logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize: as route_noaux_tc.
        expert_map: optional int32 [E] global -> local expert id, -1 = not on this rank.
        num_local: routed local experts (default E; required with expert_map unless every expert is local).
        max_m: rows per local expert of the masked layout (default T, which never drops a slot).
        num_shared: shared experts (0..MOE_ROUTE_DISPATCH_MAX_SHARED) placed after the routed ones:
            each takes every token, token t at its row t (max_m >= T), masked_m = T; no token_slots
            entry points at them (fused_moe adds their [T, H] output slab as moe_combine's shared_out).
        ue8m0: power-of-two activation scales, as moe_scatter_quant.
    Returns:
        (topk_weights fp32 [T, topk], topk_ids int32 [T, topk], masked_m int32 [num_local + num_shared],
        token_slots int32 [T, topk], a e4m3 [num_local + num_shared, max_m, H], a_scale fp32
        [num_local + num_shared, max_m, H/128] in the empty_grouped_act_scale layout). Rows of a / a_scale
        past masked_m[e] are not written.
    The CUDA kernel reads bias before its programmatic-dependency wait, i.e. while the kernel before it on
    the stream may still run: that kernel must not write it (as with mla_rope_norm_append's tables).
    """
    t, h = logits.shape[0], hidden.shape[-1]
    dev = hidden.device
    num_local = logits.shape[1] if num_local is None else num_local
    max_m = t if max_m is None else max_m
    groups = num_local + num_shared
    topk_weights = torch.empty((t, topk), dtype=torch.float32, device=dev)
    topk_ids = torch.empty((t, topk), dtype=torch.int32, device=dev)
    masked_m = torch.empty(groups, dtype=torch.int32, device=dev)
    token_slots = torch.empty((t, topk), dtype=torch.int32, device=dev)
    a = torch.empty((groups, max_m, h), dtype=FP8, device=dev)
    a_scale = empty_grouped_act_scale(groups, max_m, h // 128, dev)
    torch.ops.flashseek.moe_route_dispatch(hidden, logits, bias, n_group, topk_group, topk,
                                           float(routed_scaling_factor), renormalize, expert_map, topk_weights,
                                           topk_ids, masked_m, token_slots, a, a_scale, num_shared, ue8m0)
    return topk_weights, topk_ids, masked_m, token_slots, a, a_scale


def _check_moe_combine(expert_out, topk_weights, token_slots, shared_out, out):
    _expect_dtype(expert_out, "expert_out", torch.bfloat16)
    _expect_dim(expert_out, "expert_out", 2)
    h = expert_out.shape[1]
    _expect(h % 8 == 0, f"expert_out's last dimension must be a multiple of 8, got {h}")
    _expect(expert_out.stride(-1) == 1 and (expert_out.shape[0] <= 1 or expert_out.stride(0) % 8 == 0),
            "expert_out must have a unit stride along H and a row stride multiple of 8, got "
            f"{tuple(expert_out.stride())}")
    _expect_dtype(token_slots, "token_slots", torch.int32)
    _expect_dim(token_slots, "token_slots", 2)
    _expect_contiguous(token_slots, "token_slots")
    t, k = token_slots.shape
    _expect(1 <= k <= 64, f"topk (token_slots' second dimension) must be in [1, 64], got {k}")
    _expect_dtype(topk_weights, "topk_weights", torch.float32)
    _expect_shape(topk_weights, "topk_weights", (t, k))
    _expect_contiguous(topk_weights, "topk_weights")
    if shared_out is not None:
        _expect_dtype(shared_out, "shared_out", torch.bfloat16)
        _expect_shape(shared_out, "shared_out", (t, h))
        _expect_contiguous(shared_out, "shared_out")
    _expect_dtype(out, "out", torch.bfloat16)
    _expect_shape(out, "out", (t, h))
    _expect_contiguous(out, "out")
    _expect_same_device(expert_out, "expert_out", topk_weights=topk_weights, token_slots=token_slots,
                        shared_out=shared_out, out=out)


def _ref_moe_combine(expert_out, topk_weights, token_slots, shared_out, out):
    out.copy_(ref_moe.combine(expert_out, topk_weights, token_slots, shared_out))


_register("moe_combine", _check_moe_combine, _ref_moe_combine)


def moe_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, token_slots: torch.Tensor,
                shared_out: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out[t] = sum_j topk_weights[t, j] * expert_out[token_slots[t, j]] + shared_out[t], in fp32.

    expert_out: bf16 [R, H] or [G, M, H] (flattened: row r = group r // M), H % 8 == 0.
    token_slots: int32 [T, topk] rows, -1 = skip (moe_align / moe_align_masked).
    Deterministic: terms added in ascending j, separate fp32 multiply and add, no atomics; the CUDA
    kernel is bit-identical to the reference. Returns bf16 [T, H].
    """
    eo = expert_out.reshape(-1, expert_out.shape[-1])
    t = token_slots.shape[0]
    out = torch.empty((t, eo.shape[1]), dtype=torch.bfloat16, device=eo.device) if out is None else out
    torch.ops.flashseek.moe_combine(eo, topk_weights, token_slots, shared_out, out)
    return out


#: fused_moe's "auto" layout uses the masked (decode) path up to this many tokens. `flashseek bench
#: moe` times both layouts at T <= 256.
FUSED_MOE_MASKED_MAX_T = 32
#: Row alignment of the contiguous path. The grouped GEMM needs none, and with 1 no row is padding,
#: so the activation buffers are exactly T * topk rows.
FUSED_MOE_BLOCK_M = 1


def fused_moe(hidden: torch.Tensor, router_logits: torch.Tensor, bias: Optional[torch.Tensor], w13: torch.Tensor,
              w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, *, n_group: int, topk_group: int,
              topk: int, routed_scaling_factor: float, renormalize: bool = True, scoring: str = "sigmoid",
              shared_out: Optional[torch.Tensor] = None, expert_map: Optional[torch.Tensor] = None,
              layout: str = "auto", n_shared_experts: int = 0, ue8m0: bool = False) -> torch.Tensor:
    """The routed-expert MoE layer with FP8 experts: route, dispatch + quantize, grouped GEMM 1,
    silu_mul_quant, grouped GEMM 2, combine (+ shared_out). No host syncs on either layout, so the
    whole call is CUDA-graph capturable.

    Args:
        hidden: bf16 [T, H], H % 128 == 0.
        router_logits: [T, E_global] (fp32/bf16/fp16).
        bias: fp32 [E_global] selection bias for scoring="sigmoid" (None = zeros); ignored for softmax.
        w13: e4m3 [E_local + n_shared_experts, 2I, H], gate rows first then up; w13_scale fp32
            [E_local + n_shared_experts, 2I/128, H/128].
        w2: e4m3 [E_local + n_shared_experts, H, I]; w2_scale fp32 [E_local + n_shared_experts, H/128, I/128].
        n_group, topk_group, topk, routed_scaling_factor, renormalize: the router (route_noaux_tc);
            for scoring="softmax" (route_softmax_topk) the weights are multiplied by the factor.
        shared_out: optional bf16 [T, H] added in the combine (the shared expert's output).
        expert_map: optional int32 [E_global] global -> local expert id, -1 = not on this rank.
        layout: "masked" ([E_local, T, H] buffers, rows per expert counted on the device),
            "contiguous" (T * topk rows grouped by expert) or "auto" (masked for T <= FUSED_MOE_MASKED_MAX_T).
            On the masked layout with scoring="sigmoid" and T <= MOE_ROUTE_DISPATCH_MAX_T, routing,
            the slot map and the FP8 rows come from one moe_route_dispatch launch (the same bits as
            route_noaux_tc + moe_align_masked + moe_scatter_quant, which run otherwise).
        n_shared_experts: 0 or 1. With 1, the last entry of w13 / w2 is the shared expert (DeepSeek's,
            whose intermediate size equals the routed experts'), applied to every token with weight 1
            and added like shared_out (which must then be None). On the masked layout it is one more
            group of T rows in both grouped GEMMs, so a decode step streams every expert's weights in
            one launch per GEMM; on the contiguous layout it runs as dense fp8_gemm calls.
        ue8m0: every activation quantization (hidden's, and silu(gate) * up's before the second GEMM)
            rounds its scales up to powers of two: DeepSeek-V3.1's `scale_fmt: ue8m0` recipe, which the
            model's dense layers follow too. The weights' scales are taken as given.
    Returns:
        bf16 [T, H]. Spec: flashseek.ref.moe.fused_moe.
    """
    t, h = hidden.shape
    e_all, i2, hh = w13.shape
    _expect(hh == h, f"w13 must have shape [E, 2I, H={h}], got {list(w13.shape)}")
    _expect(i2 % 256 == 0, f"w13's second dimension must be 2I with I a multiple of 128, got {i2}")
    inter = i2 // 2
    _expect_shape(w2, "w2", (e_all, h, inter))
    _expect(n_shared_experts in (0, 1), f"n_shared_experts must be 0 or 1, got {n_shared_experts}")
    _expect(e_all > n_shared_experts, f"w13 holds {e_all} experts: none left to route after {n_shared_experts} shared")
    _expect(not (n_shared_experts and shared_out is not None), "pass either shared_out or n_shared_experts, not both")
    e_local = e_all - n_shared_experts
    _expect(layout in ("auto", "masked", "contiguous"),
            f"layout must be 'auto', 'masked' or 'contiguous', got {layout!r}")
    e_global = router_logits.shape[1]
    _expect(expert_map is not None or e_global == e_local,
            f"router_logits has {e_global} experts but w13 holds {e_local}: pass expert_map")
    _expect(scoring in ("sigmoid", "softmax"), f"scoring must be 'sigmoid' or 'softmax', got {scoring!r}")
    dev = hidden.device
    if t == 0:
        return torch.empty((0, h), dtype=torch.bfloat16, device=dev)
    if layout == "auto":
        layout = "masked" if t <= FUSED_MOE_MASKED_MAX_T else "contiguous"
    if scoring == "sigmoid" and bias is None:
        bias = torch.zeros(e_global, dtype=torch.float32, device=dev)
    kb_h = h // 128

    if layout == "masked" and scoring == "sigmoid" and t <= MOE_ROUTE_DISPATCH_MAX_T:
        # Routing, the slot map and the quantized rows (the shared expert's too) in one launch
        # (bit-identical to the three ops).
        max_m = t
        weights, _, masked_m, token_slots, a, a_scale = moe_route_dispatch(
            hidden, router_logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize, expert_map,
            e_local, max_m, n_shared_experts, ue8m0)
    else:
        if scoring == "sigmoid":
            weights, ids = route_noaux_tc(router_logits, bias, n_group, topk_group, topk, routed_scaling_factor,
                                          renormalize)
        else:
            weights, ids = route_softmax_topk(router_logits, topk, renormalize)
            if routed_scaling_factor != 1.0:
                weights = weights * routed_scaling_factor
        if layout == "masked":
            max_m = t
            masked_m, token_slots = moe_align_masked(ids, e_global, max_m, expert_map, e_local)
            a = torch.empty((e_all, max_m, h), dtype=FP8, device=dev)
            a_scale = empty_grouped_act_scale(e_all, max_m, kb_h, dev)
            scatter_slots = token_slots
            if n_shared_experts:  # the shared expert's group: token t at row t
                scatter_slots = torch.cat([token_slots, ref_moe.shared_expert_rows(t, e_local, 1, max_m, dev)], 1)
                masked_m = torch.cat([masked_m, masked_m.new_full((1,), t)])
            moe_scatter_quant(hidden, scatter_slots, a, a_scale, ue8m0)

    if layout == "masked":
        gate_up = grouped_fp8_gemm_masked(a, a_scale, w13, w13_scale, masked_m)
        # Rows past masked_m[e] hold stale data; they stay in their rows and are never read.
        act, act_scale = silu_mul_quant_fp8(gate_up.view(e_all * max_m, i2), ue8m0, masked_m=masked_m)
        # Per-expert views of the flat [E * max_m, I/128] column-major scales: strides (max_m, 1, ld).
        down = grouped_fp8_gemm_masked(act.view(e_all, max_m, inter), act_scale.unflatten(0, (e_all, max_m)),
                                       w2, w2_scale, masked_m)
        if n_shared_experts:
            shared_out = down[e_local]  # [T, H], contiguous: max_m = T
    else:
        rows = moe_align_max_rows(ids.numel(), e_local, FUSED_MOE_BLOCK_M)
        _, _, offsets, token_slots = moe_align(ids, e_global, FUSED_MOE_BLOCK_M, expert_map, e_local, rows)
        a = torch.empty((rows, h), dtype=FP8, device=dev)
        a_scale = empty_act_scale(rows, kb_h, dev)
        moe_scatter_quant(hidden, token_slots, a, a_scale, ue8m0)
        gate_up = grouped_fp8_gemm_contiguous(a, a_scale, w13[:e_local], w13_scale[:e_local], offsets)
        act, act_scale = silu_mul_quant_fp8(gate_up, ue8m0)
        down = grouped_fp8_gemm_contiguous(act, act_scale, w2[:e_local], w2_scale[:e_local], offsets)
        if n_shared_experts:  # T rows: the dense GEMMs at full efficiency
            x_q, x_s = quant_fp8_1x128(hidden, ue8m0)
            s_act, s_act_scale = silu_mul_quant_fp8(fp8_gemm(x_q, x_s, w13[e_local], w13_scale[e_local]), ue8m0)
            shared_out = fp8_gemm(s_act, s_act_scale, w2[e_local], w2_scale[e_local])
    return moe_combine(down, weights, token_slots, shared_out)


# --------------------------------------------------------------------------------------------
# Paged MLA latent decode   [section: mla]
# --------------------------------------------------------------------------------------------
# @section-mla
# The kernels read q rows, out rows and cache tokens with 16-byte accesses; the plan is int32 in
# the layout of flashseek.ref.mla.mla_decode_plan (sm parts, then (ws_base, num_splits) per request).
from flashseek.ref import mla as ref_mla  # noqa: E402


def _check_mla_cache(kv_cache, name="kv_cache"):
    _expect_dim(kv_cache, name, 3)
    _expect_dtype(kv_cache, name, (torch.bfloat16, torch.uint8))
    width = ref_mla.D_QK if kv_cache.dtype == torch.bfloat16 else ref_mla.FP8_TOKEN_BYTES
    _expect(kv_cache.shape[2] == width,
            f"{name} must be [num_pages, page_size, {width}] for dtype {kv_cache.dtype} "
            f"(bf16: 576 = 512 latent + 64 rope; uint8: the 656-byte FP8 token layout), got {list(kv_cache.shape)}")
    _expect(kv_cache.shape[1] in ref_mla.PAGE_SIZES,
            f"{name}'s page size (dim 1) must be one of {ref_mla.PAGE_SIZES}, got {kv_cache.shape[1]}")
    _expect(kv_cache.shape[0] >= 1, f"{name} must have at least one page, got {list(kv_cache.shape)}")
    _expect_contiguous(kv_cache, name)


def _check_mla_decode_plan(cache_seqlens, s_q, h_q, num_sm_parts):
    _expect_dtype(cache_seqlens, "cache_seqlens", torch.int32)
    _expect_dim(cache_seqlens, "cache_seqlens", 1)
    _expect_contiguous(cache_seqlens, "cache_seqlens")
    _expect(1 <= s_q <= 64, f"s_q must lie in [1, 64], got {s_q}")
    _expect(1 <= h_q <= 1024, f"h_q must lie in [1, 1024], got {h_q}")
    _expect(1 <= num_sm_parts <= 4096, f"num_sm_parts must lie in [1, 4096], got {num_sm_parts}")
    _expect(cache_seqlens.shape[0] <= 32768, f"batch must be <= 32768, got {cache_seqlens.shape[0]}")
    return cache_seqlens.new_empty((ref_mla.plan_size(cache_seqlens.shape[0], num_sm_parts),), dtype=torch.int32)


def _ref_mla_decode_plan(cache_seqlens, s_q, h_q, num_sm_parts):
    return ref_mla.mla_decode_plan(cache_seqlens, s_q, h_q, num_sm_parts)


_register("mla_decode_plan", _check_mla_decode_plan, _ref_mla_decode_plan)


def _check_mla_decode(q, kv_cache, block_table, cache_seqlens, plan, softmax_scale, causal, out, lse):
    _expect_dtype(q, "q", (torch.bfloat16, torch.float16))
    _expect_dim(q, "q", 4)
    b, s_q, h_q, d = q.shape
    _expect(d == ref_mla.D_QK, f"q's head dim must be {ref_mla.D_QK} (512 latent + 64 rope), got {d}")
    _expect(q.stride(-1) == 1, f"q must have a unit stride in its last dimension, got strides {tuple(q.stride())}")
    _expect(all(n == 1 or s % 8 == 0 for n, s in zip(q.shape[:3], q.stride()[:3])),
            f"q's strides must be multiples of 8 elements (16-byte rows), got {tuple(q.stride())}")
    _expect(1 <= s_q <= 64 and 1 <= h_q <= 1024, f"q must have 1 <= s_q <= 64 and 1 <= h_q <= 1024, got {list(q.shape)}")
    _check_mla_cache(kv_cache)
    _expect_dtype(block_table, "block_table", torch.int32)
    _expect_dim(block_table, "block_table", 2)
    _expect(block_table.shape[0] == b and block_table.shape[1] >= 1,
            f"block_table must be [{b}, max_pages >= 1], got {list(block_table.shape)}")
    _expect(block_table.stride(1) == 1,
            f"block_table must have a unit stride in its last dimension, got strides {tuple(block_table.stride())}")
    _expect_dtype(cache_seqlens, "cache_seqlens", torch.int32)
    _expect_shape(cache_seqlens, "cache_seqlens", (b,))
    _expect_contiguous(cache_seqlens, "cache_seqlens")
    _expect_dtype(plan, "plan", torch.int32)
    _expect_dim(plan, "plan", 1)
    _expect_contiguous(plan, "plan")
    _expect(ref_mla.plan_num_sm_parts(plan.shape[0], b) >= 1,
            f"plan must come from mla_decode_plan for this batch of {b}: 8 * num_sm_parts + 2 * {b} "
            f"int32, got {plan.shape[0]}")
    _expect(softmax_scale > 0, f"softmax_scale must be positive, got {softmax_scale}")
    _expect_dtype(out, "out", q.dtype)
    _expect_shape(out, "out", (b, s_q, h_q, ref_mla.D_V))
    _expect(out.stride(-1) == 1, f"out must have a unit stride in its last dimension, got strides {tuple(out.stride())}")
    _expect(all(n == 1 or s % 8 == 0 for n, s in zip(out.shape[:3], out.stride()[:3])),
            f"out's strides must be multiples of 8 elements (16-byte rows), got {tuple(out.stride())}")
    _expect_dtype(lse, "lse", torch.float32)
    _expect_shape(lse, "lse", (b, h_q, s_q))
    _expect_contiguous(lse, "lse")
    _expect_same_device(q, "q", kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                        plan=plan, out=out, lse=lse)


def _ref_mla_decode(q, kv_cache, block_table, cache_seqlens, plan, softmax_scale, causal, out, lse):
    o, l = ref_mla.mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal)
    out.copy_(o)
    lse.copy_(l)


_register("mla_decode", _check_mla_decode, _ref_mla_decode)


def _check_mla_cache_append(latent, k_rope, kv_cache, slot_mapping):
    _expect_dtype(latent, "latent", (torch.bfloat16, torch.float16))
    _expect_dim(latent, "latent", 2)
    t = latent.shape[0]
    _expect_shape(latent, "latent", (t, ref_mla.D_V))
    _expect_dtype(k_rope, "k_rope", (torch.bfloat16, torch.float16))
    _expect_shape(k_rope, "k_rope", (t, ref_mla.D_ROPE))
    for name, x in (("latent", latent), ("k_rope", k_rope)):
        _expect(x.stride(1) == 1 and (t <= 1 or x.stride(0) % 8 == 0),
                f"{name} must have a unit last stride and a row stride that is a multiple of 8 elements, "
                f"got strides {tuple(x.stride())}")
    _check_mla_cache(kv_cache)
    _expect_dtype(slot_mapping, "slot_mapping", torch.int64)
    _expect_shape(slot_mapping, "slot_mapping", (t,))
    _expect_contiguous(slot_mapping, "slot_mapping")
    _expect_same_device(kv_cache, "kv_cache", latent=latent, k_rope=k_rope, slot_mapping=slot_mapping)


def _ref_mla_cache_append(latent, k_rope, kv_cache, slot_mapping):
    ref_mla.mla_cache_append(latent, k_rope, kv_cache, slot_mapping)


_register("mla_cache_append", _check_mla_cache_append, _ref_mla_cache_append)


def empty_mla_cache(num_pages: int, page_size: int, fp8: bool = False, device="cuda") -> torch.Tensor:
    """Allocates an (uninitialized) paged latent cache.

    bf16: [num_pages, page_size, 576] (512 latent | 64 rope). fp8: uint8 [num_pages, page_size, 656]
    with per token 512 e4m3 latent values, 4 fp32 scales (one per 128) and 64 bf16 rope values.
    Slots past a request's length are never read, so garbage (even NaN) there is harmless.
    """
    width = ref_mla.FP8_TOKEN_BYTES if fp8 else ref_mla.D_QK
    dtype = torch.uint8 if fp8 else torch.bfloat16
    return torch.empty((num_pages, page_size, width), dtype=dtype, device=device)


def default_num_sm_parts(device, s_q: int, h_q: int) -> int:
    """One CTA per SM: the kernel's grid is (ceil(s_q*h_q / 64) row tiles) x num_sm_parts."""
    device = torch.device(device)
    m_tiles = (s_q * h_q + ref_mla.BLOCK_M - 1) // ref_mla.BLOCK_M
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 8  # the CPU reference ignores the schedule; any small positive count is valid
    return max(1, sms // m_tiles)


def mla_decode_plan(cache_seqlens: torch.Tensor, s_q: int, h_q: int,
                    num_sm_parts: Optional[int] = None) -> torch.Tensor:
    """Computes the split-KV schedule of mla_decode on the device (no host sync, graph-capturable).

    Call once per decode step and reuse it for every layer of that step: it depends only on
    cache_seqlens (which must be the same tensor values passed to mla_decode), s_q and h_q.
    Returns int32 [8 * num_sm_parts + 2 * b] (layout: flashseek.ref.mla.mla_decode_plan).
    """
    if num_sm_parts is None:
        num_sm_parts = default_num_sm_parts(cache_seqlens.device, s_q, h_q)
    return torch.ops.flashseek.mla_decode_plan(cache_seqlens, s_q, h_q, num_sm_parts)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               cache_seqlens: torch.Tensor, plan: torch.Tensor, softmax_scale: float,
               causal: bool = False, out: Optional[torch.Tensor] = None,
               lse: Optional[torch.Tensor] = None, validate: bool = False):
    """Paged MLA latent decode: softmax(q k^T * scale) v with k = cache tokens (576), v = k[:512].

    Args:
        q: [b, s_q, h_q, 576] bf16/fp16 (unit last stride).
        kv_cache: bf16 [num_pages, page_size, 576] or the FP8 uint8 [num_pages, page_size, 656]
            layout (see empty_mla_cache); page_size 16, 32, 64 or 128.
        block_table: int32 [b, max_pages]; cache_seqlens: int32 [b], 0 <= len <= max_pages * page_size.
        plan: from mla_decode_plan(cache_seqlens, s_q, h_q), as that op wrote it (or a copy made by a
            memcpy): the kernels read it before waiting for the previous kernel on the stream, which is
            safe because mla_decode_plan's kernel only lets later kernels start once the plan is written.
        causal: bottom-right aligned mask for s_q > 1 (query i sees the first len - s_q + i + 1 keys).
        validate: read block_table and cache_seqlens on the host and raise on out-of-range values
            (synchronizes; for debugging). Without it the CUDA kernel clamps: page ids to
            [0, num_pages) and lengths to the table's capacity, so bad indices give wrong values but
            never out-of-bounds reads.
    Returns:
        (out [b, s_q, h_q, 512] in q's dtype, lse [b, h_q, s_q] fp32, natural log; an empty
        sequence gives out 0 and lse -inf).

    Kernels (CUDA): bf16 cache: wgmma kernels on 64-row tiles for every shape (two warpgroups
    splitting the output columns; for s_q * h_q > 64 at batch >= 8, Q held in registers with
    three KV stages, 3-17% faster than the kernels below at h_q = 128 and batch >= 16; below
    batch 8, warpgroups taking turns on key blocks for s_q >= 2 with four or more row tiles; where
    the batch is at least the plan's part count, the Q-in-registers kernel's row tiles run in pairs
    that load each key block once for both, by TMA multicast). FP8 cache: up to 32 rows, a kernel
    that multiplies the exact e4m3 values by their scales in fp32 (scores and output within the bf16
    budget of the reference on the dequantized cache); above, a wgmma kernel that rounds the
    dequantized values to bf16 (cos-diff <= 1e-3). Read per call, for tests and A/Bs:
    FLASHSEEK_MLA_DECODE forces ``qreg`` / ``seesaw`` / ``wgmma`` (bf16, 64-row tiles: the
    Q-in-registers / turn-taking / two-warpgroup kernel at any s_q) or ``staged`` (FP8, up to 32
    rows: dequantize each block to a bf16 tile first); FLASHSEEK_MLA_MULTICAST=0 / 1 forces the
    multicast pairs off / on (where the row tiles pair up). Every choice gives the same result
    within the stated budgets; multicast on and off give identical bits.
    """
    b, s_q, h_q, _ = q.shape
    if validate:
        ref_mla.check_indices(kv_cache, block_table, cache_seqlens)
    out = torch.empty((b, s_q, h_q, ref_mla.D_V), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=q.device) if lse is None else lse
    torch.ops.flashseek.mla_decode(q, kv_cache, block_table, cache_seqlens, plan, float(softmax_scale),
                                   bool(causal), out, lse)
    return out, lse


def mla_cache_append(latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """Writes latent [t, 512] and k_rope [t, 64] (bf16/fp16) to slots slot_mapping [t] int64
    (page * page_size + offset; negative: skipped) of kv_cache, quantizing to the FP8 layout when
    kv_cache is uint8 (per 128 values: scale = max(amax, 1e-4) / 448). Slots >= the cache's
    capacity raise on CPU and are skipped by the CUDA kernel (no sync to check them)."""
    torch.ops.flashseek.mla_cache_append(latent, k_rope, kv_cache, slot_mapping)



def _check_rows16(x, name):
    _expect(x.stride(-1) == 1 and all(n == 1 or st % 8 == 0 for n, st in zip(x.shape[:-1], x.stride()[:-1])),
            f"{name} must have a unit last stride and other strides that are multiples of 8 elements "
            f"(16-byte rows), got strides {tuple(x.stride())}")


def _check_mla_rope_norm_append(kv, q_pe, positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache, q_out):
    _expect_dtype(kv, "kv", (torch.bfloat16, torch.float16))
    _expect_dim(kv, "kv", 2)
    t = kv.shape[0]
    _expect(kv.shape[1] == ref_mla.D_QK, f"kv must be [tokens, {ref_mla.D_QK}] (512 latent + 64 k_pe), "
            f"got {list(kv.shape)}")
    _check_rows16(kv, "kv")
    _expect_dtype(q_pe, "q_pe", kv.dtype)
    _expect_dim(q_pe, "q_pe", 3)
    h = q_pe.shape[1]
    _expect(q_pe.shape[0] == t and q_pe.shape[2] == ref_mla.D_ROPE and 1 <= h <= 1024,
            f"q_pe must be [{t}, heads in [1, 1024], {ref_mla.D_ROPE}], got {list(q_pe.shape)}")
    _check_rows16(q_pe, "q_pe")
    _expect_dtype(q_out, "q_out", kv.dtype)
    _expect_shape(q_out, "q_out", (t, h, ref_mla.D_ROPE))
    _check_rows16(q_out, "q_out")
    _expect_dtype(positions, "positions", torch.int64)
    _expect_shape(positions, "positions", (t,))
    _expect_contiguous(positions, "positions")
    _expect_dtype(cos, "cos", torch.float32)
    _expect(cos.dim() == 2 and cos.shape[0] >= 1 and cos.shape[1] == ref_mla.D_ROPE // 2,
            f"cos must be [max_positions >= 1, {ref_mla.D_ROPE // 2}], got {list(cos.shape)}")
    _expect_contiguous(cos, "cos")
    _expect_dtype(sin, "sin", torch.float32)
    _expect(sin.shape == cos.shape, f"sin must have cos's shape {list(cos.shape)}, got {list(sin.shape)}")
    _expect_contiguous(sin, "sin")
    _expect_dtype(norm_weight, "norm_weight", (torch.bfloat16, torch.float16, torch.float32))
    _expect_shape(norm_weight, "norm_weight", (ref_mla.D_V,))
    _expect_contiguous(norm_weight, "norm_weight")
    _expect(eps >= 0, f"eps must be >= 0, got {eps}")
    _expect_dtype(slot_mapping, "slot_mapping", torch.int64)
    _expect_shape(slot_mapping, "slot_mapping", (t,))
    _expect_contiguous(slot_mapping, "slot_mapping")
    _check_mla_cache(kv_cache)
    _expect_same_device(kv, "kv", q_pe=q_pe, positions=positions, cos=cos, sin=sin, norm_weight=norm_weight,
                        slot_mapping=slot_mapping, kv_cache=kv_cache, q_out=q_out)


def _ref_mla_rope_norm_append(kv, q_pe, positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache, q_out):
    q_out.copy_(ref_mla.mla_rope_norm_append(kv, q_pe, positions, cos, sin, norm_weight, eps, slot_mapping,
                                             kv_cache))


_register("mla_rope_norm_append", _check_mla_rope_norm_append, _ref_mla_rope_norm_append)


#: The head-GEMV ops' token limit (kHeadGemvMaxT, csrc/mla/mla_params.h).
MLA_HEAD_GEMV_MAX_T = 64
#: Up to this many tokens the mla_head_gemv wrapper (and the model's FP8 W_UV^T path) takes the kernel,
#: above it torch.bmm: in the R1 decode layer (H100, session 13, bench/probes/layer_ab.py) the kernel
#: saved 3-3.5 us at 16 tokens, tied at 32 and lost 12 at 64 (its 8 warps an SM issue too slowly there:
#: ncu, 0.16 instructions a cycle per scheduler).
MLA_HEAD_GEMV_KERNEL_MAX_T = 16
# mla_head_gemv_quant_fp8: a head's [K, 128] bf16 weights sit in one CTA's shared memory.
MLA_HEAD_GEMV_QUANT_MAX_K = 576


def _check_head_gemv_inputs(a, w, op: str, past_max_t: str = "") -> None:
    """a [H, T, K] and w [H, K, N] as both head-GEMV ops take them (check_head_gemv_inputs in
    csrc/mla/mla_ops.cpp)."""
    for name, x in (("a", a), ("w", w)):
        _expect_dtype(x, name, torch.bfloat16)
        _expect_dim(x, name, 3)
    h, t, k = a.shape
    n = w.shape[2]
    _expect(tuple(w.shape[:2]) == (h, k), f"w must have shape [H={h}, K={k}, N], got {list(w.shape)}")
    _expect(t <= MLA_HEAD_GEMV_MAX_T, f"{op} takes at most {MLA_HEAD_GEMV_MAX_T} tokens, got {t}{past_max_t}")
    _expect(k > 0 and k % 32 == 0 and k <= 1024, f"K must be a positive multiple of 32 up to 1024, got {k}")
    _expect(n > 0 and n % 64 == 0, f"N must be a positive multiple of 64, got {n}")
    _expect(a.stride(2) == 1 and a.stride(0) % 8 == 0 and (t <= 1 or a.stride(1) % 8 == 0),
            f"a must have a unit last stride and other strides multiples of 8, got strides {tuple(a.stride())}")
    _expect(w.stride(2) == 1 and w.stride(1) == n and w.stride(0) % 8 == 0,
            f"w must have contiguous rows [K, N] per head, got strides {tuple(w.stride())}")


def _check_mla_head_gemv(a, w, out):
    _check_head_gemv_inputs(a, w, "mla_head_gemv", " (flashseek.ops.mla_head_gemv runs torch.bmm above that)")
    _expect_dtype(out, "out", torch.bfloat16)
    _expect_dim(out, "out", 3)
    _expect_shape(out, "out", (a.shape[0], a.shape[1], w.shape[2]))
    _expect(out.stride(2) == 1, f"out must have a unit last stride, got strides {tuple(out.stride())}")
    _expect_same_device(a, "a", w=w, out=out)


def _ref_mla_head_gemv(a, w, out):
    out.copy_(torch.bmm(a.float(), w.float()).to(torch.bfloat16))


_register("mla_head_gemv", _check_mla_head_gemv, _ref_mla_head_gemv)


def mla_head_gemv(a: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The absorbed MLA's per-head projections: out[h, t] = a[h, t] @ w[h] (bf16, fp32 accumulation,
    one bf16 rounding), e.g. q_nope @ W_UK and o_lat @ W_UV^T.

    Args:
        a: bf16 [H, T, K] (any strides with a unit last one, e.g. a head-major view of [T, H, K]).
        w: bf16 [H, K, N] with contiguous [K, N] rows per head; K % 32 == 0 (<= 1024), N % 64 == 0.
        out: optional bf16 [H, T, N] with a unit last stride (e.g. a view into a larger tensor).
    For T <= MLA_HEAD_GEMV_KERNEL_MAX_T the flashseek kernel: every CTA requests a column slice of one
    head's weight into shared memory as a programmatic dependent and multiplies on tensor cores (one
    launch where a slice fits, as for R1's W_UK and W_UV^T; else a register-streaming kernel in launches of
    8 tokens); above it torch.bmm (cuBLAS), faster there. The op itself takes up to MLA_HEAD_GEMV_MAX_T.
    """
    h, t, _ = a.shape
    if out is None:
        out = torch.empty((h, t, w.shape[2]), dtype=torch.bfloat16, device=a.device)
    # The kernel takes what the op's checks accept (tokens, dtypes, shapes, strides) on 16-byte-aligned
    # views; anything else goes to torch.bmm.
    try:
        _check_mla_head_gemv(a, w, out)
        fits = t <= MLA_HEAD_GEMV_KERNEL_MAX_T and a.is_cuda and all(_storage_aligned16(x) for x in (a, w, out))
    except ValueError:
        fits = False
    if fits:
        torch.ops.flashseek.mla_head_gemv(a, w, out)
    else:
        torch.bmm(a, w, out=out) if out.dtype == a.dtype == w.dtype else out.copy_(torch.bmm(a, w))
    return out


def _check_mla_head_gemv_quant_fp8(a, w, out, scale, ue8m0=False):
    _check_head_gemv_inputs(a, w, "mla_head_gemv_quant_fp8")
    h, t, k = a.shape
    _expect(w.shape[2] == 128,
            f"w must have shape [H={h}, K={k}, 128] (one 1x128 block per head), got {list(w.shape)}")
    _expect(k <= MLA_HEAD_GEMV_QUANT_MAX_K,
            f"mla_head_gemv_quant_fp8 takes K a positive multiple of 32 up to {MLA_HEAD_GEMV_QUANT_MAX_K} (a head's "
            f"[K, 128] weights must fit one CTA's shared memory), got {k}")
    _expect_dtype(out, "out", FP8)
    _expect_shape(out, "out", (t, h * 128))
    _expect(out.stride(1) == 1 and out.stride(0) % 4 == 0,
            f"out must have rows of unit stride, got strides {tuple(out.stride())}")
    _expect_dtype(scale, "scale", torch.float32)
    _expect_shape(scale, "scale", (t, h))
    _expect(scale.stride(0) == 1 and (h <= 1 or scale.stride(1) >= t),
            f"scale must be column-major [T, H] (flashseek.ops.empty_act_scale), got strides {tuple(scale.stride())}")
    _expect_same_device(a, "a", w=w, out=out, scale=scale)


def _ref_mla_head_gemv_quant_fp8(a, w, out, scale, ue8m0=False):
    o = torch.bmm(a.float(), w.float()).to(torch.bfloat16)          # [H, T, 128]
    q, s = ref_quant.quant_fp8_1x128(o.transpose(0, 1).reshape(a.shape[1], a.shape[0] * 128), ue8m0)
    out.copy_(q)
    scale.copy_(s)


_register("mla_head_gemv_quant_fp8", _check_mla_head_gemv_quant_fp8, _ref_mla_head_gemv_quant_fp8)


def mla_head_gemv_quant_fp8(a: torch.Tensor, w: torch.Tensor, ue8m0: bool = False):
    """W_UV^T's projection straight into the o_proj input as FP8: (q e4m3 [T, H * 128], scale fp32
    [T, H] in the empty_act_scale layout) equal to quant_fp8_1x128 of mla_head_gemv(a, w)'s bf16 output
    laid out as [T, H * 128] (each head's 128 columns are one 1x128 block), for T <= MLA_HEAD_GEMV_MAX_T
    and K <= MLA_HEAD_GEMV_QUANT_MAX_K.

    Args:
        a: bf16 [H, T, K] as mla_head_gemv takes it (e.g. o_lat [T, H, 512] viewed head-major).
        w: bf16 [H, K, 128] with contiguous [K, 128] rows per head.
        ue8m0: round the scales up to powers of two (DeepSeek V3.1's scale_fmt).
    On CUDA one launch (each CTA's head slice lands in shared memory by cp.async while the previous kernel
    runs); elsewhere torch.bmm followed by the quantization's reference.
    """
    h, t, _ = a.shape
    out = torch.empty((t, h * 128), dtype=FP8, device=a.device)
    scale = empty_act_scale(t, h, a.device)
    torch.ops.flashseek.mla_head_gemv_quant_fp8(a, w, out, scale, ue8m0)
    return out, scale


def mla_rope_norm_append(kv: torch.Tensor, q_pe: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, norm_weight: torch.Tensor, eps: float, slot_mapping: torch.Tensor,
                         kv_cache: torch.Tensor, q_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The MLA layer's pre-attention glue in one kernel: kv_a RMSNorm, rope of k_pe and q_pe, cache append.

    Per token t (spec: flashseek.ref.mla.mla_rope_norm_append):
        latent = rms_norm(kv[t, :512], norm_weight, eps)  and  k_pe = rope(kv[t, 512:]), both rounded
        to kv's dtype, are written to kv_cache slot slot_mapping[t] as mla_cache_append writes them
        (bf16, or the FP8 layout); q_out[t] = rope(q_pe[t]) for every head.
    Rope is DeepSeek's interleaved form (pairs (2i, 2i+1) rotated by cos/sin[positions[t], i]) in fp32.

    Args:
        kv: [T, 576] bf16/fp16 (512 latent | 64 k_pe), e.g. a column slice of a fused projection;
            unit last stride, row stride a multiple of 8 elements.
        q_pe: [T, h, 64] in kv's dtype (e.g. q[..., 128:] of the q projection), 1 <= h <= 1024.
        positions: int64 [T] rows of the tables: in [0, max_positions) (CPU raises; CUDA clamps).
        cos, sin: fp32 [max_positions, 32] contiguous (YarnRope's tables, attention factor included).
        norm_weight: [512] bf16/fp16/fp32 (kv_a_layernorm), contiguous; eps >= 0.
        slot_mapping: int64 [T]; negative: the cache write is skipped (q_out is still written);
            >= num_pages * page_size: CPU raises, CUDA skips (no sync to check).
        kv_cache: bf16 [num_pages, page_size, 576] or the FP8 uint8 [.., .., 656] layout.
        q_out: optional [T, h, 64] output in kv's dtype, any strides with 16-byte rows, e.g.
            q_lat[..., 512:] of the absorbed query [T, h, 576]; must not overlap the inputs.
    The CUDA kernel reads positions, slot_mapping, cos, sin and norm_weight before its programmatic-
    dependency wait, i.e. while the kernel before it on the stream may still run: that kernel must not
    write them (no flashseek op does; a kernel without an early trigger, e.g. any torch op, has finished).
    Returns:
        q_out. Tolerance of the CUDA kernel against the reference: rope and the cache's rope bits
        exact; the latent within one rounding of kv's dtype (the fp32 sum of squares is ordered as
        flashseek.ops.rms_norm's kernel, which it equals bit for bit), FP8 bytes as mla_cache_append.
    """
    t, h = q_pe.shape[0], q_pe.shape[1]
    q_out = torch.empty((t, h, ref_mla.D_ROPE), dtype=q_pe.dtype, device=q_pe.device) if q_out is None else q_out
    torch.ops.flashseek.mla_rope_norm_append(kv, q_pe, positions, cos, sin, norm_weight, float(eps), slot_mapping,
                                             kv_cache, q_out)
    return q_out


#: mla_absorb_rope_append's token limit (kAbsorbRopeAppendMaxT, csrc/mla/mla_params.h): one pass of 16
#: token rows beside W_UK's head slice.
MLA_ABSORB_ROPE_APPEND_MAX_T = 16
# The head slice [qk_nope, 512] bf16 must fit one CTA (160 KB): qk_nope <= 160.
_ABSORB_MAX_NOPE = 160


def _check_mla_absorb_rope_append(q, kv, w_uk, positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache,
                                  q_lat):
    _expect_dtype(q, "q", torch.bfloat16)
    _expect_dim(q, "q", 3)
    t, h, d = q.shape
    nope = d - ref_mla.D_ROPE
    _expect(nope > 0, f"q must be [T, H, qk_nope + {ref_mla.D_ROPE}], got {list(q.shape)}")
    _expect(1 <= t <= MLA_ABSORB_ROPE_APPEND_MAX_T,
            f"mla_absorb_rope_append takes 1 to {MLA_ABSORB_ROPE_APPEND_MAX_T} tokens, got {t} "
            "(flashseek.ops.mla_absorb_rope_append runs the two ops above that)")
    _expect_dtype(q_lat, "q_lat", torch.bfloat16)
    _expect_shape(q_lat, "q_lat", (t, h, ref_mla.D_QK))
    _expect(q_lat.stride(-1) == 1, f"q_lat must have a unit last stride, got strides {tuple(q_lat.stride())}")
    _expect_dtype(norm_weight, "norm_weight", torch.bfloat16)
    _check_mla_rope_norm_append(kv, q[..., nope:], positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache,
                                q_lat[..., ref_mla.D_V:])
    _check_head_gemv_inputs(q[..., :nope].transpose(0, 1), w_uk, "mla_absorb_rope_append")
    _expect(w_uk.shape[2] == ref_mla.D_V and nope <= _ABSORB_MAX_NOPE,
            f"w_uk must be [H, qk_nope <= {_ABSORB_MAX_NOPE}, {ref_mla.D_V}], got {list(w_uk.shape)}")
    _expect_same_device(q, "q", kv=kv, w_uk=w_uk, q_lat=q_lat)


def _ref_mla_absorb_rope_append(q, kv, w_uk, positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache, q_lat):
    nope = q.shape[-1] - ref_mla.D_ROPE
    _ref_mla_rope_norm_append(kv, q[..., nope:], positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache,
                              q_lat[..., ref_mla.D_V:])
    _ref_mla_head_gemv(q[..., :nope].transpose(0, 1), w_uk, q_lat[..., :ref_mla.D_V].transpose(0, 1))


_register("mla_absorb_rope_append", _check_mla_absorb_rope_append, _ref_mla_absorb_rope_append)


def mla_absorb_rope_append(q: torch.Tensor, kv: torch.Tensor, w_uk: torch.Tensor, positions: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           slot_mapping: torch.Tensor, kv_cache: torch.Tensor,
                           q_lat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A decode step's absorbed query and cache append: mla_rope_norm_append and the W_UK product in one.

    q_lat[t, h] = [q[t, h, :nope] @ w_uk[h] | rope(q[t, h, nope:])] (bf16, fp32 accumulation), and kv's
    latent and k_pe appended to kv_cache at slot_mapping[t], exactly as
        mla_rope_norm_append(kv, q[..., nope:], positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache,
                             q_out=q_lat[..., 512:])
        mla_head_gemv(q[..., :nope].transpose(0, 1), w_uk, q_lat[..., :512].transpose(0, 1))
    compute them, bit for bit.

    Args:
        q: bf16 [T, H, nope + 64], e.g. q_b's output viewed per head (R1: nope 128).
        kv: bf16 [T, 576] (512 latent | 64 k_pe); positions, cos, sin, eps, slot_mapping, kv_cache: as
            mla_rope_norm_append takes them (the same early reads apply: see its docstring).
        w_uk: bf16 [H, nope, 512], contiguous [nope, 512] rows per head.
        norm_weight: [512] kv_a_layernorm weight.
        q_lat: optional bf16 [T, H, 576] output with a unit last stride.
    For 1 <= T <= MLA_ABSORB_ROPE_APPEND_MAX_T with a bf16 norm weight and nope <= 160, the op
    torch.ops.flashseek.mla_absorb_rope_append: on the GPU one kernel, W_UK's CTAs (one a head) also running
    the glue, so that a launch and a kernel boundary leave the decode step. Otherwise the two ops above.
    Returns:
        q_lat.
    """
    t, h, d = q.shape
    nope = d - ref_mla.D_ROPE
    if q_lat is None:
        q_lat = torch.empty((t, h, ref_mla.D_QK), dtype=q.dtype, device=q.device)
    # The op where it takes the inputs (on the CPU its reference, the two ops' composition).
    fused = (1 <= t <= MLA_ABSORB_ROPE_APPEND_MAX_T and q.dtype == torch.bfloat16
             and norm_weight.dtype == torch.bfloat16 and 0 < nope <= _ABSORB_MAX_NOPE
             and (not q.is_cuda or has_cuda_kernel("mla_absorb_rope_append")))
    if fused:
        torch.ops.flashseek.mla_absorb_rope_append(q, kv, w_uk, positions, cos, sin, norm_weight, float(eps),
                                                   slot_mapping, kv_cache, q_lat)
    else:
        mla_rope_norm_append(kv, q[..., nope:], positions, cos, sin, norm_weight, eps, slot_mapping, kv_cache,
                             q_out=q_lat[..., ref_mla.D_V:])
        mla_head_gemv(q[..., :nope].transpose(0, 1), w_uk, q_lat[..., :ref_mla.D_V].transpose(0, 1))
    return q_lat


# --------------------------------------------------------------------------------------------
# RMSNorm and fused residual-add + RMSNorm   [section: norm]
# --------------------------------------------------------------------------------------------
# @section-norm
# Semantics and rounding points: flashseek.ref.norm. The CUDA kernel runs one CTA per row with
# 16-byte accesses where pointers, row strides and N allow (else a scalar path); N <= 16384.
from flashseek.ref import norm as ref_norm  # noqa: E402

NORM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NORM_MAX_N = 16384


def _check_norm_rows(t, name, shape=None, dtype=None):
    _expect_dim(t, name, 2)
    if shape is not None:
        _expect_shape(t, name, shape)
    if dtype is not None:
        _expect_dtype(t, name, dtype)
    _expect(t.shape[1] <= 1 or t.stride(1) == 1,
            f"{name} must have a unit stride in its last dimension, got strides {tuple(t.stride())}")


def _check_norm_common(x, weight, eps):
    _expect_dtype(x, "x", NORM_DTYPES)
    _check_norm_rows(x, "x")
    n = x.shape[1]
    _expect(1 <= n <= NORM_MAX_N, f"x's last dimension must lie in [1, {NORM_MAX_N}], got {n}")
    _expect_dtype(weight, "weight", NORM_DTYPES)
    _expect_shape(weight, "weight", (n,))
    _expect_contiguous(weight, "weight")
    _expect(eps >= 0, f"eps must be >= 0, got {eps}")


def _check_rms_norm(x, weight, eps, out):
    _check_norm_common(x, weight, eps)
    _check_norm_rows(out, "out", tuple(x.shape), x.dtype)
    _expect_same_device(x, "x", weight=weight, out=out)


def _ref_rms_norm(x, weight, eps, out):
    out.copy_(ref_norm.rms_norm(x, weight, eps))


_register("rms_norm", _check_rms_norm, _ref_rms_norm)


def _check_fused_add_rms_norm(x, residual, weight, eps):
    _check_norm_common(x, weight, eps)
    _check_norm_rows(residual, "residual", tuple(x.shape), x.dtype)
    _expect_same_device(x, "x", residual=residual, weight=weight)


def _ref_fused_add_rms_norm(x, residual, weight, eps):
    y, r = ref_norm.fused_add_rms_norm(x, residual, weight, eps)
    residual.copy_(r)
    x.copy_(y)


_register("fused_add_rms_norm", _check_fused_add_rms_norm, _ref_fused_add_rms_norm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RMSNorm of each row: out = x * rsqrt(mean(x^2) + eps) * weight, in fp32, rounded once to x's dtype.

    Args:
        x: [M, N] bf16/fp16/fp32, 1 <= N <= 16384, unit stride in N (any row stride: e.g. the
            latent columns of the kv_a projection's output). M may be 0.
        weight: [N] bf16/fp16/fp32, contiguous (any of the three, independently of x).
        eps: added to the mean of squares.
        out: optional [M, N] output in x's dtype (unit stride in N, any row stride).
    Returns:
        out. Spec: flashseek.ref.norm.rms_norm (within one rounding of x's dtype: the order of the
        fp32 sum of squares differs; deterministic on CUDA).
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    torch.ops.flashseek.rms_norm(x, weight, float(eps), out)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """In place, vLLM-style: residual <- residual + x (rounded to its dtype), x <- rms_norm(residual).

    The norm reads the rounded sum, so the pair equals the unfused `h = residual + x;
    rms_norm(h, weight, eps)` exactly (up to the order of the fp32 sum of squares on CUDA).

    Args:
        x: [M, N] bf16/fp16/fp32 (e.g. a sublayer's output), overwritten with the normalized sum.
        residual: [M, N] in x's dtype, overwritten with the sum. Both unit stride in N, any row
            stride; they must not overlap.
        weight: [N] bf16/fp16/fp32, contiguous.
    Returns:
        (x, residual), the same tensors.
    """
    torch.ops.flashseek.fused_add_rms_norm(x, residual, weight, float(eps))
    return x, residual


# RMSNorm fused with the FP8 1x128 quantization of its output, for a norm whose output feeds only an
# FP8 GEMM: one pass writes the e4m3 row and its scales. The kernel runs rms_norm's vector path and
# quantizes as quant_fp8_1x128 does, so it takes the inputs both of those take that way: 16-bit x
# with whole 128-channel blocks and 16-byte rows.
def _check_norm_quant_rows(t, name):
    _expect_dtype(t, name, (torch.bfloat16, torch.float16))
    # 16-byte rows; the C++ glue also checks the data pointer's alignment, which fake tensors lack.
    _expect(t.shape[0] <= 1 or t.stride(0) % 8 == 0,
            f"{name}'s row stride must be a multiple of 8 elements, got {t.stride(0)}")


def _check_rms_norm_quant_fp8(x, weight, eps, out, scale, ue8m0=False):
    _check_norm_common(x, weight, eps)
    m, n = x.shape
    _expect(n % 128 == 0, f"x's last dimension must be a multiple of 128, got {n}")
    _check_norm_quant_rows(x, "x")
    _expect_dtype(out, "out", FP8)
    _expect_shape(out, "out", (m, n))
    _expect_contiguous(out, "out")
    _check_act_scale(scale, "scale", m, n // 128)
    _expect_same_device(x, "x", weight=weight, out=out, scale=scale)


def _ref_rms_norm_quant_fp8(x, weight, eps, out, scale, ue8m0=False):
    q, s = ref_norm.rms_norm_quant_fp8(x, weight, eps, ue8m0)
    out.copy_(q)
    scale.copy_(s)


_register("rms_norm_quant_fp8", _check_rms_norm_quant_fp8, _ref_rms_norm_quant_fp8)


def _check_fused_add_rms_norm_quant_fp8(x, residual, weight, eps, out, scale, ue8m0=False):
    _check_rms_norm_quant_fp8(x, weight, eps, out, scale, ue8m0)
    _check_norm_rows(residual, "residual", tuple(x.shape), x.dtype)
    _check_norm_quant_rows(residual, "residual")
    _expect_same_device(x, "x", residual=residual)


def _ref_fused_add_rms_norm_quant_fp8(x, residual, weight, eps, out, scale, ue8m0=False):
    q, s, r = ref_norm.fused_add_rms_norm_quant_fp8(x, residual, weight, eps, ue8m0)
    residual.copy_(r)
    out.copy_(q)
    scale.copy_(s)


_register("fused_add_rms_norm_quant_fp8", _check_fused_add_rms_norm_quant_fp8, _ref_fused_add_rms_norm_quant_fp8)


def rms_norm_quant_fp8_fits(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> bool:
    """Whether rms_norm_quant_fp8 (fused_add_rms_norm_quant_fp8 with residual given) takes x, weight
    and residual: the ops' own checks on them, plus the 16-byte alignment their C++ glue also checks."""
    try:
        _check_norm_common(x, weight, 0.0)
        _expect(x.shape[1] % 128 == 0, "whole 128-channel blocks")
        _check_norm_quant_rows(x, "x")
        if residual is not None:
            _check_norm_rows(residual, "residual", tuple(x.shape), x.dtype)
            _check_norm_quant_rows(residual, "residual")
        _expect_same_device(x, "x", weight=weight, residual=residual)
    except ValueError:
        return False
    return all(_storage_aligned16(t) for t in (x, weight, residual) if t is not None)


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, ue8m0: bool = False,
                       out: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None):
    """RMSNorm fused with the FP8 1x128 quantization of its output: one kernel instead of
    `quant_fp8_1x128(rms_norm(x, weight, eps), ue8m0)`, whose result it equals bit for bit (the
    normalized value is rounded to x's dtype, as rms_norm stores it, before it is quantized).

    Args:
        x: [M, N] bf16 or fp16, N a multiple of 128 (at most 16384), unit stride in N; rows may be
            strided (e.g. the q_a columns of the fused qkv_a projection's output) but must be 16-byte
            aligned: data pointer and row stride (a multiple of 8 elements). M may be 0.
        weight: [N] bf16/fp16/fp32, contiguous and 16-byte aligned.
        eps: added to the mean of squares.
        ue8m0: round each scale up to a power of two, as quant_fp8_1x128.
        out: optional e4m3 [M, N] output, contiguous.
        scale: optional fp32 [M, N/128] output in the `empty_act_scale` layout.
    Returns:
        (out e4m3 [M, N], scale fp32 [M, N/128]) in exactly quant_fp8_1x128's layout (column-major,
        leading dimension padded to 4 rows), what the FP8 GEMMs read.
    """
    m, n = x.shape
    out = torch.empty((m, n), dtype=FP8, device=x.device) if out is None else out
    scale = empty_act_scale(m, n // 128, x.device) if scale is None else scale
    torch.ops.flashseek.rms_norm_quant_fp8(x, weight, float(eps), out, scale, ue8m0)
    return out, scale


def fused_add_rms_norm_quant_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                 ue8m0: bool = False, out: Optional[torch.Tensor] = None,
                                 scale: Optional[torch.Tensor] = None):
    """fused_add_rms_norm fused with the FP8 1x128 quantization of the normalized sum.

    In place: residual <- residual + x (rounded to its dtype), exactly as fused_add_rms_norm. x is
    left untouched (fused_add_rms_norm overwrites it with the normalized sum; here that row exists
    only as the FP8 output, which saves writing it). (out, scale) equal, bit for bit,
    `quant_fp8_1x128(x_after)` where `x_after, _ = fused_add_rms_norm(x, residual, weight, eps)`.

    Args:
        x: [M, N] bf16 or fp16, N a multiple of 128 (at most 16384); read only.
        residual: [M, N] in x's dtype, overwritten with the sum; must not overlap x.
            Both unit stride in N, rows 16-byte aligned (pointer and row stride) as in
            rms_norm_quant_fp8.
        weight, eps, ue8m0, out, scale: as rms_norm_quant_fp8.
    Returns:
        (out e4m3 [M, N], scale fp32 [M, N/128] in the `empty_act_scale` layout).
    """
    m, n = x.shape
    out = torch.empty((m, n), dtype=FP8, device=x.device) if out is None else out
    scale = empty_act_scale(m, n // 128, x.device) if scale is None else scale
    torch.ops.flashseek.fused_add_rms_norm_quant_fp8(x, residual, weight, float(eps), out, scale, ue8m0)
    return out, scale
