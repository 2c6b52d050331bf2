"""The DALI loader: an NVIDIA DALI pipeline fed from a device-resident copy of the data set.

Graph (`define_graph`, built once per loader; one function for both devices, so the CPU
tests build and run the same graph a GPU runs, with the same argument plumbing):

    external_source "images"   device "gpu" on a GPU, "cpu" elsewhere; batch=True,
                               no_copy=True: (B, H+2p, W+2p, C) uint8 HWC, this batch's
                               images, picked from the padded set on that device
    external_source "crop_x", "crop_y", "mirror", "cut_anchor", "cut_shape"
                               argument inputs, one value (or box) per image, host memory
    external_source "bright", "contrast"
                               colour jitter, one float32 per image, host memory (moved to
                               the GPU with `.gpu()` there: arithmetic takes no CPU input)
    -> crop_mirror_normalize(crop=(H, W), crop_pos_x/y, mirror, mean*255, std*255,
                             output_layout="HWC", dtype float32 | float16; float32 when
                             jittering)
    -> (x + bright) * contrast, cast to float16 when asked   (colour jitter)
    -> erase(anchor, shape, fill_value=0)           (cutout, after normalisation)

Feeding (`BatchFeeder`). The data set, padded once with the tensor loader's code (DALI's
own out-of-bounds padding only does constants), lives on the loader's device: on a GPU
the uint8 store (194 MB for CIFAR-10, pad 4) is copied there once. Per epoch the plan's
indices go to the device in one copy and the host turns the plan's draws into DALI's
argument arrays for the whole epoch (a few numpy vector ops). Per batch: one index_select
on the device gathers the batch's padded images into a fresh contiguous uint8 tensor,
handed to the images source whole, as a CUDA tensor on a GPU (DALI takes it through
`__cuda_array_interface__`, ordered after the gather by the consumer's current stream,
which is passed as `cuda_stream`); no host copy, and with no_copy no device copy either.
The argument inputs are slices (views) of the epoch's arrays: DALI requires argument
inputs in host memory ("Argument Inputs must be stored in CPU memory"), so they are the
only host data a batch feeds, 8 to 24 bytes an image.

Draws: every random choice is the epoch plan's (`base.plan_epoch`), so epochs, shards and
augmentation are exactly those of the tensor loader: for the same (seed, epoch, rank)
both loaders return the same batches (up to float rounding of the normalisation).
crop_pos_x = dx' / (2 pad), where DALI places the window at round(pos * (W_in - W_out)),
which gives back dx' exactly; dx' = dx, or 2 pad - dx for a flipped image, because the
plan crops the mirrored image while crop_mirror_normalize crops first and mirrors after.

no_copy: DALI reads the fed memory when the run executes, so every fed tensor and array
is kept (`_keep`) until that run's outputs have been taken and copied.

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

import time
from collections import deque
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

# Host-side phases of a batch, timed with perf_counter (about 0.1 us each): where a GPU
# run's time goes, printed by `fastres bench-loaders`.
PHASES = ("feed", "schedule", "wait", "copy")


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


def define_graph(fn, types, *, device: str, hw: tuple[int, int], pad: int, flip: bool,
                 cutout: bool, mean, std, fp16: bool, bright: bool = False,
                 contrast: bool = False):
    """The loader's graph, inside a `with pipeline:` block; returns its output node.

    device: "gpu" or "cpu", where the images source (and so every operator) runs. The
    argument inputs are host-memory sources on both devices. mean/std: per channel, in
    [0, 1] units. fp16: float16 output, else float32. bright, contrast: colour jitter
    (x + b) * c, computed in float32 like the tensor loader's and rounded once.
    """
    x = fn.external_source(name="images", device=device, batch=True, no_copy=True,
                           layout="HWC", dtype=types.UINT8)

    def arg(name, dtype):
        return fn.external_source(name=name, device="cpu", batch=True, no_copy=True,
                                  dtype=dtype)

    kw = {}
    if pad:
        kw.update(crop=hw, crop_pos_x=arg("crop_x", types.FLOAT),
                  crop_pos_y=arg("crop_y", types.FLOAT))
    if flip:
        kw["mirror"] = arg("mirror", types.INT32)
    jitter = bright or contrast
    x = fn.crop_mirror_normalize(
        x, mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
        dtype=types.FLOAT16 if fp16 and not jitter else types.FLOAT, output_layout="HWC",
        **kw)
    for name, on in (("bright", bright), ("contrast", contrast)):
        if on:
            # (B,) scalars reshaped to (1, 1, 1) per image broadcast over H, W, C.
            v = fn.reshape(arg(name, types.FLOAT), shape=[1, 1, 1])
            v = v.gpu() if device == "gpu" else v
            x = x + v if name == "bright" else x * v
    if jitter and fp16:
        x = fn.cast(x, dtype=types.FLOAT16)
    if cutout:
        x = fn.erase(x, anchor=arg("cut_anchor", types.FLOAT),
                     shape=arg("cut_shape", types.FLOAT), axis_names="HW", fill_value=0.0)
    return x


def epoch_arguments(plan: EpochPlan, *, pad: int, cutout: int,
                    hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """DALI's argument inputs for a whole epoch (host numpy arrays, one row per image), from
    the plan's CPU tensors: crop_x, crop_y (float32, normalised window position), mirror
    (int32), cut_anchor, cut_shape ((n, 2) float32, clipped boxes), bright, contrast
    (float32 colour jitter)."""
    out = {}
    if pad:
        span = 2 * pad
        dx = plan.dx.numpy()
        if plan.flip is not None:
            # The plan crops the mirrored image at dx; crop_mirror_normalize crops first and
            # mirrors after, which is the same image for the offset 2p - dx.
            dx = np.where(plan.flip.numpy() == 1, span - dx, dx)
        # DALI places the window at round(pos * (W_in - W_out)): dx / 2p gives dx back.
        out["crop_x"] = dx.astype(np.float32) / np.float32(span)
        out["crop_y"] = plan.dy.numpy().astype(np.float32) / np.float32(span)
    if plan.flip is not None:
        out["mirror"] = plan.flip.numpy().astype(np.int32)
    if cutout:
        top, left, hh, ww = cutout_boxes(plan.cut_y, plan.cut_x, cutout, hw)
        out["cut_anchor"] = torch.stack([top, left], 1).numpy().astype(np.float32)
        out["cut_shape"] = torch.stack([hh, ww], 1).numpy().astype(np.float32)
    for name in ("bright", "contrast"):
        if getattr(plan, name) is not None:
            out[name] = getattr(plan, name).numpy().astype(np.float32)
    return out


class BatchFeeder:
    """Feeds one pipeline batch by batch from a padded uint8 store on one device.

    store: (N, H+2p, W+2p, C) uint8, contiguous, on the loader's device (a CUDA tensor on
    a GPU). stream: the CUDA stream the gathers run on and DALI must order its reads
    after (the consumer's current stream, read once per pass), None on the CPU.
    `start(indices, args)` sets the epoch: indices on the store's device, args from
    `epoch_arguments`. `feed(pipe, start, stop)` queues images start..stop-1 of the epoch
    for the pipeline's next run and returns what must stay alive until that run's
    outputs are taken (no_copy).
    """

    def __init__(self, store: Tensor, stream=None):
        if store.dtype != torch.uint8 or store.dim() != 4 or not store.is_contiguous():
            raise ValueError(f"the feeder's store is a contiguous (N, H, W, C) uint8 tensor, "
                             f"got {tuple(store.shape)} {store.dtype}")
        self.store = store
        self.stream = stream
        self.indices: Tensor | None = None
        self.args: dict[str, np.ndarray] = {}

    def start(self, indices: Tensor, args: dict[str, np.ndarray]) -> None:
        if indices.device != self.store.device:
            raise ValueError(f"indices on {indices.device}, store on {self.store.device}")
        self.indices, self.args = indices, args

    def gather(self, start: int, stop: int):
        """Images start..stop-1 of the epoch, in fresh contiguous memory on the store's
        device: a torch tensor on a GPU (one index_select on the current stream), a numpy
        array on the CPU. numpy there on purpose: its gather is single-threaded, while
        torch's OpenMP team fights DALI's worker threads for the cores (measured on 2
        cores: index_select 35 us alone, 7 ms beside a running pipeline)."""
        if self.store.device.type == "cpu":
            return self.store.numpy()[self.indices[start:stop].numpy()]
        return self.store.index_select(0, self.indices[start:stop])

    def feed(self, pipe, start: int, stop: int) -> tuple:
        images = self.gather(start, stop)
        if self.stream is not None:
            # DALI's read is ordered after the gather through `cuda_stream`.
            pipe.feed_input("images", images, cuda_stream=self.stream)
        else:
            pipe.feed_input("images", images)
        views = {k: v[start:stop] for k, v in self.args.items()}
        for name, v in views.items():
            pipe.feed_input(name, v)
        return images, views


class DaliLoader(EpochLoader):
    """DALI-backed loader; options as `LoaderOptions`. `workers` is the number of DALI
    CPU threads. `timings`: host seconds spent per phase (PHASES) and batches, since the
    loader was built (`reset_timings()` zeroes them)."""

    def __init__(self, images, labels, options: LoaderOptions):
        super().__init__(images, labels, options)
        fn, types, Pipeline, self._feed_ndarray = _import_dali()
        aug = self.augment
        h, w, c = self.image_shape
        self._pad = crop_pad(aug)
        self._gpu = self.device.type == "cuda"
        if self._gpu and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device} requested but CUDA is not available")
        if self.device.type not in ("cuda", "cpu"):
            raise ConfigError(f"the dali loader runs on a CUDA device or the CPU, not "
                              f"{self.device}")
        device_id = None
        if self._gpu:
            device_id = (self.device.index if self.device.index is not None
                         else torch.cuda.current_device())
            self.device = torch.device("cuda", device_id)
            self.options = self.options.replace(device=self.device)
        # Padded once, on the host, then moved to the device once: the only host-to-device
        # copy of image data this loader makes.
        padded = pad_images(torch.as_tensor(images).cpu(), self._pad, aug.pad_mode)
        self._store = padded.contiguous().to(self.device)
        self._labels = torch.as_tensor(labels).to(self.device, torch.int64)
        self._out_dtype = torch.float16 if self.dtype == torch.float16 else torch.float32
        self._flip = aug.flip != "none"
        self._cutout = aug.cutout
        self._jitter = {"bright": bool(aug.brightness), "contrast": bool(aug.contrast)}
        self.feeder = BatchFeeder(self._store)
        self.feed_path = (f"images: {self.device} memory -> GPU external_source (no_copy, "
                          f"whole batches, no host copy); arguments: host arrays"
                          if self._gpu else
                          "images: host memory -> CPU external_source (no_copy, whole "
                          "batches); arguments: host arrays")
        self.reset_timings()

        # Executors: on a GPU the pipelined asynchronous one (CPU stage of batch i+1 overlaps
        # the GPU stage of batch i). With CPU operators only there is one stage to pipeline;
        # the plain asynchronous executor measured faster on a 2-core CPU (~45k vs ~25k
        # img/s, batch 512). Both are DALI's classic executors, whose outputs the PyTorch
        # plugin copies exactly as `_copy_out` does.
        self._pipe = Pipeline(batch_size=self.batch_size, num_threads=max(1, options.workers),
                              device_id=device_id, prefetch_queue_depth=PREFETCH,
                              exec_pipelined=self._gpu, exec_async=True, exec_dynamic=False)
        with self._pipe:
            self._pipe.set_outputs(define_graph(
                fn, types, device="gpu" if self._gpu else "cpu", hw=(h, w), pad=self._pad,
                flip=self._flip, cutout=bool(self._cutout), mean=self.mean, std=self.std,
                fp16=self._out_dtype == torch.float16, **self._jitter))
        self._pipe.build()
        self._keep: deque = deque()   # per scheduled run: what DALI may still read
        self._pass = None             # token of the pass currently allowed to take outputs
        if self._pipe.exec_pipelined:
            self._prime()

    def reset_timings(self) -> None:
        self.timings = dict.fromkeys(PHASES, 0.0) | {"batches": 0}

    # ---------------------------------------------------------------- feeding

    def _start_epoch(self, plan: EpochPlan) -> Tensor:
        """Hand the epoch's indices (to the device, one copy) and arguments to the feeder;
        returns the indices on the device."""
        args = epoch_arguments(plan, pad=self._pad, cutout=self._cutout,
                               hw=self.image_shape[:2])
        idx = plan.indices
        if self._gpu:
            idx = idx.pin_memory().to(self.device, non_blocking=True)
            self.feeder.stream = torch.cuda.current_stream(self.device)
        self.feeder.start(idx, args)
        return idx

    def _schedule(self, start: int, stop: int) -> None:
        t0 = time.perf_counter()
        self._keep.append(self.feeder.feed(self._pipe, start, stop))
        t1 = time.perf_counter()
        self._pipe.schedule_run()
        t2 = time.perf_counter()
        self.timings["feed"] += t1 - t0
        self.timings["schedule"] += t2 - t1

    def _take(self, n: int) -> Tensor:
        """Wait for the oldest scheduled run, copy its n images out, release DALI's buffers
        and what was kept alive for the run."""
        t0 = time.perf_counter()
        (out,) = self._pipe.share_outputs()
        t1 = time.perf_counter()
        try:
            return self._copy_out(out, n)
        finally:
            self._pipe.release_outputs()
            self._keep.popleft()
            self.timings["wait"] += t1 - t0
            self.timings["copy"] += time.perf_counter() - t1
            self.timings["batches"] += 1

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
        for name, on in self._jitter.items():
            if on:
                setattr(dummy, name, torch.ones(b))
        self._start_epoch(dummy)
        keep = [self.feeder.feed(self._pipe, 0, b) for _ in range(PREFETCH)]
        self._pipe.schedule_run()
        for _ in range(PREFETCH):
            self._pipe.share_outputs()
            self._pipe.release_outputs()
        self._settle()
        del keep

    def _drain(self) -> None:
        drained = bool(self._keep)
        while self._keep:
            self._pipe.share_outputs()
            self._pipe.release_outputs()
            self._keep.popleft()
        if drained:
            self._settle()

    def _settle(self) -> None:
        # Outputs dropped without the copy that orders the consumer's stream after DALI's
        # kernels: wait for the device, so that freed inputs (no_copy) cannot be reused by
        # torch while DALI may still read them. Only at priming and after an abandoned pass.
        if self._gpu:
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- protocol

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        self._drain()                     # a previous pass abandoned half way
        token = self._pass = object()
        plan = self.plan(epoch)
        labels = self._labels[self._start_epoch(plan)]    # one gather per epoch
        n, b = len(plan.indices), self.batch_size
        starts = range(0, n, b)
        queued = 0
        while queued < min(PREFETCH, len(starts)):
            self._schedule(starts[queued], starts[queued] + b)
            queued += 1
        for start in starts:
            if self._pass is not token:
                raise RuntimeError("this DALI loader started a new pass; an iterator over an "
                                   "earlier pass cannot continue")
            m = min(b, n - start)
            x = self._take(m)
            if queued < len(starts):
                self._schedule(starts[queued], starts[queued] + b)
                queued += 1
            yield x, labels[start:start + m]
        self._pass = None
        self.epoch = epoch + 1

    def _sample_u8(self, indices: Tensor) -> Tensor:
        h, w, _ = self.image_shape
        p = self._pad
        return self._store[indices.to(self.device)][:, p:p + h, p:p + w].contiguous()
