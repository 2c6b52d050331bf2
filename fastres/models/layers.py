"""The model zoo's initialisation. The norm-act layer the blocks are built from
(`BatchNormAct2d`, `NormActLayer`, `norm_act_factory`) has one home, the leaf module
`fastres.norm_act`, which the kernels and the distributed helpers import without loading
the model zoo.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["init_conv_bn_"]


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
