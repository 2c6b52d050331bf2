"""The Loader protocol every pipeline implements, and what they share.

A loader yields `(images, labels)` on the training device: images already normalised, in
the requested dtype, NCHW-shaped but channels-last in memory; labels int64. `len(loader)`
is the number of batches per epoch for this rank; `set_epoch(e)` fixes the epoch's shuffle
and augmentation draws so that a resumed run sees the same batches; training loaders shard
by `(rank, world_size)` (each rank a disjoint 1/world_size of every epoch) and drop the last
partial batch; evaluation loaders make a full pass over their shard in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Augment:
    """Training augmentation, with the same meaning in every pipeline.

    crop: "pad_crop" pads by `pad` (reflect or zeros) and takes a random 32x32 crop, offsets
    uniform in [0, 2*pad]; "translate" shifts by an offset uniform in [-pad, pad] per axis
    (the same draw as pad_crop: speed-run recipes call it translate); "none" leaves it.
    flip: "random" flips each image with p=0.5 each epoch; "alternate" flips a random half in
    epoch 0 and then flips exactly the images not flipped in the epoch before; "none".
    cutout: side of a square (centre uniform over the image, clipped) set to zero after
    normalisation; 0 turns it off.
    """

    crop: str = "pad_crop"
    pad: int = 4
    pad_mode: str = "reflect"
    flip: str = "random"
    cutout: int = 0

    @staticmethod
    def none() -> "Augment":
        return Augment(crop="none", pad=0, flip="none", cutout=0)


@runtime_checkable
class Loader(Protocol):
    batch_size: int

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def shard_indices(n: int, rank: int, world_size: int, perm: Tensor | None = None) -> Tensor:
    """This rank's slice of an epoch: every world_size-th element of `perm` (or 0..n-1),
    truncated so all ranks get the same count. Shards are disjoint; their union is the
    (truncated) epoch."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    order = perm if perm is not None else torch.arange(n)
    per_rank = n // world_size
    return order[rank: per_rank * world_size: world_size]


def normalize(images_u8: Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype) -> Tensor:
    """uint8 NHWC -> normalised NCHW view in channels-last memory, in `dtype`.

    mean and std are per channel in [0, 1] units.
    """
    m = torch.tensor(mean, device=images_u8.device, dtype=torch.float32) * 255
    s = torch.tensor(std, device=images_u8.device, dtype=torch.float32) * 255
    x = (images_u8.float() - m) / s           # N, H, W, C
    return x.to(dtype).permute(0, 3, 1, 2)     # N, C, H, W view with channels-last strides
