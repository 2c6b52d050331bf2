"""The torch loader: torchvision Dataset + DataLoader + transforms, the baseline.

The path the reference article (and most CIFAR-10 tutorials) uses: each image goes
through PIL and torchvision's transforms one at a time,

    RandomCrop(size, padding=pad, padding_mode="reflect" | "constant")
    -> RandomHorizontalFlip()                  (or the alternate flip, see below)
    -> ToTensor() -> Normalize(mean, std) -> ColorJitter -> Cutout(size)
                                               (ours: (x + b) * c, then zero after Normalize)

in `workers` DataLoader worker processes (persistent), collated on the host, pinned when
the target is a GPU, then moved with non_blocking copies and converted to the channels-last
dtype on the device. It is what the tensor and DALI loaders are measured against.

Same meaning as the other loaders, by construction:
* Order and sharding come from `base.plan_epoch` through our batch sampler (the same
  permutation and shard_indices as the others), drop_last for training, a strided full
  pass for evaluation.
* RandomCrop's offset is uniform over [0, 2*pad] per axis, like ours; torchvision pads
  "reflect" like torch/numpy reflect, and "constant" with fill 0 like pad_mode="zeros".
* The alternate flip cannot be a torchvision transform (it depends on the image index and
  the epoch): the sampler sends each image's flip decision (`base.flip_base` xor epoch
  parity, as in the other loaders) with its index, and the dataset applies TF.hflip.
* Reproducibility: torchvision's random transforms draw from torch's global generator.
  Each batch reseeds the worker's CPU generator from (seed, epoch, rank, batch index)
  before transforming, so a batch does not depend on which worker made it or on what the
  worker did before: set_epoch(e) reproduces epoch e with any number of workers. Without
  workers the reseeding happens inside torch.random.fork_rng, so the trainer's own CPU
  random state is left as it was. The draws themselves differ from the tensor/DALI
  loaders' (torchvision makes its own); the distribution is the same.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .base import STREAM_BATCH, Augment, EpochLoader, LoaderOptions, crop_pad, mix_seed


class Cutout:
    """Zero a size x size square (clipped to the image) of a normalised (C, H, W) tensor,
    centre uniform over the image: the same square as `augment.cutout_keep_mask`.
    Draws from torch's global generator, like torchvision's random transforms."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        cy = int(torch.randint(0, h, ()))
        cx = int(torch.randint(0, w, ()))
        y0, x0 = cy - self.size // 2, cx - self.size // 2
        x[..., max(y0, 0):max(y0 + self.size, 0), max(x0, 0):max(x0 + self.size, 0)] = 0
        return x

    def __repr__(self) -> str:
        return f"Cutout(size={self.size})"


class ColorJitter:
    """(x + b) * c on a normalised (C, H, W) tensor, b uniform in [-brightness, brightness]
    and c in [1 - contrast, 1 + contrast]: the loaders' colour jitter (`Augment`), not
    torchvision's (which works on [0, 1] pixels). Draws from torch's global generator."""

    def __init__(self, brightness: float, contrast: float):
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, x: Tensor) -> Tensor:
        if self.brightness:
            x = x + (float(torch.rand(())) * 2 - 1) * self.brightness
        if self.contrast:
            x = x * (1 + (float(torch.rand(())) * 2 - 1) * self.contrast)
        return x

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast})"


class BatchKey(NamedTuple):
    """What the sampler sends a worker for one batch."""

    indices: np.ndarray          # data-set indices, in batch order
    seed: int                    # reseeds the transforms' generator for this batch
    flips: np.ndarray | None     # alternate flip decisions, one per index (else None)


