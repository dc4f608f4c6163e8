"""DeepSeek-V3 layers in two precisions.

* "reference": weights dequantized to fp32, fp32 activations, no activation quantization, pure
  torch. This is what the Hugging Face comparison runs against.
* "fp8": bf16 activations, FP8 block-scaled GEMMs with 1x128 activation quantization, fused MoE,
  paged MLA decode; each through flashseek.ops (kernels on Hopper, references on CPU), or a torch
  emulation of the same math while an op has not landed (see fp8.py).

The token batch is flat ([T, hidden]) and mixes sequences: the first `num_decode` tokens are one
decode token per sequence, then each prefill chunk's tokens in order (AttnMetadata).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

import flashseek.ops as ops
from flashseek.models.deepseek import fp8 as fp8_ops
from flashseek.models.deepseek.config import DeepseekConfig
from flashseek.ref import mla as ref_mla
from flashseek.ref import norm as ref_norm

REFERENCE, FP8_MODE = "reference", "fp8"
MAX_SQ = 64   # the MLA decode kernel's largest query count per request


@dataclass
class PrefillSeq:
    start: int        # first token in the flat batch
    q_len: int        # tokens computed this step
    row: int          # row in block_tables / cache_seqlens
    ctx_len: int      # tokens in the cache after this step's append


@dataclass
class AttnMetadata:
    positions: torch.Tensor              # int64 [T]
    slot_mapping: torch.Tensor           # int64 [T]
    block_tables: torch.Tensor           # int32 [B, max_pages]; decode rows first
    cache_seqlens: torch.Tensor          # int32 [B]; lengths after this step's append
    num_decode: int
    prefills: list = field(default_factory=list)   # list[PrefillSeq]
    decode_plan: Optional[torch.Tensor] = None
    # Split-KV schedules of the absorbed prefill calls, made once per step and shared by all layers.
    prefill_plans: dict = field(default_factory=dict)
    rope_cos_sin: Optional[tuple] = None   # gathered once per step, shared by all layers


# ---- norms and rope ---------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The pure-torch formula (flashseek.ref.norm.rms_norm), which the reference precision runs."""
    return ref_norm.rms_norm(x, weight, eps)


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mode: str) -> torch.Tensor:
    """RMSNorm: the torch formula in the reference precision (fp32-exact, what the HF comparison
    checks), flashseek.ops.rms_norm (the CUDA kernel on GPU, the same formula on CPU) in FP8 mode."""
    if mode == REFERENCE:
        return rms_norm(x, weight, eps)
    return ops.rms_norm(x, weight, eps)


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, mode: str):
    """(rms_norm(residual + x), residual + x), the sum rounded to residual's dtype before the norm
    reads it, as the unfused `h = residual + x; rms_norm(h)` does. In FP8 mode through
    flashseek.ops.fused_add_rms_norm, which overwrites x and residual in place (one pass over the
    row instead of three); the reference precision stays out of place in pure torch."""
    if mode == REFERENCE:
        h = residual + x
        return rms_norm(h, weight, eps), h
    return ops.fused_add_rms_norm(x, residual, weight, eps)


def norm_quant_fits(x: torch.Tensor, weight: torch.Tensor, linears, residual: Optional[torch.Tensor] = None) -> bool:
    """Whether RMSNorm(x) (of residual + x with residual given) can run fused with the FP8 1x128
    quantization of its output (norm_quant / add_norm_quant) for `linears`, the output's only
    readers: each is an FP8-mode linear with a quantized weight, all with one ue8m0, and x, residual
    and weight are what flashseek.ops.rms_norm_quant_fp8 takes (ops.rms_norm_quant_fp8_fits: 16-bit
    rows of whole 128-channel blocks, 16-byte aligned). Elsewhere the unfused norm runs, then each
    linear quantizes for itself."""
    if not linears or any(lin is None or lin.mode != FP8_MODE or not lin.quantized for lin in linears):
        return False
    if len({lin.ue8m0 for lin in linears}) != 1:
        return False
    return ops.rms_norm_quant_fp8_fits(x, weight, residual)


def norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, ue8m0: bool) -> fp8_ops.QuantAct:
    """The FP8 mode's norm of an activation that feeds only FP8 linears (see norm_quant_fits): one
    kernel (flashseek.ops.rms_norm_quant_fp8) writes quant_act(norm(x)) bit for bit."""
    q, s = ops.rms_norm_quant_fp8(x, weight, eps, ue8m0)
    return fp8_ops.QuantAct(q, s, ue8m0, x.dtype)


