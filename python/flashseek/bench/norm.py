"""Benchmarks of RMSNorm and the fused residual-add + RMSNorm at DeepSeek-R1's hidden size (7168),
for decode (1, 16, 128 tokens) and prefill (4096 tokens).

Counting: no FLOPs; bytes = what the op must move: fused: read x + residual + weight, write x and
residual; plain: read x + weight, write out. Peer: the eager torch reference (flashseek.ref.norm) on
the same inputs, in the same run; the reference replayed in a CUDA graph is recorded in `extra`
(what the unfused model paid under the engine's graphs).

The norms fused with the FP8 1x128 quantization (rms_norm_quant_fp8, fused_add_rms_norm_quant_fp8)
write e4m3 rows and fp32 scales instead of the 16-bit row; their peer is the unfused pair of kernels
(the norm, then quant_fp8_1x128), both timed as graph replays in the same run.
"""
from __future__ import annotations

import torch

from flashseek import ops
from flashseek.bench.common import BenchContext, Row
from flashseek.ref import norm as ref_norm

HIDDEN = 7168
EPS = 1e-6


def _row(ctx: BenchContext, op: str, kernel, reference, n_in: int, t: int, h: int, nbytes: int) -> Row:
    """Times `kernel` as graph replays and eagerly, and its reference eagerly and as graph replays."""
    us = ctx.time(kernel, n_in, graph=True)
    eager_us = ctx.time(kernel, n_in)
    peer_us = ctx.time(reference, n_in)
    peer_graph_us = ctx.time(reference, n_in, graph=True) if ctx.cuda else None
    return Row("norm", f"{op} T={t} H={h} bf16", dict(op=op, T=t, H=h), us, 0.0, float(nbytes),
               peer="torch eager ref", peer_us=peer_us,
               backend="kernel" if ops.has_cuda_kernel(op) else "reference",
               extra=dict(timing="cuda-graph replay", eager_call_us=eager_us, peer_graph_us=peer_graph_us))


def _quant_row(ctx: BenchContext, op: str, kernel, unfused, n_in: int, t: int, h: int, nbytes: int) -> Row:
    us = ctx.time(kernel, n_in, graph=True)
    peer_us = ctx.time(unfused, n_in, graph=True)
    return Row("norm", f"{op} T={t} H={h} bf16", dict(op=op, T=t, H=h), us, 0.0, float(nbytes),
               peer="unfused kernels (graph)", peer_us=peer_us,
               backend="kernel" if ops.has_cuda_kernel(op) else "reference",
               extra=dict(timing="cuda-graph replay"))


def run_norm(ctx: BenchContext) -> list[Row]:
    dev = ctx.device
    ts = [1, 16, 128, 4096] if ctx.cuda else [1, 16]
    if ctx.quick:
        ts = ts[::2]
    h, dtype = HIDDEN, torch.bfloat16
    w = (1 + 0.1 * torch.randn(h, device=dev)).to(dtype)
    rows: list[Row] = []
    for t in ts:
        # Rotate inputs that would sit in L2 (50 MB on an H100).
        n_in = 8 if 2 * t * h * 2 < (16 << 20) else 2
        xs = [torch.randn(t, h, device=dev).to(dtype) for _ in range(n_in)]
        rs = [torch.randn(t, h, device=dev).to(dtype) for _ in range(n_in)]
        out = torch.empty(t, h, device=dev, dtype=dtype)
        act_bytes, w_bytes = t * h * xs[0].element_size(), h * w.element_size()

        # In place: replays keep adding into the residual and renormalizing x, which stays finite.
        rows.append(_row(ctx, "fused_add_rms_norm",
                         lambda i: torch.ops.flashseek.fused_add_rms_norm(xs[i], rs[i], w, EPS),
                         lambda i: ref_norm.fused_add_rms_norm(xs[i], rs[i], w, EPS),
                         n_in, t, h, 4 * act_bytes + w_bytes))
        rows.append(_row(ctx, "rms_norm",
                         lambda i: torch.ops.flashseek.rms_norm(xs[i], w, EPS, out),
                         lambda i: ref_norm.rms_norm(xs[i], w, EPS),
                         n_in, t, h, 2 * act_bytes + w_bytes))
        if ctx.cuda and ops.has_cuda_kernel("rms_norm_quant_fp8"):
            q = torch.empty(t, h, device=dev, dtype=torch.float8_e4m3fn)
            sc = ops.empty_act_scale(t, h // 128, dev)
            q_bytes = t * h + t * (h // 128) * 4  # e4m3 row + fp32 scales
            rows.append(_quant_row(
                ctx, "fused_add_rms_norm_quant_fp8",
                lambda i: ops.fused_add_rms_norm_quant_fp8(xs[i], rs[i], w, EPS, out=q, scale=sc),
                lambda i: (torch.ops.flashseek.fused_add_rms_norm(xs[i], rs[i], w, EPS),
                           ops.quant_fp8_1x128(xs[i], out=q, scale=sc)),
                n_in, t, h, 3 * act_bytes + w_bytes + q_bytes))
            rows.append(_quant_row(
                ctx, "rms_norm_quant_fp8",
                lambda i: ops.rms_norm_quant_fp8(xs[i], w, EPS, out=q, scale=sc),
                lambda i: (torch.ops.flashseek.rms_norm(xs[i], w, EPS, out), ops.quant_fp8_1x128(out, out=q, scale=sc)),
                n_in, t, h, act_bytes + w_bytes + q_bytes))
    return rows


run = run_norm
