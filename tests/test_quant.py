"""FP8 1x128 quantization: reference semantics (CPU) and bit-exact CUDA kernels."""
import pytest
import torch

import flashseek
from flashseek import ops
from flashseek.ref import quant as ref_quant
from tests.utils import FP8, is_powers_of_two, opcheck, poison_


def _bytes(q):
    return q.view(torch.uint8)


def _rand(m, k, dtype=torch.bfloat16, device="cpu"):
    # Rows of very different magnitudes, so scales span many binades; some all-zero blocks hit the floor.
    x = torch.randn(m, k, device=device) * torch.logspace(-6, 3, max(m, 1), device=device)[:m, None]
    if m > 2:
        x[1, :128] = 0
    return x.to(dtype)


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quant_reference_semantics(ue8m0, dtype):
    x = _rand(37, 512, dtype)
    q, s = ops.quant_fp8_1x128(x, ue8m0=ue8m0)
    assert q.dtype == FP8 and q.shape == x.shape
    assert s.shape == (37, 4) and s.stride(0) == 1 and s.stride(1) == 40  # empty_act_scale layout
    xb = x.float().reshape(37, 4, 128)
    raw = xb.abs().amax(-1).clamp(min=1e-4) / 448
    if ue8m0:
        assert is_powers_of_two(s), "ue8m0 scales must be powers of two"
        assert torch.all(s >= raw) and torch.all(s < 2 * raw)
    else:
        assert torch.equal(s, raw)
    assert torch.all(q.float().abs() <= 448)
    deq = ref_quant.dequant_fp8_1x128(q, s).reshape(37, 4, 128)
    # e4m3 keeps 3 mantissa bits: a rounding error of at most 1/16 of the value, or of the scale
    # near zero (subnormals have an absolute spacing of 2^-9 * 448 scale units).
    tol = xb.abs() / 16 + s[..., None] * 2**-9 * 1.01
    assert torch.all((deq - xb).abs() <= tol)


def test_quant_op_matches_reference_and_overwrites_poison():
    x = _rand(9, 384)
    out = poison_(torch.empty(9, 384, dtype=FP8))
    scale = poison_(ops.empty_act_scale(9, 3, "cpu"))
    torch.ops.flashseek.quant_fp8_1x128(x, out, scale, False)
    q, s = ref_quant.quant_fp8_1x128(x)
    assert torch.equal(_bytes(out), _bytes(q)) and torch.equal(scale, s)


def test_quant_empty_rows():
    q, s = ops.quant_fp8_1x128(torch.empty(0, 256, dtype=torch.bfloat16))
    assert q.shape == (0, 256) and s.shape == (0, 2)


@pytest.mark.parametrize("ue8m0", [False, True])
def test_silu_mul_quant_reference(ue8m0):
    gu = _rand(11, 512)
    q, s = ops.silu_mul_quant_fp8(gu, ue8m0=ue8m0)
    g, u = gu.float()[:, :256], gu.float()[:, 256:]
    h = g * torch.sigmoid(g) * u
    assert q.shape == (11, 256) and s.shape == (11, 2)
    deq = ref_quant.dequant_fp8_1x128(q, s)
    assert torch.all((deq - h).abs() <= h.abs() / 16 + s.repeat_interleave(128, 1) * 2**-9 * 1.01 + 1e-6 * h.abs())


def test_ceil_pow2_is_exact_where_log2_is_not():
    s = torch.tensor([2.0**-20 * (1 + 2**-23), 0.75, 1.0, 3e-7])
    r = ref_quant.ceil_pow2(s)
    assert torch.equal(r, torch.tensor([2.0**-19, 1.0, 1.0, 2.0**-21]))


