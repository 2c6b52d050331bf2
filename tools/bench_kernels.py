"""`fastres bench-kernels`: the fused BN-add-act kernels and the fused optimizer step,
timed against the strongest PyTorch baselines on the same device; their host cost; and the
decisive GPU correctness experiment.

    fastres bench-kernels                      # GPU: CIFAR ResNet shapes, fp32 + bf16
    fastres bench-kernels --json out.json      # also write every figure as JSON
    fastres bench-kernels --host               # Python host cost, launches stubbed (any machine)
    fastres bench-kernels --decisive           # GPU: relu-fp32 512x64x8x8 vs an fp64 truth
    fastres bench-kernels --sweep              # GPU: time the candidate tile configs too
    fastres bench-kernels --quick              # GPU: the decisive figures in <= 45 s
    fastres bench-kernels --quick --dry-run    # the same at reduced sizes (any device)

What is timed (training mode, channels-last, y = act(batch_norm(x) + residual)):
  eager     F.batch_norm + add + act, PyTorch's own kernels (cuDNN BN on GPUs)
  compile   torch.compile of that same function (Inductor fuses it into Triton kernels)
  fused     fastres.kernels.fused_bn_act (this project's Triton kernels)
for the forward pass, the backward pass alone (autograd.grad on a retained graph) and both.
Optimizer: torch.optim.SGD(fused=True) and SGD(foreach=True), fused SGD followed by a
foreach EMA (what a trainer with weight averaging runs today), and FusedSGD without and with
its one-pass EMA, on the parameter sets of ResNet-18 (CIFAR stem) and ResNet-20.

Timing: `fastres.bench.time_fn` (CUDA events on a GPU, a clock on a CPU; medians). The GPU
kernel tables use `triton.testing.do_bench` instead, because it flushes the L2 cache
between repetitions: the CIFAR activations (30-70 MB) are the size of an H100/H200's L2,
and timing them warm would report L2 bandwidth, not the DRAM bandwidth the floor is
counted in. On a CPU only the references run (the interpreter is for correctness).

Bytes: "11-pass" counts one activation tensor (M*C*s bytes) per pass of the v1 design
(forward 4: x, x, residual, y; backward 7) -- the yardstick of the issue's target (>= 85%
of the datasheet bandwidth counted on these bytes). "v2" counts what the v2 kernels move:
forward (3 + r) s + 1/8 (the 1-bit ReLU mask), backward relu + res 6 s + 2/8.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from typing import Callable, Optional

import torch

from fastres._compat import foreach, reset_compiler
from fastres.tools._common import float_at_least, int_at_least, kill_group

GPU_SHAPES = [  # (N, C, H, W): CIFAR ResNet-20/56 stages, then ResNet-18-CIFAR stages
    (512, 16, 32, 32), (512, 32, 16, 16), (512, 64, 8, 8),
    (512, 64, 32, 32), (512, 128, 16, 16), (512, 256, 8, 8), (512, 512, 4, 4),
]
CPU_SHAPES = [(64, 16, 32, 32), (64, 64, 8, 8)]
HOST_SHAPE_GPU = (512, 64, 32, 32)
HOST_SHAPE_CPU = (4, 64, 8, 8)   # 64 KB: under glibc's mmap threshold (a GPU-sized tensor,
                                 # or even 128 KB, would time mmap/munmap calls, not fastres)
DECISIVE_SHAPE = (512, 64, 8, 8)
HOST_TARGETS_US = {"fwd+bwd": 40.0, "fused_sgd": 20.0}


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
    p.add_argument("--act", default="relu", choices=("relu", "identity", "gelu", "silu"),
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
    p.add_argument("--host", action="store_true",
                   help="only the Python host cost of the fused BN-act (one forward, one "
                        "forward+backward) and of a FusedSGD step, kernel launches stubbed: "
                        "runs on any machine")
    p.add_argument("--decisive", action="store_true",
                   help="only the decisive experiment (GPU): relu-fp32 512x64x8x8, fused and "
                        "cuDNN each against an fp64 CPU truth, reruns, variants, and "
                        "compute-sanitizer when installed")
    p.add_argument("--sanitizer-timeout", type=float, default=120.0,
                   help="--decisive: seconds for the compute-sanitizer run (0 skips it)")
    p.add_argument("--decisive-once", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int_at_least(1), default=None,
                   help="timed repeats per figure (CPU default 5; --host default 300 samples "
                        "of 2 calls; GPU kernel tables use do_bench's 100 ms)")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU: torch threads (default: torch's own; on a shared, loaded CPU "
                        "1 avoids OpenMP threads waiting on each other)")
    p.add_argument("--quick", action="store_true",
                   help="the decisive speed figures within --budget seconds: BN+add+ReLU bf16 "
                        "at 512x64x32x32, 512x128x16x16, 512x256x8x8; BN+GELU as in the "
                        "speed-run net; FusedSGD+EMA on resnet18_cifar's and airbench94's "
                        "parameters; each against eager and torch.compile (or SGD(fused) + "
                        "a foreach EMA). On a CPU: the same at reduced sizes (--dry-run). "
                        "With --host: fewer samples")
    p.add_argument("--dry-run", action="store_true",
                   help="--quick at reduced sizes (batch 2, <= 4x4; parameters cut to 4,096 "
                        "elements each) and one repeat, on any device: the code path end to "
                        "end, no speed figure")
    p.add_argument("--budget", type=float_at_least(0), default=None,
                   help=f"--quick: seconds after which no new case starts (default "
                        f"{QUICK_BUDGET_S:.0f})")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    p.add_argument("--overwrite", action="store_true",
                   help="--json FILE exists: move it to NAME.old-<time>.json first (nothing is "
                        "deleted); without it an existing file is refused")
    return p


# ------------------------------------------------------------------------------ helpers

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


class _Timer:
    """Median milliseconds of a callable: do_bench on a GPU (L2 flushed between repeats;
    see the module docstring), fastres.bench.time_fn on a CPU."""

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
        from fastres.bench import time_fn

        return time_fn(fn, device=self.device, repeats=self.reps, warmup=3).median_ms


def bn_act_bytes(shape, elem_size: int, residual: bool = True, act: str = "relu",
                 design: str = "v2") -> dict[str, int]:
    """Bytes moved per pass (training) by the fused design; see the module docstring and
    fastres/kernels/bn_act.py. design="v1" gives the 11-pass yardstick (relu + residual)."""
    n, c, h, w = shape
    mc = n * c * h * w
    s = elem_size
    r = 1 if residual else 0
    if design == "v1":
        fwd = (3 + r) * s
        if act == "relu":
            bwd = 7 * s
        elif residual:
            bwd = (6 if act == "identity" else 7) * s
        else:
            bwd = 5 * s
        return {"fwd": fwd * mc, "bwd": bwd * mc, "fwd+bwd": (fwd + bwd) * mc}
    mask = 1 / 8 if act == "relu" else 0.0
    fwd = (3 + r) * s + mask
    if act == "relu":
        bwd = (2 * s + mask + r * s) + (3 * s + mask)      # reduce | dx
    elif act == "identity":
        bwd = (2 * s + r * s) + 3 * s
    else:  # gelu, silu: z rebuilt from the residual in both passes (dz read back only
        # from fp32)
        bwd = (2 * s + 2 * r * s) + (3 * s + (0 if s == 4 and r else r * s))
    return {"fwd": int(fwd * mc), "bwd": int(bwd * mc), "fwd+bwd": int((fwd + bwd) * mc)}


# ------------------------------------------------------------------------------ BN-act

def _allow_retained_backward() -> None:
    from fastres._compat import allow_retained_backward

    allow_retained_backward()


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
        reset_compiler()
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
        y = None  # the retained graph goes before the next implementation
    best = None
    if sweep and device.type == "cuda":
        results = []
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        for cfg in K.candidate_configs(n * h * w, c, x.element_size(), sms):
            with K.forced_config(cfg):
                torch.autograd.grad(fused(*inputs), inputs, dy)
                ms = timer(lambda: torch.autograd.grad(fused(*inputs), inputs, dy))
            results.append({"config": cfg.__dict__, "fwd+bwd": ms})
        best = min(results, key=lambda t: t["fwd+bwd"])
        out["sweep"] = results
    return out, best


def _print_bn_table(rows, peak, copy_gbps):
    cols = ["shape", "dtype", "pass", "eager ms", "compile ms", "fused ms", "GB/s 11p",
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
            gbps = row["bytes_v1"][p] / ref / 1e6 if ref else None
            print("  ".join([
                f"{row['shape']:<15}", f"{row['dtype']:<8}", f"{p:<8}",
                f"{fmt(e, '.3f'):>11}", f"{fmt(cmp_, '.3f'):>11}", f"{fmt(f, '.3f'):>11}",
                f"{fmt(gbps, '.0f'):>11}",
                f"{fmt(gbps / peak * 100 if gbps and peak else None, '.0f'):>11}",
                f"{fmt(gbps / copy_gbps * 100 if gbps and copy_gbps else None, '.0f'):>11}",
                f"{fmt(e / f if e and f else None, '.2f'):>11}",
                f"{fmt(cmp_ / f if cmp_ and f else None, '.2f'):>11}"]))


# --------------------------------------------------------------------------- optimizer

SGD_HP = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)  # every SGD case's


def _param_set(name: str, device: torch.device) -> list[torch.Tensor]:
    from fastres.models import create_model

    model = create_model(name)
    return [p.detach().to(device) for p in model.parameters()]


def _fresh(base: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Trainable copies of `base`, each with a random gradient: every optimizer timed from
    the same starting point."""
    ps = [torch.nn.Parameter(p.clone()) for p in base]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def _optimizer_case(name: str, device: torch.device, timer: _Timer):
    from fastres.kernels import FusedSGD, _env
    from fastres.kernels.reference import sgd_ema_reference_step

    base = _param_set(name, device)
    numel = sum(p.numel() for p in base)

    results = {}
    ps = _fresh(base)
    opt = torch.optim.SGD(ps, fused=True, **SGD_HP)
    results["SGD(fused=True)"] = (timer(opt.step), 20)
    ps = _fresh(base)
    opt = torch.optim.SGD(ps, foreach=True, **SGD_HP)
    results["SGD(foreach=True)"] = (timer(opt.step), 20)
    ps = _fresh(base)
    opt = torch.optim.SGD(ps, fused=True, **SGD_HP)
    emas = [p.detach().clone() for p in ps]
    live = [p.detach() for p in ps]

    def fused_then_ema():
        opt.step()
        foreach.lerp_(emas, live, 0.001)

    results["SGD(fused) + foreach EMA"] = (timer(fused_then_ema), 32)
    if device.type == "cuda" and _env.use_triton(device):
        ps = _fresh(base)
        opt = FusedSGD(ps, **SGD_HP)
        results["FusedSGD"] = (timer(opt.step), 20)
        ps = _fresh(base)
        opt = FusedSGD(ps, **SGD_HP, ema_decay=0.999)
        results["FusedSGD + EMA (one pass)"] = (timer(opt.step), 28)
    else:
        ps = _fresh(base)
        bufs = [torch.zeros_like(p) for p in ps]
        emas = [p.detach().clone() for p in ps]
        grads = [p.grad for p in ps]
        live = [p.detach() for p in ps]
        results["one-pass reference (foreach, CPU)"] = (timer(lambda: sgd_ema_reference_step(
            live, grads, bufs, emas, ema_decay=0.999, **SGD_HP)), 28)
    return numel, results


