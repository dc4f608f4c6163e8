"""RMSNorm and fused residual-add + RMSNorm (DeepSeek-V3 / vLLM semantics), the spec of csrc/norm.

Rounding points, with T the activation dtype (bf16, fp16 or fp32) and every step in fp32:
  rms_norm:            y = T( (float(x) * rsqrt(mean(float(x)^2) + eps)) * float(weight) )
  fused_add_rms_norm:  r = T( float(x) + float(residual) )      -> stored to residual
                       y = rms_norm(r)                          -> stored to x
The norm reads the residual *after* it was rounded to T, exactly as the unfused model
(`h = x + a` in T, then `rms_norm(h)`) does, so fusing changes no value. The weight may be bf16,
fp16 or fp32 independently of T. mean = sum / n; the order of the fp32 sum is unspecified (the CUDA
kernel uses a fixed tree, so it is deterministic, but differs from torch's), hence kernel and
reference agree to within one rounding of T (fp32: a few ulps), not bit for bit; the residual
is bit-exact.

The norms fused with the FP8 1x128 quantization of their output (T bf16 or fp16, n % 128 == 0)
quantize y exactly as flashseek.ref.quant.quant_fp8_1x128 quantizes a T tensor: y is rounded to T
first, as the unfused pair stores it. The fused add's normalized sum is not stored anywhere else.
"""
import torch

from flashseek.ref import quant as ref_quant


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., n] -> rmsnorm(x) * weight in x's dtype (the formula of the model's reference path)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (rms_norm(r), r) with r = residual + x rounded to residual's dtype; inputs untouched."""
    r = (residual.float() + x.float()).to(residual.dtype)
    return rms_norm(r, weight, eps).to(x.dtype), r


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, ue8m0: bool = False):
    """x [M, N] bf16/fp16 (N % 128 == 0) -> (q e4m3 [M, N], scale fp32 [M, N/128]) =
    quant_fp8_1x128(rms_norm(x, weight, eps), ue8m0)."""
    return ref_quant.quant_fp8_1x128(rms_norm(x, weight, eps), ue8m0)


def fused_add_rms_norm_quant_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                 ue8m0: bool = False):
    """Returns (q, scale, r): r = residual + x rounded to residual's dtype (as fused_add_rms_norm),
    (q, scale) = quant_fp8_1x128(rms_norm(r)); inputs untouched."""
    y, r = fused_add_rms_norm(x, residual, weight, eps)
    q, s = ref_quant.quant_fp8_1x128(y, ue8m0)
    return q, s, r
