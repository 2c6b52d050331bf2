"""Pre-activation ResNet-18 for CIFAR, after He et al. 2016b.

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks" (ECCV 2016).

Each block is `x + conv2(relu(bn2(conv1(relu(bn1(x))))))`: BN and ReLU come before each
conv, and nothing follows the addition, so the shortcut path is a clean identity from block
to block. Where the shape changes, the projection (a 1x1 conv, no BN: the input it sees is
already normalised) is applied to the pre-activated input `relu(bn1(x))`, as in the paper's
code. Because the last block ends in a bare addition, the network applies one more BN-ReLU
before pooling (the paper's "extra activation after the last unit").

Stem and stages follow the common CIFAR configuration (kuangliu/pytorch-cifar): a 3x3/1
conv with 64 filters, four stages of 2 blocks with 64/128/256/512 filters. 11,172,170
parameters at 10 classes (kuangliu's version, without the final BN-ReLU, has 11,171,146).
The reference article prints 1.17 M, a slip for ~11.17 M.

BN-ReLU pairs are `norm_act_layer(c, act="relu")` modules, so the fused kernel drops in;
the residual add is not preceded by a BN here, so it stays a plain `+`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from fastres.norm_act import BatchNormAct2d, NormActLayer

from .layers import init_conv_bn_
from .registry import register_model
from .resnet import conv1x1, conv3x3


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None,
                 norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        self.bn1 = norm_act_layer(inplanes, act="relu")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = norm_act_layer(planes, act="relu")
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(x)
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.bn2(out))
        return out + identity

    def zero_init_last(self) -> None:
        # No BN closes the branch in a pre-activation block; zeroing its last conv makes the
        # block start as the identity all the same (timm's ResNetV2 does this).
        nn.init.zeros_(self.conv2.weight)


class PreActResNet(nn.Module):
    def __init__(self, layers: list[int], num_classes: int = 10, *,
                 zero_init_residual: bool = False,
                 norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        self.norm_act_layer = norm_act_layer
        self.inplanes = 64
        self.conv1 = conv3x3(3, self.inplanes)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.bn_final = norm_act_layer(self.inplanes, act="relu")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

        init_conv_bn_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, PreActBlock):
                    m.zero_init_last()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride))
        layers = [PreActBlock(self.inplanes, planes, stride, downsample,
                              norm_act_layer=self.norm_act_layer)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(PreActBlock(planes, planes, norm_act_layer=self.norm_act_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn_final(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model(family="preact-resnet", paper_params=11.17,
                paper_source="He et al. 2016b; kuangliu/pytorch-cifar layout", input_size=32,
                article={"params_m": "1.17", "gflops": "1.0"})
def preact_resnet18(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
                    zero_init_residual: bool = False) -> PreActResNet:
    """Pre-activation ResNet-18 (BN-ReLU before each conv), CIFAR stem."""
    return PreActResNet([2, 2, 2, 2], num_classes, zero_init_residual=zero_init_residual,
                        norm_act_layer=norm_act_layer)
