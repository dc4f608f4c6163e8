"""Shared test helpers: error metrics, poisoning and opcheck."""
import torch

FP8 = torch.float8_e4m3fn


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's metric: 1 - 2<x,y> / (|x|^2 + |y|^2), in float64; 0 means identical."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    if denom == 0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)


def cos_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine similarity in float64."""
    x, y = x.double().flatten(), y.double().flatten()
    return float(1 - torch.nn.functional.cosine_similarity(x, y, dim=0))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64."""
    x, ref = x.double(), ref.double()
    n = ref.norm()
    return float((x - ref).norm() / n) if n > 0 else float((x - ref).norm())


def is_powers_of_two(s: torch.Tensor) -> bool:
    """Whether every element of s is a power of two (ue8m0 scales): a frexp mantissa of exactly 0.5."""
    mant, _ = torch.frexp(s)
    return bool(torch.all(mant == 0.5))


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills t with NaN (or, for integer/fp8 tensors, a recognisable garbage pattern)."""
    if t.dtype.is_floating_point and t.dtype != FP8:
        t.fill_(float("nan"))
    elif t.dtype == FP8:
        t.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
    else:
        t.fill_(-777 if t.dtype != torch.uint8 else 0xAB)
    return t


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck, minus test_schema where an fp8 tensor is involved.

    test_schema detects mutation with torch.allclose, which torch does not implement for fp8;
    mutation annotations of those ops are still exercised by the fake-tensor and AOT checks.
    """
    flat = list(args) + list((kwargs or {}).values())
    has_fp8 = any(isinstance(a, torch.Tensor) and a.dtype == FP8 for a in flat)
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if has_fp8 else (
        "test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op, args, kwargs, test_utils=utils)
