"""Routing: noaux_tc grouped top-k and softmax top-k (reference semantics, kernels, bad inputs)."""
import pytest
import torch

from flashseek import ops
from flashseek.ref import routing as ref
from tests.utils import opcheck

# (E, n_group, topk_group, topk): tiny, R1-like, the R1 shape, a large one, and no grouping.
CONFIGS = [(8, 4, 2, 2), (64, 8, 4, 6), (256, 8, 4, 8), (512, 16, 8, 16), (64, 1, 1, 8)]


def _f64_noaux(logits, bias, n_group, topk_group, topk, scale, renormalize):
    """Independent float64 per-token reimplementation with explicit (score desc, id asc) ordering."""
    s = 1.0 / (1.0 + torch.exp(-logits.double()))
    b = s + bias.double()
    t, e = logits.shape
    gsize = e // n_group
    ids_all, w_all = [], []
    for i in range(t):
        row = b[i].tolist()
        gs = []
        for g in range(n_group):
            vals = sorted(row[g * gsize:(g + 1) * gsize], reverse=True)
            gs.append((-(vals[0] + vals[1]), g))
        kept = {g for _, g in sorted(gs)[:topk_group]} if topk_group < n_group else set(range(n_group))
        cand = sorted((-row[x], x) for x in range(e) if x // gsize in kept)[:topk]
        ids = [x for _, x in cand]
        w = [s[i, x].item() for x in ids]
        if renormalize:
            tot = sum(w)
            w = [v / tot for v in w]
        ids_all.append(ids)
        w_all.append([v * scale for v in w])
    return torch.tensor(w_all, dtype=torch.float64).reshape(t, topk), torch.tensor(ids_all).reshape(t, topk)


def _f64_softmax(logits, topk, renormalize):
    x = logits.double()
    p = torch.softmax(x, dim=-1)
    ids = []
    for i in range(x.shape[0]):
        ids.append([j for _, j in sorted((-v, j) for j, v in enumerate(x[i].tolist()))[:topk]])
    ids = torch.tensor(ids).reshape(x.shape[0], topk)
    w = p.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_noaux_tc_reference_vs_float64(cfg, dtype, renormalize):
    e, ng, tg, k = cfg
    logits = torch.randn(37, e).to(dtype)
    bias = torch.randn(e) * 0.05
    w, ids = ops.route_noaux_tc(logits, bias, ng, tg, k, 2.5, renormalize)
    w64, ids64 = _f64_noaux(logits, bias, ng, tg, k, 2.5, renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), ids64)
    torch.testing.assert_close(w.double(), w64, rtol=1e-6, atol=0)


@pytest.mark.parametrize("e,k", [(8, 2), (60, 4), (128, 8), (512, 16)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_topk_reference_vs_float64(e, k, renormalize):
    logits = torch.randn(29, e, dtype=torch.bfloat16)
    w, ids = ops.route_softmax_topk(logits, k, renormalize)
    w64, ids64 = _f64_softmax(logits, k, renormalize)
    assert torch.equal(ids.long(), ids64)
    torch.testing.assert_close(w.double(), w64, rtol=1e-6, atol=0)


def test_noaux_tc_ties_lower_id_wins():
    # All experts equal: groups tie (lower group ids kept) and experts tie (lower ids first).
    logits = torch.zeros(2, 16)
    bias = torch.zeros(16)
    w, ids = ops.route_noaux_tc(logits, bias, 4, 2, 3, 1.0, True)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2]]
    torch.testing.assert_close(w, torch.full((2, 3), 1 / 3))
    # Group 3 and group 1 tie on the top-2 sum and beat the rest: group 1 (lower id) is the one
    # kept when topk_group = 1; inside it experts 5 and 6 tie and 5 comes first.
    logits = torch.full((1, 16), -4.0)
    logits[0, 5] = logits[0, 6] = 2.0
    logits[0, 13] = logits[0, 14] = 2.0
    _, ids = ops.route_noaux_tc(logits, torch.zeros(16), 4, 1, 2, 1.0, True)
    assert ids.tolist() == [[5, 6]]
    # The bias decides selection but not the weights.
    bias = torch.zeros(16)
    bias[12] = 10.0
    w, ids = ops.route_noaux_tc(logits, bias, 4, 1, 2, 1.0, False)
    assert ids.tolist() == [[12, 13]]
    torch.testing.assert_close(w, torch.sigmoid(torch.tensor([[-4.0, 2.0]])))


