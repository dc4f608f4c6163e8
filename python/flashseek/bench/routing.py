"""Benchmarks of the fused top-k routers (DeepSeek-R1 noaux_tc shape: E=256, 8 groups, top-4
groups, top-8; plus softmax top-8 of 256).

Counting: no FLOPs; bytes = logits + bias + weights + ids (the minimum any router moves).
Peer: the eager torch reference (flashseek.ref.routing) on the same inputs, in the same run.
"""
from __future__ import annotations

import torch

from flashseek import ops
from flashseek.bench.common import BenchContext, Row
from flashseek.ref import routing as ref_routing

R1 = dict(e=256, n_group=8, topk_group=4, topk=8, scale=2.5)


def _inputs(t, e, device, n, dtype):
    return [(torch.randn(t, e, device=device).to(dtype), torch.randn(e, device=device) * 0.05) for _ in range(n)]


def run_routing(ctx: BenchContext) -> list[Row]:
    dev = ctx.device
    ts = [1, 64, 1024, 8192, 16384] if ctx.cuda else [1, 64]
    if ctx.quick:
        ts = ts[::2]
    e, ng, tg, k, sc = R1["e"], R1["n_group"], R1["topk_group"], R1["topk"], R1["scale"]
    rows: list[Row] = []
    for dtype in (torch.float32, torch.bfloat16):
        for t in ts:
            n_in = 8 if t * e * 4 < (8 << 20) else 2  # rotate inputs that would sit in L2
            inp = _inputs(t, e, dev, n_in, dtype)
            w = torch.empty(t, k, device=dev)
            ids = torch.empty(t, k, device=dev, dtype=torch.int32)

            def fs(i):
                torch.ops.flashseek.route_noaux_tc(inp[i][0], inp[i][1], ng, tg, k, sc, True, w, ids)

            def peer(i):
                ref_routing.route_noaux_tc(inp[i][0], inp[i][1], ng, tg, k, sc, True)

            us = ctx.time(fs, n_in, graph=True)
            eager_us = ctx.time(fs, n_in)
            peer_us = ctx.time(peer, n_in)
            nbytes = t * e * inp[0][0].element_size() + e * 4 + t * k * 8
            rows.append(Row("routing", f"noaux_tc T={t} E={e} g={ng}/{tg} k={k} {str(dtype)[6:]}",
                            dict(op="route_noaux_tc", T=t, E=e, n_group=ng, topk_group=tg, topk=k,
                                 dtype=str(dtype)), us, 0.0, nbytes, peer="torch eager ref", peer_us=peer_us,
                            backend="kernel" if ops.has_cuda_kernel("route_noaux_tc") else "reference",
                            extra=dict(timing="cuda-graph replay", eager_call_us=eager_us)))
    for t in ts:
        n_in = 8 if t * e * 2 < (8 << 20) else 2
        inp = _inputs(t, e, dev, n_in, torch.bfloat16)
        w = torch.empty(t, k, device=dev)
        ids = torch.empty(t, k, device=dev, dtype=torch.int32)
        def fs_softmax(i):
            torch.ops.flashseek.route_softmax_topk(inp[i][0], k, True, w, ids)

        us = ctx.time(fs_softmax, n_in, graph=True)
        eager_us = ctx.time(fs_softmax, n_in)
        peer_us = ctx.time(lambda i: ref_routing.route_softmax_topk(inp[i][0], k, True), n_in)
        rows.append(Row("routing", f"softmax T={t} E={e} k={k} bfloat16",
                        dict(op="route_softmax_topk", T=t, E=e, topk=k), us, 0.0, t * e * 2 + t * k * 8,
                        peer="torch eager ref", peer_us=peer_us,
                        backend="kernel" if ops.has_cuda_kernel("route_softmax_topk") else "reference",
                        extra=dict(timing="cuda-graph replay", eager_call_us=eager_us)))
    rows += _gate_rows(ctx)
    rows += _router_logits_rows(ctx)
    return rows


