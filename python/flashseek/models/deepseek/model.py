"""DeepSeek-V3/R1 causal LM over a paged latent KV cache."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

from flashseek.models.deepseek.checkpoint import DEFAULT_SEED, iter_random_tensors
from flashseek.models.deepseek.config import DeepseekConfig
from flashseek.models.deepseek.layers import (FP8_MODE, REFERENCE, MLAAttention, AttnMetadata, MLP, MoE,
                                              YarnRope, add_norm, add_norm_quant, norm, norm_quant,
                                              norm_quant_fits)
from flashseek.models.deepseek.loader import CheckpointReader, load_config


class DecoderLayer:
    """FP8 mode: a norm whose output only FP8 linears read runs fused with their activation
    quantization (norm_quant / add_norm_quant): the input norm before the attention's input
    projections and the post-attention norm before a dense MLP's gate_up. Not before an MoE: its
    router reads the bf16 hidden state and fused_moe quantizes inside its dispatch. The switch turns
    this off, for tests comparing with the unfused sequence (MLAAttention.fuse_norm_quant does the
    same for the q_a norm)."""
    fuse_norm_quant = True

    def __init__(self, cfg: DeepseekConfig, idx: int, mode: str, ue8m0: bool, prefill_mode: str):
        self.idx = idx
        self.mode = mode
        self.eps = cfg.rms_norm_eps
        self.attn = MLAAttention(cfg, mode, ue8m0, prefill_mode)
        self.mlp = MoE(cfg, mode, ue8m0) if cfg.is_moe_layer(idx) else MLP(mode, ue8m0)
        self.input_norm = self.post_attn_norm = None

    def finalize(self):
        self.attn.finalize()
        self.mlp.finalize()

    def forward(self, x, residual, meta, kv_cache, rope):
        """One layer with the residual stream kept apart (vLLM-style), so each residual add fuses
        with the RMSNorm after it: returns (out, residual) whose sum residual + out is the layer's
        output hidden state. Pass residual=None for the first layer (x is then the hidden state).
        In FP8 mode x and residual may be updated in place: pass tensors this call may overwrite."""
        x, residual = self.norm_input(x, residual)
        a = self.attn(x, meta, kv_cache, rope).to(residual.dtype)
        a, residual = self.norm_post_attn(a, residual)
        return self.mlp(a).to(residual.dtype), residual

    def norm_input(self, x, residual):
        """The input RMSNorm as forward runs it: (the attention's input, residual). With residual None,
        x is the hidden state and becomes the residual; otherwise the residual add fuses with the norm.
        Where only FP8 linears read the output, it comes as a QuantAct from the norm's own kernel."""
        lins = self.attn.input_linears()
        if self.fuse_norm_quant and norm_quant_fits(x, self.input_norm, lins, residual):
            ue8m0 = lins[0].ue8m0
            if residual is None:
                return norm_quant(x, self.input_norm, self.eps, ue8m0), x
            return add_norm_quant(x, residual, self.input_norm, self.eps, ue8m0)
        if residual is None:
            return norm(x, self.input_norm, self.eps, self.mode), x
        return add_norm(x, residual, self.input_norm, self.eps, self.mode)

    def norm_post_attn(self, a, residual):
        """The post-attention residual add + RMSNorm as forward runs it: (the MLP's input, residual), a
        QuantAct for a dense MLP's FP8 gate_up where that fits (an MoE reads the bf16 hidden state)."""
        lins = self.mlp.input_linears() if isinstance(self.mlp, MLP) else None
        if lins and self.fuse_norm_quant and norm_quant_fits(a, self.post_attn_norm, lins, residual):
            return add_norm_quant(a, residual, self.post_attn_norm, self.eps, lins[0].ue8m0)
        return add_norm(a, residual, self.post_attn_norm, self.eps, self.mode)

    def __call__(self, x, meta, kv_cache, rope):
        """The layer's output hidden state; x is left untouched."""
        out, residual = self.forward(x.clone(), None, meta, kv_cache, rope)
        return residual + out


class DeepseekV3ForCausalLM:
    """precision "reference" (fp32, dequantized weights, pure torch) or "fp8" (the kernel path).

    prefill_mode "decompressed" expands per-head keys/values from the cached latents;
    "absorbed" runs prefill through the MLA kernel with s_q = chunk length, causally.
    """

    def __init__(self, cfg: DeepseekConfig, device="cpu", precision: str = FP8_MODE,
                 prefill_mode: str = "decompressed"):
        if precision not in (REFERENCE, FP8_MODE):
            raise ValueError(f"precision must be {REFERENCE!r} or {FP8_MODE!r}, got {precision!r}")
        if precision == FP8_MODE and cfg.quantization is not None and cfg.fp8_path_problems():
            raise ValueError("the fp8 precision cannot run this config (use precision='reference'): "
                             + "; ".join(cfg.fp8_path_problems()))
        self.cfg = cfg
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = torch.float32 if precision == REFERENCE else torch.bfloat16
        ue8m0 = cfg.quantization is not None and cfg.quantization.ue8m0
        self.layers = [DecoderLayer(cfg, i, precision, ue8m0, prefill_mode) for i in range(cfg.num_hidden_layers)]
        self.embed = self.norm = self.lm_head = None
        self.rope = YarnRope(cfg, self.device)

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.dtype

    def set_prefill_mode(self, mode: str) -> None:
        for layer in self.layers:
            layer.attn.prefill_mode = mode

    # ---- weights ------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        pending: dict[str, torch.Tensor] = {}
        seen = set()
        for name, t in named_tensors:
            seen.add(name)
            if name.endswith(".weight_scale_inv"):
                base = name[: -len(".weight_scale_inv")]
                w = pending.pop(base + ".weight", None)
                if w is None:
                    pending[name] = t
                else:
                    self._linear(base).set(w, t)
                continue
            if name.endswith(".weight") and self._is_linear(name):
                base = name[: -len(".weight")]
                s = pending.pop(base + ".weight_scale_inv", None)
                if s is not None or self.cfg.quantization is None:
                    self._linear(base).set(t, s)
                else:
                    pending[name] = t
                continue
            self._assign(name, t)
        if pending:
            raise ValueError(f"weights without their scales (or scales without weights): {sorted(pending)}")
        for layer in self.layers:
            layer.finalize()

    def _is_linear(self, name: str) -> bool:
        return name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight")

    def _layer(self, name):
        return self.layers[int(name.split(".")[2])]

    def _linear(self, base: str):
        layer = self._layer(base)
        parts = base.split(".")[3:]
        if parts[0] == "self_attn":
            attr = {"q_proj": "q_proj", "q_a_proj": "q_a_proj", "q_b_proj": "q_b_proj",
                    "kv_a_proj_with_mqa": "kv_a_proj", "kv_b_proj": "kv_b_proj", "o_proj": "o_proj"}[parts[1]]
            return getattr(layer.attn, attr)
        mlp = layer.mlp
        if parts[1] == "experts":
            mlp = mlp.experts[int(parts[2])]
        elif parts[1] == "shared_experts":
            mlp = mlp.shared
        return getattr(mlp, {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}[parts[-1]])

    def _assign(self, name: str, t: torch.Tensor) -> None:
        t = t.to(self.device)
        if name == "model.embed_tokens.weight":
            self.embed = t.to(self.dtype)
        elif name == "model.norm.weight":
            self.norm = t
        elif name == "lm_head.weight":
            self.lm_head = t.to(self.dtype)
        elif name.endswith("input_layernorm.weight"):
            self._layer(name).input_norm = t
        elif name.endswith("post_attention_layernorm.weight"):
            self._layer(name).post_attn_norm = t
        elif name.endswith("q_a_layernorm.weight"):
            self._layer(name).attn.q_a_norm = t
        elif name.endswith("kv_a_layernorm.weight"):
            self._layer(name).attn.kv_a_norm = t
        elif name.endswith("mlp.gate.weight"):
            self._layer(name).mlp.gate_weight = t
        elif name.endswith("mlp.gate.e_score_correction_bias"):
            self._layer(name).mlp.bias = t
        else:
            raise ValueError(f"unexpected tensor {name}")

    @classmethod
    def from_pretrained(cls, model_dir, device="cpu", precision: str = FP8_MODE, num_layers: Optional[int] = None,
                        progress: bool = True, prefill_mode: str = "decompressed") -> "DeepseekV3ForCausalLM":
        cfg = load_config(model_dir)
        reader = CheckpointReader(model_dir, cfg, num_layers)
        model = cls(reader.cfg, device, precision, prefill_mode)
        model.load_weights(reader.iter_tensors(model.device, progress=progress))
        model.source = str(Path(model_dir))
        return model

    @classmethod
    def from_random(cls, cfg: DeepseekConfig, device="cpu", precision: str = FP8_MODE, seed: int = DEFAULT_SEED,
                    prefill_mode: str = "decompressed") -> "DeepseekV3ForCausalLM":
        """The model a seeded random checkpoint of cfg holds, generated directly on the device."""
        model = cls(cfg, device, precision, prefill_mode)
        model.load_weights(iter_random_tensors(cfg, seed, model.device, include_mtp=False))
        model.source = f"random(seed={seed})"
        return model

    # ---- forward ------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, meta: AttnMetadata, kv_caches: list) -> torch.Tensor:
        x = self.embed[input_ids]  # a fresh tensor (advanced indexing copies): the layers may overwrite it
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer.forward(x, residual, meta, cache, self.rope)
        # The last add stays unfused: the final norm runs only on the rows whose logits are wanted.
        return x if residual is None else residual + x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = norm(x, self.norm, self.cfg.rms_norm_eps, self.precision)
        return (x @ self.lm_head.t()).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, kv_caches: list,
                logits_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (fp32) of the tokens at logits_indices (all tokens when None)."""
        x = self.hidden_states(input_ids, meta, kv_caches)
        if logits_indices is not None:
            x = x[logits_indices]
        return self.logits(x)

    def weight_bytes(self) -> int:
        tot = 0
        for obj in _walk(self):
            tot += obj.numel() * obj.element_size()
        return tot


def _walk(model):
    seen = set()
    stack = [model]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            if id(o) not in seen:
                seen.add(id(o))
                yield o
            continue
        if isinstance(o, (list, tuple)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, (type, torch.device, DeepseekConfig, YarnRope)):
            stack.extend(v for k, v in vars(o).items() if k != "cfg")