def test_softmax_topk_ties_lower_id_wins():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [-0.0, 0.0, -1.0, 0.0, 0.0]])
    _, ids = ops.route_softmax_topk(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 1]]


def test_empty_tokens():
    w, ids = ops.route_noaux_tc(torch.randn(0, 256), torch.zeros(256), 8, 4, 8, 2.5)
    assert w.shape == (0, 8) and ids.shape == (0, 8)
    w, ids = ops.route_softmax_topk(torch.randn(0, 8), 2)
    assert w.shape == (0, 2) and ids.shape == (0, 2)


def test_against_transformers_router():
    tr = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    del tr
    e, ng, tg, k, hdim = 64, 8, 4, 6, 48
    cfg = DeepseekV3Config(hidden_size=hdim, n_routed_experts=e, num_experts_per_tok=k, n_group=ng, topk_group=tg,
                           routed_scaling_factor=2.5, norm_topk_prob=True)
    router = DeepseekV3TopkRouter(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, hdim) * 0.2)
        # A non-negative bias keeps every biased score positive, so HF's masking (0.0 in some
        # versions, -inf in others) cannot pick a masked expert: the two then agree.
        router.e_score_correction_bias.copy_(torch.rand(e) * 0.1)
        x = torch.randn(64, hdim)
        logits, hf_w, hf_ids = router(x)
    w, ids = ops.route_noaux_tc(logits, router.e_score_correction_bias, ng, tg, k, 2.5, True)
    # HF's topk(sorted=False) leaves the order unspecified: compare per-token sets, aligned by id.
    hf_sorted, order = hf_ids.sort(dim=-1)
    ours_sorted, our_order = ids.long().sort(dim=-1)
    assert torch.equal(hf_sorted, ours_sorted)
    torch.testing.assert_close(w.gather(1, our_order), hf_w.gather(1, order).float(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(logits=torch.randn(4, 60), bias=torch.zeros(60)), "divisible by n_group"),
    (dict(topk=16, topk_group=1), r"kept groups"),
    (dict(topk_group=9), "topk_group must be in"),
    (dict(n_group=64, logits=torch.randn(4, 128), bias=torch.zeros(128)), "n_group must be in"),
    (dict(bias=torch.zeros(63)), "bias must have shape"),
    (dict(bias=torch.zeros(64, dtype=torch.bfloat16)), "bias must have dtype"),
    (dict(logits=torch.zeros(4, 64, dtype=torch.int32)), "logits must have dtype"),
    (dict(logits=torch.randn(4, 1024), bias=torch.zeros(1024)), "1 to 512 experts"),
    (dict(topk=17, topk_group=8), r"topk must be in \[1, 16\]"),
    (dict(logits=torch.randn(4, 64), n_group=32, topk_group=1, topk=3, bias=torch.zeros(64)), "kept groups"),
])
def test_noaux_tc_bad_inputs(bad, match):
    args = dict(logits=torch.randn(4, 64), bias=torch.zeros(64), n_group=8, topk_group=4, topk=8)
    args.update(bad)
    with pytest.raises((ValueError, RuntimeError), match=match):
        ops.route_noaux_tc(args["logits"], args["bias"], args["n_group"], args["topk_group"], args["topk"], 2.5)


