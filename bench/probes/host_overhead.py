"""Host time of eager op calls (µs per call), where a call's host work exceeds its GPU time: N calls
back to back, wall clock over N once the GPU has caught up. Written for session 18's launcher change
(the dynamic-shared-memory opt-in made once per device instead of on every launch); run it under each
build in one device call.
Usage (a GPU, flashseek built): TAG=new python bench/probes/host_overhead.py
Prints one JSON object per line: tag, op, us_per_call (median of ROUNDS rounds of N calls)."""
import json
import os
import statistics
import time

import torch

from flashseek import ops
from flashseek.bench.mla import SCALE, _make_inputs

tag = os.environ.get("TAG", "")
n, rounds = int(os.environ.get("N", "2000")), int(os.environ.get("ROUNDS", "5"))


def host_us(fn):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(per), per


def main():
    with torch.inference_mode():
        lens = [4096]
        table, sets = _make_inputs(1, 1, 128, lens, False, "cuda", 1, seed=1)
        q, cache = sets[0]
        seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        plan = ops.mla_decode_plan(seqlens, 1, 128)
        cases = {
            "mla_decode_plan b=1": lambda: ops.mla_decode_plan(seqlens, 1, 128),
            "mla_decode b=1 h_q=128": lambda: ops.mla_decode(q, cache, table, seqlens, plan, SCALE),
        }
        for m, nn, k in [(1, 2112, 7168), (128, 2112, 7168)]:
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            aq, asc = ops.quant_fp8_1x128(a)
            w, ws = ops.quantize_weight_fp8_128x128(torch.randn(nn, k, device="cuda", dtype=torch.bfloat16))
            cases[f"fp8_gemm {m}x{nn}x{k}"] = (lambda aq=aq, asc=asc, w=w, ws=ws: ops.fp8_gemm(aq, asc, w, ws))
        for name, fn in cases.items():
            med, per = host_us(fn)
            print(json.dumps({"tag": tag, "op": name, "us_per_call": round(med, 2),
                              "rounds": [round(x, 2) for x in per]}), flush=True)


if __name__ == "__main__":
    main()
