"""Shared benchmark machinery: timing, ceilings, result rows.

Each family module (flashseek/bench/<family>.py) exposes
    run(ctx: BenchContext) -> list[Row]
and uses `ctx.time(fn)` so that every timing is a CUDA-event median (or perf_counter on CPU) over
rotated inputs after warm-up. The CLI (flashseek bench) measures the ceilings once per run, prints
the table with the percentage of each ceiling, writes JSON and optionally a roofline PNG.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

# Sampled after every row's timings: under sustained load the compute-bound kernels here run at the
# card's power cap, with the SM clock well below its maximum (docs/performance.md, session 14), so a
# row's TFLOP/s means little without the clock it ran at.
_GPU_STATE_FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "temperature.gpu",
                     "clocks_event_reasons.active")
_gpu_state_disabled = False


def parse_gpu_state(line: str) -> Optional[dict]:
    """One `nvidia-smi --query-gpu=<_GPU_STATE_FIELDS> --format=csv,noheader,nounits` line as a dict,
    or None when it does not have those fields."""
    vals = [v.strip() for v in line.strip().split(",")]
    if len(vals) != len(_GPU_STATE_FIELDS):
        return None
    try:
        return {"sm_clock_mhz": float(vals[0]), "max_sm_clock_mhz": float(vals[1]), "power_w": float(vals[2]),
                "power_limit_w": float(vals[3]), "temp_c": float(vals[4]), "clock_event_reasons": vals[5]}
    except ValueError:
        return None


def sample_gpu_state(device: Optional[torch.device] = None) -> Optional[dict]:
    """The current GPU's SM clock, power draw and clock-event (throttle) reasons via nvidia-smi, or None
    (this process has not used CUDA, e.g. a `--device cpu` run on a GPU machine; no nvidia-smi; or it
    failed once: then it is not tried again)."""
    global _gpu_state_disabled
    if _gpu_state_disabled or not torch.cuda.is_initialized():
        return None
    exe = shutil.which("nvidia-smi")
    if exe is None:
        _gpu_state_disabled = True
        return None
    cmd = [exe, f"--query-gpu={','.join(_GPU_STATE_FIELDS)}", "--format=csv,noheader,nounits"]
    uuid = getattr(torch.cuda.get_device_properties(device or torch.cuda.current_device()), "uuid", None)
    if uuid is not None:
        cmd.append(f"--id=GPU-{uuid}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        state = parse_gpu_state(out.stdout.splitlines()[0]) if out.returncode == 0 and out.stdout else None
    except (OSError, subprocess.SubprocessError, IndexError):
        state = None
    if state is None:
        _gpu_state_disabled = True
    return state


@dataclass
class Row:
    family: str
    case: str                     # short human label, e.g. "b=128 sq=1 sk=4096 hq=128"
    params: dict
    us: float                     # flashseek median time, microseconds
    flops: float                  # useful FLOPs of the call (0 for pure data movement)
    bytes: float                  # minimal bytes moved through device memory
    peer: Optional[str] = None    # name of the peer measured in the same run
    peer_us: Optional[float] = None
    backend: str = "kernel"       # "kernel" or "reference" (what flashseek ran)
    extra: dict = field(default_factory=dict)  # per-stage breakdowns, error metrics, ...

    def __post_init__(self):
        # Rows are built right after their timings: the clock now is the clock they ran at.
        if self.backend == "kernel" and "gpu_state" not in self.extra:
            state = sample_gpu_state()
            if state is not None:
                self.extra["gpu_state"] = state

    @property
    def tflops(self) -> float:
        return self.flops / self.us / 1e6 if self.us > 0 else 0.0

    @property
    def tbps(self) -> float:
        return self.bytes / self.us / 1e6 if self.us > 0 else 0.0

    def to_dict(self, ceilings: dict) -> dict:
        d = asdict(self)
        d["tflops"] = self.tflops
        d["tbps"] = self.tbps
        d["pct_copy_bw"] = 100 * self.tbps / ceilings["copy_tbps"] if ceilings.get("copy_tbps") else None
        peak = ceilings.get(self.extra.get("peak", "fp8_tflops"))
        d["pct_peak"] = 100 * self.tflops / peak if peak else None
        d["speedup_vs_peer"] = (self.peer_us / self.us) if (self.peer_us and self.us) else None
        return d


class BenchContext:
    def __init__(self, device: torch.device, quick: bool = False, warmup_ms: float = 25, rep_ms: float = 100):
        self.device = device
        self.quick = quick
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        self.ceilings: dict = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def time(self, fn: Callable[[int], object], n_inputs: int = 1, graph: bool = False) -> float:
        """Median time of fn(i) in microseconds; i cycles over n_inputs prepared input sets so that
        problems smaller than L2 are not timed out of cache. Warm-up runs first.

        graph=True times CUDA-graph replays of the calls instead (how an engine runs a decode step),
        which leaves out the Python and launch overhead that dominates microsecond-scale kernels."""
        if graph and self.cuda:
            return time_graph_us(fn, self.device, n_inputs, self.rep_ms)
        return time_median_us(fn, self.device, n_inputs, self.warmup_ms, self.rep_ms)

    def time_alternating(self, fns: dict, n_inputs: int = 1, rounds: int = 4) -> dict:
        """Median times (µs) of several callables, name -> fn(i), measured in alternating rounds (order
        reversed every other round), each round giving every fn rep_ms / rounds of timed calls after a
        short warm-up; the result per name is the median over its rounds. Compute-bound kernels hold the
        card at its power cap and its clock drifts within a run (docs/performance.md, session 14): timed
        one after the other, whichever runs first on a cooler card wins by up to ~10%. Alternating puts
        the drift on every variant alike."""
        if not self.cuda:
            return {name: self.time(fn, n_inputs) for name, fn in fns.items()}
        names = list(fns)
        per_round = {name: [] for name in names}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                per_round[name].append(time_median_us(fns[name], self.device, n_inputs, self.warmup_ms / rounds,
                                                      self.rep_ms / rounds))
        return {name: statistics.median(ts) for name, ts in per_round.items()}


def time_median_us(fn, device, n_inputs=1, warmup_ms=25.0, rep_ms=100.0, max_iters=2000) -> float:
    if device.type != "cuda":
        fn(0)
        times = []
        t_end = time.perf_counter() + max(rep_ms, 1.0) / 1e3
        i = 0
        while i < 3 or (time.perf_counter() < t_end and i < max_iters):
            t0 = time.perf_counter()
            fn(i % n_inputs)
            times.append((time.perf_counter() - t0) * 1e6)
            i += 1
        return statistics.median(times)
    # Estimate one call, then size warm-up and repetitions by time budget.
    fn(0)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(5):
        fn(i % n_inputs)
    end.record()
    torch.cuda.synchronize(device)
    est_ms = max(start.elapsed_time(end) / 5, 1e-3)
    for i in range(max(1, int(warmup_ms / est_ms))):
        fn(i % n_inputs)
    n = max(10, min(max_iters, int(rep_ms / est_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        fn(i % n_inputs)
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def time_graph_us(fn, device, n_inputs=1, rep_ms=100.0, calls_per_graph=20, pool=None, keep_alive=None) -> float:
    """Median per-call device time over replays of a CUDA graph holding `calls_per_graph` calls.
    `pool` shares one graph memory pool between the graphs of several timings. Such a pool lives only
    while a graph captured into it does (torch asserts on a capture into a released pool), so the
    caller passes a list in `keep_alive` that holds every graph until it is done with the pool."""
    if pool is not None and keep_alive is None:
        raise ValueError("time_graph_us: a shared pool needs keep_alive (the graph is its only owner)")
    fn(0)  # any lazy initialisation happens outside the capture
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i % n_inputs)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        for i in range(calls_per_graph):
            fn(i % n_inputs)
    per_replay = time_median_us(lambda i: graph.replay(), device, 1, warmup_ms=10, rep_ms=rep_ms)
    if keep_alive is not None:
        keep_alive.append(graph)
    return per_replay / calls_per_graph


def measure_ceilings(device: torch.device, quick: bool = False) -> dict:
    """Measures, in this run, the device-to-device copy bandwidth (bytes read + written) and the
    bf16 and fp8 (tensor-wise scaled, fast accumulation) matrix rates at 8192^3."""
    if device.type != "cuda":
        n = 1 << 24
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        us = time_median_us(lambda i: dst.copy_(src), device, rep_ms=50)
        a = torch.randn(1024, 1024, device=device)
        mm_us = time_median_us(lambda i: a @ a, device, rep_ms=50)
        return {"copy_tbps": 2 * n * 4 / us / 1e6, "bf16_tflops": 2 * 1024**3 / mm_us / 1e6,
                "fp8_tflops": None, "device": "cpu"}
    props = torch.cuda.get_device_properties(device)
    n = (1 << 28) if not quick else (1 << 26)  # 1 GiB of fp32 each way: far beyond L2
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy_us = time_median_us(lambda i: dst.copy_(src), device, rep_ms=200)
    del src, dst
    s = 8192 if not quick else 4096
    a = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    b = torch.randn(s, s, device=device, dtype=torch.bfloat16)
    bf16_us = time_median_us(lambda i: a @ b, device, rep_ms=300)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.ones((), device=device)
    fp8_us = time_median_us(
        lambda i: torch._scaled_mm(a8, b8, one, one, out_dtype=torch.bfloat16, use_fast_accum=True),
        device, rep_ms=300)
    return {
        "device": props.name, "sms": props.multi_processor_count,
        "copy_tbps": 2 * n * 4 / copy_us / 1e6,
        "bf16_tflops": 2 * s**3 / bf16_us / 1e6,
        "fp8_tflops": 2 * s**3 / fp8_us / 1e6,
    }