def test_noaux_tc_bad_outputs():
    logits = torch.randn(4, 64)
    with pytest.raises((ValueError, RuntimeError), match="topk_ids must have dtype"):
        ops.route_noaux_tc(logits, torch.zeros(64), 8, 4, 8, 2.5, topk_ids=torch.empty(4, 8, dtype=torch.int64))
    with pytest.raises((ValueError, RuntimeError), match="topk_weights must have shape"):
        ops.route_noaux_tc(logits, torch.zeros(64), 8, 4, 8, 2.5, topk_weights=torch.empty(4, 7))
    with pytest.raises((ValueError, RuntimeError), match="must not exceed the number of experts"):
        ops.route_softmax_topk(torch.randn(4, 8), 9)


def _opcheck_args(device, t=5, e=64):
    logits = torch.randn(t, e, device=device, dtype=torch.bfloat16)
    bias = torch.randn(e, device=device) * 0.1
    w = torch.empty(t, 8, device=device)
    ids = torch.empty(t, 8, device=device, dtype=torch.int32)
    return logits, bias, w, ids


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    logits, bias, w, ids = _opcheck_args(device)
    opcheck(torch.ops.flashseek.route_noaux_tc.default, (logits, bias, 8, 4, 8, 2.5, True, w, ids))
    opcheck(torch.ops.flashseek.route_softmax_topk.default, (logits, 8, False, w, ids))


# ------------------------------------------------------------------------------------------------
# CUDA kernels vs the reference run on CUDA tensors (the same fp32 expf there: ids bit-identical)
# ------------------------------------------------------------------------------------------------
def _cuda_inputs(t, e, dtype, kind, stride_pad=0):
    if kind == "tie":
        # Few distinct values: many expert ties and group ties.
        logits = torch.randint(-2, 3, (t, e + stride_pad), device="cuda").to(dtype)
        bias = torch.randint(0, 2, (e,), device="cuda").float() * 0.25
    else:
        logits = torch.randn(t, e + stride_pad, device="cuda").to(dtype)
        bias = (torch.randn(e, device="cuda") * 0.1) if kind == "bias" else torch.zeros(e, device="cuda")
    return logits[:, :e], bias


@pytest.mark.cuda
@pytest.mark.parametrize("t", [0, 1, 7, 128, 4096, 16384])
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("kind", ["bias", "tie"])
def test_noaux_tc_cuda(t, cfg, kind):
    e, ng, tg, k = cfg
    dtype = torch.bfloat16 if t % 2 == 0 else torch.float32
    logits, bias = _cuda_inputs(t, e, dtype, kind)
    assert ops.has_cuda_kernel("route_noaux_tc")
    for renorm in (True, False):
        w, ids = ops.route_noaux_tc(logits, bias, ng, tg, k, 2.5, renorm)
        w_ref, ids_ref = ref.route_noaux_tc(logits, bias, ng, tg, k, 2.5, renorm)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_noaux_tc_cuda_strided_and_all_groups_kept(dtype):
    logits, bias = _cuda_inputs(1000, 256, dtype, "bias", stride_pad=8)
    for ng, tg, k in [(8, 4, 8), (8, 8, 8), (32, 4, 8), (2, 1, 16)]:
        w, ids = ops.route_noaux_tc(logits, bias, ng, tg, k, 1.5)
        w_ref, ids_ref = ref.route_noaux_tc(logits, bias, ng, tg, k, 1.5)
        assert torch.equal(ids, ids_ref), (ng, tg, k)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)
    # Odd layouts: groups that do not fill whole lanes (160 = 8 x 20, 60 = 3 x 20 experts).
    for e, ng, tg, k in [(160, 8, 3, 6), (60, 3, 2, 4), (510, 17, 4, 8)]:
        logits, bias = _cuda_inputs(333, e, dtype, "bias")
        w, ids = ops.route_noaux_tc(logits, bias, ng, tg, k, 1.0)
        w_ref, ids_ref = ref.route_noaux_tc(logits, bias, ng, tg, k, 1.0)
        assert torch.equal(ids, ids_ref), (e, ng, tg, k)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("t", [0, 1, 7, 128, 4096, 16384])
