"""RMSNorm and fused residual-add + RMSNorm: reference semantics (CPU) and the CUDA kernels; the
same fused with the FP8 1x128 quantization of their output (bit-identical to the unfused pair).

Tolerances: the reference is the spec (flashseek.ref.norm); against a float64 evaluation of the
same formula it is within one rounding of the output dtype (plus a few fp32 ulps). The kernel sums
the squares in a different (fixed) order than torch, so against the reference it is within one ulp
of the output dtype (bf16/fp16) or 1e-5 relative (fp32); the residual it stores is bit-exact.
"""
import pytest
import torch

from flashseek import ops
from flashseek.ref import norm as ref_norm
from flashseek.ref import quant as ref_quant
from tests.utils import FP8, opcheck, poison_

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Relative spacing of the output dtype: one rounding is at most half of it, allow a full one.
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-20}
# Spacing of the subnormals, where the relative bound does not hold (fp16 only in practice).
SUBNORMAL = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24, torch.float32: 2.0**-149}


def _rand(m, n, dtype, device="cpu", scale=1.0):
    # Rows of different magnitudes (the norm must be scale-free) and an offset so means are nonzero.
    x = (torch.randn(m, n) + 0.3) * torch.logspace(-2, 2, max(m, 1))[:m, None] * scale
    return x.to(device=device, dtype=dtype)


def _weight(n, dtype, device="cpu"):
    return (1 + 0.5 * torch.randn(n)).to(device=device, dtype=dtype)


