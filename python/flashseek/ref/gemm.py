"""FP8 block-scaled GEMM references (DeepSeek-V3 / DeepGEMM semantics).

out[m, n] = sum_kb (A[m, kb-block] . B[n, kb-block]) * sa[m, kb] * sb[n // 128, kb], fp32
accumulation, rounded once to the output dtype. A is e4m3 [M, K] with 1x128 activation scales
sa [M, K/128]; B is e4m3 [N, K] (K-major) with 128x128 block scales sb [ceil(N/128), K/128]. The
references dequantize both operands to fp32 and multiply, which is the same sum up to fp32 rounding.
"""
import torch

from flashseek.ref.quant import BLOCK, FP8_MAX, block_scales

FP8 = torch.float8_e4m3fn


def quantize_weight_fp8_128x128(w: torch.Tensor):
    """w [N, K] -> (w_fp8 e4m3 [N, K], scale fp32 [ceil(N/128), ceil(K/128)]), one scale per 128x128 block.

    scale = max(amax, 1e-4) / 448 per block (partial blocks at the edges use their valid elements);
    w ~= w_fp8 * scale, i.e. the scale is DeepSeek's `weight_scale_inv` (a multiplier).
    """
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    wp = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32, device=w.device)
    wp[:n, :k] = w.float()
    blocks = wp.reshape(nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    s = block_scales(amax, ue8m0=False)
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.reshape(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous(), s


def dequant_weight_fp8_128x128(q: torch.Tensor, s: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_weight_fp8_128x128 (up to fp8 rounding), in `dtype`."""
    n, k = q.shape
    full = s.to(dtype).repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return q.to(dtype) * full


def dequant_act_fp8_1x128(q: torch.Tensor, s: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """q e4m3 [M, K], s fp32 [M, K/128] (any strides) -> [M, K] in `dtype`."""
    return q.to(dtype) * s.to(dtype).repeat_interleave(BLOCK, 1)[:, : q.shape[1]]


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, acc_dtype=torch.float32):
    """Block-scaled FP8 GEMM reference: [M, K] x [N, K]^T -> [M, N] in out_dtype.

    acc_dtype=torch.float64 gives the exact product of the quantized inputs (for tests).
    """
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
    a32 = dequant_act_fp8_1x128(a, a_scale, acc_dtype)
    b32 = dequant_weight_fp8_128x128(b, b_scale, acc_dtype)
    return (a32 @ b32.t()).to(out_dtype)


def check_expert_offsets(expert_offsets: torch.Tensor, m_total: int) -> list:
    """Host-side validation of contiguous-layout offsets (the kernel cannot sync to check them)."""
    offs = [int(v) for v in expert_offsets.cpu().tolist()]
    if offs and offs[0] != 0:
        raise ValueError(f"flashseek: expert_offsets[0] must be 0, got {offs[0]}")
    for e in range(len(offs) - 1):
        if offs[e + 1] < offs[e]:
            raise ValueError(f"flashseek: expert_offsets must be nondecreasing, got offsets[{e}]={offs[e]} > "
                             f"offsets[{e + 1}]={offs[e + 1]}")
    if offs and offs[-1] > m_total:
        raise ValueError(f"flashseek: expert_offsets[E]={offs[-1]} is past M_total={m_total} (a's rows)")
    return offs


def check_masked_m(masked_m: torch.Tensor, m_max: int) -> list:
    counts = [int(v) for v in masked_m.cpu().tolist()]
    for e, c in enumerate(counts):
        if c < 0 or c > m_max:
            raise ValueError(f"flashseek: masked_m[{e}]={c} must be in [0, M_max={m_max}]")
    return counts


def grouped_fp8_gemm_contiguous(a, a_scale, b, b_scale, expert_offsets, out):
    """Writes out[offsets[e]:offsets[e+1]] = fp8_gemm(rows of expert e, b[e]); other rows untouched."""
    offs = check_expert_offsets(expert_offsets, a.shape[0])
    for e in range(b.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            out[lo:hi] = fp8_gemm(a[lo:hi], a_scale[lo:hi], b[e], b_scale[e], out.dtype)
    return out


def grouped_fp8_gemm_masked(a, a_scale, b, b_scale, masked_m, out):
    """Writes out[e, :masked_m[e]] = fp8_gemm(a[e, :masked_m[e]], b[e]); other rows untouched."""
    counts = check_masked_m(masked_m, a.shape[1])
    for e in range(b.shape[0]):
        m = counts[e]
        if m > 0:
            out[e, :m] = fp8_gemm(a[e, :m], a_scale[e, :m], b[e], b_scale[e], out.dtype)
    return out
