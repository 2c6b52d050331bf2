"""`fastres profile`: steady-state training throughput and where a step's time goes.

    fastres profile                                          # the speedrun preset's step
    fastres profile --model resnet56 --dtype bf16 --compile on --batch-size 512 --steps 100
    fastres profile --modes eager,model,step,step+graph      # the TrainStep modes, side by side
    fastres profile --compare                                # eager vs model compile vs fused
    fastres profile --check-graph                            # graph breaks / recompiles
    fastres profile --check-graph --as-device cuda           # ... of the GPU's step, on a CPU
    fastres profile --busy                                   # GPU-busy fraction of the step
    fastres profile --trace traces/ --nvtx                   # + Chrome trace, kernel table,
                                                             #   NVTX ranges

The step is the trainer's own `fastres.engine.TrainStep`, built from the preset (model,
optimizer, loss, schedules, micro-batches, augmentation; flags override them), run
`--warmup` times untimed (compilation happens there), then `--steps` times timed. The
profiler times phases through the step's `on_phase` hook: data (the loader's next batch,
augmentation included), forward (with the loss), backward and optimizer (update, EMA,
zero_grad), once per micro-batch for the first two; when the whole step is one compiled
graph (modes step, step+graph) there is one phase, "step". CUDA events between phases on a
GPU (read once, after the last step), a clock on the CPU, where every op finishes before it
returns. The phases tile the step, so img/s = batch x steps / their sum. Each phase is
also timed on the host: when the host takes longer to issue a phase than the GPU to run
it, the GPU waits, and the phase's GPU-timeline time is the host's (a host-bound step);
the two columns side by side tell which.

Modes (`--modes`, comma-separated; ratios against the first): eager (run.compile=off),
model (run.compile=on: the model's forward and backward compiled), step (run.compile=step:
the whole step one graph), step+graph (that graph replayed as a CUDA graph); "+fused" after
any of them adds the fused Triton BN-act kernels. A mode the device cannot run is listed as
"skipped: why". `--compare` is `--modes eager,model,model+fused` in both memory formats.

FLOPs of one training step (forward + backward) come from `fastres.bench.training_flops`
(convolutions and matrix products; Muon's Newton-Schulz matmuls are not included); MFU
divides the achieved FLOP/s by the device's dense peak for the math the step runs in
(bf16/fp16, or TF32 for fp32 convolutions when cuDNN allows it); unknown devices need
--peak-tflops. Data: random uint8 images through the chosen loader unless --data-dir.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: this folder must not shadow the standard
    # library's `profile` module, which torch's compiler imports through cProfile
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

from fastres.tools._common import (add_config_args, int_at_least, positive_float, add_overwrite_arg, claim_output_dir,
                                   claim_output_file, config_from, csv_list, env_line, fmt,
                                   markdown_table, pct, write_json)

SCHEMA = "fastres-profile-v2"
BASE_MODES = {  # mode -> (run.compile, run.cuda_graph)
    "eager": ("off", "off"), "model": ("on", "off"), "step": ("step", "off"),
    "step+graph": ("step", "on"),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres profile", description="Steady-state img/s of the training step, its "
        "data/forward/backward/optimizer breakdown, TFLOP/s, MFU and peak memory; the "
        "TrainStep modes side by side; graph breaks; GPU-busy fraction.")
    p.add_argument("--dtype", dest="precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype and loader output dtype (default: the preset's; auto "
                        "is bf16 on GPU, fp32 on CPU)")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"),
                   help="model and input layout (default: the preset's, channels_last); "
                        "contiguous copies each channels-last batch to NCHW in the data phase")
    p.add_argument("--compile", choices=("auto", "on", "step", "off"),
                   help="without --modes: torch.compile the model (on), the whole step "
                        "(step) or nothing (off); default: the preset's")
    p.add_argument("--steps", type=int_at_least(0), default=0,
                   help="timed steps (0 = auto: 50 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int_at_least(-1), default=-1,
                   help="untimed steps first (-1 = auto: 10 on GPU, 1 on CPU, +2 compiled)")
    p.add_argument("--images", type=int_at_least(0), default=0, metavar="N",
                   help="random uint8 images the loader draws from (0 = auto: 50000 on GPU, "
                        "the larger of 2048 and 2 batches on CPU)")
    p.add_argument("--peak-tflops", type=positive_float, metavar="T",
                   help="the device's peak TFLOP/s for this dtype (MFU on devices not known "
                        "here, or to override)")
    p.add_argument("--modes", metavar="LIST",
                   help=f"measure these modes, ratios against the first: "
                        f"{', '.join(BASE_MODES)}, each optionally +fused")
    p.add_argument("--compare", action="store_true",
                   help="= --modes eager,model,model+fused --memory-formats "
                        "channels_last,contiguous")
    p.add_argument("--memory-formats", default=None,
                   help="with --modes/--compare: comma-separated (default: the preset's; "
                        "--compare: channels_last,contiguous)")
    p.add_argument("--check-graph", action="store_true",
                   help="compile the whole step and print `graph breaks: N, recompiles: M, "
                        "missing fake impls: K` with the reason for each (runs steps 0-2, "
                        "phase 2, later steps); exits 1 unless all are 0")
    p.add_argument("--as-device", choices=("cuda",),
                   help="with --check-graph: resolve the config for this device (the GPU's "
                        "bf16, fused ops, compile=step, CUDA graphs) and trace its step on "
                        "this machine with fake tensors, then lower it with Inductor for an "
                        "sm_90 GPU; needs no GPU")
    p.add_argument("--busy", action="store_true",
                   help="GPU: the fraction of the step's wall time the GPU runs kernels "
                        "(torch.profiler over the timed steps)")
    p.add_argument("--trace", metavar="DIR",
                   help="after the timed steps, profile --trace-steps more with torch.profiler, "
                        "write a Chrome trace (chrome://tracing, ui.perfetto.dev) into DIR and "
                        "print the top kernels by time and the host gaps between them")
    p.add_argument("--trace-steps", type=int_at_least(1), default=5, help="steps in the trace (default 5)")
    p.add_argument("--nvtx", action="store_true",
                   help="NVTX ranges around each phase of the timed steps (GPU; for Nsight)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config the step is built from (JSON) and exit")
    add_overwrite_arg(p, "--json FILE or --trace DIR")
    add_config_args(p, preset="speedrun",
                    fields=("data-dir", "model", "batch-size", "loader", "fused-kernels",
                            "device", "seed"))
    return p


# --------------------------------------------------------------------------- timing

class PhaseClock:
    """Timestamps at every phase boundary: `mark(name)` ends the running phase and starts
    `name` ("end" starts nothing). Each boundary is stamped twice: a CUDA event on the
    stream (the GPU's timeline; recorded without a sync, read once in `totals`) and the
    host's clock (when the host got there). On a CPU both are the host's clock."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.names: list[str] = []
        self.stamps: list = []
        self.host: list[float] = []

    def mark(self, name: str) -> None:
        import torch

        self.host.append(time.perf_counter())
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.stamps.append(ev)
        self.names.append(name)

    def totals(self) -> tuple[dict[str, float], dict[str, float]]:
        """Seconds spent in each named phase: (on the device's timeline, on the host)."""
        host = [b - a for a, b in zip(self.host, self.host[1:])]
        if self.cuda:
            self.stamps[-1].synchronize()  # host sync: once, after the timed loop
            dev = [a.elapsed_time(b) / 1e3 for a, b in zip(self.stamps, self.stamps[1:])]
        else:
            dev = host
        out: tuple[dict[str, float], dict[str, float]] = ({}, {})
        for name, d, h in zip(self.names, dev, host):
            out[0][name] = out[0].get(name, 0.0) + d
            out[1][name] = out[1].get(name, 0.0) + h
        return out


class _Marker:
    """The `on_phase` hook: marks the clock and, when asked, opens NVTX ranges (Nsight)
    or torch.profiler labels named after the phase."""

    def __init__(self, clock: PhaseClock | None, nvtx: bool = False, labels: bool = False):
        self.clock, self.nvtx, self.labels = clock, nvtx, labels
        self._nvtx_open = False
        self._label = None

    def __call__(self, name: str) -> None:
        if self.clock is not None:
            self.clock.mark(name)
        if not (self.nvtx or self.labels):
            return
        import torch

        if self.nvtx:
            if self._nvtx_open:
                torch.cuda.nvtx.range_pop()
            if name != "end":
                torch.cuda.nvtx.range_push(name)
            self._nvtx_open = name != "end"
        if self.labels:
            if self._label is not None:
                self._label.__exit__(None, None, None)
            self._label = torch.profiler.record_function(name) if name != "end" else None
            if self._label is not None:
                self._label.__enter__()


def count_step_flops(cfg, num_classes: int, batch: int, device) -> dict:
    """FLOPs of one training step of `cfg`'s model (see `fastres.bench.training_flops`),
    counted on a plain copy (BatchNorm is not a counted op, fused or not)."""
    from fastres import config as C
    from fastres.bench import training_flops
    from fastres.engine.build import build_model

    model = build_model(C.replace(cfg, model={"fused_kernels": False}), num_classes)
    return training_flops(model, batch=batch, num_classes=num_classes, device=device)


def random_data(n: int, num_classes: int = 10, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
            rng.integers(0, num_classes, size=n, dtype=np.int64))


def _peak_memory(device) -> tuple[int, str]:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    # ru_maxrss is in KiB on Linux: the peak resident set of the whole process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"


def build_session(cfg, images, labels, num_classes: int):
    """The training loader and the Session (model on its device, data-dependent init,
    TrainStep) for the resolved `cfg`, as `fastres train` builds them."""
    from fastres.engine import Session, build_model
    from fastres.engine.build import loader_options
    from fastres.pipelines import build_loader

    loader = build_loader(cfg.data.loader, images, labels, loader_options(cfg))
    return loader, Session(cfg, build_model(cfg, num_classes), loader)


def measure(cfg, images, labels, *, num_classes: int, steps: int, warmup: int,
            flops: dict, peak: tuple[str, float] | None, nvtx: bool = False, busy: bool = False,
            trace_dir: str | None = None, trace_steps: int = 5, trace_name: str = "trace"
            ) -> dict:
    """Warm up and time `steps` TrainStep calls phase by phase; optionally the GPU-busy
    fraction and a trace. Returns the figures."""
    import torch

    from fastres._compat import reset_compiler
    from fastres.bench import GCPauses
    from fastres.pipelines import endless

    r = cfg.run
    device = torch.device(r.device)
    if r.compile != "off":
        reset_compiler()  # each mode compiles from scratch, as a fresh process would
    loader, session = build_session(cfg, images, labels, num_classes)
    step = session.step
    batches = endless(loader)
    contiguous = not r.channels_last

    def one(hook) -> None:
        hook("data")
        x, y = next(batches)
        if contiguous:
            x = x.contiguous()
        step(x, y, on_phase=hook)

    no_marks = _Marker(None)
    t0 = time.perf_counter()
    for _ in range(warmup):
        one(no_marks)
    _sync(device)
    warmup_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = PhaseClock(device)
    marker = _Marker(clock, nvtx=nvtx and device.type == "cuda")
    pauses = GCPauses()
    _sync(device)
    pauses.start()
    wall0 = time.perf_counter()
    for _ in range(steps):
        one(marker)
    marker("end")
    phases, host_phases = clock.totals()
    _sync(device)
    wall_s = time.perf_counter() - wall0
    pauses.stop()
    peak_mem, mem_kind = _peak_memory(device)

    busy_frac = _gpu_busy(lambda: one(no_marks), device, steps) if busy else None

    trace_path, kernels = None, None
    if trace_dir:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                         else [])
        labels_ = _Marker(None, labels=True)
        with profile(activities=acts) as prof:
            for _ in range(trace_steps):
                one(labels_)
            labels_("end")
            _sync(device)
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        trace_path = str(Path(trace_dir) / f"{trace_name}.json")
        prof.export_chrome_trace(trace_path)
        from fastres.bench import kernel_summary, profiled_kernels

        what, intervals = profiled_kernels(prof)
        kernels = {"what": what, **kernel_summary(intervals, trace_steps)}

    from fastres.bench import mfu

    step_s = sum(phases.values())
    imgs = steps * loader.batch_size
    tflops = flops["per_step"] * steps / step_s / 1e12 if step_s > 0 else None
    o = cfg.optim
    return {
        "model": cfg.model.name, "loader": cfg.data.loader, "precision": r.precision,
        "memory_format": "channels_last" if r.channels_last else "contiguous",
        "compile": r.compile, "cuda_graph": r.cuda_graph,
        "fused_kernels": cfg.model.fused_kernels, "optimizer": f"{o.name} ({o.impl})",
        "batch_size": loader.batch_size,
        "micro_batch": min(r.micro_batch or loader.batch_size, loader.batch_size),
        "steps": steps, "warmup_steps": warmup, "warmup_s": warmup_s,
        "img_per_s": imgs / step_s if step_s > 0 else None,
        "step_ms": 1e3 * step_s / steps, "wall_step_ms": 1e3 * wall_s / steps,
        "phases_ms": {p: 1e3 * t / steps for p, t in phases.items()},
        "host_phases_ms": {p: 1e3 * t / steps for p, t in host_phases.items()},
        "device_timeline": device.type == "cuda",
        "phase_share": {p: t / step_s for p, t in phases.items()} if step_s > 0 else {},
        "flops_per_step": flops["per_step"], "tflops": tflops,
        "peak_tflops": peak[1] if peak else None, "peak_source": peak[0] if peak else None,
        "mfu": mfu(flops["per_step"] * steps, step_s, peak[1] if peak else None),
        "gpu_busy": busy_frac,
        "gc_pauses": pauses.as_dict(),
        "peak_memory_bytes": peak_mem, "peak_memory_kind": mem_kind, "trace": trace_path,
        "kernels": kernels,
    }


