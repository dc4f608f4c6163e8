"""Is a long compute-bound kernel bound by the card's power limit? Runs each variant back to back for
SECONDS while nvidia-smi samples the SM clock, the power draw and the active clock-event (throttle)
reasons every 100 ms, and prints the median of each beside the achieved TFLOP/s.
MODE=gemm (default): torch._scaled_mm with one tensor-wise scale (the fp8 ceiling of the bench),
torch's block-wise scaled_mm, and flashseek's fp8_gemm on CUTLASS (default) and on the sm90 kernel,
at SHAPE (default 4096,7168,16384) on bench/gemm.py's inputs.
MODE=mla: mla_decode at b=128, s_k=4096, h_q=128 (bf16 cache, bench/mla.py's inputs; S_Q=n, CAUSAL=1 and
VARLEN=1 as bench mla's rows, S_K other key counts) on the variants of MLA_VARIANTS (default
"default,mc0,wgmma,seesaw": the default dispatch, the default without multicast pairs, the two-warpgroup and the
turn-taking kernel), and FlashMLA's standalone binary ($FLASHSEEK_FLASHMLA_BENCH, sized to run as long, on the
same lengths) when present.
MODE=bf16: the bf16 tensor path's sustained rate, the ceiling of any bf16 MLA decode: torch.matmul at
8192^3, and the decode's two products as cuBLAS batched GEMMs at b=128, s_k=4096, h_q=128 (Q K^T:
[128 x 576] x [576 x 4096] a request; P V: [128 x 4096] x [4096 x 512]), alone and in turn.
Usage (a GPU, flashseek built): python bench/probes/gemm_power.py [--json FILE]"""
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from flashseek import ops
from flashseek.bench.gemm import _act, _peer_fn, _weight

m, n, k = (int(v) for v in os.environ.get("SHAPE", "4096,7168,16384").split(","))
seconds = float(os.environ.get("SECONDS", "3"))
mode = os.environ.get("MODE", "gemm")
FIELDS = "clocks.sm,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active"


