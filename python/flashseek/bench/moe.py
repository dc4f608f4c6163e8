"""Benchmarks of the fused MoE layer (route -> align -> scatter+quant -> grouped GEMM 1 ->
silu_mul_quant -> grouped GEMM 2 -> combine) on DeepSeek-R1 shapes with random FP8 experts.

Every row includes DeepSeek's shared expert (stacked last, `fused_moe(n_shared_experts=1)`), as the
issue's roofline does (rows before commit 'fused_moe: the shared expert inside the grouped GEMMs' were
routed experts only). Counting: FLOPs = T * (topk + 1) * 6 * H * I (both GEMMs over the routed rows and
the shared expert's); bytes = the FP8 weight bytes (with scales) of the distinct experts the batch
touches plus the shared expert: the decode roofline of performance-targets.md. Peer: the torch
reference MoE in the same run: eager routing, then one dequantized bf16 GEMM chain per touched expert
and one for the shared expert (weights dequantized to bf16 once, outside timing).
Each row carries a per-stage breakdown (each stage timed alone on the same intermediates). On the
masked layout with T <= ops.MOE_ROUTE_DISPATCH_MAX_T, fused_moe runs the one-launch front end
"route_dispatch" in place of "route" + "align" + "scatter_quant"; those three are still timed there, for
comparison with that chain (so the stages of such a row add up to more than the call).
"""
from __future__ import annotations

import torch

from flashseek import ops
from flashseek.bench.common import BenchContext, Row
from flashseek.ref import moe as ref_moe
from flashseek.ref import routing as ref_routing

FP8 = torch.float8_e4m3fn
R1 = dict(e=256, h=7168, inter=2048, n_group=8, topk_group=4, topk=8, scale=2.5)
TINY = dict(e=16, h=256, inter=256, n_group=4, topk_group=2, topk=4, scale=2.5)


def _rand_fp8(shape, device):
    """Random finite e4m3 in about [-2, 2] from raw bytes (no float32 copy of 11 GB of weights)."""
    mag = torch.randint(0x08, 0x40, shape, dtype=torch.uint8, device=device)
    sign = torch.randint(0, 2, shape, dtype=torch.uint8, device=device) << 7
    return (mag | sign).view(FP8)


def _experts(e, n, k, device):
    w = torch.empty((e, n, k), dtype=FP8, device=device)
    for i in range(e):  # one expert at a time keeps the temporaries small
        w[i] = _rand_fp8((n, k), device)
    s = torch.rand((e, (n + 127) // 128, k // 128), device=device) * 2e-3 + 1e-3
    return w, s


def _dequant_bf16(w, s):
    out = torch.empty(w.shape, dtype=torch.bfloat16, device=w.device)
    n, k = w.shape[1:]
    for i in range(w.shape[0]):
        full = s[i].repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        out[i] = (w[i].float() * full).to(torch.bfloat16)
    return out


def _peer_moe(hidden, logits, bias, w13b, w2b, c):
    """HF-style eager MoE: route, then per touched expert two bf16 GEMMs, index_add combine, plus the
    shared expert (the stacks' last entry) on every token."""
    w, ids = ref_routing.route_noaux_tc(logits, bias, c["n_group"], c["topk_group"], c["topk"], c["scale"], True)
    t, h = hidden.shape
    inter = w2b.shape[2]
    n_routed = w13b.shape[0] - 1
    flat = ids.flatten().long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_routed).tolist()
    tok = order // c["topk"]
    wt = w.flatten()[order].unsqueeze(1)
    out = torch.zeros(t, h, dtype=torch.float32, device=hidden.device)
    start = 0
    for e, cnt in enumerate(counts):
        if cnt == 0:
            continue
        sl = slice(start, start + cnt)
        gu = hidden[tok[sl]] @ w13b[e].t()
        y = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]) @ w2b[e].t()
        out.index_add_(0, tok[sl], y.float() * wt[sl])
        start += cnt
    gu = hidden @ w13b[n_routed].t()
    out += ((torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]) @ w2b[n_routed].t()).float()
    return out.to(torch.bfloat16)


