import os

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


def pytest_runtest_logreport(report):
    """With FLASHSEEK_FAILURE_LOG set, append each failure as it happens (the GPU script sets it):
    a later crash of the process then cannot take the earlier failures' details with it."""
    path = os.environ.get("FLASHSEEK_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-2500:]}\n")
