"""Runs the b=128, s_k=4096, h_q=128 bf16 MLA decode a few times on one kernel
(FLASHSEEK_MLA_DECODE=wgmma|seesaw), for an ncu profile of its counters beside FlashMLA's (session 14:
where the extra energy per FLOP goes). Usage: ncu --kernel-name regex:... python bench/probes/mla_ncu.py"""
import torch

from flashseek import ops
from flashseek.bench import mla as bench_mla

with torch.inference_mode():
    dev = torch.device("cuda")
    b, s_k, h_q = 128, 4096, 128
    lens = [s_k] * b
    table, sets = bench_mla._make_inputs(b, 1, h_q, lens, False, dev, 1, seed=0)
    q, cache = sets[0]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    plan = ops.mla_decode_plan(seqlens, 1, h_q)
    for _ in range(3):
        ops.mla_decode(q, cache, table, seqlens, plan, bench_mla.SCALE, False)
    torch.cuda.synchronize()
