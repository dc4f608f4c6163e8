"""`flashseek bench model`: DeepSeek-R1 layers end to end.

On CUDA: a full-dimension R1 slice (1 dense + 3 MoE layers, random FP8 weights, bf16 latent cache,
context 4096). For each batch size the decode step of one dense and one MoE layer is timed from a
CUDA graph and compared with its roofline, (weight bytes the step touches + KV bytes) / measured
copy bandwidth, with a per-stage breakdown; then the whole 4-layer step, prefill of 4096 tokens,
and a projection to the 61-layer model. On CPU: the same measurements on the tiny default model.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from flashseek.bench.common import BenchContext, Row, time_graph_us
from flashseek.engine.kv_cache import PagedKVCache, BlockTable, SCRATCH_PAGE
from flashseek.models.deepseek.config import r1_config
from flashseek.models.deepseek.layers import AttnMetadata, MLP, MoE, PrefillSeq, make_plan, norm
from flashseek.models.deepseek.model import DeepseekV3ForCausalLM

FAMILY = "model"


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _linear_bytes(lin) -> int:
    return _nbytes(lin.weight, lin.scale)


def attention_linears(attn) -> list:
    """The attention's projections as the layer holds them (q_a and kv_a may be one fused GEMM)."""
    lins = (attn.q_proj, attn.qkv_a_proj, attn.q_a_proj, attn.kv_a_proj, attn.q_b_proj, attn.o_proj)
    return [x for x in lins if x is not None]


def attention_weight_bytes(attn) -> int:
    return sum(_linear_bytes(x) for x in attention_linears(attn)) + _nbytes(attn.w_uk, attn.w_uv_t, attn.q_a_norm,
                                                                            attn.kv_a_norm)


def mlp_weight_bytes(mlp: MLP) -> int:
    parts = [mlp.gate_up, mlp.down] if mlp.gate_up is not None else [mlp.gate, mlp.up, mlp.down]
    return sum(_linear_bytes(x) for x in parts)


def moe_weight_bytes(moe: MoE, experts_touched: int) -> int:
    fixed = _nbytes(moe.gate_weight, moe.bias) + (mlp_weight_bytes(moe.shared) if moe.shared is not None else 0)
    if moe.w13 is not None:
        # The stacks may end with the shared expert (MoE.n_stacked_shared), of a routed expert's size.
        stacked = moe.cfg.n_routed_experts + moe.n_stacked_shared
        per_expert = _nbytes(moe.w13, moe.w13_scale, moe.w2, moe.w2_scale) // stacked
        fixed += moe.n_stacked_shared * per_expert
    else:
        per_expert = mlp_weight_bytes(moe.experts[0])
    return fixed + experts_touched * per_expert


class _Timer:
    """Times a callable from a CUDA graph where it can be captured (no launch overhead), eagerly
    otherwise; on CPU always eagerly."""

    def __init__(self, ctx: BenchContext):
        self.ctx = ctx
        self.pool = torch.cuda.graph_pool_handle() if ctx.cuda else None
        self.graphs: list = []  # keeps the shared pool alive between captures (see time_graph_us)
        self.capture_failures: list[str] = []  # reported with the rows: these stages were timed eagerly
        self.warmed_up = False

    def eager(self, fn: Callable) -> float:
        return self.ctx.time(lambda i: fn())

    def graph(self, fn: Callable) -> tuple[float, bool]:
        if not self.ctx.cuda:
            return self.eager(fn), False
        try:
            # One layer per graph, as the decode step replays it. The process's first graph timing reads
            # ~5% high whatever the graph (H200, session 26, bench/probes/first_row_probe.py: the dense b=1
            # layer 210.3 us at once, then 200.8, 200.5 after a second idle, 200.4 after three; the clock at
            # 1980 MHz throughout), so the first call times its graph twice and keeps the second.
            for _ in range(1 if self.warmed_up else 2):
                us = time_graph_us(lambda i: fn(), self.ctx.device, 1, self.ctx.rep_ms, calls_per_graph=1,
                                   pool=self.pool, keep_alive=self.graphs)
            self.warmed_up = True
            return us, True
        except Exception as exc:
            torch.cuda.synchronize()
            self.capture_failures.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            return self.eager(fn), False


