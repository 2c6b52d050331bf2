"""Optimizers and parameter groups.

Parameters are sorted into roles, and each role gets its learning-rate scale and weight
decay from `OptimConfig`:

    filter       conv kernels (4-D)                       -> Muon under optim.name=muon
    head         the classifier (last nn.Linear)           lr x head_lr_scale
    norm         BatchNorm weight and bias                 lr x bias_lr_scale, decay optional
    bias         other 1-D parameters                      lr x bias_lr_scale, decay optional
    whiten_bias  the speed-run net's whitening-conv bias   trained for whiten_bias_epochs only
    other        everything else (e.g. hidden Linear)

Each group carries `base_lr` (its peak learning rate) and `role`; the trainer multiplies
`base_lr` by the schedule every step. With `decoupled_wd`, the group's torch weight_decay is
wd / base_lr, so that the per-step decay is wd x schedule, independent of the learning rate
(airbench's convention).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from fastres.config import OptimConfig
from fastres.errors import ConfigError

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_roles(model: nn.Module) -> dict[str, str]:
    """name -> role for every trainable parameter of `model`."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES)
                   for p in m.parameters(recurse=False)}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    head_params = {id(p) for p in linears[-1].parameters()} if linears else set()
    whiten = getattr(model, "whiten", None)
    whiten_bias = id(whiten.bias) if isinstance(whiten, nn.Conv2d) and whiten.bias is not None \
        else None
    roles = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) == whiten_bias:
            roles[name] = "whiten_bias"
        elif id(p) in norm_params:
            roles[name] = "norm"
        elif id(p) in head_params:
            roles[name] = "head"
        elif p.ndim == 4:
            roles[name] = "filter"
        elif p.ndim <= 1:
            roles[name] = "bias"
        else:
            roles[name] = "other"
    return roles


def _lr_scale(role: str, o: OptimConfig) -> float:
    if role in ("norm", "bias", "whiten_bias"):
        return o.bias_lr_scale
    if role == "head":
        return o.head_lr_scale
    return 1.0


def param_groups(model: nn.Module, o: OptimConfig, roles_for_sgd=None) -> list[dict]:
    """torch param groups, one per role present, carrying base_lr, role and weight decay."""
    roles = param_roles(model)
    by_role: dict[str, list[Tensor]] = {}
    params = dict(model.named_parameters())
    for name, role in roles.items():
        if roles_for_sgd is not None and role not in roles_for_sgd:
            continue
        by_role.setdefault(role, []).append(params[name])
    groups = []
    for role in ("filter", "other", "head", "norm", "bias", "whiten_bias"):
        if role not in by_role:
            continue
        lr = o.lr * _lr_scale(role, o)
        decay = o.weight_decay if (role not in ("norm", "bias", "whiten_bias")
                                   or o.decay_norm_and_bias) else 0.0
        if o.decoupled_wd and decay > 0:
            if lr == 0:
                raise ConfigError(f"decoupled weight decay needs a non-zero lr for the "
                                  f"{role!r} parameters")
            decay = decay / lr
        groups.append(dict(params=by_role[role], lr=lr, base_lr=lr, weight_decay=decay,
                           role=role))
    return groups


# --------------------------------------------------------------------------- Muon