# ---------------------------------------------------------------------------- host cost

class _EmptyBNAct(torch.autograd.Function):
    """The autograd floor: a Function with the fused op's inputs and outputs (and output
    allocations) and nothing else, to separate torch's per-call autograd cost from ours."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual):
        ctx.save_for_backward(weight)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        return (torch.empty_like(dy), torch.empty_like(weight), torch.empty_like(weight),
                torch.empty_like(dy))


def host_cost(device: torch.device, reps: int, inner: int = 2) -> dict:
    """Python host cost, in µs, of the fused BN-act (training, residual, relu: one forward,
    one forward + backward through `torch.autograd.grad`) and of a FusedSGD step on
    ResNet-18-CIFAR's 62 tensors, with every kernel launch stubbed (`stub_launches`): what
    the CPU spends per call before the GPU sees any work. Runs on any machine.

    Also measured, the same way: the autograd floor (an empty autograd.Function with the
    same inputs and outputs: torch's own per-call cost, which any implementation pays), so
    "own" = total - floor is what fastres's host path adds. Medians (the headline) and
    minima over `reps` samples of `inner` calls."""
    from fastres.bench import time_fn
    from fastres.kernels import FusedBatchNormAct2d, FusedSGD
    from fastres.kernels import bn_act as K
    from fastres.kernels import sgd as S

    shape = HOST_SHAPE_GPU if device.type == "cuda" else HOST_SHAPE_CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cl = torch.channels_last
    x = torch.randn(shape, device=device, dtype=dtype).to(memory_format=cl).requires_grad_()
    r = torch.randn(shape, device=device, dtype=dtype).to(memory_format=cl).requires_grad_()
    dy = torch.randn(shape, device=device, dtype=dtype).to(memory_format=cl)
    mod = FusedBatchNormAct2d(shape[1], act="relu").to(device)
    wrt = (x, r, mod.weight, mod.bias)

    ps = [torch.nn.Parameter(p) for p in _param_set("resnet18_cifar", device)]
    # Fresh gradients every step, as training with zero_grad(set_to_none=True) makes them:
    # new tensor objects each step, at the same addresses as the step before (what a
    # caching allocator often hands back) or at new ones (two sets in turn: every step
    # rewrites the grad rows of the address tables). The `p.grad = ...` assignments are
    # timed alone too and subtracted: they are the trainer's cost, not the optimizer's.
    sets = [[torch.zeros_like(p) for p in ps] for _ in range(2)]
    for p, g in zip(ps, sets[0]):
        p.grad = g
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                   ema_decay=0.999)
    turn = [0]

    def new_addresses():
        turn[0] ^= 1
        for p, g in zip(ps, sets[turn[0]]):
            p.grad = g

    views = [[g.view_as(g) for g in sets[0]] for _ in range(2)]

    def same_addresses():  # new objects over the same memory
        turn[0] ^= 1
        for p, g in zip(ps, views[turn[0]]):
            p.grad = g

    calls = {
        "fwd": lambda: mod(x, r),
        "fwd+bwd": lambda: torch.autograd.grad(mod(x, r), wrt, dy),
        "floor fwd": lambda: _EmptyBNAct.apply(x, mod.weight, mod.bias, r),
        "floor fwd+bwd": lambda: torch.autograd.grad(
            _EmptyBNAct.apply(x, mod.weight, mod.bias, r), wrt, dy),
        "sgd kept": opt.step,
        "assign new": new_addresses,
        "sgd fresh new": lambda: (new_addresses(), opt.step()),
        "assign same": same_addresses,
        "sgd fresh same": lambda: (same_addresses(), opt.step()),
    }
    med, low = {}, {}
    with K.stub_launches(), S.stub_launches():
        for name, fn in calls.items():
            t = time_fn(fn, device="cpu", repeats=reps, warmup=3, inner=inner)
            med[name], low[name] = t.median_us, min(t.samples) * 1e6
    out = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
           "fwd": med["fwd"], "fwd+bwd": med["fwd+bwd"],
           "autograd_floor": {"fwd": med["floor fwd"], "fwd+bwd": med["floor fwd+bwd"]},
           "own": {"fwd": med["fwd"] - med["floor fwd"],
                   "fwd+bwd": med["fwd+bwd"] - med["floor fwd+bwd"]},
           "min": {k: v for k, v in low.items() if not k.startswith(("sgd", "assign"))}}
    fresh_same = med["sgd fresh same"] - med["assign same"]
    fresh_new = med["sgd fresh new"] - med["assign new"]
    out["fused_sgd"] = {
        "params": "resnet18_cifar", "tensors": len(ps), "grads kept": med["sgd kept"],
        "fresh grads, same addresses": fresh_same, "fresh grads, new addresses": fresh_new,
        "grad assignment (subtracted)": med["assign new"],
        "min": {"grads kept": low["sgd kept"],
                "fresh grads, same addresses": low["sgd fresh same"] - low["assign same"],
                "fresh grads, new addresses": low["sgd fresh new"] - low["assign new"]}}
    out["timing"] = f"fastres.bench.time_fn: median (and min) of {reps} samples of {inner} calls"
    out["targets"] = HOST_TARGETS_US
    return out


def _print_host(h: dict) -> None:
    s = h["fused_sgd"]
    f, o, m = h["autograd_floor"], h["own"], h["min"]
    print(f"fused BN+add+ReLU, training, {h['shape']} {h['dtype']}, launches stubbed "
          f"({h['timing']}):")
    print(f"host µs: fwd {h['fwd']:.1f}, fwd+bwd {h['fwd+bwd']:.1f}   "
          f"(target fwd+bwd <= {h['targets']['fwd+bwd']:.0f}; min fwd {m['fwd']:.1f}, "
          f"fwd+bwd {m['fwd+bwd']:.1f})")
    print(f"  of which torch's autograd floor (an empty autograd.Function, same inputs and "
          f"outputs): fwd {f['fwd']:.1f}, fwd+bwd {f['fwd+bwd']:.1f}; fastres's own: fwd "
          f"{o['fwd']:.1f}, fwd+bwd {o['fwd+bwd']:.1f}")
    print(f"FusedSGD host µs per step ({s['params']}, {s['tensors']} tensors, with EMA): "
          f"grads kept {s['grads kept']:.1f}, fresh grads at the same addresses "
          f"{s['fresh grads, same addresses']:.1f}, fresh grads at new addresses "
          f"{s['fresh grads, new addresses']:.1f}   (target <= "
          f"{h['targets']['fused_sgd']:.0f}; min {s['min']['grads kept']:.1f}, "
          f"{s['min']['fresh grads, same addresses']:.1f}, "
          f"{s['min']['fresh grads, new addresses']:.1f}; the {s['tensors']} `p.grad = ...` "
          f"assignments, {s['grad assignment (subtracted)']:.1f}, not counted)")


# ----------------------------------------------------------------------------- --quick

# The cases that decide whether the fused kernels earn their place, most decisive first
# (the target shape, then the optimizer). BN+GELU: the speed-run net (airbench94 at
# its batch of 2000: after each conv group's pool, 64x15x15, then 256x7x7 and 256x3x3; the
# BN scale frozen, no residual, eps 1e-12, momentum 0.4).
QUICK_CASES = [
    ("bn", (512, 64, 32, 32), "relu"),
    ("sgd", "resnet18_cifar", None),
    ("bn", (512, 128, 16, 16), "relu"),
    ("bn", (512, 256, 8, 8), "relu"),
    ("bn", (2000, 64, 15, 15), "gelu"),
    ("bn", (2000, 256, 7, 7), "gelu"),
    ("bn", (2000, 256, 3, 3), "gelu"),
    ("sgd", "airbench94", None),
]
QUICK_BUDGET_S = 35.0  # no case starts later; the one in flight ends by ~45 s (estimate)
QUICK_REPS = 10


def _reduced(shape):
    """The --dry-run stand-in of a shape: batch 2, at most 4x4 pixels, the same channels."""
    n, c, h, w = shape
    return (2, c, min(h, 4), min(w, 4))


DRY_RUN_NUMEL = 4096


def _reduced_params(base: list[torch.Tensor]) -> list[torch.Tensor]:
    """The --dry-run stand-in of a parameter list: the same tensors (their count and order
    decide the fused optimizer's plan), each cut to its first DRY_RUN_NUMEL elements --
    ResNet-18's 11M parameters, interpreted element by element and race-checked byte by
    byte, would take minutes and gigabytes."""
    return [p.flatten()[:DRY_RUN_NUMEL].clone() for p in base]


class _QuickTimer:
    """Median milliseconds of `reps` timed calls after `warmup` untimed ones. On a GPU each
    call is bracketed by CUDA events, with the L2 cache flushed (a 256 MB write) before it,
    as triton.testing.do_bench does, but with a fixed, small number of repeats; one host
    sync per figure. On a CPU: a clock."""

    def __init__(self, device: torch.device, reps: int, warmup: int):
        self.device, self.reps, self.warmup = device, reps, warmup
        self.flush = (torch.empty(256 * 2 ** 20, dtype=torch.int8, device=device)
                      if device.type == "cuda" else None)

    def __call__(self, fn: Callable[[], object]) -> float:
        import statistics
        import time

        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            samples = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
            return statistics.median(samples)
        events = []
        for _ in range(self.reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(self.device)  # host sync: once per figure, after the loop
        return statistics.median(s.elapsed_time(e) for s, e in events)


def _first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of a first call (compilation included), synchronised."""
    import time

    from fastres.bench import sync

    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _quick_bn_case(shape, act: str, device, timer, compile_backend: Optional[str]) -> dict:
    from fastres.kernels import _env, fused_bn_act
    from fastres.kernels.reference import bn_act_reference

    n, c, h, w = shape
    cl = torch.channels_last
    dtype = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype).to(memory_format=cl).requires_grad_()
    dy = torch.randn(shape, generator=g).to(device, dtype).to(memory_format=cl)
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    bias = torch.zeros(c, device=device, requires_grad=True)
    if act == "relu":  # BN + add + ReLU, as in a residual block's tail
        residual = torch.randn(shape, generator=g).to(device, dtype).to(
            memory_format=cl).requires_grad_()
        weight = torch.ones(c, device=device, requires_grad=True)
        wrt = [x, residual, weight, bias]
        momentum, eps = 0.1, 1e-5
    else:  # the speed-run net's BN + GELU: no residual, the scale frozen at 1
        residual = None
        weight = torch.ones(c, device=device)
        wrt = [x, bias]
        momentum, eps = 0.4, 1e-12

    def eager():
        return bn_act_reference(x, weight, bias, rm, rv, True, momentum, eps, residual, act)

    def fused():
        return fused_bn_act(x, weight, bias, rm, rv, True, momentum, eps, residual, act)

    impls = {"eager": eager}
    if compile_backend is not None:
        reset_compiler()  # one code object serves every shape: no recompile limit
        impls["compile"] = torch.compile(eager, dynamic=False, backend=compile_backend)
    if _env.use_triton(device):
        impls["fused"] = fused
    row = {"case": f"BN+{'add+' if residual is not None else ''}{act}",
           "shape": "x".join(map(str, shape)), "dtype": "bf16", "ms": {}, "first_call_s": {}}
    for name, f in impls.items():
        # The first forward + backward compiles (Inductor, or Triton's JIT for the fused
        # kernels): timed on its own and never inside the figures.
        row["first_call_s"][name] = _first_call_s(
            lambda: torch.autograd.grad(f(), wrt, dy), device)
        fwd = timer(f)
        y = f()
        bwd = timer(lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True))
        y = None  # the retained graph goes before the next figure
        both = timer(lambda: torch.autograd.grad(f(), wrt, dy))
        row["ms"][name] = {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}
    fused_ms = row["ms"].get("fused")
    row["speedup"] = {base: {p: row["ms"][base][p] / fused_ms[p] for p in fused_ms}
                      for base in ("eager", "compile") if fused_ms and base in row["ms"]}
    return row


