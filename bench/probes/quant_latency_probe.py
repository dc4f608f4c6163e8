"""Session 26 probe (run with bench/probes on PYTHONPATH): per-call latency of the latency-bound FP8 quantizing
kernels of a batch-1 decode step (R1 shapes), each captured as 20 back-to-back calls in a CUDA graph (a
programmatic-dependent chain, so a call's time is its critical path), medians of 5 rounds of graph replays.
Argument: a label for the output."""
import statistics
import sys

import torch

from flashseek import ops
from r1_layers import capture, replay_us

label = sys.argv[1] if len(sys.argv) > 1 else ""
CALLS = 20


def time_graph(g, reps=20):
    return replay_us(g, reps, warmup=3) / CALLS


with torch.inference_mode():
    dev = "cuda"
    x = torch.randn(1, 7168, device=dev).bfloat16()
    res = torch.randn(1, 7168, device=dev).bfloat16()
    w = (1 + 0.1 * torch.randn(7168, device=dev)).bfloat16()
    gu = torch.randn(1, 36864, device=dev).bfloat16()
    e = 257
    gum = torch.randn(e, 1, 4096, device=dev).bfloat16()
    counts = torch.zeros(e, dtype=torch.int32, device=dev)
    counts[torch.randperm(e)[:9]] = 1
    o_lat = torch.randn(128, 1, 512, device=dev).bfloat16()
    w_uv = (torch.randn(128, 512, 128, device=dev) * 0.04).bfloat16()
    cases = {
        "quant_fp8_1x128 1x7168": lambda: ops.quant_fp8_1x128(x),
        "rms_norm_quant_fp8 1x7168": lambda: ops.rms_norm_quant_fp8(x, w, 1e-6),
        "fused_add_rms_norm_quant_fp8 1x7168": lambda: ops.fused_add_rms_norm_quant_fp8(x, res, w, 1e-6),
        "silu_mul_quant_fp8 1x36864": lambda: ops.silu_mul_quant_fp8(gu),
        "silu_mul_quant_fp8 masked 9/257": lambda: ops.silu_mul_quant_fp8(gum.view(e, 4096), masked_m=counts),
        "mla_head_gemv_quant_fp8 128x1x512x128": lambda: ops.mla_head_gemv_quant_fp8(o_lat, w_uv),
    }
    graphs = {k: capture(f, CALLS) for k, f in cases.items()}
    times = {k: [] for k in cases}
    for _ in range(5):
        for k, g in graphs.items():
            times[k].append(time_graph(g))
    for k, ts in times.items():
        print(f"[{label}] {k:40s} {statistics.median(ts):6.2f} us/call")
