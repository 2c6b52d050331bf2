"""Measurement: the one device timer, the one environment record, device peaks, copy
bandwidth, training FLOPs and MFU, and the garbage collector's pauses.

Run records (`env.json`, `result.json`) and every tool's JSON use these, so a figure always
travels with the same description of where it was measured.

    from fastres.bench import Timer, time_fn, environment, training_flops, mfu

    t = time_fn(lambda: model(x), device=x.device, repeats=20)   # Timing(median_s, ...)
    print(t.median_ms, environment(x.device)["device"])

Timing follows airbench's habit: warm-up (compilation, autotuning) outside the timed region,
CUDA events on a GPU (one host sync after the last repeat), a clock read after the work
finished on a CPU; medians over repeats, because shared machines are noisy.

Python's garbage collector is part of the host's time: a full collection scans every object
the process tracks, and a process that has compiled a model holds many (on a 2-core CPU,
0.45-0.72 M objects after `torch.compile` of the speed-run step; 0.22-0.56 s per full
collection). One landing in the timed region of a host-bound GPU step adds to it directly,
so every `Timer` counts the collections that ran while it was running (`Timer.gc`, a
`GCPauses`).
"""
from __future__ import annotations

import copy
import gc
import math
import os
import platform
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = [
    "Timer", "Timing", "time_fn", "sync", "GCPauses", "environment", "git_sha", "PEAK_TFLOPS",
    "PEAK_GBPS", "device_peak", "peak_bandwidth", "math_mode", "copy_bandwidth",
    "training_flops", "mfu",
]


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on a CPU, where ops finish on return)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- timers

class GCPauses:
    """The garbage collector's pauses while running (between `start()` and `stop()`, summed
    over every such interval): collections per generation, seconds, the longest.

    Recorded through `gc.callbacks`, which the interpreter calls at each collection's start
    and end; nothing is recorded while stopped."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]  # by generation: 0, 1, 2 (2 = a full collection)
        self.seconds = 0.0
        self.max_s = 0.0
        self._t0: float | None = None
        self._on = False

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            dt = time.perf_counter() - self._t0
            self._t0 = None
            self.collections[min(int(info.get("generation", 2)), 2)] += 1
            self.seconds += dt
            self.max_s = max(self.max_s, dt)

    def start(self) -> None:
        if not self._on:
            gc.callbacks.append(self._callback)
            self._on = True

    def stop(self) -> None:
        if self._on:
            gc.callbacks.remove(self._callback)
            self._on, self._t0 = False, None

    def as_dict(self) -> dict:
        return {"collections": sum(self.collections), "by_generation": list(self.collections),
                "seconds": self.seconds, "max_s": self.max_s}

    def load(self, d: dict | None) -> None:
        """Continue the counts of `as_dict()`'s record (a resumed run)."""
        if d:
            self.collections = [int(c) for c in d.get("by_generation", [0, 0, 0])][:3]
            self.seconds, self.max_s = float(d.get("seconds", 0.0)), float(d.get("max_s", 0.0))

    @classmethod
    def total(cls, records) -> "GCPauses":
        """The pauses of several `as_dict()` records (several runs) summed; None entries
        (records from before the count) are skipped."""
        out = cls()
        for d in filter(None, records):
            part = cls()
            part.load(d)
            out.collections = [a + b for a, b in zip(out.collections, part.collections)]
            out.seconds += part.seconds
            out.max_s = max(out.max_s, part.max_s)
        return out

    def describe(self, where: str) -> str:
        """One line: "N <where> (F full), X ms in all, longest Y ms"."""
        return f"{sum(self.collections)} {where} ({self.collections[2]} full), " \
            f"{1e3 * self.seconds:.1f} ms in all, longest {1e3 * self.max_s:.1f} ms"

    def __str__(self) -> str:
        return "no GC pauses" if sum(self.collections) == 0 else self.describe("GC pauses")


class Timer:
    """Accumulates device time between `start()` and `stop()`.

    CUDA events on a GPU (recorded on the stream, no sync until `stop`), a clock on a CPU.
    `stop()` synchronises and returns the interval in seconds; `total` is the running sum.
    The trainer starts and stops it around each epoch, so it syncs at epoch ends only.
    `gc` counts the garbage collector's pauses while the timer runs (`GCPauses`).
    """

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.total = 0.0
        self._t0 = None
        self.gc = GCPauses()

    def start(self) -> None:
        self.gc.start()
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self._t0 is None:
            raise RuntimeError("Timer.stop() without start()")
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()  # host sync: the caller's boundary (epoch end)
            dt = self._t0.elapsed_time(end) / 1e3
        else:
            dt = time.perf_counter() - self._t0
        self._t0 = None
        self.gc.stop()
        self.total += dt
        return dt

    @property
    def running(self) -> bool:
        return self._t0 is not None