def _stage_fns(hidden, logits, bias, w13, w13_s, w2, w2_s, c, layout):
    """The fused_moe pipeline (n_shared_experts=1: the stacks' last expert is the shared one) split into
    stages over preallocated intermediates."""
    t, h = hidden.shape
    e_all, i2, _ = w13.shape
    e = e_all - 1
    inter = i2 // 2
    k = c["topk"]
    dev = hidden.device
    w, ids = ops.route_noaux_tc(logits, bias, c["n_group"], c["topk_group"], k, c["scale"])
    st = {}
    st["route"] = lambda i: ops.route_noaux_tc(logits, bias, c["n_group"], c["topk_group"], k, c["scale"],
                                               topk_weights=w, topk_ids=ids)
    if layout == "masked":
        masked_m = torch.full((e_all,), t, dtype=torch.int32, device=dev)  # the shared expert's count: T
        slots = torch.empty(t, k, dtype=torch.int32, device=dev)
        st["align"] = lambda i: torch.ops.flashseek.moe_align_masked(ids, e, t, None, masked_m[:e], slots)
        st["align"](0)
        # The routed slots plus the shared expert's row t for token t, as fused_moe scatters them.
        scatter_slots = torch.cat([slots, ref_moe.shared_expert_rows(t, e, 1, t, dev)], 1)
        a = torch.empty((e_all, t, h), dtype=FP8, device=dev)
        a_s = ops.empty_grouped_act_scale(e_all, t, h // 128, dev)
        gu = torch.empty((e_all, t, i2), dtype=torch.bfloat16, device=dev)
        act, act_s = ops.silu_mul_quant_fp8(gu.view(e_all * t, i2))
        down = torch.empty((e_all, t, h), dtype=torch.bfloat16, device=dev)
        st["scatter_quant"] = lambda i: ops.moe_scatter_quant(hidden, scatter_slots, a, a_s)
        if t <= ops.MOE_ROUTE_DISPATCH_MAX_T:  # what fused_moe runs instead of the three stages above
            fw, fids = torch.empty_like(w), torch.empty_like(ids)
            fm, fslots = torch.empty_like(masked_m), torch.empty_like(slots)
            st["route_dispatch"] = lambda i: torch.ops.flashseek.moe_route_dispatch(
                hidden, logits, bias, c["n_group"], c["topk_group"], k, c["scale"], True, None, fw, fids, fm, fslots,
                a, a_s, 1)
        st["gemm1"] = lambda i: ops.grouped_fp8_gemm_masked(a, a_s, w13, w13_s, masked_m, out=gu)
        st["silu_mul_quant"] = lambda i: ops.silu_mul_quant_fp8(gu.view(e_all * t, i2), out=act, scale=act_s,
                                                                masked_m=masked_m)
        st["gemm2"] = lambda i: ops.grouped_fp8_gemm_masked(act.view(e_all, t, inter),
                                                            act_s.unflatten(0, (e_all, t)), w2, w2_s, masked_m,
                                                            out=down)
        shared = down[e]
    else:
        rows = ops.moe_align_max_rows(t * k, e, ops.FUSED_MOE_BLOCK_M)
        sorted_ids, bexp, offs, slots = ops.moe_align(ids, e, ops.FUSED_MOE_BLOCK_M, max_rows=rows)
        st["align"] = lambda i: torch.ops.flashseek.moe_align(ids, e, ops.FUSED_MOE_BLOCK_M, None, sorted_ids, bexp,
                                                              offs, slots)
        a = torch.empty((rows, h), dtype=FP8, device=dev)
        a_s = ops.empty_act_scale(rows, h // 128, dev)
        gu = torch.empty((rows, i2), dtype=torch.bfloat16, device=dev)
        act, act_s = ops.silu_mul_quant_fp8(gu)
        down = torch.empty((rows, h), dtype=torch.bfloat16, device=dev)
        st["scatter_quant"] = lambda i: ops.moe_scatter_quant(hidden, slots, a, a_s)
        st["gemm1"] = lambda i: ops.grouped_fp8_gemm_contiguous(a, a_s, w13[:e], w13_s[:e], offs, out=gu)
        st["silu_mul_quant"] = lambda i: ops.silu_mul_quant_fp8(gu, out=act, scale=act_s)
        st["gemm2"] = lambda i: ops.grouped_fp8_gemm_contiguous(act, act_s, w2[:e], w2_s[:e], offs, out=down)
        shared = torch.empty((t, h), dtype=torch.bfloat16, device=dev)

        def shared_expert(i):
            x_q, x_s = ops.quant_fp8_1x128(hidden)
            s_act, s_act_s = ops.silu_mul_quant_fp8(ops.fp8_gemm(x_q, x_s, w13[e], w13_s[e]))
            ops.fp8_gemm(s_act, s_act_s, w2[e], w2_s[e], out=shared)

        st["shared_expert"] = shared_expert
    out = torch.empty((t, h), dtype=torch.bfloat16, device=dev)
    st["combine"] = lambda i: ops.moe_combine(down, w, slots, shared, out=out)
    return st


def run_moe(ctx: BenchContext) -> list[Row]:
    dev = ctx.device
    c = R1 if ctx.cuda else TINY
    if ctx.cuda:
        ts = [1, 8, 32, 128, 256, 4096, 16384] if not ctx.quick else [1, 32, 256, 4096]
    else:
        ts = [1, 8]
    e, h, inter, k = c["e"], c["h"], c["inter"], c["topk"]
    # e routed experts and the shared expert, last (fused_moe's n_shared_experts=1 layout).
    w13, w13_s = _experts(e + 1, 2 * inter, h, dev)
    w2, w2_s = _experts(e + 1, h, inter, dev)
    w13b, w2b = _dequant_bf16(w13, w13_s), _dequant_bf16(w2, w2_s)
    per_expert = (w13[0].numel() + w2[0].numel()) + 4 * (w13_s[0].numel() + w2_s[0].numel())
    backend = "kernel" if all(ops.has_cuda_kernel(n) for n in (
        "route_noaux_tc", "moe_align", "moe_scatter_quant", "moe_combine", "grouped_fp8_gemm_masked",
        "grouped_fp8_gemm_contiguous", "silu_mul_quant_fp8", "moe_route_dispatch")) else "reference"
    rows: list[Row] = []
    for t in ts:
        hidden = torch.randn(t, h, device=dev).to(torch.bfloat16)
        logits = torch.randn(t, e, device=dev)
        bias = torch.randn(e, device=dev) * 0.05
        kw = dict(n_group=c["n_group"], topk_group=c["topk_group"], topk=k, routed_scaling_factor=c["scale"])
        peer_us = ctx.time(lambda i: _peer_moe(hidden, logits, bias, w13b, w2b, c))
        ref = _peer_moe(hidden, logits, bias, w13b, w2b, c)
        _, ids = ops.route_noaux_tc(logits, bias, c["n_group"], c["topk_group"], k, c["scale"])
        touched = int(torch.unique(ids).numel())
        auto = "masked" if t <= ops.FUSED_MOE_MASKED_MAX_T else "contiguous"
        # Decode sizes run both layouts, so the "auto" threshold can be set from measurements.
        for layout in (["masked", "contiguous"] if t <= 256 else ["contiguous"]):
            def fs(i, layout=layout):
                ops.fused_moe(hidden, logits, bias, w13, w13_s, w2, w2_s, **kw, layout=layout, n_shared_experts=1)

            # Decode steps run from CUDA graphs in an engine (the path has no host sync), so they are
            # timed as graph replays; the eager whole-call time, host overhead included, is kept too.
            decode = t <= 256 and ctx.cuda
            us = ctx.time(fs, graph=decode)
            eager_us = ctx.time(fs) if decode else us
            stages = {name: ctx.time(fn, graph=decode) for name, fn in _stage_fns(
                hidden, logits, bias, w13, w13_s, w2, w2_s, c, layout).items()}
            out = ops.fused_moe(hidden, logits, bias, w13, w13_s, w2, w2_s, **kw, layout=layout, n_shared_experts=1)
            err = float((out.double() - ref.double()).norm() / ref.double().norm().clamp(min=1e-30))
            tag = "*" if layout == auto else ""  # * = the layout "auto" picks
            rows.append(Row("moe", f"T={t} E{e}+1 shared H{h} I{inter} k{k} {layout}{tag}",
                            dict(T=t, E=e, shared=1, H=h, I=inter, topk=k, layout=layout, auto=layout == auto), us,
                            float(t * (k + 1) * 6 * h * inter), float((touched + 1) * per_expert),
                            peer="torch bf16 MoE",
                            peer_us=peer_us, backend=backend,
                            extra=dict(stage_us=stages, experts_touched=touched, rel_err_vs_peer=err,
                                       peak="fp8_tflops", eager_call_us=eager_us,
                                       timing="cuda-graph replay" if decode else "eager")))
    return rows


run = run_moe
