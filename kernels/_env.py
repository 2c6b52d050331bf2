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
- Nothing else: importing fastres.kernels changes nothing outside it. The interpreter
  harness (`fastres.kernels._harness`: GPU-like rounding, exact tile sums, grid order, race
  check) patches Triton's interpreter for the whole process, so it is installed only when
  asked: `fastres.kernels.install_harness(...)` (tests/conftest.py does it for the kernel
  tests, from its own FASTRES_GRID_ORDER / FASTRES_RACE_CHECK / FASTRES_GRID_SEED /
  FASTRES_INTERPRET_ROUNDING switches).

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


def interpreter_clash(source: str | None = None, numpy_version: str | None = None
                      ) -> str | None:
    """Why Triton's interpreter cannot run here, or None. Triton <= 3.6's interpreter turns
    a one-element block into a loop bound with ``int(array)``, which numpy >= 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"); later Triton squeezes
    it first. `source`/`numpy_version` stand in for the installed ones (tests)."""
    import numpy

    if source is None:
        import inspect

        from triton.runtime import interpreter

        patch = getattr(interpreter, "_patch_lang_tensor", None)
        source = inspect.getsource(patch) if patch is not None else ""
    major, minor = (int(p) for p in (numpy_version or numpy.__version__).split(".")[:2])
    if "int(self.handle.data)" in source and (major, minor) >= (2, 4):
        return (f"Triton {getattr(triton, '__version__', '?')}'s interpreter "
                f"(TRITON_INTERPRET=1) cannot run with numpy {numpy_version or numpy.__version__}"
                ": install numpy<2.4, or a Triton newer than 3.6")
    return None


_interpreter_ok = False  # set by the first launch under the interpreter that finds no clash


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


def install_harness(*, grid_order: str = "natural", race_check: bool = False,
                    rounding: str = "rtne", seed: int = 0) -> None:
    """Install the interpreter harness, or change its settings (see
    `fastres.kernels._harness`): programs run in `grid_order` (natural, reverse, shuffle
    with `seed`), `race_check` fails any launch in which two programs touch one byte
    unordered, `rounding` "rtne" rounds fp32 -> bf16/fp16 to nearest even as compiled
    kernels do ("triton": the interpreter's own truncation); tile sums are exact. It patches
    Triton's interpreter for the whole process (every interpreted kernel, fastres's or
    not), which is why importing fastres.kernels does not do it. ConfigError unless the
    kernels are interpreted (TRITON_INTERPRET=1 before the import)."""
    if not (HAS_TRITON and INTERPRET_AT_IMPORT):
        raise ConfigError("install_harness: the harness patches Triton's interpreter, but the "
                          "kernels are not interpreted here (set TRITON_INTERPRET=1 before "
                          "the first `import fastres.kernels`)")
    from fastres.kernels import _harness

    try:
        _harness.install_from(grid_order=str(grid_order).strip().lower() or "natural",
                              race_check=bool(race_check),
                              rounding=str(rounding).strip().lower() or "rtne",
                              seed=int(seed))
    except ValueError as err:
        raise ConfigError(f"install_harness: {err}") from None


# ------------------------------------------------------------------ launches

_stub_depth = 0  # > 0 inside `stub_launches`


def launch(kernel, grid, *args, **meta) -> None:
    """Launch a Triton kernel (every fastres launch goes through here), or do nothing
    inside `stub_launches`."""
    global _interpreter_ok
    if _stub_depth:
        return
    if INTERPRET_AT_IMPORT and not _interpreter_ok:
        clash = interpreter_clash()
        if clash:
            raise ConfigError(clash)
        _interpreter_ok = True
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