def _f64_rms_norm(x, w, eps):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _close_ulps(y, ref, dtype, ulps=1.0):
    """|y - ref| <= ulps * spacing(dtype) * (|ref| + smallest normal) (subnormals have fixed spacing)."""
    y, ref = y.double(), ref.double()
    tol = ulps * (ULP[dtype] * ref.abs() + SUBNORMAL[dtype])
    bad = (y - ref).abs() > tol
    assert not bad.any(), f"{int(bad.sum())} elements off by more than {ulps} ulp(s); max abs err {(y - ref).abs().max()}"


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 512, 1536, 7168])
def test_rms_norm_reference_vs_float64(dtype, wdtype, n):
    x, w = _rand(13, n, dtype), _weight(n, wdtype)
    y = ops.rms_norm(x, w, 1e-6)
    assert y.dtype == dtype and y.shape == x.shape
    # One rounding to the output dtype (half a spacing) plus fp32 evaluation error.
    _close_ulps(y, _f64_rms_norm(x, w, 1e-6), dtype, ulps=0.5 + (2.0**-20 / ULP[dtype]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [3, 1536, 7168])
def test_fused_add_rms_norm_reference(dtype, n):
    x, res, w = _rand(9, n, dtype), _rand(9, n, dtype), _weight(n, torch.bfloat16)
    x0, res0 = x.clone(), res.clone()
    out_x, out_r = ops.fused_add_rms_norm(x, res, w, 1e-6)
    assert out_x is x and out_r is res
    # The sum is rounded once, to the dtype, exactly as `res0 + x0` in torch...
    assert torch.equal(res, res0 + x0)
    # ...and the norm reads that rounded sum: identical to the unfused pair.
    assert torch.equal(x, ref_norm.rms_norm(res0 + x0, w, 1e-6))
    _close_ulps(x, _f64_rms_norm(res, w, 1e-6), dtype, ulps=0.5 + (2.0**-20 / ULP[dtype]))


def test_rms_norm_matches_model_formula_exactly():
    from flashseek.models.deepseek.layers import rms_norm as model_rms_norm
    for dtype in DTYPES:
        x, w = _rand(5, 576, dtype)[:, :512], _weight(512, torch.bfloat16)
        assert torch.equal(ops.rms_norm(x, w, 1e-6), model_rms_norm(x, w, 1e-6))


def test_rms_norm_zero_rows_and_zero_input():
    y = ops.rms_norm(torch.empty(0, 7168, dtype=torch.bfloat16), torch.ones(7168, dtype=torch.bfloat16), 1e-6)
    assert y.shape == (0, 7168)
    x, r = torch.empty(0, 64), torch.empty(0, 64)
    ops.fused_add_rms_norm(x, r, torch.ones(64), 1e-6)
    # An all-zero row normalizes to zero (eps keeps the rsqrt finite).
    z = ops.rms_norm(torch.zeros(2, 64), torch.ones(64), 1e-6)
    assert torch.equal(z, torch.zeros(2, 64))


def test_rms_norm_strided_rows_and_out():
    base = _rand(6, 576, torch.bfloat16)
    x = base[:, :512]                      # the kv_a latent view: row stride 576
    w = _weight(512, torch.bfloat16)
    out_base = poison_(torch.empty(6, 640, dtype=torch.bfloat16))
    out = out_base[:, 64:576]
    ops.rms_norm(x, w, 1e-6, out=out)
    assert torch.equal(out, ref_norm.rms_norm(x.contiguous(), w, 1e-6))
    assert out_base[:, :64].isnan().all() and out_base[:, 576:].isnan().all()
    xr = _rand(6, 1024, torch.bfloat16)[:, 256:768].clone(memory_format=torch.contiguous_format)
    rb = _rand(6, 1024, torch.bfloat16)
    r = rb[:, 256:768]
    x0, r0 = xr.clone(), r.clone()
    ops.fused_add_rms_norm(xr, r, w, 1e-6)
    assert torch.equal(r, r0 + x0) and torch.equal(xr, ref_norm.rms_norm(r0 + x0, w, 1e-6))


@pytest.mark.parametrize("call, match", [
    (lambda: ops.rms_norm(torch.randn(4, 8).to(torch.int32), torch.ones(8), 1e-6), "x must have dtype"),
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.ones(7), 1e-6), "weight must have shape"),
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.ones(8, dtype=torch.float64), 1e-6), "weight must have dtype"),
    (lambda: ops.rms_norm(torch.randn(4, 2, 8), torch.ones(8), 1e-6), "x must be 2-D"),
    (lambda: ops.rms_norm(torch.randn(8, 4).t(), torch.ones(8), 1e-6), "unit stride"),
    (lambda: ops.rms_norm(torch.randn(4, 16385), torch.ones(16385), 1e-6), "16384"),
    (lambda: ops.rms_norm(torch.randn(4, 0), torch.ones(0), 1e-6), "16384"),
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.ones(8), -1.0), "eps"),
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.ones(8), 1e-6, out=torch.empty(4, 8, dtype=torch.bfloat16)),
     "out must have dtype"),
    (lambda: ops.rms_norm(torch.randn(4, 8), torch.ones(16)[::2], 1e-6), "weight must be contiguous"),
    (lambda: ops.fused_add_rms_norm(torch.randn(4, 8), torch.randn(4, 8).bfloat16(), torch.ones(8), 1e-6),
     "residual must have dtype"),
    (lambda: ops.fused_add_rms_norm(torch.randn(4, 8), torch.randn(3, 8), torch.ones(8), 1e-6),
     "residual must have shape"),
])
def test_norm_bad_inputs(call, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_opcheck_cpu(dtype):
    x, w = _rand(5, 256, dtype), _weight(256, torch.bfloat16)
    opcheck(torch.ops.flashseek.rms_norm.default, (x, w, 1e-6, torch.empty_like(x)))
    opcheck(torch.ops.flashseek.fused_add_rms_norm.default, (x.clone(), _rand(5, 256, dtype), w, 1e-6))


# ----------------------------------------------------------------------------------------- CUDA
CUDA_SHAPES = [(1, 7168), (16, 7168), (128, 7168), (4096, 7168), (37, 1536), (300, 512), (3, 16384),
               (65, 7), (2, 1000), (1, 1), (5, 4100)]


@pytest.mark.cuda
def test_norm_kernels_registered():
    assert ops.has_cuda_kernel("rms_norm") and ops.has_cuda_kernel("fused_add_rms_norm")


@pytest.mark.cuda
@pytest.mark.parametrize("m,n", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_rms_norm_cuda_vs_reference(m, n, dtype, wdtype):
    x, w = _rand(m, n, dtype, "cuda"), _weight(n, wdtype, "cuda")
    out = poison_(torch.empty(m, n, dtype=dtype, device="cuda"))
    ops.rms_norm(x, w, 1e-6, out=out)
    _close_ulps(out, ref_norm.rms_norm(x, w, 1e-6), dtype, ulps=1.0 if dtype != torch.float32 else 10.0)
    # Deterministic: a second run gives the same bits.
    assert torch.equal(ops.rms_norm(x, w, 1e-6), out)


@pytest.mark.cuda
@pytest.mark.parametrize("m,n", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_cuda_vs_reference(m, n, dtype):
    x, res, w = _rand(m, n, dtype, "cuda"), _rand(m, n, dtype, "cuda", 3.0), _weight(n, torch.bfloat16, "cuda")
    ref_y, ref_r = ref_norm.fused_add_rms_norm(x, res, w, 1e-6)
    ops.fused_add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(res, ref_r), "the residual sum must be bit-exact"
    _close_ulps(x, ref_y, dtype, ulps=1.0 if dtype != torch.float32 else 10.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_cuda_strided_misaligned_inplace_empty(dtype):
    w = _weight(512, torch.bfloat16, "cuda")
    base = _rand(33, 576, dtype, "cuda")
    x = base[:, :512]                                   # vector path, row stride 576
    out = poison_(torch.empty(33, 512, dtype=dtype, device="cuda"))
    ops.rms_norm(x, w, 1e-6, out=out)
    _close_ulps(out, ref_norm.rms_norm(x, w, 1e-6), dtype, 1.0 if dtype != torch.float32 else 10.0)
    xm = base[:, 1:513]                                 # misaligned: scalar path
    _close_ulps(ops.rms_norm(xm, w, 1e-6), ref_norm.rms_norm(xm, w, 1e-6), dtype,
                1.0 if dtype != torch.float32 else 10.0)
    xi = x.clone()
    ops.rms_norm(xi, w, 1e-6, out=xi)                   # in place
    assert torch.equal(xi, out)
    rb = _rand(33, 600, dtype, "cuda")
    r, xf = rb[:, 3:515], _rand(33, 512, dtype, "cuda")  # misaligned residual rows
    ref_y, ref_r = ref_norm.fused_add_rms_norm(xf, r, w, 1e-6)
    ops.fused_add_rms_norm(xf, r, w, 1e-6)
    assert torch.equal(r, ref_r)
    _close_ulps(xf, ref_y, dtype, 1.0 if dtype != torch.float32 else 10.0)
    assert ops.rms_norm(torch.empty(0, 512, dtype=dtype, device="cuda"), w, 1e-6).shape == (0, 512)


@pytest.mark.cuda
def test_norm_cuda_graph_capture():
    m, n = 16, 7168
    x, res, w = _rand(m, n, torch.bfloat16, "cuda"), _rand(m, n, torch.bfloat16, "cuda"), \
        _weight(n, torch.bfloat16, "cuda")
    xs, rs = x.clone(), res.clone()
    out = torch.empty_like(x)
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        ops.rms_norm(xs, w, 1e-6, out=out)
        ops.fused_add_rms_norm(xs, rs, w, 1e-6)
    xs.copy_(x)
    rs.copy_(res)
    g.replay()
    torch.cuda.synchronize()
    ref_out = ref_norm.rms_norm(x, w, 1e-6)
    ref_y, ref_r = ref_norm.fused_add_rms_norm(x, res, w, 1e-6)
    _close_ulps(out, ref_out, torch.bfloat16)
    assert torch.equal(rs, ref_r)
    _close_ulps(xs, ref_y, torch.bfloat16)


@pytest.mark.cuda
def test_norm_cuda_bad_inputs():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="weight must have shape"):
        torch.ops.flashseek.rms_norm(x, torch.ones(32, device="cuda"), 1e-6, torch.empty_like(x))
    with pytest.raises((ValueError, RuntimeError), match="residual must have dtype"):
        torch.ops.flashseek.fused_add_rms_norm(x, x.bfloat16(), torch.ones(64, device="cuda"), 1e-6)


@pytest.mark.cuda
def test_norm_opcheck_cuda():
    x, w = _rand(6, 7168, torch.bfloat16, "cuda"), _weight(7168, torch.bfloat16, "cuda")
    opcheck(torch.ops.flashseek.rms_norm.default, (x, w, 1e-6, torch.empty_like(x)))
    opcheck(torch.ops.flashseek.fused_add_rms_norm.default, (x.clone(), _rand(6, 7168, torch.bfloat16, "cuda"), w,
                                                             1e-6))


# ------------------------------------------------------------------------------------------------
# RMSNorm + FP8 1x128 quantization: rms_norm_quant_fp8, fused_add_rms_norm_quant_fp8
# ------------------------------------------------------------------------------------------------
QDTYPES = [torch.bfloat16, torch.float16]


def _bytes(q):
    return q.view(torch.uint8)


def _strided(x, pad=64):
    """x's values in a view whose rows are x.shape[1] + pad elements apart (16-byte aligned rows)."""
    m, n = x.shape
    base = poison_(torch.empty(m, n + pad, dtype=x.dtype, device=x.device))
    base[:, pad // 2: pad // 2 + n] = x
    return base[:, pad // 2: pad // 2 + n]


def _poisoned_outputs(m, n, device):
    return poison_(torch.empty(m, n, dtype=FP8, device=device)), poison_(ops.empty_act_scale(m, n // 128, device))


def _assert_same_quant(q, s, rq, rs):
    assert q.shape == rq.shape and s.shape == rs.shape
    assert s.stride() == rs.stride(), f"scale strides {s.stride()} != quant_fp8_1x128's {rs.stride()}"
    assert torch.equal(s, rs), "scales differ"
    assert torch.equal(_bytes(q), _bytes(rq)), f"{int((_bytes(q) != _bytes(rq)).sum())} e4m3 bytes differ"


def _unfused_norm_quant(x, w, eps, ue8m0):
    return ops.quant_fp8_1x128(ops.rms_norm(x, w, eps), ue8m0)


def _unfused_add_norm_quant(x, res, w, eps, ue8m0):
    """(q, scale, residual after) of fused_add_rms_norm then quant_fp8_1x128, on copies."""
    x2, r2 = x.clone(), res.clone()
    ops.fused_add_rms_norm(x2, r2, w, eps)
    q, s = ops.quant_fp8_1x128(x2, ue8m0)
    return q, s, r2


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("n", [128, 512, 1536])
def test_rms_norm_quant_reference(n, wdtype, dtype, ue8m0):
    x, w = _rand(11, n, dtype), _weight(n, wdtype)
    x0 = x.clone()
    out, scale = _poisoned_outputs(11, n, "cpu")
    q, s = ops.rms_norm_quant_fp8(x, w, 1e-6, ue8m0, out=out, scale=scale)
    assert q is out and s is scale and torch.equal(x, x0)
    _assert_same_quant(q, s, *_unfused_norm_quant(x, w, 1e-6, ue8m0))
    # The spec, spelled out: the norm rounded to x's dtype, then quant_fp8_1x128's formula.
    rq, rs = ref_quant.quant_fp8_1x128(ref_norm.rms_norm(x, w, 1e-6), ue8m0)
    assert torch.equal(_bytes(q), _bytes(rq)) and torch.equal(s, rs)
    # Wrapper-allocated outputs: quant_fp8_1x128's layout.
    q2, s2 = ops.rms_norm_quant_fp8(x, w, 1e-6, ue8m0)
    _assert_same_quant(q2, s2, q, s)


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("n", [256, 1536])
def test_fused_add_rms_norm_quant_reference(n, dtype, ue8m0):
    x, res, w = _rand(9, n, dtype), _rand(9, n, dtype, scale=3.0), _weight(n, torch.bfloat16)
    x0, res0 = x.clone(), res.clone()
    rq, rs, rr = _unfused_add_norm_quant(x, res, w, 1e-6, ue8m0)
    q, s = ops.fused_add_rms_norm_quant_fp8(x, res, w, 1e-6, ue8m0)
    assert torch.equal(x, x0), "x is left untouched"
    assert torch.equal(res, res0 + x0) and torch.equal(res, rr), "residual holds the rounded sum"
    _assert_same_quant(q, s, rq, rs)
    gq, gs, gr = ref_norm.fused_add_rms_norm_quant_fp8(x0, res0, w, 1e-6, ue8m0)
    assert torch.equal(gr, rr) and torch.equal(_bytes(gq), _bytes(q)) and torch.equal(gs, s)


def test_norm_quant_strided_rows_and_empty_cpu():
    w = _weight(512, torch.bfloat16)
    x = _rand(6, 512, torch.bfloat16)
    xs = _strided(x)
    _assert_same_quant(*ops.rms_norm_quant_fp8(xs, w, 1e-6), *_unfused_norm_quant(x, w, 1e-6, False))
    res = _rand(6, 512, torch.bfloat16)
    rs = _strided(res)
    rq, rsc, rr = _unfused_add_norm_quant(x, res, w, 1e-6, True)
    q, s = ops.fused_add_rms_norm_quant_fp8(xs, rs, w, 1e-6, True)
    assert torch.equal(rs, rr)
    _assert_same_quant(q, s, rq, rsc)
    q, s = ops.rms_norm_quant_fp8(torch.empty(0, 7168, dtype=torch.bfloat16), torch.ones(7168), 1e-6)
    assert q.shape == (0, 7168) and s.shape == (0, 56)
    q, s = ops.fused_add_rms_norm_quant_fp8(torch.empty(0, 256, dtype=torch.float16),
                                            torch.empty(0, 256, dtype=torch.float16), torch.ones(256), 1e-6)
    assert q.shape == (0, 256) and s.shape == (0, 2)


def _bad_norm_quant_calls(device):
    bf = lambda *shape: torch.randn(*shape, device=device).bfloat16()  # noqa: E731
    w = lambda n, dt=torch.bfloat16: torch.ones(n, device=device, dtype=dt)  # noqa: E731
    fp8 = lambda *shape: torch.empty(*shape, device=device, dtype=FP8)  # noqa: E731
    sc = lambda m, kb: ops.empty_act_scale(m, kb, device)  # noqa: E731
    nq = torch.ops.flashseek.rms_norm_quant_fp8
    faq = torch.ops.flashseek.fused_add_rms_norm_quant_fp8
    return [
        (lambda: nq(bf(4, 256).float(), w(256), 1e-6, fp8(4, 256), sc(4, 2)),
         r"x must have dtype (torch\.)?bfloat16 or (torch\.)?float16"),
        (lambda: nq(bf(4, 256).to(torch.int32), w(256), 1e-6, fp8(4, 256), sc(4, 2)), "x must have dtype"),
        (lambda: nq(bf(4, 192), w(192), 1e-6, fp8(4, 192), sc(4, 1)), "multiple of 128"),
        (lambda: nq(bf(4, 256), w(128), 1e-6, fp8(4, 256), sc(4, 2)), "weight must have shape"),
        (lambda: nq(bf(4, 256), w(256, torch.float64), 1e-6, fp8(4, 256), sc(4, 2)), "weight must have dtype"),
        (lambda: nq(bf(4, 256), w(256), 1e-6, fp8(4, 128), sc(4, 2)), "out must have shape"),
        (lambda: nq(bf(4, 256), w(256), 1e-6, bf(4, 256), sc(4, 2)), "out must have dtype"),
        (lambda: nq(bf(4, 256), w(256), 1e-6, fp8(4, 256), torch.empty(4, 2, device=device)), "column-major"),
        (lambda: nq(bf(4, 256), w(256), 1e-6, fp8(4, 256), sc(3, 2)), "scale must have shape"),
        (lambda: nq(bf(4, 260)[:, :256], w(256), 1e-6, fp8(4, 256), sc(4, 2)), "row stride"),
        (lambda: nq(bf(4, 2, 256), w(256), 1e-6, fp8(4, 256), sc(4, 2)), "x must be 2-D"),
        (lambda: nq(bf(4, 256), w(256), -1.0, fp8(4, 256), sc(4, 2)), "eps"),
        (lambda: faq(bf(4, 256), bf(3, 256), w(256), 1e-6, fp8(4, 256), sc(4, 2)), "residual must have shape"),
        (lambda: faq(bf(4, 256), bf(4, 256).half(), w(256), 1e-6, fp8(4, 256), sc(4, 2)),
         "residual must have dtype"),
        (lambda: faq(bf(4, 256), bf(4, 260)[:, :256], w(256), 1e-6, fp8(4, 256), sc(4, 2)), "row stride"),
        (lambda: faq(bf(4, 128), bf(4, 128), w(128), 1e-6, fp8(4, 128), sc(4, 2)), "scale must have shape"),
    ]


@pytest.mark.parametrize("idx", range(16))
def test_norm_quant_bad_inputs(idx):
    call, match = _bad_norm_quant_calls("cpu")[idx]
    with pytest.raises((ValueError, RuntimeError), match=match):
        call()


def test_norm_quant_wrapper_rejects_bad_width():
    with pytest.raises((ValueError, RuntimeError), match="multiple of 128"):
        ops.rms_norm_quant_fp8(torch.randn(2, 100).bfloat16(), torch.ones(100), 1e-6)
    with pytest.raises((ValueError, RuntimeError), match="multiple of 128"):
        ops.fused_add_rms_norm_quant_fp8(torch.randn(2, 100).half(), torch.randn(2, 100).half(), torch.ones(100),
                                         1e-6)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_norm_quant_opcheck_cpu(ue8m0):
    x, w = _rand(5, 256, torch.bfloat16), _weight(256, torch.bfloat16)
    opcheck(torch.ops.flashseek.rms_norm_quant_fp8.default,
            (x, w, 1e-6, torch.empty(5, 256, dtype=FP8), ops.empty_act_scale(5, 2, "cpu"), ue8m0))
    opcheck(torch.ops.flashseek.fused_add_rms_norm_quant_fp8.default,
            (x, _rand(5, 256, torch.bfloat16), w, 1e-6, torch.empty(5, 256, dtype=FP8),
             ops.empty_act_scale(5, 2, "cpu"), ue8m0))


# ----------------------------------------------------------------------------------------- CUDA
QUANT_ROWS = [0, 1, 3, 64, 129, 4096]
QUANT_WIDTHS = [128, 512, 1536, 7168]


@pytest.mark.cuda
def test_norm_quant_kernels_registered():
    assert ops.has_cuda_kernel("rms_norm_quant_fp8") and ops.has_cuda_kernel("fused_add_rms_norm_quant_fp8")


@pytest.mark.cuda
@pytest.mark.parametrize("m", QUANT_ROWS)
@pytest.mark.parametrize("n", QUANT_WIDTHS)
@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_rms_norm_quant_cuda_bit_exact(m, n, dtype, ue8m0, strided):
    x, w = _rand(m, n, dtype, "cuda"), _weight(n, torch.bfloat16, "cuda")
    if strided:
        x = _strided(x)
    x0 = x.clone()
    out, scale = _poisoned_outputs(m, n, "cuda")
    q, s = ops.rms_norm_quant_fp8(x, w, 1e-6, ue8m0, out=out, scale=scale)
    assert torch.equal(x, x0)
    _assert_same_quant(q, s, *_unfused_norm_quant(x, w, 1e-6, ue8m0))


@pytest.mark.cuda
@pytest.mark.parametrize("m", QUANT_ROWS)
@pytest.mark.parametrize("n", QUANT_WIDTHS)
@pytest.mark.parametrize("dtype", QDTYPES)
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_fused_add_rms_norm_quant_cuda_bit_exact(m, n, dtype, ue8m0, strided):
    x, res, w = _rand(m, n, dtype, "cuda"), _rand(m, n, dtype, "cuda", 3.0), _weight(n, torch.bfloat16, "cuda")
    if strided:
        x, res = _strided(x), _strided(res, pad=128)
    x0 = x.clone()
    rq, rs, rr = _unfused_add_norm_quant(x, res, w, 1e-6, ue8m0)
    out, scale = _poisoned_outputs(m, n, "cuda")
    q, s = ops.fused_add_rms_norm_quant_fp8(x, res, w, 1e-6, ue8m0, out=out, scale=scale)
    assert torch.equal(x, x0), "x is left untouched"
    assert torch.equal(res, rr), "the residual sum must be bit-exact"
    _assert_same_quant(q, s, rq, rs)


@pytest.mark.cuda
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("m,n", [(1, 7168), (5, 1536), (33, 16384), (7, 1152), (2, 8192)])
def test_norm_quant_cuda_weight_dtypes_and_widths(wdtype, m, n):
    """Every weight dtype, and the launch shapes' edges: 1152 (a half-filled last warp), 8192 (1024
    threads), 16384 (four accesses a thread)."""
    x, res, w = _rand(m, n, torch.bfloat16, "cuda"), _rand(m, n, torch.bfloat16, "cuda"), _weight(n, wdtype, "cuda")
    _assert_same_quant(*ops.rms_norm_quant_fp8(x, w, 1e-6), *_unfused_norm_quant(x, w, 1e-6, False))
    rq, rs, rr = _unfused_add_norm_quant(x, res, w, 1e-6, True)
    q, s = ops.fused_add_rms_norm_quant_fp8(x, res, w, 1e-6, True)
    assert torch.equal(res, rr)
    _assert_same_quant(q, s, rq, rs)


@pytest.mark.cuda
def test_norm_quant_cuda_against_reference():
    """Against the pure-torch spec: the same up to the norm's summation order (one bf16 rounding of
    the normalized value, so e4m3 bytes may differ by one step where that rounding differs)."""
    x, w = _rand(64, 7168, torch.bfloat16, "cuda"), _weight(7168, torch.bfloat16, "cuda")
    q, s = ops.rms_norm_quant_fp8(x, w, 1e-6)
    rq, rs = ref_quant.quant_fp8_1x128(ref_norm.rms_norm(x, w, 1e-6))
    assert torch.allclose(s, rs, rtol=2.0**-6, atol=0)
    deq, rdeq = ref_quant.dequant_fp8_1x128(q, s), ref_quant.dequant_fp8_1x128(rq, rs)
    assert ((deq - rdeq).abs() <= rdeq.abs() / 4 + s.repeat_interleave(128, 1) * 2**-7).all()


@pytest.mark.cuda
def test_norm_quant_cuda_bad_inputs():
    for call, match in _bad_norm_quant_calls("cuda"):
        with pytest.raises((ValueError, RuntimeError), match=match):
            call()
    nq = torch.ops.flashseek.rms_norm_quant_fp8
    base = torch.randn(4, 512, device="cuda").bfloat16()
    # Rows 16 bytes apart but not 16-byte aligned: the data pointer 2 bytes in.
    with pytest.raises((ValueError, RuntimeError), match="16-byte aligned"):
        nq(base[:, 1:257], torch.ones(256, device="cuda"), 1e-6, torch.empty(4, 256, dtype=FP8, device="cuda"),
           ops.empty_act_scale(4, 2, "cuda"))
    with pytest.raises((ValueError, RuntimeError), match="weight must be 16-byte aligned"):
        nq(base[:, :256], torch.ones(257, device="cuda").bfloat16()[1:], 1e-6,
           torch.empty(4, 256, dtype=FP8, device="cuda"), ops.empty_act_scale(4, 2, "cuda"))
    x = torch.randn(4, 256, device="cuda").bfloat16()
    with pytest.raises((ValueError, RuntimeError), match="alias"):
        torch.ops.flashseek.fused_add_rms_norm_quant_fp8(x, x, torch.ones(256, device="cuda"), 1e-6,
                                                         torch.empty(4, 256, dtype=FP8, device="cuda"),
                                                         ops.empty_act_scale(4, 2, "cuda"))


@pytest.mark.cuda
def test_norm_quant_cuda_graph_capture():
    m, n = 4, 7168
    x, res, w = _rand(m, n, torch.bfloat16, "cuda"), _rand(m, n, torch.bfloat16, "cuda"), \
        _weight(n, torch.bfloat16, "cuda")
    xs, rs = x.clone(), res.clone()
    (q1, s1), (q2, s2) = _poisoned_outputs(m, n, "cuda"), _poisoned_outputs(m, n, "cuda")
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        ops.rms_norm_quant_fp8(xs, w, 1e-6, out=q1, scale=s1)
        ops.fused_add_rms_norm_quant_fp8(xs, rs, w, 1e-6, out=q2, scale=s2)
    rs.copy_(res)
    g.replay()
    torch.cuda.synchronize()
    _assert_same_quant(q1, s1, *_unfused_norm_quant(x, w, 1e-6, False))
    rq, rsc, rr = _unfused_add_norm_quant(x, res, w, 1e-6, False)
    assert torch.equal(rs, rr)
    _assert_same_quant(q2, s2, rq, rsc)


@pytest.mark.cuda
def test_norm_quant_opcheck_cuda():
    x, w = _rand(6, 7168, torch.bfloat16, "cuda"), _weight(7168, torch.bfloat16, "cuda")
    opcheck(torch.ops.flashseek.rms_norm_quant_fp8.default,
            (x, w, 1e-6, torch.empty(6, 7168, dtype=FP8, device="cuda"), ops.empty_act_scale(6, 56, "cuda"), True))
    opcheck(torch.ops.flashseek.fused_add_rms_norm_quant_fp8.default,
            (x, _rand(6, 7168, torch.bfloat16, "cuda"), w, 1e-6, torch.empty(6, 7168, dtype=FP8, device="cuda"),
             ops.empty_act_scale(6, 56, "cuda"), False))
