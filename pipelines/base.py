"""The Loader protocol every pipeline implements, and what they share.

A loader yields `(images, labels)` on the training device: images already normalised, in
the requested dtype, NCHW-shaped but channels-last in memory; labels int64. `len(loader)`
is the number of batches per epoch for this rank; `set_epoch(e)` fixes the epoch's shuffle
and augmentation draws so that a resumed run sees the same batches; training loaders shard
by `(rank, world_size)` (each rank a disjoint 1/world_size of every epoch) and drop the last
partial batch; evaluation loaders make a full pass over their shard in order.
"""
from __future__ import annotations

import dataclasses
import math
import operator
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
    brightness, contrast: colour jitter on the normalised image (hiverge's
    cifar10-speedrun): x -> (x + b) * c per image, with b uniform in [-brightness,
    brightness] and c uniform in [1 - contrast, 1 + contrast]; applied after the crop and
    flip, before cutout (so cutout's square stays zero); 0 turns each off.
    """

    crop: str = "pad_crop"
    pad: int = 4
    pad_mode: str = "reflect"
    flip: str = "random"
    cutout: int = 0
    brightness: float = 0.0
    contrast: float = 0.0

    @staticmethod
    def none() -> "Augment":
        return Augment(crop="none", pad=0, flip="none", cutout=0)


@runtime_checkable
class Loader(Protocol):
    """What the trainer relies on (fastres.pipelines.build_loader returns one).

    batch_size: images per batch on this rank. num_examples: images this rank yields per
    epoch (after drop_last for training). set_epoch(e) fixes the next pass to epoch e; a
    full pass without it advances the epoch by one. sample(n): the first n images of this
    rank's data, normalised and unaugmented, in the loader's dtype and layout.
    """

    batch_size: int
    num_examples: int

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def sample(self, n: int) -> Tensor: ...


# What train() uses of each loader (fastres.engine.trainer): the training loader is iterated
# every epoch, sized with len(), re-seeded with set_epoch(), sampled for data-dependent
# initialisation and warm-up shapes, and its batch_size and num_examples set the step
# arithmetic; the test loader is iterated by evaluate() and its batch_size (and
# num_examples, when present) give the warm-up's evaluation shapes.
LOADER_MEMBERS = {
    "train": ("__iter__", "__len__", "batch_size", "num_examples", "set_epoch", "sample"),
    "test": ("__iter__", "batch_size"),
}
_METHODS = {"__iter__", "__len__", "set_epoch", "sample"}


def check_loader(obj, role: str = "train") -> None:
    """ConfigError unless `obj` implements what train() needs of its `role` loader
    ("train" or "test"); the message names every missing member.

    The training loader needs the whole Loader protocol; the test loader needs to be
    iterable over (images, labels) batches and to have `batch_size`. A torch DataLoader
    lacks `num_examples`, `set_epoch` and `sample`: build one with
    fastres.pipelines.build_loader, or give it those members.
    """
    from fastres.errors import ConfigError

    if role not in LOADER_MEMBERS:
        raise ValueError(f"role must be one of {sorted(LOADER_MEMBERS)}, got {role!r}")
    what = f"the {role} loader ({type(obj).__name__})"
    if isinstance(obj, type):
        raise ConfigError(f"{what} is a class, not a loader object; build one first "
                          f"(fastres.pipelines.build_loader)")
    missing = [m for m in LOADER_MEMBERS[role]
               if not hasattr(obj, m) or (m in _METHODS and not callable(getattr(obj, m)))]
    if missing:
        raise ConfigError(
            f"{what} lacks {', '.join(missing)} of the Loader protocol "
            f"(fastres.pipelines.Loader); use fastres.pipelines.build_loader, or add "
            f"{'them' if len(missing) > 1 else 'it'} to your loader")
    try:
        batch = operator.index(obj.batch_size)
    except TypeError:
        batch = 0
    if batch < 1:
        raise ConfigError(f"{what} has batch_size={obj.batch_size!r}; it must be a positive "
                          f"whole number of images per batch on this rank")


# Per-channel statistics of the data sets fastres knows, in [0, 1] units (the values most
# CIFAR recipes use; fastres.data.channel_mean_std recomputes them exactly from the data).
def dataset_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of a named data set: "cifar10" or "cifar100"."""
    from fastres.config import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
    from fastres.errors import unknown_choice

    stats = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "cifar100": (CIFAR100_MEAN, CIFAR100_STD)}
    key = str(dataset).lower().replace("-", "").replace("_", "")
    if key not in stats:
        raise unknown_choice("data set for mean/std", dataset, stats)
    return stats[key]


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """Everything a loader needs besides the data; every loader takes one.

        opts = LoaderOptions.for_dataset("cifar10", batch_size=512, train=True,
                                         device="cuda", dtype=torch.bfloat16)
        test_opts = opts.replace(train=False, batch_size=1000)

    batch_size: images per batch on this rank. train: shuffle, augment, drop the last
    partial batch and shard each epoch's permutation by (rank, world_size); otherwise one
    in-order pass over this rank's strided shard, unaugmented, last batch partial.
    Images come out normalised with mean/std (per channel, [0, 1] units), in `dtype`
    (float32, bfloat16 or float16), NCHW-shaped with channels-last strides, on `device`.
    mean/std None: a training loader computes the exact statistics of the images it is
    given; an evaluation loader refuses, since it must use the training set's (take them
    from `for_dataset`, or from the training loader's `.mean`/`.std`). Shuffle and
    augmentation draws depend only on (seed, epoch, rank). workers: DataLoader worker
    processes (torch loader) or DALI CPU threads (dali); the tensor loader ignores it.
    """

    batch_size: int
    train: bool
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    augment: Augment = Augment()
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    workers: int = 4

    def __post_init__(self):
        from fastres.errors import ConfigError

        def whole(name, low):
            v = getattr(self, name)
            try:
                v = operator.index(v)                     # ints and numpy integers, not 2.0
            except TypeError:
                v = None
            if v is None or v < low or isinstance(getattr(self, name), bool):
                raise ConfigError(f"loader {name} must be a whole number >= {low}, got "
                                  f"{getattr(self, name)!r}")
            object.__setattr__(self, name, v)

        whole("batch_size", 1)
        whole("world_size", 1)
        whole("rank", 0)
        whole("workers", 0)
        whole("seed", 0)
        if not isinstance(self.train, bool):
            raise ConfigError(f"loader train must be True or False, got {self.train!r}")
        if self.rank >= self.world_size:
            raise ConfigError(f"rank {self.rank} must lie in [0, world_size={self.world_size})")
        try:
            object.__setattr__(self, "device", torch.device(self.device))
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"loader device {self.device!r} is not a device ({e})") from None
        if self.dtype not in DTYPES:
            raise ConfigError(f"loader dtype must be one of float32, bfloat16, float16; "
                              f"got {self.dtype}")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("give both mean and std, or neither (None: the training "
                              "images' own statistics)")
        if self.mean is not None:
            try:
                mean = tuple(float(v) for v in self.mean)
                std = tuple(float(v) for v in self.std)
            except (TypeError, ValueError):
                raise ConfigError(f"mean and std must be sequences of numbers, got "
                                  f"mean={self.mean!r} std={self.std!r}") from None
            if len(mean) != len(std) or not mean:
                raise ConfigError(f"mean and std need one value per channel each, got "
                                  f"mean={self.mean!r} std={self.std!r}")
            if any(not v > 0 for v in std):
                raise ConfigError(f"std must be positive, got {std}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        if not isinstance(self.augment, Augment):
            raise ConfigError(f"augment must be a fastres.pipelines.Augment, got "
                              f"{type(self.augment).__name__}")
        check_augment(self.augment)

    @classmethod
    def for_dataset(cls, dataset: str, **fields) -> "LoaderOptions":
        """Options normalising with a named data set's statistics ("cifar10", "cifar100";
        a CifarData's `.name` works); other fields as the constructor."""
        mean, std = dataset_stats(getattr(dataset, "name", dataset))
        return cls.make(**{"mean": mean, "std": std, **fields})

    @classmethod
    def make(cls, **fields) -> "LoaderOptions":
        """LoaderOptions(**fields), with a ConfigError naming an unknown or missing field."""
        from fastres.errors import ConfigError, unknown_choice

        names = [f.name for f in dataclasses.fields(cls)]
        for k in fields:
            if k not in names:
                raise unknown_choice("loader option", k, names)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in fields and f.default is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"loader options need {' and '.join(missing)}")
        return cls(**fields)

    def replace(self, **changes) -> "LoaderOptions":
        """A copy with `changes` applied (and checked)."""
        return self.make(**{**{f.name: getattr(self, f.name)
                               for f in dataclasses.fields(self)}, **changes})


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

    mean and std are per channel in [0, 1] units. The same arithmetic as every loader's
    batches (`augment.normalize_nhwc`: uint8 * 1/(255 std) - mean/std in float32, rounded
    once to `dtype`), so values agree bit for bit.
    """
    from .augment import norm_constants, normalize_nhwc

    scale, shift = norm_constants(mean, std, tuple(images_u8.shape[1:3]), images_u8.device)
    x = normalize_nhwc(images_u8, scale, shift, dtype)   # N, H, W, C
    return x.permute(0, 3, 1, 2)                         # N, C, H, W view, channels-last


def eval_shard_indices(n: int, rank: int, world_size: int) -> Tensor:
    """This rank's evaluation shard: every world_size-th example from `rank`, in order.

    Unlike `shard_indices` nothing is dropped: shards may differ in size by one, and their
    union is every example exactly once (the trainer all-reduces the correct counts).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return torch.arange(rank, n, world_size)


