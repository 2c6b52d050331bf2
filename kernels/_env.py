"""When the Triton kernels run, and the environment switches fastres.kernels reads.

The only environment variables the library reads (and only here):

- ``FASTRES_KERNELS``: set to ``0`` (or ``false``/``off``/``no``) to turn every fused kernel
  off: `FusedBatchNormAct2d`, `fused_bn_act` and `FusedSGD` then run their plain-PyTorch
  reference paths on every device. It is read at call time in eager mode; under
  `torch.compile` it is read once, when the graph is traced (Dynamo bakes the branch into the
  graph and does not guard on the environment), so set it before the first compiled call.
- ``TRITON_INTERPRET``: Triton's own switch. Triton decides at `@triton.jit` definition time
  (when fastres.kernels is imported) whether a kernel is compiled or interpreted, for the
  kernel's whole life. When it is on at import, the kernels also run on CPU tensors through
  Triton's interpreter: that is how the CPU-only CI tests the real kernels
  (tests/conftest.py sets it). Without it, CPU tensors take the reference path, since Triton
  has no CPU backend. Changing it *after* import would silently change nothing (or, for CPU
  tensors, silently run the reference instead of the kernels the caller asked to test), so
  a kernel call then raises `ConfigError` naming the fix instead.
- Interpreter-only test switches, read once at import when the kernels are interpreted
  (`fastres.kernels._harness`): ``FASTRES_GRID_ORDER`` = natural | reverse | shuffle (the
  order each launch's programs run in), ``FASTRES_GRID_SEED`` (the shuffle's seed, default
  0), ``FASTRES_RACE_CHECK`` = 1 (fail any launch where two programs touch one byte,
  unordered, one of them writing), ``FASTRES_INTERPRET_ROUNDING`` = rtne (default: round
  fp32 -> bf16/fp16 to nearest even, as compiled kernels do) | triton (the interpreter's
  own truncation).

Without Triton installed (`HAS_TRITON` False) every op runs its reference; nothing here
imports Triton unless it is importable.
"""
from __future__ import annotations

import contextlib
import os

import torch

from fastres.errors import ConfigError

KILL_SWITCH = "FASTRES_KERNELS"
_OFF_VALUES = ("0", "false", "off", "no")
_ON_VALUES = ("1", "true", "on", "yes")

try:  # Triton ships with torch's Linux CUDA wheels; without it only the references run.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    triton = None
    HAS_TRITON = False


def _interpret_now() -> bool:
    """TRITON_INTERPRET as Triton reads it (1/true/on/yes, any case). Read from os.environ
    directly, which Dynamo can trace (Triton's own knob calls into C++)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _ON_VALUES


# Captured once: kernels defined while this was set are interpreted for their whole life.
# Triton's own knob where it has one (the same reading, by construction).
INTERPRET_AT_IMPORT = HAS_TRITON and bool(
    triton.knobs.runtime.interpret if hasattr(triton, "knobs") else _interpret_now())


def kernels_enabled() -> bool:
    """False when the ``FASTRES_KERNELS`` kill switch is set to 0/false/off/no."""
    return os.environ.get(KILL_SWITCH, "1").strip().lower() not in _OFF_VALUES


def interpreting() -> bool:
    """True when the kernels were defined under Triton's interpreter (CPU execution)."""
    return INTERPRET_AT_IMPORT


def check_interpret_unchanged() -> None:
    """ConfigError if TRITON_INTERPRET differs from its value when the kernels were defined."""
    if HAS_TRITON and _interpret_now() != INTERPRET_AT_IMPORT:
        was = "on" if INTERPRET_AT_IMPORT else "off"
        now = "on" if not INTERPRET_AT_IMPORT else "off"
        raise ConfigError(
            f"TRITON_INTERPRET is {now} now but was {was} when fastres.kernels was imported; "
            f"Triton fixes compiled-vs-interpreted when the kernels are defined, so the "
            f"change would have no effect (CPU tensors would silently run the PyTorch "
            f"reference). Set TRITON_INTERPRET before the first `import fastres.kernels` "
            f"(or before importing a model with fused kernels), or set {KILL_SWITCH}=0 to "
            f"run the references on purpose")


# os.environ.get costs ~1 µs for an absent key (it encodes the key and catches a KeyError);
# on POSIX the decoded-once bytes dict behind it answers in ~0.1 µs, and it is what
# os.environ (and monkeypatch.setenv) update. Dynamo traces the public path instead.
_ENV_BYTES = os.environ._data if os.name == "posix" and isinstance(
    getattr(os.environ, "_data", None), dict) else None
_is_compiling = torch.compiler.is_compiling


def _getenv(name: str, key: bytes):
    if _ENV_BYTES is None or _is_compiling():
        return os.environ.get(name)
    value = _ENV_BYTES.get(key)
    return None if value is None else os.fsdecode(value)


def use_triton(device: torch.device) -> bool:
    """Whether tensors on `device` run through the Triton kernels (else the reference).

    Raises ConfigError when TRITON_INTERPRET was changed after import (see the module
    docstring). Called on every kernel call: two environment reads, ~0.5 µs."""
    if not HAS_TRITON:
        return False
    switch = _getenv(KILL_SWITCH, b"FASTRES_KERNELS")
    if switch is not None and switch.strip().lower() in _OFF_VALUES:
        return False
    interp = _getenv("TRITON_INTERPRET", b"TRITON_INTERPRET")
    if (interp is not None and interp.strip().lower() in _ON_VALUES) != INTERPRET_AT_IMPORT:
        check_interpret_unchanged()
    kind = device.type
    return kind == "cuda" or (INTERPRET_AT_IMPORT and kind == "cpu")


def _install_interpreter_harness() -> None:
    from fastres.kernels import _harness

    env = os.environ
    try:
        _harness.install_from(
            grid_order=env.get("FASTRES_GRID_ORDER", "natural").strip().lower() or "natural",
            race_check=env.get("FASTRES_RACE_CHECK", "0").strip().lower() in _ON_VALUES,
            rounding=env.get("FASTRES_INTERPRET_ROUNDING", "rtne").strip().lower() or "rtne",
            seed=int(env.get("FASTRES_GRID_SEED", "0") or 0))
    except ValueError as err:
        raise ConfigError(f"fastres.kernels interpreter harness: {err}") from None


if INTERPRET_AT_IMPORT:
    _install_interpreter_harness()


# ------------------------------------------------------------------ launches

_stub_depth = 0  # > 0 inside `stub_launches`


def launch(kernel, grid, *args, **meta) -> None:
    """Launch a Triton kernel (every fastres launch goes through here), or do nothing
    inside `stub_launches`."""
    if _stub_depth:
        return
    kernel.run(*args, grid=grid, warmup=False, **meta)


def stubbed() -> bool:
    return _stub_depth > 0


@contextlib.contextmanager
def stub_launches():
    """Inside the block every fused op takes the kernel path on any device (CPU tensors
    too, interpreter or not) and skips the launches themselves, leaving outputs (and, for
    FusedSGD, parameters) as they were: what `bench-kernels --host` uses to time the Python
    host path alone, on any machine with Triton installed. Nests."""
    global _stub_depth
    _stub_depth += 1
    try:
        yield
    finally:
        _stub_depth -= 1