def add_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, ue8m0: bool):
    """add_norm whose normalized output feeds only FP8 linears: (QuantAct of rms_norm(residual + x),
    residual), through flashseek.ops.fused_add_rms_norm_quant_fp8, which updates residual in place
    as add_norm does in FP8 mode and leaves x untouched (add_norm would overwrite it)."""
    q, s = ops.fused_add_rms_norm_quant_fp8(x, residual, weight, eps, ue8m0)
    return fp8_ops.QuantAct(q, s, ue8m0, x.dtype), residual


class YarnRope:
    """Rotary embedding of DeepSeek-V3: YaRN-corrected frequencies, rotation of adjacent pairs
    (x[2i], x[2i+1]) by angle pos * inv_freq[i], cos/sin scaled by YaRN's attention factor."""

    def __init__(self, cfg: DeepseekConfig, device):
        dim = cfg.qk_rope_head_dim
        base = cfg.rope_theta
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        inv_freq = 1.0 / pos_freqs
        rs = cfg.rope_scaling
        if rs.type == "yarn":
            def corr_dim(rot):
                return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))
            low = max(math.floor(corr_dim(rs.beta_fast)), 0)
            high = min(math.ceil(corr_dim(rs.beta_slow)), dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
            # ramp 0: high-frequency dims keep the original frequency; ramp 1: interpolated by 1/factor.
            inv_freq = inv_freq / rs.factor * ramp + inv_freq * (1 - ramp)
        self.inv_freq = inv_freq.to(device)
        # The whole table up front (42 MB at R1's 163840 positions): lookups never sync the host,
        # so decode steps stay CUDA-graph capturable.
        self.max_positions = min(cfg.max_position_embeddings, 1 << 20)
        freqs = torch.arange(self.max_positions, dtype=torch.float32, device=device)[:, None] * self.inv_freq[None, :]
        self._cos = freqs.cos() * cfg.rope_attention_factor
        self._sin = freqs.sin() * cfg.rope_attention_factor

    def cos_sin(self, positions: torch.Tensor):
        return self._cos[positions], self._sin[positions]

    @property
    def tables(self):
        """(cos, sin) fp32 [max_positions, dim/2], as flashseek.ops.mla_rope_norm_append reads them."""
        return self._cos, self._sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim] with cos/sin [T, dim/2]; computed in fp32, returned in x's dtype
        (flashseek.ref.mla.rope_interleaved, the formula mla_rope_norm_append's kernel follows)."""
        return ref_mla.rope_interleaved(x, cos, sin)


# ---- linear layers ----------------------------------------------------------------------------
class Linear:
    """A checkpoint linear: FP8 e4m3 + 128x128 scales, or plain bf16."""

    def __init__(self, mode: str, ue8m0: bool = False):
        self.mode = mode
        self.ue8m0 = ue8m0
        self.weight: Optional[torch.Tensor] = None     # fp32 (reference), e4m3 or bf16 (fp8 mode)
        self.scale: Optional[torch.Tensor] = None

    def set(self, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> None:
        if self.mode == REFERENCE:
            self.weight = (fp8_ops.dequantize_weight_128x128(weight, scale) if scale is not None
                           else weight.float())
            self.scale = None
        else:
            self.weight, self.scale = weight, (scale.float().contiguous() if scale is not None else None)

    def dense(self, dtype=torch.float32) -> torch.Tensor:
        if self.scale is not None:
            return fp8_ops.dequantize_weight_128x128(self.weight, self.scale, dtype)
        return self.weight.to(dtype)

    @property
    def quantized(self) -> bool:
        return self.scale is not None

    def __call__(self, x) -> torch.Tensor:
        """x @ W^T for x a tensor [T, K], or (FP8 mode, quantized weight only) an fp8_ops.QuantAct of
        it, e.g. from norm_quant."""
        if isinstance(x, fp8_ops.QuantAct) and (self.mode != FP8_MODE or self.scale is None):
            raise ValueError("a pre-quantized activation (QuantAct) needs an FP8-mode linear with an FP8 weight")
        if self.mode == REFERENCE:
            return x.float() @ self.weight.t()
        if self.scale is not None:
            return fp8_ops.fp8_linear(x, self.weight, self.scale, self.ue8m0)
        return x.to(self.weight.dtype) @ self.weight.t()


def concat_linears(mode: str, ue8m0: bool, parts: list[Linear]) -> Linear:
    """Stacks linears along the output dim (gate and up into one GEMM); FP8 scales stack too when
    every part's row count is a multiple of 128."""
    out = Linear(mode, ue8m0)
    out.weight = torch.cat([p.weight for p in parts], 0)
    if all(p.scale is not None for p in parts):
        if any(p.weight.shape[0] % 128 for p in parts[:-1]):
            raise ValueError("gate/up fusion needs a multiple of 128 rows per part")
        out.scale = torch.cat([p.scale for p in parts], 0)
    return out


class MLP:
    """down(silu(gate(x)) * up(x)); in FP8 mode gate and up are one GEMM and the SiLU-mul is fused
    with the quantization for the down GEMM."""

    def __init__(self, mode: str, ue8m0: bool):
        self.mode, self.ue8m0 = mode, ue8m0
        self.gate, self.up, self.down = Linear(mode, ue8m0), Linear(mode, ue8m0), Linear(mode, ue8m0)
        self.gate_up: Optional[Linear] = None

    def finalize(self) -> None:
        if self.mode == FP8_MODE:
            self.gate_up = concat_linears(self.mode, self.ue8m0, [self.gate, self.up])
            self.gate = self.up = None

    def input_linears(self) -> list:
        """The linears that read the MLP's input, its only readers (FP8 mode: the gate_up GEMM), so
        it may be given as a QuantAct for them (norm_quant_fits)."""
        return [self.gate_up] if self.mode == FP8_MODE else [self.gate, self.up]

    def __call__(self, x) -> torch.Tensor:
        """x: [T, hidden], or in FP8 mode with a quantized gate_up an fp8_ops.QuantAct of it."""
        if self.mode == REFERENCE:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        gu = self.gate_up(x)
        if self.gate_up.quantized and self.down.quantized and gu.shape[-1] % 256 == 0:
            q, s = fp8_ops.silu_mul_quant(gu, self.ue8m0)
            return fp8_ops.fp8_gemm(q, s, self.down.weight, self.down.scale)
        n = gu.shape[-1] // 2
        h = (F.silu(gu[:, :n].float()) * gu[:, n:].float()).to(torch.bfloat16)
        return self.down(h)


# ---- routing and MoE --------------------------------------------------------------------------
def _topk_stable(x, k):
    """topk whose ties go to the lowest index (torch.topk leaves them unspecified), as the kernel does."""
    v, i = torch.sort(x, dim=-1, descending=True, stable=True)
    return v[..., :k], i[..., :k]


def route_noaux_tc_torch(logits, bias, n_group, topk_group, topk, scaling, renormalize=True):
    """noaux_tc: sigmoid scores, bias only for selection, top-2-sum group scores, top groups, top-k."""
    s = logits.float().sigmoid()
    b = s + bias.float() if bias is not None else s
    t, e = b.shape
    group = _topk_stable(b.view(t, n_group, e // n_group), 2)[0].sum(-1)
    keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, _topk_stable(group, topk_group)[1], True)
    masked = b.masked_fill(~keep.repeat_interleave(e // n_group, dim=1), float("-inf"))
    ids = _topk_stable(masked, topk)[1]
    w = s.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w * scaling, ids.to(torch.int32)


class MoE:
    def __init__(self, cfg: DeepseekConfig, mode: str, ue8m0: bool):
        self.cfg, self.mode, self.ue8m0 = cfg, mode, ue8m0
        E = cfg.n_routed_experts
        self.experts = [MLP(mode, ue8m0) for _ in range(E)]
        self.shared = MLP(mode, ue8m0) if cfg.n_shared_experts else None
        self.gate_weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None
        self.w13 = self.w13_scale = self.w2 = self.w2_scale = None
        self.n_stacked_shared = 0   # 1: the shared expert is the last entry of w13 / w2 (fused_moe runs it)

    def finalize(self) -> None:
        # fp8 mode: the router weight in bf16 (as DeepSeek's inference code); its logits are accumulated
        # and kept in fp32 (router_logits), scores and routing in fp32.
        self.gate_weight = self.gate_weight.to(torch.float32 if self.mode == REFERENCE else torch.bfloat16)
        self.bias = self.bias.float()
        if self.mode == FP8_MODE and all(e.gate.quantized for e in self.experts):
            # fused_moe's layout: w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I]. A shared expert
            # of the routed experts' shape (DeepSeek-V3/R1: n_shared_experts = 1) goes last in the stacks,
            # so that a decode step streams it inside the grouped GEMMs instead of two more GEMM launches.
            stacked = list(self.experts)
            sh = self.shared
            if sh is not None and sh.gate.quantized and sh.up.quantized and sh.down.quantized and \
                    sh.gate.weight.shape == self.experts[0].gate.weight.shape and \
                    sh.down.weight.shape == self.experts[0].down.weight.shape:
                stacked.append(sh)
                self.n_stacked_shared = 1
                self.shared = None
            self.w13 = torch.stack([torch.cat([e.gate.weight, e.up.weight]) for e in stacked])
            self.w13_scale = torch.stack([torch.cat([e.gate.scale, e.up.scale]) for e in stacked])
            self.w2 = torch.stack([e.down.weight for e in stacked])
            self.w2_scale = torch.stack([e.down.scale for e in stacked])
            self.experts = None
        else:
            for e in self.experts:
                e.finalize()
        if self.shared is not None:
            self.shared.finalize()

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits. FP8 mode: bf16 gate and activations, products accumulated in fp32 and not
        rounded to bf16 (flashseek.ops.router_logits: one kernel launch at decode sizes)."""
        if self.mode == FP8_MODE and self.gate_weight.dtype == torch.bfloat16 and x.shape[-1] % 8 == 0:
            return ops.router_logits(x.to(torch.bfloat16).contiguous(), self.gate_weight)
        return (x.to(self.gate_weight.dtype) @ self.gate_weight.t()).float()

    def route(self, logits):
        c = self.cfg
        fn = fp8_ops.op("route_noaux_tc") if self.mode == FP8_MODE else None
        if fn is not None:
            return fn(logits, self.bias, c.n_group, c.topk_group, c.num_experts_per_tok,
                      c.routed_scaling_factor, renormalize=c.norm_topk_prob)
        return route_noaux_tc_torch(logits, self.bias, c.n_group, c.topk_group, c.num_experts_per_tok,
                                    c.routed_scaling_factor, c.norm_topk_prob)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        logits = self.router_logits(x)
        shared = self.shared(x) if self.shared is not None else None
        if self.w13 is not None:
            fused = fp8_ops.op("fused_moe")
            if fused is not None:
                return fused(x, logits, self.bias, self.w13, self.w13_scale, self.w2, self.w2_scale,
                             n_group=c.n_group, topk_group=c.topk_group, topk=c.num_experts_per_tok,
                             routed_scaling_factor=c.routed_scaling_factor, renormalize=c.norm_topk_prob,
                             shared_out=shared, n_shared_experts=self.n_stacked_shared, ue8m0=self.ue8m0)
            return self._experts_fp8_fallback(x, logits, shared)
        weights, ids = self.route(logits)
        out = torch.zeros(x.shape[0], c.hidden_size, dtype=torch.float32, device=x.device)
        ids = ids.long()
        for e in torch.unique(ids).tolist():
            tok, k = torch.where(ids == e)
            y = self.experts[e](x[tok]).float() * weights[tok, k, None]
            out[tok] += y   # a token picks an expert at most once, so tok has no repeats
        if shared is not None:
            out += shared.float()
        return out.to(x.dtype)

    def _stacked_expert(self, e, x):
        gu = fp8_ops.fp8_linear(x, self.w13[e], self.w13_scale[e], self.ue8m0)
        q, s = fp8_ops.silu_mul_quant(gu, self.ue8m0)
        return fp8_ops.fp8_gemm(q, s, self.w2[e], self.w2_scale[e])

    def _experts_fp8_fallback(self, x, logits, shared):
        weights, ids = self.route(logits)
        ids = ids.long()
        out = torch.zeros(x.shape[0], self.cfg.hidden_size, dtype=torch.float32, device=x.device)
        for e in torch.unique(ids).tolist():
            tok, k = torch.where(ids == e)
            out[tok] += self._stacked_expert(e, x[tok]).float() * weights[tok, k, None]
        if self.n_stacked_shared:
            shared = self._stacked_expert(self.w13.shape[0] - 1, x)
        if shared is not None:
            out += shared.float()
        return out.to(x.dtype)


# ---- MLA attention ----------------------------------------------------------------------------
class MLAAttention:
    """DeepSeek's multi-head latent attention over the paged latent cache: decode (and the absorbed
    prefill) through the MLA kernel with W_UK / W_UV absorbed, the decompressed prefill in torch.

    FP8 mode, per layer call: q_a_proj and kv_a_proj are one GEMM (they read the same x; one
    activation quantization), the glue between the projections and attention is one op
    (flashseek.ops.mla_rope_norm_append: kv_a RMSNorm, rope of k_pe and q_pe, cache append), and the
    absorption bmms write straight into the kernel's q and the o_proj input. The q_a RMSNorm runs
    fused with q_b_proj's activation quantization (flashseek.ops.rms_norm_quant_fp8), and the layer
    input x may come quantized already (an fp8_ops.QuantAct for input_linears(), from the decoder
    layer's input norm). The reference precision runs the unfused torch sequence (the op's
    specification). The class switches below turn each fusion off, for tests comparing with the
    unfused sequence; fuse_qkv_a applies at finalize().
    """
    fuse_qkv_a = True
    fuse_glue = True
    fuse_norm_quant = True

    def __init__(self, cfg: DeepseekConfig, mode: str, ue8m0: bool, prefill_mode: str = "decompressed"):
        self.cfg, self.mode, self.ue8m0 = cfg, mode, ue8m0
        if prefill_mode not in ("decompressed", "absorbed"):
            raise ValueError(f"prefill_mode must be 'decompressed' or 'absorbed', got {prefill_mode!r}")
        self.prefill_mode = prefill_mode
        L = lambda: Linear(mode, ue8m0)  # noqa: E731
        self.q_proj = L() if cfg.q_lora_rank is None else None
        self.q_a_proj, self.q_b_proj = (L(), L()) if cfg.q_lora_rank is not None else (None, None)
        self.kv_a_proj, self.kv_b_proj, self.o_proj = L(), L(), L()
        self.qkv_a_proj: Optional[Linear] = None   # [q_a_proj; kv_a_proj] after finalize (FP8 mode)
        self.q_a_norm = self.kv_a_norm = None
        self.w_uk = self.w_uv_t = None

    def finalize(self) -> None:
        c = self.cfg
        dtype = torch.float32 if self.mode == REFERENCE else torch.bfloat16
        kvb = self.kv_b_proj.dense(torch.float32).view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim,
                                                       c.kv_lora_rank)
        # Absorption, precomputed once: q_lat = q_nope @ W_UK, o = o_lat @ W_UV^T.
        self.w_uk = kvb[:, : c.qk_nope_head_dim, :].contiguous().to(dtype)      # [h, nope, lora]
        self.w_uv_t = kvb[:, c.qk_nope_head_dim:, :].transpose(1, 2).contiguous().to(dtype)  # [h, lora, v]
        if self.mode == FP8_MODE and self.fuse_qkv_a and self.q_a_proj is not None:
            qa, kva = self.q_a_proj, self.kv_a_proj
            # FP8 scales stack when q_a's rows fill whole 128-row blocks (R1: 1536 + 576 rows);
            # each output then has exactly the separate GEMM's per-block math.
            if (qa.quantized and kva.quantized and qa.weight.shape[0] % 128 == 0) or \
                    not (qa.quantized or kva.quantized):
                self.qkv_a_proj = concat_linears(self.mode, self.ue8m0, [qa, kva])
                self.q_a_proj = self.kv_a_proj = None

    def input_linears(self) -> list:
        """The linears that read the layer input x. They are its only readers (beyond its row count,
        dtype and device), so x may be given as a QuantAct for them (norm_quant_fits)."""
        if self.qkv_a_proj is not None:
            return [self.qkv_a_proj]
        return [lin for lin in (self.q_proj, self.q_a_proj, self.kv_a_proj) if lin is not None]

    def _q_b(self, q_a):
        """q_b_proj(rms_norm(q_a)); the norm fused with q_b's activation quantization where it fits."""
        c = self.cfg
        if self.fuse_norm_quant and norm_quant_fits(q_a, self.q_a_norm, [self.q_b_proj]):
            return self.q_b_proj(norm_quant(q_a, self.q_a_norm, c.rms_norm_eps, self.q_b_proj.ue8m0))
        return self.q_b_proj(norm(q_a, self.q_a_norm, c.rms_norm_eps, self.mode))

    def _project(self, x):
        """(q [T, h, qk_head_dim], kv [T, kv_lora_rank + rope]): the input projections, q_a's RMSNorm and q_b."""
        c = self.cfg
        if self.qkv_a_proj is not None:
            a = self.qkv_a_proj(x)
            q = self._q_b(a[:, : c.q_lora_rank])
            kv = a[:, c.q_lora_rank:]
        else:
            q = self.q_proj(x) if self.q_proj is not None else self._q_b(self.q_a_proj(x))
            kv = self.kv_a_proj(x)
        return q.view(x.shape[0], c.num_attention_heads, c.qk_head_dim), kv

    def _fused_glue(self, kv_cache, q) -> bool:
        c = self.cfg
        return (self.fuse_glue and self.mode == FP8_MODE and _use_mla_ops(kv_cache)
                and fp8_ops.op("mla_rope_norm_append") is not None and q.dtype in (torch.bfloat16, torch.float16)
                and c.kv_lora_rank == ref_mla.D_V and c.qk_rope_head_dim == ref_mla.D_ROPE)

    def __call__(self, x, meta: AttnMetadata, kv_cache: torch.Tensor, rope: YarnRope) -> torch.Tensor:
        """x: the normalized layer input [T, hidden], or an fp8_ops.QuantAct of it for input_linears()
        (only the projections read its values; T, dtype and device are read from either)."""
        c = self.cfg
        T, h = x.shape[0], c.num_attention_heads
        q, kv = self._project(x)
        q_nope = q[..., : c.qk_nope_head_dim]
        absorbed = False  # q_lat already holds q_nope @ W_UK (mla_absorb_rope_append)
        if self._fused_glue(kv_cache, q):
            # The absorbed query [T, h, 576] = [q_nope @ W_UK | rope(q_pe)]: the op writes the rope
            # tail of every row (the decompressed prefill reads it there too), _absorb_q the rest. A step
            # of decode rows only takes both from mla_absorb_rope_append (one launch up to 16 tokens; the
            # two ops above that, as here).
            q_lat = torch.empty(T, h, c.kv_lora_rank + c.qk_rope_head_dim, dtype=q.dtype, device=x.device)
            q_rope = q_lat[..., c.kv_lora_rank:]
            cos, sin = rope.tables
            absorbed = not meta.prefills and q.dtype == torch.bfloat16 and self.w_uk.dtype == torch.bfloat16
            if absorbed:
                ops.mla_absorb_rope_append(q, kv, self.w_uk, meta.positions, cos, sin, self.kv_a_norm,
                                           c.rms_norm_eps, meta.slot_mapping, kv_cache, q_lat=q_lat)
            else:
                ops.mla_rope_norm_append(kv, q[..., c.qk_nope_head_dim:], meta.positions, cos, sin,
                                         self.kv_a_norm, c.rms_norm_eps, meta.slot_mapping, kv_cache, q_out=q_rope)
        else:
            q_lat = None
            latent = norm(kv[:, : c.kv_lora_rank], self.kv_a_norm, c.rms_norm_eps, self.mode)
            if meta.rope_cos_sin is None:
                meta.rope_cos_sin = rope.cos_sin(meta.positions)
            cos, sin = meta.rope_cos_sin
            k_rope = YarnRope.apply(kv[:, c.kv_lora_rank:], cos, sin)
            q_rope = YarnRope.apply(q[..., c.qk_nope_head_dim:], cos, sin)
            cache_append(latent, k_rope, kv_cache, meta.slot_mapping)
        rows = lambda sl: None if q_lat is None else q_lat[sl]  # noqa: E731

        # Each section writes its rows of o, which is already the o_proj input [T, h * v].
        o = torch.empty(T, h, c.v_head_dim, dtype=x.dtype, device=x.device)
        nd = meta.num_decode
        if nd:
            if meta.decode_plan is None:
                meta.decode_plan = make_plan(kv_cache, meta.cache_seqlens[:nd], 1, h)
            ql = q_lat[:nd] if absorbed else self._absorb_q(q_nope[:nd], q_rope[:nd], rows(slice(0, nd)))
            o_lat, _ = mla_decode(ql.unsqueeze(1), kv_cache, meta.block_tables[:nd],
                                  meta.cache_seqlens[:nd], meta.decode_plan, c.softmax_scale, causal=False)
            if not meta.prefills and self._unabsorb_quant_fits(o_lat):
                # Every row is a decode row: W_UV^T's projection writes o_proj's FP8 input itself.
                oq, os_ = ops.mla_head_gemv_quant_fp8(o_lat[:, 0].transpose(0, 1), self.w_uv_t, self.o_proj.ue8m0)
                return self.o_proj(fp8_ops.QuantAct(oq, os_, self.o_proj.ue8m0, x.dtype))
            self._unabsorb(o_lat[:, 0], out=o[:nd])
        for p in meta.prefills:
            sl = slice(p.start, p.start + p.q_len)
            row = meta.block_tables[p.row: p.row + 1]
            if self.prefill_mode == "absorbed":
                self._prefill_absorbed(self._absorb_q(q_nope[sl], q_rope[sl], rows(sl)), kv_cache, row, p, meta,
                                       out=o[sl])
            else:
                o[sl] = self._prefill_decompressed(q_nope[sl], q_rope[sl], kv_cache, row[0], p.ctx_len)
        return self.o_proj(o.view(T, h * c.v_head_dim))

    def _prefill_absorbed(self, q_lat, kv_cache, row, p: PrefillSeq, meta: AttnMetadata, out=None):
        """Causal prefill through the decode kernel, whose s_q is at most MAX_SQ: the chunk is cut
        into MAX_SQ-query pieces aligned to its end (the first piece front-padded), batched as rows
        of one call, each row's length ending at its last query so the bottom-right mask holds."""
        n, h = q_lat.shape[0], q_lat.shape[1]
        s_q = min(n, MAX_SQ)
        pieces = -(-n // s_q)
        pad = pieces * s_q - n
        if p.row not in meta.prefill_plans:
            lens = [p.ctx_len - n + s_q * (j + 1) - pad for j in range(pieces)]
            seqlens = torch.tensor(lens, dtype=torch.int32, device=q_lat.device)
            meta.prefill_plans[p.row] = (seqlens, make_plan(kv_cache, seqlens, s_q, h))
        seqlens, plan = meta.prefill_plans[p.row]
        q = torch.cat([q_lat.new_zeros(pad, h, q_lat.shape[-1]), q_lat]) if pad else q_lat
        o_lat, _ = mla_decode(q.view(pieces, s_q, h, -1), kv_cache, row.expand(pieces, -1).contiguous(), seqlens,
                              plan, self.cfg.softmax_scale, causal=True)
        return self._unabsorb(o_lat.reshape(pieces * s_q, h, -1)[pad:], out=out)

    def _absorb_q(self, q_nope, q_rope, q_lat=None):
        """The absorbed query [n, h, 576] = [q_nope @ W_UK | q_rope], the product one bmm over heads
        written in place (cuBLAS takes the strided view as is). Pass q_lat when its rope tail already
        holds q_rope (mla_rope_norm_append wrote it); else it is allocated and q_rope copied in."""
        lora = self.cfg.kv_lora_rank
        dt = self.w_uk.dtype
        if q_lat is None or q_lat.dtype != dt:
            q_lat = torch.empty(q_nope.shape[0], q_nope.shape[1], lora + q_rope.shape[-1], dtype=dt,
                                device=q_nope.device)
            q_lat[..., lora:] = q_rope
        _head_bmm(q_nope.to(dt).transpose(0, 1), self.w_uk, q_lat[..., :lora].transpose(0, 1))
        return q_lat

    def _unabsorb_quant_fits(self, o_lat) -> bool:
        """Whether W_UV^T's projection may write o_proj's FP8 input (flashseek.ops.mla_head_gemv_quant_fp8):
        FP8 mode with an FP8 o_proj, bf16 absorption weights with 128-wide heads, at most
        MLA_HEAD_GEMV_KERNEL_MAX_T rows (bmm and a quantization are faster above) and a latent of at most
        MLA_HEAD_GEMV_QUANT_MAX_K, on the GPU kernel."""
        return (self.fuse_norm_quant and self.mode == FP8_MODE and self.o_proj.quantized and o_lat.is_cuda
                and o_lat.dtype == self.w_uv_t.dtype == torch.bfloat16 and self.w_uv_t.shape[2] == 128
                and o_lat.shape[0] <= ops.MLA_HEAD_GEMV_KERNEL_MAX_T and o_lat.shape[-1] % 32 == 0
                and o_lat.shape[-1] <= ops.MLA_HEAD_GEMV_QUANT_MAX_K
                and ops.has_cuda_kernel("mla_head_gemv_quant_fp8"))

    def _unabsorb(self, o_lat, out=None):
        """o [n, h, v] = o_lat [n, h, 512] @ W_UV^T per head, one bmm over heads, written straight
        into out (rows of the o_proj input) when given."""
        a = o_lat.to(self.w_uv_t.dtype).transpose(0, 1)
        if out is None:
            return _head_bmm(a, self.w_uv_t).transpose(0, 1)
        if out.dtype == self.w_uv_t.dtype:
            _head_bmm(a, self.w_uv_t, out.transpose(0, 1))
        else:
            out.copy_(_head_bmm(a, self.w_uv_t).transpose(0, 1))
        return out

    def _prefill_decompressed(self, q_nope, q_rope, kv_cache, block_row, ctx_len):
        """Standard attention with per-head keys/values expanded from the cached latents."""
        c = self.cfg
        s_q = q_nope.shape[0]
        dtype = torch.float32 if self.mode == REFERENCE else torch.bfloat16
        h = c.num_attention_heads
        kv = cache_gather(kv_cache, block_row, ctx_len).to(dtype)               # [L, 576]
        lat, k_rope = kv[:, : c.kv_lora_rank], kv[:, c.kv_lora_rank:]
        kvb = self.kv_b_proj(lat.contiguous()).to(dtype).view(ctx_len, h, -1)
        k = torch.cat([kvb[..., : c.qk_nope_head_dim], k_rope[:, None, :].expand(-1, h, -1)], dim=-1)
        q = torch.cat([q_nope.to(dtype), q_rope.to(dtype)], dim=-1)
        v = kvb[..., c.qk_nope_head_dim:]
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))                        # [h, len, d]
        out_dtype = q_nope.dtype if self.mode == FP8_MODE else torch.float32
        if q.is_cuda and dtype != torch.float32:
            return _fused_causal_attention(q, k, v, c.softmax_scale).transpose(0, 1).to(out_dtype)
        if s_q == ctx_len:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.softmax_scale)
        else:
            # Bottom-right aligned: query i sees the first ctx_len - s_q + i + 1 keys.
            visible = ctx_len - s_q + torch.arange(s_q, device=q.device) + 1
            mask = torch.arange(ctx_len, device=q.device)[None, :] < visible[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=c.softmax_scale)
        return out.transpose(0, 1).to(out_dtype)


def _fused_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [h, s_q, d] over k [h, L, d], v [h, L, dv] (dv <= d), bottom-right aligned
    (query i sees the first L - s_q + i + 1 keys), through torch's fused SDPA kernels.
    They take 4-D [batch, h, len, d] inputs only (3-D ones fell back to SDPA's math backend, which
    materialises the [h, s_q, L] scores: 4.3 GB at 4096 tokens, ~70 ms a layer on H100, bench model,
    session 12), and flash needs one head dim for q, k and v: zero columns on v (R1: 128 -> 192) change
    nothing in the output and cost 1/5 more PV work. An explicit boolean mask would rule flash out;
    CausalBias keeps it (flash aligns causal masks bottom-right)."""
    from torch.nn.attention.bias import causal_lower_right

    s_q, L, dv = q.shape[1], k.shape[1], v.shape[-1]
    if dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
    q, k, v = q[None], k[None], v[None]  # the fused kernels take [batch, h, len, d] only
    if s_q == L:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(s_q, L), scale=scale)
    return out[0, ..., :dv]


def _head_bmm(a: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head a[h] @ w[h] for the absorption: bf16 (FP8 mode) through flashseek.ops.mla_head_gemv (one
    launch at decode sizes), fp32 (reference precision) through torch.bmm."""
    if w.dtype == torch.bfloat16 and a.dtype == torch.bfloat16:
        return ops.mla_head_gemv(a, w, out)
    if out is None:
        return torch.bmm(a, w)
    return torch.bmm(a, w, out=out)


# ---- paged latent cache access ----------------------------------------------------------------
def _use_mla_ops(kv_cache: torch.Tensor) -> bool:
    # The ops take bf16 (or the FP8 byte layout); the fp32 reference-precision cache stays in torch.
    return kv_cache.dtype in (torch.bfloat16, torch.uint8)


def cache_append(latent, k_rope, kv_cache, slot_mapping) -> None:
    fn = fp8_ops.op("mla_cache_append")
    if fn is not None and _use_mla_ops(kv_cache):
        fn(latent.to(torch.bfloat16), k_rope.to(torch.bfloat16), kv_cache, slot_mapping)
        return
    ref_mla.mla_cache_append(latent, k_rope, kv_cache, slot_mapping)


def cache_gather(kv_cache, block_row, length) -> torch.Tensor:
    page_size = kv_cache.shape[1]
    pages = block_row[: (length + page_size - 1) // page_size].long()
    return ref_mla.cache_as_float(kv_cache[pages]).reshape(-1, ref_mla.D_QK)[:length]


def make_plan(kv_cache, cache_seqlens, s_q: int, h_q: int):
    """The kernel's split-KV schedule, or None where the torch reference runs."""
    fn = fp8_ops.op("mla_decode_plan")
    if fn is None or fp8_ops.op("mla_decode") is None or not _use_mla_ops(kv_cache):
        return None
    return fn(cache_seqlens, s_q, h_q)


def mla_decode(q, kv_cache, block_table, cache_seqlens, plan, softmax_scale, causal):
    """(out [b, s_q, h, 512], lse) through flashseek.ops.mla_decode, or the fp32 reference."""
    fn = fp8_ops.op("mla_decode")
    if fn is not None and _use_mla_ops(kv_cache):
        if plan is None:
            plan = make_plan(kv_cache, cache_seqlens, q.shape[1], q.shape[2])
        return fn(q.to(torch.bfloat16), kv_cache, block_table, cache_seqlens, plan, softmax_scale, causal=causal)
    out, lse = ref_mla.mla_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, causal)
    return out.to(q.dtype), lse