_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit generator seed that depends on every part (seed, epoch, rank, stream ...).

    splitmix64 over the parts, so neighbouring tuples such as (seed, epoch) and
    (seed, epoch + 1) give unrelated streams; `seed + epoch` would make run 0 epoch 1 and
    run 1 epoch 0 identical.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


# Independent random streams drawn from one user seed (see `mix_seed`).
STREAM_PERMUTATION = 1   # per (seed, epoch): the epoch's visiting order, shared by all ranks
STREAM_AUGMENT = 2       # per (seed, epoch, rank): crop offsets, random flips, cutout centres,
                         # colour jitter
STREAM_FLIP_BASE = 3     # per seed: which images the "alternate" flip flips in even epochs
STREAM_BATCH = 4         # per (seed, epoch, rank, batch): the torch loader's transform RNG


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The epoch's visiting order (a CPU int64 permutation of 0..n-1), equal on every rank.

    Drawn on the host with a CPU generator so that it is the same for every loader and
    every device type: a run resumed on another machine, or with another loader, sees the
    same batches. It costs about a millisecond per 50,000 examples, once per epoch.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, STREAM_PERMUTATION))
    return torch.randperm(n, generator=g)


# --------------------------------------------------------------------------- augmentation

CROPS = ("pad_crop", "translate", "none")
PAD_MODES = ("reflect", "zeros")
FLIPS = ("random", "alternate", "none")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_augment(aug: Augment, hw: tuple[int, int] | None = None) -> None:
    """ConfigError for an Augment no loader can apply (to (H, W) images, when given)."""
    from fastres.errors import ConfigError, unknown_choice

    if aug.crop not in CROPS:
        raise unknown_choice("crop", aug.crop, CROPS)
    if aug.pad_mode not in PAD_MODES:
        raise unknown_choice("pad_mode", aug.pad_mode, PAD_MODES)
    if aug.flip not in FLIPS:
        raise unknown_choice("flip", aug.flip, FLIPS)
    if not isinstance(aug.pad, int) or aug.pad < 0:
        raise ConfigError(f"pad must be a whole number of pixels >= 0, got {aug.pad!r}")
    if not isinstance(aug.cutout, int) or aug.cutout < 0:
        raise ConfigError(f"cutout must be a whole number of pixels >= 0, got {aug.cutout!r}")
    for name, high in (("brightness", math.inf), ("contrast", 1.0)):
        v = getattr(aug, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < high:
            raise ConfigError(f"{name} must be a number in [0, {high}), got {v!r}")
    if hw is not None and aug.crop != "none" and aug.pad_mode == "reflect" and aug.pad >= min(hw):
        raise ConfigError(f"reflect padding of {aug.pad} needs images larger than the pad, "
                          f"got {hw[0]}x{hw[1]}; lower pad or use pad_mode=zeros")


def crop_pad(aug: Augment) -> int:
    """Padding the crop uses (0 when cropping is off). pad_crop and translate are one draw:
    an offset uniform in [0, 2*pad] into the padded image, i.e. a shift in [-pad, pad]."""
    return aug.pad if aug.crop != "none" else 0


def flip_base(n: int, seed: int) -> Tensor:
    """(n,) bool: the images the "alternate" flip flips in even epochs (odd epochs flip the
    others). A function of the seed and the image index only, so every rank and every
    loader agrees and each image is flipped in exactly every other epoch."""
    g = torch.Generator().manual_seed(mix_seed(seed, STREAM_FLIP_BASE))
    return torch.randint(0, 2, (n,), generator=g).bool()


@dataclass
class EpochPlan:
    """One rank's epoch, decided up front on the host: which images, in which order, and
    each one's augmentation. Fields an Augment does not use are None; all are int64 but
    the colour jitter's (float32).

    indices: data-set indices in visiting order. flip: 1 where the image is mirrored.
    dy, dx: crop offsets in [0, 2*pad] into the padded image, *after* the flip: an image
    is crop(hflip?(pad(x)), dy, dx). (With flip-after-crop the offset would be 2*pad - dx;
    the distribution is the same, and this order lets the tensor loader crop a stored
    flipped copy with no per-batch arithmetic.) cut_y, cut_x: cutout centres.
    bright, contrast: colour jitter, the shift b and the factor c of (x + b) * c.
    Every loader consumes the same plan, so for the same (seed, epoch, rank) the tensor and
    DALI loaders produce the same batches.
    """

    indices: Tensor
    dy: Tensor | None = None
    dx: Tensor | None = None
    flip: Tensor | None = None
    cut_y: Tensor | None = None
    cut_x: Tensor | None = None
    bright: Tensor | None = None
    contrast: Tensor | None = None

    FIELDS = ("indices", "dy", "dx", "flip", "cut_y", "cut_x", "bright", "contrast")

    def fields(self) -> dict:
        return {k: getattr(self, k) for k in self.FIELDS}

    def to(self, device: torch.device) -> "EpochPlan":
        """Copy to `device` once per epoch: the fields of each dtype are stacked into one
        (k, n) tensor so that a GPU gets one pinned, non-blocking copy per dtype (~2 MB of
        int64 for 50,000 images) instead of one per field."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        moved = {}
        present = {k: v for k, v in self.fields().items() if v is not None}
        for dtype in dict.fromkeys(v.dtype for v in present.values()):
            names = [k for k, v in present.items() if v.dtype == dtype]
            packed = torch.stack([present[k] for k in names])
            if device.type == "cuda":
                packed = packed.pin_memory()
            moved.update(zip(names, packed.to(device, non_blocking=True).unbind(0)))
        return EpochPlan(**moved)

    def slice(self, start: int, stop: int) -> "EpochPlan":
        """Images start..stop-1 of the plan (views)."""
        sl = slice(start, min(stop, len(self.indices)))
        return EpochPlan(**{k: None if v is None else v[sl] for k, v in self.fields().items()})

    def batches(self, batch_size: int) -> Iterator["EpochPlan"]:
        """Per-batch views, in order; the last one may be short (eval)."""
        for start in range(0, len(self.indices), batch_size):
            yield self.slice(start, start + batch_size)


def plan_epoch(n: int, aug: Augment, *, train: bool, batch_size: int, rank: int,
               world_size: int, seed: int, epoch: int, hw: tuple[int, int],
               flips: Tensor | None = None, random_draws: bool = True) -> EpochPlan:
    """This rank's plan for one epoch (all CPU tensors).

    Train: the epoch's permutation (seed, epoch), this rank's slice of it (shard_indices),
    cut to whole batches (drop_last); augmentation draws from a generator seeded by
    (seed, epoch, rank). Eval: this rank's strided shard in order, no augmentation.
    flips: `flip_base(n, seed)` when aug.flip == "alternate". random_draws=False skips
    the crop, random-flip, cutout and jitter draws (the torch loader's transforms draw their
    own).
    """
    if not train:
        return EpochPlan(indices=eval_shard_indices(n, rank, world_size))
    idx = shard_indices(n, rank, world_size, epoch_permutation(n, seed, epoch))
    idx = idx[: len(idx) // batch_size * batch_size]
    plan = EpochPlan(indices=idx)
    m = len(idx)
    if aug.flip == "alternate":
        if flips is None:
            flips = flip_base(n, seed)
        plan.flip = (flips[idx] ^ bool(epoch % 2)).long()
    if not random_draws:
        return plan
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, rank, STREAM_AUGMENT))
    pad = crop_pad(aug)
    if pad:
        plan.dy = torch.randint(0, 2 * pad + 1, (m,), generator=g)
        plan.dx = torch.randint(0, 2 * pad + 1, (m,), generator=g)
    if aug.flip == "random":
        plan.flip = torch.randint(0, 2, (m,), generator=g)
    if aug.cutout:
        plan.cut_y = torch.randint(0, hw[0], (m,), generator=g)
        plan.cut_x = torch.randint(0, hw[1], (m,), generator=g)
    if aug.brightness:
        plan.bright = (torch.rand(m, generator=g) * 2 - 1) * aug.brightness
    if aug.contrast:
        plan.contrast = 1 + (torch.rand(m, generator=g) * 2 - 1) * aug.contrast
    return plan


# --------------------------------------------------------------------------- loaders

def check_data(images, labels) -> tuple[int, int, int, int]:
    """DataError unless images are (N, H, W, C) uint8 (NHWC) and labels (N,) integers;
    returns (N, H, W, C). Accepts numpy arrays and torch tensors."""
    from fastres.errors import DataError

    shape = tuple(images.shape)
    dtype = str(getattr(images, "dtype", ""))
    if len(shape) != 4 or dtype not in ("uint8", "torch.uint8"):
        raise DataError(f"loaders take images as an (N, H, W, C) uint8 array (NHWC, like "
                        f"CifarData.train.images), got shape {shape} dtype {dtype}")
    if shape[-1] not in (1, 3, 4):
        raise DataError(f"images of shape {shape} have {shape[-1]} channels in the last "
                        f"dimension; loaders take NHWC (N, H, W, C) uint8 arrays, not NCHW")
    lshape = tuple(labels.shape)
    ldtype = str(getattr(labels, "dtype", ""))
    if lshape != (shape[0],) or "int" not in ldtype:
        raise DataError(f"expected ({shape[0]},) integer labels for {shape[0]} images, got "
                        f"shape {lshape} dtype {ldtype}")
    return shape


def _image_stats(images) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel (mean, std) of uint8 NHWC images, numpy or torch (any device)."""
    import numpy as np

    from fastres.data import channel_mean_std

    if isinstance(images, Tensor):
        images = images.cpu().numpy()
    return channel_mean_std(np.asarray(images))


class EpochLoader:
    """What every loader shares: argument checks, sharding, epoch bookkeeping, plans and
    `sample()`. Subclasses implement `__iter__` and `_sample_u8(indices)`.

    Epochs: `set_epoch(e)` makes the next pass epoch e. A pass that runs to the end moves
    the loader to the next epoch by itself, so a loop that never calls set_epoch still sees
    a new shuffle each pass; a pass abandoned half way (break) does not advance. The pass
    reads the epoch when it starts, so set_epoch during a pass changes only later passes.

    `options` holds what was asked for, with mean/std filled in and, for an evaluation
    loader, the augmentation off; the same values are attributes (`batch_size`, `device`,
    `dtype`, `mean`, `std`, `augment`, `rank`, `world_size`, `seed`, `train`).
    """

    def __init__(self, images, labels, options: LoaderOptions):
        from fastres.errors import ConfigError

        if not isinstance(options, LoaderOptions):
            raise ConfigError(f"{type(self).__name__} takes a fastres.pipelines.LoaderOptions, "
                              f"got {type(options).__name__}")
        n, h, w, c = check_data(images, labels)
        mean, std = options.mean, options.std
        if mean is None:
            if not options.train:
                raise ConfigError("an evaluation loader needs mean and std: normalise with the "
                                  "training set's statistics (LoaderOptions.for_dataset(...), or "
                                  "the training loader's .mean and .std)")
            mean, std = _image_stats(images)
        if len(mean) != c:
            raise ConfigError(f"mean and std need one value per channel ({c}), got "
                              f"mean={mean!r} std={std!r}")
        augment = options.augment if options.train else Augment.none()
        check_augment(augment, (h, w))
        self.options = options = options.replace(mean=mean, std=std, augment=augment)
        self.train = options.train
        self.augment = options.augment
        self.batch_size = options.batch_size
        self.device = options.device
        self.dtype = options.dtype
        self.mean, self.std = options.mean, options.std
        self.rank, self.world_size, self.seed = options.rank, options.world_size, options.seed
        self.num_images = n
        self.image_shape = (h, w, c)
        self.epoch = 0
        self._flips = flip_base(n, self.seed) if self.augment.flip == "alternate" else None
        # This rank's examples in data-set order: its share of every epoch has this size.
        rank, world_size, batch_size = self.rank, self.world_size, self.batch_size
        self._shard = (shard_indices(n, rank, world_size) if self.train
                       else eval_shard_indices(n, rank, world_size))
        per_rank = len(self._shard)
        if self.train:
            self._num_batches = per_rank // batch_size
            self.num_examples = self._num_batches * batch_size
        else:
            self._num_batches = -(-per_rank // batch_size)
            self.num_examples = per_rank

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def plan(self, epoch: int, random_draws: bool = True) -> EpochPlan:
        return plan_epoch(self.num_images, self.augment, train=self.train,
                          batch_size=self.batch_size, rank=self.rank,
                          world_size=self.world_size, seed=self.seed, epoch=epoch,
                          hw=self.image_shape[:2], flips=self._flips, random_draws=random_draws)

    def sample(self, n: int) -> Tensor:
        """The first n images of this rank's data (data-set order, at most the shard),
        normalised, unaugmented, in the loader's dtype, channels-last, on its device."""
        if n < 1:
            raise ValueError(f"sample needs n >= 1, got {n}")
        u8 = self._sample_u8(self._shard[:n])
        return normalize(u8.to(self.device), self.mean, self.std, self.dtype)

    def _sample_u8(self, indices: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(train={self.train}, batch_size={self.batch_size}, "
                f"batches={len(self)}, examples={self.num_examples}, device={self.device}, "
                f"dtype={self.dtype}, rank={self.rank}/{self.world_size}, "
                f"augment={self.augment})")


def endless(loader):
    """Batches forever, epoch after epoch, with `set_epoch` on each as the trainer calls it
    (benchmarks and profilers that want more batches than an epoch holds)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
