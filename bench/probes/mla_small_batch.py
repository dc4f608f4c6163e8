"""Small-batch MLA decode: the whole mla_decode call (split kernel + combine) as CUDA-graph replays, for
a few split counts (num_sm_parts), plus the error against the fp32 reference. Written for session 17's
A/B of the split partials' dtype: run it once under each build (PYTHONPATH picks the build) in one
device call, so that both sets of figures come from the same card.

Timing: one graph holds N consecutive calls, each on its own q and cache (the sets together exceed the
50 MB L2, as successive layers' caches do in a model), replayed ROUNDS x REPLAYS times after a warm-up;
a call's time is the median replay / N. Error: set 0 against ref_mla.mla_decode in fp32. Besides the
max abs error it prints how much of issue 3's bf16 budget the call uses, with the partial rounding
counted (`over_budget`, as tests/test_mla.py counts) and without it (`over_budget_no_partial_term`);
<= 0 is within, 1e-3 is the edge.
Usage (a GPU, flashseek built):
  CASES='1,128,4096;32,128,1024' PARTS='default,33' KERNELS='wgmma,seesaw' TAG=new python bench/probes/mla_small_batch.py
VARLEN=1 draws the lengths as `flashseek bench mla`'s varlen rows do. S_Q=n (default 1) runs n query rows a
request, CAUSAL=1 with the causal mask (the error fields then hold max abs error and cos diff only).
L2RES=k maps every block-table entry to page (entry % k), so that the whole KV stays in L2 (the kernels'
compute side without HBM waits). Prints one JSON object per line: tag, b, h_q, s_k, dtype, parts, kernel,
us, err fields. The variants of a
case (PARTS x KERNELS) are timed in alternating rounds. Outputs start as NaN."""
import json
import math
import os
import statistics

import torch

from flashseek import ops
from flashseek.bench.mla import PAGE, SCALE, _lengths, _make_inputs
from flashseek.ref import mla as ref_mla

L2 = 50e6
cases = [tuple(int(x) for x in c.split(",")) for c in
         os.environ.get("CASES", "1,128,4096;1,16,4096;4,128,4096;16,128,4096;32,128,1024").split(";")]
parts_list = os.environ.get("PARTS", "default").split(",")
dtypes = [getattr(torch, d) for d in os.environ.get("DTYPES", "bfloat16").split(",")]
rounds, replays = int(os.environ.get("ROUNDS", "5")), int(os.environ.get("REPLAYS", "40"))
tag = os.environ.get("TAG", "")
# FLASHSEEK_MLA_DECODE values to compare (read by the C++ dispatch when a call is captured); "default" unsets it.
# "kernel:v" also sets FLASHSEEK_AB_VAR=v, which a build under a temporary A/B reads to pick a variant;
# "kernel:NAME=v" sets the environment variable NAME=v instead (e.g. default:FLASHSEEK_MLA_MULTICAST=0).
impls = os.environ.get("KERNELS", "default").split(",")
l2res = int(os.environ.get("L2RES", "0"))
varlen = os.environ.get("VARLEN", "0") == "1"  # lengths drawn as bench mla's varlen rows draw them
s_q_all = int(os.environ.get("S_Q", "1"))
causal = os.environ.get("CAUSAL", "0") == "1"


