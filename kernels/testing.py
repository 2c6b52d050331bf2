"""Test support for the fused kernels: fp64 truths, ulp-derived tolerances with a ReLU tie
band, the GPU-configuration and interpreter-harness switches, and the decisive experiment.

Why an fp64 truth instead of the fp32 PyTorch reference: any fp32 implementation (the
reference, cuDNN, the kernels) flips O(1) ReLU masks at a few million elements (|z| below
its rounding error), and a low-precision reference rounds twice where the kernel rounds
once. Comparing every implementation against fp64 computed from the *same* (quantised)
inputs, with tolerances derived from the arithmetic, separates real faults from rounding:

- elementwise outputs (y, dx, dres): ``|got - truth| <= 0.5 ulp_out(|got|, |truth|) + slack``
  where 0.5 ulp is what one round-to-nearest-even to the output dtype costs (a truncating
  cast costs up to a whole ulp, so it fails) and `slack` = 8 u_acc x the magnitude of the
  terms that make the value (u_acc = 2**-24 for fp32 arithmetic);
- sums over the M rows of a channel (dweight = S2, dbias = S1): ``8 u_acc (sqrt(M) ||t||_2 +
  sum |t|)`` (a random-walk bound for blocked fp32 summation, plus a few u per term for
  coherent errors), plus what the tie band can move;
- ReLU tie band: elements with |z_truth| <= the fp32 error bound of z are "ties": an fp32
  implementation may put them on either side of zero, so they are counted and excluded from
  dx and dres, and their possible contribution is added to the sums' tolerances.

    from fastres.kernels import testing as T
    truth = T.bn_act_truth(x, r, w, b, rm, rv, dy, training=True, act="relu", ...)
    T.assert_matches_truth({"y": y, "dx": x.grad, ...}, truth)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor

from fastres.kernels._harness import RaceError, configured
from fastres.kernels.bn_act import TileConfig, forced_config, gpu_configs, tile_config

__all__ = ["Truth", "bn_act_truth", "compare_to_truth", "assert_matches_truth", "ulp",
           "assert_ulp_close", "gpu_configs", "forced_config", "configured", "RaceError",
           "TileConfig", "tile_config", "decisive_experiment", "H100_SMS", "H100_PCIE_SMS"]

H100_SMS = 132        # H100 SXM and H200
H100_PCIE_SMS = 114
_K = 8.0              # slack factor on u_acc (a few roundings per term, with margin)
# Activations whose derivative depends on z (so dz inherits z's rounding error), and a
# Lipschitz constant of that derivative: |gelu''(z)| = phi(z) |2 - z^2| <= 2 phi(0) = 0.798,
# |silu''(z)| = s (1 - s) |2 + z (1 - 2 s)| <= 0.5 (at z = 0; s = sigmoid(z)). An error
# e in z moves act'(z) by at most _DACT_LIPSCHITZ * e. (act' itself is bounded by
# 1.129 for gelu, 1.100 for silu: what z's error does to y, inside y's K u zmag.)
_Z_ACTS = ("gelu", "silu")
_DACT_LIPSCHITZ = 1.0


def ulp(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The spacing of `dtype` at |t| (fp64 tensor): eps * 2**floor(log2 |t|), and the
    subnormal spacing below the smallest normal."""
    fi = torch.finfo(dtype)
    a = t.detach().double().abs().clamp_min(fi.smallest_normal)
    return fi.eps * torch.exp2(torch.floor(torch.log2(a)))


def _u(dtype: torch.dtype) -> float:
    """Unit roundoff of the kernels' arithmetic: fp32 (fp64 inputs are accumulated in fp64,
    but Triton's literals and runtime float scalars -- eps, momentum, GELU's constants --
    are fp32, so fp64 results are good to fp32's roundoff, not fp64's)."""
    return 2.0 ** -24


def assert_ulp_close(got: Tensor, truth: Tensor, dtype: torch.dtype, name: str, *,
                     ulps: float = 0.5, slack=0.0, exclude: Optional[Tensor] = None) -> None:
    """|got - truth| <= ulps * ulp_dtype(max(|got|, |truth|)) + slack, elementwise, except
    where `exclude`; the message says how many fail, where, and the worst."""
    msg = _ulp_failures(got, truth, dtype, name, ulps=ulps, slack=slack, exclude=exclude)
    if msg:
        raise AssertionError(msg)