def _decode_setup(model, cache: PagedKVCache, batch: int, ctx_len: int, gen: torch.Generator):
    """Block tables of `batch` requests holding ctx_len - 1 cached tokens, decoding token ctx_len."""
    dev = model.device
    tables = []
    for _ in range(batch):
        t = BlockTable(cache)
        t.ensure(ctx_len)
        tables.append(t)
    width = max(len(t.pages) for t in tables)
    bt = torch.full((batch, width), SCRATCH_PAGE, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t.pages)] = torch.tensor(t.pages, dtype=torch.int32)
    meta = AttnMetadata(
        positions=torch.full((batch,), ctx_len - 1, dtype=torch.int64, device=dev),
        slot_mapping=torch.tensor([t.slots(ctx_len - 1, ctx_len)[0] for t in tables], device=dev),
        block_tables=bt.to(dev), cache_seqlens=torch.full((batch,), ctx_len, dtype=torch.int32, device=dev),
        num_decode=batch)
    meta.decode_plan = make_plan(cache.layers[0], meta.cache_seqlens, 1, model.cfg.num_attention_heads)
    x = torch.randn(batch, model.cfg.hidden_size, generator=gen, device="cpu").to(dev, model.dtype)
    ids = torch.randint(0, model.cfg.vocab_size, (batch,), generator=gen).to(dev)
    return tables, meta, x, ids


def _experts_touched(moe: MoE, x: torch.Tensor) -> int:
    _, ids = moe.route(moe.router_logits(x))
    return int(torch.unique(ids).numel())