def _quick_sgd_case(model: str, device, timer, dry: bool) -> dict:
    from fastres.kernels import FusedSGD, _env

    base = _param_set(model, device)
    if dry:
        base = _reduced_params(base)

    row = {"case": "SGD+EMA", "params": model, "numel": sum(p.numel() for p in base),
           "tensors": len(base), "ms": {}, "first_call_s": {}}
    ps = _fresh(base)
    try:
        ref = torch.optim.SGD(ps, fused=True, **SGD_HP)
        ref.step()
        label = "SGD(fused) + foreach EMA"
    except RuntimeError:  # a device without torch's fused SGD
        ref = torch.optim.SGD(ps, foreach=True, **SGD_HP)
        label = "SGD(foreach) + foreach EMA"
    emas = [p.detach().clone() for p in ps]
    live = [p.detach() for p in ps]

    def baseline():
        ref.step()
        foreach.lerp_(emas, live, 0.001)

    row["baseline"] = label
    row["first_call_s"]["baseline"] = _first_call_s(baseline, device)
    row["ms"]["baseline"] = timer(baseline)
    if _env.use_triton(device):
        opt = FusedSGD(_fresh(base), **SGD_HP, ema_decay=0.999)
        row["first_call_s"]["fused"] = _first_call_s(opt.step, device)
        row["ms"]["fused"] = timer(opt.step)
        row["speedup"] = {"baseline": row["ms"]["baseline"] / row["ms"]["fused"]}
    return row


