"""Data pipelines behind one Loader protocol (installed as `fastres.pipelines`).

    from fastres.pipelines import build_loader
    train = build_loader("tensor", data.train.images, data.train.labels, train=True,
                         batch_size=512, device="cuda", dtype=torch.bfloat16,
                         mean=CIFAR10_MEAN, std=CIFAR10_STD, augment=Augment(flip="alternate"))
    for epoch in range(epochs):
        train.set_epoch(epoch)
        for images, labels in train:   # (B, C, H, W) channels-last, normalised; (B,) int64
            ...

Loaders, by name:
  tensor  the whole uint8 data set on the device, whole-batch tensor augmentation (tensor.py)
  dali    an NVIDIA DALI pipeline fed from memory, GPU operators on a GPU (dali.py)
  torch   torchvision Dataset + DataLoader + transforms, the baseline (torch_loader.py)

All three apply the same augmentation with the same meaning (base.Augment), visit the same
examples in the same order for a given (seed, epoch, rank), and shard the same way. The
tensor and DALI loaders also apply the same draws, so they return the same batches; the
torch loader's transforms draw their own (same distribution).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import Augment, EpochPlan, Loader, shard_indices, normalize

LOADERS = ("tensor", "dali", "torch")


def build_loader(name: str, images, labels, *, train: bool, batch_size: int,
                 device: torch.device | str, dtype: torch.dtype = torch.float32,
                 mean: Sequence[float], std: Sequence[float], augment: Augment = Augment(),
                 rank: int = 0, world_size: int = 1, seed: int = 0,
                 workers: int = 4) -> Loader:
    """A Loader over (N, H, W, C) uint8 `images` (numpy or torch) and (N,) int `labels`.

    train: shuffle, augment, drop the last partial batch, shard each epoch's permutation by
    (rank, world_size); otherwise one in-order pass over this rank's strided shard, no
    augmentation, last batch partial. batch_size is per rank. Images come out normalised
    with mean/std (per channel, [0, 1] units), in `dtype`, NCHW with channels-last strides,
    on `device`; labels int64 on `device`. Shuffle and augmentation draws depend only on
    (seed, epoch, rank): set_epoch(e) and a pass reproduce epoch e; a full pass without
    set_epoch moves to the next epoch. workers: DataLoader worker processes (torch) or DALI
    threads (dali); the tensor loader ignores it.
    """
    if name == "tensor":
        from .tensor import TensorLoader as cls
    elif name == "dali":
        from .dali import DaliLoader as cls
    elif name == "torch":
        from .torch_loader import TorchLoader as cls
    else:
        from fastres.errors import unknown_choice

        raise unknown_choice("loader", name, LOADERS)
    return cls(images, labels, train=train, batch_size=batch_size, device=device, dtype=dtype,
               mean=mean, std=std, augment=augment, rank=rank, world_size=world_size,
               seed=seed, workers=workers)


def available_loaders() -> list[str]:
    """Loader names usable here (dali only when NVIDIA DALI imports)."""
    from .dali import dali_available

    return [n for n in LOADERS if n != "dali" or dali_available()]


__all__ = ["Augment", "EpochPlan", "LOADERS", "Loader", "available_loaders", "build_loader",
           "normalize", "shard_indices"]
