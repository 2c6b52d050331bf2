"""`TrainStep`: the one training step of fastres.

One call, `step(x, y)`, is one optimizer step on one batch:

    forward + loss + backward    in micro-batches when `run.micro_batch` is smaller than the
                                 batch (gradients accumulate; DDP all-reduces only after the
                                 last one), under autocast, through the fp16 loss scaler
    unscale, clip                fp16: unscale and find infs; `optim.grad_clip`
    optimizer update(s)          SGD / Adam(W) / Muon + SGD, or fastres' Triton SGD+EMA,
                                 learning rates from the schedule, the whitening-bias schedule
                                 and phase 2 (norm lr 0), momentum cycling
    EMA                          of the weights and BatchNorm statistics
    bookkeeping                  the epoch's loss, correct predictions, first non-finite step
                                 and skipped (fp16) steps, summed on the device

Every per-step scalar is a device tensor looked up from tables indexed by a device step
counter: learning rates per parameter group, momentum, EMA decay. The tables are computed
once from the pure schedule functions in `fastres.engine.schedules` (and `EMA.decay_at`), so
they hold exactly the values the schedules define, and nothing in the step reads a device
value on the host or branches on one. That is what lets `run.compile=step` compile the whole
step -- forward, backward, optimizer, EMA, schedules -- as one graph with
`torch.compile(fullgraph=True)` and replay it as a CUDA graph (`run.cuda_graph`).

Phase 2 of the two-phase recipe (BatchNorm frozen) changes the modules' mode, which a graph
bakes in; it is a second compiled function (its own code object, compiled during warm-up),
so crossing into phase 2 switches graphs instead of recompiling.

Modes (`run.compile`): `off` runs the step eagerly; `on` compiles the model's forward (and
its backward through AOTAutograd) and runs the rest eagerly; `step` compiles everything. The
arithmetic is the same in all three (`fastres.engine.optim`'s update functions).

A 30-line training loop:

    cfg = resolve(preset("speedrun"), "cuda")
    model = create_model("airbench94").cuda().to(memory_format=torch.channels_last)
    step = TrainStep(cfg, model, steps_per_epoch=len(loader))
    for epoch in range(8):
        loader.set_epoch(epoch)
        for x, y in loader:
            step(x, y)
        print(step.epoch_totals())   # one host sync per epoch
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastres.config import Config
from fastres.distributed import Dist
from fastres.errors import ConfigError

from .ema import EMA, ema_update_, float_tensors
from .evaluate import autocast_for
from .optim import (Muon, Optimizers, adam_update_, build_optimizers, default_ns_dtype,
                    muon_update_, sgd_update_, shape_groups)
from .schedules import lr_factor, momentum_at, phase2_start, total_steps, whiten_bias_factor

__all__ = ["TrainStep", "LossScaler", "EpochTotals", "GraphReport", "check_graph",
           "micro_batches", "set_bn_frozen", "unwrap"]

PhaseHook = Callable[[str], None]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def micro_batches(n: int, micro: int) -> list[tuple[int, int]]:
    """(start, stop) of the micro-batches a batch of `n` is split into: as few as keep each
    at most `micro` (0: the whole batch), sizes as equal as possible -- 512 at 500 is 256 +
    256, not 500 + 12, whose BatchNorm statistics would come from 12 images."""
    k = -(-n // micro) if 0 < micro < n else 1
    size, extra = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        stop = start + size + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def set_bn_frozen(net: nn.Module, frozen: bool) -> None:
    """Training mode, with every BatchNorm in eval mode when `frozen` (phase 2: BatchNorm
    uses and keeps its running statistics)."""
    net.train()
    if frozen:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class LossScaler:
    """Dynamic loss scaling for fp16, on the device: the scale grows by `growth_factor` after
    `growth_interval` finite steps and shrinks by `backoff_factor` at a non-finite one, whose
    update is skipped. torch.amp.GradScaler's arithmetic (its own ops), without its host
    sync: the skip is decided on the device, and skipped steps are counted there."""

    def __init__(self, device: torch.device, init_scale: float = 2.0 ** 16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval

    def unscale_(self, grads: list[Tensor]) -> Tensor:
        """Divide `grads` by the scale in place; returns found_inf (0-d fp32: 1.0 if any
        gradient is inf or NaN)."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        inv = self.scale.double().reciprocal().float()
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_inf, inv)
        return found_inf

    def update_(self, found_inf: Tensor) -> None:
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(torch.as_tensor(state["scale"]))
        self.growth_tracker.copy_(torch.as_tensor(state["growth_tracker"]))