def _print_quick_row(row: dict) -> None:
    ms, first = row["ms"], row["first_call_s"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    if row["case"] == "SGD+EMA":
        f = ms.get("fused")
        sp = row.get("speedup", {}).get("baseline")
        what = f"{row['params']} ({row['tensors']} tensors)"
        print(f"{row['case']:<14}{what:<32}"
              f"{'step':<9}{fmt(ms['baseline']):>10}{'':>10}{fmt(f):>10}"
              f"{fmt(sp):>10}{'':>10}   baseline: {row['baseline']}; first calls (s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in first.items()), flush=True)
        return
    for p in ("fwd", "bwd", "fwd+bwd"):
        e = ms["eager"][p]
        c = ms.get("compile", {}).get(p)
        f = ms.get("fused", {}).get(p)
        se = row["speedup"].get("eager", {}).get(p)
        sc = row["speedup"].get("compile", {}).get(p)
        tail = ("   first calls (s): " + ", ".join(f"{k} {v:.2f}" for k, v in first.items())
                if p == "fwd+bwd" else "")
        what = f"{row['shape']} {row['dtype']}"
        print(f"{row['case']:<14}{what:<32}{p:<9}{fmt(e):>10}"
              f"{fmt(c):>10}{fmt(f):>10}{fmt(se):>10}{fmt(sc):>10}{tail}", flush=True)


def run_quick(args, device: torch.device, env: dict) -> int:
    """`--quick`: the decisive speed figures within a fixed budget. Each case is printed and
    written to --json as soon as it is measured, so a stage killed at its time limit still
    leaves what it measured; a case that would start after the budget is listed as skipped.
    On a CPU (or with --dry-run) the same cases run at reduced sizes (batch 2, <= 4x4;
    parameters cut to DRY_RUN_NUMEL elements each): the code path, end to end, not a speed
    figure."""
    import time

    from fastres.kernels import _env

    on_gpu = device.type == "cuda"
    dry = args.dry_run or not on_gpu
    reps = args.reps or (1 if dry else QUICK_REPS)
    timer = _QuickTimer(device, reps, warmup=1 if dry else 3)
    budget = args.budget if args.budget is not None else QUICK_BUDGET_S
    # Inductor on a GPU; on a CPU its C++ compile takes minutes, so the dry run checks the
    # compile path with AOTAutograd alone ("aot_eager").
    backend = None if args.no_compile else ("inductor" if on_gpu else "aot_eager")
    if backend is not None:
        _allow_retained_backward()
    kernels = "Triton kernels" + ("" if _env.use_triton(device) else " not run here")
    print(f"quick: {'dry run at reduced sizes (not speed figures)' if dry else 'speed'}, "
          f"{reps} timed calls per figure (median, "
          f"{'CUDA events, L2 flushed before each' if on_gpu else 'CPU clock'}), compilation "
          f"timed apart (first calls); compile backend {backend or 'off'}; {kernels}; "
          f"budget {budget:.0f} s", flush=True)
    print(f"{'case':<14}{'shape / params':<32}{'pass':<9}{'eager ms':>10}{'compile':>10}"
          f"{'fused ms':>10}{'x eager':>10}{'x compile':>10}", flush=True)
    t0 = time.perf_counter()
    result = {"environment": env, "dry_run": dry, "reps": reps, "budget_s": budget,
              "compile_backend": backend, "cases": [], "skipped": []}
    for kind, what, act in QUICK_CASES:
        label = f"{kind} {'x'.join(map(str, what)) if kind == 'bn' else what}"
        if result["cases"] and time.perf_counter() - t0 > budget:  # the first always runs
            result["skipped"].append(label)
            continue
        if kind == "bn":
            row = _quick_bn_case(_reduced(what) if dry else what, act, device, timer, backend)
        else:
            row = _quick_sgd_case(what, device, timer, dry)
        result["cases"].append(row)
        _print_quick_row(row)
        result["elapsed_s"] = time.perf_counter() - t0
        _write(args.json, result, quiet=True)
    result["elapsed_s"] = time.perf_counter() - t0
    if result["skipped"]:
        print(f"skipped (budget {budget:.0f} s spent): {', '.join(result['skipped'])}")
    print(f"quick: {result['elapsed_s']:.1f} s")
    _write(args.json, result)
    return 0


# ---------------------------------------------------------------- decisive experiment

def _decisive_once(device: torch.device) -> None:
    """One fused training forward + backward at the decisive shape (the process that
    compute-sanitizer watches)."""
    from fastres.kernels import FusedBatchNormAct2d

    cl = torch.channels_last
    x = torch.randn(DECISIVE_SHAPE, device=device).to(memory_format=cl).requires_grad_()
    r = torch.randn(DECISIVE_SHAPE, device=device).to(memory_format=cl).requires_grad_()
    m = FusedBatchNormAct2d(DECISIVE_SHAPE[1], act="relu").to(device)
    torch.autograd.grad(m(x, r), (x, r, m.weight, m.bias), torch.randn_like(x))
    torch.cuda.synchronize(device)
    print("done")


def _sanitizer(timeout: float) -> dict:
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return {"status": "not installed"}
    if timeout <= 0:
        return {"status": "skipped (--sanitizer-timeout 0)"}
    cmd = [exe, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-m",
           "fastres.tools.bench_kernels", "--decisive-once"]
    # Its own process group: a timeout ends compute-sanitizer and the Python it watches.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except BaseException as err:  # the timeout, or a stop (Ctrl-C, a caller's time limit)
        kill_group(proc, grace=0)  # nothing it started outlives it
        proc.communicate()
        if not isinstance(err, subprocess.TimeoutExpired):
            raise
        return {"status": f"timeout after {timeout:.0f} s", "command": " ".join(cmd)}
    tail = output[-2000:]
    return {"status": "clean" if proc.returncode == 0 else f"exit {proc.returncode}",
            "command": " ".join(cmd), "output_tail": tail}


def _print_decisive(res: dict) -> None:
    print(f"decisive experiment: {res['act']}-{res['dtype']} {res['shape']} on "
          f"{res['device']}, training, residual; fp64 CPU truth; ReLU tie band "
          f"{res['tie_band_elements']} elements excluded")
    print(f"tile config: {res['config']}")
    names = ["y", "dx", "dres", "dweight", "dbias", "running_mean", "running_var"]
    print(f"{'implementation':<26}" + "".join(f"{n:>13}" for n in names)
          + f"{'deterministic':>15}")
    for impl, run in res["runs"].items():
        print(f"{impl:<26}" + "".join(f"{run['off_truth'].get(n, '-'):>13}" for n in names)
              + f"{str(run['deterministic']):>15}")
    print("(elements off the fp64 truth, per result)")
    for impl, run in res["runs"].items():
        for msg in run["messages"].values():
            print(f"  {impl}: {msg}")


# -------------------------------------------------------------------------------- main

def _write(path: Optional[str], payload: dict, quiet: bool = False) -> None:
    if path:
        from fastres.tools._common import write_json

        write_json(path, payload)  # atomic; the target was claimed at the start
        if not quiet:
            print(f"\nwrote {path}")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.json:  # checked (and claimed) before any work: the output contract
        from fastres.tools._common import claim_output_file

        args.json = str(claim_output_file(args.json, overwrite=args.overwrite))
    from fastres.tools._common import device_arg

    device = device_arg(args.device)
    threads = torch.get_num_threads()
    if args.threads and device.type != "cuda":
        torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests)


def _run(args, device: torch.device) -> int:
    shapes_arg = _parse_shapes(args.shapes) if args.shapes else None  # input errors first
    dtypes_arg = _parse_dtypes(args.dtypes) if args.dtypes else None
    on_gpu = device.type == "cuda"
    if on_gpu:
        # torch 2.11 rejects an index-less "cuda" device here (seen on the H200 machine).
        torch.cuda.set_device(torch.device(device).index or 0)
    from fastres.bench import copy_bandwidth, environment, peak_bandwidth

    if args.decisive_once:
        _decisive_once(device)
        return 0
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"python {env['python']} | git {env['git_sha']}")

    if args.host:
        from fastres.kernels import _env

        if not _env.HAS_TRITON:
            print("skipped: needs Triton (the launch path being timed is Triton's)")
            _write(args.json, {"environment": env, "skipped": "needs Triton"})
            return 0
        # Many short samples: on a shared CPU a sample of milliseconds often contains a
        # lost scheduler slice (~4 ms), which shifts the median; 2-call samples rarely do.
        reps = args.reps or (20 if args.quick else 300)
        h = host_cost(device, reps, inner=2)
        _print_host(h)
        _write(args.json, {"environment": env, "host_us": h})
        return 0

    if args.decisive:
        if not on_gpu:
            print("skipped: needs a CUDA device (the experiment compares the compiled "
                  "kernels and cuDNN with an fp64 CPU truth)")
            _write(args.json, {"environment": env, "skipped": "needs a CUDA device"})
            return 0
        from fastres.kernels import testing as T

        res = T.decisive_experiment(device, shape=DECISIVE_SHAPE)
        # The experiment's result is written (and printed) before compute-sanitizer runs,
        # so that a caller's time limit during the sanitizer loses nothing but its verdict.
        res["sanitizer"] = {"status": "running"}
        _print_decisive(res)
        _write(args.json, {"environment": env, "decisive": res})
        res["sanitizer"] = _sanitizer(args.sanitizer_timeout)
        print(f"compute-sanitizer memcheck: {res['sanitizer']['status']}")
        _write(args.json, {"environment": env, "decisive": res})
        return 0

    if args.quick or args.dry_run:
        return run_quick(args, device, env)
    shapes = GPU_SHAPES if on_gpu else CPU_SHAPES
    dtypes = [torch.float32, torch.bfloat16] if on_gpu else [torch.float32]
    do_compile = not args.no_compile
    opt_sets = ["resnet18_cifar", "resnet20"]
    if shapes_arg:
        shapes = shapes_arg
    if dtypes_arg:
        dtypes = dtypes_arg
    if args.no_optimizer:
        opt_sets = []
    reps = args.reps or 5
    timer = _Timer(device, reps, cuda_graphs=args.cuda_graphs and on_gpu)
    if do_compile:
        _allow_retained_backward()
    peak = copy_gbps = None
    if on_gpu:
        found = peak_bandwidth(env["device"])
        peak = found[1] if found else None
        copy_gbps = copy_bandwidth(device)
    timing = ("do_bench_cudagraph median (graph replays; no L2 flush)" if timer.cuda_graphs
              else "do_bench median (CUDA events, L2 flushed)" if on_gpu
              else f"fastres.bench.time_fn median of {reps}")
    if on_gpu:
        print(f"peak HBM: {peak or 'unknown'} GB/s (datasheet) | device-to-device copy: "
              f"{copy_gbps:.0f} GB/s (measured, read + write) | {env.get('sm_count')} SMs | "
              f"timing: {timing}")
    else:
        print("CPU: references only (eager vs torch.compile); the Triton kernels need a GPU "
              f"(the interpreter is for correctness). Timing: {timing}.")
    fb = bn_act_bytes((1, 1, 1, 1), 1, True, args.act, design="v1")
    print(f"\nBN + add + {args.act}, training mode, channels-last; GB/s 11p = the 11-pass "
          f"bytes (fwd {fb['fwd']}*MC*s, bwd {fb['bwd']}*MC*s) / time of the fused kernels "
          f"(of compile, else eager, where fused did not run); x eager / x compile = "
          f"speed-up of fused")
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            ms, best = _bn_act_case(shape, dtype, device, args.act, timer, do_compile,
                                    args.sweep)
            size = torch.empty(0, dtype=dtype).element_size()
            row = {"shape": "x".join(map(str, shape)), "dtype": _dtype_name(dtype),
                   "bytes": bn_act_bytes(shape, size, True, args.act),
                   "bytes_v1": bn_act_bytes(shape, size, True, args.act, design="v1"),
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
    _write(args.json, {"environment": env, "timing": timing, "peak_gbps": peak,
                       "copy_gbps": copy_gbps, "act": args.act, "bn_act": rows,
                       "optimizer": opt_rows})
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("bench-kernels", main))
