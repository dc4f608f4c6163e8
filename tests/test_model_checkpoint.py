"""Config parsing, the checkpoint writer and loader, and their errors on malformed input."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashseek.models.deepseek import fp8 as fp8_ops
from flashseek.models.deepseek.checkpoint import (INDEX_NAME, ensure_default_model, iter_random_tensors,
                                                  tensor_specs, write_checkpoint)
from flashseek.models.deepseek.config import ConfigError, DeepseekConfig, r1_config, tiny_r1_config
from flashseek.models.deepseek.loader import CheckpointError, CheckpointReader
from flashseek.models.deepseek.model import DeepseekV3ForCausalLM

R1_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


# ---- config -------------------------------------------------------------------------------------
def test_parse_r1_config():
    cfg = DeepseekConfig.from_dict(R1_CONFIG)
    assert cfg == r1_config()
    assert cfg.num_nextn_predict_layers == 1 and cfg.first_k_dense_replace == 3
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.factor == 40
    assert abs(cfg.yarn_mscale - 1.3688879454113936) < 1e-12
    assert abs(cfg.softmax_scale - 192 ** -0.5 * cfg.yarn_mscale ** 2) < 1e-12
    assert cfg.quantization.weight_block_size == (128, 128) and not cfg.quantization.ue8m0
    # to_hf_dict round-trips
    assert DeepseekConfig.from_dict(cfg.to_hf_dict()) == cfg


def test_parse_v31_ue8m0_and_rope_parameters():
    d = dict(R1_CONFIG)
    d["quantization_config"] = dict(d["quantization_config"], scale_fmt="ue8m0")
    assert DeepseekConfig.from_dict(d).quantization.ue8m0
    # transformers >= 5 spelling of rope scaling
    d = dict(R1_CONFIG)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {**{k: v for k, v in rs.items() if k != "type"}, "rope_type": "yarn", "rope_theta": 5e4}
    cfg = DeepseekConfig.from_dict(d)
    assert cfg.rope_scaling.factor == 40 and cfg.rope_theta == 5e4


def test_moe_layer_freq():
    cfg = DeepseekConfig.from_dict(dict(R1_CONFIG, moe_layer_freq=2, first_k_dense_replace=1))
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, True, False, True]


def test_reject_unsupported_config_lists_every_problem():
    bad = dict(R1_CONFIG, scoring_func="softmax", hidden_act="gelu", topk_group=9,
               rope_scaling={"type": "dynamic", "factor": 2.0},
               quantization_config={"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [64, 64]})
    with pytest.raises(ConfigError) as e:
        DeepseekConfig.from_dict(bad)
    msg = str(e.value)
    for needle in ("scoring_func='softmax'", "hidden_act='gelu'", "topk_group=9", "rope_scaling.type='dynamic'",
                   "fmt='e5m2'", "weight_block_size=[64, 64]"):
        assert needle in msg, needle
    with pytest.raises(ConfigError, match="model_type='llama'"):
        DeepseekConfig.from_dict(dict(R1_CONFIG, model_type="llama"))
    with pytest.raises(ConfigError, match="num_experts_per_tok=9 exceeds"):
        DeepseekConfig.from_dict(dict(R1_CONFIG, n_group=64, topk_group=2, num_experts_per_tok=9))
    with pytest.raises(ConfigError, match="kv_lora_rank=256"):
        DeepseekConfig.from_dict(dict(R1_CONFIG, kv_lora_rank=256))


def test_config_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        DeepseekConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DeepseekConfig.from_json(tmp_path)


def test_num_layers_truncation_bounds():
    with pytest.raises(ConfigError, match="--num-layers 0"):
        tiny_r1_config().with_layers(0)
    with pytest.raises(ConfigError, match="--num-layers 9"):
        tiny_r1_config().with_layers(9)


# ---- writer and loader --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_checkpoint(tiny_r1_config(), tmp_path_factory.mktemp("tiny"), seed=11)


def test_writer_layout(tiny_dir):
    cfg = tiny_r1_config()
    index = json.loads((tiny_dir / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 2 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    specs = tensor_specs(cfg)
    assert set(index["weight_map"]) == set(specs)
    # R1's partial block: kv_a_proj_with_mqa has 576 outputs -> 5 row blocks.
    assert specs["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 2)
    assert specs["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert specs["model.layers.4.eh_proj.weight"].shape == (256, 512)   # the MTP layer
    raw = {}
    for f in files:
        raw.update(load_file(str(tiny_dir / f)))
    assert raw["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    assert raw["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert raw["model.layers.3.mlp.gate.weight"].dtype == torch.bfloat16
    assert torch.equal(raw["model.layers.4.embed_tokens.weight"], raw["model.embed_tokens.weight"])
    assert DeepseekConfig.from_json(tiny_dir) == cfg
    # weight_scale_inv is a multiplier: the dequantized weight is close to what was quantized.
    w = raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    s = raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]
    deq = fp8_ops.dequantize_weight_128x128(w, s)
    assert 0.3 < deq.std() * 256 ** 0.5 < 3


def test_writer_is_deterministic(tmp_path, tiny_dir):
    again = write_checkpoint(tiny_r1_config(), tmp_path, seed=11)
    for f in sorted(p.name for p in tiny_dir.iterdir()):
        assert (again / f).read_bytes() == (tiny_dir / f).read_bytes(), f


def test_roundtrip_and_truncation(tiny_dir):
    cfg = tiny_r1_config()
    want = dict(iter_random_tensors(cfg, seed=11))
    got = dict(CheckpointReader(tiny_dir, cfg).iter_tensors(progress=False))
    assert set(got) == {n for n in want if not n.startswith("model.layers.4.")}  # MTP not loaded
    for name, t in got.items():
        assert t.dtype == want[name].dtype and torch.equal(t.view(torch.uint8), want[name].view(torch.uint8)), name
    r = CheckpointReader(tiny_dir, cfg, num_layers=2)
    names = [n for n, _ in r.iter_tensors(progress=False)]
    assert not any(n.startswith("model.layers.2.") for n in names)
    m = DeepseekV3ForCausalLM.from_pretrained(tiny_dir, precision="reference", num_layers=3, progress=False)
    assert len(m.layers) == 3 and m.cfg.num_hidden_layers == 3


def test_bf16_checkpoint(tmp_path):
    cfg = tiny_r1_config().replace(quantization=None, num_hidden_layers=3)
    write_checkpoint(cfg, tmp_path, seed=1)
    m = DeepseekV3ForCausalLM.from_pretrained(tmp_path, precision="reference", progress=False)
    assert m.layers[0].attn.q_a_proj.weight.dtype == torch.float32


def test_default_model_cached(tmp_path):
    p = ensure_default_model(tmp_path / "d")
    stamp = (p / ".flashseek-complete").stat().st_mtime_ns
    assert ensure_default_model(tmp_path / "d") == p
    assert (p / ".flashseek-complete").stat().st_mtime_ns == stamp


# ---- malformed checkpoints ----------------------------------------------------------------------
def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _shard_of(d, name):
    return json.loads((d / INDEX_NAME).read_text())["weight_map"][name]


def _edit_shard(d, name, fn):
    """fn(tensors dict) edits the shard holding `name` in place."""
    f = _shard_of(d, name)
    tensors = load_file(str(d / f))
    fn(tensors)
    save_file(tensors, str(d / f), metadata={"format": "pt"})


def _load_error(d) -> str:
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(d, DeepseekConfig.from_json(d))
    return str(e.value)


def test_missing_tensors_all_listed(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "c")
    gone = ["model.layers.1.self_attn.o_proj.weight_scale_inv", "model.layers.3.mlp.experts.5.up_proj.weight"]
    index = json.loads((d / INDEX_NAME).read_text())
    for n in gone:
        _edit_shard(d, n, lambda t, n=n: t.pop(n))
        index["weight_map"].pop(n)
    (d / INDEX_NAME).write_text(json.dumps(index))
    msg = _load_error(d)
    assert "2 missing tensors" in msg and all(n in msg for n in gone)


def test_unexpected_tensor(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "c")
    name = "model.layers.0.self_attn.o_proj.weight"
    _edit_shard(d, name, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(3)))
    index = json.loads((d / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.0.mystery.weight"] = _shard_of(d, name)
    (d / INDEX_NAME).write_text(json.dumps(index))
    msg = _load_error(d)
    assert "1 unexpected tensors: model.layers.0.mystery.weight" in msg


def test_shape_and_dtype_mismatch(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "c")
    a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    b = "model.layers.2.mlp.gate.e_score_correction_bias"
    c = "model.norm.weight"
    _edit_shard(d, a, lambda t: t.__setitem__(a, torch.ones(4, 2)))
    _edit_shard(d, b, lambda t: t.__setitem__(b, t[b].to(torch.bfloat16)))
    _edit_shard(d, c, lambda t: t.__setitem__(c, t[c].float()))
    msg = _load_error(d)
    assert f"{a}: [4, 2], expected [5, 2]" in msg
    assert f"{b}: BF16, expected F32" in msg and f"{c}: F32, expected BF16" in msg


def test_truncated_shard(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "c")
    f = d / _shard_of(d, "model.embed_tokens.weight")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    msg = _load_error(d)
    assert "truncated file" in msg and f.name in msg
    f.write_bytes(data[:5])
    assert "truncated (no header)" in _load_error(d)


def test_bad_index_json(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "c")
    (d / INDEX_NAME).write_text('{"weight_map": ')
    assert "malformed index" in _load_error(d)
    (d / INDEX_NAME).write_text('{"metadata": {}}')
    assert "malformed index" in _load_error(d)
    (d / INDEX_NAME).unlink()
    assert "no model.safetensors.index.json" in _load_error(d)


def test_index_points_to_missing_shard(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "c")
    f = _shard_of(d, "lm_head.weight")
    (d / f).unlink()
    msg = _load_error(d)
    assert f"{f}: shard file is missing" in msg


def test_never_unpickles(tmp_path):
    import inspect

    from flashseek.models.deepseek import loader
    src = inspect.getsource(loader)
    assert "torch.load" not in src and "pickle" not in src.replace("never pickles", "")


def test_truncated_load_reads_only_needed_shards(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "c")
    wm = json.loads((d / INDEX_NAME).read_text())["weight_map"]
    needed_files = {f for n, f in wm.items() if not n.startswith("model.layers.") or n.split(".")[2] == "0"}
    spare = sorted(set(wm.values()) - needed_files)
    assert spare, "the tiny default should have a shard that a 1-layer run does not read"
    (d / spare[0]).unlink()
    assert "shard file is missing" in _load_error(d)
    r = CheckpointReader(d, DeepseekConfig.from_json(d), num_layers=1)
    assert len(dict(r.iter_tensors(progress=False))) > 0
