"""Session 26 probe (run with bench/probes on PYTHONPATH): bench model's first row (dense b=1) reads ~6% above
layer_ab.py's figure for the same layer (sessions 25-26). This builds bench model's slice (4 layers, random FP8
weights on the GPU), then times the dense b=1 layer graph with bench model's own timer (bench.common.time_graph_us)
right away, again, after an idle second, and after three more, printing the SM clock, clock-event reasons and power
(nvidia-smi) each time."""
import time

import torch

from flashseek.bench.common import sample_gpu_state, time_graph_us
from r1_layers import layer_kind, r1_decode_slice


def gpu_state():
    st = sample_gpu_state(torch.device("cuda")) or {}
    return f"{st.get('sm_clock_mhz')} MHz, reasons {st.get('clock_event_reasons')}, {st.get('power_w')} W"


with torch.inference_mode():
    t0 = time.perf_counter()
    model, cache, meta, x = r1_decode_slice(1, layers=4)
    torch.cuda.synchronize()
    print(f"built in {time.perf_counter() - t0:.1f} s; state {gpu_state()}")
    dense = next(l for l in model.layers if layer_kind(l) == "dense")
    xs, rs = x.clone(), x.clone()
    kv = cache.layers[dense.idx]
    fn = lambda i: dense.forward(xs, rs, meta, kv, model.rope)  # noqa: E731
    keep = []
    pool = torch.cuda.graph_pool_handle()
    for label, idle in (("at once", 0), ("again", 0), ("after 1 s idle", 1.0), ("after 3 s idle", 3.0), ("again", 0)):
        time.sleep(idle)
        us = time_graph_us(fn, torch.device("cuda"), 1, 100.0, calls_per_graph=1, pool=pool, keep_alive=keep)
        print(f"dense b=1 {label:16s} {us:7.1f} us   state {gpu_state()}")
