"""The reference-precision model against Hugging Face transformers' DeepseekV3ForCausalLM (fp32, CPU)
on the same dequantized FP8 weights: logits within 1e-4 relative error, identical greedy tokens."""
import pytest
import torch

from flashseek.engine.session import Session
from flashseek.models.deepseek import fp8 as fp8_ops
from flashseek.models.deepseek.checkpoint import write_checkpoint
from flashseek.models.deepseek.config import DeepseekConfig, QuantConfig, tiny_r1_config
from flashseek.models.deepseek.loader import CheckpointReader
from flashseek.models.deepseek.model import DeepseekV3ForCausalLM

transformers = pytest.importorskip("transformers")


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


def config_b() -> DeepseekConfig:
    """No q LoRA, no YaRN, one dense layer, 2 shared experts, partial 128-blocks everywhere, and
    V3.1's power-of-two (ue8m0) scales."""
    return DeepseekConfig(
        vocab_size=512, hidden_size=192, intermediate_size=320, moe_intermediate_size=96, num_hidden_layers=3,
        num_nextn_predict_layers=0, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=48, n_routed_experts=8,
        n_shared_experts=2, num_experts_per_tok=3, n_group=2, topk_group=1, routed_scaling_factor=1.5,
        first_k_dense_replace=1, max_position_embeddings=4096,
        quantization=QuantConfig(scale_fmt="ue8m0"))


def hf_model(cfg: DeepseekConfig, model_dir):
    d = cfg.to_hf_dict()
    d.pop("quantization_config", None)
    hf_cfg = transformers.DeepseekV3Config(**d, attn_implementation="eager")
    hf_cfg.num_mtp_layers = 0
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).float().eval()
    raw = dict(CheckpointReader(model_dir, cfg, cfg.num_hidden_layers).iter_tensors(progress=False))
    sd = {}
    for name, t in raw.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = raw.get(name[: -len("weight")] + "weight_scale_inv") if name.endswith("weight") else None
        sd[name] = fp8_ops.dequantize_weight_128x128(t, scale) if scale is not None else t.float()
    for i in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(i):
            continue
        p = f"model.layers.{i}.mlp.experts."
        E = cfg.n_routed_experts
        gate_up = [torch.cat([sd.pop(f"{p}{e}.gate_proj.weight"), sd.pop(f"{p}{e}.up_proj.weight")]) for e in range(E)]
        sd[p + "gate_up_proj"] = torch.stack(gate_up)
        sd[p + "down_proj"] = torch.stack([sd.pop(f"{p}{e}.down_proj.weight") for e in range(E)])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "rotary" not in m], missing
    # Set explicitly: HF zero-inits the bias buffer, and load_state_dict must have replaced it.
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            bias = model.model.layers[i].mlp.gate.e_score_correction_bias
            assert torch.equal(bias, sd[f"model.layers.{i}.mlp.gate.e_score_correction_bias"])
    return model


def hf_greedy(model, prompt, steps):
    cache = transformers.DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    toks, logits_all = [], []
    with torch.no_grad():
        out = model(input_ids=ids, cache=cache, use_cache=True)
        prefill_logits = out.logits[0]
        logits = prefill_logits[-1]
        for i in range(steps):
            logits_all.append(logits)
            t = int(torch.argmax(logits))
            toks.append(t)
            if i + 1 < steps:
                out = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
                logits = out.logits[0, -1]
    return prefill_logits, toks, logits_all


@pytest.mark.parametrize("which", ["tiny_r1", "config_b"])
def test_logits_and_greedy_match_hf(tmp_path, which):
    cfg = tiny_r1_config() if which == "tiny_r1" else config_b()
    write_checkpoint(cfg, tmp_path, seed=7)
    hf = hf_model(cfg, tmp_path)
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path, precision="reference", progress=False)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=g).tolist()
    hf_prefill, hf_toks, hf_logits = hf_greedy(hf, prompt, 32)

    sess = Session(ours, max_len=128)
    our_prefill = sess.prefill(prompt)
    assert rel_err(our_prefill, hf_prefill) < 1e-4
    sess2 = Session(ours, max_len=128)
    toks, logits = sess2.greedy(prompt, 32)
    assert toks == hf_toks
    for a, b in zip(logits, hf_logits):
        assert rel_err(a, b) < 1e-4


def test_hf_routing_is_nontrivial(tmp_path):
    """The tiny default really exercises group routing: tokens land in different group pairs."""
    from flashseek.models.deepseek.layers import route_noaux_tc_torch
    cfg = tiny_r1_config()
    logits = torch.randn(256, cfg.n_routed_experts)
    bias = 0.05 * torch.randn(cfg.n_routed_experts)
    _, ids = route_noaux_tc_torch(logits, bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, 2.5)
    groups = (ids.long() // (cfg.n_routed_experts // cfg.n_group)).sort(-1).values
    assert len({tuple(g.unique().tolist()) for g in groups}) > 3
    assert all(len(g.unique()) <= cfg.topk_group for g in groups)