@dataclass
class EpochTotals:
    """Sums over the steps since `reset_totals()`, read once (one host sync)."""

    loss_sum: float        # sum of the step losses (each as `optim.loss_reduction` defines)
    correct: int           # correct top-1 predictions on the training batches
    steps: int             # optimizer steps taken
    first_nonfinite: int   # first step whose loss was NaN/inf since the run began, or -1
    skipped: int           # fp16 steps skipped for non-finite gradients, since the run began


@dataclass
class _Group:
    """One parameter group's tensors, gathered once (state tensors are never replaced)."""

    opt_index: int
    index: int             # row in the lr table
    kind: str              # sgd | adam | muon | triton
    group: dict
    params: list[Tensor]
    state: dict[str, list[Tensor]]


class TrainStep:
    """The training step of `cfg` for `model`; see the module docstring.

    Args:
        cfg: a resolved Config (`fastres.config.resolve`).
        model: the plain module, already on its device and memory format.
        steps_per_epoch: optimizer steps per epoch (the schedules' time base).
        dist: the process group description (DDP when `dist.enabled`).
        net: what the forward pass calls, if not `model` (a DDP wrapper); `run.compile=on`
            compiles it.
        fullgraph: `run.compile=step` compiles with fullgraph=True (a graph break is an
            error); `fastres profile --check-graph` passes False to count the breaks.

    Public state: `model`, `net`, `optimizers` (torch optimizers as state containers), `ema`,
    `scaler` (fp16), `step` (host count of steps taken), `total`, `phase2` (first step of
    phase 2, == total when off).
    """

    def __init__(self, cfg: Config, model: nn.Module, *, steps_per_epoch: int,
                 dist: Dist = Dist(), net: nn.Module | None = None, fullgraph: bool = True):
        r, o, s = cfg.run, cfg.optim, cfg.schedule
        if "auto" in (r.precision, r.compile, o.impl, r.device, r.cuda_graph):
            raise ConfigError("TrainStep needs a resolved config: call fastres.config.resolve("
                              "cfg, device) first")
        if steps_per_epoch <= 0:
            raise ConfigError("TrainStep needs steps_per_epoch > 0")
        self.cfg, self.model, self.dist = cfg, model, dist
        self.device = torch.device(r.device)
        self.mode = r.compile
        if self.mode == "step":
            _check_step_compile(cfg, dist)
        self.total = total_steps(s, steps_per_epoch)
        self.phase2 = phase2_start(s, steps_per_epoch)
        self.steps_per_epoch = steps_per_epoch
        self.whiten_steps = math.ceil(o.whiten_bias_epochs * steps_per_epoch)
        self.micro = r.micro_batch or 0
        self.criterion_scale = float(dist.world_size) if o.loss_reduction == "sum" else 1.0

        self.ema = EMA(model, o.ema_decay, o.ema_every, o.ema_warmup) if o.ema_decay > 0 \
            else None
        self.triton_ema = self.ema is not None and o.impl == "triton"
        self.optimizers: Optimizers = build_optimizers(
            model, o, ema_shadows=self.ema.shadows_by_param(model) if self.triton_ema else None)
        self.scaler = LossScaler(self.device) if r.precision == "fp16" else None
        self.ns_dtype = default_ns_dtype(self.device)

        self._groups = self._gather_groups()
        self._build_tables()
        self._ema_pairs = self._gather_ema()
        self._t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.step = 0
        self._loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self._correct = torch.zeros((), dtype=torch.int64, device=self.device)
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._skipped = torch.zeros((), dtype=torch.int64, device=self.device)
        self._epoch_start = 0

        net = net if net is not None else model
        self.net = torch.compile(net, mode=r.compile_mode) if self.mode == "on" else net
        self._compiled = None
        if self.mode == "step":
            mode = r.compile_mode
            if r.cuda_graph == "on" and mode == "default":
                mode = "reduce-overhead"  # Inductor's CUDA-graph trees replay the step
            kw = dict(fullgraph=fullgraph, mode=mode)
            self._compiled = (torch.compile(self._phase1_step, **kw),
                              torch.compile(self._phase2_step, **kw))
            if r.cuda_graph == "on":
                # The step mutates its state in place (optimizer state, EMA, tables'
                # counter, sums): CUDA-graph trees replay such a graph only when the
                # mutated tensors have fixed addresses, as torch's compiled optimizers
                # mark theirs. (Parameters and module buffers are static already.)
                for t in self._state_tensors():
                    torch._dynamo.mark_static_address(t)
        self._frozen = None
        self.train_mode()

    # ------------------------------------------------------------------ set-up

    def _gather_groups(self) -> list[_Group]:
        groups = []
        for oi, opt in enumerate(self.optimizers.optimizers):
            kind = ("triton" if self.cfg.optim.impl == "triton" else  # FusedSGD
                    "muon" if isinstance(opt, Muon) else
                    "adam" if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) else "sgd")
            for g in opt.param_groups:
                params = [p for p in g["params"] if p.requires_grad]
                names = {"sgd": ("momentum_buffer",), "muon": ("momentum_buffer",),
                         "adam": ("exp_avg", "exp_avg_sq", "step"), "triton": ()}[kind]
                state = {k: [opt.state[p][k] for p in params] for k in names
                         if params and k in opt.state[params[0]]}
                groups.append(_Group(oi, len(groups), kind, g, params, state))
        return groups

    def _build_tables(self) -> None:
        """Per-step values of every schedule, as device tables indexed by the step counter
        (rows: parameter groups for lr). Computed once from the pure schedule functions."""
        s = self.cfg.schedule
        n = max(self.total, 1)
        factor = [lr_factor(t, self.total, s, self.phase2) for t in range(n)]
        whiten = [whiten_bias_factor(t, self.whiten_steps) for t in range(n)]
        rows = []
        for g in self._groups:
            base, role = g.group["base_lr"], g.group.get("role")
            if role == "whiten_bias":
                row = [base * w for w in whiten]
            elif role == "norm":  # phase 2: frozen affine (robust under DDP and compile)
                row = [0.0 if t >= self.phase2 else base * f for t, f in enumerate(factor)]
            else:
                row = [base * f for f in factor]
            rows.append(row)
        self._lr = torch.tensor(rows, dtype=torch.float32, device=self.device).reshape(
            len(rows), n)
        self._momentum = None
        if s.cycle_momentum:
            base = self.optimizers.base_momentum[0]
            self._momentum = torch.tensor([momentum_at(t, self.total, s, base)
                                           for t in range(n)], dtype=torch.float32,
                                          device=self.device)
        self._ema_decay = None
        if self.ema is not None:
            self._ema_decay = torch.tensor([self.ema.decay_at(t) for t in range(n)],
                                           dtype=torch.float32, device=self.device)

    def _gather_ema(self):
        if self.ema is None:
            return None
        _, live = float_tensors(self.model)
        n_params = len(list(self.model.parameters()))
        start = n_params if self.triton_ema else 0  # the Triton SGD averages the weights
        buffers = dict(self.model.named_buffers())
        ints = [(self.ema.int_shadow[name], buffers[name]) for name in self.ema.int_shadow]
        return self.ema.shadow[start:], live[start:], ints

    # ------------------------------------------------------------------ the step

    def __call__(self, x: Tensor, y: Tensor, on_phase: PhaseHook | None = None
                 ) -> tuple[Tensor, Tensor]:
        """One optimizer step on the batch (x, y). Returns the batch loss and the number of
        correct predictions as device tensors (no host sync). Under a CUDA graph they are
        overwritten by the next call: clone them to keep them. `on_phase(name)` is called
        at phase boundaries ("forward", "backward", "optimizer"; "step" when the whole step
        is one compiled graph), for profilers."""
        frozen = self.step >= self.phase2
        if frozen != self._frozen:
            self.train_mode()
        if self._compiled is not None:
            if on_phase is not None:
                on_phase("step")
            out = _traced_call(self._compiled[1 if frozen else 0], x, y)
        else:
            out = self._body(x, y, on_phase)
        self.step += 1
        if self.ema is not None:
            self.ema.updates = self.ema.updates_before(self.step)
        return out

    def _phase1_step(self, x, y):
        return self._body(x, y, None)

    def _phase2_step(self, x, y):  # its own code object: its own compiled graph
        return self._body(x, y, None)

    def _body(self, x: Tensor, y: Tensor, on_phase: PhaseHook | None):
        loss, correct = self._forward_backward(x, y, on_phase)
        if on_phase is not None:
            on_phase("optimizer")
        with torch.no_grad():
            skipped = self._update()
            bad = ~torch.isfinite(loss)
            self._first_bad.copy_(torch.where(bad & (self._first_bad < 0), self._t,
                                              self._first_bad))
            self._loss_sum.add_(torch.where(bad, 0.0, loss))
            self._correct.add_(correct)
            if skipped is not None:
                self._skipped.add_(skipped)
            self._t.add_(1)
        return loss, correct

    def _forward_backward(self, x: Tensor, y: Tensor, on_phase: PhaseHook | None):
        o = self.cfg.optim
        n = len(y)
        bounds = micro_batches(n, self.micro)
        loss_total = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        ddp = self.dist.enabled and hasattr(self.net, "no_sync")
        for i, (start, stop) in enumerate(bounds):
            xs, ys = x[start:stop], y[start:stop]
            last = i == len(bounds) - 1
            sync = self.net.no_sync() if ddp and not last else contextlib.nullcontext()
            with sync:
                if on_phase is not None:
                    on_phase("forward")
                with autocast_for(self.device, self.cfg.run.precision):
                    out = self.net(xs)
                    loss = F.cross_entropy(out.float(), ys, label_smoothing=o.label_smoothing,
                                           reduction=o.loss_reduction)
                if o.loss_reduction == "mean" and len(ys) != n:
                    loss = loss * (len(ys) / n)  # the mean over the whole batch
                backward_loss = loss * self.criterion_scale if self.criterion_scale != 1 \
                    else loss
                if self.scaler is not None:
                    backward_loss = backward_loss * self.scaler.scale
                if on_phase is not None:
                    on_phase("backward")
                backward_loss.backward()
            loss_total += loss.detach().float()
            correct += (out.detach().argmax(1) == ys).sum()
        return loss_total, correct

    def _update(self) -> Tensor | None:
        """Optimizer update(s), EMA, zero_grad. Returns the skipped flag (fp16) or None."""
        o = self.cfg.optim
        t = self._t.clamp(max=self._lr.shape[1] - 1).view(1)
        lrs = self._lr.index_select(1, t).view(-1)  # one lr per group, on the device
        momentum = self._momentum.index_select(0, t).view(()) if self._momentum is not None \
            else None
        decay = self._ema_decay.index_select(0, t).view(()) if self._ema_decay is not None \
            else None
        live = [(g, [p for p in g.params if p.grad is not None]) for g in self._groups]
        with_grads = [p for _, ps in live for p in ps]
        found_inf = None
        if self.scaler is not None:
            found_inf = self.scaler.unscale_([p.grad for p in with_grads])
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(with_grads, o.grad_clip, foreach=True)
        guard = _SkipGuard(found_inf, self._guarded_tensors()) if found_inf is not None \
            else contextlib.nullcontext()
        with guard:
            triton = []
            for g, ps in live:
                if g.kind == "triton":  # one FusedSGD.step() below covers all its groups
                    g.group["lr"] = lrs[g.index]
                    if momentum is not None:
                        g.group["momentum"] = momentum
                    triton.append(self.optimizers.optimizers[g.opt_index])
                else:
                    self._update_group(g, ps, lrs[g.index], momentum)
            for opt in dict.fromkeys(triton):
                opt.step(**({"ema_decay": decay} if opt.accepts_ema_decay else {}))
            if self._ema_pairs is not None:
                shadow, tensors, ints = self._ema_pairs
                ema_update_(shadow, tensors, decay)
                due = decay < 1.0
                for s, v in ints:
                    s.copy_(torch.where(due, v, s))
        if found_inf is not None:
            self.scaler.update_(found_inf)
        for p in with_grads:
            p.grad = None
        return found_inf.long() if found_inf is not None else None

    def _update_group(self, g: _Group, ps: list[Tensor], lr: Tensor, momentum) -> None:
        o, group = self.cfg.optim, g.group
        if not ps:
            return
        if len(ps) != len(g.params):  # some parameters got no gradient this step
            keep = {id(p) for p in ps}
            state = {k: [v for p, v in zip(g.params, vs) if id(p) in keep]
                     for k, vs in g.state.items()}
        else:
            state = g.state
        grads = [p.grad for p in ps]
        impl = o.impl  # fused never meets a momentum schedule: config.validate refuses it
        if g.kind == "sgd":
            m = momentum if momentum is not None else group["momentum"]
            sgd_update_(ps, grads, state.get("momentum_buffer"), lr=lr, momentum=m,
                        weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                        impl=impl)
        elif g.kind == "adam":
            beta1, beta2 = group["betas"]
            b1 = momentum if momentum is not None else beta1
            adam_update_(ps, grads, state["exp_avg"], state["exp_avg_sq"], state["step"],
                         lr=lr, beta1=b1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"],
                         decoupled=isinstance(self.optimizers.optimizers[g.opt_index],
                                              torch.optim.AdamW),
                         impl=impl)
        elif g.kind == "muon":
            muon_update_(ps, grads, state["momentum_buffer"], lr=lr,
                         momentum=group["momentum"], nesterov=group["nesterov"],
                         ns_steps=group["ns_steps"], ns_dtype=self.ns_dtype,
                         groups=None if len(ps) != len(g.params) else self._muon_groups(g))

    def _muon_groups(self, g: _Group) -> list[list[int]]:
        cache = self.__dict__.setdefault("_muon_cache", {})
        if g.index not in cache:
            cache[g.index] = shape_groups(g.params)
        return cache[g.index]

    def _state_tensors(self) -> list[Tensor]:
        """Every tensor the step keeps besides the model's own: optimizer and EMA state,
        schedule tables, counters, sums, the loss scale."""
        out = [t for g in self._groups for vs in g.state.values() for t in vs]
        if self._ema_pairs is not None:
            out += list(self._ema_pairs[0]) + [s for s, _ in self._ema_pairs[2]]
        out += [t for t in (self._lr, self._momentum, self._ema_decay) if t is not None]
        out += [self._t, self._loss_sum, self._correct, self._first_bad, self._skipped]
        if self.scaler is not None:
            out += [self.scaler.scale, self.scaler.growth_tracker]
        return out

    def _guarded_tensors(self) -> list[Tensor]:
        """What a skipped (fp16, non-finite) step must leave unchanged."""
        out = [p for g in self._groups for p in g.params]
        out += [t for g in self._groups for vs in g.state.values() for t in vs]
        if self._ema_pairs is not None:
            out += list(self._ema_pairs[0]) + [s for s, _ in self._ema_pairs[2]]
        return out

    # ------------------------------------------------------------------ host side

    def train_mode(self) -> None:
        """Put the network in the mode the current step calls for (BatchNorm frozen from
        `phase2` on). The step switches modes itself when it crosses `phase2`; call this
        after anything else changed them (an evaluation leaves the model in train mode with
        BatchNorm unfrozen)."""
        frozen = self.step >= self.phase2
        set_bn_frozen(self.net, frozen)
        self._frozen = frozen

    def lr_factor(self, step: int | None = None) -> float:
        """The schedule's lr multiplier at `step` (default: the last step taken); host
        math, no sync."""
        step = max(self.step - 1, 0) if step is None else step
        return lr_factor(step, self.total, self.cfg.schedule, self.phase2)

    def set_step(self, step: int) -> None:
        """Continue from `step` (resume, or a graph check that jumps to phase 2)."""
        self.step = int(step)
        self._t.fill_(int(step))
        if self.ema is not None:
            self.ema.updates = self.ema.updates_before(self.step)
        self.train_mode()

    def reset_totals(self) -> None:
        """Start a new epoch's sums (loss, correct); the non-finite and skipped records
        run for the whole run."""
        self._loss_sum.zero_()
        self._correct.zero_()
        self._epoch_start = self.step

    def epoch_totals(self) -> EpochTotals:
        """The sums since `reset_totals()`. One host sync (call at epoch ends and log
        points)."""
        loss, correct, first, skipped = torch.stack([
            self._loss_sum.double(), self._correct.double(), self._first_bad.double(),
            self._skipped.double()]).tolist()  # host sync
        return EpochTotals(loss_sum=loss, correct=int(correct),
                           steps=self.step - self._epoch_start, first_nonfinite=int(first),
                           skipped=int(skipped))

    def state_dict(self) -> dict:
        return {"optimizers": self.optimizers.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "step": self.step, "first_nonfinite": int(self._first_bad),
                "skipped": int(self._skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Load in place: every tensor the step holds (and a compiled graph captured) stays
        the same object."""
        self.optimizers.load_state_dict(state["optimizers"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._first_bad.fill_(int(state.get("first_nonfinite", -1)))
        self._skipped.fill_(int(state.get("skipped", 0)))
        self.set_step(int(state.get("step", 0)))

    @contextlib.contextmanager
    def rehearsal(self):
        """Run steps that do not count (warm-up, graph checks): weights, BatchNorm
        statistics, optimizer/EMA/scaler state, counters and RNG are restored on exit."""
        model_state = copy.deepcopy(unwrap(self.model).state_dict())
        step_state = copy.deepcopy(self.state_dict())
        sums = (self._loss_sum.clone(), self._correct.clone(), self._epoch_start)
        rng = _rng_state(self.device)
        try:
            yield self
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            unwrap(self.model).load_state_dict(model_state)
            self.load_state_dict(step_state)
            self._loss_sum.copy_(sums[0])
            self._correct.copy_(sums[1])
            self._epoch_start = sums[2]
            _set_rng_state(rng, self.device)
            self.optimizers.zero_grad()

    def warm_up(self, x: Tensor, y: Tensor, steps: int = 3) -> None:
        """Compile and autotune on (x, y) -- random data of the real shapes --, both phases
        when the run has a phase 2, then restore everything (`rehearsal`)."""
        with self.rehearsal():
            for _ in range(steps):
                self(x, y)
            if self.mode != "off" and self.phase2 < self.total:
                self.set_step(self.phase2)
                for _ in range(min(steps, 2)):
                    self(x, y)


@dataclass
class GraphReport:
    """What `check_graph` found: graph breaks (with Dynamo's reason for each), graphs
    compiled after each phase function's first call ("recompiles"), graphs in all, and the
    steps that were run."""

    breaks: int
    reasons: list[str]
    recompiles: int
    graphs: int
    steps: list[int]

    def line(self) -> str:
        return f"graph breaks: {self.breaks}, recompiles: {self.recompiles}"


def check_graph(cfg: Config, model: nn.Module, x: Tensor, y: Tensor, *,
                steps_per_epoch: int) -> GraphReport:
    """Compile `cfg`'s training step whole (run.compile=step) without fullgraph, run it at
    steps 0, 1, 2, at the first two steps of phase 2 (when the recipe has one), back in
    phase 1 at a later step and at the last step -- so the learning rates and the phase
    change between calls -- and count what Dynamo did: graph breaks and their reasons, and
    graphs compiled after each phase function's first call (each one a recompile). Weights
    and state are restored afterwards (`TrainStep.rehearsal`). Resets Dynamo's caches.

    The CPU-side proof that nothing in the step forces the host: 0 breaks and 0
    recompiles mean one graph per phase, replayable as a CUDA graph."""
    from fastres import config as C
    from torch._dynamo.utils import counters

    cfg = C.replace(cfg, run={"compile": "step", "cuda_graph": "off"})
    torch._dynamo.reset()
    counters.clear()

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"])

    step = TrainStep(cfg, model, steps_per_epoch=steps_per_epoch, fullgraph=False)
    ran = []

    def at(n: int) -> None:
        step.set_step(n)
        step(x, y)
        ran.append(n)

    with step.rehearsal():
        for n in range(min(3, step.total)):
            at(n)
        expected = graphs()
        if step.phase2 < step.total:
            at(step.phase2)
            expected = graphs()  # the phase-2 function's first compile is not a recompile
            if step.phase2 + 1 < step.total:
                at(step.phase2 + 1)
        for n in sorted({max(3, step.phase2 - 1), step.total // 2, step.total - 1}):
            if 3 <= n < step.total and n not in ran:
                at(n)
    reasons = [f"{reason} (x{count})" for reason, count in counters["graph_break"].items()]
    return GraphReport(breaks=sum(counters["graph_break"].values()), reasons=reasons,
                       recompiles=graphs() - expected, graphs=graphs(), steps=ran)


def _check_step_compile(cfg: Config, dist: Dist) -> None:
    """What run.compile=step cannot do, as one clear error each."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        raise ConfigError(f"run.compile=step needs torch >= 2.11 (Dynamo's "
                          f"trace_autograd_ops); this is torch {torch.__version__}: use "
                          "run.compile=on")
    if dist.enabled:
        raise ConfigError("run.compile=step does not support DDP yet (the gradient all-reduce "
                          "would break the graph); use run.compile=on with several processes")
    if cfg.optim.impl == "triton":
        raise ConfigError("optim.impl=triton (the Triton SGD+EMA step) runs eagerly; with "
                          "run.compile=step use optim.impl=foreach or fused")


def _traced_call(fn, x: Tensor, y: Tensor):
    """Call a compiled step with Dynamo allowed to trace `loss.backward()` into its graph
    (torch >= 2.11; read when Dynamo compiles). Set and restored directly: ~1 us, where
    `torch._dynamo.config.patch` costs ~30-60 us, a host cost paid every step."""
    config = torch._dynamo.config
    previous = config.trace_autograd_ops
    config.trace_autograd_ops = True
    try:
        return fn(x, y)
    finally:
        config.trace_autograd_ops = previous


class _SkipGuard:
    """fp16: leave `tensors` unchanged when `found_inf` is set, without a host sync (the
    update is computed, then undone with torch.where). Costs one copy of the guarded
    tensors per step; bf16 and fp32 runs never pay it."""

    def __init__(self, found_inf: Tensor, tensors: list[Tensor]):
        self.found_inf, self.tensors = found_inf, tensors

    def __enter__(self):
        self.saved = [t.clone() for t in self.tensors]

    def __exit__(self, *exc):
        if exc[0] is None:
            skip = self.found_inf > 0
            for t, s in zip(self.tensors, self.saved):
                t.copy_(torch.where(skip, s, t))
        return False


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
