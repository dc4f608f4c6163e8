"""The MLA layer's pre-attention glue: flashseek.ops.mla_rope_norm_append (reference on CPU, kernel on
GPU), the fused q_a/kv_a projection and the copy-free absorption in the model, the norms fused with
the FP8 quantization of the linears after them (rms_norm_quant_fp8 and its fused add), and the number
of ops a decode attention step issues.

Tolerances of the CUDA kernel against the reference on the same cos/sin tables: q_out and the
cache's rope values bit-exact (fp32 products and sums, no FMA, then one rounding); the latent equal
bit for bit to flashseek.ops.rms_norm on the GPU (same summation order), so within one rounding of
the input dtype of the torch reference; FP8 cache bytes identical to mla_cache_append of that latent.
"""
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashseek import ops
from flashseek.engine.session import Session
from flashseek.models.deepseek.checkpoint import ensure_default_model
from flashseek.models.deepseek.config import tiny_r1_config
from flashseek.models.deepseek.layers import MLAAttention, YarnRope
from flashseek.models.deepseek.model import DecoderLayer, DeepseekV3ForCausalLM
from flashseek.ref import mla as ref_mla
from flashseek.ref import norm as ref_norm
from tests.utils import opcheck, poison_

EPS = 1e-6


# ----------------------------------------------------------------------------------- inputs
def make_inputs(T, h, page_size=16, num_pages=6, fp8=False, dtype=torch.bfloat16, wdtype=torch.bfloat16,
                device="cpu", seed=0, neg_every=3):
    """Random (never zero) inputs laid out as the model has them: kv a column slice of the fused
    q_a/kv_a output, q_pe a slice of q [T, h, 192], q_out the rope tail of a NaN-poisoned q_lat
    [T, h, 576], a NaN-filled cache; every third slot negative (padding)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(T, 384 + 576, generator=g) * 3).to(dtype)
    q = (torch.randn(T, h, 192, generator=g) * 3).to(dtype)
    rope = YarnRope(tiny_r1_config(), "cpu")
    cos, sin = rope.tables
    positions = torch.randint(0, cos.shape[0], (T,), generator=g)
    cap = num_pages * page_size
    slots = torch.randperm(cap, generator=g)[:T].long()
    if neg_every:
        slots[1::neg_every] = -1
    weight = (1 + 0.5 * torch.randn(512, generator=g)).to(wdtype)
    cache = ops.empty_mla_cache(num_pages, page_size, fp8=fp8, device="cpu")
    cache.view(torch.uint8).fill_(0xFF)  # NaN as bf16, e4m3 and fp32 scales
    q_lat = poison_(torch.empty(T, h, 576, dtype=dtype))
    a, q, q_lat, positions, cos, sin, weight, slots, cache = (
        x.to(device) for x in (a, q, q_lat, positions, cos, sin, weight, slots, cache))
    return dict(kv=a[:, 384:], q_pe=q[..., 128:], positions=positions, cos=cos, sin=sin, norm_weight=weight,
                eps=EPS, slot_mapping=slots, kv_cache=cache, q_out=q_lat[..., 512:], q_lat=q_lat, q=q)


ARGS = ("kv", "q_pe", "positions", "cos", "sin", "norm_weight", "eps", "slot_mapping", "kv_cache", "q_out")


def call_op(d):
    torch.ops.flashseek.mla_rope_norm_append(*[d[k] for k in ARGS])


def unfused(d):
    """The model's unfused torch sequence: (latent, k_rope, q_rope) and the cache it writes."""
    cache = d["kv_cache"].clone()
    cos, sin = d["cos"][d["positions"]], d["sin"][d["positions"]]
    latent = ref_norm.rms_norm(d["kv"][:, :512], d["norm_weight"], d["eps"])
    k_rope = YarnRope.apply(d["kv"][:, 512:], cos, sin)
    q_rope = YarnRope.apply(d["q_pe"], cos, sin)
    ref_mla.mla_cache_append(latent, k_rope, cache, d["slot_mapping"])
    return latent, k_rope, q_rope, cache


# ----------------------------------------------------------------------------------- CPU reference
@pytest.mark.parametrize("T", [0, 1, 7])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16)])
def test_op_equals_unfused_sequence_cpu(T, page_size, fp8, dtype, wdtype):
    d = make_inputs(T, 5, page_size, fp8=fp8, dtype=dtype, wdtype=wdtype, seed=T * 7 + page_size)
    _, _, q_rope, want_cache = unfused(d)
    call_op(d)
    assert torch.equal(d["kv_cache"].view(torch.uint8), want_cache.view(torch.uint8))
    assert torch.equal(d["q_out"], q_rope)
    assert torch.isnan(d["q_lat"][..., :512]).all()  # the absorbed head region is not the op's
    # Skipped (negative) slots and every other slot keep their poison.
    untouched = torch.ones(d["kv_cache"].shape[0] * page_size, dtype=torch.bool)
    s = d["slot_mapping"]
    untouched[s[s >= 0]] = False
    assert torch.all(d["kv_cache"].view(torch.uint8).reshape(untouched.shape[0], -1)[untouched] == 0xFF)


