"""Forward FLOPs of a model, counted by `torch.utils.flop_counter.FlopCounterMode`.

Units, plainly: one multiply-add (MAC) is 2 FLOPs, and FlopCounterMode reports FLOPs, so
GMACs = GFLOPs / 2. Papers mix the two (He et al. 2015 quote "FLOPs" that are MACs), which
is one reason the reference article's FLOPs column cannot be compared as printed.

What is counted: the operations FlopCounterMode has formulas for, i.e. convolutions and
matrix products (conv, linear, matmul, attention). BatchNorm, activations, pooling and
residual adds are not counted; for these networks they are well under 1% of the total.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import count_params, create_model, model_info


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32)) -> int:
    """Forward FLOPs (2 per multiply-add) of one call on a zero input of `input_size`.

    Runs in eval mode under no_grad (so BN uses running statistics and nothing is recorded
    for backward), on the device the model's parameters are on (CPU for a fresh model;
    a model built under `torch.device("meta")` is counted without computing anything).
    The model's train/eval mode is restored afterwards.
    """
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(tuple(input_size), device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def flops_row(name: str, num_classes: int = 10, image_size: int = 32,
              device: str | torch.device = "cpu") -> dict:
    """One row of `fastres models`: counts for a registered model, built fresh.

    Keys: name, family, params, params_m, gflops (forward, batch 1, image_size^2),
    gmacs (= gflops / 2), plus model_info's reference fields. `device="meta"` builds the
    model without allocating or initialising weights: the counts are the same (they depend
    on shapes only) and it is much faster for the big models.
    """
    with torch.device(device):
        model = create_model(name, num_classes=num_classes)
    flops = count_flops(model, (1, 3, image_size, image_size))
    params = count_params(model)
    info = model_info(name)
    return dict(name=name, family=info["family"], params=params, params_m=params / 1e6,
                flops=flops, gflops=flops / 1e9, gmacs=flops / 2e9, image_size=image_size,
                num_classes=num_classes, info=info)
