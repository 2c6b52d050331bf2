"""Mixed precision: the autocast context for a precision name, and fp16's dynamic loss
scaling on the device.

bf16 (the GPU default) needs no scaling: its exponent range is fp32's. fp16 does: the loss
is multiplied by a scale before backward, the gradients divided by it before the update,
and a step whose gradients overflowed is skipped. `LossScaler` is torch.amp.GradScaler's
arithmetic without its host sync: the skip is decided and counted on the device, so the
step still compiles as one graph.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from fastres._compat import amp_unscale_, amp_update_scale_

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of a precision name; "auto" is what `fastres.config.resolve` picks for
    `device` (bf16 on a GPU, fp32 on a CPU)."""
    if precision == "auto":
        precision = "bf16" if torch.device(device).type == "cuda" else "fp32"
    if precision not in PRECISION_DTYPES:
        from fastres.errors import unknown_choice

        raise unknown_choice("precision", precision, PRECISION_DTYPES)
    return PRECISION_DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    """The precision name of a dtype (the inverse of `precision_dtype`)."""
    for name, d in PRECISION_DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"no fastres precision for {dtype}")


def autocast_for(device: torch.device | str, precision: str):
    """The autocast context for a precision name ('fp32' -> no autocast)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16, on the device: the scale grows by `growth_factor` after
    `growth_interval` finite steps and shrinks by `backoff_factor` at a non-finite one, whose
    update is skipped (`skip_if_nonfinite`)."""

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
            amp_unscale_(group, found_inf, inv)
        return found_inf

    def update_(self, found_inf: Tensor) -> None:
        amp_update_scale_(self.scale, self.growth_tracker, found_inf, self.growth_factor,
                          self.backoff_factor, self.growth_interval)

    def state_tensors(self) -> list[Tensor]:
        return [self.scale, self.growth_tracker]

    def state_dict(self) -> dict:
        return {"scale": self.scale.clone(), "growth_tracker": self.growth_tracker.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scale.copy_(torch.as_tensor(state["scale"]))
        self.growth_tracker.copy_(torch.as_tensor(state["growth_tracker"]))


class skip_if_nonfinite:
    """fp16: `with skip_if_nonfinite(found_inf, tensors): <update>` leaves `tensors`
    unchanged when `found_inf` is set, without a host sync (the update is computed, then
    undone with torch.where). Costs one copy of the tensors per step; with `found_inf=None`
    (bf16, fp32) it costs nothing. (A class, not a generator: Dynamo traces it in every
    torch this project supports.)"""

    def __init__(self, found_inf: Tensor | None, tensors: list[Tensor]):
        self.found_inf, self.tensors = found_inf, tensors

    def __enter__(self):
        if self.found_inf is not None:
            self.saved = [t.clone() for t in self.tensors]

    def __exit__(self, *exc):
        if self.found_inf is not None and exc[0] is None:
            skip = self.found_inf > 0
            for t, s in zip(self.tensors, self.saved):
                t.copy_(torch.where(skip, s, t))
        return False
