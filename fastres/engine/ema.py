"""Exponential moving average of a model's weights.

`ema = decay * ema + (1 - decay) * weights` every `every` steps, in fp32, over parameters and
floating buffers (BatchNorm running statistics); integer buffers are copied. With `warmup`
the decay ramps as min(decay, (1 + n) / (10 + n)) over the first updates n, so the average
is not dominated by the random initialisation in short runs.

Evaluation swaps the averaged weights into the live model (`with ema.swapped(model): ...`)
instead of keeping a second model, so a compiled model is not compiled twice.

The decay applied after optimizer step `step` is a pure function of the step
(`decay_at`): `TrainStep` tabulates it on the device and runs `ema_update_` inside the
step, with a decay of 1 (no change) on the steps that are not due.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from fastres._compat import foreach


class EMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.every = every
        self.warmup = warmup
        self.updates = 0
        self.names, live = _float_tensors(model)
        self.shadow = [t.detach().float().clone() for t in live]
        self.int_names = [n for n, b in model.named_buffers() if not b.is_floating_point()]
        self.int_shadow = {n: b.detach().clone() for n, b in model.named_buffers()
                           if not b.is_floating_point()}

    def current_decay(self) -> float:
        return self._decay_after(self.updates)

    def _decay_after(self, updates: int) -> float:
        if self.warmup:
            return min(self.decay, (1 + updates) / (10 + updates))
        return self.decay

    def due(self, step: int) -> bool:
        """Whether `update` should run after optimizer step `step` (0-based)."""
        return (step + 1) % self.every == 0

    def decay_at(self, step: int) -> float:
        """The decay applied after optimizer step `step` (0-based): 1.0 (no change) when the
        step is not due; otherwise the (warmed-up) decay after step // every updates."""
        return self._decay_after(step // self.every) if self.due(step) else 1.0

    def updates_before(self, step: int) -> int:
        """How many updates steps 0 .. step-1 made."""
        return step // self.every

    def shadows_by_param(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """id(parameter) -> its fp32 shadow, for an optimizer that averages in its step."""
        return {id(p): s for p, s in zip(model.parameters(), self.shadow)}

    def bind(self, model: nn.Module, skip_params: bool = False) -> None:
        """Pair the shadows with `model`'s live tensors once, for `step_`: a training step
        then averages the same tensors every call (what a compiled step captures).
        `skip_params`: the optimizer averages the parameters in its own pass (the Triton
        SGD), so only the floating buffers are left to this EMA."""
        _, live = _float_tensors(model)
        start = len(list(model.parameters())) if skip_params else 0
        buffers = dict(model.named_buffers())
        self._bound = (self.shadow[start:], live[start:],
                       [(self.int_shadow[name], buffers[name]) for name in self.int_shadow])

    @torch.no_grad()
    def step_(self, decay: torch.Tensor) -> None:
        """One in-step update of the bound tensors with `decay`, a 0-d device tensor (1.0 on
        steps that are not due: nothing changes, integer buffers are not copied). No host
        sync; `bind` first."""
        shadow, live, ints = self._bound
        ema_update_(shadow, live, decay)
        due = decay < 1.0
        for s, v in ints:
            s.copy_(torch.where(due, v, s))

    def state_tensors(self) -> list[torch.Tensor]:
        """The shadows `step_` mutates."""
        shadow, _, ints = self._bound
        return list(shadow) + [s for s, _ in ints]

    @torch.no_grad()
    def update(self, model: nn.Module, params: bool = True) -> None:
        """One EMA update. `params=False` averages only the floating buffers (when the
        optimizer step already averaged the parameters, as the Triton SGD does)."""
        _, live = _float_tensors(model)
        d = self.current_decay()  # a host float: no device sync
        n_params = len(list(model.parameters()))
        pairs = list(zip(self.shadow, live))[0 if params else n_params:]
        if pairs:
            ema_update_([s for s, _ in pairs], [t for _, t in pairs], d)
        for name, b in model.named_buffers():
            if name in self.int_shadow:
                self.int_shadow[name].copy_(b)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        _, live = _float_tensors(model)
        for dst, src in zip(live, self.shadow):
            dst.copy_(src)
        buffers = dict(model.named_buffers())
        for name, value in self.int_shadow.items():
            buffers[name].copy_(value)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module):
        """Run the body with the averaged weights in `model`, then put the live ones back."""
        _, live = _float_tensors(model)
        saved = [t.detach().clone() for t in live]
        saved_int = {n: b.detach().clone() for n, b in model.named_buffers()
                     if n in self.int_shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for dst, src in zip(live, saved):
                    dst.copy_(src)
                buffers = dict(model.named_buffers())
                for name, value in saved_int.items():
                    buffers[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "updates": self.updates,
                "names": list(self.names), "shadow": [t.clone() for t in self.shadow],
                "int_shadow": {k: v.clone() for k, v in self.int_shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError("EMA state does not match this model's parameters")
        self.updates = int(state["updates"])
        with torch.no_grad():
            for dst, src in zip(self.shadow, state["shadow"]):
                dst.copy_(src)
            for k, v in state["int_shadow"].items():
                self.int_shadow[k].copy_(v)


@torch.no_grad()
def ema_update_(shadow: list[torch.Tensor], live: list[torch.Tensor],
                decay: torch.Tensor | float) -> None:
    """shadow += (1 - decay) (live - shadow), in fp32; `decay` a float or a 0-d device
    tensor (1.0: no change)."""
    live32 = [t.detach().float() if t.dtype != torch.float32 else t.detach() for t in live]
    if isinstance(decay, torch.Tensor):
        diff = foreach.sub(live32, shadow)
        foreach.mul_(diff, 1.0 - decay)
        foreach.add_(shadow, diff)
    else:
        foreach.lerp_(shadow, live32, 1.0 - decay)


def float_tensors(model: nn.Module):
    """Names and tensors the EMA averages: all parameters, then floating buffers."""
    return _float_tensors(model)


def _float_tensors(model: nn.Module):
    """Names and tensors the EMA averages: all parameters, then floating buffers."""
    names, tensors = [], []
    for n, p in model.named_parameters():
        names.append(n)
        tensors.append(p)
    for n, b in model.named_buffers():
        if b.is_floating_point():
            names.append(n)
            tensors.append(b)
    return names, tensors
