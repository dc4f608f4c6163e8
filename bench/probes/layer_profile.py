"""Kernel timeline of one full-dimension DeepSeek-R1 decode layer (dense, then MoE), replayed from a CUDA
graph under the torch profiler: for each kernel of one replay, its start (µs from the first kernel),
the gap since the previous kernel's end (negative: it was resident early, a programmatic dependent
launch waiting on griddepcontrol.wait) and its duration (median over 5 replays). A kernel's real cost
on the critical path is its end minus the previous kernel's end.
Usage (a GPU, flashseek built): B=16 python bench/probes/layer_profile.py   (B: decode batch, default 1;
context 4096, random FP8 weights at R1's sizes).
Sessions 9-12 used it to find where a b=1 or b=16 layer's time goes (docs/performance.md)."""
import os

import torch
from torch.profiler import profile, ProfilerActivity

from r1_layers import capture, layer_kind, r1_decode_slice

batch = int(os.environ.get("B", "1"))
with torch.inference_mode():
    model, cache, meta, x = r1_decode_slice(batch)
    for layer in model.layers:
        kind = layer_kind(layer)
        kv = cache.layers[layer.idx]
        g = capture(lambda: layer(x, meta, kv, model.rope))
        for _ in range(20):
            g.replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(50):
            g.replay()
        e1.record(); torch.cuda.synchronize()
        print(f"== {kind} layer b={batch}: graph replay {e0.elapsed_time(e1) / 50 * 1000:.1f} us")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                g.replay()
            torch.cuda.synchronize()
        evs = [e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.elapsed_us() > 0
               and "Memcpy" not in e.name and "Memset" not in e.name]
        evs.sort(key=lambda e: e.time_range.start)
        n = len(evs) // 5
        runs = [evs[i * n:(i + 1) * n] for i in range(5)]
        # median over the 5 replays of each kernel's duration and the gap before it
        t0 = runs[2][0].time_range.start
        prev_end = None
        tot = 0.0
        for j, e in enumerate(runs[2]):
            durs = sorted(r[j].time_range.elapsed_us() for r in runs if j < len(r))
            d = durs[len(durs) // 2]
            s = e.time_range.start - t0
            gap = (e.time_range.start - prev_end) if prev_end is not None else 0
            prev_end = e.time_range.end
            tot += d
            print(f"  {s:8.1f} +{gap:5.1f}  {d:7.1f}  {e.name[:110]}")
        span = runs[2][-1].time_range.end - runs[2][0].time_range.start
        print(f"  kernels {n}, sum of durations {tot:.1f} us, span {span:.1f} us")
