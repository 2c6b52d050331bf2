"""Data pipelines behind one Loader protocol (installed as `fastres.pipelines`).

    from fastres.pipelines import Augment, LoaderOptions, build_loader
    opts = LoaderOptions.for_dataset("cifar10", batch_size=512, train=True, device="cuda",
                                     dtype=torch.bfloat16, augment=Augment(flip="alternate"))
    train = build_loader("tensor", data.train.images, data.train.labels, opts)
    test = build_loader("tensor", data.test.images, data.test.labels,
                        opts.replace(train=False, batch_size=1000))
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for images, labels in train:   # (B, C, H, W) channels-last, normalised; (B,) int64
            ...

Loaders, by name:
  tensor  the whole uint8 data set on the device, augmented in whole-epoch tensor ops on a
          GPU (each batch a slice), batch by batch on the CPU (tensor.py)
  dali    an NVIDIA DALI pipeline fed whole batches gathered from the data set on the
          device: on a GPU a GPU external source and GPU operators, no host copy (dali.py)
  torch   torchvision Dataset + DataLoader + transforms, the baseline (torch_loader.py)

All three take the same `LoaderOptions`, apply the same augmentation with the same meaning
(`Augment`), visit the same examples in the same order for a given (seed, epoch, rank), and
shard the same way. The tensor and DALI loaders also apply the same draws, so they return
the same batches; the torch loader's transforms draw their own (same distribution).
`check_loader` says what a home-made loader lacks for `fastres.engine.train`.
"""
from __future__ import annotations

from fastres.errors import ConfigError, unknown_choice

from .base import (Augment, EpochLoader, EpochPlan, Loader, LoaderOptions, check_loader,
                   dataset_stats, endless, normalize, shard_indices)
from .dali import DaliLoader, dali_available
from .tensor import TensorLoader
from .torch_loader import TorchLoader

# Loaders by name. DALI itself, torchvision and PIL are imported only when a loader that
# needs them is built.
LOADER_CLASSES = {"tensor": TensorLoader, "dali": DaliLoader, "torch": TorchLoader}
LOADERS = tuple(LOADER_CLASSES)


def build_loader(name: str, images, labels, options: LoaderOptions | None = None, /,
                 **fields) -> Loader:
    """A Loader named `name` over (N, H, W, C) uint8 `images` (numpy or torch) and (N,)
    integer `labels`, as `options` say (see LoaderOptions).

    `fields` are LoaderOptions fields, a shorthand: without `options` they build one
    (`build_loader("tensor", x, y, batch_size=512, train=True)`), with it they replace
    those fields (`build_loader("tensor", x, y, opts, train=False)`).
    """
    if name not in LOADER_CLASSES:
        raise unknown_choice("loader", name, LOADERS)
    if options is None:
        options = LoaderOptions.make(**fields)
    elif not isinstance(options, LoaderOptions):
        raise ConfigError(f"build_loader's fourth argument is a LoaderOptions, got "
                          f"{type(options).__name__}")
    elif fields:
        options = options.replace(**fields)
    return LOADER_CLASSES[name](images, labels, options)


def available_loaders() -> list[str]:
    """Loader names usable here (dali only when NVIDIA DALI imports)."""
    return [n for n in LOADERS if n != "dali" or dali_available()]


__all__ = ["Augment", "DaliLoader", "EpochLoader", "EpochPlan", "LOADERS", "LOADER_CLASSES",
           "Loader", "LoaderOptions", "TensorLoader", "TorchLoader", "available_loaders",
           "build_loader", "check_loader", "dataset_stats", "endless", "normalize",
           "shard_indices"]
