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
