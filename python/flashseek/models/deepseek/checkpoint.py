"""The Hugging Face tensor layout of DeepSeek-V3/R1 checkpoints, and a writer of seeded random ones.

`tensor_specs(cfg)` lists every tensor a checkpoint of `cfg` holds (name -> shape, dtype), MTP
layers included; the loader validates against it and the writer emits exactly it. The writer
produces the "embedded default" model the CLI uses without --model, and full-dimension random
checkpoints for timing: FP8 e4m3 weights with fp32 `weight_scale_inv` per 128x128 block (partial
edge blocks included), bf16 norms/router/embeddings, fp32 `e_score_correction_bias`, sharded
`model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json` and `config.json`.
"""
from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from flashseek.models.deepseek import fp8 as fp8_ops
from flashseek.models.deepseek.config import DeepseekConfig, tiny_r1_config

FP8 = torch.float8_e4m3fn
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    dtype: torch.dtype
    # What the writer fills it with: "linear" (quantized if the config is), "norm", "embed",
    # "router", "bias", "head"; scales are implied by their weight.
    kind: str
    fan_in: int = 1


def _cdiv(a, b):
    return (a + b - 1) // b


def linear_names(cfg: DeepseekConfig, layer: int) -> dict:
    """name prefix -> (out, in) of every (possibly FP8) linear of one decoder layer."""
    p = f"model.layers.{layer}."
    h, H = cfg.num_attention_heads, cfg.hidden_size
    out = {}
    if cfg.q_lora_rank is None:
        out[p + "self_attn.q_proj"] = (h * cfg.qk_head_dim, H)
    else:
        out[p + "self_attn.q_a_proj"] = (cfg.q_lora_rank, H)
        out[p + "self_attn.q_b_proj"] = (h * cfg.qk_head_dim, cfg.q_lora_rank)
    out[p + "self_attn.kv_a_proj_with_mqa"] = (cfg.latent_dim, H)
    out[p + "self_attn.kv_b_proj"] = (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    out[p + "self_attn.o_proj"] = (H, h * cfg.v_head_dim)
    if cfg.is_moe_layer(layer):
        I = cfg.moe_intermediate_size
        for e in range(cfg.n_routed_experts):
            q = f"{p}mlp.experts.{e}."
            out[q + "gate_proj"], out[q + "up_proj"], out[q + "down_proj"] = (I, H), (I, H), (H, I)
        if cfg.n_shared_experts:
            Is = I * cfg.n_shared_experts
            q = f"{p}mlp.shared_experts."
            out[q + "gate_proj"], out[q + "up_proj"], out[q + "down_proj"] = (Is, H), (Is, H), (H, Is)
    else:
        I = cfg.intermediate_size
        q = f"{p}mlp."
        out[q + "gate_proj"], out[q + "up_proj"], out[q + "down_proj"] = (I, H), (I, H), (H, I)
    return out


def tensor_specs(cfg: DeepseekConfig, include_mtp: bool = True) -> dict[str, TensorSpec]:
    """Every tensor of a checkpoint of `cfg`, in the order the writer emits them."""
    H, V = cfg.hidden_size, cfg.vocab_size
    bf16 = torch.bfloat16
    specs: dict[str, TensorSpec] = {"model.embed_tokens.weight": TensorSpec((V, H), bf16, "embed")}
    n_layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        specs[p + "input_layernorm.weight"] = TensorSpec((H,), bf16, "norm")
        specs[p + "post_attention_layernorm.weight"] = TensorSpec((H,), bf16, "norm")
        if cfg.q_lora_rank is not None:
            specs[p + "self_attn.q_a_layernorm.weight"] = TensorSpec((cfg.q_lora_rank,), bf16, "norm")
        specs[p + "self_attn.kv_a_layernorm.weight"] = TensorSpec((cfg.kv_lora_rank,), bf16, "norm")
        for name, (n, k) in linear_names(cfg, i).items():
            if cfg.quantization is not None:
                specs[name + ".weight"] = TensorSpec((n, k), FP8, "linear", k)
                specs[name + ".weight_scale_inv"] = TensorSpec((_cdiv(n, 128), _cdiv(k, 128)), torch.float32,
                                                               "scale")
            else:
                specs[name + ".weight"] = TensorSpec((n, k), bf16, "linear", k)
        if cfg.is_moe_layer(i):
            specs[p + "mlp.gate.weight"] = TensorSpec((cfg.n_routed_experts, H), bf16, "router", H)
            specs[p + "mlp.gate.e_score_correction_bias"] = TensorSpec((cfg.n_routed_experts,), torch.float32,
                                                                        "bias")
        if i >= cfg.num_hidden_layers:  # multi-token-prediction module
            specs[p + "enorm.weight"] = TensorSpec((H,), bf16, "norm")
            specs[p + "hnorm.weight"] = TensorSpec((H,), bf16, "norm")
            specs[p + "eh_proj.weight"] = TensorSpec((H, 2 * H), bf16, "linear", 2 * H)
            specs[p + "shared_head.norm.weight"] = TensorSpec((H,), bf16, "norm")
            specs[p + "shared_head.head.weight"] = TensorSpec((V, H), bf16, "head", H)
            specs[p + "embed_tokens.weight"] = TensorSpec((V, H), bf16, "embed")
    specs["model.norm.weight"] = TensorSpec((H,), bf16, "norm")
    specs["lm_head.weight"] = TensorSpec((V, H), bf16, "head", H)
    return specs


# ---- seeded random weights -------------------------------------------------------------------
def _generator(seed: int, name: str, device) -> torch.Generator:
    # Seeded per tensor name, so any subset (a truncated layer count, one shard) is reproducible
    # regardless of the order tensors are produced in.
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def random_tensor(name: str, spec: TensorSpec, seed: int, device="cpu") -> torch.Tensor:
    """The value the writer gives one non-scale tensor (bf16/fp32, before quantization)."""
    # The MTP module's embedding and head are copies of the main model's, as in DeepSeek's checkpoints.
    name = re.sub(r"^model\.layers\.\d+\.embed_tokens\.", "model.embed_tokens.", name)
    name = re.sub(r"^model\.layers\.\d+\.shared_head\.head\.", "lm_head.", name)
    g = _generator(seed, name, device)
    shape = spec.shape
    if spec.kind == "norm":
        return (1.0 + 0.1 * torch.randn(shape, generator=g, device=device)).to(torch.bfloat16)
    if spec.kind == "embed":
        return torch.randn(shape, generator=g, device=device).to(torch.bfloat16)
    if spec.kind == "bias":
        return 0.05 * torch.randn(shape, generator=g, device=device)
    if spec.kind == "router":
        return (torch.randn(shape, generator=g, device=device) * spec.fan_in ** -0.5).to(torch.bfloat16)
    if spec.kind == "head":
        # Random weights give logits with no margin: the top-1 of a random model flips under any
        # rounding, unlike a trained model's. So each vocab row also carries the embedding of one
        # token (a seeded permutation), making "next = perm(current)" a confident prediction that
        # the layers perturb; the FP8 path can then be held to >= 99% top-1 agreement.
        embed = random_tensor("model.embed_tokens.weight", TensorSpec(shape, torch.bfloat16, "embed"), seed,
                              device).float()
        perm = torch.randperm(shape[0], generator=g, device=device)
        noise = torch.randn(shape, generator=g, device=device)
        return ((embed[perm] + 0.5 * noise) * 4.0 * spec.fan_in ** -0.5).to(torch.bfloat16)
    if spec.kind == "linear":
        w = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * spec.fan_in ** -0.5
        return w
    raise ValueError(f"no random init for {name} ({spec.kind})")


def iter_random_tensors(cfg: DeepseekConfig, seed: int = DEFAULT_SEED, device="cpu", include_mtp: bool = True,
                        names: Optional[set] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) of a seeded random checkpoint in the HF layout, FP8-quantized as the
    config says. Scales follow their weight immediately."""
    specs = tensor_specs(cfg, include_mtp)
    ue8m0 = cfg.quantization is not None and cfg.quantization.ue8m0
    for name, spec in specs.items():
        if spec.kind == "scale" or (names is not None and name not in names):
            continue
        t = random_tensor(name, spec, seed, device)
        if spec.kind == "linear":
            if spec.dtype == FP8:
                q, s = fp8_ops.quantize_weight_128x128(t, ue8m0)
                yield name, q
                yield name[: -len("weight")] + "weight_scale_inv", s.float()
                continue
            t = t.to(torch.bfloat16)
        yield name, t


def write_checkpoint(cfg: DeepseekConfig, out_dir, seed: int = DEFAULT_SEED, shard_bytes: int = 4 << 20,
                     device="cpu", progress: bool = False) -> Path:
    """Writes a seeded random checkpoint of `cfg` in the exact Hugging Face layout to out_dir.

    Shards are cut when they exceed shard_bytes (the tiny default gets several). Deterministic:
    the same cfg and seed give byte-identical files.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model-*.safetensors"):
        old.unlink()
    shards: list[dict] = []
    current: dict = {}
    size = 0
    it = iter_random_tensors(cfg, seed, device)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(tensor_specs(cfg)), desc="writing random checkpoint", unit="tensor")
    tmp_names = []

    def flush():
        nonlocal current, size
        if current:
            path = out / f".shard-{len(tmp_names)}.tmp"
            save_file(current, str(path), metadata={"format": "pt"})
            tmp_names.append(path)
            shards.append(list(current))
            current, size = {}, 0

    for name, t in it:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes and not name.endswith("weight_scale_inv"):
            flush()
        current[name] = t.contiguous().cpu()
        size += nbytes
    flush()
    n = len(tmp_names)
    weight_map, total = {}, 0
    for i, (tmp, names) in enumerate(zip(tmp_names, shards)):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(tmp, out / final)
        for name in names:
            weight_map[name] = final
    for name, spec in tensor_specs(cfg).items():
        total += _numel(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                             indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    return out


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def default_model_dir() -> Path:
    root = os.environ.get("FLASHSEEK_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashseek")
    return Path(root) / "tiny-r1"


def ensure_default_model(path=None, seed: int = DEFAULT_SEED) -> Path:
    """Writes the embedded default (tiny R1-architecture, FP8) checkpoint once and returns its dir."""
    path = Path(path) if path is not None else default_model_dir()
    stamp = path / ".flashseek-complete"
    cfg = tiny_r1_config()
    want = json.dumps({"seed": seed, "config": cfg.to_hf_dict(), "version": 1}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        return path
    write_checkpoint(cfg, path, seed=seed)
    stamp.write_text(want)
    return path
