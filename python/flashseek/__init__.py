"""flashseek: Hopper (sm_90a) kernels for DeepSeek-V3/R1 inference, exposed as torch.ops.flashseek.*.

Importing the package loads the compiled op library (flashseek._C) and registers the pure-torch
reference of every op for CPU (and for CUDA where this build has no kernel), plus the fake (meta)
implementations used by torch.compile and CUDA-graph capture.
"""
import torch  # noqa: F401  (torch must be loaded before the extension)

try:
    from flashseek import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "flashseek: the compiled op library flashseek._C is missing or does not match this torch. "
        "Rebuild with `pip install --no-build-isolation .` in the source tree."
    ) from exc

from flashseek import ops  # noqa: E402,F401  (registers CPU/fake implementations)

# torch.ops namespaces fill in lazily; touching each op makes `list(torch.ops.flashseek)` and
# `dir(torch.ops.flashseek)` show every registered op.
for _name in ops.OP_NAMES:
    getattr(torch.ops.flashseek, _name)
del _name

__version__ = "0.1.0"


def built_with_cuda() -> bool:
    """True when this build compiled the sm_90a CUDA kernels."""
    return bool(_C.built_with_cuda())


def cuda_kernels_available() -> bool:
    """True when the CUDA kernels can run here: a CUDA build and a Hopper (sm_90) GPU present."""
    return built_with_cuda() and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def op_backends() -> dict:
    """Maps each registered op to where it runs on CUDA tensors: 'kernel' or 'reference'."""
    return {name: ("kernel" if ops.has_cuda_kernel(name) else "reference") for name in ops.OP_NAMES}


def __getattr__(name):  # lazy, so importing the ops does not import the model layer
    if name in ("LLM", "SamplingParams"):
        from flashseek.engine import llm, sampling
        return llm.LLM if name == "LLM" else sampling.SamplingParams
    raise AttributeError(f"module 'flashseek' has no attribute {name!r}")
