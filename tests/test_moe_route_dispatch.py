"""moe_route_dispatch: route_noaux_tc + moe_align_masked + moe_scatter_quant in one op (fused_moe's
masked front end), against that three-op chain: bit for bit on the GPU, through the reference on CPU."""
import pytest
import torch

from flashseek import ops
from flashseek.ref import quant as ref_quant
from tests.utils import FP8, is_powers_of_two, opcheck, poison_

# (E, n_group, topk_group, topk, H): the R1 shape (compile-time routing path), a small grouped one,
# no grouping with 384 experts (16 keys a lane), an odd grouping with topk 16 (32 keys a lane), and
# no grouping with 64 experts.
R1 = (256, 8, 4, 8, 7168)
CONFIGS = [R1, (16, 4, 2, 4, 256), (384, 1, 1, 8, 512), (510, 3, 2, 16, 384), (64, 1, 1, 6, 128)]
CFG_IDS = ["r1", "small", "e384", "e510_topk16", "e64"]


def _inputs(t, cfg, device, logits_dtype=torch.float32, bias_case="plain", unaligned=False):
    e, _, _, _, h = cfg
    hidden = (torch.randn(t, h, device=device) * 3).to(torch.bfloat16)
    if t:
        hidden[0, :128] = 0  # an all-zero block takes the amax floor
    logits = torch.randn(t, e, device=device)
    if unaligned:  # rows not 16-byte aligned: route_noaux_tc's generic kernel even for the R1 shape
        logits = torch.randn(t, e + 1, device=device)[:, 1:]
    logits = logits.to(logits_dtype)
    bias = torch.randn(e, device=device) * 0.05
    if bias_case == "one_expert":
        bias[3] = 100.0  # every token picks expert 3
    elif bias_case == "dead_experts":
        bias[-(e // 2):] = -100.0  # never picked
    return hidden, logits, bias


def _expert_map(case, e, device):
    """-> (expert_map or None, num_local)."""
    if case == "none":
        return None, e
    if case == "half":  # the odd experts are local, numbered in reverse; the even ones live elsewhere
        num_local = e // 2
        em = torch.full((e,), -1, dtype=torch.int32, device=device)
        em[1::2] = torch.arange(num_local - 1, -1, -1, dtype=torch.int32, device=device)
        return em, num_local
    if case == "pairs":  # global 2i and 2i + 1 -> local i: a token can hold a local expert twice
        return (torch.arange(e, dtype=torch.int32, device=device) // 2), e // 2
    raise ValueError(case)


def _poisoned_outputs(t, cfg, num_local, max_m, dev, num_shared=0):
    """topk_weights, topk_ids, masked_m, token_slots, a, a_scale, all poisoned (the same poison for
    both paths, so rows neither writes compare equal)."""
    _, _, _, k, h = cfg
    g = num_local + num_shared
    return (poison_(torch.empty(t, k, device=dev)), poison_(torch.empty(t, k, dtype=torch.int32, device=dev)),
            poison_(torch.empty(g, dtype=torch.int32, device=dev)),
            poison_(torch.empty(t, k, dtype=torch.int32, device=dev)),
            poison_(torch.empty(g, max_m, h, dtype=FP8, device=dev)),
            poison_(ops.empty_grouped_act_scale(g, max_m, h // 128, dev)))


def _chain(hidden, logits, bias, cfg, expert_map, num_local, max_m, renormalize=True, num_shared=0, ue8m0=False):
    """The three ops the fused op replaces, into poisoned outputs; shared experts are one more scatter
    slot per token (row t of each shared group) and masked_m = T."""
    e, ng, tg, k, _ = cfg
    t = hidden.shape[0]
    w, ids, masked_m, slots, a, a_scale = _poisoned_outputs(t, cfg, num_local, max_m, hidden.device, num_shared)
    ops.route_noaux_tc(logits, bias, ng, tg, k, 2.5, renormalize, topk_weights=w, topk_ids=ids)
    torch.ops.flashseek.moe_align_masked(ids, e, max_m, expert_map, masked_m[:num_local], slots)
    scatter_slots = slots
    if num_shared:
        masked_m[num_local:] = t
        rows = (torch.arange(num_shared, device=slots.device)[None, :] + num_local) * max_m + \
            torch.arange(t, device=slots.device)[:, None]
        scatter_slots = torch.cat([slots, rows.to(torch.int32)], 1)
    ops.moe_scatter_quant(hidden, scatter_slots, a, a_scale, ue8m0)
    return w, ids, masked_m, slots, a, a_scale


def _fused(hidden, logits, bias, cfg, expert_map, num_local, max_m, renormalize=True, num_shared=0, ue8m0=False):
    """The fused op, into poisoned outputs."""
    _, ng, tg, k, _ = cfg
    outs = _poisoned_outputs(hidden.shape[0], cfg, num_local, max_m, hidden.device, num_shared)
    torch.ops.flashseek.moe_route_dispatch(hidden, logits, bias, ng, tg, k, 2.5, renormalize, expert_map, *outs,
                                           num_shared, ue8m0)
    return outs


def _assert_bitwise_equal(got, want):
    names = ("topk_weights", "topk_ids", "masked_m", "token_slots", "a", "a_scale")
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if g.dtype == FP8:
            g, w = g.view(torch.uint8), w.view(torch.uint8)
        elif g.dtype == torch.float32:  # bit patterns: the NaN poison of unwritten rows compares too
            g, w = g.view(torch.int32), w.view(torch.int32)
        assert torch.equal(g, w), name


# ------------------------------------------------------------------------------------------------
# reference (CPU): the op is the chain
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 1, 2, 7, 32])
@pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[4]], ids=["small", "e64"])
@pytest.mark.parametrize("map_case", ["none", "half", "pairs"])
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_reference_is_the_chain(t, cfg, map_case, logits_dtype):
    hidden, logits, bias = _inputs(t, cfg, "cpu", logits_dtype)
    em, num_local = _expert_map(map_case, cfg[0], "cpu")
    got = _fused(hidden, logits, bias, cfg, em, num_local, max(t, 1))
    want = _chain(hidden, logits, bias, cfg, em, num_local, max(t, 1))
    _assert_bitwise_equal(got, want)
    if t:
        masked_m, slots = got[2], got[3]
        assert int(masked_m.sum()) == int((slots >= 0).sum())


@pytest.mark.parametrize("t", [0, 1, 7, 32])
@pytest.mark.parametrize("num_shared", [1, 4])
@pytest.mark.parametrize("map_case", ["none", "half"])
def test_reference_shared_experts(t, num_shared, map_case):
    cfg = CONFIGS[1]
    hidden, logits, bias = _inputs(t, cfg, "cpu")
    em, num_local = _expert_map(map_case, cfg[0], "cpu")
    max_m = t + 3  # rows past T in the shared groups stay poisoned
    got = _fused(hidden, logits, bias, cfg, em, num_local, max_m, num_shared=num_shared)
    want = _chain(hidden, logits, bias, cfg, em, num_local, max_m, num_shared=num_shared)
    _assert_bitwise_equal(got, want)
    masked_m, a, a_scale = got[2], got[4], got[5]
    assert masked_m[num_local:].tolist() == [t] * num_shared
    if t:
        q, s = ref_quant.quant_fp8_1x128(hidden)
        for j in range(num_shared):
            assert torch.equal(a[num_local + j, :t].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(a_scale[num_local + j, :t], s)
        assert torch.isnan(a_scale[num_local:, t:]).all()  # never written


def test_wrapper_defaults_and_rows():
    cfg = CONFIGS[1]
    e, ng, tg, k, h = cfg
    hidden, logits, bias = _inputs(5, cfg, "cpu", bias_case="one_expert")
    w, ids, masked_m, slots, a, a_scale = ops.moe_route_dispatch(hidden, logits, bias, ng, tg, k, 2.5)
    assert a.shape == (e, 5, h) and a_scale.shape == (e, 5, h // 128) and a_scale.stride(1) == 1
    assert masked_m[3].item() == 5 and (ids == 3).sum().item() == 5
    # Every slot's row holds its token's quantization.
    q, s = ref_quant.quant_fp8_1x128(hidden)
    for tok in range(5):
        for j in range(k):
            r = slots[tok, j].item()
            assert r >= 0
            assert torch.equal(a.view(torch.uint8)[r // 5, r % 5], q.view(torch.uint8)[tok])
            assert torch.equal(a_scale[r // 5, r % 5], s[tok])
    # max_m below T drops the later slots of a crowded expert, as moe_align_masked does.
    _, _, masked_m2, slots2, _, _ = ops.moe_route_dispatch(hidden, logits, bias, ng, tg, k, 2.5, max_m=2)
    assert torch.equal(masked_m2, masked_m.clamp(max=2))
    assert (slots2 == -1).sum().item() == int((masked_m - 2).clamp(min=0).sum())
    assert slots2[:2, :].ge(0).all() and (slots2[2:] == -1).sum() >= 3  # expert 3's slots of tokens 2..4


@pytest.mark.parametrize("t", [1, 7])
def test_fused_moe_masked_front_end_cpu(t, monkeypatch):
    e, ng, tg, k, h = CONFIGS[1]
    hidden, logits, bias = _inputs(t, CONFIGS[1], "cpu")
    w13 = (torch.randn(e, 512, h) * 2).clamp(-448, 448).to(FP8)
    w13_s = torch.rand(e, 4, h // 128) * 0.01 + 0.005
    w2 = (torch.randn(e, h, 256) * 2).clamp(-448, 448).to(FP8)
    w2_s = torch.rand(e, h // 128, 2) * 0.01 + 0.005
    kw = dict(n_group=ng, topk_group=tg, topk=k, routed_scaling_factor=2.5, layout="masked")
    fused = ops.fused_moe(hidden, logits, bias, w13, w13_s, w2, w2_s, **kw)
    monkeypatch.setattr(ops, "MOE_ROUTE_DISPATCH_MAX_T", 0)  # the three-op front end
    assert torch.equal(fused, ops.fused_moe(hidden, logits, bias, w13, w13_s, w2, w2_s, **kw))


def _opcheck_args(device):
    cfg = CONFIGS[1]
    e, ng, tg, k, h = cfg
    t = 6
    hidden, logits, bias = _inputs(t, cfg, device)
    i32 = dict(dtype=torch.int32, device=device)
    out = (torch.empty(t, k, device=device), torch.empty(t, k, **i32), torch.empty(e, **i32),
           torch.empty(t, k, **i32), torch.zeros(e, t, h, dtype=FP8, device=device),
           ops.empty_grouped_act_scale(e, t, h // 128, device).fill_(1.0))
    return (hidden, logits, bias, ng, tg, k, 2.5, True), out


def _opcheck_all(device):
    head, out = _opcheck_args(device)
    opcheck(torch.ops.flashseek.moe_route_dispatch.default, (*head, None, *out))
    em = torch.arange(16, dtype=torch.int32, device=device).flip(0)
    opcheck(torch.ops.flashseek.moe_route_dispatch.default, (*head, em, *out))
    # One shared expert after 15 routed ones (masked_m / a / a_scale keep their 16 groups).
    em15 = torch.arange(16, dtype=torch.int32, device=device) % 15
    opcheck(torch.ops.flashseek.moe_route_dispatch.default, (*head, em15, *out, 1))
    opcheck(torch.ops.flashseek.moe_route_dispatch.default, (*head, None, *out, 0, True))


def test_opcheck_cpu():
    _opcheck_all("cpu")


def test_bad_inputs():
    e, ng, tg, k, h = CONFIGS[1]
    hidden, logits, bias = _inputs(4, CONFIGS[1], "cpu")
    with pytest.raises(ValueError, match="at most 32 tokens"):
        ops.moe_route_dispatch(torch.zeros(33, h, dtype=torch.bfloat16), torch.randn(33, e), bias, ng, tg, k, 2.5)
    with pytest.raises(ValueError, match="hidden must have T=4 rows"):
        ops.moe_route_dispatch(hidden[:3], logits, bias, ng, tg, k, 2.5)
    with pytest.raises(ValueError, match="hidden must have dtype"):
        ops.moe_route_dispatch(hidden.float(), logits, bias, ng, tg, k, 2.5)
    with pytest.raises(ValueError, match="multiple of 128"):
        ops.moe_route_dispatch(torch.zeros(4, 200, dtype=torch.bfloat16), logits, bias, ng, tg, k, 2.5)
    with pytest.raises(ValueError, match="divisible by n_group"):
        ops.moe_route_dispatch(hidden, logits, bias, 3, 2, k, 2.5)
    with pytest.raises(ValueError, match="logits must have dtype"):
        ops.moe_route_dispatch(hidden, logits.double(), bias, ng, tg, k, 2.5)
    with pytest.raises(ValueError, match="without expert_map"):
        ops.moe_route_dispatch(hidden, logits, bias, ng, tg, k, 2.5, num_local=8)
    with pytest.raises(ValueError, match="expert_map must have shape"):
        ops.moe_route_dispatch(hidden, logits, bias, ng, tg, k, 2.5, expert_map=torch.zeros(8, dtype=torch.int32),
                               num_local=8)
    with pytest.raises(ValueError, match="expert_map values must lie in"):
        ops.moe_route_dispatch(hidden, logits, bias, ng, tg, k, 2.5, expert_map=torch.full((e,), 9, dtype=torch.int32),
                               num_local=8)
    (head, (w, ids, masked_m, slots, a, a_scale)) = _opcheck_args("cpu")
    hidden6 = head[0]
    op = torch.ops.flashseek.moe_route_dispatch

    def call(**over):
        args = dict(w=w, ids=ids, masked_m=masked_m, slots=slots, a=a, a_scale=a_scale)
        args.update(over)
        op(*head, None, args["w"], args["ids"], args["masked_m"], args["slots"], args["a"], args["a_scale"])

    with pytest.raises(ValueError, match="a must have shape"):
        call(a=a[:8], a_scale=a_scale[:8])
    with pytest.raises(ValueError, match="a_scale must be column-major"):
        call(a_scale=torch.ones(e, 6, h // 128))
    with pytest.raises(ValueError, match="a_scale must have shape"):
        call(a_scale=a_scale[:, :5])
    with pytest.raises(ValueError, match="a must have dtype"):
        call(a=torch.zeros(e, 6, hidden6.shape[1], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="token_slots must have shape"):
        call(slots=slots[:5])
    with pytest.raises(ValueError, match="masked_m must have dtype"):
        call(masked_m=masked_m.long())
    with pytest.raises(ValueError, match="topk_weights must have shape"):
        call(w=w[:, :3])
    with pytest.raises(ValueError, match="num_shared must be in"):
        op(*head, None, w, ids, masked_m, slots, a, a_scale, 5)
    with pytest.raises(ValueError, match="num_shared must be in"):
        op(*head, None, w, ids, masked_m[:1], slots, a[:1], a_scale[:1], 1)
    with pytest.raises(ValueError, match="every token needs a row"):
        em15 = torch.arange(e, dtype=torch.int32) % 15
        op(*head, em15, w, ids, masked_m, slots, a[:, :5].contiguous(),
           ops.empty_grouped_act_scale(e, 5, hidden6.shape[1] // 128, "cpu"), 1)


# ------------------------------------------------------------------------------------------------
# CUDA kernel: bit-identical to the three-op chain on the same inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 2, 7, 32])
@pytest.mark.parametrize("cfg", CONFIGS, ids=CFG_IDS)
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("map_case", ["none", "half"])
def test_cuda_matches_chain(t, cfg, logits_dtype, map_case):
    hidden, logits, bias = _inputs(t, cfg, "cuda", logits_dtype)
    em, num_local = _expert_map(map_case, cfg[0], "cuda")
    got = _fused(hidden, logits, bias, cfg, em, num_local, t)
    want = _chain(hidden, logits, bias, cfg, em, num_local, t)
    _assert_bitwise_equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 7, 32])
@pytest.mark.parametrize("cfg", [R1, CONFIGS[1]], ids=["r1", "small"])
@pytest.mark.parametrize("case", ["one_expert", "dead_experts", "pairs_map", "max_m_small", "unaligned", "fp16",
                                  "no_renorm", "nan_logits"])
def test_cuda_matches_chain_edge_cases(t, cfg, case):
    hidden, logits, bias = _inputs(t, cfg, "cuda", torch.float16 if case == "fp16" else torch.float32,
                                   bias_case=case if case in ("one_expert", "dead_experts") else "plain",
                                   unaligned=case == "unaligned")
    if case == "nan_logits":
        logits[0, : cfg[0] // 2] = float("nan")
        logits[-1, 1::3] = -float("nan")
    em, num_local = _expert_map("pairs" if case == "pairs_map" else "none", cfg[0], "cuda")
    max_m = max(t // 4, 1) if case == "max_m_small" else t
    renorm = case != "no_renorm"
    got = _fused(hidden, logits, bias, cfg, em, num_local, max_m, renorm)
    want = _chain(hidden, logits, bias, cfg, em, num_local, max_m, renorm)
    _assert_bitwise_equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 7, 32])
@pytest.mark.parametrize("cfg", [R1, CONFIGS[1]], ids=["r1", "small"])
@pytest.mark.parametrize("num_shared", [1, 4])
@pytest.mark.parametrize("map_case", ["none", "half", "pairs"])
def test_cuda_shared_experts(t, cfg, num_shared, map_case):
    hidden, logits, bias = _inputs(t, cfg, "cuda")
    em, num_local = _expert_map(map_case, cfg[0], "cuda")
    max_m = t + 1
    got = _fused(hidden, logits, bias, cfg, em, num_local, max_m, num_shared=num_shared)
    want = _chain(hidden, logits, bias, cfg, em, num_local, max_m, num_shared=num_shared)
    _assert_bitwise_equal(got, want)
    assert got[2][num_local:].tolist() == [t] * num_shared


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("t", [1, 7, 32])
@pytest.mark.parametrize("num_shared", [0, 1])
def test_ue8m0_matches_chain(device, t, num_shared):
    """V3.1's power-of-two scales: bit-identical to the chain with ue8m0, and every scale written is a
    power of two (the poison of unwritten rows aside)."""
    hidden, logits, bias = _inputs(t, R1, device)
    e = R1[0]
    got = _fused(hidden, logits, bias, R1, None, e, t + num_shared, num_shared=num_shared, ue8m0=True)
    want = _chain(hidden, logits, bias, R1, None, e, t + num_shared, num_shared=num_shared, ue8m0=True)
    _assert_bitwise_equal(got, want)
    s = got[5][~got[5].isnan()]
    assert s.numel() and is_powers_of_two(s)


@pytest.mark.cuda
def test_cuda_no_tokens_and_limits():
    e, ng, tg, k, h = R1
    hidden, logits, bias = _inputs(0, R1, "cuda")
    w, ids, masked_m, slots, a, a_scale = ops.moe_route_dispatch(hidden, logits, bias, ng, tg, k, 2.5, max_m=4)
    assert w.shape == (0, k) and slots.shape == (0, k) and masked_m.tolist() == [0] * e
    hidden, logits, bias = _inputs(33, R1, "cuda")
    with pytest.raises(RuntimeError, match="at most 32 tokens"):
        _fused(hidden, logits, bias, R1, None, e, 33)


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 8, 32])
@pytest.mark.parametrize("shared_case", ["shared_out", "stacked"])
def test_cuda_fused_moe_front_end_bitwise(t, shared_case, monkeypatch):
    e, ng, tg, k, h = CONFIGS[1]
    hidden, logits, bias = _inputs(t, CONFIGS[1], "cuda")
    e_all = e + (shared_case == "stacked")
    w13 = (torch.randn(e_all, 512, h, device="cuda") * 2).clamp(-448, 448).to(FP8)
    w13_s = torch.rand(e_all, 4, h // 128, device="cuda") * 0.01 + 0.005
    w2 = (torch.randn(e_all, h, 256, device="cuda") * 2).clamp(-448, 448).to(FP8)
    w2_s = torch.rand(e_all, h // 128, 2, device="cuda") * 0.01 + 0.005
    kw = dict(n_group=ng, topk_group=tg, topk=k, routed_scaling_factor=2.5, layout="masked")
    if shared_case == "stacked":
        kw["n_shared_experts"] = 1
    else:
        kw["shared_out"] = torch.randn(t, h, device="cuda").to(torch.bfloat16)
    fused = ops.fused_moe(hidden, logits, bias, w13, w13_s, w2, w2_s, **kw)
    monkeypatch.setattr(ops, "MOE_ROUTE_DISPATCH_MAX_T", 0)  # the three-op front end
    assert torch.equal(fused, ops.fused_moe(hidden, logits, bias, w13, w13_s, w2, w2_s, **kw))


@pytest.mark.cuda
def test_cuda_graph_replay():
    e, ng, tg, k, h = R1
    t = 4
    hidden, logits, bias = _inputs(t, R1, "cuda", torch.bfloat16)
    out = _fused(hidden, logits, bias, R1, None, e, t)  # warm-up (and the shared-memory opt-in) outside capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        torch.ops.flashseek.moe_route_dispatch(hidden, logits, bias, ng, tg, k, 2.5, True, None, *out)
    for _ in range(2):
        hidden.copy_(torch.randn_like(hidden, dtype=torch.float32).to(torch.bfloat16))
        logits.copy_(torch.randn_like(logits, dtype=torch.float32).to(torch.bfloat16))
        for x in out:
            poison_(x)
        g.replay()
        _assert_bitwise_equal(out, _chain(hidden, logits, bias, R1, None, e, t))


@pytest.mark.cuda
def test_opcheck_cuda():
    _opcheck_all("cuda")
