"""`fastres profile`: steady-state training throughput and where a step's time goes.

    fastres profile                                          # the speedrun preset's step
    fastres profile --model resnet56 --dtype bf16 --compile on --batch-size 512 --steps 100
    fastres profile --compare                                # eager vs compile vs fused
    fastres profile --trace traces/ --nvtx                   # + Chrome trace, NVTX ranges

One training step of the preset (its model, optimizer, loss and augmentation; flags override
them) is run `--warmup` times untimed (compilation happens there), then `--steps` times
timed. Each timed step is split into data (the loader's next batch, augmentation included),
forward (with the loss), backward and optimizer (step, EMA, zero_grad): CUDA events between
the phases on a GPU (read once, after the last step), a clock on the CPU, where every op
finishes before it returns. The phases tile the step, so their sum is the step time and
img/s = batch x steps / that sum.

FLOPs of one training step (forward + backward) are counted once by
torch.utils.flop_counter (convolutions and matrix products: what the tensor cores do; the
optimizer's Newton-Schulz matmuls for Muon are not included), at a small batch and scaled,
since every counted op is linear in the batch. MFU divides the achieved FLOP/s by the
device's dense peak for the math the step runs in (bf16/fp16, or TF32 for fp32
convolutions when cuDNN allows it): A100, H100 SXM/PCIe/NVL and H200 are known, other
devices need --peak-tflops.

--compare measures eager, compile and compile + fused kernels (and each in channels-last
and contiguous memory) in one process, each after its own warm-up, and prints them as
ratios against the first. Data: random uint8 images through the chosen loader unless
--data-dir is given.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from fastres.tools._common import (add_config_args, config_from, csv_list, env_line, fmt,
                                   markdown_table, pct, write_json)

SCHEMA = "fastres-profile-v1"
PHASES = ("data", "forward", "backward", "optimizer")

VARIANTS = {  # --compare variant -> (compile, fused kernels)
    "eager": ("off", False), "eager+fused": ("off", True),
    "compile": ("on", False), "compile+fused": ("on", True),
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres profile", description="Steady-state img/s of a training step, its "
        "data/forward/backward/optimizer breakdown, TFLOP/s, MFU and peak memory.")
    p.add_argument("--dtype", dest="precision", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype and loader output dtype (default: the preset's; auto "
                        "is bf16 on GPU, fp32 on CPU)")
    p.add_argument("--memory-format", choices=("channels_last", "contiguous"),
                   help="model and input layout (default: the preset's, channels_last); "
                        "contiguous copies each channels-last batch to NCHW in the data phase")
    p.add_argument("--compile", choices=("auto", "on", "off"),
                   help="torch.compile the model (default: the preset's; auto = on for GPU)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps (0 = auto: 50 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=-1,
                   help="untimed steps first (-1 = auto: 10 on GPU, 1 on CPU, +2 with compile)")
    p.add_argument("--images", type=int, default=0, metavar="N",
                   help="random uint8 images the loader draws from (0 = auto: 50000 on GPU, "
                        "the larger of 2048 and 2 batches on CPU)")
    p.add_argument("--peak-tflops", type=float, metavar="T",
                   help="the device's peak TFLOP/s for this dtype (MFU on devices not known "
                        "here, or to override)")
    p.add_argument("--trace", metavar="DIR",
                   help="after the timed steps, profile --trace-steps more with torch.profiler "
                        "and write a Chrome trace (chrome://tracing, ui.perfetto.dev) into DIR")
    p.add_argument("--trace-steps", type=int, default=5, help="steps in the trace (default 5)")
    p.add_argument("--nvtx", action="store_true",
                   help="NVTX ranges around each phase of the timed steps (GPU; for Nsight)")
    p.add_argument("--compare", action="store_true",
                   help="measure every --variants x --memory-formats setting, as ratios "
                        "against the first")
    p.add_argument("--variants", default="eager,compile,compile+fused",
                   help=f"with --compare: comma-separated, from {', '.join(VARIANTS)} "
                        "(default: eager,compile,compile+fused)")
    p.add_argument("--memory-formats", default="channels_last,contiguous",
                   help="with --compare: comma-separated (default: channels_last,contiguous)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_config_args(p, preset="speedrun",
                    fields=("data-dir", "model", "batch-size", "loader", "fused-kernels",
                            "device", "seed"))
    return p


# --------------------------------------------------------------------------- timing

class PhaseClock:
    """Timestamps at every phase boundary of consecutive steps: CUDA events on a GPU
    (recorded on the stream, no sync; `totals` synchronises once), perf_counter on a CPU.
    Steps run back to back, so one step's end is the next step's start."""

    def __init__(self, device, steps: int):
        import torch

        self.cuda = device.type == "cuda"
        n = 1 + steps * len(PHASES)
        self.marks = [torch.cuda.Event(enable_timing=True) for _ in range(n)] if self.cuda \
            else [0.0] * n
        self.i = 0

    def mark(self) -> None:
        if self.cuda:
            self.marks[self.i].record()
        else:
            self.marks[self.i] = time.perf_counter()
        self.i += 1

    def totals(self) -> dict[str, float]:
        """Seconds spent in each phase over all steps."""
        if self.cuda:
            self.marks[self.i - 1].synchronize()  # host sync: once, after the timed loop
            dt = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:self.i])]
        else:
            dt = [b - a for a, b in zip(self.marks, self.marks[1:self.i])]
        k = len(PHASES)
        return {p: sum(dt[j::k]) for j, p in enumerate(PHASES)}


class _Ranges:
    """NVTX ranges (for Nsight) and/or torch.profiler labels around the phases; a no-op
    when neither is asked for, so the timed loop pays one early return per phase."""

    def __init__(self, nvtx: bool, labels: bool):
        self.nvtx, self.labels = nvtx, labels
        self._nvtx_open = False
        self._label = None

    def __call__(self, name: str | None) -> None:
        """Close the open range and open `name` (None: just close)."""
        if not (self.nvtx or self.labels):
            return
        import torch

        if self.nvtx:
            if self._nvtx_open:
                torch.cuda.nvtx.range_pop()
            if name is not None:
                torch.cuda.nvtx.range_push(name)
            self._nvtx_open = name is not None
        if self.labels:
            if self._label is not None:
                self._label.__exit__(None, None, None)
            self._label = torch.profiler.record_function(name) if name is not None else None
            if self._label is not None:
                self._label.__enter__()


def _endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


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


def measure(cfg, images, labels, *, num_classes: int, steps: int, warmup: int,
            flops: dict, peak: tuple[str, float] | None, nvtx: bool = False,
            trace_dir: str | None = None, trace_steps: int = 5, trace_name: str = "trace"
            ) -> dict:
    """Build loader, model and optimizer for the resolved `cfg`, warm up, time `steps`
    steps phase by phase, and (optionally) trace a few more. Returns the figures."""
    import torch
    import torch.nn.functional as F

    from fastres.engine import EMA, build_optimizers
    from fastres.engine.build import PRECISION_DTYPES, build_model
    from fastres.engine.evaluate import autocast_for
    from fastres.pipelines import build_loader
    from fastres.pipelines.base import Augment

    d, o, r = cfg.data, cfg.optim, cfg.run
    device = torch.device(r.device)
    loader = build_loader(d.loader, images, labels, train=True, batch_size=d.batch_size,
                          device=device, dtype=PRECISION_DTYPES[r.precision], mean=d.mean,
                          std=d.std, augment=Augment(crop=d.crop, pad=d.pad,
                                                     pad_mode=d.pad_mode, flip=d.flip,
                                                     cutout=d.cutout),
                          seed=r.seed, workers=d.workers)
    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    model = build_model(cfg, num_classes).to(device=device, memory_format=memory_format)
    if hasattr(model, "data_init"):  # the speed-run net's whitening filters, as in training
        model.data_init(loader.sample(min(5000, loader.num_examples)).to(device))
    ema = EMA(model, o.ema_decay, o.ema_every, o.ema_warmup) if o.ema_decay > 0 else None
    triton_ema = ema is not None and o.impl == "triton"
    opts = build_optimizers(model, o, ema_shadows=ema.shadows_by_param(model)
                            if triton_ema else None)
    scaler = torch.amp.GradScaler(device.type) if r.precision == "fp16" else None
    if r.compile == "on":
        torch._dynamo.reset()  # each variant compiles from scratch, as a fresh process would
    net = torch.compile(model, mode=r.compile_mode) if r.compile == "on" else model
    net.train()
    batches = _endless(loader)
    contiguous = not r.channels_last
    step_no = 0

    def step(mark, ranges) -> None:
        nonlocal step_no
        ranges("data")
        x, y = next(batches)
        if contiguous:
            x = x.contiguous()
        mark()
        ranges("forward")
        with autocast_for(device, r.precision):
            out = net(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=o.label_smoothing,
                                   reduction=o.loss_reduction)
        mark()
        ranges("backward")
        (scaler.scale(loss) if scaler is not None else loss).backward()
        mark()
        ranges("optimizer")
        due = ema is not None and ema.due(step_no)
        # As in the trainer: the Triton SGD averages the weights inside its step, so the EMA
        # afterwards only follows the buffers.
        opts.step(scaler, **({"ema_decay": ema.current_decay() if due else 1.0}
                             if triton_ema else {}))
        if scaler is not None:
            scaler.update()
        opts.zero_grad()
        if due:
            ema.update(model, params=not triton_ema)
        mark()
        ranges(None)
        step_no += 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    no_ranges = _Ranges(False, False)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(lambda: None, no_ranges)
    sync()
    warmup_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = PhaseClock(device, steps)
    ranges = _Ranges(nvtx and device.type == "cuda", False)
    sync()
    wall0 = time.perf_counter()
    clock.mark()
    for _ in range(steps):
        step(clock.mark, ranges)
    phases = clock.totals()
    sync()
    wall_s = time.perf_counter() - wall0
    peak_mem, mem_kind = _peak_memory(device)

    trace_path = None
    if trace_dir:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                         else [])
        with profile(activities=acts) as prof:
            for _ in range(trace_steps):
                step(lambda: None, _Ranges(False, True))
            sync()
        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        trace_path = str(Path(trace_dir) / f"{trace_name}.json")
        prof.export_chrome_trace(trace_path)

    step_s = sum(phases.values())
    imgs = steps * loader.batch_size
    tflops = flops["per_step"] * steps / step_s / 1e12 if step_s > 0 else None
    return {
        "model": cfg.model.name, "loader": d.loader, "precision": r.precision,
        "memory_format": "channels_last" if r.channels_last else "contiguous",
        "compile": r.compile, "fused_kernels": cfg.model.fused_kernels,
        "optimizer": f"{o.name} ({o.impl})", "batch_size": loader.batch_size,
        "steps": steps, "warmup_steps": warmup, "warmup_s": warmup_s,
        "img_per_s": imgs / step_s if step_s > 0 else None,
        "step_ms": 1e3 * step_s / steps, "wall_step_ms": 1e3 * wall_s / steps,
        "phases_ms": {p: 1e3 * t / steps for p, t in phases.items()},
        "phase_share": {p: t / step_s for p, t in phases.items()} if step_s > 0 else {},
        "flops_per_step": flops["per_step"], "tflops": tflops,
        "peak_tflops": peak[1] if peak else None, "peak_source": peak[0] if peak else None,
        "mfu": tflops / peak[1] if (peak and tflops) else None,
        "peak_memory_bytes": peak_mem, "peak_memory_kind": mem_kind, "trace": trace_path,
    }


# --------------------------------------------------------------------------- output

def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def report(m: dict, math: str) -> str:
    rows = [[p, f"{m['phases_ms'][p]:.3f}", f"{100 * m['phase_share'].get(p, 0):.1f}%"]
            for p in PHASES]
    rows.append(["step", f"{m['step_ms']:.3f}", "100.0%"])
    lines = [markdown_table(["phase", "ms/step", "share"], rows), ""]
    lines.append(f"throughput   {m['img_per_s']:,.0f} img/s  ({m['step_ms']:.3f} ms/step; "
                 f"wall clock {m['wall_step_ms']:.3f} ms/step)")
    lines.append(f"FLOPs/step   {m['flops_per_step'] / 1e9:,.2f} GFLOP (forward + backward; "
                 f"{m['flops_per_step'] / 2e9:,.2f} GMACs)")
    if m["mfu"] is not None:
        lines.append(f"achieved     {m['tflops']:.3f} TFLOP/s = {100 * m['mfu']:.1f}% MFU of "
                     f"{m['peak_tflops']:g} TFLOP/s ({m['peak_source']}, dense {math})")
    else:
        lines.append(f"achieved     {m['tflops']:.4f} TFLOP/s; MFU n/a (no known peak for "
                     "this device; give --peak-tflops)")
    lines.append(f"peak memory  {_gib(m['peak_memory_bytes'])} ({m['peak_memory_kind']})")
    lines.append(f"warm-up      {m['warmup_steps']} steps, {m['warmup_s']:.1f} s wall"
                 + (" (compilation included)" if m["compile"] == "on" else ""))
    if m["trace"]:
        lines.append(f"trace        {m['trace']}")
    return "\n".join(lines)


def compare_table(results: list[dict]) -> str:
    base = results[0]
    rows = []
    for m in results:
        rows.append([m["variant"], m["memory_format"], f"{m['img_per_s']:,.0f}",
                     f"{m['step_ms']:.3f}", f"{m['img_per_s'] / base['img_per_s']:.2f}x",
                     *(f"{m['phases_ms'][p]:.3f}" for p in PHASES),
                     fmt(m["tflops"], ".3f"), fmt(pct(m["mfu"]), ".1f"),
                     _gib(m["peak_memory_bytes"]), f"{m['warmup_s']:.1f}"])
    return markdown_table(["variant", "memory", "img/s", "ms/step",
                           f"vs {base['variant']}", *(f"{p} ms" for p in PHASES), "TFLOP/s",
                           "MFU %", "peak mem", "warm-up s"], rows, align="ll")


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    from fastres import config as C
    from fastres.errors import ConfigError, unknown_choice

    if args.steps < 0 or args.trace_steps < 1:
        raise ConfigError("--steps must be >= 0 and --trace-steps >= 1")
    run = {"progress": "none", "out_dir": ""}
    if args.memory_format:
        run["channels_last"] = args.memory_format == "channels_last"
    cfg = config_from(args, run=run)
    variants = csv_list(args.variants, "--variants") if args.compare else []
    formats = csv_list(args.memory_formats, "--memory-formats") if args.compare else []
    for v in variants:
        if v not in VARIANTS:
            raise unknown_choice("--variants entry", v, VARIANTS)
    for f in formats:
        if f not in ("channels_last", "contiguous"):
            raise unknown_choice("--memory-formats entry", f, ("channels_last", "contiguous"))

    import torch

    from fastres.bench import device_peak, environment, math_mode
    from fastres.engine import resolve_for

    cfg = resolve_for(cfg)
    device = torch.device(cfg.run.device)
    on_gpu = device.type == "cuda"
    env = environment(device)
    steps = args.steps or (50 if on_gpu else 5)
    batch = cfg.data.batch_size
    num_classes = 100 if cfg.data.dataset == "cifar100" else 10

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
    if args.peak_tflops:
        peak = ("--peak-tflops", args.peak_tflops)
    elif on_gpu:
        peak = device_peak(env["device"], math_)
    else:
        peak = None
    flops = count_step_flops(cfg, num_classes, batch, device)

    if args.compare:
        settings = [(v, f) for f in formats for v in variants]
    else:
        settings = [(None, None)]
    print(f"fastres profile: {cfg.model.name}, loader {cfg.data.loader}, {cfg.run.precision}"
          f" ({math_} math), batch {batch}, optimizer {cfg.optim.name} ({cfg.optim.impl}), "
          f"preset {args.preset}")
    print(f"  {env_line(env)}")
    print(f"  data: {source}; {steps} timed steps per setting", flush=True)
    if any(VARIANTS[v][1] for v, _ in settings if v) or (not args.compare and
                                                         cfg.model.fused_kernels):
        if not on_gpu:
            print("  note: on a CPU the fused kernels run the plain-PyTorch reference (or "
                  "Triton's slow interpreter under TRITON_INTERPRET=1): their timings say "
                  "nothing about the GPU kernels", flush=True)

    results = []
    for variant, fmt_name in settings:
        vcfg = cfg
        if variant is not None:
            comp, fused = VARIANTS[variant]
            vcfg = C.replace(cfg, run={"compile": comp,
                                       "channels_last": fmt_name == "channels_last"},
                             model={"fused_kernels": fused})
        compiled = vcfg.run.compile == "on"
        warmup = args.warmup if args.warmup >= 0 else (10 if on_gpu else 1) + 2 * compiled
        name = variant or ("compile" if compiled else "eager") + \
            ("+fused" if vcfg.model.fused_kernels else "")
        m = measure(vcfg, images, labels, num_classes=num_classes, steps=steps, warmup=warmup,
                    flops=flops, peak=peak, nvtx=args.nvtx, trace_dir=args.trace,
                    trace_steps=args.trace_steps,
                    trace_name=f"{vcfg.model.name}-{name}-"
                               f"{'cl' if vcfg.run.channels_last else 'nchw'}")
        m["variant"] = name
        results.append(m)
        if args.compare:
            print(f"  measured {name}, {m['memory_format']}: {m['img_per_s']:,.0f} img/s",
                  flush=True)
        else:
            print(f"  {name}, {m['memory_format']}, fused kernels "
                  f"{'on' if vcfg.model.fused_kernels else 'off'}\n")
            print(report(m, math_))
    if args.compare:
        print()
        print(compare_table(results))
        print(f"\nratios: img/s against {results[0]['variant']} "
              f"({results[0]['memory_format']}), measured in this process"
              + ("" if on_gpu else "; peak mem on a CPU is the process's peak RSS so far, "
                 "not per setting"))
    if args.json:
        out = {"schema": SCHEMA, "tool": "fastres profile", "device": env["device"],
               "env": env, "config": C.to_dict(cfg), "data": source, "math": math_,
               "flops": flops, "peak": {"source": peak[0], "tflops": peak[1]} if peak
               else None, "results": results}
        print(f"\nwrote {write_json(args.json, out)}")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("profile", main))