@dataclass(frozen=True)
class Timing:
    """Seconds per call over `repeats` timed calls (each the mean of `inner` back-to-back
    calls): median, mean and sample standard deviation."""

    samples: tuple[float, ...] = field(repr=False)
    inner: int = 1

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std_s(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    @property
    def median_ms(self) -> float:
        return 1e3 * self.median_s

    @property
    def median_us(self) -> float:
        return 1e6 * self.median_s

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "mean_s": self.mean_s, "std_s": self.std_s,
                "repeats": len(self.samples), "inner": self.inner}

    def __str__(self) -> str:
        return f"{self.median_ms:.3f} ms (mean {1e3 * self.mean_s:.3f} ± " \
               f"{1e3 * self.std_s:.3f}, n={len(self.samples)})"


def time_fn(fn: Callable[[], object], *, device: torch.device | str = "cpu",
            repeats: int = 10, warmup: int = 3, inner: int = 1) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then `repeats` samples of `inner` calls each.

    On a GPU each sample is bracketed by CUDA events and read after the last one (one host
    sync); on a CPU by a clock. `inner` > 1 amortises the clock's own cost for calls of a
    few microseconds (the host-path benchmarks)."""
    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError("time_fn needs repeats >= 1, inner >= 1 and warmup >= 0")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            for _ in range(inner):
                fn()
            end.record()
        events[-1][1].synchronize()  # host sync: once, after the timed loop
        samples = [s.elapsed_time(e) / 1e3 / inner for s, e in events]
    else:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return Timing(tuple(samples), inner)


# --------------------------------------------------------------------------- environment

def git_sha() -> str:
    """The commit of the fastres checkout in use ('+dirty' when tracked files changed), or
    'unknown' for an installed copy outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str | None:
    try:
        return __import__(module, fromlist=["__version__"]).__version__
    except Exception:  # not installed, or broken on this platform
        return None


