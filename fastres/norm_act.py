"""The norm-act layer: BatchNorm2d, then an optional residual add, then an activation.

    y = act(batch_norm(x) + residual)        act in ACTIVATIONS, residual optional

A leaf module (it imports torch only): the model zoo, the fused kernels
(`fastres.kernels.FusedBatchNormAct2d` subclasses `BatchNormAct2d`) and the distributed
helpers (`SyncBatchNormAct2d`) all import it, and it imports none of them at module level,
so `import fastres.kernels` does not load the model zoo.

`BatchNormAct2d` is written in plain PyTorch: the unfused path and the reference the fused
module must match. Being an `nn.BatchNorm2d` subclass with no extra parameters or buffers,
it keeps state dicts identical to torchvision's (`bn1.weight`, `bn2.running_mean`, ...).

`act` defaults to "identity", so `BatchNormAct2d(C)` and `FusedBatchNormAct2d(C)` compute
exactly what `nn.BatchNorm2d(C)` computes: with the same constructor and state dict they are
drop-in replacements. The ReLU or GELU is asked for by name (`act="relu"`); every block in
the model zoo passes it explicitly.

Blocks take a `norm_act_layer` factory with this signature (`NormActLayer`), so swapping in
the fused module does not need a second model zoo; `norm_act_factory(fused)` picks one.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ACTIVATIONS", "BatchNormAct2d", "NormActLayer", "apply_act", "check_act",
           "norm_act_factory"]

ACTIVATIONS = ("relu", "identity", "gelu", "silu")


def check_act(act: str) -> str:
    """`act` if it names an activation in ACTIVATIONS, else a ValueError naming them."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    return act


def apply_act(x: Tensor, act: str) -> Tensor:
    """The activation named `act` (ReLU, GELU with the erf form as F.gelu's default, SiLU
    x sigmoid(x), or identity)."""
    if act == "relu":
        return F.relu(x)
    if act == "gelu":
        return F.gelu(x)
    if act == "silu":
        return F.silu(x)
    return x


class BatchNormAct2d(nn.BatchNorm2d):
    """``act(batch_norm(x) + residual)``; residual optional, act in ACTIVATIONS.

    Same constructor as `nn.BatchNorm2d` plus `act` (default "identity": a drop-in
    BatchNorm2d); `forward(x, residual=None)`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, act: str = "identity",
                 device=None, dtype=None):
        check_act(act)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.act = act

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = super().forward(x)
        if residual is not None:
            y = y + residual
        return apply_act(y, self.act)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"


NormActLayer = Callable[..., BatchNormAct2d]


def norm_act_factory(fused: bool = False) -> NormActLayer:
    """The BN(+add)+act module class a model should build with: `BatchNormAct2d`, or the
    fused Triton module `fastres.kernels.FusedBatchNormAct2d` (imported on demand)."""
    if fused:
        from fastres.kernels import FusedBatchNormAct2d

        return FusedBatchNormAct2d
    return BatchNormAct2d
