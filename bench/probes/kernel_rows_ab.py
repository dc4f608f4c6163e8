"""Graph-replay timings of a fixed set of MLA decode and FP8 GEMM calls, for A/B runs of two builds of
the kernels in separate processes (swap the built extension between runs; the inputs are seeded, so
every process times the same calls). Prints one line per row: name, median µs over ROUNDS rounds.
Usage (a GPU, flashseek built): LABEL=B ROUNDS=5 python bench/probes/kernel_rows_ab.py
Session 27 used it for the named barriers' non-aligned PTX form (MLA kernels, decode and sm90 GEMMs)."""
import json
import os
import statistics
from unittest import mock

import torch

from flashseek import ops
from flashseek.bench.mla import _lengths, _make_inputs
from r1_layers import capture, replay_us

label = os.environ.get("LABEL", "?")
rounds = int(os.environ.get("ROUNDS", "5"))
dev = "cuda"
rows = {}


def mla_row(name, b, s_q, s_k, h_q, varlen, causal, fp8, calls=10):
    lens = _lengths(b, s_q, s_k, varlen, seed=1)
    table, sets = _make_inputs(b, s_q, h_q, lens, fp8, dev, 1, seed=2)
    q, cache = sets[0]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    plan = ops.mla_decode_plan(seqlens, s_q, h_q)
    out = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(b, h_q, s_q, device=dev)
    # The graph reads these tensors at every replay: the row keeps them alive.
    keep = (q, cache, table, seqlens, plan, out, lse)
    rows[name] = (capture(lambda: ops.mla_decode(q, cache, table, seqlens, plan, 576 ** -0.5, causal, out=out,
                                                 lse=lse), calls), calls, keep)


def gemm_row(name, m, n, k, calls=10, env=None):
    g = torch.Generator(device=dev).manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=g, device=dev).bfloat16()
    xq, xs = ops.quant_fp8_1x128(x)
    w = (torch.randn(n, k, generator=g, device=dev) * 0.05)
    wq, ws = ops.quantize_weight_fp8_128x128(w)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
    with mock.patch.dict(os.environ, env or {}):  # the dispatch reads its switches at capture
        rows[name] = (capture(lambda: ops.fp8_gemm(xq, xs, wq, ws, out=out), calls), calls, (xq, xs, wq, ws, out))


with torch.inference_mode():
    mla_row("mla b=1 h128 4096 (two-warpgroup)", 1, 1, 4096, 128, False, False, False)
    mla_row("mla b=16 h128 4096 (qreg)", 16, 1, 4096, 128, False, False, False)
    mla_row("mla b=128 h128 4096 (qreg)", 128, 1, 4096, 128, False, False, False, calls=3)
    mla_row("mla b=128 s_q=2 causal varlen h128", 128, 2, 4096, 128, True, True, False, calls=3)
    mla_row("mla b=64 h64 4096 (two-warpgroup)", 64, 1, 4096, 64, False, False, False, calls=3)
    mla_row("mla b=64 h128 4096 fp8", 64, 1, 4096, 128, False, False, True, calls=3)
    gemm_row("gemm 1x7168x16384 (decode)", 1, 7168, 16384)
    gemm_row("gemm 64x2112x7168 (decode)", 64, 2112, 7168)
    gemm_row("gemm 4096x7168x16384 (sm90)", 4096, 7168, 16384, calls=2, env={"FLASHSEEK_GEMM_IMPL": "sm90"})
    times = {k: [] for k in rows}
    for _ in range(rounds):
        for k, (g, calls, _) in rows.items():
            times[k].append(replay_us(g, 20) / calls)
    res = {k: statistics.median(v) for k, v in times.items()}
    for k, v in res.items():
        print(f"{label} {k:42s} {v:9.2f} us  (rounds {' '.join(f'{t:.2f}' for t in times[k])})")
    print("JSON " + json.dumps({"label": label, "us": res}))
