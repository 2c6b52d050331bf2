"""`fastres bench-loaders`: how fast each data loader is, against what the trainer eats.

    fastres bench-loaders                                # synthetic data, every loader
    fastres bench-loaders --data-dir data --json out.json
    fastres bench-loaders --loaders tensor,torch --batch-sizes 512 --torch-workers 0,2

For each available loader (tensor, dali, torch at each --torch-workers count) and batch
size: images per second of the loader alone (no model; the median of --repeats timed runs
of --batches batches each, after --warmup batches; on a GPU the clock is read after a
synchronize). Then the trainer's own consumption rate: a plain training step (forward,
backward, fused SGD) of --model on random data in the loader's dtype, channels-last, the
median of --repeats runs of --train-steps steps, timed with CUDA events on a GPU. Printed
side by side: loader img/s / trainer img/s (how many trainers one loader could feed) and
loader img/s / torch-DataLoader(workers=0) img/s (the torchvision-transforms path).

--model takes several models (comma-separated): one "/ MODEL" column each. On a GPU the
legend's target model, resnet18_cifar, is always among them, so the target is reported
whatever --model says (`--model airbench94` gives "/ airbench94" and "/ resnet18_cifar").

On a GPU (or with --steal) also the time each loader adds to a training step of the first
model: steps that pull their batch from the loader, minus steps on one fixed batch, per
step. On a GPU this is the GPU time and host time the loader takes from training; on a CPU
it is the loader's cost. For DALI the host time per batch is split into feed (gather +
feed_input), schedule, wait (for DALI's outputs) and copy, and the feed path is printed
(on a GPU: the images go from device memory to a GPU external source, no host copy).

`--host`: only the tensor loader's host cost per batch, each batch augmented on its own
(augment_batches=1, the path before issue 19) against the pre-augmented epoch (the
default), alternating in one process: on the meta device (shape-only tensors: the Python,
dispatcher and allocation work a GPU's host does, without arithmetic or CUDA launches;
the GPU's code path, with the store normalised up front) and on --device. Per mode: the
epoch's host time per batch (plan and first batch included) and the median next(), both
medians over --repeats epochs, and aten ops per batch (on a GPU, one kernel launch each).

Loader timings include everything a training loop pays: epoch boundaries (the next epoch's
plan) fall inside the timed runs whenever a repeat crosses one.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import time

from fastres.tools._common import int_at_least

DEFAULT_SEED = 0
# The model of the legend's target (">= 10x ... with resnet18_cifar"): always timed on a GPU.
TARGET_MODEL = "resnet18_cifar"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres bench-loaders",
        description="Throughput of the tensor, DALI and torch loaders (images/s, no model) "
                    "against the training step's consumption rate.")
    p.add_argument("--loaders", default="tensor,dali,torch",
                   help="comma-separated loaders to time (unavailable ones are reported and "
                        "skipped); default: tensor,dali,torch")
    p.add_argument("--batch-sizes", default="512,2000", help="comma-separated per-rank batch "
                   "sizes (default 512,2000)")
    p.add_argument("--torch-workers", default="auto", help="comma-separated worker counts for "
                   "the torch loader (auto: 0,2 on CPU, 4,8 on GPU)")
    p.add_argument("--dali-threads", type=int_at_least(0), default=0,
                   help="DALI CPU threads (0 = the machine's CPU count, at most 8)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="loader output / training dtype (auto: bf16 on GPU, fp32 on CPU)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--synthetic", type=int_at_least(0), default=0, metavar="N",
                     help="N random uint8 32x32 images (the default source; default N: "
                          "50000 on GPU, 10000 on CPU)")
    src.add_argument("--data-dir", default="", metavar="D",
                     help="benchmark on the training set of a CIFAR folder instead")
    p.add_argument("--dataset", default="cifar10", help="with --data-dir: cifar10 or cifar100")
    aug = p.add_argument_group("augmentation (the same for every loader)")
    aug.add_argument("--crop", default="pad_crop", help="pad_crop, translate or none")
    aug.add_argument("--pad", type=int_at_least(0), default=4, help="padding / maximum shift (pixels)")
    aug.add_argument("--pad-mode", default="reflect", help="reflect or zeros")
    aug.add_argument("--flip", default="random", help="random, alternate or none")
    aug.add_argument("--cutout", type=int_at_least(0), default=0, help="cutout square side (0 = off)")
    t = p.add_argument_group("timing")
    t.add_argument("--repeats", type=int_at_least(0), default=0,
                   help="timed runs per measurement, median reported (0 = auto: 3 on CPU, 5 "
                        "on GPU)")
    t.add_argument("--batches", type=int_at_least(0), default=0,
                   help="batches per timed loader run (0 = auto: enough for ~2k images on "
                        "CPU, ~16k on GPU, at least 2)")
    t.add_argument("--warmup", type=int_at_least(0), default=0,
                   help="untimed batches/steps first (0 = auto: 1 on CPU, 5 on GPU)")
    m = p.add_argument_group("trainer")
    m.add_argument("--model", default="auto",
                   help="comma-separated models whose training steps set the consumption "
                        "rate (auto: resnet18_cifar on GPU, resnet20 on CPU; on a GPU "
                        f"{TARGET_MODEL} is always added); 'none' skips them")
    m.add_argument("--train-steps", type=int_at_least(0), default=0,
                   help="training steps per timed run (0 = auto: 1 on CPU, 20 on GPU)")
    m.add_argument("--compile", action="store_true", help="torch.compile the model first")
    m.add_argument("--steal", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the time each loader adds to a training step (default: on "
                        "GPU only; slow on a CPU)")
    p.add_argument("--threads", type=int_at_least(0), default=0,
                   help="torch intra-op threads (0 = torch's default); the tensor loader's "
                        "CPU ops and the trainer use them")
    p.add_argument("--host", action="store_true",
                   help="only the tensor loader's host cost per batch: per-batch against "
                        "pre-augmented epochs, on the meta device and on --device")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="data and shuffle seed")
    p.add_argument("--json", default="", metavar="OUT", help="also write the results as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="--json FILE exists: move it to NAME.old-<time>.json first (nothing is "
                        "deleted); without it an existing file is refused")
    return p


# --------------------------------------------------------------------------- helpers

def _csv_ints(text: str, what: str) -> list[int]:
    from fastres.errors import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{what}: expected comma-separated whole numbers, got {text!r}")
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"--{what}: expected non-negative whole numbers, got {text!r}")
    return values


def _sync(device) -> None:
    from fastres.bench import sync

    sync(device)


def time_loader(loader, *, batches: int, repeats: int, warmup: int, device) -> list[float]:
    """Images/s of `repeats` runs of `batches` batches each, after `warmup` batches."""
    from fastres.pipelines import endless

    it = endless(loader)
    for _ in range(warmup):
        next(it)
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            x, _ = next(it)
            n += len(x)
        _sync(device)                         # the device work of the last batch included
        rates.append(n / (time.perf_counter() - t0))
    return rates


def _count_ops(fn) -> int:
    """aten ops dispatched while fn() runs (on a GPU each one is a kernel launch, or a
    view that launches nothing: an upper bound on launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def host_cost(loader, *, repeats: int) -> dict:
    """Host time per batch of a TensorLoader, each batch augmented on its own
    (augment_batches=1) against its default chunks, alternating mode by mode over
    `repeats` epochs (one more, untimed, first). No device sync: on a GPU this is the
    host's time, which is what a launch-bound step waits for."""
    modes = {"per batch": 1, "pre-augmented": None}
    epoch_s = {m: [] for m in modes}
    nexts = {m: [] for m in modes}
    saved = loader.augment_batches
    try:
        for r in range(repeats + 1):
            for mode, k in modes.items():
                loader.augment_batches = k
                loader.set_epoch(r)
                each = []
                t0 = time.perf_counter()
                it = iter(loader)
                while True:
                    t = time.perf_counter()
                    try:
                        next(it)
                    except StopIteration:
                        break
                    each.append(time.perf_counter() - t)
                total = time.perf_counter() - t0
                if r:
                    epoch_s[mode].append(total / len(loader))
                    nexts[mode].extend(each)
        ops = {}
        for mode, k in modes.items():
            loader.augment_batches = k
            loader.set_epoch(0)
            ops[mode] = _count_ops(lambda: [None for _ in loader]) / len(loader)
    finally:
        loader.augment_batches = saved
    out = {m: {"epoch_us_per_batch": 1e6 * statistics.median(epoch_s[m]),
               "epoch_us_per_batch_min": 1e6 * min(epoch_s[m]),
               "median_next_us": 1e6 * statistics.median(nexts[m]),
               "aten_ops_per_batch": ops[m],
               "epoch_us_per_batch_runs": [1e6 * v for v in epoch_s[m]]} for m in modes}
    a, b = out["per batch"], out["pre-augmented"]
    out["ratio_epoch"] = a["epoch_us_per_batch"] / b["epoch_us_per_batch"]
    out["ratio_next"] = a["median_next_us"] / b["median_next_us"]
    return out


def _print_host(label: str, h: dict) -> None:
    for mode in ("per batch", "pre-augmented"):
        m = h[mode]
        print(f"  {label:<5} {mode:<14} {m['epoch_us_per_batch']:>9.1f} us/batch over the "
              f"epoch (min {m['epoch_us_per_batch_min']:.1f}), median next() "
              f"{m['median_next_us']:>8.1f} us, {m['aten_ops_per_batch']:>5.2f} aten ops/batch")
    print(f"  {label:<5} per batch / pre-augmented: {h['ratio_epoch']:.1f}x over the epoch, "
          f"{h['ratio_next']:.1f}x the median next()")


class Trainer:
    """The trainer's own step on `name` (a `fastres.engine.Session` of the resnet-paper
    recipe: SGD with momentum, cross-entropy; the model's data-dependent init done), in
    `dtype`, channels-last, timed on given batches."""

    def __init__(self, name: str, device, dtype, compile_model: bool):
        import numpy as np

        from fastres import config as C
        from fastres.engine import Session, build_model
        from fastres.engine.amp import precision_name
        from fastres.engine.build import loader_options
        from fastres.pipelines import build_loader

        precision = precision_name(dtype)
        cfg = C.replace(C.preset("resnet-paper"), model={"name": name},
                        run={"device": str(device), "precision": precision,
                             "compile": "on" if compile_model else "off", "progress": "none"})
        cfg = C.resolve(cfg, str(device))
        # The Session's own loader only sets the epoch length and feeds the model's
        # data-dependent init; the timed batches are handed to `time_steps`.
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(1024, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=1024, dtype=np.int64)
        loader = build_loader("tensor", images, labels, loader_options(cfg))
        self.device = device
        self.session = Session(cfg, build_model(cfg, 10), loader)
        self.model, self.step = self.session.model, self.session.step

    def time_steps(self, batches, steps: int) -> float:
        """Seconds per step over `steps` steps, batches from the callable `batches`."""
        from fastres.bench import time_fn

        return time_fn(lambda: self.step(*batches()), device=self.device, repeats=1,
                       warmup=0, inner=steps).median_s


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:,.1f}k" if v >= 1e4 else f"{v:,.0f}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else (f"{v:,.0f}x" if v >= 100 else f"{v:,.1f}x")


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.json:  # checked (and claimed) before any work: the output contract
        from fastres.tools._common import claim_output_file

        args.json = str(claim_output_file(args.json, overwrite=args.overwrite))

    import numpy as np
    import torch

    from fastres.errors import ConfigError, unknown_choice
    from fastres.pipelines import LOADERS, Augment, LoaderOptions, build_loader, endless
    from fastres.pipelines.base import check_augment
    from fastres.pipelines.dali import dali_available
    from fastres.bench import environment
    from fastres.engine.amp import precision_dtype
    from fastres.tools._common import device_arg

    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_arg(args.device)
    gpu = device.type == "cuda"
    dtype = precision_dtype(args.dtype, device)
    batch_sizes = _csv_ints(args.batch_sizes, "batch-sizes")
    if 0 in batch_sizes:
        raise ConfigError("--batch-sizes: batch sizes must be positive")
    torch_workers = _csv_ints(args.torch_workers if args.torch_workers != "auto"
                              else ("4,8" if gpu else "0,2"), "torch-workers")
    names = [n.strip() for n in args.loaders.split(",") if n.strip()]
    for n in names:
        if n not in LOADERS:
            raise unknown_choice("loader", n, LOADERS)
    repeats = args.repeats or (5 if gpu else 3)
    warmup = args.warmup or (5 if gpu else 1)
    train_steps = args.train_steps or (20 if gpu else 1)
    steal = gpu if args.steal is None else args.steal
    if args.model == "none":
        models = []
    else:
        models = ([m.strip() for m in args.model.split(",") if m.strip()]
                  if args.model != "auto" else [TARGET_MODEL if gpu else "resnet20"])
        if not models:
            raise ConfigError("--model: name at least one model, or none")
        from fastres.models import check_model

        for m in models:  # a typo: refused now, not after the loaders were timed
            check_model(m)
        if gpu and TARGET_MODEL not in models:
            models.append(TARGET_MODEL)            # the legend's target, always reported
    dali_threads = args.dali_threads or min(8, os.cpu_count() or 1)

    # ---- data
    if args.data_dir:
        from fastres.data import load_cifar

        data = load_cifar(args.data_dir, args.dataset)
        images, labels = data.train.images, data.train.labels
        source = f"{args.dataset} training set from {args.data_dir} ({len(labels)} images)"
    else:
        n = args.synthetic or (50000 if gpu else 10000)
        rng = np.random.default_rng(args.seed)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.int64)
        source = f"synthetic: {n} random 32x32x3 uint8 images"
    augment = Augment(crop=args.crop, pad=args.pad, pad_mode=args.pad_mode, flip=args.flip,
                      cutout=args.cutout)
    check_augment(augment, images.shape[1:3])

    env = environment(device)
    print(f"device: {env['device']}" + (f" (CUDA {env['cuda']})" if gpu else ""))
    print(f"torch {env['torch']}, torchvision {env['torchvision']}, DALI {env['dali'] or '-'}, "
          f"numpy {env['numpy']}, Python {env['python']}; {env['cpu_count']} CPUs, "
          f"{env['torch_threads']} torch threads")
    print(f"data: {source}; dtype {str(dtype).replace('torch.', '')}; augment: {augment}")
    if args.host:
        return _main_host(args, images, labels, augment, device, dtype, batch_sizes,
                          repeats, env, source)
    print(f"timing: median of {repeats} runs after {warmup} warm-up batches")

    # ---- which loaders
    runs = []      # (label, name, workers)
    skipped = {}
    for n in names:
        if n == "dali" and not dali_available():
            skipped["dali"] = "nvidia.dali is not importable (pip install 'fastres[dali]')"
            continue
        if n == "torch":
            runs += [(f"torch w{w}", n, w) for w in torch_workers]
        else:
            runs.append((n if n == "tensor" else f"dali t{dali_threads}", n,
                         dali_threads if n == "dali" else 0))
    for n, why in skipped.items():
        print(f"skipping {n}: {why}")

    results = {"environment": env, "device": str(device), "dtype": str(dtype),
               "data": source, "augment": dataclasses.asdict(augment), "repeats": repeats,
               "warmup": warmup,
               "loaders": [], "trainer": [], "steal": [], "skipped": skipped}

    options = LoaderOptions.for_dataset(args.dataset if args.data_dir else "cifar10",
                                        batch_size=batch_sizes[0], train=True, device=device,
                                        dtype=dtype, augment=augment, seed=args.seed)

    def make(name, workers, batch):
        return build_loader(name, images, labels, options, batch_size=batch, workers=workers)

    # ---- loaders alone
    loader_rates = {}
    for batch in batch_sizes:
        if len(labels) < batch * 2:
            raise ConfigError(f"{len(labels)} images are fewer than two batches of {batch}; "
                              f"use more --synthetic images or smaller --batch-sizes")
        nb = args.batches or max(2, math.ceil((16384 if gpu else 2048) / batch))
        for label, name, workers in runs:
            t0 = time.perf_counter()
            loader = make(name, workers, batch)
            setup = time.perf_counter() - t0
            rates = time_loader(loader, batches=nb, repeats=repeats, warmup=warmup,
                                device=device)
            med = statistics.median(rates)
            loader_rates[(label, batch)] = med
            results["loaders"].append({"loader": label, "name": name, "workers": workers,
                                       "batch_size": batch, "img_s": med, "img_s_runs": rates,
                                       "batches_per_run": nb, "setup_s": setup})
            print(f"  {label:<10} batch {batch:>5}: {_fmt_rate(med):>8} img/s  "
                  f"(runs {_fmt_rate(min(rates))}-{_fmt_rate(max(rates))}, setup {setup:.2f} s)",
                  flush=True)
            if name == "dali":
                t = dict(loader.timings)
                nbat = max(1, t.pop("batches"))
                split = {k: 1e6 * v / nbat for k, v in t.items()}
                results["loaders"][-1].update(feed_path=loader.feed_path,
                                              host_us_per_batch=split)
                print(f"    {loader.feed_path}")
                print("    host per batch: " + ", ".join(f"{k} {v:,.0f} us"
                                                        for k, v in split.items()))
            del loader
            gc.collect()          # a dropped loader's workers and memory go now, not mid-run

    # ---- the trainers: one consumption rate per model and batch size
    trainers = {}
    trainer_rates = {}                     # (model, batch) -> img/s
    for model_name in models:
        try:
            trainers[model_name] = Trainer(model_name, device, dtype, args.compile)
        except ImportError as e:
            print(f"trainer rate skipped: fastres.models is not importable yet ({e})")
            break
    for model_name, trainer in trainers.items():
        for batch in batch_sizes:
            x = torch.randn(batch, 3, 32, 32, device=device).to(
                dtype=dtype, memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,), device=device)
            for _ in range(warmup):
                trainer.step(x, y)
            times = [trainer.time_steps(lambda: (x, y), train_steps) for _ in range(repeats)]
            rate = batch / statistics.median(times)
            trainer_rates[(model_name, batch)] = rate
            results["trainer"].append({"model": model_name, "batch_size": batch, "img_s": rate,
                                       "step_s_runs": times, "steps_per_run": train_steps,
                                       "compiled": args.compile})
            print(f"  trainer {model_name} batch {batch:>5}: {_fmt_rate(rate):>8} img/s "
                  f"({statistics.median(times) * 1e3:.1f} ms/step)", flush=True)

    # ---- time each loader adds to a training step (of the first model)
    trainer = next(iter(trainers.values()), None)
    if trainer is not None and steal:
        for batch in batch_sizes:
            for label, name, workers in runs:
                loader = make(name, workers, batch)
                it = endless(loader)
                for _ in range(warmup):
                    trainer.step(*next(it))
                fixed = next(it)
                with_loader, without = [], []
                for _ in range(repeats):
                    without.append(trainer.time_steps(lambda: fixed, train_steps))
                    with_loader.append(trainer.time_steps(lambda: next(it), train_steps))
                added = statistics.median(with_loader) - statistics.median(without)
                step = statistics.median(without)
                results["steal"].append({"loader": label, "batch_size": batch,
                                         "model": models[0],
                                         "step_s": step, "added_s_per_step": added,
                                         "step_s_runs": without,
                                         "step_with_loader_s_runs": with_loader})
                print(f"  {label:<10} batch {batch:>5}: adds {added * 1e3:+.2f} ms to a "
                      f"{step * 1e3:.1f} ms {models[0]} step ({added / step:+.1%})", flush=True)
                del loader, it
                gc.collect()

    # ---- the table
    timed = list(trainers)
    print()
    head = (f"{'loader':<10} {'batch':>6} {'img/s':>9}"
            + "".join(f" {'/ ' + m:>{max(10, len(m) + 3)}}" for m in timed)
            + f" {'/ torch w0':>11}")
    print(head)
    print("-" * len(head))
    for r in results["loaders"]:
        b = r["batch_size"]
        base = loader_rates.get(("torch w0", b))
        ratios = {m: (r["img_s"] / trainer_rates[(m, b)] if (m, b) in trainer_rates else None)
                  for m in timed}
        r["ratio_vs_trainers"] = ratios
        r["ratio_vs_trainer"] = ratios[timed[0]] if timed else None
        r["ratio_vs_torch_w0"] = r["img_s"] / base if base else None
        print(f"{r['loader']:<10} {b:>6} {_fmt_rate(r['img_s']):>9}"
              + "".join(f" {_fmt_ratio(ratios[m]):>{max(10, len(m) + 3)}}" for m in timed)
              + f" {_fmt_ratio(r['ratio_vs_torch_w0']):>11}")
    for (m, b), rate in trainer_rates.items():
        print(f"{'trainer':<10} {b:>6} {_fmt_rate(rate):>9}   ({m}, TrainStep, "
              f"{str(dtype).replace('torch.', '')})")
    if trainer_rates:
        print("/ MODEL: how many training processes of MODEL the loader could feed (target on "
              f"a GPU: >= 10x for tensor and dali with {TARGET_MODEL})")
    if any(("torch w0", b) in loader_rates for b in batch_sizes):
        print("/ torch w0: against torchvision transforms in the training process "
              "(target on a CPU: tensor >= 20x)")
    if any(r["name"] == "dali" for r in results["loaders"]) and not gpu:
        print("DALI's GPU path (images fed from GPU memory, GPU operators) is not exercised "
              "on this machine: its img/s needs a CUDA device")

    if args.json:
        from fastres.tools._common import write_json

        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def _main_host(args, images, labels, augment, device, dtype, batch_sizes, repeats, env,
               source) -> int:
    """`--host`: the tensor loader's per-batch host cost, before and after pre-augmenting."""
    from fastres.pipelines import LoaderOptions, build_loader

    devices = ["meta"] + ([str(device)] if device.type != "meta" else [])
    print(f"timing: host clock, no device sync; median of {repeats} epochs per mode, the "
          f"two modes alternating")
    print("meta: the GPU code path (store normalised up front) with shape-only tensors: the "
          "Python, dispatcher and allocation work of the host, no arithmetic, no launches")
    results = {"environment": env, "device": str(device), "dtype": str(dtype), "data": source,
               "augment": dataclasses.asdict(augment), "repeats": repeats, "host": []}
    options = LoaderOptions.for_dataset(args.dataset if args.data_dir else "cifar10",
                                        batch_size=batch_sizes[0], train=True, device=device,
                                        dtype=dtype, augment=augment, seed=args.seed)
    for batch in batch_sizes:
        print(f"batch {batch} ({len(labels) // batch} batches an epoch):")
        for dev in devices:
            loader = build_loader("tensor", images, labels, options, batch_size=batch,
                                  device=dev)
            h = host_cost(loader, repeats=repeats)
            _print_host(dev, h)
            results["host"].append({"device": dev, "batch_size": batch, **h})
            del loader
            gc.collect()
    if args.json:
        from fastres.tools._common import write_json

        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("bench-loaders", main))