def _ulp_failures(got, truth, dtype, name, *, ulps=0.5, slack=0.0, exclude=None):
    e = truth.detach().double()
    g = got.detach().double().to(e.device)
    if g.shape != e.shape:
        return f"{name}: shape {tuple(g.shape)} != {tuple(e.shape)}"
    tol = ulps * ulp(torch.maximum(g.abs(), e.abs()), dtype)
    tol = tol + (slack.double().to(e.device) if isinstance(slack, Tensor) else slack)
    err = (g - e).abs()
    bad = ~(err <= tol)  # NaN in got or truth counts as bad unless both NaN
    bad &= ~(g.isnan() & e.isnan())
    if exclude is not None:
        bad &= ~exclude.to(e.device)
    if not bad.any():
        return None
    idx = bad.nonzero()
    ratio = torch.where(bad, err / tol.clamp_min(1e-300), torch.zeros_like(err))
    worst = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
    first = [tuple(int(v) for v in row) for row in idx[:4]]
    where = ""
    if g.dim() == 4:  # channels of the failures: one channel's worth is a tile/lane pattern
        ch = torch.bincount(idx[:, 1], minlength=g.shape[1])
        top = torch.topk(ch, min(3, g.shape[1]))
        where = "; by channel " + ", ".join(f"{int(c)}: {int(n)}" for n, c in
                                            zip(top.values, top.indices) if n > 0)
    return (f"{name}: {int(bad.sum())} / {g.numel()} elements off by more than "
            f"{ulps} ulp({dtype}) + slack; first at {first}; worst at {worst}: got "
            f"{g[worst].item():.9g}, truth {e[worst].item():.9g} (|diff| {err[worst].item():.3g}"
            f" = {ratio[worst].item():.3g} x tolerance){where}")


@dataclasses.dataclass
class Truth:
    """fp64 results and the tolerances for one BN-act forward + backward (see the module
    docstring). Tensors are fp64 (on the device the truth was computed on); `ties` marks
    the ReLU tie band."""

    dtype: torch.dtype                 # the input's dtype
    dtypes: dict                       # name -> the dtype that result is rounded to
    values: dict                       # name -> fp64 tensor
    slack: dict                        # name -> fp64 tensor or float (added to 0.5 ulp)
    ties: Optional[Tensor]             # bool, shape of x (relu) or None
    rows: int

    @property
    def tie_count(self) -> int:
        return int(self.ties.sum()) if self.ties is not None else 0


