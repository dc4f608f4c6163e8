"""FP8 1x128 activation quantization (DeepSeek-V3 / DeepGEMM semantics).

One fp32 scale per row per 128 channels: s = max(amax, 1e-4) / 448 (ue8m0: s rounded up to a
power of two), q = e4m3(x / s). Dequantization is q * s.
"""
import torch

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4
BLOCK = 128


def block_scales(amax: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    # Divide by a tensor, not a Python float: on CUDA, ATen turns division by a host scalar into a
    # multiplication by its reciprocal, which rounds differently from the IEEE division specified here.
    amax = amax.float().clamp(min=AMAX_FLOOR)
    s = amax / torch.full_like(amax, FP8_MAX)
    if ue8m0:
        s = ceil_pow2(s)
    return s


def ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= s, exactly (s > 0; inf and NaN pass through).

    Same value as exp2(ceil(log2(s))) except where fp32 log2 rounds a value a few ulps above a power
    of two down onto the integer (then that formula returns a scale below s); the kernels use the
    exponent bits, so the reference does too.
    """
    mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    up = torch.ldexp(torch.ones_like(s), exp)
    return torch.where((mant == 0.5) | ~torch.isfinite(s), s, up)


def quant_fp8_1x128(x: torch.Tensor, ue8m0: bool = False):
    """x [M, K] (K % 128 == 0) -> (q e4m3 [M, K], scale fp32 [M, K/128]), computed in fp32."""
    m, k = x.shape
    xb = x.float().reshape(m, k // BLOCK, BLOCK)
    s = block_scales(xb.abs().amax(dim=-1), ue8m0)
    q = (xb / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(m, k), s


def dequant_fp8_1x128(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    m, k = q.shape
    return (q.float().reshape(m, k // BLOCK, BLOCK) * s.float().unsqueeze(-1)).reshape(m, k)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2N] -> silu(gate) * up in fp32, gate the first half (DeepSeek MLP)."""
    n = gate_up.shape[-1] // 2
    g, u = gate_up.float()[..., :n], gate_up.float()[..., n:]
    return torch.nn.functional.silu(g) * u


def silu_mul_quant_fp8(gate_up: torch.Tensor, ue8m0: bool = False):
    """Fused MLP middle step: quant_fp8_1x128(silu(gate) * up), the product kept in fp32."""
    return quant_fp8_1x128(silu_mul(gate_up), ue8m0)
