"""The DALI loader: an NVIDIA DALI pipeline fed from the in-memory uint8 arrays.

Graph (one pipeline per loader, built once):

    external_source "images"  (B, H+2p, W+2p, C) uint8, HWC, pre-padded on the host
      -> .gpu()                                    (when the device is a GPU)
      -> crop_mirror_normalize(crop=(H, W), crop_pos_x/y, mirror, mean*255, std*255,
                               output_layout="HWC", dtype float32 | float16)
      -> erase(anchor, shape, fill_value=0)        (cutout, after normalisation)

Every random choice is made on the host by `base.plan_epoch` and fed per sample through
external sources (crop_pos_x = dx / (2 pad), which DALI rounds back to dx exactly, with dx
mirrored for flipped images since DALI mirrors after cropping; mirror flags; clipped
cutout boxes), so epochs, shards and augmentation draws are exactly those of
the tensor loader: for the same (seed, epoch, rank) both loaders return the same batches
(up to float rounding of the normalisation). Padding (reflect or zeros) is done once, up
front, with the tensor loader's code; DALI's own out-of-bounds padding only does constants.

On a GPU the pipeline runs DALI's GPU operators on `device` (the rank's local GPU); on a
machine without CUDA it runs the CPU operators with device_id=None. Output layout HWC:
the (B, H, W, C) batch viewed as (B, C, H, W) is channels-last memory, no copy.

DALI's rule: tensors a pipeline returns are valid only until its buffers are released
(next iteration). Every batch is therefore copied into a fresh torch tensor on the
consumer's stream (the copy doubles as the dtype conversion) before the DALI buffers go
back: what this loader yields stays valid for as long as the caller keeps it.

One pass at a time: starting a new pass over the loader abandons the previous one (its
queued batches are drained), and the abandoned iterator raises if it is resumed.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from fastres.errors import ConfigError

from .augment import cutout_boxes, pad_images
from .base import EpochLoader, EpochPlan, LoaderOptions, crop_pad

DALI_MISSING = "the dali loader needs NVIDIA DALI: pip install 'fastres[dali]'"

# Batches queued ahead in the pipeline. Two is DALI's default and enough for an in-memory
# source: one batch computes while the trainer consumes the other.
PREFETCH = 2


def _import_dali():
    try:
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as e:
        raise ConfigError(f"{DALI_MISSING} (import failed: {e})") from e
    return fn, types, Pipeline, feed_ndarray


def dali_available() -> bool:
    try:
        _import_dali()
    except ConfigError:
        return False
    return True


class DaliLoader(EpochLoader):
    """DALI-backed loader; options as `LoaderOptions`. `workers` is the number of DALI
    CPU threads."""

    def __init__(self, images, labels, options: LoaderOptions):
        super().__init__(images, labels, options)
        fn, types, Pipeline, self._feed_ndarray = _import_dali()
        aug = self.augment
        h, w, c = self.image_shape
        self._pad = crop_pad(aug)
        images_t = torch.as_tensor(images).cpu()
        self._images = images_t.numpy()                 # unpadded, for sample()
        self._store = np.ascontiguousarray(pad_images(images_t, self._pad, aug.pad_mode).numpy())
        self._labels = torch.as_tensor(labels).cpu().to(torch.int64)
        self._gpu = self.device.type == "cuda"
        if self._gpu and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device} requested but CUDA is not available")
        device_id = None
        if self._gpu:
            device_id = (self.device.index if self.device.index is not None
                         else torch.cuda.current_device())
            self.device = torch.device("cuda", device_id)
            self.options = self.options.replace(device=self.device)
        self._out_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        self._flip = aug.flip != "none"
        self._cutout = aug.cutout

        # Executors: on a GPU the pipelined asynchronous one (CPU stage of batch i+1 overlaps
        # the GPU stage of batch i). With CPU operators only there is one stage to pipeline;
        # the plain asynchronous executor measured faster on a 2-core CPU (~45k vs ~25k
        # img/s, batch 512). Both are DALI's classic executors, whose outputs the PyTorch
        # plugin copies exactly as `_copy_out` does.
        self._pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, options.workers),
                              device_id=device_id, prefetch_queue_depth=PREFETCH,
                              exec_pipelined=self._gpu, exec_async=True, exec_dynamic=False)
        with self._pipe:
            x = fn.external_source(name="images", layout="HWC", dtype=types.UINT8)
            if self._gpu:
                x = x.gpu()
            kw = {}
            if self._pad:
                kw.update(crop=(h, w),
                          crop_pos_x=fn.external_source(name="crop_x", dtype=types.FLOAT),
                          crop_pos_y=fn.external_source(name="crop_y", dtype=types.FLOAT))
            if self._flip:
                kw["mirror"] = fn.external_source(name="mirror", dtype=types.INT32)
            x = fn.crop_mirror_normalize(
                x, mean=[255.0 * m for m in self.mean], std=[255.0 * s for s in self.std],
                dtype=types.FLOAT16 if self._out_dtype == torch.float16 else types.FLOAT,
                output_layout="HWC", **kw)
            if self._cutout:
                x = fn.erase(x, anchor=fn.external_source(name="cut_anchor", dtype=types.FLOAT),
                             shape=fn.external_source(name="cut_shape", dtype=types.FLOAT),
                             axis_names="HW", fill_value=0.0)
            self._pipe.set_outputs(x)
        self._pipe.build()
        self._in_flight = 0       # runs scheduled whose outputs were not taken yet
        self._pass = None         # token of the pass currently allowed to take outputs
        if self._pipe.exec_pipelined:
            self._prime()

    # ---------------------------------------------------------------- feeding

    def _feed(self, p: EpochPlan) -> None:
        """Queue one batch's inputs (numpy, host memory) for the next scheduled run."""
        pipe = self._pipe
        pipe.feed_input("images", self._store[p.indices.numpy()])
        if self._pad:
            span = 2 * self._pad
            dx = p.dx.numpy()
            if self._flip:
                # The plan crops the mirrored image at dx; crop_mirror_normalize crops first
                # and mirrors after, which is the same image for the offset 2p - dx.
                dx = np.where(p.flip.numpy() == 1, span - dx, dx)
            # DALI places the window at round(pos * (W_in - W_out)): dx / 2p returns dx.
            pipe.feed_input("crop_x", dx.astype(np.float32) / np.float32(span))
            pipe.feed_input("crop_y", p.dy.numpy().astype(np.float32) / np.float32(span))
        if self._flip:
            pipe.feed_input("mirror", p.flip.numpy().astype(np.int32))
        if self._cutout:
            top, left, hh, ww = cutout_boxes(p.cut_y, p.cut_x, self._cutout,
                                             self.image_shape[:2])
            pipe.feed_input("cut_anchor", torch.stack([top, left], 1).numpy().astype(np.float32))
            pipe.feed_input("cut_shape", torch.stack([hh, ww], 1).numpy().astype(np.float32))

    def _schedule(self, p: EpochPlan) -> None:
        self._feed(p)
        self._pipe.schedule_run()
        self._in_flight += 1

    def _take(self, n: int) -> Tensor:
        """Wait for the oldest scheduled run, copy its n images out, release DALI's buffers."""
        (out,) = self._pipe.share_outputs()
        self._in_flight -= 1
        try:
            return self._copy_out(out, n)
        finally:
            self._pipe.release_outputs()

    def _copy_out(self, out, n: int) -> Tensor:
        h, w, c = self.image_shape
        dense = out.as_tensor()                                   # (n, H, W, C), DALI memory
        x = torch.empty((n, h, w, c), dtype=self._out_dtype, device=self.device)
        # GPU: an asynchronous copy on the consumer's current stream, as DALI's PyTorch
        # plugin does; DALI orders the reuse of its buffer after it.
        stream = torch.cuda.current_stream(self.device) if self._gpu else None
        self._feed_ndarray(dense, x, cuda_stream=stream)
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x.permute(0, 3, 1, 2)                             # NCHW view, channels-last

    def _prime(self) -> None:
        # A pipelined executor's first schedule_run runs PREFETCH iterations at once and
        # needs that many batches fed. Doing it once here, on a dummy batch, leaves every
        # later schedule_run at exactly one run, so short epochs need no special case.
        b = self.batch_size
        dummy = EpochPlan(indices=torch.zeros(b, dtype=torch.int64))
        if self._pad:
            dummy.dy = dummy.dx = torch.zeros(b, dtype=torch.int64)
        if self._flip:
            dummy.flip = torch.zeros(b, dtype=torch.int64)
        if self._cutout:
            dummy.cut_y = dummy.cut_x = torch.zeros(b, dtype=torch.int64)
        for _ in range(PREFETCH):
            self._feed(dummy)
        self._pipe.schedule_run()
        for _ in range(PREFETCH):
            self._pipe.share_outputs()
            self._pipe.release_outputs()

    def _drain(self) -> None:
        while self._in_flight:
            self._pipe.share_outputs()
            self._pipe.release_outputs()
            self._in_flight -= 1

    # ---------------------------------------------------------------- protocol

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        self._drain()                     # a previous pass abandoned half way
        token = self._pass = object()
        plan = self.plan(epoch)
        labels = self._labels[plan.indices]
        if self._gpu:
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        batches = list(plan.batches(self.batch_size))
        queued = 0
        while queued < min(PREFETCH, len(batches)):
            self._schedule(batches[queued])
            queued += 1
        for b, p in enumerate(batches):
            if self._pass is not token:
                raise RuntimeError("this DALI loader started a new pass; an iterator over an "
                                   "earlier pass cannot continue")
            x = self._take(len(p.indices))
            if queued < len(batches):
                self._schedule(batches[queued])
                queued += 1
            start = b * self.batch_size
            yield x, labels[start:start + len(p.indices)]
        self._pass = None
        self.epoch = epoch + 1

    def _sample_u8(self, indices: Tensor) -> Tensor:
        return torch.from_numpy(self._images[indices.numpy()])