def _router_logits_rows(ctx: BenchContext) -> list[Row]:
    """router_logits (the model's router GEMM since session 9) against the bf16 matmul + .float() it
    replaced, R1 gate (256 x 7168), CUDA-graph replays in the same run, weights rotated out of L2."""
    dev = ctx.device
    h, e = 7168, R1["e"]
    ts = [1, 2, 4, 8, 32] if ctx.cuda else [1, 4]
    n_in = 24 if ctx.cuda else 1
    ws = [(torch.randn(e, h, device=dev) * 0.02).to(torch.bfloat16) for _ in range(n_in)]
    rows: list[Row] = []
    for t in ts:
        xs = [torch.randn(t, h, device=dev).to(torch.bfloat16) for _ in range(n_in)]
        out = torch.empty(t, e, device=dev)
        us = ctx.time(lambda i: ops.router_logits(xs[i], ws[i], out=out), n_in, graph=ctx.cuda)
        peer_us = ctx.time(lambda i: (xs[i] @ ws[i].t()).float(), n_in, graph=ctx.cuda)
        path = "kernel" if t <= ops.ROUTER_LOGITS_MAX_T else "GEMM, fp32 out"
        rows.append(Row("routing", f"router_logits T={t} H={h} E={e} ({path})",
                        dict(op="router_logits", T=t, H=h, E=e), us, 2.0 * t * e * h, e * h * 2 + t * h * 2 + t * e * 4,
                        peer="bf16 matmul + .float() (graph)", peer_us=peer_us,
                        backend="kernel" if ops.has_cuda_kernel("router_logits") else "reference",
                        extra=dict(peak="bf16_tflops", timing="cuda-graph replay, both" if ctx.cuda else "eager")))
    return rows


def _gate_rows(ctx: BenchContext) -> list[Row]:
    """route_noaux_tc_gate vs the model's path (bf16 GEMM -> .float() -> route_noaux_tc), R1 shapes,
    both timed as CUDA-graph replays in the same run. Inputs rotate over enough (hidden, gate weight)
    pairs (24 x 3.7 MB) that the weight streams from HBM, as it does layer after layer in a model."""
    dev = ctx.device
    h = 7168
    e, ng, tg, k, sc = R1["e"], R1["n_group"], R1["topk_group"], R1["topk"], R1["scale"]
    ts = [1, 4, 16, 32, 64] if ctx.cuda else [1, 4]
    if ctx.quick:
        ts = ts[::2]
    n_in = 24 if ctx.cuda else 1
    ws = [(torch.randn(e, h, device=dev) * 0.02).to(torch.bfloat16) for _ in range(n_in)]
    bias = torch.randn(e, device=dev) * 0.05
    rows: list[Row] = []
    for t in ts:
        xs = [torch.randn(t, h, device=dev).to(torch.bfloat16) for _ in range(n_in)]
        w = torch.empty(t, k, device=dev)
        ids = torch.empty(t, k, device=dev, dtype=torch.int32)
        lg = torch.empty(t, e, device=dev)

        def fused(i):
            torch.ops.flashseek.route_noaux_tc_gate(xs[i], ws[i], bias, ng, tg, k, sc, True, w, ids, lg)

        def model_path(i):
            logits = (xs[i] @ ws[i].t()).float()
            torch.ops.flashseek.route_noaux_tc(logits, bias, ng, tg, k, sc, True, w, ids)

        us = ctx.time(fused, n_in, graph=True)
        peer_us = ctx.time(model_path, n_in, graph=True)
        nbytes = e * h * 2 + t * h * 2 + e * 4 + t * (e * 4 + k * 8)
        rows.append(Row("routing", f"noaux_tc+gate T={t} H={h} E={e} g={ng}/{tg} k={k}",
                        dict(op="route_noaux_tc_gate", T=t, H=h, E=e, n_group=ng, topk_group=tg, topk=k),
                        us, 2.0 * t * e * h, nbytes, peer="bf16 matmul + .float() + route_noaux_tc (graph)",
                        peer_us=peer_us,
                        backend="kernel" if ops.has_cuda_kernel("route_noaux_tc_gate") else "reference",
                        extra=dict(peak="bf16_tflops", timing="cuda-graph replay, both", speedup_vs_peer=peer_us / us if us else None)))
    return rows


run = run_routing
