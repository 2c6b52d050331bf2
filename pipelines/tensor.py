"""The device-resident tensor loader: the whole uint8 data set on the training device.

What the fastest CIFAR-10 speed-runs use (airbench keeps the data set on the GPU and
augments whole batches with tensor ops). Per epoch the host draws the plan (permutation,
crop offsets, flips, cutout centres: `base.plan_epoch`, ~2 ms for 50,000 images) and copies
it to the device in one non-blocking transfer; per batch the device runs one gather (crop
and flip; on a GPU from a store normalised up front, on the CPU in uint8 followed by the
normalisation) and, with cutout, one mask multiply. No host sync, no Python loop over
images, no worker processes.

Memory on the device: the padded set, twice when flips are on: uint8 on the CPU, the
output dtype on a GPU (~1 GB in bf16 for CIFAR-10 with pad 4; see augment.py).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .augment import BatchAugment
from .base import EpochLoader, LoaderOptions, crop_pad


class TensorLoader(EpochLoader):
    """Loader over (N, H, W, C) uint8 images held on `device` (CPU tensors when the device
    is the CPU); options as `LoaderOptions`. `workers` is not used (there is nothing to
    parallelise outside the device)."""

    def __init__(self, images, labels, options: LoaderOptions):
        super().__init__(images, labels, options)
        aug = self.augment
        images = torch.as_tensor(images).to(self.device)
        self.labels = torch.as_tensor(labels).to(self.device, torch.int64)
        self._aug = BatchAugment(images, mean=self.mean, std=self.std, dtype=self.dtype,
                                 pad=crop_pad(aug), pad_mode=aug.pad_mode,
                                 flip=aug.flip != "none", cutout=aug.cutout)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        plan = self.plan(epoch).to(self.device)
        labels = self.labels[plan.indices]          # one gather per epoch; batches are views
        for b, p in enumerate(plan.batches(self.batch_size)):
            x = self._aug(p.indices, p.dy, p.dx, p.flip, p.cut_y, p.cut_x)
            yield x, labels[b * self.batch_size: b * self.batch_size + len(p.indices)]
        self.epoch = epoch + 1

    def sample(self, n: int) -> Tensor:
        if n < 1:
            raise ValueError(f"sample needs n >= 1, got {n}")
        # Straight from the store (normalised on GPUs): the same values as base.normalize.
        return self._aug.unaugmented(self._shard[:n].to(self.device))