@pytest.mark.parametrize("e,k", [(8, 2), (60, 4), (64, 6), (256, 8), (512, 16)])
@pytest.mark.parametrize("kind", ["rand", "tie"])
def test_softmax_topk_cuda(t, e, k, kind):
    logits, _ = _cuda_inputs(t, e, torch.bfloat16 if e != 64 else torch.float32, kind)
    _check_softmax_cuda(logits, k)


def _check_softmax_cuda(logits, k):
    for renorm in (True, False):
        w, ids = ops.route_softmax_topk(logits, k, renorm)
        w_ref, ids_ref = ref.route_softmax_topk(logits, k, renorm)
        assert torch.equal(ids, ids_ref)
        # Without renormalization the full-row sum runs in a different order than torch's.
        torch.testing.assert_close(w, w_ref, rtol=1e-6 if renorm else 2e-6, atol=0)


@pytest.mark.cuda
def test_routing_cuda_bad_inputs_and_graph():
    logits = torch.randn(8, 64, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="divisible by n_group"):
        ops.route_noaux_tc(logits, torch.zeros(64, device="cuda"), 7, 2, 4, 1.0)
    with pytest.raises((ValueError, RuntimeError), match="bias must have shape"):
        ops.route_noaux_tc(logits, torch.zeros(63, device="cuda"), 8, 4, 4, 1.0)
    bias = torch.zeros(64, device="cuda")
    w = torch.empty(8, 4, device="cuda")
    ids = torch.empty(8, 4, device="cuda", dtype=torch.int32)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.route_noaux_tc(logits, bias, 8, 4, 4, 1.0, topk_weights=w, topk_ids=ids)
    logits.copy_(torch.randn_like(logits))
    g.replay()
    w_ref, ids_ref = ref.route_noaux_tc(logits, bias, 8, 4, 4, 1.0)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)


# Kernel boundaries: token counts around the 4-tokens-per-block and the grid-stride (persistent warps)
# granularity, layouts with empty slots / lanes, topk 16, n_group 32, the sigmoid's slow path.
@pytest.mark.cuda
@pytest.mark.parametrize("t", [2, 3, 5, 31, 33, 1023, 1025, 40000])
@pytest.mark.parametrize("cfg", [(256, 8, 4, 8), (512, 32, 4, 16), (96, 32, 8, 16), (250, 10, 3, 7), (6, 3, 1, 2),
                                 (256, 8, 8, 8)])
def test_noaux_tc_cuda_boundaries(t, cfg):
    e, ng, tg, k = cfg
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for kind in ("bias", "tie"):
            logits, bias = _cuda_inputs(t, e, dtype, kind, stride_pad=3 if dtype == torch.bfloat16 else 0)
            for renorm in (True, False):
                w, ids = ops.route_noaux_tc(logits, bias, ng, tg, k, 2.5, renorm)
                w_ref, ids_ref = ref.route_noaux_tc(logits, bias, ng, tg, k, 2.5, renorm)
                assert torch.equal(ids, ids_ref), (t, cfg, dtype, kind, renorm)
                torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_noaux_tc_cuda_extreme_logits(dtype):
    # exp(-x) overflows (x < -87: 1 + exp(-x) >= 2^126, the reciprocal's slow path; sigmoid 0 or
    # denormal) and saturates (x > 17: sigmoid 1.0, many exact ties) in the same rows.
    logits = torch.randn(333, 256, device="cuda") * 4
    logits[:, ::7] = -100.0
    logits[:, 3::13] = -87.5
    logits[:, 1::11] = 90.0
    logits = logits.to(dtype)
    bias = torch.randn(256, device="cuda") * 0.1
    for renorm in (True, False):
        w, ids = ops.route_noaux_tc(logits, bias, 8, 4, 8, 2.5, renorm)
        w_ref, ids_ref = ref.route_noaux_tc(logits, bias, 8, 4, 8, 2.5, renorm)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("t", [3, 33, 1025, 40000])
