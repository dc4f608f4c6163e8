"""The absorbed MLA's per-head projections at R1's shapes (W_UK: [128, T, 128] @ [128, 128, 512]; W_UV^T:
[128, T, 512] @ [128, 512, 128], the latter also with o_proj's FP8 quantization) against torch.bmm (+
quant_fp8_1x128), as CUDA-graph replays of 20 calls, for T tokens. Usage: python bench/probes/head_gemv_tokens.py
Session 13 used it (with bench/probes/layer_ab.py) to set MLA_HEAD_GEMV_KERNEL_MAX_T."""
import os

import torch

from flashseek import ops
from flashseek.bench.common import time_graph_us


def graph_us(fn):
    return time_graph_us(lambda i: fn(), torch.device("cuda"))


h = 128
tokens = [int(t) for t in os.environ.get("TOKENS", "1,4,8,9,12,16").split(",")]
w_uk = torch.randn(h, 128, 512, device="cuda", dtype=torch.bfloat16) / 11
w_uv_t = torch.randn(h, 512, 128, device="cuda", dtype=torch.bfloat16) / 22
for t in tokens:
    q_nope = torch.randn(t, h, 128, device="cuda", dtype=torch.bfloat16)
    o_lat = torch.randn(t, h, 512, device="cuda", dtype=torch.bfloat16)
    a_uk, a_uv = q_nope.transpose(0, 1), o_lat.transpose(0, 1)
    out_uk = torch.empty(h, t, 512, device="cuda", dtype=torch.bfloat16)
    row = [f"T={t:2d}"]
    if t <= ops.MLA_HEAD_GEMV_MAX_T:
        row.append(f"W_UK gemv {graph_us(lambda: ops.mla_head_gemv(a_uk, w_uk, out_uk)):6.1f}")
        row.append(f"W_UV^T gemv+quant {graph_us(lambda: ops.mla_head_gemv_quant_fp8(a_uv, w_uv_t)):6.1f}")
    row.append(f"W_UK bmm {graph_us(lambda: torch.bmm(a_uk, w_uk, out=out_uk)):6.1f}")
    row.append(f"W_UV^T bmm+quant {graph_us(lambda: ops.quant_fp8_1x128(torch.bmm(a_uv, w_uv_t).transpose(0, 1).reshape(t, -1))):6.1f}")
    print("  ".join(row), "us")
