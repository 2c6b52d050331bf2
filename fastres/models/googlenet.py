"""GoogLeNet / Inception v1 (Szegedy et al. 2015) in the common CIFAR configuration.

The CIFAR version most results tables use (kuangliu/pytorch-cifar): the ImageNet stem
(7x7/2 conv, pools, 1x1 and 3x3 convs, local response norm) becomes one 3x3 conv with 192
filters at full 32x32 resolution; inception blocks 3a-3b (32x32), 4a-4e (16x16) and 5a-5b
(8x8) keep the paper's Table 1 widths; max-pools 3x3/2 between groups; global average
pool; one linear layer; no auxiliary heads and no dropout. Each conv is followed by
BatchNorm + ReLU (one `norm_act_layer` module; the convs carry no bias), and, as in that
configuration, the 5x5 branch is two stacked 3x3 convs.

6,158,346 parameters at 10 classes (kuangliu's version keeps a redundant bias on each of
its 7,904 conv output channels: 6,166,250). The reference article prints 6.98 M.
Module names follow torchvision's GoogLeNet (`inception3a.branch1`, `maxpool3`, `fc`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fastres.norm_act import BatchNormAct2d, NormActLayer

from .layers import init_conv_bn_
from .registry import register_model


class ConvBNAct(nn.Module):
    """Conv (no bias) followed by one BN+ReLU module (torchvision's BasicConv2d)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=kernel_size // 2, bias=False)
        self.bn = norm_act_layer(out_channels, act="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class Inception(nn.Module):
    """Four parallel branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool-1x1."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int,
                 ch5x5red: int, ch5x5: int, pool_proj: int,
                 norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        c = dict(norm_act_layer=norm_act_layer)
        self.branch1 = ConvBNAct(in_channels, ch1x1, 1, **c)
        self.branch2 = nn.Sequential(ConvBNAct(in_channels, ch3x3red, 1, **c),
                                     ConvBNAct(ch3x3red, ch3x3, 3, **c))
        # The paper's 5x5 conv, as two 3x3s (same receptive field, fewer weights).
        self.branch3 = nn.Sequential(ConvBNAct(in_channels, ch5x5red, 1, **c),
                                     ConvBNAct(ch5x5red, ch5x5, 3, **c),
                                     ConvBNAct(ch5x5, ch5x5, 3, **c))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                     ConvBNAct(in_channels, pool_proj, 1, **c))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x),
                          self.branch4(x)], dim=1)


class GoogLeNetCifar(nn.Module):
    def __init__(self, num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        c = dict(norm_act_layer=norm_act_layer)
        self.conv1 = ConvBNAct(3, 192, 3, **c)
        # Widths from Szegedy et al. 2015, Table 1 (out = ch1x1 + ch3x3 + ch5x5 + pool_proj).
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32, **c)        # -> 256
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64, **c)      # -> 480
        self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)                   # 32 -> 16
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64, **c)       # -> 512
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64, **c)      # -> 512
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64, **c)      # -> 512
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64, **c)      # -> 528
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128, **c)    # -> 832
        self.maxpool4 = nn.MaxPool2d(3, stride=2, padding=1)                   # 16 -> 8
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128, **c)    # -> 832
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128, **c)    # -> 1024
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(1024, num_classes)

        init_conv_bn_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.inception3a(x)
        x = self.inception3b(x)
        x = self.maxpool3(x)
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.inception4e(x)
        x = self.maxpool4(x)
        x = self.inception5a(x)
        x = self.inception5b(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model(family="inception", input_size=32, paper_source="kuangliu/pytorch-cifar layout",
                article={"params_m": "6.98", "gflops": "42.7"})
def googlenet_cifar(num_classes: int = 10,
                    norm_act_layer: NormActLayer = BatchNormAct2d) -> GoogLeNetCifar:
    """GoogLeNet (Inception v1), CIFAR configuration: 3x3 stem, blocks 3a-5b, no aux heads."""
    return GoogLeNetCifar(num_classes, norm_act_layer=norm_act_layer)
