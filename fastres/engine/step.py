"""`TrainStep`: the one training step of fastres.

One call, `step(x, y)`, is one optimizer step on one batch:

    forward + loss + backward    in micro-batches when `run.micro_batch` is smaller than the
                                 batch (gradients accumulate; DDP all-reduces after the last
                                 one), under autocast, through the fp16 loss scaler (amp.py)
    unscale, clip                fp16: unscale and find infs; `optim.grad_clip`
    optimizer update(s)          each optimizer kind's rule (optim.py), with the learning
                                 rates, momentum and EMA decay of this step
    EMA                          of the weights and BatchNorm statistics
    bookkeeping                  the epoch's loss and correct predictions, the first
                                 non-finite step and skipped (fp16) steps, summed on the device

Every per-step scalar is a device tensor looked up from a table indexed by a device step
counter; the tables are computed once from the pure schedule functions
(`fastres.engine.schedules`, `EMA.decay_at`). Nothing in the step reads a device value on the
host or branches on one, which is what lets `run.compile=step` compile it whole and replay
it as a CUDA graph (compile.py). Phase 2 of the two-phase recipe (BatchNorm frozen) is a
second compiled function, so crossing into it switches graphs instead of recompiling.

`TrainStep` is the step only; `fastres.engine.Session` owns what a run needs around it (the
device, the model's data-dependent init, DDP, the evaluation weights, checkpoints).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastres.config import Config
from fastres.distributed import Dist
from fastres.errors import ConfigError

from .amp import LossScaler, autocast_for, skip_if_nonfinite
from .compile import check_step_compile, compile_phases, traced_call
from .ema import EMA
from .modes import micro_batches, rng_state, set_bn_frozen, set_rng_state, unwrap
from .optim import Optimizers, build_optimizers, ns_dtype_for
from .schedules import ScheduleTables, lr_factor, phase2_start, total_steps
from .totals import EpochTotals, StepTotals

__all__ = ["TrainStep", "EpochTotals", "micro_batches", "set_bn_frozen", "unwrap"]

PhaseHook = Callable[[str], None]


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
            error); `check_graph` passes False to count the breaks.
        device: where the step's own tensors live (default `cfg.run.device`); `check_graph`
            passes a CPU stand-in to trace a GPU configuration on a CPU.

    Public state: `model`, `net`, `optimizers`, `ema`, `scaler` (fp16), `step` (host count of
    steps taken), `total`, `phase2` (first step of phase 2, == total when off).
    """

    def __init__(self, cfg: Config, model: nn.Module, *, steps_per_epoch: int,
                 dist: Dist = Dist(), net: nn.Module | None = None, fullgraph: bool = True,
                 device: torch.device | str | None = None):
        r, o, s = cfg.run, cfg.optim, cfg.schedule
        if "auto" in (r.precision, r.compile, o.impl, r.device, r.cuda_graph):
            raise ConfigError("TrainStep needs a resolved config: call fastres.config.resolve("
                              "cfg, device) first")
        if steps_per_epoch <= 0:
            raise ConfigError("TrainStep needs steps_per_epoch > 0")
        self.cfg, self.model, self.dist = cfg, model, dist
        self.device = torch.device(device if device is not None else r.device)
        self.mode = r.compile
        if self.mode == "step":
            check_step_compile(cfg, dist)
        self.steps_per_epoch = steps_per_epoch
        self.total = total_steps(s, steps_per_epoch)
        self.phase2 = phase2_start(s, steps_per_epoch)
        self.micro = r.micro_batch or 0
        self.criterion_scale = float(dist.world_size) if o.loss_reduction == "sum" else 1.0

        self.ema = EMA(model, o.ema_decay, o.ema_every, o.ema_warmup) if o.ema_decay > 0 \
            else None
        triton_ema = self.ema is not None and o.impl == "triton"  # averaged in its own pass
        self.optimizers: Optimizers = build_optimizers(
            model, o, ema_shadows=self.ema.shadows_by_param(model) if triton_ema else None,
            ns_dtype=ns_dtype_for(r.precision))
        self.scaler = LossScaler(self.device) if r.precision == "fp16" else None
        self.tables = ScheduleTables(
            s, self.total, self.phase2,
            [(g.group["base_lr"], g.group.get("role")) for g in self.optimizers.groups],
            whiten_steps=math.ceil(o.whiten_bias_epochs * steps_per_epoch),
            base_momentum=self.optimizers.base_momentum[0],
            ema_decay_at=self.ema.decay_at if self.ema else None, device=self.device)
        if self.ema is not None:
            self.ema.bind(model, skip_params=triton_ema)
        self._t = torch.zeros((), dtype=torch.int64, device=self.device)  # the step, on device
        self.totals = StepTotals(self.device)
        self.step, self._epoch_start = 0, 0

        net = net if net is not None else model
        self.net = torch.compile(net, mode=r.compile_mode) if self.mode == "on" else net
        self._compiled = compile_phases(self, fullgraph=fullgraph) if self.mode == "step" \
            else None
        self._frozen = None
        self.train_mode()

    # ------------------------------------------------------------------ the step

    def __call__(self, x: Tensor, y: Tensor, on_phase: PhaseHook | None = None
                 ) -> tuple[Tensor, Tensor]:
        """One optimizer step on (x, y). Returns the batch loss and correct predictions as
        device tensors (no sync; a CUDA graph's next call overwrites them). `on_phase(name)`
        marks phase boundaries for profilers: forward, backward, optimizer, or step (when
        the whole step is one compiled graph)."""
        frozen = self.step >= self.phase2
        if frozen != self._frozen:
            self.train_mode()
        if self._compiled is not None:
            if on_phase is not None:
                on_phase("step")
            out = traced_call(self._compiled[1 if frozen else 0], x, y)
        else:
            out = self._body(x, y, on_phase)
        self.step += 1
        if self.ema is not None:
            self.ema.updates = self.ema.updates_before(self.step)
        return out

    def _phase1_step(self, x, y):
        return self._body(x, y, None)

    def _phase2_step(self, x, y):  # its own code object, so its own compiled graph
        return self._body(x, y, None)

    def _body(self, x: Tensor, y: Tensor, on_phase: PhaseHook | None):
        loss, correct = self._forward_backward(x, y, on_phase)
        if on_phase is not None:
            on_phase("optimizer")
        with torch.no_grad():
            skipped = self._update()
            self.totals.add_(loss, correct, skipped, self._t)
            self._t.add_(1)
        return loss, correct

    def _forward_backward(self, x: Tensor, y: Tensor, on_phase: PhaseHook | None):
        o, n = self.cfg.optim, len(y)
        bounds = micro_batches(n, self.micro)
        loss_total = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        ddp = self.dist.enabled and hasattr(self.net, "no_sync")
        for i, (start, stop) in enumerate(bounds):
            xs, ys = x[start:stop], y[start:stop]
            last = i == len(bounds) - 1
            with self.net.no_sync() if ddp and not last else contextlib.nullcontext():
                if on_phase is not None:
                    on_phase("forward")
                with autocast_for(self.device, self.cfg.run.precision):
                    out = self.net(xs)
                    loss = F.cross_entropy(out.float(), ys, label_smoothing=o.label_smoothing,
                                           reduction=o.loss_reduction)
                if o.loss_reduction == "mean" and len(ys) != n:
                    loss = loss * (len(ys) / n)  # the mean over the whole batch
                scaled = loss * self.criterion_scale if self.criterion_scale != 1 else loss
                if self.scaler is not None:
                    scaled = scaled * self.scaler.scale
                if on_phase is not None:
                    on_phase("backward")
                scaled.backward()
            loss_total += loss.detach().float()
            correct += (out.detach().argmax(1) == ys).sum()
        return loss_total, correct

    def _update(self) -> Tensor | None:
        """Optimizer update(s), EMA, zero_grad. Returns found_inf (fp16) or None."""
        lrs, momentum, decay = self.tables.at(self._t)  # device tensors: no sync
        params = self.optimizers.params_with_grads()
        found_inf = None
        if self.scaler is not None:
            found_inf = self.scaler.unscale_([p.grad for p in params])
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip, foreach=True)
        guarded = self._guarded_tensors() if found_inf is not None else []
        with skip_if_nonfinite(found_inf, guarded):
            self.optimizers.step(lrs, momentum, ema_decay=decay, found_inf=found_inf)
            if self.ema is not None:
                self.ema.step_(decay)
        if found_inf is not None:
            self.scaler.update_(found_inf)
        for p in params:
            p.grad = None
        return found_inf

    def state_tensors(self) -> list[Tensor]:
        """Every tensor the step keeps and mutates besides the model's own: optimizer and
        EMA state, schedule tables, counters, sums, the loss scale."""
        out = self.optimizers.state_tensors() + self.tables.tensors()
        out += self.ema.state_tensors() if self.ema is not None else []
        out += [self._t] + self.totals.tensors()
        return out + (self.scaler.state_tensors() if self.scaler is not None else [])

    def _guarded_tensors(self) -> list[Tensor]:  # what a skipped (fp16) step leaves unchanged
        out = [p for g in self.optimizers.groups for p in g.params]
        return out + self.optimizers.state_tensors() + (
            self.ema.state_tensors() if self.ema is not None else [])

    # ------------------------------------------------------------------ host side

    def train_mode(self) -> None:
        """Put the network in the mode the current step calls for (BatchNorm frozen from
        `phase2` on). The step switches modes itself when it crosses `phase2`; call this
        after anything else changed them (an evaluation)."""
        frozen = self.step >= self.phase2
        set_bn_frozen(self.net, frozen)
        self._frozen = frozen

    def lr_factor(self, step: int | None = None) -> float:
        """The lr multiplier at `step` (default: the last step taken); host math, no sync."""
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
        """Start a new epoch's sums (loss, correct)."""
        self.totals.reset()
        self._epoch_start = self.step

    def epoch_totals(self) -> EpochTotals:
        """The sums since `reset_totals()`. One host sync (epoch ends and log points)."""
        return self.totals.read(self.step - self._epoch_start)

    def state_dict(self) -> dict:
        return {"optimizers": self.optimizers.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "step": self.step, "first_nonfinite": int(self.totals.first_bad),
                "skipped": int(self.totals.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Load in place: every tensor the step holds (and a compiled graph captured) stays
        the same object."""
        self.optimizers.load_state_dict(state["optimizers"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.totals.first_bad.fill_(int(state.get("first_nonfinite", -1)))
        self.totals.skipped.fill_(int(state.get("skipped", 0)))
        self.set_step(int(state.get("step", 0)))

    @contextlib.contextmanager
    def rehearsal(self):
        """Run steps that do not count (warm-up, graph checks): weights, BatchNorm
        statistics, optimizer/EMA/scaler state, counters and RNG are restored on exit."""
        model_state = copy.deepcopy(unwrap(self.model).state_dict())
        step_state = copy.deepcopy(self.state_dict())
        sums = (self.totals.loss_sum.clone(), self.totals.correct.clone(), self._epoch_start)
        rng = rng_state(self.device)
        try:
            yield self
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            unwrap(self.model).load_state_dict(model_state)
            self.load_state_dict(step_state)
            self.totals.loss_sum.copy_(sums[0])
            self.totals.correct.copy_(sums[1])
            self._epoch_start = sums[2]
            set_rng_state(rng, self.device)
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