def error_fields(q, cache, table, seqlens, out):
    ref, _ = ref_mla.mla_decode(q, cache, table, seqlens, SCALE, causal)
    b, s_q, h_q, _ = q.shape
    o = out.float()
    err = (o - ref).abs()
    cd = 1 - 2 * (o.double() * ref.double()).sum() / ((o.double()**2).sum() + (ref.double()**2).sum())
    fields = {"max_abs_err": err.max().item(), "cos_diff": cd.item()}
    if causal:  # the budget terms below assume every row sees every key
        return fields
    pav = torch.zeros_like(ref)
    for i, n in enumerate(seqlens.tolist()):
        kv = cache[table[i, :(n + PAGE - 1) // PAGE].long()].reshape(-1, 576)[:n].float()
        p = torch.softmax(q[i].float().reshape(s_q * h_q, 576) @ kv.t() * SCALE, dim=-1)
        pav[i] = (p @ kv[:, :512].abs()).reshape(s_q, h_q, 512)
    half_ulp = 2.0**-8 if q.dtype == torch.bfloat16 else 2.0**-11
    base = err - half_ulp * ref.abs() - 2.0**-8 * pav
    return {**fields, "over_budget_no_partial_term": base.max().item(),
            "over_budget": (base - half_ulp * pav).max().item(), "max_abs_out": ref.abs().max().item()}


def main():
    with torch.inference_mode():
        for (b, h_q, s_k) in cases:
            for dt in dtypes:
                lens = _lengths(b, s_q_all, s_k, True, seed=b * 7 + s_k) if varlen else [s_k] * b
                nbytes = b * s_k * 1152
                n_sets = min(16, math.ceil(3 * L2 / nbytes) + 1)
                table, sets = _make_inputs(b, s_q_all, h_q, lens, False, "cuda", n_sets, seed=b * 7 + s_k)
                if l2res:
                    table = table % l2res
                sets = [(q.to(dt), c) for q, c in sets]
                seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
                outs = [(torch.empty(b, s_q_all, h_q, 512, dtype=dt, device="cuda"),
                         torch.empty(b, h_q, s_q_all, dtype=torch.float32, device="cuda")) for _ in sets]
                # Every (parts, kernel) variant of the case gets its own graph; rounds alternate over them
                # so that clock and thermal drift fall on all alike.
                variants = []
                for parts in parts_list:
                    plan = ops.mla_decode_plan(seqlens, s_q_all, h_q, None if parts == "default" else int(parts))
                    n_parts = ref_mla.plan_num_sm_parts(plan.numel(), b)
                    for impl in impls:
                        name, _, var = impl.partition(":")
                        if name == "default":
                            os.environ.pop("FLASHSEEK_MLA_DECODE", None)
                        else:
                            os.environ["FLASHSEEK_MLA_DECODE"] = name
                        env_name, _, env_value = var.rpartition("=") if "=" in var else ("FLASHSEEK_AB_VAR", "", var)
                        for e in ("FLASHSEEK_AB_VAR", "FLASHSEEK_MLA_MULTICAST"):
                            os.environ.pop(e, None)
                        if var:
                            os.environ[env_name] = env_value
                        outs = [(torch.full((b, s_q_all, h_q, 512), float("nan"), dtype=dt, device="cuda"),
                                 torch.empty(b, h_q, s_q_all, dtype=torch.float32, device="cuda")) for _ in sets]

                        def calls(plan=plan, outs=outs):
                            for (q, c), (o, lse) in zip(sets, outs):
                                ops.mla_decode(q, c, table, seqlens, plan, SCALE, causal, out=o, lse=lse)

                        calls()
                        torch.cuda.synchronize()
                        g = torch.cuda.CUDAGraph()
                        s = torch.cuda.Stream()
                        s.wait_stream(torch.cuda.current_stream())
                        with torch.cuda.stream(s):
                            calls()
                            with torch.cuda.graph(g, stream=s):
                                calls()
                        torch.cuda.current_stream().wait_stream(s)
                        variants.append((parts, n_parts, impl, g, outs, plan))
                    for e in ("FLASHSEEK_MLA_DECODE", "FLASHSEEK_AB_VAR", "FLASHSEEK_MLA_MULTICAST"):
                        os.environ.pop(e, None)
                for v in variants:
                    for _ in range(5):
                        v[3].replay()
                times = [[] for _ in variants]
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                for r in range(rounds):
                    # Each round starts at another variant, so that drift inside a round (the compute-bound
                    # rows slow down as the card reaches its power cap) does not fall on one variant.
                    for i in [(r + k) % len(variants) for k in range(len(variants))]:
                        v = variants[i]
                        for _ in range(replays):
                            ev[0].record()
                            v[3].replay()
                            ev[1].record()
                            ev[1].synchronize()
                            times[i].append(ev[0].elapsed_time(ev[1]) * 1e3 / len(sets))
                q0, c0 = sets[0]
                for (parts, n_parts, impl, g, outs, _), ts in zip(variants, times):
                    rec = {"tag": tag, "build": os.path.dirname(ops.__file__), "b": b, "h_q": h_q, "s_k": s_k,
                           "dtype": str(dt).split(".")[-1], "parts": n_parts, "kernel": impl, "sets": len(sets), "l2res": l2res, "varlen": varlen,
                           "us": round(statistics.median(ts), 2), "us_p10": round(sorted(ts)[len(ts) // 10], 2),
                           "round_medians": [round(statistics.median(ts[r * replays:(r + 1) * replays]), 2)
                                             for r in range(rounds)]}
                    rec.update(error_fields(q0, c0, table, seqlens, outs[0][0]))
                    print(json.dumps(rec), flush=True)
                del variants


if __name__ == "__main__":
    main()