def bn_act_truth(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                 bias: Optional[Tensor], running_mean: Optional[Tensor],
                 running_var: Optional[Tensor], dy: Tensor, *, training: bool, act: str,
                 momentum: Optional[float] = 0.1, eps: float = 1e-5,
                 num_batches_tracked: int = 0, out_dtype: Optional[torch.dtype] = None,
                 dres_dtype: Optional[torch.dtype] = None, device=None) -> Truth:
    """fp64 truth of ``act(bn(x) + residual)`` and its gradients for these exact inputs.

    Values: y, dx, dres (if residual), dweight/dbias (if weight/bias), and in training with
    running stats the updated running_mean/running_var. `num_batches_tracked` is the
    module's counter before this batch (momentum=None uses 1 / (it + 1)). Computed on
    `device` (default: x's; fp64 is IEEE on GPUs too, and a GPU keeps CIFAR-sized truths
    fast), results left there."""
    if act not in ("relu", "identity") + _Z_ACTS:  # not silently the identity's truth
        raise ValueError(f"bn_act_truth: no truth for act={act!r}")
    dt = x.dtype
    out_dtype = out_dtype or (dt if residual is None else torch.promote_types(dt, residual.dtype))
    pdt = weight.dtype if weight is not None else (running_mean.dtype if running_mean is not None
                                                   else torch.float32)
    u = _u(dt)
    dev = torch.device(device) if device is not None else x.device
    X = x.detach().to(dev, torch.float64)
    C = X.shape[1]
    dims = [d for d in range(X.dim()) if d != 1]
    M = X.numel() // C

    def ch(t):  # a (C,) vector broadcast against x
        return t.view(1, C, *([1] * (X.dim() - 2)))

    f64 = dict(device=dev, dtype=torch.float64)
    W = weight.detach().to(**f64) if weight is not None else torch.ones(C, **f64)
    B = bias.detach().to(**f64) if bias is not None else torch.zeros(C, **f64)
    R = residual.detach().to(**f64) if residual is not None else None
    G = dy.detach().to(**f64)
    if training:
        mean = X.mean(dims)
        var = X.var(dims, unbiased=False)
    else:
        mean = running_mean.detach().to(**f64)
        var = running_var.detach().to(**f64)
    rstd = 1.0 / torch.sqrt(var + eps)
    xh = (X - ch(mean)) * ch(rstd)
    z = xh * ch(W) + ch(B) + (R if R is not None else 0.0)
    if act == "relu":
        y = torch.where(z > 0, z, torch.zeros_like(z))
        dact = (z > 0).double()
    elif act == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
        y = z * cdf
        dact = cdf + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    elif act == "silu":
        s = torch.sigmoid(z)
        y = z * s
        dact = s * (1.0 + z * (1.0 - s))
    else:
        y = z
        dact = torch.ones_like(z)
    dz = G * dact
    S1 = dz.sum(dims)
    S2 = (dz * xh).sum(dims)
    a = W * rstd
    if training:
        dx = ch(a) * (dz - ch(S1) / M - xh * ch(S2) / M)
    else:
        dx = ch(a) * dz
    # Magnitudes of what makes each value, for the slack (K u x magnitude).
    # |x - mean| in units of std, plus what an error of a few u in the mean (a sum of M
    # values of size ~ mean |x|) and in rstd can move it.
    xmag = (X.abs() + ch(mean.abs()) + ch(X.abs().mean(dims))) * ch(rstd)
    zmag = xmag * ch(W.abs()) + ch(B.abs()) + (R.abs() if R is not None else 0.0)
    ties = (z.abs() <= _K * u * zmag) if act == "relu" else None
    dzmag = G.abs() * (dact.abs() + (_K * 4 * u if act in _Z_ACTS else 0.0))
    if act in _Z_ACTS:  # dact depends on z, which carries K u zmag of error
        dzmag = dzmag + _DACT_LIPSCHITZ * G.abs() * zmag
    tie_s1 = float((G.abs() * ties).sum()) if ties is not None else 0.0
    tie_s2 = float((G.abs() * xh.abs() * ties).sum()) if ties is not None else 0.0
    live = ~ties if ties is not None else torch.ones_like(z, dtype=torch.bool)
    t1 = dz * live
    t2 = dz * xh * live
    tol_s1 = _K * u * (math.sqrt(M) * float(t1.norm()) + float(t1.abs().sum())) + tie_s1
    tol_s2 = _K * u * (math.sqrt(M) * float(t2.norm()) + float(t2.abs().sum())
                       + float((dz.abs() * xmag).sum())) + tie_s2
    values = {"y": y}
    slack = {"y": _K * u * zmag}
    if training:
        dx_slack = ch(a.abs()) * (_K * u * (dzmag + ch(S1.abs()) / M
                                            + xmag * ch(S2.abs()) / M)
                                  + tol_s1 / M + xh.abs() * tol_s2 / M)
    else:
        dx_slack = ch(a.abs()) * _K * u * dzmag
    values["dx"] = dx
    slack["dx"] = dx_slack
    if residual is not None:
        values["dres"] = dz
        slack["dres"] = _K * u * dzmag
    if weight is not None:
        values["dweight"] = S2
        slack["dweight"] = tol_s2
    if bias is not None:
        values["dbias"] = S1
        slack["dbias"] = tol_s1
    if training and running_mean is not None:
        f = (1.0 / (num_batches_tracked + 1)) if momentum is None else momentum
        rm = running_mean.detach().to(**f64)
        rv = running_var.detach().to(**f64)
        unbiased = X.var(dims, unbiased=True)
        values["running_mean"] = f * mean + (1 - f) * rm
        values["running_var"] = f * unbiased + (1 - f) * rv
        slack["running_mean"] = _K * u * (mean.abs() + rm.abs() + X.abs().amax(dims))
        slack["running_var"] = _K * u * (unbiased + rv) * 4
    dtypes = {"y": out_dtype, "dx": dt, "dres": dres_dtype or (residual.dtype if residual
                                                                   is not None else None),
              "dweight": pdt, "dbias": pdt, "running_mean": pdt, "running_var": pdt}
    return Truth(dtype=dt, dtypes=dtypes, values=values, slack=slack, ties=ties, rows=M)


def compare_to_truth(results: dict, truth: Truth) -> dict:
    """{name: failure message or None} for every result that has a truth. Results are the
    implementation's tensors (any dtype/device); dx and dres exclude the tie band."""
    dtypes = truth.dtypes
    out = {}
    for name, got in results.items():
        if got is None or name not in truth.values:
            continue
        exclude = truth.ties if name in ("dx", "dres") else None
        out[name] = _ulp_failures(got, truth.values[name], dtypes.get(name) or got.dtype,
                                  name, slack=truth.slack[name], exclude=exclude)
    return out


