"""Typed DeepSeek-V3 / V3.1 / R1 configuration parsed from a Hugging Face `config.json`.

Only the architecture flashseek implements is accepted: MLA attention, sigmoid noaux_tc routing
with grouped top-k, SiLU MLPs, YaRN (or no) rope scaling, FP8 e4m3 128x128 block quantization or
unquantized bf16 weights. Anything else raises ConfigError naming every offending field, rather
than running a model that silently computes something else.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

SUPPORTED_MODEL_TYPES = ("deepseek_v3",)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (DeepSeek's `rope_scaling`), or type 'none' for plain rope."""
    type: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantConfig:
    """`quantization_config`: FP8 e4m3 with 128x128 weight blocks and dynamic 1x128 activations."""
    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple = (128, 128)
    # V3.1: activation scales (and the weight scales it shipped) are powers of two.
    scale_fmt: Optional[str] = None

    @property
    def ue8m0(self) -> bool:
        return self.scale_fmt == "ue8m0"


@dataclass(frozen=True)
class DeepseekConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    max_position_embeddings: int = 163840
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int = 0
    eos_token_id: tuple = (1,)
    quantization: Optional[QuantConfig] = field(default_factory=QuantConfig)
    model_type: str = "deepseek_v3"

    # ---- derived ------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached token: the normalized latent plus the shared roped key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def yarn_mscale(self) -> float:
        """The factor the softmax scale is multiplied by twice (DeepSeek's `mscale_all_dim`)."""
        rs = self.rope_scaling
        if rs.type != "yarn" or not rs.mscale_all_dim:
            return 1.0
        return _yarn_get_mscale(rs.factor, rs.mscale_all_dim)

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.yarn_mscale ** 2

    @property
    def rope_attention_factor(self) -> float:
        """cos/sin multiplier of YaRN: mscale(factor, mscale) / mscale(factor, mscale_all_dim)."""
        rs = self.rope_scaling
        if rs.type != "yarn":
            return 1.0
        if rs.mscale and rs.mscale_all_dim:
            return _yarn_get_mscale(rs.factor, rs.mscale) / _yarn_get_mscale(rs.factor, rs.mscale_all_dim)
        return _yarn_get_mscale(rs.factor)

    # ---- (de)serialization ------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path) -> "DeepseekConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "DeepseekConfig":
        problems: list[str] = []
        d = dict(raw)

        def take(key, default=None, cast=None):
            v = d.get(key, default)
            if v is None:
                return default
            if cast is not None:
                try:
                    return cast(v)
                except (TypeError, ValueError):
                    problems.append(f"{key}={v!r} is not a valid {cast.__name__}")
                    return default
            return v

        model_type = take("model_type", "deepseek_v3", str)
        if model_type not in SUPPORTED_MODEL_TYPES:
            problems.append(f"model_type={model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

        rope_scaling = _parse_rope_scaling(d.get("rope_scaling") or _rope_parameters_as_scaling(d), problems)
        rope_theta = take("rope_theta", None, float)
        if rope_theta is None:
            rope_theta = float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        quant = _parse_quant(d.get("quantization_config"), problems)

        eos = d.get("eos_token_id", 1)
        eos = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else ((int(eos),) if eos is not None else ())

        kw = dict(
            vocab_size=take("vocab_size", 129280, int),
            hidden_size=take("hidden_size", 7168, int),
            intermediate_size=take("intermediate_size", 18432, int),
            moe_intermediate_size=take("moe_intermediate_size", 2048, int),
            num_hidden_layers=take("num_hidden_layers", 61, int),
            num_nextn_predict_layers=take("num_nextn_predict_layers", 0, int),
            num_attention_heads=take("num_attention_heads", 128, int),
            num_key_value_heads=take("num_key_value_heads", take("num_attention_heads", 128, int), int),
            q_lora_rank=take("q_lora_rank", None, int),
            kv_lora_rank=take("kv_lora_rank", 512, int),
            qk_nope_head_dim=take("qk_nope_head_dim", 128, int),
            qk_rope_head_dim=take("qk_rope_head_dim", 64, int),
            v_head_dim=take("v_head_dim", 128, int),
            n_routed_experts=take("n_routed_experts", 0, int),
            n_shared_experts=take("n_shared_experts", 0, int),
            num_experts_per_tok=take("num_experts_per_tok", 1, int),
            n_group=take("n_group", 1, int),
            topk_group=take("topk_group", 1, int),
            routed_scaling_factor=take("routed_scaling_factor", 1.0, float),
            norm_topk_prob=bool(take("norm_topk_prob", True)),
            scoring_func=take("scoring_func", "sigmoid", str),
            topk_method=take("topk_method", "noaux_tc", str),
            first_k_dense_replace=take("first_k_dense_replace", 0, int),
            moe_layer_freq=take("moe_layer_freq", 1, int),
            hidden_act=take("hidden_act", "silu", str),
            rms_norm_eps=take("rms_norm_eps", 1e-6, float),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=take("max_position_embeddings", 163840, int),
            tie_word_embeddings=bool(take("tie_word_embeddings", False)),
            attention_bias=bool(take("attention_bias", False)),
            bos_token_id=take("bos_token_id", 0, int),
            eos_token_id=eos,
            quantization=quant,
            model_type=model_type,
        )
        cfg = cls(**kw)
        problems += cfg._problems()
        if problems:
            raise ConfigError(f"unsupported DeepSeek configuration in {source}:\n  - " + "\n  - ".join(problems))
        return cfg

    def _problems(self) -> list[str]:
        p = []
        pos = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
               "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size")
        for name in pos:
            if getattr(self, name) <= 0:
                p.append(f"{name}={getattr(self, name)} must be positive")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            p.append(f"q_lora_rank={self.q_lora_rank} must be positive or null")
        if (self.kv_lora_rank, self.qk_rope_head_dim) != (512, 64):
            p.append(f"kv_lora_rank={self.kv_lora_rank}, qk_rope_head_dim={self.qk_rope_head_dim}: the paged "
                     "latent cache and MLA kernels are built for 512 + 64 (as every DeepSeek-V3 model)")
        if self.qk_rope_head_dim % 2:
            p.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rope rotates pairs)")
        if self.hidden_act != "silu":
            p.append(f"hidden_act={self.hidden_act!r} (only 'silu')")
        if self.attention_bias:
            p.append("attention_bias=true (DeepSeek-V3 has no attention biases)")
        if self.tie_word_embeddings:
            p.append("tie_word_embeddings=true (DeepSeek-V3 keeps a separate lm_head)")
        if self.num_nextn_predict_layers < 0:
            p.append(f"num_nextn_predict_layers={self.num_nextn_predict_layers} must be >= 0")
        if self.n_routed_experts > 0:
            if self.scoring_func != "sigmoid":
                p.append(f"scoring_func={self.scoring_func!r} (only 'sigmoid', as in V3/R1)")
            if self.topk_method != "noaux_tc":
                p.append(f"topk_method={self.topk_method!r} (only 'noaux_tc', as in V3/R1)")
            if self.moe_intermediate_size <= 0:
                p.append(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
            if self.moe_layer_freq < 1:
                p.append(f"moe_layer_freq={self.moe_layer_freq} must be >= 1")
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                p.append(f"n_routed_experts={self.n_routed_experts} is not divisible into n_group={self.n_group}")
            elif not 1 <= self.topk_group <= self.n_group:
                p.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            elif self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                p.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts left after "
                         f"group selection ({self.topk_group} groups x {self.n_routed_experts // self.n_group})")
            elif self.n_routed_experts // self.n_group < 2:
                p.append("each expert group needs >= 2 experts (the group score sums the top-2)")
            if self.num_experts_per_tok < 1:
                p.append(f"num_experts_per_tok={self.num_experts_per_tok} must be >= 1")
        if self.rope_scaling.type == "yarn" and self.rope_scaling.factor < 1:
            p.append(f"rope_scaling.factor={self.rope_scaling.factor} must be >= 1")
        return p

    def fp8_path_problems(self) -> list[str]:
        """Why the FP8 activation path cannot run this config (every GEMM's K must be a multiple
        of 128, and gate/up fusion needs 128-row parts); the reference precision has no such limit."""
        ks = {"hidden_size": self.hidden_size, "kv_lora_rank": self.kv_lora_rank,
              "num_attention_heads * v_head_dim": self.num_attention_heads * self.v_head_dim,
              "intermediate_size": self.intermediate_size}
        if self.q_lora_rank is not None:
            ks["q_lora_rank"] = self.q_lora_rank
        if self.n_routed_experts:
            ks["moe_intermediate_size"] = self.moe_intermediate_size
        return [f"{k}={v} is not a multiple of 128" for k, v in ks.items() if v % 128]

    def to_hf_dict(self) -> dict:
        """The Hugging Face `config.json` of this model (the layout DeepSeek-R1 ships)."""
        d = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_nextn_predict_layers": self.num_nextn_predict_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "v_head_dim": self.v_head_dim,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": self.n_shared_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "n_group": self.n_group,
            "topk_group": self.topk_group,
            "routed_scaling_factor": self.routed_scaling_factor,
            "norm_topk_prob": self.norm_topk_prob,
            "scoring_func": self.scoring_func,
            "topk_method": self.topk_method,
            "first_k_dense_replace": self.first_k_dense_replace,
            "moe_layer_freq": self.moe_layer_freq,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling.type == "none" else {
                "type": "yarn",
                "factor": self.rope_scaling.factor,
                "original_max_position_embeddings": self.rope_scaling.original_max_position_embeddings,
                "beta_fast": self.rope_scaling.beta_fast,
                "beta_slow": self.rope_scaling.beta_slow,
                "mscale": self.rope_scaling.mscale,
                "mscale_all_dim": self.rope_scaling.mscale_all_dim,
            },
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            "torch_dtype": "bfloat16",
            "use_cache": True,
        }
        if self.quantization is not None:
            q = self.quantization
            d["quantization_config"] = {
                "quant_method": q.quant_method, "fmt": q.fmt, "activation_scheme": q.activation_scheme,
                "weight_block_size": list(q.weight_block_size),
            }
            if q.scale_fmt:
                d["quantization_config"]["scale_fmt"] = q.scale_fmt
        return d

    def with_layers(self, n: int) -> "DeepseekConfig":
        if not 1 <= n <= self.num_hidden_layers:
            raise ConfigError(f"--num-layers {n} must be in [1, {self.num_hidden_layers}]")
        return replace(self, num_hidden_layers=n)

    def replace(self, **kw) -> "DeepseekConfig":
        cfg = replace(self, **kw)
        problems = cfg._problems()
        if problems:
            raise ConfigError("unsupported DeepSeek configuration:\n  - " + "\n  - ".join(problems))
        return cfg

    def summary(self) -> str:
        moe = sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        return (f"DeepSeek-V3 arch: {self.num_hidden_layers} layers ({self.num_hidden_layers - moe} dense, "
                f"{moe} MoE), hidden {self.hidden_size}, {self.num_attention_heads} heads, "
                f"{self.n_routed_experts} experts top-{self.num_experts_per_tok}, vocab {self.vocab_size}, "
                f"{'fp8' + (' ue8m0' if self.quantization.ue8m0 else '') if self.quantization else 'bf16'} weights")


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _rope_parameters_as_scaling(d: dict):
    """transformers >= 5 writes `rope_parameters` (with rope_type) instead of `rope_scaling`."""
    rp = d.get("rope_parameters")
    if not rp or rp.get("rope_type", "default") == "default":
        return None
    out = dict(rp)
    out["type"] = out.pop("rope_type")
    out.pop("rope_theta", None)
    return out


