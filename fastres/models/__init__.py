"""The model zoo: every network the project trains, built by name.

    from fastres.models import create_model, list_models
    model = create_model("resnet56", num_classes=10, shortcut="A")
    model = create_model("resnet50", num_classes=1000)   # loads torchvision's state dict
    model = create_model("airbench94", fused_kernels=True)

Blocks build each BatchNorm(+residual add)+activation as one `norm_act_layer` module
(`fastres.norm_act.BatchNormAct2d`, or `fastres.kernels.FusedBatchNormAct2d` with fused_kernels=True),
so the fused Triton kernels change no model code and no state dict. The model classes are
exported for subclassing and isinstance checks; build models through `create_model`, which
also applies the registered defaults (initialisation, zero_init_residual, BN momentum).
"""
from .registry import (ModelEntry, check_model, count_params, create_model, list_models,
                       model_info, register_model)

# Importing the model modules registers their entry points.
from . import cifar_resnet, resnet, preact_resnet, vgg, googlenet, airbench  # noqa: E402,F401
from .airbench import AirbenchNet  # noqa: E402
from .cifar_resnet import CifarResNet  # noqa: E402
from .flops import count_flops, flops_row  # noqa: E402
from .googlenet import GoogLeNetCifar  # noqa: E402
from .preact_resnet import PreActResNet  # noqa: E402
from .resnet import ResNet  # noqa: E402
from .vgg import VGG, VGGCifar  # noqa: E402

__all__ = [
    "check_model",
    "AirbenchNet", "CifarResNet", "GoogLeNetCifar", "ModelEntry",
    "PreActResNet", "ResNet", "VGG", "VGGCifar", "count_flops", "count_params",
    "create_model", "flops_row", "list_models", "model_info",
    "register_model",
]
