"""Building blocks shared by the model zoo.

`BatchNormAct2d` is BatchNorm2d followed by an optional residual add and an activation,
`y = act(bn(x) + residual)`, written in plain PyTorch. It is the unfused path and the
reference that the fused Triton module (`fastres.kernels.FusedBatchNormAct2d`, a subclass)
must match. Being an `nn.BatchNorm2d` subclass with no extra parameters or buffers, it keeps
state dicts identical to torchvision's (`bn1.weight`, `bn2.running_mean`, ...).

Blocks take a `norm_act_layer` factory with this signature, so swapping in the fused module
does not need a second model zoo.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("relu", "identity", "gelu")


def apply_act(x: Tensor, act: str) -> Tensor:
    if act == "relu":
        return F.relu(x)
    if act == "gelu":
        return F.gelu(x)
    return x


class BatchNormAct2d(nn.BatchNorm2d):
    """`act(batch_norm(x) + residual)`; residual optional, act in ACTIVATIONS."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, act: str = "relu",
                 device=None, dtype=None):
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
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


def init_conv_bn_(model: nn.Module) -> None:
    """He et al. 2015 initialisation, as torchvision and fb.resnet.torch do it: conv weights
    from N(0, 2/n) with n = k*k*out_channels (fan_out, ReLU gain), BatchNorm scale 1 and
    shift 0; conv biases (where a model has them) 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def norm_act_factory(fused: bool = False) -> NormActLayer:
    """The BN(+add)+act module class a model should build with."""
    if fused:
        from fastres.kernels import FusedBatchNormAct2d

        return FusedBatchNormAct2d
    return BatchNormAct2d
