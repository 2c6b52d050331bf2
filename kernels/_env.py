"""When the Triton kernels run, and the one environment switch that turns them off.

Environment variables read by fastres.kernels (and nothing else in the library reads the
environment):

- ``FASTRES_KERNELS``: set to ``0`` (or ``false``/``off``/``no``) to turn every fused kernel
  off: `FusedBatchNormAct2d`, `fused_bn_act` and `FusedSGD` then run their plain-PyTorch
  reference paths on every device. It is read at call time in eager mode; under
  `torch.compile` it is read once, when the graph is traced (Dynamo bakes the branch into the
  graph and does not guard on the environment), so set it before the first compiled call.
- ``TRITON_INTERPRET``: Triton's own switch. When it is ``1`` *at the time fastres.kernels is
  imported* (Triton decides at `@triton.jit` definition time whether a kernel is compiled or
  interpreted), the kernels also run on CPU tensors through Triton's interpreter. That is how
  the CPU-only CI tests the real kernels (tests/conftest.py sets it). Without it, CPU tensors
  take the reference path, since Triton has no CPU backend.

CUDA tensors always take the Triton path unless the kill switch is set.
"""
from __future__ import annotations

import os

import torch

KILL_SWITCH = "FASTRES_KERNELS"
_OFF_VALUES = ("0", "false", "off", "no")

# Captured once: kernels defined while this was set are interpreted for their whole life.
INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # Triton ships with torch's Linux wheels; without it only the references run.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - every supported platform has it
    HAS_TRITON = False


def kernels_enabled() -> bool:
    """False when the ``FASTRES_KERNELS`` kill switch is set to 0/false/off/no."""
    return os.environ.get(KILL_SWITCH, "1").strip().lower() not in _OFF_VALUES


def interpreting() -> bool:
    """True when the kernels were defined under Triton's interpreter (CPU execution)."""
    return INTERPRET_AT_IMPORT


def use_triton(device: torch.device) -> bool:
    """Whether tensors on `device` run through the Triton kernels (else the reference)."""
    if not HAS_TRITON or not kernels_enabled():
        return False
    if INTERPRET_AT_IMPORT:
        return device.type in ("cpu", "cuda")
    return device.type == "cuda"
