"""`fastres bench-kernels`: the fused BN-add-ReLU kernels and the fused optimizer step,
timed against the strongest PyTorch baselines on the same device.

    fastres bench-kernels                      # GPU: CIFAR ResNet shapes, fp32 + bf16
    fastres bench-kernels --json out.json      # also write every figure as JSON
    fastres bench-kernels --sweep              # GPU: time the candidate tile configs too
    fastres bench-kernels --quick              # tiny smoke run (what the tests use)

What is timed (training mode, channels-last, y = relu(batch_norm(x) + residual)):
  eager     F.batch_norm + add + relu, PyTorch's own kernels (cuDNN BN on GPUs)
  compile   torch.compile of that same function (Inductor fuses it into Triton kernels)
  fused     fastres.kernels.fused_bn_act (this project's Triton kernels)
for the forward pass, the backward pass alone (autograd.grad on a retained graph) and both.
Optimizer: torch.optim.SGD(fused=True) and SGD(foreach=True), fused SGD followed by a
foreach EMA (what a trainer with weight averaging runs today), and FusedSGD without and with
its one-pass EMA, on the parameter sets of ResNet-18 (CIFAR stem) and ResNet-20.

Timing: median of `triton.testing.do_bench` on GPUs (CUDA events, L2 flushed between
runs), median of wall-clock repeats on CPUs. On a CPU only the references run (eager and
compile; Triton kernels have no CPU backend -- the interpreter is for correctness, not
speed), with small shapes and few repeats, and the header says so.

Bytes moved (the floor, counted for the fused design; GB/s = these bytes / time, so for
eager and compile -- which move more -- it is an "effective" bandwidth on the same scale):
  M = N*H*W rows, C channels, s = element size, MC = M*C
  forward   read x (stats) + read x + read residual + write y          = 4 * MC * s
  backward  read dy, y, x + write dres  |  read dres, x + write dx      = 7 * MC * s
  both                                                                 = 11 * MC * s
  (per-channel partials and statistics, O(P*C), are ignored)
  optimizer, per parameter element (fp32): SGD with momentum reads p, g, buf and writes
  p, buf = 20 B; with the EMA also reads and writes ema = 28 B; fused SGD + a separate
  foreach EMA moves 20 + 12 (read ema, p; write ema) = 32 B.
Percent of peak uses the datasheet HBM bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s,
A100 2.0 TB/s) and, as the practical ceiling, a measured device-to-device copy.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Optional

import torch

GPU_SHAPES = [  # (N, C, H, W): CIFAR ResNet-20/56 stages, then ResNet-18-CIFAR stages
    (512, 16, 32, 32), (512, 32, 16, 16), (512, 64, 8, 8),
    (512, 64, 32, 32), (512, 128, 16, 16), (512, 256, 8, 8), (512, 512, 4, 4),
]
CPU_SHAPES = [(64, 16, 32, 32), (64, 64, 8, 8)]
QUICK_SHAPES = [(8, 16, 8, 8)]
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "fastres bench-kernels", add_help=add_help,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--shapes", default=None,
                   help="comma-separated NxCxHxW list (default: CIFAR ResNet shapes on GPU, "
                        "two small ones on CPU)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated: fp32, bf16, fp16 (default: fp32,bf16 on GPU; "
                        "fp32 on CPU, where bf16 is emulated)")
    p.add_argument("--act", default="relu", choices=("relu", "identity", "gelu"),
                   help="activation after the add (default relu)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-optimizer", action="store_true", help="skip the optimizer benchmark")
    p.add_argument("--sweep", action="store_true",
                   help="GPU: also time every candidate tile config (fastres.kernels.bn_act."
                        "candidate_configs) for fwd+bwd and report the best")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU: time CUDA-graph replays (triton.testing.do_bench_cudagraph), "
                        "which removes Python/launch overhead for every implementation alike: "
                        "kernel time only, but no L2 flush between repeats")
    p.add_argument("--reps", type=int, default=None,
                   help="CPU: timed repeats per figure (default 5; GPU uses do_bench's 100 ms)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch threads (default: torch's own; on a shared, loaded CPU "
                        "1 avoids OpenMP threads waiting on each other)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one tiny shape, fp32, no compile, ResNet-20 optimizer only")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    return p


# ------------------------------------------------------------------------------ helpers

def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from fastres.errors import ConfigError

        raise ConfigError("--device cuda asked for, but no CUDA device is available; "
                          "use --device cpu")
    return dev


def _parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    from fastres.errors import ConfigError

    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError(f"--shapes: {item!r} is not NxCxHxW (e.g. 512x64x32x32)")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse_dtypes(text: str) -> list[torch.dtype]:
    from fastres.errors import unknown_choice

    out = []
    for name in text.split(","):
        name = name.strip()
        if name not in _DTYPES:
            raise unknown_choice("dtype", name, _DTYPES)
        out.append(_DTYPES[name])
    return out


def _dtype_name(dt: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dt]


class Timer:
    """Median milliseconds of a callable on the given device."""

    def __init__(self, device: torch.device, reps: int, cuda_graphs: bool = False):
        self.device = device
        self.reps = reps
        self.cuda_graphs = cuda_graphs

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            import triton.testing

            with torch.cuda.device(self.device):
                if self.cuda_graphs:
                    return float(triton.testing.do_bench_cudagraph(fn, rep=100,
                                                                   return_mode="median"))
                return float(triton.testing.do_bench(fn, warmup=25, rep=100,
                                                     return_mode="median"))
        for _ in range(3):  # warm-up (and compilation, for compiled callables)
            fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def bn_act_bytes(shape, elem_size: int, residual: bool = True,
                 act: str = "relu") -> dict[str, int]:
    """Floor bytes per pass for the fused design, in units of one activation tensor
    (M*C*s); see the module docstring and fastres/kernels/bn_act.py."""
    n, c, h, w = shape
    tensor = n * c * h * w * elem_size
    r = 1 if residual else 0
    fwd = 3 + r                      # x, x, [res], y
    if act == "relu":                # reduce: dy, y, x, [dres]; dx: (dres | dy, y), x, dx
        bwd = 7
    elif residual:                   # identity: dy, x, dres | dres, x, dx (gelu: + res)
        bwd = 6 if act == "identity" else 7
    else:                            # dy, x | dy, x, dx
        bwd = 5
    return {"fwd": fwd * tensor, "bwd": bwd * tensor, "fwd+bwd": (fwd + bwd) * tensor}


def _peak_gbps(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_GBPS.items():
        if key in name:
            return value
    return None


def _copy_gbps(device: torch.device, timer: Timer) -> Optional[float]:
    """Device-to-device copy of 1 GiB, bytes read + written: the practical ceiling."""
    if device.type != "cuda":
        return None
    n = 2 ** 28  # fp32 elements = 1 GiB
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n * 4 / ms / 1e6


def _header(device: torch.device, copy_gbps, peak) -> dict:
    info = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"sm_{props.major}{props.minor}"
    info["peak_gbps"] = peak
    info["copy_gbps"] = copy_gbps
    return info


# ------------------------------------------------------------------------------ BN-act

def _allow_retained_backward() -> None:
    """The backward alone is timed on a retained graph, which AOTAutograd refuses when it
    donates saved buffers to the backward (a memory optimisation, not a speed one). This
    process-wide switch is set by the tool only, before anything is compiled."""
    try:
        from torch._functorch import config as functorch_config
    except ImportError:  # pragma: no cover
        return
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


def _bn_act_case(shape, dtype, device, act, timer, do_compile, sweep):
    from fastres.kernels import bn_act as K
    from fastres.kernels import fused_bn_act
    from fastres.kernels.reference import bn_act_reference

    n, c, h, w = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
    r = torch.randn(shape, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to(device, dtype).to(memory_format=torch.channels_last)
    x.requires_grad_()
    r.requires_grad_()
    weight = torch.ones(c, device=device, requires_grad=True)
    bias = torch.zeros(c, device=device, requires_grad=True)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    inputs = [x, r, weight, bias]

    def eager(x, r, weight, bias):
        return bn_act_reference(x, weight, bias, rm, rv, True, 0.1, 1e-5, r, act)

    def fused(x, r, weight, bias):
        return fused_bn_act(x, weight, bias, rm, rv, True, 0.1, 1e-5, r, act)

    impls = {"eager": eager}
    if do_compile:
        # Dynamo caches per code object, shared by every call of this function: without a
        # reset, the 8th shape/dtype would exceed its recompile limit and silently run eager.
        torch._dynamo.reset()
        impls["compile"] = torch.compile(eager, dynamic=False)
    if device.type == "cuda":
        impls["fused"] = fused

    out = {}
    for name, f in impls.items():
        y = f(*inputs)  # warm-up / compile
        torch.autograd.grad(y, inputs, dy)
        fwd = timer(lambda: f(*inputs))
        y = f(*inputs)
        bwd = timer(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True))
        both = timer(lambda: torch.autograd.grad(f(*inputs), inputs, dy))
        out[name] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}
        del y
    best = None
    if sweep and device.type == "cuda":
        results = []
        for cfg in K.candidate_configs(n * h * w, c, x.element_size(), device):
            with K.forced_config(cfg):
                torch.autograd.grad(fused(*inputs), inputs, dy)
                ms = timer(lambda: torch.autograd.grad(fused(*inputs), inputs, dy))
            results.append({"config": cfg.__dict__, "fwd+bwd": ms})
        best = min(results, key=lambda t: t["fwd+bwd"])
        out["sweep"] = results
    return out, best


def _print_bn_table(rows, peak, copy_gbps):
    cols = ["shape", "dtype", "pass", "eager ms", "compile ms", "fused ms", "GB/s",
            "%peak", "%copy", "x eager", "x compile"]
    print("  ".join(f"{c:>11}" if i > 2 else f"{c:<15}" if i == 0 else f"{c:<8}"
                    for i, c in enumerate(cols)))

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    for row in rows:
        t = row["ms"]
        for p in ("fwd", "bwd", "fwd+bwd"):
            e = t.get("eager", {}).get(p)
            cmp_ = t.get("compile", {}).get(p)
            f = t.get("fused", {}).get(p)
            ref = f if f is not None else (cmp_ if cmp_ is not None else e)
            gbps = row["bytes"][p] / ref / 1e6 if ref else None
            print("  ".join([
                f"{row['shape']:<15}", f"{row['dtype']:<8}", f"{p:<8}",
                f"{fmt(e, '.3f'):>11}", f"{fmt(cmp_, '.3f'):>11}", f"{fmt(f, '.3f'):>11}",
                f"{fmt(gbps, '.0f'):>11}",
                f"{fmt(gbps / peak * 100 if gbps and peak else None, '.0f'):>11}",
                f"{fmt(gbps / copy_gbps * 100 if gbps and copy_gbps else None, '.0f'):>11}",
                f"{fmt(e / f if e and f else None, '.2f'):>11}",
                f"{fmt(cmp_ / f if cmp_ and f else None, '.2f'):>11}"]))


# --------------------------------------------------------------------------- optimizer

def _param_set(name: str, device: torch.device) -> list[torch.Tensor]:
    try:
        from fastres.models import create_model

        model = create_model(name)
        return [p.detach().to(device) for p in model.parameters()]
    except Exception:  # the zoo is optional here: fall back to the layer shapes
        shapes = {"resnet20": [(16, 3, 3, 3)] + [(16, 16, 3, 3)] * 6 + [(32, 16, 3, 3)]
                  + [(32, 32, 3, 3)] * 5 + [(64, 32, 3, 3)] + [(64, 64, 3, 3)] * 5
                  + [(10, 64), (10,)],
                  "resnet18_cifar": [(64, 3, 3, 3)] + [(64, 64, 3, 3)] * 4
                  + [(128, 64, 3, 3)] + [(128, 128, 3, 3)] * 3
                  + [(256, 128, 3, 3)] + [(256, 256, 3, 3)] * 3
                  + [(512, 256, 3, 3)] + [(512, 512, 3, 3)] * 3 + [(10, 512), (10,)]}[name]
        return [torch.randn(s, device=device) for s in shapes]


def _optimizer_case(name: str, device: torch.device, timer: Timer):
    from fastres.kernels import FusedSGD, _env
    from fastres.kernels.reference import sgd_ema_reference_step

    base = _param_set(name, device)
    numel = sum(p.numel() for p in base)
    hp = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def fresh():
        ps = [torch.nn.Parameter(p.clone()) for p in base]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    results = {}
    ps = fresh()
    opt = torch.optim.SGD(ps, fused=True, **hp)
    results["SGD(fused=True)"] = (timer(opt.step), 20)
    ps = fresh()
    opt = torch.optim.SGD(ps, foreach=True, **hp)
    results["SGD(foreach=True)"] = (timer(opt.step), 20)
    ps = fresh()
    opt = torch.optim.SGD(ps, fused=True, **hp)
    emas = [p.detach().clone() for p in ps]
    live = [p.detach() for p in ps]

    def fused_then_ema():
        opt.step()
        torch._foreach_lerp_(emas, live, 0.001)

    results["SGD(fused) + foreach EMA"] = (timer(fused_then_ema), 32)
    if _env.use_triton(device) and device.type == "cuda":
        ps = fresh()
        opt = FusedSGD(ps, **hp)
        results["FusedSGD"] = (timer(opt.step), 20)
        ps = fresh()
        opt = FusedSGD(ps, **hp, ema_decay=0.999)
        results["FusedSGD + EMA (one pass)"] = (timer(opt.step), 28)
    else:
        ps = fresh()
        bufs = [torch.zeros_like(p) for p in ps]
        emas = [p.detach().clone() for p in ps]
        grads = [p.grad for p in ps]
        live = [p.detach() for p in ps]
        results["one-pass reference (foreach, CPU)"] = (timer(lambda: sgd_ema_reference_step(
            live, grads, bufs, emas, ema_decay=0.999, **hp)), 28)
    return numel, results


# -------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    device = _device(args.device)
    on_gpu = device.type == "cuda"
    if args.quick:
        shapes, dtypes, do_compile, opt_sets = QUICK_SHAPES, [torch.float32], False, ["resnet20"]
    else:
        shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
        dtypes = [torch.float32, torch.bfloat16] if on_gpu else [torch.float32]
        do_compile = not args.no_compile
        opt_sets = ["resnet18_cifar", "resnet20"]
    if args.shapes:
        shapes = _parse_shapes(args.shapes)
    if args.dtypes:
        dtypes = _parse_dtypes(args.dtypes)
    if args.no_optimizer:
        opt_sets = []
    if args.threads and not on_gpu:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    timer = Timer(device, reps, cuda_graphs=args.cuda_graphs and on_gpu)
    if on_gpu:
        # torch 2.11 rejects an index-less "cuda" device here (seen on the H200 machine).
        torch.cuda.set_device(torch.device(device).index or 0)
    if do_compile:
        _allow_retained_backward()
    peak = _peak_gbps(device)
    copy_gbps = _copy_gbps(device, timer)
    header = _header(device, copy_gbps, peak)
    print(f"device: {header['device']} | torch {header['torch']} | triton {header['triton']}"
          f" | python {header['python']}")
    header["timing"] = ("do_bench_cudagraph median (graph replays; no L2 flush)"
                        if timer.cuda_graphs else
                        "do_bench median (CUDA events, L2 flushed)" if on_gpu else
                        f"wall-clock median of {reps}")
    if on_gpu:
        print(f"peak HBM: {peak or 'unknown'} GB/s (datasheet) | device-to-device copy: "
              f"{copy_gbps:.0f} GB/s (measured, read + write) | {header['sm_count']} SMs | "
              f"timing: {header['timing']}")
    else:
        print("CPU: references only (eager vs torch.compile); the Triton kernels need a GPU "
              "(the interpreter is for correctness). Timings are wall-clock medians of "
              f"{reps} repeats.")
    fb = bn_act_bytes((1, 1, 1, 1), 1, True, args.act)
    print(f"\nBN + add + {args.act}, training mode, channels-last; GB/s = floor bytes "
          f"(fwd {fb['fwd']}*MC*s, bwd {fb['bwd']}*MC*s) / time of the fused kernels (of "
          f"compile, else eager, where fused did not run); x eager / x compile = speed-up "
          f"of fused")
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            ms, best = _bn_act_case(shape, dtype, device, args.act, timer, do_compile,
                                    args.sweep)
            row = {"shape": "x".join(map(str, shape)), "dtype": _dtype_name(dtype),
                   "bytes": bn_act_bytes(shape, torch.empty(0, dtype=dtype).element_size(),
                                         True, args.act),
                   "ms": ms}
            if best is not None:
                row["best_config"] = best
            rows.append(row)
    _print_bn_table(rows, peak, copy_gbps)
    for row in rows:
        if "best_config" in row:
            print(f"sweep {row['shape']} {row['dtype']}: best {row['best_config']['config']} "
                  f"{row['best_config']['fwd+bwd']:.3f} ms fwd+bwd")

    opt_rows = []
    if opt_sets:
        print("\noptimizer step (momentum 0.9, Nesterov, wd 5e-4; fp32 params); GB/s from "
              "20 B/param (SGD), 28 B (one-pass SGD+EMA), 32 B (SGD then EMA)")
        print(f"{'params':<24}{'optimizer':<36}{'ms':>9}{'GB/s':>9}")
        for name in opt_sets:
            numel, results = _optimizer_case(name, device, timer)
            for label, (ms, bpe) in results.items():
                gbps = numel * bpe / ms / 1e6
                print(f"{name + f' ({numel / 1e6:.2f}M)':<24}{label:<36}{ms:>9.3f}{gbps:>9.0f}")
                opt_rows.append({"params": name, "numel": numel, "optimizer": label, "ms": ms,
                                 "bytes_per_param": bpe, "gbps": gbps})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "act": args.act, "bn_act": rows,
                       "optimizer": opt_rows}, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("bench-kernels", main))
