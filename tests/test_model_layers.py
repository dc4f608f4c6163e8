"""Model-internal consistency: prefill forms, chunking, decode vs prefill, routing, FP8 vs reference."""
import math

import pytest
import torch

import flashseek.ops as ops
from flashseek.engine.session import Session
from flashseek.models.deepseek.checkpoint import ensure_default_model
from flashseek.models.deepseek.config import tiny_r1_config
from flashseek.models.deepseek.layers import YarnRope, route_noaux_tc_torch
from flashseek.models.deepseek.model import DeepseekV3ForCausalLM


def rel_err(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def ref_model(model_dir):
    return DeepseekV3ForCausalLM.from_pretrained(model_dir, precision="reference", progress=False)


@pytest.fixture(scope="module")
def fp8_model(model_dir):
    return DeepseekV3ForCausalLM.from_pretrained(model_dir, precision="fp8", progress=False)


def ids(n, seed=0):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("precision", ["reference", "fp8"])
def test_prefill_decompressed_equals_absorbed(request, precision):
    model = request.getfixturevalue(f"{'ref' if precision == 'reference' else 'fp8'}_model")
    prompt = ids(150, 1)
    try:
        model.set_prefill_mode("decompressed")
        a = Session(model, max_len=256).prefill(prompt, chunk=100)
        model.set_prefill_mode("absorbed")
        b = Session(model, max_len=256).prefill(prompt, chunk=100)
    finally:
        model.set_prefill_mode("decompressed")
    # fp8: the two forms round differently (the decompressed path quantizes the latent for kv_b,
    # the absorbed one multiplies by bf16 W_UK/W_UV), and a random 4-layer net compounds it.
    assert rel_err(b, a) < (1e-5 if precision == "reference" else 0.3)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.99


def test_chunked_prefill_and_decode_match_full_prefill(ref_model):
    prompt = ids(140, 2)
    full = Session(ref_model, max_len=256).prefill(prompt)
    chunked = Session(ref_model, max_len=256).prefill(prompt, chunk=37)
    assert rel_err(chunked, full) < 1e-5
    s = Session(ref_model, max_len=256)
    s.prefill(prompt[:130])
    steps = torch.stack([s.decode([t])[0] for t in prompt[130:]])
    assert rel_err(steps, full[130:]) < 1e-5


def test_fp8_path_agrees_with_reference(ref_model, fp8_model):
    """The CPU counterpart of the GPU kernel-vs-reference test: FP8 GEMMs with quantized
    activations, bf16 activations and cache, against dequantized fp32."""
    prompt = ids(256, 3)
    a = Session(ref_model, max_len=256).prefill(prompt)
    b = Session(fp8_model, max_len=256).prefill(prompt)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.99
    assert rel_err(b, a) < 0.3   # random weights: FP8 noise compounds over 4 layers, see checkpoint.py


def test_fp8_moe_layers_stack_the_shared_expert(fp8_model):
    """FP8 mode puts the shared expert last in fused_moe's stacks (one grouped GEMM per step instead of
    two more GEMMs); test_fp8_path_agrees_with_reference checks the numbers through that path."""
    from flashseek.models.deepseek.layers import MoE
    moes = [layer.mlp for layer in fp8_model.layers if isinstance(layer.mlp, MoE)]
    assert moes
    cfg = fp8_model.cfg
    for moe in moes:
        assert moe.n_stacked_shared == 1 and moe.shared is None
        assert moe.w13.shape[0] == cfg.n_routed_experts + 1 and moe.w2.shape[0] == cfg.n_routed_experts + 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fp8_moe_honours_ue8m0(device):
    """A V3.1 checkpoint (scale_fmt: ue8m0): the MoE layer's fused_moe quantizes its activations with
    power-of-two scales, as its per-expert FP8 path (fp8_linear, silu_mul_quant) does; the two paths
    agree with each other and not with the other scale format (~6% apart)."""
    from flashseek.models.deepseek import fp8 as fp8_ops
    from flashseek.models.deepseek.layers import FP8_MODE, MoE
    cfg = tiny_r1_config()
    g = torch.Generator().manual_seed(1)
    h, inter, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts

    def weight(n, k):
        return fp8_ops.quantize_weight_128x128((torch.randn(n, k, generator=g) * 0.05).to(device))

    mats = [(weight(inter, h), weight(inter, h), weight(h, inter)) for _ in range(E + 1)]
    gate_w = torch.randn(E, h, generator=g).to(device)
    bias = (0.05 * torch.randn(E, generator=g)).to(device)
    x = torch.randn(5, h, generator=g).to(device).bfloat16()
    outs = {}
    for ue8m0 in (False, True):
        moe = MoE(cfg, FP8_MODE, ue8m0)
        for mlp, (gw, uw, dw) in zip(moe.experts + [moe.shared], mats):
            mlp.gate.set(*gw)
            mlp.up.set(*uw)
            mlp.down.set(*dw)
        moe.gate_weight, moe.bias = gate_w.clone(), bias.clone()
        moe.finalize()
        assert moe.w13 is not None and moe.n_stacked_shared == 1  # fused_moe runs it
        fused = moe(x)
        per_expert = moe._experts_fp8_fallback(x, moe.router_logits(x), None)
        outs[ue8m0] = fused, per_expert
    for ue8m0 in (False, True):
        fused, per_expert = outs[ue8m0]
        # The same quantized rows: the grouped and the dense GEMMs may round their bf16 outputs apart.
        assert rel_err(fused, per_expert) < 1e-2, ue8m0
    assert rel_err(outs[True][0], outs[False][1]) > 2e-2


def test_fp8_kv_cache_runs(fp8_model):
    prompt = ids(70, 4)
    a = Session(fp8_model, max_len=128).greedy(prompt, 4)[1]
    b = Session(fp8_model, max_len=128, kv_cache_fp8=True).greedy(prompt, 4)[1]
    for x, y in zip(a, b):
        assert int(x.argmax()) == int(y.argmax())


def test_yarn_rope():
    cfg = tiny_r1_config()
    rope = YarnRope(cfg, "cpu")
    dim = cfg.qk_rope_head_dim
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2).float() / dim))
    # Highest frequencies untouched, lowest divided by the factor.
    assert torch.allclose(rope.inv_freq[:4], plain[:4])
    assert torch.allclose(rope.inv_freq[-4:], plain[-4:] / cfg.rope_scaling.factor)
    # Interleaved pairs rotate as complex numbers.
    x = torch.randn(3, 2, dim)
    pos = torch.tensor([0, 5, 1000])
    cos, sin = rope.cos_sin(pos)
    y = YarnRope.apply(x, cos, sin)
    z = torch.view_as_complex(x.view(3, 2, dim // 2, 2)) * torch.polar(torch.ones_like(cos), pos[:, None].float()
                                                                       * rope.inv_freq)[:, None]
    assert torch.allclose(y, torch.view_as_real(z).flatten(-2), atol=1e-4)
    assert abs(cfg.softmax_scale - (0.1 * math.log(40) + 1) ** 2 / math.sqrt(192)) < 1e-12


def test_router_matches_op_and_breaks_ties_like_it():
    if not hasattr(ops, "route_noaux_tc"):
        pytest.skip("flashseek.ops.route_noaux_tc not landed")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 256, generator=g)
    bias = 0.01 * torch.randn(256, generator=g)
    w1, i1 = route_noaux_tc_torch(logits, bias, 8, 4, 8, 2.5)
    w2, i2 = ops.route_noaux_tc(logits, bias, 8, 4, 8, 2.5)
    o1, o2 = i1.sort(-1), i2.sort(-1)
    assert torch.equal(o1.values, o2.values)
    assert torch.allclose(w1.gather(1, o1.indices), w2.gather(1, o2.indices), atol=1e-6)
    # Exact ties: identical logits everywhere; both pick the lowest expert ids.
    flat = torch.zeros(4, 256)
    _, ia = route_noaux_tc_torch(flat, torch.zeros(256), 8, 4, 8, 2.5)
    _, ib = ops.route_noaux_tc(flat, torch.zeros(256), 8, 4, 8, 2.5)
    assert torch.equal(ia.sort(-1).values, ib.sort(-1).values)