def _sync(device) -> None:
    from fastres.bench import sync

    sync(device)


def _gpu_busy(one_step, device, steps: int) -> float | None:
    """Kernel time over wall time across `steps` steps, from torch.profiler: the share of
    the step during which the GPU computes (1 - the share it waits on the host). Kernel
    time is the union of the kernels' intervals on the device's timeline (not the
    profiler's per-op device times, which count each kernel under its launching op too)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    from fastres.bench import busy_us, profiled_kernels

    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step()
        _sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    what, kernels = profiled_kernels(prof)
    if what != "GPU kernels" or wall_us <= 0:
        return None
    return min(busy_us(kernels) / wall_us, 1.0)


def mode_config(cfg, mode: str, memory_format: str | None):
    """`cfg` for a --modes entry (e.g. "step+graph", "model+fused")."""
    from fastres import config as C

    base, fused = (mode[:-len("+fused")], True) if mode.endswith("+fused") else (mode, False)
    from fastres.engine.compile import step_impl

    comp, graph = BASE_MODES[base]
    run = {"compile": comp, "cuda_graph": graph}
    if memory_format:
        run["channels_last"] = memory_format == "channels_last"
    impl = step_impl(cfg.optim.impl) if comp == "step" else cfg.optim.impl
    return C.replace(cfg, run=run, model={"fused_kernels": fused}, optim={"impl": impl})


def unavailable(mode: str, cfg) -> str | None:
    """Why `mode` cannot run with `cfg` on this device and torch, or None."""
    import torch

    on_gpu = cfg.run.device.startswith("cuda")
    if "graph" in mode and not on_gpu:
        return "CUDA graphs need a CUDA device"
    from fastres._compat import can_trace_backward

    if mode.startswith("step") and not can_trace_backward():
        return f"torch {torch.__version__} cannot trace backward into a graph (needs >= 2.11)"
    if mode.startswith("step") and cfg.optim.impl == "triton":
        return "optim.impl=triton runs eagerly"
    return None


# --------------------------------------------------------------------------- output

def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(m: dict, math: str) -> str:
    host = m.get("host_phases_ms", {})
    rows = [[p, f"{m['phases_ms'][p]:.3f}", f"{100 * m['phase_share'].get(p, 0):.1f}%",
             f"{host.get(p, 0.0):.3f}"] for p in m["phases_ms"]]
    rows.append(["step", f"{m['step_ms']:.3f}", "100.0%", f"{sum(host.values()):.3f}"])
    lines = [markdown_table(["phase", "ms/step", "share", "host ms/step"], rows)]
    if m.get("device_timeline"):
        lines.append("(ms/step: the device's timeline; host ms/step: the host's time to issue "
                     "the phase. Where the two are close, the device waited on the host.)")
    lines.append("")
    lines.append(f"throughput   {m['img_per_s']:,.0f} img/s  ({m['step_ms']:.3f} ms/step; "
                 f"wall clock {m['wall_step_ms']:.3f} ms/step; micro-batch "
                 f"{m['micro_batch']} of {m['batch_size']})")
    lines.append(f"FLOPs/step   {m['flops_per_step'] / 1e9:,.2f} GFLOP (forward + backward; "
                 f"{m['flops_per_step'] / 2e9:,.2f} GMACs)")
    if m["mfu"] is not None:
        lines.append(f"achieved     {m['tflops']:.3f} TFLOP/s = {100 * m['mfu']:.1f}% MFU of "
                     f"{m['peak_tflops']:g} TFLOP/s ({m['peak_source']}, dense {math})")
    else:
        lines.append(f"achieved     {m['tflops']:.4f} TFLOP/s; MFU n/a (no known peak for "
                     "this device; give --peak-tflops)")
    if m.get("gpu_busy") is not None:
        lines.append(f"gpu busy     {100 * m['gpu_busy']:.1f}% (kernel time / wall time)")
    lines.append(f"peak memory  {_gib(m['peak_memory_bytes'])} ({m['peak_memory_kind']})")
    g = m.get("gc_pauses")
    if g is not None:
        from fastres.bench import GCPauses
        lines.append(f"GC pauses    {GCPauses.total([g]).describe('in the timed steps')}")
    lines.append(f"warm-up      {m['warmup_steps']} steps, {m['warmup_s']:.1f} s wall"
                 + (" (compilation included)" if m["compile"] != "off" else ""))
    if m["trace"]:
        lines.append(f"trace        {m['trace']}")
    return "\n".join(lines)


def kernel_report(label: str, k: dict) -> str:
    """The top kernels of a traced mode, and the gaps between them."""
    rows = [[t["name"][:70], f"{t['calls'] / max(k['steps'], 1):g}",
             f"{t['total_ms_per_step']:.3f}", f"{100 * t['share']:.1f}%"] for t in k["top"]]
    span = k["span_ms_per_step"]
    lines = [f"{label}: top {len(rows)} {k['what']} by time, per step (over {k['steps']} "
             "traced steps)", markdown_table(["name", "calls", "ms", "share of kernel time"],
                                             rows, align="lrrr"),
             f"launches {k['launches_per_step']:.0f}/step; busy {k['busy_ms_per_step']:.3f} ms, "
             f"span {span:.3f} ms, gaps between them {k['gap_ms_per_step']:.3f} ms/step "
             f"({100 * k['gap_ms_per_step'] / span if span else 0:.1f}% of the span"
             + ("; on a GPU: the device waiting on the host)" if k["what"] == "GPU kernels"
                else ")")]
    for g in k["largest_gaps"]:
        lines.append(f"  gap {g['us']:.1f} us after {g['after'][:50]} before {g['before'][:50]}")
    return "\n".join(lines)


def compare_table(results: list[dict]) -> str:
    ran = [m for m in results if "img_per_s" in m]
    base = ran[0] if ran else None
    rows = []
    for m in results:
        if "img_per_s" not in m:  # skipped, or failed
            why = f"skipped: {m['skipped']}" if "skipped" in m else f"FAILED: {m['error']}"
            rows.append([m["mode"], m["memory_format"], why[:60]] + [""] * 8)
            continue
        rows.append([m["mode"], m["memory_format"], f"{m['img_per_s']:,.0f}",
                     f"{m['step_ms']:.3f}", f"{m['img_per_s'] / base['img_per_s']:.2f}x",
                     " ".join(f"{p} {v:.2f}" for p, v in m["phases_ms"].items()),
                     fmt(m["tflops"], ".3f"), fmt(pct(m["mfu"]), ".1f"),
                     fmt(pct(m.get("gpu_busy")), ".1f"), _gib(m["peak_memory_bytes"]),
                     f"{m['warmup_s']:.1f}"])
    return markdown_table(["mode", "memory", "img/s", "ms/step",
                           f"vs {base['mode'] if base else '-'}", "phases (ms)", "TFLOP/s",
                           "MFU %", "GPU busy %", "peak mem", "warm-up s"], rows, align="llrrrl")


# --------------------------------------------------------------------------- main

def _check_graph(cfg, images, labels, num_classes: int, as_device: str | None) -> dict:
    from fastres.engine import build_model, check_graph

    if as_device:
        # No data and no loader: a fake batch of the GPU loader's shape, dtype and layout.
        from fastres.config import TRAIN_SIZES

        n = cfg.data.train_limit or TRAIN_SIZES[cfg.data.dataset]
        per_epoch = max(n // cfg.data.batch_size, 1)
        rep = check_graph(cfg, build_model(cfg, num_classes), steps_per_epoch=per_epoch,
                          as_device=as_device)
    else:
        loader, session = build_session(cfg, images, labels, num_classes)
        x, y = next(iter(loader))
        per_epoch = len(loader)
        rep = check_graph(cfg, session.model, x, y, steps_per_epoch=per_epoch)
    print(rep.line())
    for reason in rep.reasons:
        print(f"  break: {reason}")
    for reason in rep.recompile_reasons:
        print(f"  recompiled: {reason}")
    for op in rep.missing_fake:
        print(f"  missing fake impl: {op}")
    for err in rep.errors:
        print(f"  compile error: {err}")
    for why in rep.cudagraph:
        print(f"  cuda graph: {why}")
    print(f"  ({rep.graphs} graph(s) over steps {rep.steps}; {_phase2_words(cfg, per_epoch)}"
          + (f"; traced for {rep.device}" if rep.device else "") + ")")
    if rep.kernels:
        print()
        print(kernels_table(rep.kernels))
    return {"breaks": rep.breaks, "recompiles": rep.recompiles, "graphs": rep.graphs,
            "reasons": rep.reasons, "recompile_reasons": rep.recompile_reasons,
            "new_step_recompiles": rep.new_step_recompiles, "steps": rep.steps, "missing_fake": rep.missing_fake,
            "errors": rep.errors, "cudagraph": rep.cudagraph, "device": rep.device,
            "kernels": rep.kernels, "ok": rep.ok}


def _check_as_device(args, cfg, num_classes: int) -> int:
    """--check-graph --as-device: trace the GPU configuration's step here; exit 1 unless
    nothing stood in the way."""
    from fastres import config as C
    from fastres.bench import environment

    env = environment(None)
    print(f"fastres profile --check-graph --as-device {args.as_device}: {cfg.model.name}, "
          f"{cfg.run.precision}, batch {cfg.data.batch_size}, optimizer {cfg.optim.name} "
          f"({cfg.optim.impl}), compile {cfg.run.compile}, cuda graph {cfg.run.cuda_graph}, "
          f"preset {args.preset}")
    print(f"  traced on {env_line(env)}", flush=True)
    check = _check_graph(cfg, None, None, num_classes, args.as_device)
    if args.json:
        out = {"schema": SCHEMA, "tool": "fastres profile", "env": env,
               "config": C.to_dict(cfg), "graph_check": check}
        print(f"\nwrote {write_json(args.json, out)}")
    return 0 if check["ok"] else 1


def kernels_table(kernels: list[dict]) -> str:
    """What Inductor generates for each captured graph of the step, for an sm_90 GPU."""
    rows = []
    for k in kernels:
        name = k["graph"]
        if k.get("error"):
            rows.append([name, str(k["ops"]), "lowering stopped: " + k["error"], "", "", ""])
            continue
        rows.append([name, str(k["ops"]), str(k["triton_kernels"]), str(k["launches"]),
                     str(k["library_calls"]), ", ".join(k["aten_fallbacks"]) or "-"])
    return ("Inductor's code for the step on an sm_90 GPU (generated here, not run):\n"
            + markdown_table(
                ["graph", "aten ops", "Triton kernels", "launches", "library calls",
                 "aten fallbacks"], rows, align="lrrrrl"))


def _phase2_words(cfg, steps_per_epoch: int) -> str:
    """Where the recipe's phase 2 starts, or that it has none."""
    from fastres.engine.schedules import phase2_start, total_steps

    start = phase2_start(cfg.schedule, steps_per_epoch)
    return f"phase 2 starts at step {start}" if start < total_steps(
        cfg.schedule, steps_per_epoch) else "no phase 2"


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from fastres.errors import ConfigError

    if args.steps < 0 or args.trace_steps < 1:
        raise ConfigError("--steps must be >= 0 and --trace-steps >= 1")
    # Output targets are checked (and claimed) before anything is built or measured.
    if args.json:
        args.json = str(claim_output_file(args.json, overwrite=args.overwrite))
    trace = claim_output_dir(args.trace, overwrite=args.overwrite, flag="--trace") \
        if args.trace else None
    if trace is not None:
        args.trace = str(trace.path)
    try:
        return _main(args)
    finally:
        if trace is not None:
            trace.release()