def sample_while(fn, flops, external=None):
    """fn: one call, repeated for SECONDS; external: a callable that runs the whole stretch itself and
    returns µs per call (a separate process)."""
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits", "-lms", "100"],
                           stdout=subprocess.PIPE, text=True)
    if external is not None:
        us = external()
    else:
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
        us = start.elapsed_time(end) * 1e3 / calls
    smi.terminate()
    lines = smi.communicate()[0].strip().splitlines()
    rows = [[v.strip() for v in ln.split(",")] for ln in lines if ln.count(",") == 4]
    rows = rows[len(rows) // 4:]  # drop the ramp
    clock = statistics.median(float(r[0]) for r in rows) if rows else float("nan")
    power = statistics.median(float(r[1]) for r in rows) if rows else float("nan")
    limit = float(rows[0][2]) if rows else float("nan")
    temp = statistics.median(float(r[3]) for r in rows) if rows else float("nan")
    reasons = sorted({r[4] for r in rows})
    return {"us": us, "tflops": flops / us / 1e6 if us else float("nan"), "sm_clock_mhz": clock, "power_w": power,
            "power_limit_w": limit, "temp_c": temp, "event_reasons": reasons, "samples": len(rows)}


def gemm_variants(dev):
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
    return {name: (fn, None) for name, fn in variants.items()}, 2.0 * m * n * k, [m, n, k]


MLA_B, MLA_HQ = 128, 128
MLA_SK = int(os.environ.get("S_K", "4096"))
MLA_SQ = int(os.environ.get("S_Q", "1"))
MLA_CAUSAL = os.environ.get("CAUSAL", "0") == "1"
MLA_VARLEN = os.environ.get("VARLEN", "0") == "1"


def mla_lengths():
    from flashseek.bench import mla as bench_mla
    return bench_mla._lengths(MLA_B, MLA_SQ, MLA_SK, MLA_VARLEN, seed=MLA_B * 7 + MLA_SK)


def mla_decode_call(dev):
    """One bf16 MLA decode (b=128, h_q=128; s_k, s_q, causal and varlen as set above) on bench/mla.py's
    inputs, as a zero-arg call (the kernel follows FLASHSEEK_MLA_DECODE; mla_ncu.py profiles it too)."""
    from flashseek.bench import mla as bench_mla
    lens = mla_lengths()
    table, sets = bench_mla._make_inputs(MLA_B, MLA_SQ, MLA_HQ, lens, False, dev, 1, seed=0)
    q, cache = sets[0]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    plan = ops.mla_decode_plan(seqlens, MLA_SQ, MLA_HQ)
    o = torch.empty(MLA_B, MLA_SQ, MLA_HQ, 512, dtype=torch.bfloat16, device=dev)
    lse = torch.empty(MLA_B, MLA_HQ, MLA_SQ, dtype=torch.float32, device=dev)
    return lambda: ops.mla_decode(q, cache, table, seqlens, plan, bench_mla.SCALE, MLA_CAUSAL, out=o, lse=lse)


def mla_variants(dev):
    from flashseek.bench import mla as bench_mla
    b, h_q = MLA_B, MLA_HQ
    lens = mla_lengths()
    mean_len = sum(lens) / b
    call = mla_decode_call(dev)
    env = {"default": {}, "mc0": {"FLASHSEEK_MLA_MULTICAST": "0"}, "wgmma": {"FLASHSEEK_MLA_DECODE": "wgmma"},
           "seesaw": {"FLASHSEEK_MLA_DECODE": "seesaw"}}
    variants = {}
    for name in os.environ.get("MLA_VARIANTS", "default,mc0,wgmma,seesaw").split(","):
        def run(e=env[name]):
            for k in ("FLASHSEEK_MLA_DECODE", "FLASHSEEK_MLA_MULTICAST"):
                os.environ.pop(k, None)
            os.environ.update(e)
            call()
        variants[f"flashseek {name}"] = (run, None)
    exe = os.environ.get("FLASHSEEK_FLASHMLA_BENCH")
    if exe and os.path.isfile(exe):
        iters = int(seconds * 1e6 / (260 * MLA_SQ * mean_len / 4096))

        def flashmla():
            env_p = dict(os.environ, FLASHMLA_BENCH_SEQLENS=",".join(map(str, lens)))
            r = subprocess.run([exe, str(b), str(MLA_SQ), str(max(lens)), str(h_q), "1", str(int(MLA_CAUSAL)), "0",
                                str(bench_mla.PAGE), "", str(iters)], capture_output=True, text=True, timeout=300,
                               env=env_p)
            mt = re.search(r":\s*([0-9.]+) us", r.stdout)
            return float(mt.group(1)) if r.returncode == 0 and mt else None
        variants["FlashMLA (standalone)"] = (None, flashmla)
    # Causal rows: every query row sees (nearly) the whole length; counted as bench mla counts them.
    return variants, b * h_q * MLA_SQ * mean_len * 2.0 * (576 + 512), [b, MLA_SQ, MLA_SK, h_q]


def bf16_variants(dev):
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16, generator=g)
    bm = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16, generator=g)
    c = torch.empty(8192, 8192, device=dev, dtype=torch.bfloat16)
    b, s_k, h_q = MLA_B, MLA_SK, MLA_HQ
    q = torch.randn(b, h_q, 576, device=dev, dtype=torch.bfloat16, generator=g)
    kt = torch.randn(b, 576, s_k, device=dev, dtype=torch.bfloat16, generator=g)
    p = torch.randn(b, h_q, s_k, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(b, s_k, 512, device=dev, dtype=torch.bfloat16, generator=g)
    s_out = torch.empty(b, h_q, s_k, device=dev, dtype=torch.bfloat16)
    o_out = torch.empty(b, h_q, 512, device=dev, dtype=torch.bfloat16)
    f_qk, f_pv = 2.0 * b * h_q * s_k * 576, 2.0 * b * h_q * s_k * 512
    return {
        "torch bf16 matmul 8192^3": (lambda: torch.matmul(a, bm, out=c), None, 2.0 * 8192 ** 3),
        "torch bf16 bmm Q K^T (MLA b=128)": (lambda: torch.bmm(q, kt, out=s_out), None, f_qk),
        "torch bf16 bmm P V (MLA b=128)": (lambda: torch.bmm(p, v, out=o_out), None, f_pv),
        "torch bf16 bmm Q K^T then P V": (lambda: (torch.bmm(q, kt, out=s_out), torch.bmm(p, v, out=o_out)), None,
                                         f_qk + f_pv),
    }, None, [8192, 8192, 8192]


def main():
    dev = torch.device("cuda")
    make = {"mla": mla_variants, "bf16": bf16_variants}.get(mode, gemm_variants)
    variants, flops, shape = make(dev)
    res = {"card": torch.cuda.get_device_name(), "mode": mode, "shape": shape, "seconds": seconds,
           "commit": os.environ.get("FLASHSEEK_COMMIT", "unknown"), "rows": {}}
    for name, (fn, external, *own_flops) in variants.items():
        if fn is None and external is None:
            continue
        if fn is not None:
            fn()
            torch.cuda.synchronize()
        r = sample_while(fn, own_flops[0] if own_flops else flops, external)
        res["rows"][name] = r
        print(f"{name:32s} {r['tflops']:7.1f} TF  {r['sm_clock_mhz']:6.0f} MHz  {r['power_w']:6.1f} / "
              f"{r['power_limit_w']:.0f} W  {r['temp_c']:.0f} C  reasons {r['event_reasons']}", flush=True)
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