def test_linear_takes_a_prequantized_activation():
    """An FP8 linear given a QuantAct (the fused norm's output) computes what it computes from the
    activation; other linears, and a QuantAct of the other scale format, are refused."""
    from flashseek.models.deepseek import fp8 as fp8_ops
    from flashseek.models.deepseek.layers import FP8_MODE, REFERENCE, Linear, norm_quant, norm_quant_fits
    w = torch.randn(256, 384) * 0.05
    wq, ws = fp8_ops.quantize_weight_128x128(w)
    x = torch.randn(5, 384).bfloat16()
    norm_w = (1 + 0.1 * torch.randn(384)).bfloat16()
    for ue8m0 in (False, True):
        lin = Linear(FP8_MODE, ue8m0)
        lin.set(wq, ws)
        assert norm_quant_fits(x, norm_w, [lin])
        qa = norm_quant(x, norm_w, 1e-6, ue8m0)
        assert qa.shape == x.shape and qa.dtype == x.dtype and qa.device == x.device
        assert torch.equal(lin(qa), lin(ops.rms_norm(x, norm_w, 1e-6)))
        other = Linear(FP8_MODE, not ue8m0)
        other.set(wq, ws)
        with pytest.raises(ValueError, match="ue8m0"):
            other(qa)
    plain, ref = Linear(FP8_MODE), Linear(REFERENCE)
    plain.set(w.bfloat16(), None)
    ref.set(wq, ws)
    for lin in (plain, ref):
        assert not norm_quant_fits(x, norm_w, [lin])
        with pytest.raises(ValueError, match="QuantAct"):
            lin(qa)
    # Rows the fused op does not take: the unfused norm runs instead.
    lin = Linear(FP8_MODE)
    lin.set(wq, ws)
    assert not norm_quant_fits(torch.randn(5, 392).bfloat16()[:, 4:388], norm_w, [lin])   # misaligned rows
    assert not norm_quant_fits(x.float(), norm_w, [lin])