def environment(device: torch.device | str | None = None) -> dict:
    """Versions, device and its peaks: what every run record and benchmark JSON carries.

    Keys: fastres, git_sha, python, torch, torchvision, numpy, triton, dali, cuda, cudnn,
    platform, host, cpu_count, torch_threads, device (a readable name), and on a GPU
    device_memory_gb, sm_count, capability, peak_tflops (per math mode) and peak_gbps
    (datasheet) where the device is known."""
    import fastres

    env = {
        "fastres": fastres.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "triton": _version("triton"),
        "dali": _version("nvidia.dali"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["device_memory_gb"] = round(props.total_memory / 2**30, 1)
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"sm_{props.major}{props.minor}"
        key = _peak_key(props.name)
        env["peak_tflops"] = dict(PEAK_TFLOPS[key]) if key else None
        env["peak_gbps"] = PEAK_GBPS.get(key) if key else None
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, " \
                        f"{os.cpu_count()} cores)"
    return env


# --------------------------------------------------------------------------- device peaks

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets (which print
# the sparse figure for TF32/BF16/FP16, twice these); fp32 is the CUDA-core peak.
PEAK_TFLOPS = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
}
# Datasheet HBM bandwidth in GB/s (A100 80 GB SXM; H100 SXM; H200).
PEAK_GBPS = {"A100": 2039.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
             "H200": 4800.0, "H200 NVL": 4800.0}


def _peak_key(device_name: str) -> str | None:
    name = device_name.upper()
    if "H200" in name:            # also GH200: the same Hopper die as H100 SXM
        return "H200 NVL" if "NVL" in name else "H200"
    if "H100" in name:
        return "H100 NVL" if "NVL" in name else "H100 PCIe" if "PCIE" in name else "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def device_peak(device_name: str, math: str) -> tuple[str, float] | None:
    """(datasheet entry, dense TFLOP/s) for a CUDA device name such as
    'NVIDIA H100 80GB HBM3' and a math mode (bf16, fp16, tf32, fp32); None if unknown."""
    key = _peak_key(device_name)
    return (key, PEAK_TFLOPS[key][math]) if key else None


def peak_bandwidth(device_name: str) -> tuple[str, float] | None:
    """(datasheet entry, HBM GB/s) for a CUDA device name; None if unknown."""
    key = _peak_key(device_name)
    return (key, PEAK_GBPS[key]) if key else None


def math_mode(precision: str, device: torch.device | str) -> str:
    """The math a training step's convolutions run in: bf16/fp16 under autocast; fp32
    convolutions run as TF32 on Ampere and later while cuDNN's allow_tf32 is on (PyTorch's
    default); plain fp32 on a CPU."""
    if precision in ("bf16", "fp16"):
        return precision
    if torch.device(device).type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


def copy_bandwidth(device: torch.device | str, nbytes: int = 2**30, repeats: int = 10) -> float:
    """Device-to-device copy rate in GB/s (bytes read + written): the practical ceiling a
    memory-bound kernel is compared with."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, repeats=repeats, warmup=2)
    return 2 * n * 4 / t.median_s / 1e9


# --------------------------------------------------------------------------- FLOPs and MFU

def training_flops(model: torch.nn.Module, *, batch: int, num_classes: int,
                   input_shape: Sequence[int] = (3, 32, 32), count_batch: int = 32,
                   device: torch.device | str = "cpu") -> dict:
    """FLOPs of one training step (forward, loss, backward) at `batch`.

    Counted by torch.utils.flop_counter (convolutions and matrix products: the tensor-core
    work) on a deep copy of `model` (so its weights, grads and BatchNorm statistics are left
    alone) at a batch of at most `count_batch`, and scaled: every counted op is linear in the
    batch. Optimizer FLOPs (e.g. Muon's Newton-Schulz matmuls) are not included.
    Returns {"per_step", "forward_per_step", "counted_at_batch"}."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    b = min(batch, count_batch)
    clone = copy.deepcopy(model).to(device).train()
    # Channels-last input: convolutions take either layout, the fused kernels only this one.
    x = torch.randn(b, *input_shape, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (b,), device=device)
    with FlopCounterMode(display=False) as counter:
        out = clone(x)
        fwd = counter.get_total_flops()
        # the backward pass's FLOPs, without touching any .grad
        torch.autograd.grad(F.cross_entropy(out.float(), y),
                            [p for p in clone.parameters() if p.requires_grad])
    total = counter.get_total_flops()
    return {"per_step": total * batch / b, "forward_per_step": fwd * batch / b,
            "counted_at_batch": b}


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak (None if unknown)."""
    if not peak_tflops or not seconds or seconds <= 0 or not math.isfinite(flops):
        return None
    return flops / seconds / (peak_tflops * 1e12)


# --------------------------------------------------------------------------- kernel tables

def profiled_kernels(prof) -> tuple[str, list[tuple[str, float, float]]]:
    """(what, [(name, start_us, end_us)]) from a finished torch.profiler run: the GPU
    kernels (and memcpy/memset) on the device's timeline when it recorded CUDA, else the
    CPU's top-level ATen ops (what a CPU run executes in their place)."""
    events = list(prof.events())
    cuda = torch.autograd.DeviceType.CUDA
    # On the device's timeline, `record_function` labels appear as CUDA-typed ranges
    # spanning their kernels (user annotations): not kernels, and counting them would
    # count that time twice.
    gpu = [(e.name, e.time_range.start, e.time_range.end) for e in events
           if getattr(e, "device_type", None) == cuda
           and not getattr(e, "is_user_annotation", False)]
    if gpu:
        return "GPU kernels", gpu
    cpu = [(e.name, e.time_range.start, e.time_range.end) for e in events
           if e.name.startswith("aten::") and not (
               e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return "CPU ops (no GPU in this run)", cpu


def busy_us(kernels: list[tuple[str, float, float]]) -> float:
    """The time at least one of the (name, start_us, end_us) intervals runs: their union,
    so kernels that overlap (two streams) count once."""
    total, reach = 0.0, -math.inf
    for _, start, end in sorted(kernels, key=lambda k: k[1]):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def kernel_summary(kernels: list[tuple[str, float, float]], steps: int, *,
                   top: int = 25) -> dict:
    """Where `steps` steps' time went, from (name, start_us, end_us) intervals on one
    timeline: the `top` names by total time (calls, total ms per step, share of the busy
    time) and the gaps between consecutive intervals, which on a GPU are the time the
    device waited for the host to launch the next kernel."""
    kernels = sorted(kernels, key=lambda k: k[1])
    by_name: dict[str, list[float]] = {}
    for name, start, end in kernels:
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += end - start
    kernel_us = sum(v[1] for v in by_name.values())
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    gaps, reach = [], None
    for i, (name, start, end) in enumerate(kernels):
        if reach is not None and start > reach[0]:
            gaps.append((start - reach[0], reach[1], name))
        if reach is None or end > reach[0]:
            reach = (end, name)
    span_us = (kernels[-1][2] - kernels[0][1]) if kernels else 0.0
    gap_us = sum(g[0] for g in gaps)
    n = max(steps, 1)
    return {
        "steps": steps, "launches_per_step": len(kernels) / n,
        "busy_ms_per_step": busy_us(kernels) / 1e3 / n, "span_ms_per_step": span_us / 1e3 / n,
        "gap_ms_per_step": gap_us / 1e3 / n,
        "top": [{"name": name, "calls": int(calls), "total_ms_per_step": us / 1e3 / n,
                 "share": us / kernel_us if kernel_us else 0.0} for name, (calls, us) in rows],
        "largest_gaps": [{"us": round(g, 1), "after": a, "before": b}
                         for g, a, b in sorted(gaps, key=lambda g: -g[0])[:5]],
    }
