"""Building blocks shared by the model zoo.

The norm-act layer (`BatchNormAct2d`, `ACTIVATIONS`, `apply_act`, `NormActLayer`,
`norm_act_factory`) lives in the leaf module `fastres.norm_act`, which the kernels and the
distributed helpers import without loading the model zoo; it is re-exported here so model
code keeps importing it from `.layers`. `init_conv_bn_` is the zoo's initialisation.
"""
from __future__ import annotations

import torch.nn as nn

from fastres.norm_act import (ACTIVATIONS, BatchNormAct2d, NormActLayer, apply_act,
                              norm_act_factory)

__all__ = ["ACTIVATIONS", "BatchNormAct2d", "NormActLayer", "apply_act", "init_conv_bn_",
           "norm_act_factory"]


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
