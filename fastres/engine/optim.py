"""Optimizers and parameter groups.

Parameters are sorted into roles, and each role gets its learning-rate scale and weight
decay from `OptimConfig`:

    filter       conv kernels (4-D)                       -> Muon under optim.name=muon
    head         the classifier (last nn.Linear)           lr x head_lr_scale
    norm         BatchNorm weight and bias                 lr x bias_lr_scale, decay optional
    bias         other 1-D parameters                      lr x bias_lr_scale, decay optional
    whiten_bias  the speed-run net's whitening-conv bias   trained for whiten_bias_epochs only
    other        everything else (e.g. hidden Linear)

Each group carries `base_lr` (its peak learning rate) and `role`; `TrainStep` multiplies
`base_lr` by the schedule every step. With `decoupled_wd`, the group's torch weight_decay is
wd / base_lr, so that the per-step decay is wd x schedule, independent of the learning rate
(airbench's convention).

The optimizers are torch's (`torch.optim.SGD`, `Adam`, `AdamW`) and this module's `Muon`,
but only as containers: they hold the parameter groups and the state (`momentum_buffer`,
`exp_avg`, ...) in torch's state-dict format, so checkpoints load into torch's optimizers
and back. The arithmetic is the functions below (`sgd_update_`, `adam_update_`,
`muon_update_`), which take the learning rate, momentum and EMA decay as device tensors:
torch's own `step()` graph-breaks on purpose under torch.compile and reads Adam's step count
on the host, so a training step that compiles as one graph and replays as a CUDA graph needs
its own update. Each optimizer kind's update rule is registered beside its arithmetic
(`@update_rule`), and `Optimizers.step(lrs, momentum)` applies them all; `Muon.step()` calls
`muon_update_` too, so there is one implementation of each update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from fastres.config import OptimConfig
from fastres.errors import ConfigError

from fastres._compat import foreach, fused_adam, fused_sgd

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


# --------------------------------------------------------------------------- update math
#
# Every function updates its tensors in place under no_grad and reads hyper-parameters that
# change during a run (lr, momentum, beta1) as 0-d device tensors or Python floats; nothing
# reads a device value on the host, so the same code runs eagerly, under
# torch.compile(fullgraph=True) and inside a CUDA graph. `impl` picks torch's fused kernel
# (`torch._fused_sgd_` / `_fused_adam(w)_`, one launch per device and dtype, which take a
# tensor lr but a float momentum) or the multi-tensor `torch._foreach_*` ops; "for_loop"
# runs the foreach code one tensor at a time.

def _chunks(impl: str, *lists):
    """The tensor lists as one batch (foreach/fused) or one tensor at a time (for_loop)."""
    if impl == "for_loop":
        return [tuple([lst[i]] if lst is not None else None for lst in lists)
                for i in range(len(lists[0]))]
    return [lists]


@torch.no_grad()
def sgd_update_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None, *,
                lr: Tensor, momentum: Tensor | float, weight_decay: float, nesterov: bool,
                impl: str = "foreach") -> None:
    """SGD with L2 weight decay and (Nesterov) momentum, torch.optim.SGD's arithmetic with a
    tensor lr (dampening 0; buffers start at zero, which equals torch's `buf = g` on the
    first step):  g += wd p;  buf = m buf + g;  g = g + m buf (Nesterov) or buf;  p -= lr g.
    """
    if not params:
        return
    fused = fused_sgd(params[0].device.type) if impl == "fused" else None
    if fused is not None:
        if isinstance(momentum, Tensor):
            raise ValueError("the fused SGD kernel takes a float momentum; use foreach for a "
                             "momentum schedule")
        fused(params, grads, bufs if bufs is not None else [], weight_decay=weight_decay,
              momentum=momentum if bufs else 0.0, lr=lr, dampening=0.0, nesterov=nesterov,
              maximize=False, is_first_step=False)
        return
    for ps, gs, bs in _chunks(impl, params, grads, bufs):
        if weight_decay != 0:
            gs = foreach.add(gs, ps, alpha=weight_decay)
        if bs is not None:
            foreach.mul_(bs, momentum)
            foreach.add_(bs, gs)
            if nesterov:
                gs = foreach.add(gs, bs, alpha=momentum) if not isinstance(
                    momentum, Tensor) else foreach.add(gs, foreach.mul(bs, momentum))
            else:
                gs = bs
        foreach.add_(ps, foreach.mul(gs, -lr))


@torch.no_grad()
def adam_update_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                 exp_avg_sqs: list[Tensor], steps: list[Tensor], *, lr: Tensor,
                 beta1: Tensor | float, beta2: float, eps: float, weight_decay: float,
                 decoupled: bool, impl: str = "foreach") -> None:
    """Adam (L2 decay added to the gradient) or AdamW (`decoupled`: p *= 1 - lr wd), with
    torch's capturable arithmetic: the step count and both bias corrections stay on the
    device (torch's default Adam reads the step count on the host every step)."""
    if not params:
        return
    fused = fused_adam(params[0].device.type, decoupled) if impl == "fused" else None
    if fused is not None:
        if isinstance(beta1, Tensor):
            raise ValueError("the fused Adam kernel takes a float beta1; use foreach for a "
                             "momentum schedule")
        foreach.add_(steps, 1)
        fused(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
              weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
        return
    for ps, gs, ms, vs, ss in _chunks(impl, params, grads, exp_avgs, exp_avg_sqs, steps):
        foreach.add_(ss, 1)
        if weight_decay != 0:
            if decoupled:
                foreach.mul_(ps, 1 - lr * weight_decay)
            else:
                gs = foreach.add(gs, ps, alpha=weight_decay)
        if isinstance(beta1, Tensor):
            foreach.mul_(ms, beta1)
            foreach.add_(ms, foreach.mul(gs, 1 - beta1))
        else:
            foreach.lerp_(ms, gs, 1 - beta1)
        foreach.mul_(vs, beta2)
        foreach.addcmul_(vs, gs, gs, 1 - beta2)
        # step size lr / (1 - b1^t) and sqrt(1 - b2^t), per tensor, on the device
        bc1 = [1 - torch.pow(beta1, s) for s in ss]
        bc2 = foreach.sqrt([1 - torch.pow(beta2, s) for s in ss])
        denom = foreach.sqrt(vs)
        foreach.div_(denom, bc2)
        foreach.add_(denom, eps)
        foreach.mul_(denom, foreach.div(bc1, lr))  # denom / step_size
        foreach.addcdiv_(ps, ms, foreach.neg(denom))


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's Muon (airbench94_muon)


def zeropower_newton_schulz(g: Tensor, steps: int = 3, eps: float = 1e-7,
                            dtype: torch.dtype = torch.bfloat16,
                            coefficients: Sequence[float] = NS_COEFFICIENTS) -> Tensor:
    """Approximately orthogonalise a matrix, or a stack of matrices (..., m, n):
    U S V^T -> U S' V^T with S' ~ 1.

    The quintic Newton-Schulz iteration of Keller Jordan's Muon, x <- a x + (b A + c A^2) x
    with A = x x^T, with coefficients (a, b, c) chosen to maximise the slope at zero; a few
    steps leave singular values spread around 1 (roughly 0.5-1.5), which trains as well as
    the exact U V^T. A stack runs as batched matmuls
    (one launch per product for all same-shape filters). Runs in bf16 on GPUs; fp32 on CPUs
    without bf16 units, where bf16 matmuls are emulated and far slower.
    """
    if g.ndim < 2:
        raise ValueError(f"expected a matrix or a stack of matrices, got shape {tuple(g.shape)}")
    a, b, c = coefficients
    x = g.to(dtype)
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)  # top s.v. <= 1
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.mT
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if transposed:
        x = x.mT
    return x


def shape_groups(params: Sequence[Tensor]) -> list[list[int]]:
    """Indices of `params` grouped by shape (first-seen order): the batches Muon
    orthogonalises together."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(tuple(p.shape), []).append(i)
    return list(groups.values())


@torch.no_grad()
def muon_update_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *,
                 lr: Tensor, momentum: float, nesterov: bool, ns_steps: int,
                 ns_dtype: torch.dtype, batches: list[list[int]] | None = None,
                 ns_coefficients: Sequence[float] = NS_COEFFICIENTS) -> None:
    """Muon for conv filters W (out x in x kh x kw), airbench94_muon's variant:
    buf = m buf + g;  u = g + m buf (Nesterov) or buf;  W *= sqrt(out) / |W| (its scale
    carries no information under the following BatchNorm; fixing it keeps the effective
    step size constant);  W -= lr NS(u as out x (in kh kw)), same-shape filters stacked
    into one batched Newton-Schulz (`batches`: indices of `params` stacked together,
    default `shape_groups(params)`; `ns_coefficients`: its (a, b, c))."""
    if not params:
        return
    foreach.mul_(bufs, momentum)
    foreach.add_(bufs, grads)
    upd = foreach.add(grads, bufs, alpha=momentum) if nesterov else bufs
    foreach.mul_(params, [math.sqrt(len(p)) / n for p, n in zip(params, foreach.norm(params))])
    for idx in batches or shape_groups(params):
        stack = torch.stack([upd[i].reshape(len(upd[i]), -1) for i in idx])  # k x out x in*kh*kw
        ortho = zeropower_newton_schulz(stack, ns_steps, dtype=ns_dtype,
                                        coefficients=ns_coefficients)
        ps = [params[i] for i in idx]
        step = [o.view_as(p).to(p.dtype) for o, p in zip(ortho.unbind(0), ps)]
        foreach.add_(ps, foreach.mul(step, -lr))


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 Newton-Schulz on GPUs; fp32 on CPUs, where bf16 matmuls are emulated."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def ns_dtype_for(precision: str) -> torch.dtype:
    """The Newton-Schulz dtype of a training step that computes in `precision`: bf16 when
    the step does (airbench94_muon's choice, the GPU presets), fp32 when it computes in
    fp32 (the CPU default: bf16 matmuls are emulated there and far slower)."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


class Muon(torch.optim.Optimizer):
    """Momentum + orthogonalised update for conv filters (see `muon_update_`)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.6, nesterov: bool = True,
                 ns_steps: int = 3, ns_dtype: torch.dtype | None = None,
                 ns_coefficients: Sequence[float] = NS_COEFFICIENTS):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if len(ns_coefficients) != 3:
            raise ValueError(f"ns_coefficients are Newton-Schulz's (a, b, c), got "
                             f"{ns_coefficients!r}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        self.ns_coefficients = tuple(float(v) for v in ns_coefficients)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            init_state_(self)
            lr = group["lr"]
            muon_update_(ps, [p.grad for p in ps],
                         [self.state[p]["momentum_buffer"] for p in ps],
                         lr=lr if isinstance(lr, Tensor) else torch.tensor(lr),
                         momentum=group["momentum"], nesterov=group["nesterov"],
                         ns_steps=group["ns_steps"],
                         ns_dtype=self.ns_dtype or default_ns_dtype(ps[0].device),
                         ns_coefficients=self.ns_coefficients)
        return loss


# --------------------------------------------------------------------------- update rules
#
# One rule per optimizer kind: `rule(g, params, grads, state, lr, momentum, impl)` updates
# the group `g`'s parameters that have gradients this step (`params`, with their `grads`
# and their slices of `state`), reading the step's learning rate for the group and the
# scheduled momentum (None: the group's own) as device tensors.

UpdateRule = Callable[..., None]
UPDATE_RULES: dict[str, tuple[UpdateRule, tuple[str, ...]]] = {}


def update_rule(kind: str, state: tuple[str, ...] = ()):
    """Register a function as the update rule of `kind` groups; `state` names the
    per-parameter state tensors it reads (torch's names, created by `init_state_`)."""
    def register(fn: UpdateRule) -> UpdateRule:
        UPDATE_RULES[kind] = (fn, state)
        return fn
    return register


@update_rule("sgd", state=("momentum_buffer",))
def _sgd_rule(g, params, grads, state, lr, momentum, impl) -> None:
    group = g.group
    sgd_update_(params, grads, state.get("momentum_buffer"), lr=lr,
                momentum=momentum if momentum is not None else group["momentum"],
                weight_decay=group["weight_decay"], nesterov=group["nesterov"], impl=impl)


@update_rule("adam", state=("exp_avg", "exp_avg_sq", "step"))
def _adam_rule(g, params, grads, state, lr, momentum, impl) -> None:
    group = g.group
    beta1, beta2 = group["betas"]
    adam_update_(params, grads, state["exp_avg"], state["exp_avg_sq"], state["step"], lr=lr,
                 beta1=momentum if momentum is not None else beta1, beta2=beta2,
                 eps=group["eps"], weight_decay=group["weight_decay"],
                 decoupled=g.options["decoupled"], impl=impl)


@update_rule("muon", state=("momentum_buffer",))
def _muon_rule(g, params, grads, state, lr, momentum, impl) -> None:
    # Muon keeps its own momentum (the schedule's momentum cycles the SGD half only).
    group = g.group
    muon_update_(params, grads, state["momentum_buffer"], lr=lr, momentum=group["momentum"],
                 nesterov=group["nesterov"], ns_steps=group["ns_steps"],
                 ns_dtype=g.options["ns_dtype"],
                 batches=g.batches if len(params) == len(g.params) else None,
                 ns_coefficients=g.options["ns_coefficients"])


@update_rule("triton")
def _triton_rule(g, params, grads, state, lr, momentum, impl) -> None:
    # fastres' Triton SGD (+EMA) updates all its groups in one launch, which
    # `Optimizers.step` makes after the per-group rules; its groups only take the step's
    # learning rate and momentum here.
    g.group["lr"] = lr
    if momentum is not None:
        g.group["momentum"] = momentum


@dataclass
class GroupState:
    """One parameter group as the update rules see it, gathered once when the optimizers
    are built: its state tensors and its param-group dict are never replaced afterwards (a
    compiled step and a captured CUDA graph hold them; `load_state_inplace_` keeps both).

    The rules read what they need of the optimizer object from `options`, as plain values,
    never from `opt` itself: a compiled step that read an attribute of the optimizer would
    be guarded on that object's identity, and recompiled for every new TrainStep (every
    run of `fastres speedrun`)."""

    opt: torch.optim.Optimizer
    index: int                        # row of the group's learning rate in the lr table
    kind: str                         # its update rule: sgd | adam | muon | triton
    group: dict                       # the torch param group (base_lr, role, decay, ...)
    params: list[Tensor]
    state: dict[str, list[Tensor]]    # state name -> one tensor per parameter
    batches: list[list[int]] | None   # Muon: same-shape filters orthogonalised together
    options: dict = field(default_factory=dict)  # the optimizer's settings the rule reads


def rule_options(opt: torch.optim.Optimizer) -> dict:
    """The settings of `opt` that live on the object rather than in its param groups."""
    if isinstance(opt, Muon):
        return {"ns_dtype": opt.ns_dtype, "ns_coefficients": opt.ns_coefficients}
    if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        return {"decoupled": isinstance(opt, torch.optim.AdamW)}
    return {}


# --------------------------------------------------------------------------- state

def init_state_(opt: torch.optim.Optimizer) -> None:
    """Create every parameter's optimizer state now (zeros), in the layout torch's
    optimizers use, instead of lazily at the first step: the step then has a fixed set of
    tensors (nothing allocated by shape on the fly), which compiling and graph capture
    need."""
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state[p]
            if state:
                continue
            if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif group.get("momentum", 0) != 0 or isinstance(opt, Muon):
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)


def load_state_inplace_(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """`opt.load_state_dict(state_dict)`, then copy the loaded values back into the state
    tensors and the param-group dicts that existed before (torch's loader replaces both),
    so that anything holding them (a compiled step, a captured CUDA graph, an update rule
    that writes the step's learning rate into its group) keeps seeing the live state."""
    before = {id(p): dict(opt.state[p]) for g in opt.param_groups for p in g["params"]}
    groups = list(opt.param_groups)
    opt.load_state_dict(state_dict)
    for i, (held, loaded) in enumerate(zip(groups, opt.param_groups)):
        if loaded is not held:
            held.clear()
            held.update(loaded)
            opt.param_groups[i] = held
    for g in opt.param_groups:
        for p in g["params"]:
            old = before.get(id(p), {})
            for k, v in list(opt.state[p].items()):
                if isinstance(v, Tensor) and isinstance(old.get(k), Tensor) and \
                        old[k].shape == v.shape:
                    old[k].copy_(v)
                    opt.state[p][k] = old[k]
                elif isinstance(v, Tensor) and k == "step":
                    opt.state[p][k] = v.to(device=p.device, dtype=torch.float32)


# --------------------------------------------------------------------------- building

@dataclass
class Optimizers:
    """The run's optimizers (one, or SGD + Muon) seen as one: parameter groups and their
    update rules, state, zero_grad, state dicts. `step(lrs, momentum)` is the whole
    optimizer update of a training step (see the module docstring)."""

    optimizers: list[torch.optim.Optimizer]
    base_momentum: list[float] = field(default_factory=list)
    impl: str = "foreach"                                 # resolved optim.impl
    groups: list[GroupState] = field(init=False, repr=False)

    def __post_init__(self):
        if self.impl != "triton":  # fastres' Triton SGD creates its own (zero) buffers
            for opt in self.optimizers:
                init_state_(opt)
        self.groups = []
        for opt in self.optimizers:
            kind = ("triton" if self.impl == "triton" else
                    "muon" if isinstance(opt, Muon) else
                    "adam" if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) else "sgd")
            names = UPDATE_RULES[kind][1]
            for g in opt.param_groups:
                params = [p for p in g["params"] if p.requires_grad]
                state = {k: [opt.state[p][k] for p in params] for k in names
                         if params and k in opt.state[params[0]]}
                batches = shape_groups(params) if kind == "muon" else None
                self.groups.append(GroupState(opt, len(self.groups), kind, g, params, state,
                                              batches, rule_options(opt)))

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def params_with_grads(self) -> list[Tensor]:
        """The parameters that got a gradient this step."""
        return [p for g in self.groups for p in g.params if p.grad is not None]

    def step(self, lrs: Tensor, momentum: Tensor | None = None,
             ema_decay: Tensor | None = None, found_inf: Tensor | None = None) -> None:
        """Update every parameter that has a gradient: `lrs[g.index]` is group g's learning
        rate (a device tensor), `momentum` the scheduled momentum (None: each group's own),
        `ema_decay` the decay for an optimizer that averages the weights in its own pass.
        `found_inf` (fp16: non-zero when the gradients overflowed) goes to the Triton SGD,
        which then writes nothing: its momentum buffers and EMA are its own, outside
        `state_tensors()`, so the caller's restore of a skipped step cannot cover them."""
        fused = []
        for g in self.groups:
            params = [p for p in g.params if p.grad is not None]
            if not params:
                continue
            state = g.state
            if len(params) != len(g.params):  # some parameters got no gradient this step
                state = {k: [v for p, v in zip(g.params, vs) if p.grad is not None]
                         for k, vs in g.state.items()}
            rule = UPDATE_RULES[g.kind][0]
            rule(g, params, [p.grad for p in params], state, lrs[g.index], momentum,
                 self.impl)
            if g.kind == "triton":
                fused.append(g.opt)
        for opt in dict.fromkeys(fused):
            opt.step(found_inf=found_inf,
                     **({"ema_decay": ema_decay} if opt.accepts_ema_decay else {}))

    def state_tensors(self) -> list[Tensor]:
        """Every optimizer state tensor the update rules mutate."""
        return [t for g in self.groups for vs in g.state.values() for t in vs]

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dict(self, states: list[dict]) -> None:
        """Load in place (see `load_state_inplace_`)."""
        if len(states) != len(self.optimizers):
            raise ValueError("optimizer state does not match this run's optimizers")
        for opt, st in zip(self.optimizers, states):
            load_state_inplace_(opt, st)


def build_optimizers(model: nn.Module, o: OptimConfig, *, ema_shadows=None,
                     ns_dtype: torch.dtype | None = None) -> Optimizers:
    """The optimizer(s) for `model` as `o` describes, with their state created.

    `o.impl` must already be resolved (not "auto"). `ema_shadows` (id(parameter) -> fp32
    shadow, from `EMA.shadows_by_param`) are handed to the Triton SGD, which updates them in
    the same pass as the weights. `ns_dtype`: Muon's Newton-Schulz dtype (default: bf16 on
    a GPU, fp32 on a CPU; `TrainStep` passes `ns_dtype_for(precision)`).
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters")
    if o.impl == "auto":
        raise ConfigError("optim.impl must be resolved (fastres.config.resolve) before "
                          "building optimizers")
    if o.name == "muon":
        roles = param_roles(model)
        sgd_groups = param_groups(model, o, roles_for_sgd={"other", "head", "norm", "bias",
                                                            "whiten_bias"})
        filters = [p for n, p in model.named_parameters() if roles.get(n) == "filter"]
        opts = []
        if sgd_groups:
            opts.append(torch.optim.SGD(sgd_groups, lr=o.lr, momentum=o.momentum,
                                        nesterov=o.nesterov))
        if filters:
            opts.append(Muon([dict(params=filters, lr=o.muon_lr, base_lr=o.muon_lr,
                                   role="filter")],
                             lr=o.muon_lr, momentum=o.muon_momentum, nesterov=o.nesterov,
                             ns_steps=o.muon_ns_steps,
                             ns_dtype=ns_dtype or default_ns_dtype(filters[0].device),
                             ns_coefficients=o.muon_ns_coefficients))
        return Optimizers(opts, [o.momentum], o.impl)
    elif o.name == "sgd":
        groups = param_groups(model, o)
        if o.impl == "triton":
            from fastres.kernels import FusedSGD

            ema_kw = {}
            if ema_shadows is not None:
                ema_kw = dict(ema_decay=o.ema_decay, ema_tensors=[
                    ema_shadows[id(p)] for g in groups for p in g["params"]])
            opt = FusedSGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, **ema_kw)
            opt.accepts_ema_decay = ema_shadows is not None
        else:
            opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
        return Optimizers([opt], [o.momentum], o.impl)
    elif o.name in ("adam", "adamw"):
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        return Optimizers([cls(param_groups(model, o), lr=o.lr, betas=o.betas, eps=o.eps)],
                          [o.betas[0]], o.impl)
    raise ConfigError(f"unknown optimizer {o.name!r}")