def _layer_rows(ctx, timer, model, cache, layer, batch, ctx_len, x, meta, label) -> tuple[Row, float, float]:
    cfg = model.cfg
    kv_cache = cache.layers[layer.idx]
    h = cfg.num_attention_heads
    rope = model.rope
    # The layer as a decode step runs it (DecoderLayer.forward with the residual stream: the residual
    # add fused into the input norm, no copy of x, no trailing add), on scratch copies it may
    # overwrite in place. Until session 9 this timed layer(x), which adds a copy of x and a separate
    # residual add (~3 us at b=1) that the step does not run.
    xs, rs = x.clone(), x.clone()
    run_layer = lambda: layer.forward(xs, rs, meta, kv_cache, rope)  # noqa: E731
    us, graphed = timer.graph(run_layer)
    eager_us = timer.eager(run_layer)
    xn = norm(x, layer.input_norm, layer.eps, layer.mode)
    # The layer's two norms as forward runs them (DecoderLayer.norm_input / norm_post_attn: fused with
    # the FP8 quantization where only FP8 linears read them; the second one adds the residual in place
    # in FP8 mode, so on scratch copies; replays keep adding, harmless for timing). The attention and
    # the MLP get the inputs those norms give them (a QuantAct where fused).
    xa, xr = x.clone(), x.clone()
    attn_in, _ = layer.norm_input(x, None)
    mlp_in, _ = layer.norm_post_attn(x.clone(), x.clone())
    stages = {
        "norms": timer.graph(lambda: (layer.norm_input(x, None), layer.norm_post_attn(xa, xr)))[0],
        "attention": timer.graph(lambda: layer.attn(attn_in, meta, kv_cache, rope))[0],
    }
    attn = layer.attn
    # Inputs come from the CPU generator: a capture attempt that failed above (the timer falls back to
    # eager) can leave the CUDA generator in capture mode, where eager CUDA sampling raises.
    q_lat = torch.randn(batch, 1, h, cfg.latent_dim).to(x.device, torch.bfloat16 if model.dtype ==
                                                        torch.bfloat16 else model.dtype)
    from flashseek.models.deepseek.layers import mla_decode
    stages["attention.mla_decode"] = timer.graph(lambda: mla_decode(q_lat, kv_cache, meta.block_tables,
                                                                    meta.cache_seqlens, meta.decode_plan,
                                                                    cfg.softmax_scale, False))[0]
    lins = attention_linears(attn)
    ins = {id(attn.q_b_proj): cfg.q_lora_rank, id(attn.o_proj): h * cfg.v_head_dim}
    lin_inputs = [(l, torch.randn(batch, ins.get(id(l), cfg.hidden_size)).to(x.device, model.dtype))
                  for l in lins]
    stages["attention.gemms"] = timer.graph(lambda: [l(a) for l, a in lin_inputs])[0]
    attn_params = sum(l.weight.numel() for l in lins) + attn.w_uk.numel() + attn.w_uv_t.numel()
    flops = batch * h * ctx_len * 2 * (cfg.latent_dim + cfg.kv_lora_rank) + 2 * batch * attn_params
    wbytes = attention_weight_bytes(attn)
    if isinstance(layer.mlp, MoE):
        moe = layer.mlp
        touched = _experts_touched(moe, xn)
        wbytes += moe_weight_bytes(moe, touched)
        stages["moe"] = timer.graph(lambda: moe(xn))[0]
        logits = moe.router_logits(xn)
        stages["moe.routing"] = timer.graph(lambda: moe.route(moe.router_logits(xn)))[0]
        if moe.shared is not None:
            stages["moe.shared_expert"] = timer.graph(lambda: moe.shared(xn))[0]
        flops += 2 * batch * (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * cfg.hidden_size * \
            cfg.moe_intermediate_size
        extra_params = {"experts_touched": touched}
        del logits
    else:
        wbytes += mlp_weight_bytes(layer.mlp)
        stages["dense_mlp"] = timer.graph(lambda: layer.mlp(mlp_in))[0]
        flops += 2 * batch * 3 * cfg.hidden_size * cfg.intermediate_size
        extra_params = {}
    kv_bytes = batch * ctx_len * cfg.latent_dim * kv_cache.element_size() if kv_cache.dtype != torch.uint8 else \
        batch * ctx_len * 656
    total = wbytes + kv_bytes
    stages["host_overhead"] = max(eager_us - us, 0.0)
    extra = {"stages_us": {k: round(v, 2) for k, v in stages.items()}, "graph": graphed, "eager_us": eager_us,
             "weight_bytes": wbytes, "kv_bytes": kv_bytes, "peak": "fp8_tflops"}
    if ctx.ceilings.get("copy_tbps"):
        roof = total / (ctx.ceilings["copy_tbps"] * 1e6)
        extra["roofline_us"] = roof
        extra["x_roofline"] = us / roof
    row = Row(FAMILY, f"decode {label} layer b={batch} ctx={ctx_len}", {"batch": batch, "ctx": ctx_len,
                                                                          "layer": label, **extra_params},
              us, float(flops), float(total), backend=_backend(ctx), extra=extra)
    return row, us, eager_us


def _backend(ctx) -> str:
    if not ctx.cuda:
        return "reference"
    from flashseek import ops
    names = ("fp8_gemm", "mla_decode", "quant_fp8_1x128", "route_noaux_tc")
    return "kernel" if all(ops.has_cuda_kernel(n) for n in names) else "reference"


def _bench(ctx: BenchContext, model: DeepseekV3ForCausalLM, batches, ctx_len: int, prefill_len: int,
           label: str) -> list[Row]:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    timer = _Timer(ctx)
    pages = max(batches) * math.ceil(ctx_len / 64) + math.ceil(prefill_len / 64) + 2
    cache = PagedKVCache(cfg.num_hidden_layers, pages, 64, model.cache_dtype, model.device)
    for t in cache.layers:
        t.normal_() if t.dtype != torch.uint8 else None
    dense = next(l for l in model.layers if not isinstance(l.mlp, MoE))
    moe = next((l for l in model.layers if isinstance(l.mlp, MoE)), None)
    rows, per_batch = [], {}
    with torch.inference_mode():
        for b in batches:
            tables, meta, x, ids = _decode_setup(model, cache, b, ctx_len, gen)
            r_dense, dense_us, dense_eager = _layer_rows(ctx, timer, model, cache, dense, b, ctx_len, x, meta, "dense")
            rows.append(r_dense)
            moe_us = moe_eager = None
            if moe is not None:
                r_moe, moe_us, moe_eager = _layer_rows(ctx, timer, model, cache, moe, b, ctx_len, x, meta, "MoE")
                rows.append(r_moe)
            step = lambda: model.forward(ids, meta, cache.layers)  # noqa: E731
            step_us, graphed = timer.graph(step)
            step_eager = timer.eager(step)
            hx = torch.randn(b, cfg.hidden_size).to(model.device, model.dtype)  # CPU RNG: see _layer_rows
            head_us = timer.graph(lambda: model.logits(hx))[0]
            n_layers = len(model.layers)
            proj = None
            if moe_us is not None:
                # The 61-layer model: 3 dense + 58 MoE layers at these per-layer times, plus the head.
                full_us = 3 * dense_us + 58 * moe_us + head_us
                proj = {"step_us_61_layers": full_us, "tokens_per_s_per_gpu": b / full_us * 1e6}
            per_batch[b] = proj
            rows.append(Row(FAMILY, f"decode step {n_layers} layers b={b} ctx={ctx_len}",
                            {"batch": b, "ctx": ctx_len, "layers": n_layers}, step_us, 0.0, 0.0,
                            backend=_backend(ctx),
                            extra={"graph": graphed, "eager_us": step_eager, "host_overhead_us": step_eager - step_us,
                                   "lm_head_us": head_us, "projection_61_layers": proj}))
            for t in tables:
                t.release()
        # Prefill: one request of prefill_len tokens through every layer, both attention forms.
        ids = torch.randint(0, cfg.vocab_size, (prefill_len,), generator=gen).tolist()
        for mode in ("decompressed", "absorbed"):
            model.set_prefill_mode(mode)
            table = BlockTable(cache)
            table.ensure(prefill_len)
            dev = model.device

            def prefill():
                meta = AttnMetadata(
                    positions=torch.arange(prefill_len, device=dev),
                    slot_mapping=torch.tensor(table.slots(0, prefill_len), device=dev),
                    block_tables=torch.tensor([table.pages], dtype=torch.int32, device=dev),
                    cache_seqlens=torch.tensor([prefill_len], dtype=torch.int32, device=dev), num_decode=0,
                    prefills=[PrefillSeq(0, prefill_len, 0, prefill_len)])
                return model.forward(torch.tensor(ids, device=dev), meta, cache.layers,
                                     torch.tensor([prefill_len - 1], device=dev))
            us = timer.eager(prefill)
            table.release()
            rows.append(Row(FAMILY, f"prefill {prefill_len} tokens {len(model.layers)} layers ({mode})",
                            {"tokens": prefill_len, "mode": mode}, us, 0.0, 0.0, backend=_backend(ctx),
                            extra={"tokens_per_s": prefill_len / us * 1e6}))
        model.set_prefill_mode("decompressed")
    projection = {b: p for b, p in per_batch.items() if p}
    if projection:
        lines = ", ".join(f"b={b}: {p['tokens_per_s_per_gpu']:.3g} tok/s" for b, p in projection.items())
        print(f"[bench model] projected 61-layer decode ({label}; per-layer times as measured at ctx {ctx_len}, "
              f"3 dense + 58 MoE layers + lm_head run back to back on one GPU, i.e. perfect pipelining across "
              f"GPUs holding the weights, no communication, no MTP): {lines}")
    if timer.capture_failures:
        print(f"[bench model] {len(timer.capture_failures)} stage(s) could not be graph-captured and were "
              f"timed eagerly; first: {timer.capture_failures[0]}")
        for r in rows:
            r.extra["graph_capture_failures"] = sorted(set(timer.capture_failures))
    return rows


def run_model(ctx: BenchContext) -> list[Row]:
    if ctx.cuda:
        cfg = r1_config(4).replace(first_k_dense_replace=1)
        print("[bench model] building a random full-dimension R1 slice (1 dense + 3 MoE layers) on the GPU ...")
        model = DeepseekV3ForCausalLM.from_random(cfg, ctx.device, "fp8")
        batches = (1, 16) if ctx.quick else (1, 16, 64, 128)
        return _bench(ctx, model, batches, 4096, 4096, "R1 full dims")
    from flashseek.models.deepseek.checkpoint import ensure_default_model
    model = DeepseekV3ForCausalLM.from_pretrained(ensure_default_model(), "cpu", "fp8", progress=False)
    return _bench(ctx, model, (1, 4), 256, 128, "tiny default, CPU")
