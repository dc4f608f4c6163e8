"""RMSNorm and fused residual-add + RMSNorm: reference semantics (CPU) and the CUDA kernels.

Tolerances: the reference is the spec (flashseek.ref.norm); against a float64 evaluation of the
same formula it is within one rounding of the output dtype (plus a few fp32 ulps). The kernel sums
the squares in a different (fixed) order than torch, so against the reference it is within one ulp
of the output dtype (bf16/fp16) or 1e-5 relative (fp32); the residual it stores is bit-exact.
"""
import pytest
import torch

from flashseek import ops
from flashseek.ref import norm as ref_norm
from tests.utils import opcheck, poison_

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