def assert_matches_truth(results: dict, truth: Truth) -> None:
    """Compare every result (all of them, then fail once with every message)."""
    failures = [m for m in compare_to_truth(results, truth).values() if m]
    assert not failures, (f"{len(failures)} result(s) off the fp64 truth (ReLU ties "
                          f"excluded: {truth.tie_count}):\n" + "\n".join(failures))


# ------------------------------------------------------------------ decisive experiment

def decisive_experiment(device, shape=(512, 64, 8, 8), dtype=torch.float32, act="relu",
                        seed: int = 0, reruns: int = 3) -> dict:
    """The GPU experiment for the relu-fp32 512x64x8x8 fault (issue 11), as one function.

    Training forward + backward with a residual, from inputs drawn on the CPU (so every
    implementation sees the same numbers), each implementation compared with the fp64 CPU
    truth (tie band excluded) and rerun `reruns` times for bitwise determinism:
    the fused module (default config), the fused module with dz read back from the stored
    dres (`dz_stored=True`, v1's dx path) and without (`False`), the fused module with
    num_warps=4, cuDNN's BatchNorm (torch eager), and torch with cuDNN disabled. Returns a
    JSON-ready dict: per implementation, per tensor the number of elements off the truth
    (and the message), and whether the reruns agreed bit for bit."""
    from fastres.kernels import bn_act as K
    from fastres.kernels.bn_act import FusedBatchNormAct2d
    from fastres.norm_act import BatchNormAct2d

    device = torch.device(device)
    C = shape[1]
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    w = torch.rand(C, generator=g) + 0.5
    b = torch.rand(C, generator=g) - 0.5
    rm = torch.randn(C, generator=g) * 0.5
    rv = torch.rand(C, generator=g) + 0.5
    truth = bn_act_truth(x, r, w, b, rm, rv, dy, training=True, act=act, device="cpu")

    def run(module_cls, ctx=None):
        outs = []
        for _ in range(reruns):
            m = module_cls(C, act=act).to(device)
            with torch.no_grad():
                m.weight.copy_(w)
                m.bias.copy_(b)
                m.running_mean.copy_(rm)
                m.running_var.copy_(rv)
            xd = x.to(device).to(memory_format=cl).requires_grad_()
            rd = r.to(device).to(memory_format=cl).requires_grad_()
            with (ctx() if ctx is not None else _null()):
                y = m(xd, rd)
                dx, dres, dw, db = torch.autograd.grad(y, (xd, rd, m.weight, m.bias),
                                                       dy.to(device).to(memory_format=cl))
            outs.append({"y": y, "dx": dx, "dres": dres, "dweight": dw, "dbias": db,
                         "running_mean": m.running_mean, "running_var": m.running_var})
        first = {k: v.detach().cpu() for k, v in outs[0].items()}
        same = all(torch.equal(first[k], o[k].detach().cpu()) for o in outs[1:] for k in first)
        cmp = compare_to_truth(first, truth)
        return {"off_truth": {k: (_count(m) if m else 0) for k, m in cmp.items()},
                "messages": {k: m for k, m in cmp.items() if m},
                "deterministic": same}

    base = K._config(shape[0] * shape[2] * shape[3], C, torch.empty(0, dtype=dtype).element_size(),
                     device)
    results = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
               "act": act, "device": str(device), "tie_band_elements": truth.tie_count,
               "config": dataclasses.asdict(base), "runs": {}}
    runs = results["runs"]
    runs["fused"] = run(FusedBatchNormAct2d)
    for label, cfg in (("fused dz_stored=True", dataclasses.replace(base, dz_stored=True)),
                       ("fused dz_stored=False", dataclasses.replace(base, dz_stored=False)),
                       ("fused num_warps=4", dataclasses.replace(base, num_warps=4))):
        runs[label] = run(FusedBatchNormAct2d, lambda cfg=cfg: forced_config(cfg))
    runs["torch (cuDNN)" if device.type == "cuda" else "torch"] = run(BatchNormAct2d)
    if device.type == "cuda":
        runs["torch, cuDNN disabled"] = run(
            BatchNormAct2d, lambda: torch.backends.cudnn.flags(enabled=False))
    return results


def _count(message: str) -> int:
    try:
        return int(message.split(": ", 1)[1].split(" / ", 1)[0])
    except (IndexError, ValueError):
        return -1


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