class ArrayDataset(Dataset):
    """(N, H, W, C) uint8 images and labels in memory, served as torchvision datasets do
    (PIL image -> transforms). Indexed by `BatchKey`s through `__getitems__`; plain
    integer indexing also works (unseeded, no alternate flip)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: Augment,
                 mean: Sequence[float], std: Sequence[float]):
        import torchvision.transforms as T

        self.images, self.labels = images, labels
        h, w = images.shape[1:3]
        pad = crop_pad(augment)
        mode = "reflect" if augment.pad_mode == "reflect" else "constant"
        self.crop = T.RandomCrop((h, w), padding=pad, padding_mode=mode, fill=0) if pad else None
        self.flip = T.RandomHorizontalFlip(0.5) if augment.flip == "random" else None
        self.to_tensor = T.ToTensor()
        self.normalize = T.Normalize(mean, std)
        self.cutout = Cutout(augment.cutout) if augment.cutout else None
        self.jitter = (ColorJitter(augment.brightness, augment.contrast)
                       if augment.brightness or augment.contrast else None)

    def __len__(self) -> int:
        return len(self.labels)

    def transform(self, i: int, flip: bool = False) -> tuple[Tensor, int]:
        import torchvision.transforms.functional as TF
        from PIL import Image

        img = Image.fromarray(self.images[i])
        if self.crop is not None:
            img = self.crop(img)
        if self.flip is not None:
            img = self.flip(img)
        elif flip:
            img = TF.hflip(img)
        x = self.normalize(self.to_tensor(img))
        if self.jitter is not None:
            x = self.jitter(x)
        if self.cutout is not None:
            x = self.cutout(x)
        return x, int(self.labels[i])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(int(i))

    def __getitems__(self, key: BatchKey) -> list[tuple[Tensor, int]]:
        flips = key.flips if key.flips is not None else np.zeros(len(key.indices), bool)
        in_worker = torch.utils.data.get_worker_info() is not None
        # In the main process the reseeding must not disturb the trainer's generator.
        with torch.random.fork_rng(devices=[], enabled=not in_worker):
            torch.default_generator.manual_seed(key.seed)
            return [self.transform(int(i), bool(f)) for i, f in zip(key.indices, flips)]


class EpochBatchSampler:
    """Yields one BatchKey per batch of the loader's current epoch (read when a pass
    starts), from the same plan as the other loaders.

    Holds its loader weakly: loader -> DataLoader -> sampler -> loader would otherwise be
    a reference cycle, and a dropped loader's worker processes would live on until the
    cyclic garbage collector ran, inside whatever the program was doing then.
    """

    def __init__(self, loader: "TorchLoader"):
        self._loader = weakref.ref(loader)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._loader())

    def __iter__(self):
        ld = self._loader()
        plan = ld.plan(self.epoch, random_draws=False)
        indices = plan.indices.numpy()
        flips = plan.flip.numpy() if plan.flip is not None else None
        b = ld.batch_size
        for k, start in enumerate(range(0, len(indices), b)):
            sl = slice(start, start + b)
            yield BatchKey(indices[sl], mix_seed(ld.seed, self.epoch, ld.rank, k, STREAM_BATCH),
                           None if flips is None else flips[sl])


def _worker_init(worker_id: int) -> None:
    # One intra-op thread per worker: the parallelism is across workers, and N workers x
    # all-cores threads would oversubscribe the CPU.
    torch.set_num_threads(1)


class TorchLoader(EpochLoader):
    """torchvision/DataLoader loader; options as `LoaderOptions` (`workers`: DataLoader
    worker processes)."""

    def __init__(self, images, labels, options: LoaderOptions):
        super().__init__(images, labels, options)
        images = np.ascontiguousarray(torch.as_tensor(images).cpu().numpy())
        labels = torch.as_tensor(labels).cpu().to(torch.int64).numpy()
        self.workers = options.workers
        self.dataset = ArrayDataset(images, labels, self.augment, self.mean, self.std)
        self.sampler = EpochBatchSampler(self)
        cuda = self.device.type == "cuda"
        self.dataloader = DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=self.workers,
            pin_memory=cuda, persistent_workers=self.workers > 0,
            worker_init_fn=_worker_init if self.workers > 0 else None,
            generator=torch.Generator().manual_seed(mix_seed(self.seed, self.rank, STREAM_BATCH)))

    def __iter__(self):
        epoch = self.epoch
        self.sampler.epoch = epoch
        for x, y in self.dataloader:
            # NCHW float32 on the host -> device, then channels-last in the target dtype.
            x = x.to(self.device, non_blocking=True)
            x = x.to(dtype=self.dtype, memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
        self.epoch = epoch + 1

    def _sample_u8(self, indices: Tensor) -> Tensor:
        return torch.from_numpy(self.dataset.images[indices.numpy()])
