"""The CIFAR ResNets of He et al. 2016 (Deep Residual Learning, section 4.2): ResNet-6n+2.

A 3x3 conv with 16 filters, then three stages of n BasicBlocks with 16, 32 and 64 filters
on 32x32, 16x16 and 8x8 maps (the first block of stages 2 and 3 has stride 2), global
average pooling and a fully connected layer: 6n+2 weighted layers. n = 3, 5, 7, 9, 18, 200
give ResNet-20/32/44/56/110/1202.

Shortcuts where the shape changes:
  "A" (the paper's CIFAR choice, default): parameter-free; take every second pixel and
      zero-pad the new channels (half on each side, as the common PyTorch port does).
  "B": a 1x1 conv with stride 2 + BatchNorm projection (torchvision's `downsample`).
Exact counts (10 classes), option A / option B:
  resnet8     75,290 /     78,042   (not in the paper or the reference table)
  resnet20   269,722 /    272,474   (paper: 0.27 M)
  resnet32   464,154 /    466,906   (0.46 M)
  resnet44   658,586 /    661,338   (0.66 M)
  resnet56   853,018 /    855,770   (0.85 M)
  resnet110 1,727,962 / 1,730,714   (1.7 M)
  resnet1202 19,421,274 / 19,424,026 (19.4 M)
Option B adds 2,752 parameters whatever the depth (two projections); the paper's rounded
figures fit both.

Blocks are `resnet.BasicBlock`, so BN+ReLU and BN+add+ReLU go through `norm_act_layer`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastres.errors import ConfigError

from fastres.norm_act import BatchNormAct2d, NormActLayer

from .layers import init_conv_bn_
from .registry import register_model
from .resnet import BasicBlock, conv1x1, conv3x3


class ShortcutA(nn.Module):
    """Option-A shortcut: stride-`stride` subsampling, then zero channels on both sides."""

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_front = (planes - inplanes) // 2
        self.pad_back = planes - inplanes - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        # F.pad's last-to-first order: (W left, W right, H top, H bottom, C front, C back).
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_front}, {self.pad_back})"


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; `layers` = blocks per stage, usually [n, n, n]."""

    def __init__(self, layers: list[int], num_classes: int = 10, *, shortcut: str = "A",
                 zero_init_residual: bool = False,
                 norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ConfigError(f"shortcut must be 'A' (zero-padded identity) or 'B' (1x1 conv "
                              f"projection), got {shortcut!r}")
        self.shortcut = shortcut
        self.norm_act_layer = norm_act_layer
        self.inplanes = 16
        self.conv1 = conv3x3(3, self.inplanes)
        self.bn1 = norm_act_layer(self.inplanes, act="relu")
        self.layer1 = self._make_layer(16, layers[0])
        self.layer2 = self._make_layer(32, layers[1], stride=2)
        self.layer3 = self._make_layer(64, layers[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(64, num_classes)

        # "We initialize the weights as in [He et al. 2015]": zero-mean Gaussian with
        # std sqrt(2/n), n = k*k*out_channels as in fb.resnet.torch and torchvision.
        init_conv_bn_(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = ShortcutA(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride),
                                           nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample,
                             norm_act_layer=self.norm_act_layer)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(planes, planes, norm_act_layer=self.norm_act_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _cifar_resnet(depth: int, num_classes: int, norm_act_layer: NormActLayer,
                  zero_init_residual: bool, shortcut: str) -> CifarResNet:
    n = (depth - 2) // 6
    return CifarResNet([n, n, n], num_classes, shortcut=shortcut,
                       zero_init_residual=zero_init_residual, norm_act_layer=norm_act_layer)


_HE = dict(family="resnet-cifar", paper_source="He et al. 2016, Table 6", input_size=32)


@register_model(family="resnet-cifar", input_size=32,
                note="not in the paper or the reference table; a small extra for CPU smoke runs")
def resnet8(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
            zero_init_residual: bool = False, shortcut: str = "A") -> CifarResNet:
    """ResNet-8 (n=1), He et al.'s CIFAR design at the smallest depth."""
    return _cifar_resnet(8, num_classes, norm_act_layer, zero_init_residual, shortcut)


@register_model(paper_params=0.27, article={"params_m": "0.26", "gflops": "0.9"}, **_HE)
def resnet20(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
             zero_init_residual: bool = False, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 (n=3), He et al. 2016 CIFAR ResNet."""
    return _cifar_resnet(20, num_classes, norm_act_layer, zero_init_residual, shortcut)


@register_model(paper_params=0.46, article={"params_m": "0.46", "gflops": "1.8"}, **_HE)
def resnet32(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
             zero_init_residual: bool = False, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 (n=5), He et al. 2016 CIFAR ResNet."""
    return _cifar_resnet(32, num_classes, norm_act_layer, zero_init_residual, shortcut)


@register_model(paper_params=0.66, article={"params_m": "0.66", "gflops": "2.7"}, **_HE)
def resnet44(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
             zero_init_residual: bool = False, shortcut: str = "A") -> CifarResNet:
    """ResNet-44 (n=7), He et al. 2016 CIFAR ResNet."""
    return _cifar_resnet(44, num_classes, norm_act_layer, zero_init_residual, shortcut)


@register_model(paper_params=0.85, article={"params_m": "0.85", "gflops": "3.6"}, **_HE)
def resnet56(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
             zero_init_residual: bool = False, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 (n=9), He et al. 2016 CIFAR ResNet."""
    return _cifar_resnet(56, num_classes, norm_act_layer, zero_init_residual, shortcut)


@register_model(paper_params=1.7, article={"params_m": "1.78", "gflops": "8.3"}, **_HE)
def resnet110(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
              zero_init_residual: bool = False, shortcut: str = "A") -> CifarResNet:
    """ResNet-110 (n=18), He et al. 2016 CIFAR ResNet."""
    return _cifar_resnet(110, num_classes, norm_act_layer, zero_init_residual, shortcut)


@register_model(paper_params=19.4, article={"params_m": "19.18", "gflops": "170.8"}, **_HE)
def resnet1202(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
               zero_init_residual: bool = False, shortcut: str = "A") -> CifarResNet:
    """ResNet-1202 (n=200), He et al. 2016 CIFAR ResNet."""
    return _cifar_resnet(1202, num_classes, norm_act_layer, zero_init_residual, shortcut)