def _explicit_causal(q, k, v, scale):
    """The specification: query i sees the first L - s_q + i + 1 keys (bottom-right aligned)."""
    s_q, L = q.shape[1], k.shape[1]
    visible = L - s_q + torch.arange(s_q, device=q.device) + 1
    mask = torch.arange(L, device=q.device)[None, :] < visible[:, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("s_q,L", [(9, 9), (5, 13), (1, 7), (12, 40)])
def test_fused_causal_attention_semantics(s_q, L):
    # float64 on CPU: the helper's padding, slicing and causal alignment alone (exact up to rounding).
    from flashseek.models.deepseek.layers import _fused_causal_attention

    g = torch.Generator().manual_seed(s_q * 100 + L)
    q, k = (torch.randn(3, n, 24, generator=g, dtype=torch.float64) for n in (s_q, L))
    v = torch.randn(3, L, 16, generator=g, dtype=torch.float64)
    out = _fused_causal_attention(q, k, v, 0.2)
    assert out.shape == (3, s_q, 16)
    torch.testing.assert_close(out, _explicit_causal(q, k, v, 0.2), rtol=0, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.parametrize("s_q,L", [(256, 256), (128, 384), (1, 200), (77, 77)])
def test_fused_causal_attention_cuda(s_q, L):
    # R1's head dims (q, k 192; v 128) in bf16 through torch's fused kernels, against the explicit mask
    # in fp32 on the same bf16 inputs. Tolerance: bf16 probabilities and output (2^-8 relative) over a
    # softmax-weighted mean of unit-variance values: rel_err < 1e-2.
    from flashseek.models.deepseek.layers import _fused_causal_attention

    g = torch.Generator().manual_seed(s_q + 7 * L)
    # [len, h, d] transposed to [h, len, d], as the model lays them out (head stride d, row stride h * d).
    q, k = (torch.randn(n, 16, 192, generator=g).bfloat16().cuda().transpose(0, 1) for n in (s_q, L))
    v = torch.randn(L, 16, 128, generator=g).bfloat16().cuda().transpose(0, 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Math (the materialised-scores fallback) is not allowed: the helper exists to stay off it.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = _fused_causal_attention(q, k, v, 192 ** -0.5)
    assert out.shape == (16, s_q, 128) and out.dtype == torch.bfloat16
    ref = _explicit_causal(q.float(), k.float(), v.float(), 192 ** -0.5)
    assert rel_err(out, ref) < 1e-2
