"""Does a masked (MoE decode) FP8 GEMM pay more fixed cost than a dense decode GEMM streaming the
same weight bytes? Graph replays (20 calls a graph, rotated inputs past the L2) of
grouped_fp8_gemm_masked with E experts of which ACTIVE hold one token each, against fp8_gemm with one
token and N * ACTIVE output rows (the same bytes), for DeepSeek-R1's gate_up (N 4096, K 7168) and down
(N 7168, K 2048) shapes; each row also times the masked call eagerly, as `bench grouped` does.
Usage (a GPU, flashseek built): python bench/probes/masked_vs_dense.py [--json FILE]; env E (256),
ACTIVE (8)."""
import json
import os
import sys

import torch

from flashseek import ops
from flashseek.bench.common import time_graph_us, time_median_us
from flashseek.bench.gemm import _act, _rand_fp8, _weight

E = int(os.environ.get("E", "256"))
ACTIVE = int(os.environ.get("ACTIVE", "8"))


def main():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    res = {"card": torch.cuda.get_device_name(), "commit": os.environ.get("FLASHSEEK_COMMIT", "unknown"),
           "e": E, "active": ACTIVE, "rows": []}
    copy_bw = None
    for name, n, k in (("gate_up", 4096, 7168), ("down", 7168, 2048)):
        kb = k // 128
        wbytes = ACTIVE * n * k
        n_sets = max(1, int(3 * 50e6 / wbytes) + 1)
        masked_sets, dense_sets = [], []
        for s in range(n_sets):
            b, sb = _weight(n, k, dev, E)
            a = _rand_fp8((E, 1, k), dev)
            sa = ops.empty_grouped_act_scale(E, 1, kb, dev).fill_(1.0 / 448)
            counts = torch.zeros(E, dtype=torch.int32, device=dev)
            counts[torch.randperm(E, device=dev)[:ACTIVE]] = 1
            out = torch.empty(E, 1, n, dtype=torch.bfloat16, device=dev)
            masked_sets.append((a, sa, b, sb, counts, out))
            del b, sb
            q, qs = _act(1, k, dev)
            w, ws = _weight(n * ACTIVE, k, dev)
            dense_sets.append((q, qs, w, ws, torch.empty(1, n * ACTIVE, dtype=torch.bfloat16, device=dev)))

        def masked(i):
            a, sa, b, sb, c, o = masked_sets[i]
            ops.grouped_fp8_gemm_masked(a, sa, b, sb, c, out=o)

        def dense(i):
            q, qs, w, ws, o = dense_sets[i]
            ops.fp8_gemm(q, qs, w, ws, out=o)

        row = {"case": f"{name} n={n} k={k}", "weight_bytes": wbytes, "n_sets": n_sets,
               "masked_graph_us": time_graph_us(masked, dev, n_sets),
               "dense_graph_us": time_graph_us(dense, dev, n_sets),
               "masked_eager_us": time_median_us(masked, dev, n_sets),
               "dense_eager_us": time_median_us(dense, dev, n_sets)}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del masked_sets, dense_sets
        torch.cuda.empty_cache()
    if "--json" in sys.argv:
        with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
