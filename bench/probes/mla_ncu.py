"""Runs the b=128, s_k=4096, h_q=128 bf16 MLA decode (gemm_power.py's inputs) three times on one
kernel (FLASHSEEK_MLA_DECODE=wgmma|seesaw|qreg), for an ncu profile of its counters beside FlashMLA's
(session 14: where the extra energy per FLOP goes).
Usage, from bench/probes: ncu --kernel-name regex:mla_decode_wgmma_kernel ... python mla_ncu.py"""
import torch

from gemm_power import mla_decode_call

with torch.inference_mode():
    call = mla_decode_call(torch.device("cuda"))
    for _ in range(3):
        call()
    torch.cuda.synchronize()
