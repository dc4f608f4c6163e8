"""Same-process A/B of one full-dimension DeepSeek-R1 decode layer (dense, then MoE) under host-side
variants: Python knobs of flashseek.ops or the FLASHSEEK_* environment switches that the C++ dispatch
reads on every call. Each variant's layer is captured in its own CUDA graph; the graphs are replayed in
alternating rounds so that clock and thermal drift fall on every variant alike.
Usage (a GPU, flashseek built):
  B=16 AB='ops.MLA_HEAD_GEMV_KERNEL_MAX_T = 1|ops.MLA_HEAD_GEMV_KERNEL_MAX_T = 16' python bench/probes/layer_ab.py
AB: variants separated by '|', each Python statements run with `ops`, `os`, the step's attention
metadata `meta` and a list `keep` in scope, after the environment and the ops knobs are restored to what
they were at start (a variant that swaps a tensor of meta, e.g. the MLA plan, appends it to `keep`: the
captured graph reads it at replay). B: decode batch (default 1);
context 4096, random FP8 weights at R1's sizes, the layer as a decode step runs it (bench model's rows).
Session 13 used it for the head GEMV's token limit and q_b's kernel at b = 16."""
import os
import statistics

import torch

from flashseek import ops
from r1_layers import capture, layer_kind, r1_decode_slice, replay_us

batch = int(os.environ.get("B", "1"))
variants = [v.strip() for v in os.environ.get("AB", "pass").split("|")]
rounds = int(os.environ.get("ROUNDS", "5"))
replays = int(os.environ.get("REPLAYS", "100"))
env0 = dict(os.environ)
knobs0 = {k: getattr(ops, k) for k in dir(ops) if k.isupper() and isinstance(getattr(ops, k), (int, float))}


keep: list = []


def apply(variant: str, meta=None) -> None:
    os.environ.clear()
    os.environ.update(env0)
    for k, v in knobs0.items():
        setattr(ops, k, v)
    exec(variant, {"ops": ops, "os": os, "meta": meta, "keep": keep})


with torch.inference_mode():
    model, cache, meta, x = r1_decode_slice(batch)
    for layer in model.layers:
        kind = layer_kind(layer)
        kv = cache.layers[layer.idx]
        xs, rs = x.clone(), x.clone()
        fn = lambda: layer.forward(xs, rs, meta, kv, model.rope)  # noqa: E731
        graphs = []
        plan0 = meta.decode_plan
        for v in variants:
            meta.decode_plan = plan0
            apply(v, meta)
            graphs.append(capture(fn))
        meta.decode_plan = plan0
        apply("pass")
        times = [[] for _ in variants]
        for _ in range(rounds):
            for i, g in enumerate(graphs):
                times[i].append(replay_us(g, replays))
        for v, ts in zip(variants, times):
            print(f"== {kind} layer b={batch}: median {statistics.median(ts):7.1f} us "
                  f"(rounds {' '.join(f'{t:.1f}' for t in ts)})  [{v}]")
