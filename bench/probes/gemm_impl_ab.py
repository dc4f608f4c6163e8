"""Same-process A/B of the rows-in-M FP8 GEMM kernel families on the large shapes of
../shared/docs/performance-targets.md: CUTLASS (default), the hand-written sm90 kernel
(FLASHSEEK_GEMM_IMPL=sm90; IMPLS='default,sm90,...' adds other values of that switch, e.g. a branch's
variant) and torch's block-wise scaled_mm as the peer, all on the same inputs (bench/gemm.py's
generators). Session 14 ran it with the 256-row tile of branch experiment/sm90-bm256 (sm90_256). The C++ dispatch reads
the switch on every call, so one process times every variant; rounds alternate the variants so that
clock and power drift fall on all of them alike. Each timing: CUDA events around CALLS back-to-back
calls, median of the rounds.
Usage (a GPU, flashseek built): python bench/probes/gemm_impl_ab.py [--json FILE]
env ROUNDS (default 7), CALLS (default 10), SHAPES ('m,n,k;...' to override), GROUPED=0 skips the
grouped contiguous rows. SWITCH names another switch to alternate (e.g. SWITCH=FLASHSEEK_GEMM_SKINNY IMPLS=0,1:
the decode kernel against CUTLASS on M <= 64; 'default' unsets it). COPIES=n cycles the dense rows over n
weight copies, so that a weight smaller than the L2 is not served from it (default 1)."""
import json
import os
import statistics
import sys

import torch

from flashseek import ops
from flashseek.bench.gemm import _act, _peer_fn, _weight

IMPLS = os.environ.get("IMPLS", "default,sm90").split(",")
SWITCH = os.environ.get("SWITCH", "FLASHSEEK_GEMM_IMPL")
COPIES = int(os.environ.get("COPIES", "1"))
DENSE = [(4096, 2112, 7168), (4096, 7168, 16384), (4096, 24576, 1536), (8192, 4096, 7168), (2048, 7168, 2048)]
GROUPED = [(8, 4096, 4096, 7168), (4, 8192, 4096, 7168)]  # groups, rows per group, n, k

rounds = int(os.environ.get("ROUNDS", "7"))
calls = int(os.environ.get("CALLS", "10"))
if os.environ.get("SHAPES"):
    DENSE = [tuple(int(v) for v in s.split(",")) for s in os.environ["SHAPES"].split(";")]
if os.environ.get("GROUPED", "1") == "0":
    GROUPED = []


def set_impl(impl):
    if impl == "default":
        os.environ.pop(SWITCH, None)
    else:
        os.environ[SWITCH] = impl


def time_calls(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def ab(label, flops, fns):
    """fns: name -> zero-arg callable (None: not available). Prints and returns µs / TFLOP/s per name."""
    for name, fn in fns.items():  # warm-up (first-call attribute setup, clocks)
        if fn is not None:
            fn()
            time_calls(fn)
    times = {name: [] for name, fn in fns.items() if fn is not None}
    for r in range(rounds):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for name in order:
            times[name].append(time_calls(fns[name]))
    res = {name: statistics.median(t) for name, t in times.items()}
    line = "  ".join(f"{n} {us:8.1f} us {flops / us / 1e6:7.1f} TF" for n, us in res.items())
    print(f"{label:28s} {line}", flush=True)
    return {n: {"us": us, "tflops": flops / us / 1e6, "all_us": times[n]} for n, us in res.items()}


def impl_fn(impl, call):
    def run():
        set_impl(impl)
        call()
    return run


def main():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rounds": rounds,
               "calls_per_timing": calls, "commit": os.environ.get("FLASHSEEK_COMMIT", "unknown"), "rows": []}
    for m, n, k in DENSE:
        q, s = _act(m, k, dev)
        weights = [_weight(n, k, dev) for _ in range(COPIES)]
        wq, ws = weights[0]
        out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        turn = [0]

        def call():
            wq_i, ws_i = weights[turn[0] % COPIES]
            turn[0] += 1
            return ops.fp8_gemm(q, s, wq_i, ws_i, out=out)
        ref = None
        for impl in IMPLS:  # the variants must agree before they are timed
            set_impl(impl)
            got = ops.fp8_gemm(q, s, wq, ws, out=out).clone()
            if ref is None:
                ref = got
            else:
                diff = (got.float() - ref.float()).abs().max().item()
                scale = ref.float().abs().max().item()
                assert diff <= 2e-2 * scale, f"{impl} disagrees with default on {m}x{n}x{k}: {diff} vs {scale}"
        fns = {impl: impl_fn(impl, call) for impl in IMPLS}
        fns["torch"] = _peer_fn(q, s, wq, ws)
        res = ab(f"{m}x{n}x{k}", 2.0 * m * n * k, fns)
        results["rows"].append({"case": f"{m}x{n}x{k}", "kind": "dense", **res})
        del q, s, wq, ws, out, weights
    for e, rows_per, n, k in GROUPED:
        m = e * rows_per
        a, sa = _act(m, k, dev)
        b, sb = _weight(n, k, dev, e)
        offs = torch.arange(0, m + 1, rows_per, dtype=torch.int32, device=dev)
        out = torch.empty(m, n, dtype=torch.bfloat16, device=dev)
        call = lambda: ops.grouped_fp8_gemm_contiguous(a, sa, b, sb, offs, out=out)  # noqa: E731
        fns = {impl: impl_fn(impl, call) for impl in IMPLS}
        peers = [_peer_fn(a[g * rows_per:(g + 1) * rows_per], sa[g * rows_per:(g + 1) * rows_per], b[g], sb[g])
                 for g in range(e)]
        fns["torch"] = None if any(p is None for p in peers) else (lambda: [p() for p in peers])
        res = ab(f"grouped {e}x{rows_per} n={n} k={k}", 2.0 * m * n * k, fns)
        results["rows"].append({"case": f"contiguous {e}x{rows_per} n={n} k={k}", "kind": "grouped", **res})
        del a, sa, b, sb, out
    set_impl("default")
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
