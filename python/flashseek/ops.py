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


def _check_silu_mul_quant_fp8(gate_up, out, scale, ue8m0=False):
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


def _ref_silu_mul_quant_fp8(gate_up, out, scale, ue8m0=False):
    q, s = ref_quant.silu_mul_quant_fp8(gate_up, ue8m0)
    out.copy_(q)
    scale.copy_(s)


_register("silu_mul_quant_fp8", _check_silu_mul_quant_fp8, _ref_silu_mul_quant_fp8)


def silu_mul_quant_fp8(gate_up: torch.Tensor, ue8m0: bool = False, out: Optional[torch.Tensor] = None,
                       scale: Optional[torch.Tensor] = None):
    """Fused `quant_fp8_1x128(silu(gate) * up)` for gate_up [M, 2N] (gate first), N % 128 == 0.

    The product is formed in fp32 and never rounded to bf16 before quantization.
    Returns (out e4m3 [M, N], scale fp32 [M, N/128]) in the `empty_act_scale` layout.
    """
    m, n2 = gate_up.shape
    out = torch.empty((m, n2 // 2), dtype=FP8, device=gate_up.device) if out is None else out
    scale = empty_act_scale(m, n2 // 256, gate_up.device) if scale is None else scale
    torch.ops.flashseek.silu_mul_quant_fp8(gate_up, out, scale, ue8m0)
    return out, scale


# --------------------------------------------------------------------------------------------
# FP8 block-scaled GEMM (dense, grouped contiguous, grouped masked)   [section: gemm]
# --------------------------------------------------------------------------------------------
# @section-gemm


# --------------------------------------------------------------------------------------------
# Routing (noaux_tc grouped top-k, softmax top-k)   [section: routing]
# --------------------------------------------------------------------------------------------
# @section-routing


# --------------------------------------------------------------------------------------------
# MoE dispatch, combine and the fused MoE layer   [section: moe]
# --------------------------------------------------------------------------------------------
# @section-moe


# --------------------------------------------------------------------------------------------
# Paged MLA latent decode   [section: mla]
# --------------------------------------------------------------------------------------------
# @section-mla