@pytest.mark.parametrize("e,k", [(1, 1), (33, 5), (128, 16), (300, 9)])
def test_softmax_topk_cuda_boundaries(t, e, k):
    for dtype in (torch.bfloat16, torch.float16):
        logits, _ = _cuda_inputs(t, e, dtype, "tie", stride_pad=8)
        _check_softmax_cuda(logits, k)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_noaux_tc_cuda_r1_path_strided_outputs_and_nan(dtype):
    # The R1 shape runs the compile-time kernel (16-byte aligned rows); outputs written through
    # row strides wider than topk; NaN logits and bias still give in-range ids.
    t = 777
    logits, bias = _cuda_inputs(t, 256, dtype, "bias", stride_pad=8)
    w_buf = torch.full((t, 11), -1.0, device="cuda")
    id_buf = torch.full((t, 13), -1, device="cuda", dtype=torch.int32)
    w, ids = ops.route_noaux_tc(logits, bias, 8, 4, 8, 2.5, True, topk_weights=w_buf[:, 1:9],
                                topk_ids=id_buf[:, 2:10])
    w_ref, ids_ref = ref.route_noaux_tc(logits, bias, 8, 4, 8, 2.5, True)
    assert torch.equal(id_buf[:, 2:10], ids_ref)
    torch.testing.assert_close(w_buf[:, 1:9], w_ref, rtol=1e-6, atol=0)
    assert (w_buf[:, 0] == -1).all() and (w_buf[:, 9:] == -1).all()
    assert (id_buf[:, :2] == -1).all() and (id_buf[:, 10:] == -1).all()
    logits = logits.clone()
    logits[::3, ::5] = float("nan")
    bias = bias.clone()
    bias[7] = float("nan")
    w, ids = ops.route_noaux_tc(logits, bias, 8, 4, 8, 2.5, True)
    assert ((ids >= 0) & (ids < 256)).all()


