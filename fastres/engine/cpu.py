"""Subnormal floats on a CPU: flush them to zero in every thread that computes.

A float32 below 1.2e-38 is subnormal, and x86 CPUs take a microcode assist for each one a
multiply or add reads or writes: a convolution over subnormal inputs ran 200x slower on an
Intel Xeon (0.98 s against 4.8 ms, 64x16x32x32, one thread). Training drifts into that range
on its own (some weights, gradients or Adam moments decay towards zero): a ResNet-20 run on
one core fell from 420 to 21 img/s after its 8th epoch. Flushing to zero (x86 FTZ and DAZ,
`torch.set_flush_denormal`) costs nothing and changes only values below 1.2e-38.

`torch.set_flush_denormal` sets the flags of the calling thread only, and torch's OpenMP
threads that already exist keep theirs: in a 2-thread process half of each parallel op
still ran on subnormals. `flush_denormals` sets the calling thread, then runs one OpenMP
parallel region in which every worker thread copies the caller's floating-point
environment (`fesetenv`); threads created later inherit it from the caller. It then checks
the result on a parallel op and says whether every thread flushes.

Sessions on a CPU call it (`run.flush_denormal`, on by default). It is process-wide state,
like `torch.set_num_threads`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

import torch

__all__ = ["flush_denormals", "denormals_flushed"]

_PROBE = 1 << 16  # elements per thread: enough for every thread of the pool to take a share
_SUBNORMAL_BITS = 0x000B_0000  # a float32 of 1.0e-39: exponent bits 0, so subnormal


def denormals_flushed() -> bool:
    """True when a parallel op on subnormal inputs returns zeros in every thread's share."""
    # Made from its bits: converting 1e-39 from a Python float would itself be flushed.
    x = torch.full((_PROBE * max(1, torch.get_num_threads()),), _SUBNORMAL_BITS,
                   dtype=torch.int32).view(torch.float32)
    return bool(((x * 1.5) == 0).all())


def flush_denormals(on: bool = True) -> bool:
    """Flush subnormal floats to zero (`on=True`) or compute them (`on=False`) in every CPU thread.

    Returns True when every thread of torch's pool now does what was asked (checked on a
    parallel op); False where the CPU has no such mode or the pool's threads could not be
    reached (then only the calling thread and threads created after it are set).
    """
    if not torch.set_flush_denormal(on):
        return False
    gomp_parallel, fegetenv, fesetenv = _openmp_hooks()
    if gomp_parallel is not None and torch.get_num_threads() > 1:
        env = ctypes.create_string_buffer(256)  # fenv_t: 32 bytes on x86-64 glibc
        if fegetenv(env) == 0:
            gomp_parallel(ctypes.cast(fesetenv, ctypes.c_void_p),
                          ctypes.cast(env, ctypes.c_void_p), 0, 0)
    return denormals_flushed() == on


@functools.cache
def _openmp_hooks():
    """libgomp's `GOMP_parallel` (the copy torch loaded) and libm's fegetenv/fesetenv, or
    Nones where torch's threads are not libgomp's (macOS, Windows, other runtimes)."""
    gomp_path = _loaded_library("libgomp")
    libm_name = ctypes.util.find_library("m")
    if gomp_path is None or libm_name is None:
        return None, None, None
    try:
        gomp, libm = ctypes.CDLL(gomp_path), ctypes.CDLL(libm_name)
        parallel = gomp.GOMP_parallel
    except (OSError, AttributeError):
        return None, None, None
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return parallel, libm.fegetenv, libm.fesetenv


def _loaded_library(stem: str) -> str | None:
    """The path of the shared library `stem*` this process has loaded (Linux), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/" in path and path.rsplit("/", 1)[-1].startswith(stem):
                    return path
    except OSError:
        pass
    return None
