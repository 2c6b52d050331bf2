"""ResNet-18/34/50/101/152 (He et al. 2015) in torchvision's layout, with an ImageNet or CIFAR stem.

Module names, parameter order and initialisation follow `torchvision.models.resnet` (v1.5:
the stride of a Bottleneck sits on its 3x3 conv), so a torchvision state dict loads with
`strict=True` and the parameter counts are equal: 11,689,512 / 21,797,672 / 25,557,032 /
44,549,160 / 60,192,808 at 1000 classes. What differs is how BN and ReLU are built: each
BatchNorm that is followed by a ReLU is one `norm_act_layer(planes, act="relu")` module, and
the tail of a residual block, `relu(bn(conv(x)) + identity)`, is the single call
`self.bn2(out, identity)`. `BatchNormAct2d` adds no parameters or buffers to
`nn.BatchNorm2d`, so the state dict is unchanged, and the fused Triton module
(`fastres.kernels.FusedBatchNormAct2d`, same constructor and forward) drops in through
`norm_act_layer` without a second copy of these classes.

The CIFAR variants (`resnet18_cifar`, ...) swap the 7x7/2 conv + 3x3/2 max-pool stem for a
3x3/1 conv and no pooling, the usual choice for 32x32 images (kuangliu/pytorch-cifar); the
rest of the network is identical. The ImageNet configuration also runs on 32x32 inputs (the
final adaptive average pool takes the 1x1 map), which is how the tests exercise it.
"""
from __future__ import annotations

from typing import Optional, Type, Union

import torch
import torch.nn as nn
from torch import Tensor

from fastres.norm_act import BatchNormAct2d, NormActLayer

from .layers import init_conv_bn_
from .registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding; no bias, a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None,
                 norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_act_layer(planes, act="relu")
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_act_layer(planes, act="relu")  # BN + residual add + ReLU
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.conv2(out)
        return self.bn2(out, identity)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, torchvision's v1.5), 1x1 expand by `expansion`."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None,
                 norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_act_layer(width, act="relu")
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = norm_act_layer(width, act="relu")
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_act_layer(planes * self.expansion, act="relu")  # BN + add + ReLU
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))
        out = self.bn2(self.conv2(out))
        out = self.conv3(out)
        return self.bn3(out, identity)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """Four stages of 64/128/256/512 `planes`; `stem="imagenet"` or `"cifar"`."""

    def __init__(self, block: Block, layers: list[int], num_classes: int = 1000, *,
                 stem: str = "imagenet", zero_init_residual: bool = False,
                 norm_act_layer: NormActLayer = BatchNormAct2d):
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        self.norm_act_layer = norm_act_layer
        self.inplanes = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3,
                                   bias=False)
            self.bn1 = norm_act_layer(self.inplanes, act="relu")
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            # 32x32 inputs: keep full resolution into layer1, as kuangliu/pytorch-cifar does.
            self.conv1 = conv3x3(3, self.inplanes)
            self.bn1 = norm_act_layer(self.inplanes, act="relu")
            self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        init_conv_bn_(self)
        if zero_init_residual:
            # Goyal et al. 2017: each residual branch starts as zero, so every block starts
            # as the identity; torchvision reports +0.2-0.3% top-1.
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    m.zero_init_last()

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1
                    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # The BN on the projection shortcut is followed by the add inside the block's
            # last norm-act module, not by an activation: it stays a plain BatchNorm2d.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample,
                        norm_act_layer=self.norm_act_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, norm_act_layer=self.norm_act_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn1(self.conv1(x))
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


_CONFIGS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


def _resnet(depth: int, stem: str, num_classes: int, norm_act_layer: NormActLayer,
            zero_init_residual: bool) -> ResNet:
    block, layers = _CONFIGS[depth]
    return ResNet(block, layers, num_classes, stem=stem, zero_init_residual=zero_init_residual,
                  norm_act_layer=norm_act_layer)


# paper_params: torchvision's counts at 1000 classes (He et al. 2015 give FLOPs, not params).
_IMAGENET = dict(family="resnet-imagenet", input_size=224, paper_num_classes=1000,
                 paper_source="torchvision.models, 1000 classes")
# The CIFAR-stem variants have no paper of their own; their reference is the same count at
# 10 classes (kuangliu/pytorch-cifar's ResNet-18: 11,173,962).
_CIFAR = dict(family="resnet-cifar-stem", input_size=32)


@register_model(paper_params=11.689512, **_IMAGENET)
def resnet18(num_classes: int = 1000, norm_act_layer: NormActLayer = BatchNormAct2d,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-18, ImageNet stem (7x7/2 conv + max-pool), BasicBlock [2, 2, 2, 2]."""
    return _resnet(18, "imagenet", num_classes, norm_act_layer, zero_init_residual)


@register_model(paper_params=21.797672, **_IMAGENET)
def resnet34(num_classes: int = 1000, norm_act_layer: NormActLayer = BatchNormAct2d,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-34, ImageNet stem, BasicBlock [3, 4, 6, 3]."""
    return _resnet(34, "imagenet", num_classes, norm_act_layer, zero_init_residual)


@register_model(paper_params=25.557032, **_IMAGENET)
def resnet50(num_classes: int = 1000, norm_act_layer: NormActLayer = BatchNormAct2d,
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-50, ImageNet stem, Bottleneck [3, 4, 6, 3]."""
    return _resnet(50, "imagenet", num_classes, norm_act_layer, zero_init_residual)


@register_model(paper_params=44.549160, **_IMAGENET)
def resnet101(num_classes: int = 1000, norm_act_layer: NormActLayer = BatchNormAct2d,
              zero_init_residual: bool = False) -> ResNet:
    """ResNet-101, ImageNet stem, Bottleneck [3, 4, 23, 3]."""
    return _resnet(101, "imagenet", num_classes, norm_act_layer, zero_init_residual)


@register_model(paper_params=60.192808, **_IMAGENET)
def resnet152(num_classes: int = 1000, norm_act_layer: NormActLayer = BatchNormAct2d,
              zero_init_residual: bool = False) -> ResNet:
    """ResNet-152, ImageNet stem, Bottleneck [3, 8, 36, 3]."""
    return _resnet(152, "imagenet", num_classes, norm_act_layer, zero_init_residual)


@register_model(**_CIFAR)
def resnet18_cifar(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
                   zero_init_residual: bool = False) -> ResNet:
    """ResNet-18 with a CIFAR stem (3x3/1 conv, no max-pool)."""
    return _resnet(18, "cifar", num_classes, norm_act_layer, zero_init_residual)


@register_model(**_CIFAR)
def resnet34_cifar(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
                   zero_init_residual: bool = False) -> ResNet:
    """ResNet-34 with a CIFAR stem (3x3/1 conv, no max-pool)."""
    return _resnet(34, "cifar", num_classes, norm_act_layer, zero_init_residual)


@register_model(**_CIFAR)
def resnet50_cifar(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
                   zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 with a CIFAR stem (3x3/1 conv, no max-pool)."""
    return _resnet(50, "cifar", num_classes, norm_act_layer, zero_init_residual)


@register_model(**_CIFAR)
def resnet101_cifar(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
                    zero_init_residual: bool = False) -> ResNet:
    """ResNet-101 with a CIFAR stem (3x3/1 conv, no max-pool)."""
    return _resnet(101, "cifar", num_classes, norm_act_layer, zero_init_residual)


@register_model(**_CIFAR)
def resnet152_cifar(num_classes: int = 10, norm_act_layer: NormActLayer = BatchNormAct2d,
                    zero_init_residual: bool = False) -> ResNet:
    """ResNet-152 with a CIFAR stem (3x3/1 conv, no max-pool)."""
    return _resnet(152, "cifar", num_classes, norm_act_layer, zero_init_residual)
