"""Batched augmentations on a device-resident uint8 data set: whole-batch tensor ops only.

The tensor loader (and `sample()` of every loader) builds its batches here. The design,
measured on a 2-core CPU and reasoned for a GPU:

* Padding is done once, when the data set is put on the device, not per batch. With
  flips a mirrored copy of the padded set is stored beside it, and an image is
  crop(hflip?(pad(x)), dy, dx): a flipped image is an ordinary crop of the mirrored copy.
  Memory: 2 x N x (H+2p) x (W+2p) x C elements (480 MB of uint8 for CIFAR-10, pad 4).
* One strided view covers every possible crop of every image,
  `windows[f, n, dy, dx] -> (H, W, C)`, so a whole batch of crops and flips is one
  advanced-indexing gather in uint8, with no Python loop over images or shifts and no
  host sync (airbench's per-shift boolean masks sync on a GPU). On this CPU the gather runs
  at ~200-300k img/s per thread; the per-element pad/crop/flip ops it replaces reach ~20k.
* Normalisation is `x * (1/(255 std)) - mean/std` computed in float32 and rounded once to
  the output dtype. On the CPU it runs per batch on the gathered uint8 crops, with scale
  and shift materialised as full (H, W, C) patterns: broadcasting a (C,) vector makes the
  CPU inner loop 3 elements long and runs ~15x slower. On a GPU the store is normalised
  once, up front, in the output dtype (as airbench does in fp16): each batch is then a
  single gather kernel instead of five small ones, which matters when a fast net's step
  is bound by kernel launches; the price is 2-4x the resident bytes (~1 GB in bf16).
* Colour jitter, (x + b) * c per image, follows the normalisation (two broadcast ops in
  float32 on the normalised values of the output dtype).
* Cutout zeroes a square after normalisation (the zero is the data set's mean pixel) by
  multiplying with a keep mask built from broadcast row/column comparisons.

All offsets, flips, cutout centres and jitter values are drawn by the caller
(fastres.pipelines.base.plan_epoch) so that every loader applies the same draws for the same
(seed, epoch, rank).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def reflect_index(n: int, pad: int, device=None) -> Tensor:
    """Source index of each position of an axis of length n padded by `pad` on each side,
    mirroring without repeating the edge (torch "reflect", numpy "reflect")."""
    i = torch.arange(-pad, n + pad, device=device).abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def pad_images(images: Tensor, pad: int, mode: str) -> Tensor:
    """(N, H, W, C) -> (N, H+2p, W+2p, C), reflect or zeros, any dtype and device.

    Index gathers rather than F.pad: the same code serves uint8 on every device (reflection
    padding kernels are not implemented for every integer dtype).
    """
    if pad == 0:
        return images
    n, h, w, c = images.shape
    if mode == "zeros":
        out = images.new_zeros(n, h + 2 * pad, w + 2 * pad, c)
        out[:, pad:pad + h, pad:pad + w] = images
        return out
    rows = reflect_index(h, pad, images.device)
    cols = reflect_index(w, pad, images.device)
    return images[:, rows][:, :, cols]


def norm_constants(mean: Sequence[float], std: Sequence[float], hw: tuple[int, int],
                   device=None) -> tuple[Tensor, Tensor]:
    """float32 (H, W, C) patterns `scale = 1/(255 std)` and `shift = -mean/std`, so that
    normalised = uint8 * scale + shift. Full patterns, not (C,) vectors: see the module doc."""
    m = torch.tensor(mean, dtype=torch.float64)
    s = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).float()
    shift = (-m / s).float()
    h, w = hw
    return (scale.expand(h, w, len(mean)).contiguous().to(device),
            shift.expand(h, w, len(mean)).contiguous().to(device))


def normalize_nhwc(images_u8: Tensor, scale: Tensor, shift: Tensor,
                   dtype: torch.dtype) -> Tensor:
    """uint8 (B, H, W, C) -> normalised (B, H, W, C) in `dtype`, computed in float32."""
    x = images_u8.to(torch.float32)
    x.mul_(scale).add_(shift)
    return x if dtype == torch.float32 else x.to(dtype)


def cutout_keep_mask(cut_y: Tensor, cut_x: Tensor, size: int, hw: tuple[int, int]) -> Tensor:
    """(B, H, W, 1) bool, False inside each image's cutout square.

    The square covers rows [cy - size//2, cy - size//2 + size) and the same for columns,
    clipped to the image; centres are uniform over the image (drawn by the caller).
    """
    h, w = hw
    y0 = (cut_y - size // 2)[:, None]
    x0 = (cut_x - size // 2)[:, None]
    rows = torch.arange(h, device=cut_y.device)
    cols = torch.arange(w, device=cut_x.device)
    in_rows = (rows >= y0) & (rows < y0 + size)          # B, H
    in_cols = (cols >= x0) & (cols < x0 + size)          # B, W
    return ~(in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(-1)


def cutout_boxes(cut_y: Tensor, cut_x: Tensor, size: int,
                 hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The clipped squares of `cutout_keep_mask` as (top, left, height, width), for
    operators that take boxes (DALI's erase). Height and width are at least 1."""
    h, w = hw
    y0 = cut_y - size // 2
    x0 = cut_x - size // 2
    top, left = y0.clamp(0, h), x0.clamp(0, w)
    bottom, right = (y0 + size).clamp(0, h), (x0 + size).clamp(0, w)
    return top, left, bottom - top, right - left


class BatchAugment:
    """A data set held on one device, and the batched op that turns a batch of indices plus
    draws into a normalised, augmented, channels-last batch.

    images: (N, H, W, C) uint8 on the target device. pad: padding for the crop (0 = no
    crop). flip: keep a flipped copy so that images can be mirrored. prenormalize: store
    the padded set already normalised in `dtype` (default: on GPUs) instead of uint8.
    Output of `__call__`: (B, C, H, W) in `dtype`, a view of (B, H, W, C) memory
    (channels-last), a new tensor each call.
    """

    # Images normalised per chunk when pre-normalising, to bound the float32 temporary.
    CHUNK = 4096

    def __init__(self, images: Tensor, *, mean: Sequence[float], std: Sequence[float],
                 dtype: torch.dtype, pad: int = 0, pad_mode: str = "reflect",
                 flip: bool = False, cutout: int = 0, prenormalize: bool | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected (N, H, W, C) uint8 images, got {tuple(images.shape)} "
                             f"{images.dtype}")
        n, h, w, c = images.shape
        self.hw = (h, w)
        self.pad = pad
        self.cutout = cutout
        self.dtype = dtype
        self.device = images.device
        self.flippable = flip
        # GPU: normalising once and gathering in `dtype` leaves one kernel per batch (the
        # gather) instead of five, at 2-4x the resident bytes (~1 GB in bf16 for CIFAR-10
        # with pad 4 and flips). CPU: uint8 keeps the gather's bytes and the memory small.
        self.prenormalized = self.device.type != "cpu" if prenormalize is None else prenormalize
        padded = pad_images(images, pad, pad_mode)
        copies = [padded, padded.flip(2)] if flip else [padded]
        p = padded.shape[1:3]
        if self.prenormalized:
            scale, shift = norm_constants(mean, std, p, self.device)
            store = torch.empty((len(copies), *padded.shape), dtype=dtype, device=self.device)
            for f, src in enumerate(copies):
                for i in range(0, n, self.CHUNK):
                    store[f, i:i + self.CHUNK] = normalize_nhwc(src[i:i + self.CHUNK], scale,
                                                                shift, dtype)
        else:
            store = torch.stack(copies)
        # (F, N, H+2p, W+2p, C); store[1] is the mirrored copy.
        self.store = store.contiguous()
        if pad:
            sf, sn, sh, sw, sc = self.store.stride()
            k = 2 * pad + 1
            # windows[f, n, dy, dx] is the (H, W, C) crop at offset (dy, dx): dims 2-3 step
            # the window's corner, dims 4-6 walk inside it, over the same memory.
            self.windows = self.store.as_strided(
                (self.store.shape[0], n, k, k, h, w, c), (sf, sn, sh, sw, sh, sw, sc))
        self.scale, self.shift = norm_constants(mean, std, (h, w), self.device)

    def gather(self, indices: Tensor, dy: Tensor | None = None, dx: Tensor | None = None,
               flip: Tensor | None = None) -> Tensor:
        """(B, H, W, C) in the store's dtype: images `indices`, mirrored where `flip` is 1
        (int64), then cropped at (dy, dx) in [0, 2*pad]. One indexing kernel."""
        if flip is not None and not self.flippable:
            raise ValueError("flip draws given to a BatchAugment built without flip=True")
        if self.pad:
            if dy is None or dx is None:
                raise ValueError("a padded BatchAugment needs crop offsets dy, dx")
            return self.windows[0 if flip is None else flip, indices, dy, dx]
        if flip is None:
            return self.store[0].index_select(0, indices)
        return self.store[flip, indices]

    def __call__(self, indices: Tensor, dy: Tensor | None = None, dx: Tensor | None = None,
                 flip: Tensor | None = None, cut_y: Tensor | None = None,
                 cut_x: Tensor | None = None, bright: Tensor | None = None,
                 contrast: Tensor | None = None) -> Tensor:
        x = self.gather(indices, dy, dx, flip)
        if not self.prenormalized:
            x = normalize_nhwc(x, self.scale, self.shift, self.dtype)
        if bright is not None or contrast is not None:
            # In float32 from the normalised values in the output dtype, rounded once more:
            # the same values whether the store holds uint8 (CPU) or normalised images (GPU).
            y = x.float()
            if bright is not None:
                y = y.add_(bright.view(-1, 1, 1, 1))
            if contrast is not None:
                y = y.mul_(contrast.view(-1, 1, 1, 1))
            x = y if y.dtype == self.dtype else y.to(self.dtype)
        if cut_y is not None:
            # Multiplying by 0/1 is exact in any dtype: zero after normalisation either way.
            x.mul_(cutout_keep_mask(cut_y, cut_x, self.cutout, self.hw))
        return x.permute(0, 3, 1, 2)

    def unaugmented(self, indices: Tensor) -> Tensor:
        """The images themselves (centre of the padded store), normalised, channels-last."""
        if not self.pad:
            return self(indices)
        centre = torch.full_like(indices, self.pad)
        return self(indices, centre, centre)