def test_wrapper_allocates_q_out_and_all_negative_slots():
    d = make_inputs(4, 3, neg_every=0)
    d["slot_mapping"].fill_(-1)
    before = d["kv_cache"].clone()
    out = ops.mla_rope_norm_append(*[d[k] for k in ARGS[:-1]])
    assert out.shape == (4, 3, 64) and torch.equal(out, unfused(d)[2])
    assert torch.equal(d["kv_cache"].view(torch.uint8), before.view(torch.uint8))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_opcheck(device):
    for fp8 in (False, True):
        d = make_inputs(3, 2, fp8=fp8, device=device)
        d["kv_cache"].zero_()
        d["q_out"] = torch.zeros(3, 2, 64, dtype=torch.bfloat16, device=device)
        opcheck(torch.ops.flashseek.mla_rope_norm_append.default, tuple(d[k] for k in ARGS))


def _bad_cases(device):
    d = make_inputs(3, 2, device=device)

    def with_(**kw):
        return {**d, **kw}

    return [
        (with_(kv=d["kv"].float()), "kv must have dtype"),
        (with_(kv=d["kv"][:, :512]), "kv must be"),
        (with_(kv=torch.randn(3, 1152, device=device).bfloat16()[:, ::2]), "unit (last )?stride"),
        (with_(q_pe=d["q_pe"].half()), "q_pe must have dtype"),
        (with_(q_pe=d["q_pe"][:, :, :32]), "q_pe must be"),
        (with_(q_out=d["q_out"][:2]), "q_out must have shape"),
        (with_(positions=d["positions"].int()), "positions must have dtype"),
        (with_(cos=d["cos"][:, :16].contiguous()), "cos must be"),
        (with_(sin=d["sin"][:10]), "sin must have"),
        (with_(norm_weight=d["norm_weight"][:256]), "norm_weight must have shape"),
        (with_(slot_mapping=d["slot_mapping"][:2]), "slot_mapping must have shape"),
        (with_(kv_cache=torch.zeros(2, 8, 576, dtype=torch.bfloat16, device=device)), "page size"),
        (with_(kv_cache=torch.zeros(2, 16, 576, dtype=torch.float16, device=device)), "kv_cache must have dtype"),
    ]


@pytest.mark.parametrize("idx", range(13))
def test_bad_inputs_cpu(idx):
    kw, match = _bad_cases("cpu")[idx]
    with pytest.raises((ValueError, RuntimeError), match=match):
        call_op(kw)


def test_bad_index_values_cpu():
    d = make_inputs(3, 2)
    d["slot_mapping"][0] = d["kv_cache"].shape[0] * d["kv_cache"].shape[1]
    with pytest.raises(ValueError, match="slot_mapping entries must be <"):
        call_op(d)
    d = make_inputs(3, 2)
    d["positions"][2] = d["cos"].shape[0]
    with pytest.raises(ValueError, match="positions must lie in"):
        call_op(d)


# ----------------------------------------------------------------------------------- model
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("tiny"))


@contextmanager
def switches(**kw):
    """Sets the class switches named (on MLAAttention and DecoderLayer, whichever has each) for the block."""
    old = [(cls, k, vars(cls)[k]) for k in kw for cls in (MLAAttention, DecoderLayer) if k in vars(cls)]
    assert {k for _, k, _ in old} == set(kw), f"unknown switches {set(kw)}"
    for cls, k, _ in old:
        setattr(cls, k, kw[k])
    try:
        yield
    finally:
        for cls, k, v in old:
            setattr(cls, k, v)


def load(model_dir, device="cpu", **kw):
    with switches(**kw):
        return DeepseekV3ForCausalLM.from_pretrained(model_dir, device=device, precision="fp8", progress=False)


@pytest.fixture(scope="module")
def fp8_model(model_dir):
    return load(model_dir)


def ids(n, seed=0):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_steps(model, prompt, steps=3, chunk=None, kv_cache_fp8=False):
    s = Session(model, max_len=128, kv_cache_fp8=kv_cache_fp8)
    logits = [s.prefill(prompt, chunk=chunk)]
    for t in range(steps):
        logits.append(s.decode([int(logits[-1][-1].argmax())]))
    return logits


