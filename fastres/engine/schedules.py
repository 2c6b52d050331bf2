"""Learning-rate and momentum schedules as pure functions of the step.

Every function here maps (step, total steps, ScheduleConfig) to a number: no state, no
optimizer, so a resumed run, a plot and a test all see the same values. The trainer sets
`group["lr"] = group["base_lr"] * lr_factor(step, ...)` before each optimizer step, with
`step` counted from 0 (the first update uses factor(0)).
"""
from __future__ import annotations

import math

from fastres.config import ScheduleConfig


def total_steps(s: ScheduleConfig, steps_per_epoch: int) -> int:
    """Optimizer steps in the run: `s.steps` if set, else ceil(epochs x steps per epoch)."""
    if steps_per_epoch <= 0:
        raise ValueError("steps_per_epoch must be positive")
    if s.steps > 0:
        return s.steps
    return max(1, math.ceil(s.epochs * steps_per_epoch - 1e-9))


def phase2_start(s: ScheduleConfig, steps_per_epoch: int) -> int:
    """First step of the two-phase recipe's second phase (== total steps when off)."""
    total = total_steps(s, steps_per_epoch)
    if s.two_phase_epochs <= 0:
        return total
    return max(0, total - round(s.two_phase_epochs * steps_per_epoch))


def _shape(t: float, s: ScheduleConfig) -> float:
    """The schedule's shape at progress t in [0, 1], before warm-up and phase 2."""
    kind = s.lr_schedule
    if kind == "constant":
        return 1.0
    if kind == "step":
        return s.gamma ** sum(t >= m for m in s.milestones)
    if kind == "linear":
        return 1.0 + (s.final_factor - 1.0) * t
    if kind == "cosine":
        return s.final_factor + (1.0 - s.final_factor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if kind in ("triangular", "onecycle"):
        # Up from start_factor to 1 at `peak`, then down to final_factor; linear for
        # triangular (airbench94: 0.2 -> 1 at 23% -> 0.07), half-cosines for one-cycle.
        if s.peak > 0 and t < s.peak:
            u, lo, hi = t / s.peak, s.start_factor, 1.0
        else:
            u = (t - s.peak) / (1.0 - s.peak) if s.peak < 1 else 1.0
            lo, hi = 1.0, s.final_factor
        if kind == "onecycle":
            u = 0.5 * (1.0 - math.cos(math.pi * u))
        return lo + (hi - lo) * u
    raise ValueError(f"unknown lr_schedule {kind!r}")


def lr_factor(step: int, total: int, s: ScheduleConfig, phase2: int | None = None) -> float:
    """Multiplier on each parameter group's base learning rate at `step` (0-based).

    Progress is t = step / total, so the last step (total-1) is one step short of the end
    value, as in airbench and torch's LambdaLR usage. Linear warm-up (from start_factor) over
    the first `warmup` fraction multiplies the shape; phase 2 of the two-phase recipe halves
    whatever the schedule gives from `phase2` on.
    """
    t = min(max(step / max(total, 1), 0.0), 1.0)
    f = _shape(t, s)
    if s.warmup > 0 and t < s.warmup:
        w = t / s.warmup
        f *= s.start_factor + (1.0 - s.start_factor) * w
    if phase2 is not None and step >= phase2:
        f *= 0.5
    return f


def momentum_at(step: int, total: int, s: ScheduleConfig, base: float) -> float:
    """Momentum at `step`: `base`, or cycled inversely to the LR shape (one-cycle style) when
    `cycle_momentum` is set: high where the LR is low, low at the LR's peak."""
    if not s.cycle_momentum or s.lr_schedule not in ("triangular", "onecycle"):
        return base
    lo, hi = s.momentum_range
    f = _shape(min(max(step / max(total, 1), 0.0), 1.0), s)
    top = 1.0
    bottom = min(s.start_factor, s.final_factor)
    u = (f - bottom) / (top - bottom) if top > bottom else 1.0
    return hi - (hi - lo) * min(max(u, 0.0), 1.0)


def whiten_bias_factor(step: int, whiten_steps: int) -> float:
    """airbench's whitening-bias schedule: linear from 1 to 0 over its first `whiten_steps`
    steps, then 0 (the bias is frozen from there on)."""
    if whiten_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / whiten_steps)


class ScheduleTables:
    """Every schedule of a run as device tables indexed by the step: the learning rate of
    each parameter group, the momentum (when cycled) and the EMA decay (when on). Computed
    once from the pure functions above, so they hold exactly what the schedules define;
    `at(t)` looks step `t` (a 0-d device tensor) up without a host sync, so a compiled step
    reads its hyper-parameters from here and replays as a CUDA graph.

    `groups`: (base_lr, role) per parameter group, in the order of the lr table's rows.
    Roles with a schedule of their own: "whiten_bias" (the speed-run net's whitening bias,
    trained for its first `whiten_steps` steps only) and "norm" (frozen, lr 0, in phase 2).
    """

    def __init__(self, s: ScheduleConfig, total: int, phase2: int,
                 groups: list[tuple[float, str | None]], *, whiten_steps: int = 0,
                 base_momentum: float = 0.0, ema_decay_at=None, device=None):
        import torch

        n = max(total, 1)
        factor = [lr_factor(t, total, s, phase2) for t in range(n)]
        rows = []
        for base, role in groups:
            if role == "whiten_bias":
                rows.append([base * whiten_bias_factor(t, whiten_steps) for t in range(n)])
            elif role == "norm":  # phase 2: frozen affine (robust under DDP and compile)
                rows.append([0.0 if t >= phase2 else base * f for t, f in enumerate(factor)])
            else:
                rows.append([base * f for f in factor])
        kw = dict(dtype=torch.float32, device=device)
        self.lr = torch.tensor(rows, **kw).reshape(len(rows), n)
        self.momentum = torch.tensor([momentum_at(t, total, s, base_momentum)
                                      for t in range(n)], **kw) if s.cycle_momentum else None
        self.ema_decay = torch.tensor([ema_decay_at(t) for t in range(n)], **kw) \
            if ema_decay_at is not None else None

    def at(self, t):
        """(learning rate per group, momentum or None, EMA decay or None) at step `t`
        (clamped to the last row), all on the device."""
        t = t.clamp(max=self.lr.shape[1] - 1).view(1)
        momentum = None if self.momentum is None else self.momentum.index_select(0, t).view(())
        decay = None if self.ema_decay is None else self.ema_decay.index_select(0, t).view(())
        return self.lr.index_select(1, t).view(-1), momentum, decay

    def tensors(self) -> list:
        return [t for t in (self.lr, self.momentum, self.ema_decay) if t is not None]