def _main(args) -> int:
    from fastres import config as C
    from fastres.errors import ConfigError, unknown_choice

    run = {"progress": "none", "out_dir": ""}
    if args.compile and (args.modes or args.compare):
        raise ConfigError(f"--compile {args.compile} and --{'modes' if args.modes else 'compare'}"
                          " both choose how the step is compiled: give one (a mode per "
                          "--modes entry: eager, model, step, step+graph)")
    if args.memory_format:
        run["channels_last"] = args.memory_format == "channels_last"
    if args.compile:
        run["compile"] = args.compile
    if args.as_device and not args.check_graph:
        raise ConfigError("--as-device traces without running anything: use it with "
                          "--check-graph")
    if args.check_graph and args.compile not in (None, "step"):
        raise ConfigError(f"--check-graph traces the step compiled whole (compile=step); "
                          f"--compile {args.compile} contradicts it")
    if args.check_graph:  # the check is about the step compiled whole: resolve it so
        run["compile"] = "step"
    cfg = config_from(args, run=run)
    if args.compare:
        modes = csv_list(args.modes or "eager,model,model+fused", "--modes")
        formats = csv_list(args.memory_formats or "channels_last,contiguous",
                           "--memory-formats")
    else:
        modes = csv_list(args.modes, "--modes") if args.modes else []
        formats = csv_list(args.memory_formats, "--memory-formats") \
            if args.memory_formats else [None]
    known = [m + s for m in BASE_MODES for s in ("", "+fused")]
    for m in modes:
        if m not in known:
            raise unknown_choice("--modes entry", m, known)
    for f in formats:
        if f not in (None, "channels_last", "contiguous"):
            raise unknown_choice("--memory-formats entry", f, ("channels_last", "contiguous"))

    import torch

    from fastres.bench import device_peak, environment, math_mode
    from fastres.engine import resolve_for

    cfg = C.resolve(cfg, args.as_device) if args.as_device else resolve_for(cfg)
    if args.print_config:
        import json

        print(json.dumps(C.to_dict(cfg), indent=2))
        return 0
    num_classes = C.num_classes_for(cfg.data.dataset)
    if args.as_device:
        return _check_as_device(args, cfg, num_classes)
    device = torch.device(cfg.run.device)
    on_gpu = device.type == "cuda"
    env = environment(device)
    steps = args.steps or (50 if on_gpu else 5)
    batch = cfg.data.batch_size

    if args.data_dir:
        from fastres.data import load_cifar
        from fastres.engine.build import subset

        data = load_cifar(cfg.data.data_dir, cfg.data.dataset)
        images, labels = subset(data.train.images, data.train.labels, cfg.data.train_limit)
        source = f"{data.name} train set ({len(labels)} images, fingerprint {data.fingerprint})"
    else:
        n = args.images or (50000 if on_gpu else max(2048, 2 * batch))
        images, labels = random_data(n, num_classes, cfg.run.seed)
        source = f"random uint8 images ({n})"
    if len(labels) < batch:
        raise ConfigError(f"{len(labels)} images are fewer than one batch of {batch}; raise "
                          "--images or lower --batch-size")
    if args.nvtx and not on_gpu:
        print("note: --nvtx ignored: NVTX ranges need a CUDA device", file=sys.stderr)

    math_ = math_mode(cfg.run.precision, device)
    peak = ("--peak-tflops", args.peak_tflops) if args.peak_tflops else (
        device_peak(env["device"], math_) if on_gpu else None)
    micro = min(cfg.run.micro_batch or batch, batch)
    print(f"fastres profile: {cfg.model.name}, loader {cfg.data.loader}, {cfg.run.precision}"
          f" ({math_} math), batch {batch}" + (f" (micro-batches of {micro})" if micro < batch
                                                else "") +
          f", optimizer {cfg.optim.name} ({cfg.optim.impl}), preset {args.preset}")
    print(f"  {env_line(env)}")
    print(f"  data: {source}; {steps} timed steps per setting", flush=True)
    out = {"schema": SCHEMA, "tool": "fastres profile", "device": env["device"], "env": env,
           "config": C.to_dict(cfg), "data": source, "math": math_,
           "peak": {"source": peak[0], "tflops": peak[1]} if peak else None, "results": []}

    if args.check_graph:
        why = unavailable("step", cfg)
        if why:
            print(f"graph check skipped: {why}")
            out["graph_check"] = {"skipped": why}
        else:
            out["graph_check"] = _check_graph(cfg, images, labels, num_classes, None)
        if not modes and not args.busy:
            if args.json:
                print(f"\nwrote {write_json(args.json, out)}")
            return 0 if out["graph_check"].get("ok", True) else 1

    if args.busy and not on_gpu:
        print("gpu busy: skipped: needs a CUDA device")
    flops = count_step_flops(cfg, num_classes, batch, device)
    out["flops"] = flops
    settings = [(m, f) for f in formats for m in modes] or [(None, formats[0])]
    results = out["results"]
    failed = False
    for mode, fmt_name in settings:
        mcfg = mode_config(cfg, mode, fmt_name) if mode else (
            C.replace(cfg, run={"channels_last": fmt_name == "channels_last"})
            if fmt_name else cfg)
        name = mode or next((k for k, v in BASE_MODES.items()
                             if v == (mcfg.run.compile, mcfg.run.cuda_graph)), "eager") + \
            ("+fused" if mcfg.model.fused_kernels else "")
        fmt_label = "channels_last" if mcfg.run.channels_last else "contiguous"
        why = unavailable(name, mcfg)
        if why:
            results.append({"mode": name, "memory_format": fmt_label, "skipped": why})
            print(f"  {name}, {fmt_label}: skipped: {why}", flush=True)
            continue
        compiled = mcfg.run.compile != "off"
        warmup = args.warmup if args.warmup >= 0 else (10 if on_gpu else 1) + 2 * compiled
        try:
            m = measure(mcfg, images, labels, num_classes=num_classes, steps=steps,
                        warmup=warmup, flops=flops, peak=peak, nvtx=args.nvtx,
                        busy=args.busy and on_gpu, trace_dir=args.trace,
                        trace_steps=args.trace_steps,
                        trace_name=f"{mcfg.model.name}-{name}-"
                                   f"{'cl' if mcfg.run.channels_last else 'nchw'}")
        except Exception as e:  # one mode failing (a compile error) does not cost the others
            if len(settings) == 1:
                raise
            from fastres.engine.compile import _one_line

            results.append({"mode": name, "memory_format": fmt_label,
                            "error": _one_line(e)})
            print(f"  {name}, {fmt_label}: FAILED: {_one_line(e)}", flush=True)
            failed = True
            continue
        m["mode"] = name
        results.append(m)
        if args.json:  # after every mode: a run stopped later keeps what was measured
            write_json(args.json, out)
        if m.get("kernels"):
            print(kernel_report(f"{name}, {m['memory_format']}", m["kernels"]) + "\n",
                  flush=True)
        if len(settings) > 1:
            print(f"  measured {name}, {m['memory_format']}: {m['img_per_s']:,.0f} img/s",
                  flush=True)
        else:
            print(f"  {name}, {m['memory_format']}, fused kernels "
                  f"{'on' if mcfg.model.fused_kernels else 'off'}\n")
            print(report(m, math_))
    if len(settings) > 1:
        print()
        print(compare_table(results))
        first = next((m for m in results if "img_per_s" in m), None)
        if first:
            print(f"\nratios: img/s against {first['mode']} ({first['memory_format']}), "
                  "measured in this process" + ("" if on_gpu else "; peak mem on a CPU is "
                                                "the process's peak RSS so far"))
    if args.json:
        print(f"\nwrote {write_json(args.json, out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("profile", main))