# ------------------------------------------------------------------------------------------------
# route_noaux_tc_gate: router GEMM (fp32, fixed order) + route_noaux_tc, T <= 64
def _gate_inputs(t, e, h, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(torch.bfloat16)
    w = (torch.randn(e, h, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(e, generator=g) * 0.05
    return x.to(device), w.to(device), bias.to(device)


def test_gate_logits_order_explicit():
    # The documented order, written out as scalar loops (tiny shape: 1 token, 2 experts, H 1024).
    x, w, _ = _gate_inputs(1, 2, 1024)
    got = ref.gate_logits_fp32(x, w)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    xs, ws = x.float()[0], w.float()
    for e in range(2):
        q = []
        for kb in range(2):
            lanes = []
            for lane in range(32):
                acc = f32(0.0)
                for s in range(2):
                    for i in range(8):
                        k = 512 * kb + 256 * s + 8 * lane + i
                        acc = acc + xs[k] * ws[e, k]
                lanes.append(acc)
            while len(lanes) > 1:
                half = len(lanes) // 2
                lanes = [lanes[i] + lanes[i + half] for i in range(half)]
            q.append(lanes[0])
        assert torch.equal(got[0, e], q[0] + q[1])


@pytest.mark.parametrize("t,e,h", [(1, 256, 1024), (5, 64, 512), (16, 256, 2048)])
def test_gate_logits_close_to_matmul(t, e, h):
    x, w, _ = _gate_inputs(t, e, h)
    got = ref.gate_logits_fp32(x, w)
    exact = x.double() @ w.double().t()
    # fp32 accumulation of exact products over H terms: |err| <= ~H * 2^-24 * sum|x w| (loose bound).
    bound = (x.double().abs() @ w.double().abs().t()) * (h * 2.0 ** -24)
    assert ((got.double() - exact).abs() <= bound).all()
    torch.testing.assert_close(got, x.float() @ w.float().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [(256, 8, 4, 8), (64, 8, 4, 6), (64, 1, 1, 8)])
@pytest.mark.parametrize("t", [0, 1, 7])
def test_gate_op_cpu_matches_reference(cfg, t):
    e, ng, tg, k = cfg
    x, w, bias = _gate_inputs(t, e, 1024)
    weights, ids, logits = ops.route_noaux_tc_gate(x, w, bias, ng, tg, k, 2.5, True)
    assert weights.shape == (t, k) and ids.shape == (t, k) and logits.shape == (t, e)
    lg = ref.gate_logits_fp32(x, w)
    w_ref, ids_ref = ref.route_noaux_tc(lg, bias, ng, tg, k, 2.5, True)
    assert torch.equal(logits, lg) and torch.equal(ids, ids_ref) and torch.equal(weights, w_ref)


def test_gate_wrapper_falls_back_above_limit():
    x, w, bias = _gate_inputs(ops.ROUTE_GATE_MAX_T + 1, 64, 512)
    weights, ids, logits = ops.route_noaux_tc_gate(x, w, bias, 8, 4, 8, 2.5, True)
    lg = (x @ w.t()).float()
    w_ref, ids_ref = ops.route_noaux_tc(lg, bias, 8, 4, 8, 2.5, True)
    assert torch.equal(logits, lg) and torch.equal(ids, ids_ref) and torch.equal(weights, w_ref)
    # The default switch point is the measured cut-over, below the kernel's limit.
    xd = x[: ops.ROUTE_GATE_DEFAULT_MAX_T + 1].contiguous()
    _, ids_d, lg_d = ops.route_noaux_tc_gate(xd, w, bias, 8, 4, 8, 2.5, True)
    assert torch.equal(lg_d, (xd @ w.t()).float())
    # max_t lowers the switch point.
    x4 = x[:4].contiguous()
    _, ids4, lg4 = ops.route_noaux_tc_gate(x4, w, bias, 8, 4, 8, 2.5, True, max_t=2)
    assert torch.equal(lg4, (x4 @ w.t()).float())


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(4, 512)), "hidden must have dtype"),
    (dict(w=torch.randn(64, 512)), "gate_weight must have dtype"),
    (dict(w=torch.randn(64, 1024).to(torch.bfloat16)), r"gate_weight must have shape \[E, H=512\]"),
    (dict(x=torch.randn(4, 384).to(torch.bfloat16), w=torch.randn(64, 384).to(torch.bfloat16)), "multiple of 512"),
    (dict(x=torch.randn(4, 1024).to(torch.bfloat16)[:, ::2]), "hidden must be contiguous"),
    (dict(bias=torch.zeros(63)), "bias must have shape"),
    (dict(w=torch.randn(60, 512).to(torch.bfloat16), bias=torch.zeros(60)), "divisible by n_group"),
    (dict(x=torch.randn(65, 512).to(torch.bfloat16)), "at most 64 tokens"),
    (dict(logits=torch.empty(4, 63)), "logits must have shape"),
    (dict(logits=torch.empty(4, 64, dtype=torch.bfloat16)), "logits must have dtype"),
])
def test_gate_bad_inputs(bad, match):
    a = dict(x=torch.randn(4, 512).to(torch.bfloat16), w=torch.randn(64, 512).to(torch.bfloat16),
             bias=torch.zeros(64), logits=None)
    a.update(bad)
    t = a["x"].shape[0]
    logits = a["logits"] if a["logits"] is not None else torch.empty(t, a["w"].shape[0])
    with pytest.raises((ValueError, RuntimeError), match=match):
        torch.ops.flashseek.route_noaux_tc_gate(a["x"], a["w"], a["bias"], 8, 4, 8, 2.5, True, torch.empty(t, 8),
                                                torch.empty(t, 8, dtype=torch.int32), logits)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_gate_opcheck(device):
    x, w, bias = _gate_inputs(3, 64, 512, device)
    out = (torch.empty(3, 8, device=device), torch.empty(3, 8, device=device, dtype=torch.int32),
           torch.empty(3, 64, device=device))
    opcheck(torch.ops.flashseek.route_noaux_tc_gate.default, (x, w, bias, 8, 4, 8, 2.5, True, *out))


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 16, 33, 63, 64])
@pytest.mark.parametrize("cfg,h", [((256, 8, 4, 8), 7168), ((256, 8, 4, 8), 512), ((64, 8, 4, 6), 2048),
                                   ((250, 10, 3, 7), 1024), ((512, 16, 8, 16), 1536)])
