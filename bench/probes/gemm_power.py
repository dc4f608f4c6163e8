"""Is a long FP8 GEMM bound by the card's power limit? Runs each variant back to back for SECONDS
while nvidia-smi samples the SM clock, the power draw and the active clock-event (throttle) reasons
every 100 ms, and prints the median of each beside the achieved TFLOP/s.
Variants: torch._scaled_mm with one tensor-wise scale (the fp8 ceiling of the bench), torch's
block-wise scaled_mm, and flashseek's fp8_gemm on CUTLASS (default) and on the sm90 kernel, all at
SHAPE (default 4096,7168,16384) on bench/gemm.py's inputs.
Usage (a GPU, flashseek built): python bench/probes/gemm_power.py [--json FILE]"""
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from flashseek import ops
from flashseek.bench.gemm import _act, _peer_fn, _weight

m, n, k = (int(v) for v in os.environ.get("SHAPE", "4096,7168,16384").split(","))
seconds = float(os.environ.get("SECONDS", "3"))
FIELDS = "clocks.sm,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active"


def sample_while(fn):
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t_end = time.perf_counter() + seconds
    calls = 0
    start.record()
    while time.perf_counter() < t_end:
        for _ in range(10):
            fn()
        calls += 10
        torch.cuda.synchronize()
    end.record()
    end.synchronize()
    smi.terminate()
    lines = smi.communicate()[0].strip().splitlines()
    rows = [[v.strip() for v in ln.split(",")] for ln in lines if ln.count(",") == 4]
    rows = rows[len(rows) // 4:]  # drop the ramp
    clock = statistics.median(float(r[0]) for r in rows) if rows else float("nan")
    power = statistics.median(float(r[1]) for r in rows) if rows else float("nan")
    limit = float(rows[0][2]) if rows else float("nan")
    temp = statistics.median(float(r[3]) for r in rows) if rows else float("nan")
    reasons = sorted({r[4] for r in rows})
    us = start.elapsed_time(end) * 1e3 / calls
    return {"us": us, "tflops": 2.0 * m * n * k / us / 1e6, "sm_clock_mhz": clock, "power_w": power,
            "power_limit_w": limit, "temp_c": temp, "event_reasons": reasons, "samples": len(rows)}


def main():
    dev = torch.device("cuda")
    q, s = _act(m, k, dev)
    wq, ws = _weight(n, k, dev)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
    one = torch.ones((), device=dev)
    variants = {
        "torch tensor-wise (fast accum)": lambda: torch._scaled_mm(q, wq.t(), one, one, out_dtype=torch.bfloat16,
                                                                   use_fast_accum=True),
        "torch block-wise": _peer_fn(q, s, wq, ws),
    }
    for impl in ("default", "sm90"):
        def run(impl=impl):
            if impl == "default":
                os.environ.pop("FLASHSEEK_GEMM_IMPL", None)
            else:
                os.environ["FLASHSEEK_GEMM_IMPL"] = impl
            ops.fp8_gemm(q, s, wq, ws, out=out)
        variants[f"flashseek {impl}"] = run
    res = {"card": torch.cuda.get_device_name(), "shape": [m, n, k], "seconds": seconds,
           "commit": os.environ.get("FLASHSEEK_COMMIT", "unknown"), "rows": {}}
    for name, fn in variants.items():
        if fn is None:
            continue
        fn()
        torch.cuda.synchronize()
        r = sample_while(fn)
        res["rows"][name] = r
        print(f"{name:32s} {r['tflops']:7.1f} TF  {r['sm_clock_mhz']:6.0f} MHz  {r['power_w']:6.1f} / "
              f"{r['power_limit_w']:.0f} W  {r['temp_c']:.0f} C  reasons {r['event_reasons']}", flush=True)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