@pytest.mark.parametrize("bad, match", [
    (lambda: (torch.randn(4, 100).bfloat16(), None, None), "multiple of 128"),
    (lambda: (torch.randn(4, 128), None, None), "dtype"),
    (lambda: (torch.randn(4, 256).bfloat16(), torch.empty(4, 256, dtype=torch.bfloat16), None), "out must have dtype"),
    (lambda: (torch.randn(4, 256).bfloat16(), None, torch.empty(4, 2)), "column-major"),
    (lambda: (torch.randn(4, 256).bfloat16(), None, torch.empty(2, 4).t()[:3]), "shape"),
])
def test_quant_bad_inputs(bad, match):
    x, out, scale = bad()
    m, k = x.shape
    out = torch.empty(m, k, dtype=FP8) if out is None else out
    scale = ops.empty_act_scale(m, k // 128, "cpu") if scale is None else scale
    with pytest.raises((ValueError, RuntimeError), match=match):
        torch.ops.flashseek.quant_fp8_1x128(x, out, scale, False)


def test_silu_mul_bad_inputs():
    gu = torch.randn(4, 384).bfloat16()
    with pytest.raises((ValueError, RuntimeError), match="2\\*N"):
        ops.silu_mul_quant_fp8(gu)
    gu = torch.randn(6, 256).bfloat16()
    with pytest.raises((ValueError, RuntimeError), match="divides"):
        ops.silu_mul_quant_fp8(gu, masked_m=torch.ones(4, dtype=torch.int32))
    with pytest.raises((ValueError, RuntimeError), match="int32"):
        ops.silu_mul_quant_fp8(gu, masked_m=torch.ones(3, dtype=torch.int64))


def _check_masked_silu_mul(gu, counts, device):
    """Rows of group g past counts[g] (clamped to [0, rows per group]) keep their poison; the others
    equal the unmasked result bit for bit."""
    m, n = gu.shape[0], gu.shape[1] // 2
    per = m // len(counts)
    out = poison_(torch.empty(m, n, dtype=FP8, device=device))
    scale = poison_(ops.empty_act_scale(m, n // 128, device))
    ops.silu_mul_quant_fp8(gu, out=out, scale=scale,
                           masked_m=torch.tensor(counts, dtype=torch.int32, device=device))
    q, s = ops.silu_mul_quant_fp8(gu)
    for g, c in enumerate(counts):
        c = min(max(c, 0), per)
        lo, mid, hi = g * per, g * per + c, (g + 1) * per
        assert torch.equal(_bytes(out[lo:mid]), _bytes(q[lo:mid])) and torch.equal(scale[lo:mid], s[lo:mid])
        assert out[mid:hi].float().isnan().all() and scale[mid:hi].isnan().all()


def test_silu_mul_quant_masked_reference():
    _check_masked_silu_mul(_rand(15, 512), [2, 0, 9], "cpu")


@pytest.mark.parametrize("ue8m0", [False, True])
def test_quant_opcheck_cpu(ue8m0):
    x = _rand(5, 256)
    opcheck(torch.ops.flashseek.quant_fp8_1x128.default,
            (x, torch.empty(5, 256, dtype=FP8), ops.empty_act_scale(5, 2, "cpu"), ue8m0))
    gu = _rand(5, 512)
    opcheck(torch.ops.flashseek.silu_mul_quant_fp8.default,
            (gu, torch.empty(5, 256, dtype=FP8), ops.empty_act_scale(5, 2, "cpu"), ue8m0))
    opcheck(torch.ops.flashseek.silu_mul_quant_fp8.default,
            (gu[:4], torch.empty(4, 256, dtype=FP8), ops.empty_act_scale(4, 2, "cpu"), ue8m0,
             torch.tensor([1, 2], dtype=torch.int32)))


# ----------------------------------------------------------------------------------------- CUDA
CUDA_SHAPES = [(1, 128), (3, 512), (128, 7168), (257, 2048), (4097, 1536), (33, 18432)]


@pytest.mark.cuda
def test_quant_kernels_registered():
    assert ops.has_cuda_kernel("quant_fp8_1x128") and ops.has_cuda_kernel("silu_mul_quant_fp8")


@pytest.mark.cuda
@pytest.mark.parametrize("m,k", CUDA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quant_cuda_bit_exact(m, k, dtype, ue8m0):
    x = _rand(m, k, dtype, "cuda")
    out = poison_(torch.empty(m, k, dtype=FP8, device="cuda"))
    scale = poison_(ops.empty_act_scale(m, k // 128, "cuda"))
    ops.quant_fp8_1x128(x, ue8m0=ue8m0, out=out, scale=scale)
    q, s = ref_quant.quant_fp8_1x128(x, ue8m0)
    assert torch.equal(_bytes(out), _bytes(q))
    assert torch.equal(scale, s)


@pytest.mark.cuda
def test_quant_cuda_strided_rows_and_empty():
    base = _rand(65, 1024, device="cuda")
    x = base[:, 256:768]  # row stride 1024, not contiguous
    q, s = ops.quant_fp8_1x128(x)
    rq, rs = ref_quant.quant_fp8_1x128(x)
    assert torch.equal(_bytes(q), _bytes(rq)) and torch.equal(s, rs)
    q0, s0 = ops.quant_fp8_1x128(torch.empty(0, 256, dtype=torch.bfloat16, device="cuda"))
    assert q0.shape == (0, 256)


@pytest.mark.cuda
@pytest.mark.parametrize("m,n", [(1, 128), (7, 2048), (300, 256), (2049, 18432 // 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_silu_mul_quant_cuda_bit_exact(m, n, dtype, ue8m0):
    # The reference runs on the GPU too: torch's CUDA silu is x / (1 + expf(-x)) in fp32, which the
    # kernel reproduces; the CPU's vectorized exp can differ in the last ulp.
    gu = _rand(m, 2 * n, dtype, "cuda") * 4
    out = poison_(torch.empty(m, n, dtype=FP8, device="cuda"))
    scale = poison_(ops.empty_act_scale(m, n // 128, "cuda"))
    ops.silu_mul_quant_fp8(gu, ue8m0=ue8m0, out=out, scale=scale)
    q, s = ref_quant.silu_mul_quant_fp8(gu, ue8m0)
    assert torch.equal(scale, s)
    assert torch.equal(_bytes(out), _bytes(q))


def _special_rows(k, device):
    """Rows whose blocks hold the operands the quantizers' divisions take off their fast path
    (common/fp8_block_quant.cuh, div_rn_n): zeros, bf16 denormals, values past 2^60, +-inf, NaN, and
    gate values past -88 (exp overflows, the silu divisor is inf), each in a block of ordinary values."""
    x = torch.randn(8, k, device=device) * 3
    x[0, :64] = 0.0
    x[1, 5:40] = 1e-40
    x[2, 7] = 3e30
    x[3, 130] = float("inf")
    x[3, 131] = -float("inf")
    x[4, 9] = float("nan")
    x[5, :128] = -1e4
    x[6, 128:256] = torch.linspace(-120, -80, 128)
    x[7, :] = 1e-30
    return x.bfloat16()


@pytest.mark.cuda
@pytest.mark.parametrize("ue8m0", [False, True])
def test_quant_cuda_special_values_bit_exact(ue8m0):
    """The branch-free divisions redo a thread's block with IEEE division when any operand is off their
    range; either way the bytes must be the reference's (NaN blocks compared as NaN)."""
    x = _special_rows(512, "cuda")
    q, s = ops.quant_fp8_1x128(x, ue8m0=ue8m0)
    rq, rs = ref_quant.quant_fp8_1x128(x, ue8m0)
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s.nan_to_num(), rs.nan_to_num())
    assert torch.equal(q.float().isnan(), rq.float().isnan())
    assert torch.equal(q.float().nan_to_num(), rq.float().nan_to_num())
    gu = torch.cat([_special_rows(512, "cuda"), torch.randn(8, 512, device="cuda").bfloat16()], 1)
    gu = torch.cat([gu, torch.cat([gu[:, 512:], gu[:, :512]], 1)])  # the specials as up values too
    q, s = ops.silu_mul_quant_fp8(gu, ue8m0=ue8m0)
    rq, rs = ref_quant.silu_mul_quant_fp8(gu, ue8m0)
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s.nan_to_num(), rs.nan_to_num())
    assert torch.equal(q.float().isnan(), rq.float().isnan())
    assert torch.equal(q.float().nan_to_num(), rq.float().nan_to_num())


@pytest.mark.cuda
@pytest.mark.parametrize("e,per,n", [(8, 33, 2048), (256, 1, 2048), (3, 64, 128), (257, 16, 2048)])
def test_silu_mul_quant_cuda_masked(e, per, n):
    counts = torch.randint(0, per + 1, (e,)).tolist()
    counts[0], counts[-1] = 0, per + 5  # empty, and past the group (clamped)
    if e > 2:
        counts[1] = -3
    _check_masked_silu_mul(_rand(e * per, 2 * n, device="cuda") * 4, counts, "cuda")


@pytest.mark.cuda
def test_quant_cuda_bad_inputs():
    x = torch.randn(4, 256, device="cuda").bfloat16()
    with pytest.raises((ValueError, RuntimeError), match="column-major"):
        torch.ops.flashseek.quant_fp8_1x128(x, torch.empty(4, 256, dtype=FP8, device="cuda"),
                                            torch.empty(4, 2, device="cuda"), False)


@pytest.mark.cuda
def test_quant_opcheck_cuda():
    x = _rand(6, 256, device="cuda")
    opcheck(torch.ops.flashseek.quant_fp8_1x128.default,
            (x, torch.empty(6, 256, dtype=FP8, device="cuda"), ops.empty_act_scale(6, 2, "cuda"), True))
    gu = _rand(6, 512, device="cuda")
    opcheck(torch.ops.flashseek.silu_mul_quant_fp8.default,
            (gu, torch.empty(6, 256, dtype=FP8, device="cuda"), ops.empty_act_scale(6, 2, "cuda"), False))
    opcheck(torch.ops.flashseek.silu_mul_quant_fp8.default,
            (gu, torch.empty(6, 256, dtype=FP8, device="cuda"), ops.empty_act_scale(6, 2, "cuda"), False,
             torch.tensor([3, 0, 1], dtype=torch.int32, device="cuda")))
