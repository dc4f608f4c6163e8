"""Shared setup of the layer probes (layer_profile.py, layer_ab.py): a full-dimension DeepSeek-R1 slice of one
dense and one MoE layer (random FP8 weights) with a paged cache holding `batch` requests of 4095 cached tokens
(random latents), decoding token 4096, as bench model's rows run it."""
import torch

from flashseek.bench.model import _decode_setup
from flashseek.engine.kv_cache import PagedKVCache
from flashseek.models.deepseek.config import r1_config
from flashseek.models.deepseek.layers import MoE
from flashseek.models.deepseek.model import DeepseekV3ForCausalLM

CONTEXT = 4096


def r1_decode_slice(batch: int, layers: int = 2):
    """(model, cache, meta, x): call inside torch.inference_mode() for the decode step's tensors. One dense
    layer, then MoE ones (layers = 4 is bench model's slice)."""
    cfg = r1_config(layers).replace(first_k_dense_replace=1)
    model = DeepseekV3ForCausalLM.from_random(cfg, "cuda", "fp8")
    cache = PagedKVCache(cfg.num_hidden_layers, batch * 64 + 4, 64, model.cache_dtype, "cuda")
    for t in cache.layers:
        t.normal_()
    _, meta, x, _ = _decode_setup(model, cache, batch, CONTEXT, torch.Generator().manual_seed(0))
    return model, cache, meta, x


def layer_kind(layer) -> str:
    return "MoE" if isinstance(layer.mlp, MoE) else "dense"


def capture(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    """fn() run three times (lazy setup, autotuning), then captured `calls` times back to back in one graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def replay_us(graph: torch.cuda.CUDAGraph, replays: int, warmup: int = 20) -> float:
    """Mean device time of one replay of `graph`, in us: `warmup` replays, then `replays` timed with CUDA events."""
    for _ in range(warmup):
        graph.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(replays):
        graph.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / replays * 1000
