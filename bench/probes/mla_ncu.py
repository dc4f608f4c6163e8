"""Runs one bf16 MLA decode three times for an ncu profile of the decode kernel's counters (beside
FlashMLA's standalone binary on the same shape: session 14 compared energy per FLOP at s_q = 1, session 23
the s_q = 2 causal varlen row).
The shape and inputs are gemm_power.py's (b=128, h_q=128, s_k=4096; S_Q, CAUSAL, VARLEN and S_K as there;
FLASHSEEK_MLA_DECODE picks the kernel). PRINT_LENS=1 prints the lengths (comma-separated) and exits, for
the peer binary's FLASHMLA_BENCH_SEQLENS.
Usage, from bench/probes: ncu --kernel-name regex:mla_decode_qreg_kernel ... python mla_ncu.py"""
import os

import torch

from gemm_power import mla_decode_call, mla_lengths

if os.environ.get("PRINT_LENS") == "1":
    print(",".join(map(str, mla_lengths())))
    raise SystemExit(0)
with torch.inference_mode():
    call = mla_decode_call(torch.device("cuda"))
    for _ in range(3):
        call()
    torch.cuda.synchronize()