def _parse_rope_scaling(rs, problems) -> RopeScaling:
    if rs is None:
        return RopeScaling()
    if not isinstance(rs, dict):
        problems.append(f"rope_scaling={rs!r} must be an object")
        return RopeScaling()
    kind = rs.get("type", rs.get("rope_type"))
    if kind in (None, "default"):
        return RopeScaling()
    if kind != "yarn":
        problems.append(f"rope_scaling.type={kind!r} (only 'yarn', as in V3/R1)")
        return RopeScaling()
    known = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"}
    unknown = sorted(set(rs) - known)
    if unknown:
        problems.append(f"rope_scaling has unsupported keys {unknown}")
    if rs.get("truncate", True) is not True:
        problems.append("rope_scaling.truncate=false is not supported")
    if "factor" not in rs or "original_max_position_embeddings" not in rs:
        problems.append("rope_scaling (yarn) needs factor and original_max_position_embeddings")
        return RopeScaling()
    try:
        return RopeScaling(
            type="yarn", factor=float(rs["factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
            mscale=float(rs.get("mscale", 1.0) or 0.0), mscale_all_dim=float(rs.get("mscale_all_dim", 0.0) or 0.0))
    except (TypeError, ValueError) as exc:
        problems.append(f"rope_scaling has a non-numeric value: {exc}")
        return RopeScaling()


def _parse_quant(q, problems) -> Optional[QuantConfig]:
    if q is None:
        return None
    if not isinstance(q, dict):
        problems.append(f"quantization_config={q!r} must be an object")
        return None
    method = q.get("quant_method")
    if method != "fp8":
        problems.append(f"quantization_config.quant_method={method!r} (only 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        problems.append(f"quantization_config.fmt={fmt!r} (only 'e4m3')")
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        problems.append(f"quantization_config.activation_scheme={scheme!r} (only 'dynamic')")
    block = tuple(q.get("weight_block_size", (128, 128)))
    if block != (128, 128):
        problems.append(f"quantization_config.weight_block_size={list(block)} (only [128, 128])")
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        problems.append(f"quantization_config.scale_fmt={scale_fmt!r} (only 'ue8m0' or absent)")
    return QuantConfig(quant_method=str(method), fmt=str(fmt), activation_scheme=str(scheme),
                       weight_block_size=block, scale_fmt=scale_fmt)


# ---- presets ----------------------------------------------------------------------------------
def r1_config(num_layers: Optional[int] = None) -> DeepseekConfig:
    """DeepSeek-R1's published config.json (V3 has the same architecture)."""
    cfg = DeepseekConfig(
        num_hidden_layers=61, num_nextn_predict_layers=1, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
        rope_scaling=RopeScaling(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                 beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=163840)
    return cfg if num_layers is None else replace(cfg, num_hidden_layers=num_layers, num_nextn_predict_layers=0)


def tiny_r1_config() -> DeepseekConfig:
    """The embedded default: R1's architecture at toy sizes, FP8 128x128-blocked like R1.

    Every GEMM's K is a multiple of 128 (the FP8 activation path needs it); kv_a_proj has R1's
    576 outputs, so its last weight block is partial exactly as in the real checkpoint.
    """
    return DeepseekConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_nextn_predict_layers=1, num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=384, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=2,
        rope_scaling=RopeScaling(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                                 beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=163840)


def as_dict(cfg: DeepseekConfig) -> dict:
    return asdict(cfg)
