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


@pytest.fixture(scope="session")
def interpreter_harness():
    """The Triton-interpreter harness for the kernel tests (`fastres.kernels.install_harness`:
    GPU-like rounding and exact tile sums), when the kernels are interpreted. Importing
    fastres.kernels installs nothing; the CI's harness run sets these test switches:
    FASTRES_GRID_ORDER (natural | reverse | shuffle), FASTRES_GRID_SEED, FASTRES_RACE_CHECK
    (1 to fail unordered cross-program accesses), FASTRES_INTERPRET_ROUNDING (rtne |
    triton)."""
    from fastres.kernels import _env, install_harness

    if _env.HAS_TRITON and _env.interpreting():
        env = os.environ
        install_harness(grid_order=env.get("FASTRES_GRID_ORDER", "natural"),
                        race_check=env.get("FASTRES_RACE_CHECK", "0").strip().lower()
                        in ("1", "true", "on", "yes"),
                        rounding=env.get("FASTRES_INTERPRET_ROUNDING", "rtne"),
                        seed=int(env.get("FASTRES_GRID_SEED", "0") or 0))
    yield


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield
