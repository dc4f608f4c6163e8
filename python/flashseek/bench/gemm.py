"""Benchmarks of the FP8 quantization kernels and the FP8 block-scaled GEMMs (dense and grouped).

Rows follow ../shared/docs/performance-targets.md. Every GEMM row also times torch's cuBLASLt
block-wise `scaled_mm` on the same inputs (a loop over the non-empty experts for the grouped forms)
and records it as the peer; quantization rows use the eager torch reference as the peer.
Counting: FLOPs = 2*M*N*K over valid rows; bytes = A + B (+ scales) + out, where B counts only the
experts that received rows.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from flashseek import ops
from flashseek.bench.common import BenchContext, Row
from flashseek.ref import quant as ref_quant

FP8 = torch.float8_e4m3fn


# ----------------------------------------------------------------------------------- inputs
def _rand_fp8(shape, device) -> torch.Tensor:
    """Random finite e4m3 values without a float32 intermediate (big expert stacks)."""
    mag = torch.randint(0, 0x7E, shape, dtype=torch.uint8, device=device)  # 0x7F is NaN
    sign = torch.randint(0, 2, shape, dtype=torch.uint8, device=device) << 7
    return (mag | sign).view(FP8)


def _act(m, k, device):
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    return ops.quant_fp8_1x128(x)


def _weight(n, k, device, e: Optional[int] = None):
    lead = () if e is None else (e,)
    q = _rand_fp8(lead + (n, k), device)
    s = torch.rand(lead + ((n + 127) // 128, k // 128), device=device) / 448 + 1e-3
    return q, s


# ------------------------------------------------------------------------------------- peer
def _peer_fn(a, sa, b, sb):
    """torch block-wise scaled_mm closure for out = a @ b^T, or None where this torch lacks it."""
    try:
        import torch.nn.functional as F
        from torch.nn.functional import ScalingType
    except ImportError:
        return None
    m, k = a.shape
    n = b.shape[0]
    kb, nb = k // 128, (n + 127) // 128
    sa_t = torch.empty(kb, m, device=a.device).t()  # [M, K/128], stride (1, M)
    sa_t.copy_(sa)
    l4 = (kb + 3) // 4 * 4
    sb_buf = torch.zeros(nb, l4, device=a.device)
    sb_buf[:, :kb] = sb
    sb_t = sb_buf[:, :kb].t()  # [K/128, N/128], stride (1, L4)

    def run():
        return F.scaled_mm(a, b.t(), sa_t, ScalingType.BlockWise1x128, sb_t, ScalingType.BlockWise128x128,
                           output_dtype=torch.bfloat16)

    try:
        run()
    except Exception:
        return None
    return run


def _time_peer(ctx, fns, graph: bool = False, extra: Optional[dict] = None) -> Optional[float]:
    """The peer calls fns (one per expert for the grouped forms) timed together, or None where any is
    missing. graph=True times them as CUDA-graph replays, as the decode rows time ours; a cuBLASLt path
    that cannot be captured gives no peer, its exception's name in extra["peer_graph_error"]."""
    if not ctx.cuda or not fns or any(f is None for f in fns):
        return None

    def loop(i):
        for f in fns:
            f()

    if not graph:
        return ctx.time(loop)
    try:
        return ctx.time(loop, 1, graph=True)
    except Exception as exc:  # no same-mode peer
        if extra is not None:
            extra["peer_graph_error"] = type(exc).__name__
        return None


@contextlib.contextmanager
def _env(name: str, value: str):
    """Sets an environment override the GEMM dispatch reads on every call (same-run A/B rows)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _backend(name):
    return "kernel" if ops.has_cuda_kernel(name) else "reference"


# -------------------------------------------------------------------------------- dense GEMM
GEMM_CASES = [(64, 2112, 7168), (128, 7168, 16384), (4096, 2112, 7168), (4096, 7168, 16384),
              (4096, 24576, 1536), (8192, 4096, 7168),
              # DeepSeek-R1 decode projections at batch 1 and 16: fused q_a/kv_a, q_b, o_proj, dense
              # gate+up and down (weight streams: the copy bandwidth is their ceiling).
              (1, 2112, 7168), (1, 24576, 1536), (1, 7168, 16384), (1, 36864, 7168), (1, 7168, 18432),
              (16, 36864, 7168),
              # q_b at batch 16: the two decode kernels tie alone, the stream-K one (the dispatch's pick since
              # session 13) overlaps its launch in the layer; the row records both kernels' graph times.
              (16, 24576, 1536)]
GEMM_CASES_QUICK = [(64, 2112, 7168), (4096, 7168, 16384)]
GEMM_CASES_CPU = [(16, 256, 512), (64, 576, 1024)]


def _gemm_path(m, n, k, ctx) -> str:
    """The kernel fp8_gemm_dispatch.cu picks (docs/gemm-design.md), without the env overrides."""
    sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count if ctx.cuda else 132
    if m <= 64 and (n * k >= 1 << 27 or (m <= 16 and k >= 1536)):
        units = (n + 127) // 128 * (k // 128)
        return f"skinny 128x64x128 stream-k over {min(sms, units)} CTAs"
    if m <= 128:
        tiles = (n + 127) // 128 * ((m + 63) // 64)
        split = max([d for d in range(1, min(16, k // 128) + 1) if (k // 128) % d == 0 and tiles * d <= sms] or [1])
        if split == 1 and m > 64:
            return "swap_ab 128x64 1x2-cluster"
        return f"swap_ab 128x64 split-k {split}"
    tiles = ((m + 127) // 128 + 1) // 2 * 2 * ((n + 127) // 128)
    wave = max(sms // 2 * 2, 2)
    tail = tiles % wave
    if k // 128 > 8 and tail != 0 and 2 * tail < wave:
        return "128x128x128 coop 2x1 stream-k"
    return "128x128x128 coop 2x1 persistent"


def run_gemm(ctx: BenchContext) -> list[Row]:
    cases = (GEMM_CASES_QUICK if ctx.quick else GEMM_CASES) if ctx.cuda else GEMM_CASES_CPU
    rows = []
    for m, n, k in cases:
        # Rotate inputs so that small problems are not timed out of L2.
        n_inputs = 1 if m * k + n * k > (64 << 20) else 4
        inputs = [(*_act(m, k, ctx.device), *_weight(n, k, ctx.device)) for _ in range(n_inputs)]
        out = torch.empty(m, n, dtype=torch.bfloat16, device=ctx.device)
        call = lambda i: ops.fp8_gemm(*inputs[i], out=out)  # noqa: E731
        peer = _peer_fn(*inputs[0]) if ctx.cuda else None
        if peer and m > 128:  # compute-bound: ours and the peer in alternating rounds
            t = ctx.time_alternating({"ours": call, "peer": lambda i: peer()}, n_inputs)
            us, peer_us = t["ours"], t["peer"]
        else:
            us = ctx.time(call, n_inputs)
            peer_us = _time_peer(ctx, [peer]) if peer else None
        kb = k // 128
        nbytes = m * k + n * k + m * kb * 4 + ((n + 127) // 128) * kb * 4 + m * n * 2
        extra = {"path": _gemm_path(m, n, k, ctx)}
        label = f"{m}x{n}x{k}"
        if ctx.cuda and m <= 128:
            # Decode-sized calls timed one by one measure the host's launch rate (~25 us a call),
            # not the kernel; an engine replays them in a CUDA graph. The row reports graph replays for
            # both sides, the single-call times stay in extra.
            extra["single_call_us"], extra["peer_single_call_us"] = us, peer_us
            us = ctx.time(call, n_inputs, graph=True)
            label += " graph"
            if m <= 64:  # both decode kernels, same inputs, same run (the dispatch picks one by shape)
                for name, flag in (("skinny", "1"), ("cutlass", "0")):
                    with _env("FLASHSEEK_GEMM_SKINNY", flag):
                        extra[f"{name}_graph_us"] = ctx.time(call, n_inputs, graph=True)
            peer_us = _time_peer(ctx, [peer], graph=True, extra=extra)
        rows.append(Row("gemm", label, {"m": m, "n": n, "k": k}, us, 2.0 * m * n * k, nbytes,
                        peer="torch scaled_mm blockwise" if peer_us else None, peer_us=peer_us,
                        backend=_backend("fp8_gemm"), extra=extra))
    return rows


# ------------------------------------------------------------------------------ grouped GEMM
def _contiguous_row(ctx, e, rows_per, n, k) -> Row:
    m = e * rows_per
    a, sa = _act(m, k, ctx.device)
    b, sb = _weight(n, k, ctx.device, e)
    offs = torch.arange(0, m + 1, rows_per, dtype=torch.int32, device=ctx.device)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=ctx.device)
    call = lambda i: ops.grouped_fp8_gemm_contiguous(a, sa, b, sb, offs, out=out)  # noqa: E731
    peers = [_peer_fn(a[g * rows_per:(g + 1) * rows_per], sa[g * rows_per:(g + 1) * rows_per], b[g], sb[g])
             for g in range(e)] if ctx.cuda else []
    if peers and all(p is not None for p in peers):  # compute-bound: ours and the peer alternate
        t = ctx.time_alternating({"ours": call, "peer": lambda i: [p() for p in peers]})
        us, peer_us = t["ours"], t["peer"]
    else:
        us, peer_us = ctx.time(call), None
    kb = k // 128
    nbytes = m * k + e * n * k + m * kb * 4 + e * ((n + 127) // 128) * kb * 4 + m * n * 2
    return Row("grouped", f"contiguous {e}x{rows_per} n={n} k={k}", {"e": e, "rows": rows_per, "n": n, "k": k},
               us, 2.0 * m * n * k, nbytes, peer="torch scaled_mm blockwise, loop over experts" if peer_us else None,
               peer_us=peer_us, backend=_backend("grouped_fp8_gemm_contiguous"),
               extra={"path": "128x128x128 coop 1x2 grouped"})


def _routed_counts(tokens, experts, topk, gen):
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)])
    return torch.bincount(ids.flatten(), minlength=experts)


def _masked_rows(ctx, tokens, weights) -> list[Row]:
    e = 256
    gen = torch.Generator().manual_seed(tokens)
    counts = _routed_counts(tokens, e, 8, gen)
    m_max = tokens  # a token reaches an expert at most once
    masked_m = counts.to(torch.int32).to(ctx.device)
    rows = []
    for name, (b, sb) in weights.items():
        _, n, k = b.shape
        kb = k // 128
        a = _rand_fp8((e, m_max, k), ctx.device)
        sa = ops.empty_grouped_act_scale(e, m_max, kb, ctx.device).fill_(1.0 / 448)
        out = torch.empty(e, m_max, n, dtype=torch.bfloat16, device=ctx.device)
        call = lambda i: ops.grouped_fp8_gemm_masked(a, sa, b, sb, masked_m, out=out)  # noqa: E731
        # Decode steps (up to 64 tokens an expert) are CUDA-graph replays, as the dense decode rows are: an
        # engine replays the MoE step in a graph, and one eager call at a time adds a few µs of launch and
        # event overhead to a 40-90 µs kernel (session 14: 49.2 eager against 45.7 as a graph). The eager
        # time stays in extra.
        decode = m_max <= 64
        us = ctx.time(call, graph=decode)
        alt = {}
        if decode and ctx.cuda:
            alt["eager_us"] = ctx.time(call)
            with _env("FLASHSEEK_GEMM_SKINNY", "0"):  # the CUTLASS swapped kernel, same inputs, same run
                alt["cutlass_us"] = ctx.time(call, graph=True)
        touched = [g for g in range(e) if counts[g] > 0]
        peers = [_peer_fn(a[g, :counts[g]], sa[g, :counts[g]], b[g], sb[g]) for g in touched] if ctx.cuda else []
        peer_us = _time_peer(ctx, peers, graph=decode, extra=alt)
        valid = int(counts.sum())
        w_bytes = len(touched) * (n * k + ((n + 127) // 128) * kb * 4)
        nbytes = w_bytes + valid * (k + kb * 4 + n * 2)
        bw = ctx.ceilings.get("copy_tbps")
        roof_us = nbytes / (bw * 1e6) if bw else None
        label = f"masked {name} tokens={tokens} experts={len(touched)}" + (" graph" if decode and ctx.cuda else "")
        rows.append(Row("grouped", label,
                        {"tokens": tokens, "e": e, "m_max": m_max, "n": n, "k": k, "experts_touched": len(touched)},
                        us, 2.0 * valid * n * k, nbytes,
                        peer="torch scaled_mm blockwise, loop over experts" if peer_us else None, peer_us=peer_us,
                        backend=_backend("grouped_fp8_gemm_masked"),
                        extra={"roofline_us": roof_us, "x_roofline": (us / roof_us) if roof_us else None,
                               "target_x_roofline": 1.25,
                               "path": "skinny 128x64x128 stream-k" if m_max <= 64 else "128x128x128 coop 1x2",
                               **alt}))
        del a, sa, out
    return rows


def run_grouped(ctx: BenchContext) -> list[Row]:
    rows = []
    if not ctx.cuda:
        rows.append(_contiguous_row(ctx, 2, 32, 256, 512))
        gen = torch.Generator().manual_seed(0)
        e, m_max, n, k = 4, 8, 256, 512
        a = _rand_fp8((e, m_max, k), ctx.device)
        sa = ops.empty_grouped_act_scale(e, m_max, k // 128, ctx.device).fill_(1.0 / 448)
        b, sb = _weight(n, k, ctx.device, e)
        masked_m = torch.randint(0, m_max + 1, (e,), generator=gen, dtype=torch.int32)
        out = torch.empty(e, m_max, n, dtype=torch.bfloat16)
        us = ctx.time(lambda i: ops.grouped_fp8_gemm_masked(a, sa, b, sb, masked_m, out=out))
        valid = int(masked_m.sum())
        rows.append(Row("grouped", f"masked e={e} m_max={m_max} n={n} k={k}", {"e": e, "n": n, "k": k}, us,
                        2.0 * valid * n * k, e * n * k + valid * (k + 2 * n), backend="reference"))
        return rows
    rows.append(_contiguous_row(ctx, 8, 4096, 4096, 7168))
    if not ctx.quick:
        rows.append(_contiguous_row(ctx, 4, 8192, 4096, 7168))
    # DeepSeek routed experts: 256 local experts, top-8; gate+up (N 4096, K 7168) and down (N 7168, K 2048).
    weights = {"gate_up": _weight(4096, 7168, ctx.device, 256), "down": _weight(7168, 2048, ctx.device, 256)}
    for tokens in ((1, 64) if ctx.quick else (1, 16, 64, 128, 256)):
        rows += _masked_rows(ctx, tokens, weights)
    del weights
    return rows


# ------------------------------------------------------------------------------ quantization
QUANT_CASES = [("quant", 1, 7168), ("quant", 128, 7168), ("quant", 4096, 7168), ("quant", 16384, 7168),
               ("silu_mul", 64, 2048), ("silu_mul", 4096, 2048), ("silu_mul", 4096, 18432),
               ("silu_mul", 32768, 2048)]


def run_quant(ctx: BenchContext) -> list[Row]:
    cases = QUANT_CASES if ctx.cuda else [("quant", 64, 1024), ("silu_mul", 64, 512)]
    if ctx.quick and ctx.cuda:
        cases = cases[2:3] + cases[5:6]
    rows = []
    for kind, m, n in cases:
        cols = n if kind == "quant" else 2 * n
        n_inputs = 4 if m * cols * 2 < (64 << 20) else 1
        xs = [torch.randn(m, cols, device=ctx.device, dtype=torch.bfloat16) for _ in range(n_inputs)]
        out = torch.empty(m, n, dtype=FP8, device=ctx.device)
        scale = ops.empty_act_scale(m, n // 128, ctx.device)
        if kind == "quant":
            us = ctx.time(lambda i: ops.quant_fp8_1x128(xs[i], out=out, scale=scale), n_inputs)
            peer_us = ctx.time(lambda i: ref_quant.quant_fp8_1x128(xs[i]), n_inputs) if ctx.cuda else None
            op = "quant_fp8_1x128"
        else:
            us = ctx.time(lambda i: ops.silu_mul_quant_fp8(xs[i], out=out, scale=scale), n_inputs)
            peer_us = ctx.time(lambda i: ref_quant.silu_mul_quant_fp8(xs[i]), n_inputs) if ctx.cuda else None
            op = "silu_mul_quant_fp8"
        nbytes = m * cols * 2 + m * n + m * (n // 128) * 4
        rows.append(Row("quant", f"{kind} m={m} n={n}", {"m": m, "n": n, "kind": kind}, us, 0.0, nbytes,
                        peer="torch eager reference" if peer_us else None, peer_us=peer_us, backend=_backend(op),
                        extra={"peak": "copy"}))
    return rows
