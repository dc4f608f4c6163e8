"""Runs one bf16 MLA decode shape three times for an ncu profile of the decode kernel's counters (beside
FlashMLA's standalone binary on the same shape: session 14 compared energy per FLOP at s_q = 1, session 23
the s_q = 2 causal varlen row, where FlashMLA leads).
Default: b=128, s_k=4096, h_q=128 (gemm_power.py's inputs; FLASHSEEK_MLA_DECODE picks the kernel).
S_Q=n CAUSAL=1 VARLEN=1 (b=128, h_q=128, s_k=4096 as `flashseek bench mla`'s rows; VARLEN draws bench mla's
lengths) build the inputs here instead, and PRINT_LENS=1 prints the lengths (comma-separated) and exits, for
the peer binary's FLASHMLA_BENCH_SEQLENS.
Usage, from bench/probes: ncu --kernel-name regex:mla_decode_qreg_kernel ... python mla_ncu.py"""
import os

import torch

s_q = int(os.environ.get("S_Q", "1"))
causal = os.environ.get("CAUSAL", "0") == "1"
varlen = os.environ.get("VARLEN", "0") == "1"

with torch.inference_mode():
    if s_q == 1 and not causal and not varlen:
        from gemm_power import mla_decode_call
        call = mla_decode_call(torch.device("cuda"))
    else:
        from flashseek import ops
        from flashseek.bench.mla import SCALE, _lengths, _make_inputs
        b, h_q, s_k = 128, 128, int(os.environ.get("S_K", "4096"))
        lens = _lengths(b, s_q, s_k, varlen, seed=b * 7 + s_k)
        if os.environ.get("PRINT_LENS") == "1":
            print(",".join(map(str, lens)))
            raise SystemExit(0)
        table, sets = _make_inputs(b, s_q, h_q, lens, False, "cuda", 1, seed=0)
        q, cache = sets[0]
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        plan = ops.mla_decode_plan(seqlens, s_q, h_q)

        def call():
            return ops.mla_decode(q, cache, table, seqlens, plan, SCALE, causal)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
