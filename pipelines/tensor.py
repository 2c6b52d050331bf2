"""The device-resident tensor loader: the whole uint8 data set on the training device.

What the fastest CIFAR-10 speed-runs use (airbench keeps the data set on the GPU and
augments it with whole-tensor ops). Per epoch the host draws the plan (permutation, crop
offsets, flips, cutout centres: `base.plan_epoch`, ~2 ms for 50,000 images) and copies it
to the device in one non-blocking transfer. The augmentation then runs on whole chunks of
the epoch, not per batch: one gather (crop and flip; on a GPU from a store normalised up
front, on the CPU in uint8 followed by the normalisation) and, with cutout, one mask
multiply per chunk; every batch is a slice of its chunk. No host sync, no Python loop
over images, no worker processes.

Chunks (`augment_batches`): on a GPU the whole epoch is one chunk, as airbench does, so
a batch costs the host two slices (a few microseconds) and the device nothing: a fast
net's step, bound by the host launching kernels, no longer pays for the loader's ops in
every step. The epoch's augmented images take N x H x W x C elements of the output dtype
(300 MB in bf16 for CIFAR-10) beside the store. On the CPU, where the augmentation is
arithmetic the host does either way, a chunk is at most CPU_CHUNK_IMAGES images (one
batch when batches are larger): the chunk's float32 temporaries then stay in the caches.
Measured on a 2-core CPU (translate 2, alternate flips, fp32, medians of 6 epochs):
chunks of 256-512 images 400-500k img/s, 2,000 313k, 4,096 162k, 8,192 169k.
`augment_batches=1` augments each batch on its own (the path before issue 19), with the
same batches.

A batch is a view of its chunk. A chunk is new each time (never reused), so a batch
stays valid for as long as the caller holds it (and holds its chunk in memory with it).

Memory on the device: the padded set, twice when flips are on: uint8 on the CPU, the
output dtype on a GPU (~1 GB in bf16 for CIFAR-10 with pad 4; see augment.py).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .augment import BatchAugment
from .base import EpochLoader, LoaderOptions, crop_pad

# Most images augmented at once on the CPU: enough that the per-chunk host overhead is
# small against the arithmetic, few enough that the float32 temporaries (6 MB) stay in
# the caches (see the module doc for the measurement).
CPU_CHUNK_IMAGES = 512


class TensorLoader(EpochLoader):
    """Loader over (N, H, W, C) uint8 images held on `device` (CPU tensors when the device
    is the CPU); options as `LoaderOptions`. `workers` is not used (there is nothing to
    parallelise outside the device).

    `augment_batches`: batches augmented together (None: the whole epoch on a GPU, at most
    CPU_CHUNK_IMAGES images, or one batch, on the CPU; 1: every batch on its own). The
    batches are the same whatever it is.
    """

    def __init__(self, images, labels, options: LoaderOptions):
        super().__init__(images, labels, options)
        aug = self.augment
        images = torch.as_tensor(images).to(self.device)
        self.labels = torch.as_tensor(labels).to(self.device, torch.int64)
        self._aug = BatchAugment(images, mean=self.mean, std=self.std, dtype=self.dtype,
                                 pad=crop_pad(aug), pad_mode=aug.pad_mode,
                                 flip=aug.flip != "none", cutout=aug.cutout)
        self.augment_batches: int | None = None

    def chunk_images(self, n: int) -> int:
        """Images augmented together in an epoch of n images (a whole number of batches)."""
        b = self.batch_size
        k = self.augment_batches
        if k is None:
            k = -(-n // b) if self.device.type != "cpu" else max(1, CPU_CHUNK_IMAGES // b)
        if k < 1:
            raise ValueError(f"augment_batches must be None or >= 1, got {k}")
        return k * b

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        plan = self.plan(epoch).to(self.device)
        n = len(plan.indices)
        labels = self.labels[plan.indices]          # one gather per epoch; batches are views
        b = self.batch_size
        chunk = self.chunk_images(n)
        for start in range(0, n, chunk):
            p = plan.slice(start, start + chunk)
            x = self._aug(p.indices, p.dy, p.dx, p.flip, p.cut_y, p.cut_x,   # (m, C, H, W)
                          p.bright, p.contrast)
            for s in range(0, len(x), b):
                yield x[s:s + b], labels[start + s:start + s + b]
        self.epoch = epoch + 1

    def sample(self, n: int) -> Tensor:
        if n < 1:
            raise ValueError(f"sample needs n >= 1, got {n}")
        # Straight from the store (normalised on GPUs): the same values as base.normalize.
        return self._aug.unaugmented(self._shard[:n].to(self.device))