def test_fused_qkv_a_projection_equals_separate(model_dir, fp8_model):
    """q_a_proj and kv_a_proj as one FP8 GEMM: the same logits as two GEMMs (tiny R1: 384 + 576 rows)."""
    attn = fp8_model.layers[0].attn
    assert attn.qkv_a_proj is not None and attn.q_a_proj is None and attn.kv_a_proj is None
    separate = load(model_dir, fuse_qkv_a=False)
    assert separate.layers[0].attn.qkv_a_proj is None
    prompt = ids(40, 1)
    for a, b in zip(run_steps(fp8_model, prompt), run_steps(separate, prompt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("prefill_mode", ["decompressed", "absorbed"])
@pytest.mark.parametrize("kv_cache_fp8", [False, True])
def test_fused_glue_equals_unfused(fp8_model, prefill_mode, kv_cache_fp8):
    """The op + in-place bmms against the unfused torch glue: prefill (chunked) and decode logits."""
    prompt = ids(70, 2)
    fp8_model.set_prefill_mode(prefill_mode)
    try:
        fused = run_steps(fp8_model, prompt, chunk=40, kv_cache_fp8=kv_cache_fp8)
        with switches(fuse_glue=False):
            plain = run_steps(fp8_model, prompt, chunk=40, kv_cache_fp8=kv_cache_fp8)
    finally:
        fp8_model.set_prefill_mode("decompressed")
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- op counts
VIEW_LIKE = ("aten::empty", "aten::new_empty", "aten::detach", "aten::lift_fresh")


class OpLog(TorchDispatchMode):
    """Records the aten / flashseek ops that reach the dispatcher (a custom op's reference body is
    not traced: the mode is off while an op runs)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        ret = schema.returns[0].alias_info if schema.returns else None
        if ret is not None and not ret.is_write:
            # A view, unless it had to copy (aten::to to another dtype, reshape of a strided view).
            src = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if src is None or not isinstance(out, torch.Tensor) or \
                    out.untyped_storage().data_ptr() == src.untyped_storage().data_ptr():
                return out
        elif schema.name.startswith(VIEW_LIKE):
            return out
        self.names.append(schema.name.split("::")[1] + ("" if func._overloadname == "default"
                                                        else "." + func._overloadname))
        return out


def decode_attention_ops(model, batch=1):
    """The ops one decode step's attention issues in layer 1 (layer 0 also makes the per-step
    schedule and, unfused, gathers the rope tables)."""
    s = Session(model, num_seqs=batch, max_len=64)
    for i in range(batch):
        s.prefill(ids(9 + i, i), i)
    attn = model.layers[1].attn
    log = OpLog()
    orig = attn.__call__

    def logged(*a, **k):
        with log:
            return orig(*a, **k)

    attn.__call__ = logged  # the instance attribute is not what `attn(...)` calls: patch the class slot
    cls_call = MLAAttention.__call__
    MLAAttention.__call__ = lambda self, *a, **k: logged(*a, **k) if self is attn else cls_call(self, *a, **k)
    try:
        s.decode(list(range(batch)))
    finally:
        MLAAttention.__call__ = cls_call
        del attn.__call__
    return log.names


def test_decode_attention_op_count(fp8_model, model_dir):
    unfused_model = load(model_dir, fuse_qkv_a=False)
    with switches(fuse_glue=False, fuse_norm_quant=False):
        before = decode_attention_ops(unfused_model)
    after = decode_attention_ops(fp8_model)
    print(f"\ndecode attention ops per layer, before ({len(before)}): {before}"
          f"\nafter ({len(after)}): {after}")
    # The input arrives quantized (the decoder layer's fused add + norm + quant), the q_a norm quantizes
    # for q_b in the same op, and a decode-only step takes the glue and W_UK's product from one op.
    assert after == ["fp8_gemm", "rms_norm_quant_fp8", "fp8_gemm",
                     "mla_absorb_rope_append", "mla_decode", "bmm.out", "quant_fp8_1x128", "fp8_gemm"]
    assert len(before) >= 2 * len(after)


def decode_step_ops(model):
    """Every op one decode step of the whole model issues (batch 1)."""
    s = Session(model, max_len=64)
    s.prefill(ids(9, 5))
    log = OpLog()
    with log:
        s.decode([7])
    return log.names


@pytest.mark.parametrize("prefill_mode", ["decompressed", "absorbed"])
def test_norm_quant_fusion_equals_unfused(fp8_model, prefill_mode):
    """The norms fused with their linears' quantization: the same logits as rms_norm /
    fused_add_rms_norm then quant_fp8_1x128 (prefill in chunks, then decode)."""
    prompt = ids(70, 4)
    fp8_model.set_prefill_mode(prefill_mode)
    try:
        fused = run_steps(fp8_model, prompt, chunk=40)
        with switches(fuse_norm_quant=False):
            plain = run_steps(fp8_model, prompt, chunk=40)
    finally:
        fp8_model.set_prefill_mode("decompressed")
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


def test_norm_quant_fusion_call_sites(fp8_model):
    """Where the fused norms run in a decode step of the tiny R1 (layers 0-1 dense, 2-3 MoE): per layer
    the q_a norm (rms_norm_quant_fp8), the input norm (layer 0 without a residual yet: rms_norm_quant_fp8;
    then the fused add), and the post-attention norm of the dense layers only (the MoE's router reads
    the bf16 hidden state); the final norm stays plain."""
    names = decode_step_ops(fp8_model)
    count = lambda op: sum(n == op for n in names)  # noqa: E731
    assert count("rms_norm_quant_fp8") == 1 + 4
    assert count("fused_add_rms_norm_quant_fp8") == 2 + 3
    assert count("fused_add_rms_norm") == 2
    assert count("rms_norm") == 1
    with switches(fuse_norm_quant=False):
        names = decode_step_ops(fp8_model)
    assert count("rms_norm_quant_fp8") == count("fused_add_rms_norm_quant_fp8") == 0
    assert count("rms_norm") == 1 + 1 + 4 and count("fused_add_rms_norm") == 2 + 3 + 2


# ----------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("T,h", [(1, 1), (1, 128), (7, 16), (33, 17), (300, 4)])
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                          (torch.float16, torch.float16)])
def test_kernel_matches_reference_cuda(T, h, page_size, fp8, dtype, wdtype):
    num_pages = -(-T // page_size) + 2
    d = make_inputs(T, h, page_size, num_pages=num_pages, fp8=fp8, dtype=dtype, wdtype=wdtype, device="cuda",
                    seed=T * 131 + h)
    # Reference on the CPU with the same tables; its latent from the GPU norm kernel (the kernel's
    # summation order) for the bit-level cache comparison, and from torch for the 1-ulp bound.
    c = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    pos = c["positions"]
    lat_gpu = ops.rms_norm(d["kv"][:, :512], d["norm_weight"], EPS).cpu()
    lat_cpu = ref_norm.rms_norm(c["kv"][:, :512], c["norm_weight"], EPS)
    k_rope = YarnRope.apply(c["kv"][:, 512:], c["cos"][pos], c["sin"][pos])
    q_rope = YarnRope.apply(c["q_pe"], c["cos"][pos], c["sin"][pos])
    want = c["kv_cache"].clone()
    ref_mla.mla_cache_append(lat_gpu, k_rope, want, c["slot_mapping"])
    call_op(d)
    torch.cuda.synchronize()
    assert torch.equal(d["q_out"].cpu(), q_rope)
    assert torch.isnan(d["q_lat"][..., :512]).all()
    assert torch.equal(d["kv_cache"].cpu().view(torch.uint8), want.view(torch.uint8))
    # The GPU norm against torch's summation order: within one rounding of the input dtype.
    ulp = torch.finfo(dtype).eps * lat_cpu.float().abs().clamp_min(torch.finfo(dtype).tiny)
    assert torch.all((lat_gpu.float() - lat_cpu.float()).abs() <= ulp)


@pytest.mark.cuda
def test_kernel_skips_out_of_range_and_clamps_positions_cuda():
    d = make_inputs(5, 8, device="cuda", neg_every=0)
    cap = d["kv_cache"].shape[0] * d["kv_cache"].shape[1]
    d["slot_mapping"][0] = cap + 100
    d["positions"][1] = 10 ** 9        # clamped to the last table row
    d["positions"][2] = -4             # clamped to row 0
    before = d["kv_cache"].clone()
    call_op(d)
    torch.cuda.synchronize()
    c = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    pos = c["positions"].clamp(0, c["cos"].shape[0] - 1)
    q_rope = YarnRope.apply(c["q_pe"], c["cos"][pos], c["sin"][pos])
    assert torch.equal(c["q_out"], q_rope)
    flat = d["kv_cache"].view(torch.uint8).view(cap, -1)
    bflat = before.view(torch.uint8).view(cap, -1)
    others = torch.ones(cap, dtype=torch.bool, device="cuda")
    others[d["slot_mapping"][1:]] = False
    assert torch.equal(flat[others], bflat[others])  # nothing written for the out-of-range slot


@pytest.mark.cuda
@pytest.mark.parametrize("idx", range(13))
def test_bad_inputs_cuda(idx):
    kw, match = _bad_cases("cuda")[idx]
    with pytest.raises((ValueError, RuntimeError), match=match):
        call_op(kw)


def captured(fn):
    """fn run once (warm-up), then captured into a CUDA graph on a side stream."""
    fn()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    return g


@pytest.mark.cuda
def test_cuda_graph_capture():
    d = make_inputs(4, 16, device="cuda")
    g = captured(lambda: call_op(d))
    d["kv"].copy_(torch.randn_like(d["kv"]))
    d["positions"].copy_(torch.tensor([1, 2, 3, 4]))
    g.replay()
    torch.cuda.synchronize()
    c = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    pos = c["positions"]
    assert torch.equal(c["q_out"], YarnRope.apply(c["q_pe"], c["cos"][pos], c["sin"][pos]))


@pytest.mark.cuda
def test_fused_qkv_a_gemm_equals_separate_cuda():
    """R1's q_a (1536 rows) and kv_a (576) stacked into one FP8 GEMM. The per-block math is the
    same (one activation quantization, the same 128x128 weight scales), but the kernel's split-K
    choice depends on N, so the fp32 sum order may differ: within one bf16 rounding."""
    from flashseek.models.deepseek import fp8 as fp8_ops
    from flashseek.models.deepseek.layers import Linear, concat_linears
    g = torch.Generator(device="cuda").manual_seed(0)
    parts = []
    for n in (1536, 576):
        lin = Linear("fp8")
        lin.set(*fp8_ops.quantize_weight_128x128(torch.randn(n, 7168, device="cuda", generator=g) * 0.02))
        parts.append(lin)
    fused = concat_linears("fp8", False, parts)
    for t in (1, 3, 64, 300):
        x = torch.randn(t, 7168, device="cuda", generator=g).bfloat16()
        a, b = fused(x).float(), torch.cat([p(x) for p in parts], dim=1).float()
        diff = (a - b).abs()
        print(f"M={t}: {(diff > 0).float().mean().item():.4%} differ, max |diff| {diff.max().item():.3g}, "
              f"max |diff|/|b| {(diff / b.abs().clamp_min(1e-3)).max().item():.3g}")
        assert torch.all(diff <= 2 ** -7 * torch.maximum(a.abs(), b.abs()) + 1e-2), t


@pytest.mark.cuda
@pytest.mark.parametrize("prefill_mode", ["decompressed", "absorbed"])
@pytest.mark.parametrize("switch,seed", [("fuse_glue", 3), ("fuse_norm_quant", 5)])
def test_fusion_equals_unfused_cuda(model_dir, prefill_mode, switch, seed):
    """On the GPU each fusion equals the kernels it replaces bit for bit (the MLA glue kernels; the
    norms fused with quant_fp8_1x128), so the logits with the switch off are identical too."""
    model = load(model_dir, device="cuda")
    prompt = ids(70, seed)
    model.set_prefill_mode(prefill_mode)
    fused = run_steps(model, prompt, chunk=40)
    with switches(**{switch: False}):
        plain = run_steps(model, prompt, chunk=40)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# mla_absorb_rope_append: mla_rope_norm_append and the W_UK product in one launch (decode steps)
# ------------------------------------------------------------------------------------------------
ABSORB_ARGS = ("q", "kv", "w_uk", "positions", "cos", "sin", "norm_weight", "eps", "slot_mapping", "kv_cache", "q_lat")


def absorb_inputs(T, h, fp8=False, page_size=16, device="cpu", seed=0, nope=128):
    """make_inputs plus W_UK [h, nope, 512] (q's nope part is its first 128 columns; other widths get a
    fresh q). Outputs poisoned: q_lat NaN, the cache NaN."""
    d = make_inputs(T, h, page_size, num_pages=-(-T // page_size) + 2, fp8=fp8, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    if nope != 128:
        d["q"] = (torch.randn(T, h, nope + 64, generator=g) * 3).bfloat16().to(device)
    d["w_uk"] = (torch.randn(h, nope, 512, generator=g) * 0.05).bfloat16().to(device)
    return d


def call_absorb(d):
    torch.ops.flashseek.mla_absorb_rope_append(*[d[k] for k in ABSORB_ARGS])


def two_ops(d):
    """The pair the op replaces, on copies of d's outputs: (q_lat, kv_cache)."""
    q_lat, cache = d["q_lat"].clone(), d["kv_cache"].clone()
    nope = d["q"].shape[-1] - 64
    torch.ops.flashseek.mla_rope_norm_append(d["kv"], d["q"][..., nope:], d["positions"], d["cos"], d["sin"],
                                             d["norm_weight"], d["eps"], d["slot_mapping"], cache,
                                             q_lat[..., 512:])
    torch.ops.flashseek.mla_head_gemv(d["q"][..., :nope].transpose(0, 1), d["w_uk"], q_lat[..., :512].transpose(0, 1))
    return q_lat, cache


def _same_bytes(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("T,h", [(1, 3), (5, 2)])
@pytest.mark.parametrize("fp8", [False, True])
def test_absorb_rope_append_cpu(T, h, fp8):
    d = absorb_inputs(T, h, fp8)
    want_q, want_cache = two_ops(d)
    out = ops.mla_absorb_rope_append(*[d[k] for k in ABSORB_ARGS])
    assert out is d["q_lat"] and _same_bytes(out, want_q) and _same_bytes(d["kv_cache"], want_cache)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_absorb_rope_append_opcheck(device):
    d = absorb_inputs(3, 4, device=device)
    opcheck(torch.ops.flashseek.mla_absorb_rope_append.default, tuple(d[k] for k in ABSORB_ARGS))


def _absorb_bad_cases(device):
    cases = []

    def case(match, T=2, h=4, **over):
        d = absorb_inputs(T, h, device=device)
        for k, v in over.items():
            d[k] = v(d) if callable(v) else v
        cases.append((d, match))

    case("1 to 16 tokens", T=17)
    case("q must have dtype", q=lambda d: d["q"].half())
    case("norm_weight", norm_weight=lambda d: d["norm_weight"].float())
    case("q_lat", q_lat=lambda d: d["q_lat"][:, :, :575])
    case("w must have shape|w_uk", w_uk=lambda d: d["w_uk"][:3])
    case("w_uk|512", w_uk=lambda d: d["w_uk"][..., :256].contiguous())
    case("q_pe|kv|tokens", kv=lambda d: d["kv"][:1])
    return cases


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("idx", range(7))
def test_absorb_rope_append_bad_inputs(device, idx):
    d, match = _absorb_bad_cases(device)[idx]
    with pytest.raises((ValueError, RuntimeError), match=match):
        call_absorb(d)


@pytest.mark.cuda
def test_absorb_rope_append_wide_nope_cuda():
    """A head slice past one CTA (nope 192: 192 KB) is refused by the op; the wrapper runs the two ops."""
    d = absorb_inputs(2, 4, device="cuda", nope=192)
    with pytest.raises((ValueError, RuntimeError), match="qk_nope"):
        call_absorb(d)
    want_q, want_cache = two_ops(d)
    ops.mla_absorb_rope_append(*[d[k] for k in ABSORB_ARGS])
    assert _same_bytes(d["q_lat"], want_q) and _same_bytes(d["kv_cache"], want_cache)


@pytest.mark.cuda
@pytest.mark.parametrize("T,h", [(1, 128), (2, 128), (16, 128), (5, 16), (16, 3), (16, 1), (9, 2)])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("page_size", [16, 64])
def test_absorb_rope_append_equals_the_two_ops_cuda(T, h, fp8, page_size):
    """Bit for bit the pair it replaces: q_lat (its NaN poison fully overwritten) and every cache byte
    (written slots and the NaN pages around them; every third slot is padding, -1). h = 1 and 2 put
    several tokens' kv work on one CTA (tokens h + H w + 8 H i)."""
    d = absorb_inputs(T, h, fp8, page_size, device="cuda", seed=T * 37 + h)
    want_q, want_cache = two_ops(d)
    call_absorb(d)
    torch.cuda.synchronize()
    assert not d["q_lat"].isnan().any()
    assert _same_bytes(d["q_lat"], want_q)
    assert _same_bytes(d["kv_cache"], want_cache)


@pytest.mark.cuda
def test_absorb_rope_append_out_of_range_slot_and_positions_cuda():
    d = absorb_inputs(5, 8, device="cuda")
    cap = d["kv_cache"].shape[0] * d["kv_cache"].shape[1]
    d["slot_mapping"][0] = cap + 100
    d["positions"][1] = 10 ** 9
    d["positions"][2] = -4
    want_q, want_cache = two_ops(d)
    call_absorb(d)
    assert _same_bytes(d["q_lat"], want_q) and _same_bytes(d["kv_cache"], want_cache)


@pytest.mark.cuda
def test_absorb_rope_append_graph_replay_cuda():
    d = absorb_inputs(4, 16, device="cuda")
    g = captured(lambda: call_absorb(d))
    d["q"].copy_(torch.randn_like(d["q"]))
    d["kv"].copy_(torch.randn_like(d["kv"]))
    d["positions"].copy_(torch.tensor([5, 2, 9, 4]))
    g.replay()
    torch.cuda.synchronize()
    want_q, want_cache = two_ops(d)
    assert _same_bytes(d["q_lat"], want_q) and _same_bytes(d["kv_cache"], want_cache)


# ------------------------------------------------------------------------------------------------
# mla_head_gemv: the absorption's per-head projections (q_nope @ W_UK, o_lat @ W_UV^T)
# ------------------------------------------------------------------------------------------------
def _head_gemv_inputs(h, t, k, n, device, layout="views"):
    g = torch.Generator().manual_seed(h * 1000 + t * 10 + k + n)
    w = (torch.randn(h, k, n, generator=g) * 0.05).to(device, torch.bfloat16)
    if layout == "views":  # a and out as the model passes them: head-major views of token-major tensors
        a = torch.randn(t, h, k + 64, generator=g).to(device, torch.bfloat16)[..., :k].transpose(0, 1)
        big = torch.full((t, h, n + 64), float("nan"), device=device, dtype=torch.bfloat16)
        out = big[..., :n].transpose(0, 1)
    elif layout == "odd":  # out at an odd element offset with odd strides: no 4-byte column pairs
        a = torch.randn(t, h, k + 64, generator=g).to(device, torch.bfloat16)[..., :k].transpose(0, 1)
        big = torch.full((t, h, n + 65), float("nan"), device=device, dtype=torch.bfloat16)
        out = big[..., 1:n + 1].transpose(0, 1)
    else:
        a = torch.randn(h, t, k, generator=g).to(device, torch.bfloat16)
        big = torch.full((h, t, n), float("nan"), device=device, dtype=torch.bfloat16)
        out = big
    return a, w, out, big


def _head_gemv_check(a, w, out):
    exact = torch.bmm(a.double(), w.double())
    bound = torch.bmm(a.double().abs(), w.double().abs()) * (a.shape[2] * 2.0 ** -23)
    # One bf16 rounding of an fp32 sum that is within `bound` of the exact one (K additions of at most one
    # fp32 ulp each: the tensor cores' accumulation need not round to nearest).
    tol = bound + exact.abs() * 2.0 ** -8 + 1e-30
    assert not out.isnan().any()
    assert ((out.double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("h,t,k,n", [(4, 1, 128, 512), (3, 5, 512, 128), (2, 0, 64, 64)])
def test_mla_head_gemv_cpu(h, t, k, n):
    a, w, out, _ = _head_gemv_inputs(h, t, k, n, "cpu")
    torch.ops.flashseek.mla_head_gemv(a, w, out)
    if t:
        _head_gemv_check(a, w, out)
    # The wrapper: torch.bmm on CPU, the same values to bf16 rounding.
    ref = ops.mla_head_gemv(a, w)
    assert ref.shape == (h, t, n)


@pytest.mark.parametrize("bad,match", [
    (lambda a, w, o: (a.float(), w, o), "a must have dtype"),
    (lambda a, w, o: (a, w[:, :96], o), r"w must have shape \[H=2, K=128, N\]"),
    (lambda a, w, o: (a, w, o[:, :, :64]), "out must have shape"),
    (lambda a, w, o: (torch.zeros(2, 65, 128, dtype=torch.bfloat16), w, torch.zeros(2, 65, 128, dtype=torch.bfloat16)),
     "at most 64 tokens"),
    (lambda a, w, o: (a[:, :, :80], w[:, :80], o), "multiple of 32"),
    (lambda a, w, o: (a, w[:, :, :96], o[:, :, :96]), "multiple of 64"),
    (lambda a, w, o: (a, w.transpose(1, 2).contiguous().transpose(1, 2), o), "contiguous rows"),
])
def test_mla_head_gemv_bad_inputs(bad, match):
    a = torch.randn(2, 3, 128).to(torch.bfloat16)
    w = torch.randn(2, 128, 128).to(torch.bfloat16)
    o = torch.empty(2, 3, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        torch.ops.flashseek.mla_head_gemv(*bad(a, w, o))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_mla_head_gemv_opcheck(device):
    a, w, out, _ = _head_gemv_inputs(4, 3, 128, 128, device, layout="plain")
    opcheck(torch.ops.flashseek.mla_head_gemv.default, (a, w, out))


# Two kernels: every CTA's weight slice in shared memory by TMA (the default wherever a slice fits:
# all of these shapes) and the register-streaming one (FLASHSEEK_HEAD_GEMV=regs, read on every call).
@pytest.fixture(params=["smem", "regs"])
def head_gemv_impl(request, monkeypatch):
    if request.param == "regs":
        monkeypatch.setenv("FLASHSEEK_HEAD_GEMV", "regs")
    else:
        monkeypatch.delenv("FLASHSEEK_HEAD_GEMV", raising=False)
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 9, 16, 17, 31, 33, 64, 65])
@pytest.mark.parametrize("h,k,n", [(128, 128, 512), (128, 512, 128), (16, 128, 512), (3, 64, 64), (1, 1024, 192),
                                   (2, 1024, 256), (4, 256, 256), (2, 32, 512)])
@pytest.mark.parametrize("layout", ["views", "plain", "odd"])
def test_mla_head_gemv_cuda(t, h, k, n, layout, head_gemv_impl):
    a, w, out, big = _head_gemv_inputs(h, t, k, n, "cuda", layout)
    if t <= ops.MLA_HEAD_GEMV_MAX_T:
        # The op, i.e. the kernel at every token count it takes (the wrapper sends more than
        # MLA_HEAD_GEMV_KERNEL_MAX_T tokens, and views off 16-byte alignment, to bmm).
        torch.ops.flashseek.mla_head_gemv(a, w, out)
    else:
        ops.mla_head_gemv(a, w, out=out)
    _head_gemv_check(a, w, out)
    if layout == "views":  # the 64 columns past each row's N stay untouched
        assert big[..., n:].isnan().all()
    if layout == "odd":
        assert big[..., 0].isnan().all() and big[..., n + 1:].isnan().all()
    if t <= ops.MLA_HEAD_GEMV_MAX_T:  # the kernel: deterministic, and a graph replays it
        again = torch.empty_like(out)
        torch.ops.flashseek.mla_head_gemv(a, w, again)
        assert torch.equal(again, out)


# ------------------------------------------------------------------------------------------------
# mla_head_gemv_quant_fp8: W_UV^T's projection written as the o_proj input's FP8 blocks
# ------------------------------------------------------------------------------------------------
def _quant_reference(a, w, ue8m0):
    """quant_fp8_1x128 of mla_head_gemv's bf16 output laid out [T, H * 128]."""
    o = ops.mla_head_gemv(a, w)
    return ops.quant_fp8_1x128(o.transpose(0, 1).reshape(a.shape[1], a.shape[0] * 128), ue8m0)


@pytest.mark.parametrize("h,t,k", [(4, 1, 512), (3, 5, 128), (2, 0, 512)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_mla_head_gemv_quant_fp8_cpu(h, t, k, ue8m0):
    a, w, _, _ = _head_gemv_inputs(h, t, k, 128, "cpu")
    q, s = ops.mla_head_gemv_quant_fp8(a, w, ue8m0)
    assert q.shape == (t, h * 128) and q.dtype == torch.float8_e4m3fn and s.shape == (t, h)
    rq, rs = _quant_reference(a, w, ue8m0)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs)


@pytest.mark.parametrize("bad,match", [
    (lambda a, w, q, s: (a, w[:, :, :64].contiguous(), q, s), r"w must have shape \[H=2, K=128, 128\]"),
    (lambda a, w, q, s: (a, w, q.view(torch.uint8), s), "out must have dtype"),
    (lambda a, w, q, s: (a, w, q[:, :128], s), "out must have shape"),
    (lambda a, w, q, s: (a, w, q, s.contiguous() if s.shape[0] > 1 else s), "column-major"),
    (lambda a, w, q, s: (a, w, q, s[:, :1]), "scale must have shape"),
])
def test_mla_head_gemv_quant_fp8_bad_inputs(bad, match):
    a = torch.randn(2, 3, 128).to(torch.bfloat16)
    w = torch.randn(2, 128, 128).to(torch.bfloat16)
    q = torch.empty(3, 256, dtype=torch.float8_e4m3fn)
    s = ops.empty_act_scale(3, 2, "cpu")
    with pytest.raises(ValueError, match=match):
        torch.ops.flashseek.mla_head_gemv_quant_fp8(*bad(a, w, q, s))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_mla_head_gemv_quant_fp8_rejects_wide_k(device):
    """K past MLA_HEAD_GEMV_QUANT_MAX_K (the bf16 op still takes it) is a clear error on both paths."""
    k = ops.MLA_HEAD_GEMV_QUANT_MAX_K + 32
    a, w, _, _ = _head_gemv_inputs(2, 1, k, 128, device, layout="plain")
    q = torch.empty(1, 256, dtype=torch.float8_e4m3fn, device=device)
    s = ops.empty_act_scale(1, 2, device)
    with pytest.raises((ValueError, RuntimeError), match=f"K a positive multiple of 32 up to {ops.MLA_HEAD_GEMV_QUANT_MAX_K}"
                       if device == "cpu" else f"takes K <= {ops.MLA_HEAD_GEMV_QUANT_MAX_K}"):
        torch.ops.flashseek.mla_head_gemv_quant_fp8(a, w, q, s, False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_mla_head_gemv_quant_fp8_opcheck(device):
    a, w, _, _ = _head_gemv_inputs(4, 3, 512, 128, device, layout="plain")
    q = torch.empty(3, 512, dtype=torch.float8_e4m3fn, device=device)
    s = ops.empty_act_scale(3, 4, device)
    opcheck(torch.ops.flashseek.mla_head_gemv_quant_fp8.default, (a, w, q, s, False))


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 2, 3, 5, 8, 12, 16, 17, 40, 64])
@pytest.mark.parametrize("h,k", [(128, 512), (16, 512), (3, 128), (1, 576)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_mla_head_gemv_quant_fp8_cuda(t, h, k, ue8m0):
    """Bit-identical to quantizing the (default, shared-memory) kernel's bf16 output; outputs poisoned."""
    a, w, _, _ = _head_gemv_inputs(h, t, k, 128, "cuda", layout="views")
    q = poison_(torch.empty(t, h * 128, dtype=torch.float8_e4m3fn, device="cuda"))
    s = poison_(ops.empty_act_scale(t, h, "cuda"))
    torch.ops.flashseek.mla_head_gemv_quant_fp8(a, w, q, s, ue8m0)
    rq, rs = _quant_reference(a, w, ue8m0)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(s, rs)
    _head_gemv_check(a, w, ops.mla_head_gemv(a, w))  # and that output is the product
