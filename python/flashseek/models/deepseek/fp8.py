"""FP8 building blocks of the model, each routed to a flashseek op when the op exists.

While another family's wrapper has not landed in flashseek.ops, the functions here fall back to a
pure-torch emulation with the same semantics (block-scaled e4m3, fp32 accumulation, bf16 output),
so the FP8 path of the model always runs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

import flashseek.ops as ops
from flashseek.ref import quant as ref_quant

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


def op(name: str):
    """The flashseek.ops wrapper `name`, or None while it has not landed."""
    return getattr(ops, name, None)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ---- weights: 128x128 blocks -----------------------------------------------------------------
def quantize_weight_128x128(w: torch.Tensor, ue8m0: bool = False):
    """w [N, K] -> (e4m3 [N, K], fp32 scale_inv [ceil(N/128), ceil(K/128)]) with W ~= Wq * s per tile.

    Partial edge tiles are scaled by the amax of their valid elements, as DeepSeek's checkpoints are;
    scale = max(amax, 1e-4) / 448, rounded up to a power of two for ue8m0 (V3.1).
    """
    fn = op("quantize_weight_fp8_128x128")
    if fn is not None and not ue8m0:
        return fn(w)
    n, k = w.shape
    nb, kb = _cdiv(n, BLOCK), _cdiv(k, BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, BLOCK, kb, BLOCK)
    s = ref_quant.block_scales(tiles.abs().amax(dim=(1, 3)), ue8m0)
    q = (tiles / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous(), s.contiguous()


def dequantize_weight_128x128(q: torch.Tensor, s: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    n, k = q.shape
    full = s.float().repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return (q.float() * full).to(dtype)


# ---- activations and GEMMs -------------------------------------------------------------------
class QuantAct(NamedTuple):
    """An activation already quantized for FP8 linears, e.g. by the RMSNorm before them
    (flashseek.ops.rms_norm_quant_fp8): exactly what quant_act would return for the activation it
    stands for, so a linear given it computes what it computes from that activation.

    q: e4m3 [T, K]; scale: fp32 [T, K/128] in the flashseek.ops.empty_act_scale layout; ue8m0: whether
    the scales are powers of two (must match the linear's); dtype: the dtype of the activation (what
    its other users, e.g. the attention allocating its output, would have read). `shape` and `device`
    are q's, so code that reads only an activation's rows, dtype and device takes either.
    """
    q: torch.Tensor
    scale: torch.Tensor
    ue8m0: bool
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device


def quant_act(x: torch.Tensor, ue8m0: bool = False):
    return ops.quant_fp8_1x128(x, ue8m0)


def fp8_linear(x, w: torch.Tensor, w_scale: torch.Tensor, ue8m0: bool = False,
               out_dtype=torch.bfloat16) -> torch.Tensor:
    """y = x @ W^T with x quantized per token per 128 channels and W in 128x128 blocks. x is a tensor
    (quantized here) or a QuantAct (quantized already, with the same ue8m0)."""
    if isinstance(x, QuantAct):
        if x.ue8m0 != ue8m0:
            raise ValueError(f"a QuantAct with ue8m0={x.ue8m0} given to an FP8 linear with ue8m0={ue8m0}")
        xq, xs = x.q, x.scale
    else:
        xq, xs = quant_act(x, ue8m0)
    return fp8_gemm(xq, xs, w, w_scale, out_dtype)


def fp8_gemm(xq, xs, w, w_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    fn = op("fp8_gemm")
    if fn is not None:
        return fn(xq, xs, w, w_scale, out_dtype=out_dtype)
    a = ref_quant.dequant_fp8_1x128(xq, xs)
    b = dequantize_weight_128x128(w, w_scale)
    return (a @ b.t()).to(out_dtype)


def silu_mul_quant(gate_up: torch.Tensor, ue8m0: bool = False):
    return ops.silu_mul_quant_fp8(gate_up, ue8m0)