def test_gate_cuda_bit_exact(t, cfg, h):
    e, ng, tg, k = cfg
    x, w, bias = _gate_inputs(t, e, h, seed=t)
    lg_ref = ref.gate_logits_fp32(x, w)  # on CPU: the order is device independent
    x, w, bias = x.cuda(), w.cuda(), bias.cuda()
    for renorm in (True, False):
        out_w = torch.full((t, k), float("nan"), device="cuda")
        out_ids = torch.full((t, k), -1, dtype=torch.int32, device="cuda")
        out_lg = torch.full((t, e), float("nan"), device="cuda")
        weights, ids, logits = ops.route_noaux_tc_gate(x, w, bias, ng, tg, k, 2.5, renorm, out_w, out_ids, out_lg,
                                                       max_t=ops.ROUTE_GATE_MAX_T)  # the kernel up to its limit
        assert torch.equal(logits.cpu(), lg_ref), (t, cfg, h)
        w_ref, ids_ref = ref.route_noaux_tc(lg_ref.cuda(), bias, ng, tg, k, 2.5, renorm)  # sigmoid on CUDA
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(weights, w_ref, rtol=1e-6, atol=0)
        # And close to the plain fp32 GEMM of the same bf16 inputs.
        torch.testing.assert_close(logits, x.float() @ w.float().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_gate_cuda_graph_and_fallback():
    x, w, bias = _gate_inputs(8, 256, 7168, "cuda")
    out = (torch.empty(8, 8, device="cuda"), torch.empty(8, 8, device="cuda", dtype=torch.int32),
           torch.empty(8, 256, device="cuda"))
    ops.route_noaux_tc_gate(x, w, bias, 8, 4, 8, 2.5, True, *out)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.route_noaux_tc_gate(x, w, bias, 8, 4, 8, 2.5, True, *out)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    w_ref, ids_ref, lg_ref = ref.route_noaux_tc_gate(x.cpu(), w.cpu(), bias.cpu(), 8, 4, 8, 2.5, True)
    assert torch.equal(out[2].cpu(), lg_ref)
    w_ref, ids_ref = ref.route_noaux_tc(lg_ref.cuda(), bias, 8, 4, 8, 2.5, True)
    assert torch.equal(out[1], ids_ref)
    xl = torch.randn(100, 7168, device="cuda").to(torch.bfloat16)
    weights, ids, logits = ops.route_noaux_tc_gate(xl, w, bias, 8, 4, 8, 2.5, True)
    w2, ids2 = ops.route_noaux_tc((xl @ w.t()).float(), bias, 8, 4, 8, 2.5, True)
    assert torch.equal(ids, ids2)


# ------------------------------------------------------------------------------------------------
# router_logits: the router GEMM with fp32 output (one kernel launch for T <= 4)
# ------------------------------------------------------------------------------------------------
def _router_inputs(t, e, h, device, gen_seed=0):
    g = torch.Generator(device="cpu").manual_seed(gen_seed)
    x = torch.randn(t, h, generator=g).to(device, torch.bfloat16)
    w = (torch.randn(e, h, generator=g) * 0.02).to(device, torch.bfloat16)
    return x, w


def _router_bound(x, w):
    """fp32 accumulation of h bf16 products: within h * 2^-24 of the sum of |x w| terms (a loose,
    order-independent bound: each of at most h additions rounds by half an ulp of a partial sum)."""
    mag = x.double().abs() @ w.double().abs().t()
    return mag * (x.shape[1] * 2.0 ** -24) + 1e-30


@pytest.mark.parametrize("t,e,h", [(0, 8, 64), (1, 8, 64), (3, 16, 264), (4, 5, 512)])
def test_router_logits_cpu_is_the_fp32_matmul(t, e, h):
    x, w = _router_inputs(t, e, h, "cpu")
    out = ops.router_logits(x, w)
    assert out.dtype == torch.float32 and out.shape == (t, e)
    assert torch.equal(out, x.float() @ w.float().t())
    # Above the kernel's token limit the wrapper takes the GEMM path, same values on CPU.
    x2, _ = _router_inputs(40, e, h, "cpu")
    assert torch.equal(ops.router_logits(x2, w), x2.float() @ w.float().t())


@pytest.mark.parametrize("bad,match", [
    (lambda x, w, o: (x.float(), w, o), "hidden must have dtype"),
    (lambda x, w, o: (x, w.half(), o), "weight must have dtype"),
    (lambda x, w, o: (x, w[:, :56], o), r"weight must have shape \[E, H=64\]"),
    (lambda x, w, o: (x[:, :60], w[:, :60], o), "multiple of 8"),
    (lambda x, w, o: (x, w, o.double()), "out must have dtype"),
    (lambda x, w, o: (x, w, o[:, :4]), "out must have shape"),
    (lambda x, w, o: (torch.zeros(5, 64, dtype=torch.bfloat16), w, torch.zeros(5, 8)), "at most 4 tokens"),
    (lambda x, w, o: (torch.zeros(2, 128, dtype=torch.bfloat16)[:, ::2], w, o[:2]), "unit stride along H"),
])
def test_router_logits_bad_inputs(bad, match):
    x, w = _router_inputs(3, 8, 64, "cpu")
    o = torch.empty(3, 8)
    with pytest.raises(ValueError, match=match):
        torch.ops.flashseek.router_logits(*bad(x, w, o))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_router_logits_opcheck(device):
    x, w = _router_inputs(3, 16, 256, device)
    opcheck(torch.ops.flashseek.router_logits.default, (x, w, torch.empty(3, 16, device=device)))


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 8, 33])
@pytest.mark.parametrize("e,h", [(256, 7168), (256, 2048), (7, 264), (160, 5120), (512, 16384), (3, 8)])
def test_router_logits_cuda(t, e, h):
    x, w = _router_inputs(t, e, h, "cuda", gen_seed=t * 1000 + e)
    out = torch.full((t, e), float("nan"), device="cuda")
    ops.router_logits(x, w, out=out)
    exact = x.double() @ w.double().t()
    assert not out.isnan().any()
    assert ((out.double() - exact).abs() <= _router_bound(x, w)).all()
    if t <= ops.ROUTER_LOGITS_MAX_T:  # the kernel: deterministic
        assert torch.equal(out, ops.router_logits(x, w))


@pytest.mark.cuda
def test_router_logits_cuda_strided_rows_and_graph():
    e, h = 256, 7168
    xbig, w = _router_inputs(4, e, h + 64, "cuda")
    x = xbig[:, 64:]  # row stride h + 64, 16-byte aligned start
    out = ops.router_logits(x, w[:, 64:].contiguous())
    exact = x.double() @ w[:, 64:].double().t()
    assert ((out.double() - exact).abs() <= _router_bound(x, w[:, 64:])).all()
    xs, ws = _router_inputs(1, e, h, "cuda")
    res = torch.empty(1, e, device="cuda")
    ops.router_logits(xs, ws, out=res)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.router_logits(xs, ws, out=res)
    xs.copy_(torch.randn_like(xs, dtype=torch.float32).to(torch.bfloat16))
    res.fill_(float("nan"))
    g.replay()
    assert torch.equal(res, ops.router_logits(xs, ws))