def zeropower_newton_schulz(g: Tensor, steps: int = 3, eps: float = 1e-7,
                            dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately orthogonalise a matrix (U S V^T -> U S' V^T with S' ~ 1).

    The quintic Newton-Schulz iteration of Keller Jordan's Muon, with coefficients chosen to
    maximise the slope at zero; a few steps leave singular values spread around 1 (roughly
    0.5-1.5), which trains as well as the exact U V^T. Runs in bf16 on GPUs; fp32 on CPUs
    without bf16 units, where bf16 matmuls are emulated and far slower.
    """
    assert g.ndim == 2
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    x = x / (x.norm() + eps)  # top singular value <= 1
    transposed = g.size(0) > g.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if transposed:
        x = x.T
    return x


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised update for conv filters (airbench94_muon's variant).

    Per step and filter W (out x in x kh x kw): buf = m*buf + g; u = g + m*buf (Nesterov) or
    buf; W is renormalised to norm sqrt(out) (its scale carries no information under the
    following BatchNorm, and fixing it keeps the effective step size constant); then
    W -= lr * NS(u reshaped to out x (in*kh*kw)).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.6, nesterov: bool = True,
                 ns_steps: int = 3, ns_dtype: torch.dtype | None = None):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, m = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(m).add_(g)
                u = g.add(buf, alpha=m) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.bfloat16 if p.is_cuda else torch.float32)
                p.mul_(len(p) ** 0.5 / p.norm())
                upd = zeropower_newton_schulz(u.reshape(len(u), -1), group["ns_steps"],
                                              dtype=dtype)
                p.add_(upd.view_as(p).to(p.dtype), alpha=-lr)
        return loss


# --------------------------------------------------------------------------- building

@dataclass
class Optimizers:
    """The run's optimizers (one, or SGD + Muon) seen as one: step, zero_grad, schedules."""

    optimizers: list[torch.optim.Optimizer]
    base_momentum: list[float] = field(default_factory=list)

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr(self, factor: float, whiten_factor: float | None = None) -> None:
        for g in self.param_groups:
            f = whiten_factor if (g.get("role") == "whiten_bias" and whiten_factor is not None) \
                else factor
            g["lr"] = g["base_lr"] * f

    def set_momentum(self, momentum: float) -> None:
        for opt in self.optimizers:
            if isinstance(opt, Muon):
                continue
            for g in opt.param_groups:
                if "momentum" in g:
                    g["momentum"] = momentum
                elif "betas" in g:
                    g["betas"] = (momentum, g["betas"][1])

    def step(self, scaler=None, **kwargs) -> None:
        """Step every optimizer; `kwargs` (e.g. the Triton SGD's ema_decay) go to the
        optimizers that take them."""
        for opt in self.optimizers:
            kw = kwargs if getattr(opt, "accepts_ema_decay", False) else {}
            if scaler is not None:
                scaler.step(opt, **kw)
            else:
                opt.step(**kw)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ValueError("optimizer state does not match this run's optimizers")
        for opt, st in zip(self.optimizers, states):
            opt.load_state_dict(st)


def _impl_kwargs(impl: str) -> dict:
    return {"fused": dict(fused=True), "foreach": dict(foreach=True),
            "for_loop": dict(foreach=False)}.get(impl, {})


def build_optimizers(model: nn.Module, o: OptimConfig, *, ema_shadows=None) -> Optimizers:
    """The optimizer(s) for `model` as `o` describes.

    `o.impl` must already be resolved (not "auto"). `ema_shadows` (id(parameter) -> fp32
    shadow, from `EMA.shadows_by_param`) are handed to the Triton SGD, which updates them in
    the same pass as the weights.
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
    kw = _impl_kwargs(o.impl)
    if o.name == "muon":
        sgd_groups = param_groups(model, o, roles_for_sgd={"other", "head", "norm", "bias",
                                                            "whiten_bias"})
        filters = [p for n, p in model.named_parameters()
                   if param_roles(model).get(n) == "filter"]
        opts = []
        if sgd_groups:
            opts.append(torch.optim.SGD(sgd_groups, lr=o.lr, momentum=o.momentum,
                                        nesterov=o.nesterov, **kw))
        if filters:
            muon = Muon([dict(params=filters, lr=o.muon_lr, base_lr=o.muon_lr, role="filter")],
                        lr=o.muon_lr, momentum=o.muon_momentum, nesterov=o.nesterov,
                        ns_steps=o.muon_ns_steps)
            opts.append(muon)
        return Optimizers(opts, [o.momentum])
    groups = param_groups(model, o)
    if o.name == "sgd":
        if o.impl == "triton":
            from fastres.kernels import FusedSGD

            ema_kw = {}
            if ema_shadows is not None:
                ema_kw = dict(ema_decay=o.ema_decay, ema_tensors=[
                    ema_shadows[id(p)] for g in groups for p in g["params"]])
            opt = FusedSGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, **ema_kw)
            opt.accepts_ema_decay = ema_shadows is not None
        else:
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                  **kw)
        return Optimizers([opt], [o.momentum])
    if o.name in ("adam", "adamw"):
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=o.lr, betas=o.betas, eps=o.eps, **kw)
        return Optimizers([opt], [o.betas[0]])
    raise ConfigError(f"unknown optimizer {o.name!r}")
