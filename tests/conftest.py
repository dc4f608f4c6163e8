import pytest
import torch

import flashseek


def pytest_collection_modifyitems(config, items):
    if flashseek.cuda_kernels_available():
        return
    why = ("no Hopper GPU" if flashseek.built_with_cuda() else "built without CUDA kernels")
    skip = pytest.mark.skip(reason=f"cuda test: {why}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
