"""q_b (N 24576, K 1536) at 1 and 16 tokens through our fp8_gemm and torch's block-wise scaled_mm
(cuBLASLt), three calls each, for an ncu comparison of launch shape and time (session 14: cuBLAS runs
16x24576x1536 in 15.1 us against our 18.1, graph replays).
Usage, from bench/probes: ncu --metrics ... python qb_ncu.py"""
import torch

from flashseek import ops
from flashseek.bench.gemm import _act, _peer_fn, _weight

with torch.inference_mode():
    dev = torch.device("cuda")
    w, ws = _weight(24576, 1536, dev)
    for m in (1, 16):
        q, s = _act(m, 1536, dev)
        peer = _peer_fn(q, s, w, ws)
        for _ in range(3):
            ops.fp8_gemm(q, s, w, ws)
            if peer is not None:
                peer()
    torch.cuda.synchronize()
