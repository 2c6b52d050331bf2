"""Test set-up shared by every test file.

Triton kernels run on the CPU through Triton's interpreter in CI. TRITON_INTERPRET must be
in the environment before any `@triton.jit` function is defined (fastres.kernels is imported
by tests and by models), so it is set here, at conftest import, unless the caller chose a
value or a CUDA device is present (then the GPU-marked tests run the compiled kernels).
"""
import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield
