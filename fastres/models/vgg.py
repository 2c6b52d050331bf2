"""VGG-16 (Simonyan & Zisserman 2015, configuration D): ImageNet layout and a CIFAR variant.

`vgg16` is torchvision's `vgg16` module for module (`features.N`, `avgpool`,
`classifier.N`), so its state dict loads strictly; 138,357,544 parameters at 1000 classes,
nearly all in the 25088->4096->4096 classifier. It has no BatchNorm (the paper predates
it), so `fused_kernels` changes nothing in it. At 32x32 its five max-pools leave a 1x1 map,
which the 7x7 adaptive average pool replicates: it runs, but it is a 224x224 design.

`vgg16_cifar` is the usual CIFAR adaptation (kuangliu/pytorch-cifar): the same 13 convs,
each followed by BatchNorm + ReLU (one `norm_act_layer` module), and a single 512->classes
linear head; 14,724,042 parameters at 10 classes (the convs carry no bias, a BN follows
each; kuangliu's version keeps the redundant biases and has 14,728,266).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fastres.norm_act import BatchNormAct2d, NormActLayer

from .layers import init_conv_bn_
from .registry import register_model

# Configuration D: output channels of each 3x3 conv, "M" = 2x2/2 max-pool.
CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"]


def make_layers(cfg: list, norm_act_layer: NormActLayer | None) -> nn.Sequential:
    """torchvision's `make_layers`; `norm_act_layer=None` gives the BN-free original."""
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif norm_act_layer is None:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.ReLU()]
            in_channels = v
        else:
            layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1, bias=False),
                       norm_act_layer(v, act="relu")]
            in_channels = v
    return nn.Sequential(*layers)


def _init(model: nn.Module) -> None:
    # torchvision's VGG initialisation: He for convs, N(0, 0.01) for the classifier.
    init_conv_bn_(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class VGG(nn.Module):
    """torchvision's VGG: conv stack, 7x7 adaptive pool, 3-layer classifier with dropout."""

    def __init__(self, features: nn.Sequential, num_classes: int = 1000,
                 dropout: float = 0.5):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class VGGCifar(nn.Module):
    """VGG conv stack with BN, global average pool, one linear layer."""

    def __init__(self, features: nn.Sequential, num_classes: int = 10):
        super().__init__()
        self.features = features
        # A no-op at 32x32 (the last max-pool leaves 1x1); keeps other input sizes working.
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model(family="vgg", paper_params=138.357544, paper_num_classes=1000, input_size=224,
                paper_source="Simonyan & Zisserman 2015 (138 M); torchvision vgg16",
                article={"params_m": "138.36", "gflops": "733.8"})
def vgg16(num_classes: int = 1000, norm_act_layer: NormActLayer = BatchNormAct2d,
          dropout: float = 0.5) -> VGG:
    """VGG-16 (configuration D), ImageNet layout, no BatchNorm (torchvision's vgg16)."""
    # norm_act_layer is accepted for the registry's contract; the original VGG has no BN.
    del norm_act_layer
    return VGG(make_layers(CFG_D, None), num_classes, dropout=dropout)


@register_model(family="vgg", input_size=32, paper_source="kuangliu/pytorch-cifar layout")
def vgg16_cifar(num_classes: int = 10,
                norm_act_layer: NormActLayer = BatchNormAct2d) -> VGGCifar:
    """VGG-16 conv stack with BatchNorm and a 512->classes linear head, for 32x32 inputs."""
    return VGGCifar(make_layers(CFG_D, norm_act_layer), num_classes)
