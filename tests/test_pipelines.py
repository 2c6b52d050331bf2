"""Semantics parity of the three loaders (tensor, DALI on its CPU operators, torch).

The test images encode where each pixel came from: channel 0 holds the source row (+1)
and bits 8-9 of the image index, channel 1 the source column (+1), channel 2 the low 8
bits of the index; labels are index % 10. Un-normalising a batch therefore recovers, per
image, which example it is, the crop offset, whether it was flipped, and every pixel's
origin, so the tests check the augmentation itself rather than summary statistics. Zero
padding shows up as (0, 0, 0) pixels, which the code never produces otherwise.

Draws are seeded, so every statistical bound below is checked against one fixed sample:
the bounds are 5 standard deviations wide and cannot flake.
"""
import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch

from fastres.errors import ConfigError, DataError
from fastres.pipelines import (Augment, Loader, LoaderOptions, available_loaders,
                               build_loader, check_loader, normalize)
from fastres.pipelines.base import flip_base, mix_seed, plan_epoch
from fastres.pipelines.dali import DALI_MISSING, dali_available

HAS_DALI = dali_available()
LOADERS = [
    "tensor",
    pytest.param("dali", marks=pytest.mark.skipif(
        not HAS_DALI, reason="nvidia.dali is not importable (pip install 'fastres[dali]')")),
    "torch",
]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
H = W = 32


def coded_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32, 32, 3) uint8 images whose pixels encode (index, row, column); n <= 1024."""
    assert n <= 1024
    i = np.arange(n)[:, None, None]
    r = np.arange(H)[None, :, None]
    c = np.arange(W)[None, None, :]
    ch0 = (r + 1) | (((i >> 8) & 3) << 6)
    ch1 = c + 1
    ch2 = i & 255
    images = np.stack(np.broadcast_arrays(ch0, ch1, ch2), -1).astype(np.uint8)
    return np.ascontiguousarray(images), np.arange(n, dtype=np.int64) % 10


def make(name, images, labels, **kw):
    kw.setdefault("train", True)
    kw.setdefault("batch_size", 64)
    kw.setdefault("device", "cpu")
    kw.setdefault("mean", MEAN)
    kw.setdefault("std", STD)
    kw.setdefault("workers", 0 if name == "torch" else 1)
    return build_loader(name, images, labels, LoaderOptions(**kw))


def unnormalize(x: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """(B, C, H, W) normalised -> (B, H, W, C) uint8 (exact for float32 batches)."""
    m = torch.tensor(mean, dtype=torch.float64) * 255
    s = torch.tensor(std, dtype=torch.float64) * 255
    u = x.double().permute(0, 2, 3, 1) * s + m
    return u.round().clamp(0, 255).to(torch.uint8).numpy()


def decode(u: np.ndarray, pad: int):
    """Per image: data-set index, crop offsets (dy, dx) in [0, 2 pad], flipped?"""
    u = u.astype(np.int64)
    centre = u[:, H // 2, W // 2]
    index = ((centre[:, 0] >> 6) << 8) | centre[:, 2]
    src_row = (u[:, H // 2, W // 2, 0] & 63) - 1
    cols = u[:, H // 2, :, 1] - 1
    flipped = cols[:, W // 2 + 1] < cols[:, W // 2 - 1]
    dy = src_row - H // 2 + pad
    dx = np.where(flipped, cols[:, W // 2] - (W // 2 - 1), cols[:, W // 2] - W // 2) + pad
    return index, dy, dx, flipped


def expected_view(image: np.ndarray, pad: int, mode: str, dy: int, dx: int, flipped: bool):
    p = np.pad(image, ((pad, pad), (pad, pad), (0, 0)),
               mode="reflect" if mode == "reflect" else "constant")
    v = p[dy:dy + H, dx:dx + W]
    return v[:, ::-1] if flipped else v


def run_epochs(loader, epochs):
    """{epoch: (indices, dy, dx, flipped, labels)} over whole passes, checking every image
    pixel for pixel against its recovered crop/flip of the padded original."""
    out = {}
    for e in epochs:
        loader.set_epoch(e)
        parts = [[] for _ in range(5)]
        for x, y in loader:
            u = unnormalize(x)
            pad = loader.augment.pad if loader.augment.crop != "none" else 0
            idx, dy, dx, fl = decode(u, pad)
            for k in range(len(u)):
                want = expected_view(IMAGES[idx[k]], pad, loader.augment.pad_mode,
                                     dy[k], dx[k], fl[k])
                np.testing.assert_array_equal(u[k], want, err_msg=f"image {idx[k]} epoch {e}")
            for part, v in zip(parts, (idx, dy, dx, fl, y.numpy())):
                part.append(v)
        out[e] = tuple(np.concatenate(p) for p in parts)
    return out


IMAGES, LABELS = coded_images(1024)


def within(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# --------------------------------------------------------------------------- augmentation

@pytest.mark.parametrize("name", LOADERS)
def test_crop_offsets_uniform_flips_half_labels_aligned(name):
    images, labels = IMAGES[:512], LABELS[:512]
    ld = make(name, images, labels, batch_size=128, augment=Augment(pad=4, flip="random"))
    runs = run_epochs(ld, [0, 1])
    idx, dy, dx, fl, y = (np.concatenate(v) for v in zip(*runs.values()))
    n = len(idx)
    assert n == 1024
    np.testing.assert_array_equal(y, idx % 10)                      # labels follow images
    for d in (dy, dx):
        assert d.min() >= 0 and d.max() <= 8
        counts = np.bincount(d, minlength=9)
        assert all(within(c, n, 1 / 9) for c in counts), counts
    assert len(set(zip(dy.tolist(), dx.tolist()))) == 81            # every offset pair occurs
    assert within(fl.sum(), n, 0.5), fl.sum()


@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_padding_content(name, mode):
    # run_epochs compares every pixel with numpy's reflect / zero padding of the original.
    ld = make(name, IMAGES[:256], LABELS[:256], augment=Augment(pad=4, pad_mode=mode))
    idx, dy, dx, fl, _ = run_epochs(ld, [0])[0]
    corner = (dy == 0) | (dx == 0) | (dy == 8) | (dx == 8)
    assert corner.any()                                          # padding was exercised
    x, _ = next(iter(ld))
    has_black = (unnormalize(x) == 0).all(-1).any()
    assert has_black == (mode == "zeros")


@pytest.mark.parametrize("name", LOADERS)
def test_translate_is_pad_crop(name):
    # "translate" shifts in [-pad, pad]: the same draw as pad_crop's offset in [0, 2 pad].
    ld = make(name, IMAGES[:256], LABELS[:256], augment=Augment(crop="translate", pad=2))
    _, dy, dx, _, _ = run_epochs(ld, [0])[0]
    assert set(dy.tolist()) == set(range(5)) and set(dx.tolist()) == set(range(5))


def test_translate_and_pad_crop_same_batches():
    a = make("tensor", IMAGES[:128], LABELS[:128], augment=Augment(crop="translate", pad=2))
    b = make("tensor", IMAGES[:128], LABELS[:128], augment=Augment(crop="pad_crop", pad=2))
    for (xa, _), (xb, _) in zip(a, b):
        assert torch.equal(xa, xb)


@pytest.mark.parametrize("name", LOADERS)
def test_alternate_flip_alternates_per_image(name):
    n, epochs = 256, range(4)
    flips = {e: np.zeros(n, int) - 1 for e in epochs}
    for rank in range(2):                       # images move between ranks across epochs
        ld = make(name, IMAGES[:n], LABELS[:n], augment=Augment(crop="none", flip="alternate"),
                  rank=rank, world_size=2)
        for e, (idx, _, _, fl, _) in run_epochs(ld, epochs).items():
            assert (flips[e][idx] == -1).all()
            flips[e][idx] = fl
    assert all((f >= 0).all() for f in flips.values())         # every image, every epoch
    for e in epochs:
        np.testing.assert_array_equal(flips[e], flips[0] ^ (e % 2))
    assert within(flips[0].sum(), n, 0.5)


@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize("size", [8, 5])
def test_cutout_square_zero_after_normalisation(name, size):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)   # no uint8 value normalises to 0
    n = 512
    ld = make(name, IMAGES[:n], LABELS[:n], batch_size=128, mean=mean, std=std,
              augment=Augment(crop="none", flip="none", cutout=size))
    centres = []
    for x, y in ld:
        zero = (x == 0).all(1).numpy()                              # B, H, W
        assert ((x == 0).any(1).numpy() == zero).all()              # all channels together
        u = unnormalize(x, mean, std)
        for k in range(len(x)):
            rows, cols = zero[k].any(1), zero[k].any(0)
            assert (np.outer(rows, cols) == zero[k]).all()          # one rectangle
            r0, r1 = rows.argmax(), H - rows[::-1].argmax()
            c0, c1 = cols.argmax(), W - cols[::-1].argmax()
            assert r1 - r0 <= size and c1 - c0 <= size
            if 0 < r0 and r1 < H:
                assert r1 - r0 == size
            if 0 < c0 and c1 < W:
                assert c1 - c0 == size
            cy = r0 + size // 2 if r0 > 0 else r1 - size + size // 2
            cx = c0 + size // 2 if c0 > 0 else c1 - size + size // 2
            centres.append((cy, cx))
            # Everything else is the untouched image.
            py, px = (0, 0) if not zero[k, 0, 0] else (H - 1, W - 1)
            i = ((int(u[k, py, px, 0]) >> 6) << 8) | int(u[k, py, px, 2])
            assert y[k] == i % 10
            keep = ~zero[k]
            np.testing.assert_array_equal(u[k][keep], IMAGES[i][keep])
    cy, cx = np.array(centres).T
    assert cy.min() == 0 and cy.max() == H - 1 and cx.min() == 0 and cx.max() == W - 1
    for c in (cy, cx):
        assert all(within(k, len(c), 1 / H) for k in np.bincount(c, minlength=H))


@pytest.mark.parametrize("name", LOADERS)
def test_normalisation_uses_mean_std(name):
    mean, std = (0.3, 0.5, 0.7), (0.2, 0.25, 0.3)
    ld = make(name, IMAGES[:100], LABELS[:100], train=False, mean=mean, std=std)
    x = torch.cat([b for b, _ in ld])
    ref = (torch.from_numpy(IMAGES[:100]).double() / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(x.double(), ref.permute(0, 3, 1, 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", LOADERS)
def test_colour_jitter_is_one_shift_and_scale_per_image(name):
    # Every image is the same flat colour, so crops and flips leave it unchanged and each
    # augmented image must be (n + b) * c with n the normalised colour: three channels
    # give b and c per image (least squares) and a residual that must vanish.
    B, C = 0.3, 0.2
    colour = np.array([40, 128, 220], dtype=np.uint8)
    images = np.broadcast_to(colour, (512, H, W, 3)).copy()
    ld = make(name, images, LABELS[:512], batch_size=128, seed=3,
              augment=Augment(pad=2, flip="random", brightness=B, contrast=C))
    n = (torch.tensor(colour, dtype=torch.float64) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    x = torch.cat([xb for xb, _ in ld]).double()                  # N, 3, H, W
    assert (x == x[:, :, :1, :1]).all()                           # one value per channel
    v = x[:, :, 0, 0]                                             # N, 3
    design = torch.stack([torch.ones(3, dtype=torch.float64), n], 1)   # v = c b + c n
    coef = torch.linalg.lstsq(design, v.T).solution               # 2, N: (c b, c)
    c = coef[1]
    b = coef[0] / c
    torch.testing.assert_close(design @ coef, v.T, atol=1e-5, rtol=0)  # affine per image
    assert b.abs().max() <= B + 1e-5 and (c - 1).abs().max() <= C + 1e-5
    # Uniform draws: mean 0 and variance B^2/3 (and C^2/3), 5-sigma bounds on 512 images.
    for d, r in ((b, B), (c - 1, C)):
        sd = r / math.sqrt(3)
        assert abs(float(d.mean())) <= 5 * sd / math.sqrt(len(d))
        assert abs(float(d.var()) / sd ** 2 - 1) <= 5 * math.sqrt(0.8 / len(d))
    assert len(set(b.round(decimals=6).tolist())) > 500            # per image, not per batch


def test_colour_jitter_keeps_the_other_draws_and_follows_the_plan():
    aug = Augment(pad=2, flip="alternate", cutout=4)
    jit = dataclasses.replace(aug, brightness=0.25, contrast=0.1)
    kw = dict(train=True, batch_size=64, rank=0, world_size=1, seed=5, epoch=2, hw=(H, W))
    plain, jittered = plan_epoch(256, aug, **kw), plan_epoch(256, jit, **kw)
    for k, v in plain.fields().items():                 # jitter draws come after the others
        assert v is None and k in ("bright", "contrast") or torch.equal(v, jittered.fields()[k])
    assert jittered.bright.dtype == torch.float32 and jittered.bright.abs().max() <= 0.25
    assert (jittered.contrast - 1).abs().max() <= 0.1
    # The tensor loader applies exactly the plan's values to the unjittered batch.
    a = make("tensor", IMAGES[:256], LABELS[:256], seed=5, augment=aug)
    b = make("tensor", IMAGES[:256], LABELS[:256], seed=5, augment=jit)
    a.set_epoch(2)
    b.set_epoch(2)
    xa = torch.cat([x for x, _ in a])
    xb = torch.cat([x for x, _ in b])
    want = (xa + jittered.bright.view(-1, 1, 1, 1)) * jittered.contrast.view(-1, 1, 1, 1)
    torch.testing.assert_close(xb, want * (xa != 0), atol=1e-6, rtol=0)  # cutout stays 0
    assert ((xb == 0) == (xa == 0)).all()


def test_plan_moves_to_a_device_with_each_fields_dtype():
    aug = Augment(pad=2, flip="random", cutout=4, brightness=0.1, contrast=0.1)
    plan = plan_epoch(64, aug, train=True, batch_size=16, rank=0, world_size=1, seed=0,
                      epoch=0, hw=(H, W))
    moved = plan.to("meta")
    for k, v in plan.fields().items():
        assert getattr(moved, k).device.type == "meta" and getattr(moved, k).dtype == v.dtype
    assert moved.bright.dtype == torch.float32 and moved.indices.dtype == torch.int64


@pytest.mark.parametrize("brightness,contrast,match", [(-0.1, 0.0, "brightness"),
                                                       (0.0, 1.0, "contrast"),
                                                       (True, 0.0, "brightness")])
def test_colour_jitter_rejects_impossible_ranges(brightness, contrast, match):
    with pytest.raises(ConfigError, match=match):
        make("tensor", IMAGES[:10], LABELS[:10],
             augment=Augment(brightness=brightness, contrast=contrast))


# --------------------------------------------------------------------------- epochs, shards

def _centre_index(u):
    c = u[:, H // 2, W // 2].astype(np.int64)
    return ((c[:, 0] >> 6) << 8) | c[:, 2]


@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize("world_size,n,batch", [(2, 600, 50), (3, 600, 50), (3, 610, 50)])
def test_train_shards_disjoint_complete_drop_last(name, world_size, n, batch):
    per_rank = n // world_size
    seen = []
    for rank in range(world_size):
        ld = make(name, IMAGES[:n], LABELS[:n], batch_size=batch, rank=rank,
                  world_size=world_size, seed=7)
        assert len(ld) == per_rank // batch
        assert ld.num_examples == per_rank // batch * batch
        sizes, idx = [], []
        for x, y in ld:
            sizes.append(len(x))
            i = _centre_index(unnormalize(x))
            np.testing.assert_array_equal(y.numpy(), i % 10)
            idx.append(i)
        assert sizes == [batch] * len(ld)                         # drop_last
        idx = np.concatenate(idx)
        assert len(set(idx.tolist())) == len(idx)                 # each example once
        seen.append(set(idx.tolist()))
    union = set().union(*seen)
    assert sum(map(len, seen)) == len(union)                      # disjoint
    if n % world_size == 0 and per_rank % batch == 0:
        assert union == set(range(n))                             # complete


@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_full_pass_in_order(name, world_size):
    n, batch = 610, 64
    seen = []
    for rank in range(world_size):
        ld = make(name, IMAGES[:n], LABELS[:n], train=False, batch_size=batch, rank=rank,
                  world_size=world_size, augment=Augment(flip="alternate", cutout=8))
        shard = list(range(rank, n, world_size))
        assert ld.num_examples == len(shard)
        assert len(ld) == math.ceil(len(shard) / batch)
        idx = np.concatenate([_centre_index(unnormalize(x)) for x, _ in ld])
        assert idx.tolist() == shard                              # in order, no aug
        x, _ = next(iter(ld))
        np.testing.assert_array_equal(unnormalize(x), IMAGES[shard[:len(x)]])
        seen += shard
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("name", LOADERS)
def test_set_epoch_determinism_and_auto_advance(name):
    ld = make(name, IMAGES[:256], LABELS[:256], augment=Augment(cutout=6), seed=3)

    def epoch_batches(e=None):
        if e is not None:
            ld.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in ld]

    e0 = epoch_batches(0)
    assert ld.epoch == 1                               # a full pass advanced the epoch
    e1 = epoch_batches()                               # ... so this is epoch 1
    assert ld.epoch == 2
    again0, again1 = epoch_batches(0), epoch_batches(1)
    for a, b in zip(e0 + e1, again0 + again1):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1]))
    # A pass abandoned half way does not advance the epoch, and the next pass starts over.
    ld.set_epoch(0)
    for _ in zip(range(1), ld):
        pass
    assert ld.epoch == 0
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e0, epoch_batches()))
    # Another seed, another epoch 0.
    other = make(name, IMAGES[:256], LABELS[:256], augment=Augment(cutout=6), seed=4)
    assert not torch.equal(next(iter(other))[1], e0[0][1])


@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_layout_protocol(name, dtype):
    kw = dict(batch_size=32, augment=Augment(flip="alternate", cutout=4))
    ld = make(name, IMAGES[:64], LABELS[:64], dtype=dtype, **kw)
    ref = make(name, IMAGES[:64], LABELS[:64], dtype=torch.float32, **kw)
    assert isinstance(ld, Loader) and ld.batch_size == 32 and len(ld) == 2
    check_loader(ld, "train")
    for (x, y), (xr, yr) in zip(ld, ref):
        assert x.shape == (32, 3, H, W) and x.dtype == dtype and x.device.type == "cpu"
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and torch.equal(y, yr)
        tol = {torch.float32: 0, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
        torch.testing.assert_close(x.float(), xr, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("name", LOADERS)
def test_sample(name):
    ld = make(name, IMAGES[:100], LABELS[:100], dtype=torch.bfloat16, rank=1, world_size=2,
              augment=Augment(flip="alternate", cutout=8))
    s = ld.sample(5)
    assert s.shape == (5, 3, H, W) and s.dtype == torch.bfloat16
    assert s.is_contiguous(memory_format=torch.channels_last)
    want = normalize(torch.from_numpy(IMAGES[[1, 3, 5, 7, 9]]), MEAN, STD, torch.bfloat16)
    assert torch.equal(s, want)
    assert len(ld.sample(1000)) == 50                          # at most this rank's shard


def test_loaders_do_not_touch_global_rng():
    state = torch.get_rng_state()
    for name in available_loaders():
        ld = make(name, IMAGES[:64], LABELS[:64], augment=Augment(cutout=4))
        for _ in ld:
            pass
    assert torch.equal(state, torch.get_rng_state())


# --------------------------------------------------------------------------- cross-loader

@pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not importable")
@pytest.mark.parametrize("aug", [Augment(), Augment(pad=2, pad_mode="zeros", flip="alternate"),
                                 Augment(cutout=5), Augment(crop="none", cutout=8),
                                 Augment(pad=2, flip="alternate", brightness=0.14,
                                         contrast=0.13, cutout=4)])
def test_dali_and_tensor_give_the_same_batches(aug):
    kw = dict(batch_size=50, augment=aug, seed=11, rank=1, world_size=2)
    dali = make("dali", IMAGES[:300], LABELS[:300], **kw)
    tensor = make("tensor", IMAGES[:300], LABELS[:300], **kw)
    for e in (0, 1):
        dali.set_epoch(e)
        tensor.set_epoch(e)
        for (xd, yd), (xt, yt) in zip(dali, tensor):
            assert torch.equal(yd, yt)
            torch.testing.assert_close(xd, xt, atol=1e-5, rtol=0)


def test_loaders_agree_in_order_and_distribution():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (512, H, W, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 512)
    stats, orders = {}, {}
    for name in available_loaders():
        ld = make(name, images, labels, batch_size=128, seed=5,
                  augment=Augment(pad=4, flip="random", cutout=8))
        xs, ys = zip(*ld)
        x = torch.cat(xs).float()
        stats[name] = torch.stack([x.mean((0, 2, 3)), x.std((0, 2, 3)),
                                   (x == 0).float().mean((0, 2, 3))])
        orders[name] = torch.cat(ys)
    for name in stats:
        assert torch.equal(orders[name], orders["tensor"])        # same examples, same order
        torch.testing.assert_close(stats[name], stats["tensor"], atol=0.01, rtol=0)


def test_plan_is_shared_and_seeded():
    aug = Augment(flip="alternate", cutout=4)
    kw = dict(train=True, batch_size=10, world_size=2, seed=1, hw=(H, W))
    a = plan_epoch(100, aug, rank=0, epoch=3, **kw)
    b = plan_epoch(100, aug, rank=0, epoch=3, **kw)
    c = plan_epoch(100, aug, rank=1, epoch=3, **kw)
    assert all(u is v is None or torch.equal(u, v)
               for u, v in zip(a.fields().values(), b.fields().values()))
    assert not set(a.indices.tolist()) & set(c.indices.tolist())
    np.testing.assert_array_equal(a.flip, flip_base(100, 1)[a.indices] ^ True)
    assert len({mix_seed(0, 1), mix_seed(1, 0), mix_seed(0, 1, 0)}) == 3


# --------------------------------------------------------------------------- specifics

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aug", [Augment(cutout=6), Augment(crop="none", flip="alternate"),
                                 Augment(cutout=6, brightness=0.2, contrast=0.1)])
def test_prenormalized_store_matches_uint8_store(dtype, aug):
    # GPUs keep the store normalised in the output dtype; CPUs keep uint8 and normalise per
    # batch. Both must give the same values (checked here on the CPU).
    from fastres.pipelines.augment import BatchAugment
    from fastres.pipelines.base import crop_pad

    images = torch.from_numpy(IMAGES[:200])
    kw = dict(mean=MEAN, std=STD, dtype=dtype, pad=crop_pad(aug), pad_mode=aug.pad_mode,
              flip=aug.flip != "none", cutout=aug.cutout)
    u8 = BatchAugment(images, prenormalize=False, **kw)
    pre = BatchAugment(images, prenormalize=True, **kw)
    assert pre.store.dtype == dtype and u8.store.dtype == torch.uint8
    plan = plan_epoch(200, aug, train=True, batch_size=50, rank=0, world_size=1, seed=0,
                      epoch=1, hw=(H, W))
    for p in plan.batches(50):
        a = u8(p.indices, p.dy, p.dx, p.flip, p.cut_y, p.cut_x, p.bright, p.contrast)
        b = pre(p.indices, p.dy, p.dx, p.flip, p.cut_y, p.cut_x, p.bright, p.contrast)
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)
    idx = torch.arange(7)
    assert torch.equal(pre.unaugmented(idx), normalize(images[:7], MEAN, STD, dtype))

def test_torch_loader_workers_reproduce_single_process():
    kw = dict(batch_size=64, augment=Augment(flip="alternate", cutout=8), seed=2)
    single = make("torch", IMAGES[:256], LABELS[:256], workers=0, **kw)
    multi = make("torch", IMAGES[:256], LABELS[:256], workers=2, **kw)
    for e in (1, 0, 1):                     # persistent workers, epochs out of order
        single.set_epoch(e)
        multi.set_epoch(e)
        for (xs, ys), (xm, ym) in zip(single, multi):
            assert torch.equal(xs, xm) and torch.equal(ys, ym)


@pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not importable")
def test_dali_abandoned_pass():
    ld = make("dali", IMAGES[:256], LABELS[:256], batch_size=32)
    full = [x.clone() for x, _ in ld]
    ld.set_epoch(0)
    it = iter(ld)
    first, _ = next(it)
    assert torch.equal(first, full[0])
    again = [x for x, _ in ld]                      # a new pass drains the old one's queue
    assert all(torch.equal(a, b) for a, b in zip(full, again)) and len(again) == len(full)
    with pytest.raises(RuntimeError, match="new pass"):
        next(it)


def test_dali_missing_is_a_readable_error(monkeypatch):
    from fastres.pipelines import dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ConfigError, match=r"pip install 'fastres\[dali\]'"):
        dali._import_dali()
    assert DALI_MISSING.startswith("the dali loader needs NVIDIA DALI")


def test_errors():
    with pytest.raises(ConfigError, match="did you mean 'dali'"):
        make("dalli", IMAGES[:10], LABELS[:10])
    with pytest.raises(ConfigError, match="flip"):
        make("tensor", IMAGES[:10], LABELS[:10], augment=Augment(flip="sometimes"))
    with pytest.raises(ConfigError, match="crop"):
        make("tensor", IMAGES[:10], LABELS[:10], augment=Augment(crop="random_resized"))
    with pytest.raises(ConfigError, match="reflect padding"):
        make("tensor", IMAGES[:10], LABELS[:10], augment=Augment(pad=32))
    with pytest.raises(ConfigError, match="mean and std"):
        make("tensor", IMAGES[:10], LABELS[:10], mean=(0.5,))
    with pytest.raises(ConfigError, match="dtype"):
        make("tensor", IMAGES[:10], LABELS[:10], dtype=torch.float64)
    with pytest.raises(DataError, match="NHWC"):
        make("tensor", IMAGES[:10].transpose(0, 3, 1, 2), LABELS[:10])
    with pytest.raises(DataError, match="labels"):
        make("tensor", IMAGES[:10], LABELS[:9])
    with pytest.raises(ConfigError, match="rank"):
        make("tensor", IMAGES[:10], LABELS[:10], rank=2, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        make("tensor", IMAGES[:10], LABELS[:10], batch_size=2.0)
    with pytest.raises(ConfigError, match="std must be positive"):
        make("tensor", IMAGES[:10], LABELS[:10], std=(0.2, 0.0, 0.2))
    with pytest.raises(ConfigError, match="both mean and std"):
        make("tensor", IMAGES[:10], LABELS[:10], std=None)
    with pytest.raises(ConfigError, match="takes a fastres.pipelines.LoaderOptions"):
        from fastres.pipelines import TensorLoader

        TensorLoader(IMAGES[:10], LABELS[:10], {"batch_size": 2, "train": True})


# --------------------------------------------------------------------------- options

def test_options_are_one_dataclass_for_every_loader():
    opts = LoaderOptions.for_dataset("cifar10", batch_size=32, train=True, workers=0,
                                     augment=Augment(cutout=4))
    assert opts.mean == MEAN and opts.std == STD and opts.device == torch.device("cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.batch_size = 3
    for name in available_loaders():
        ld = build_loader(name, IMAGES[:64], LABELS[:64], opts)
        assert ld.options == opts and ld.mean == MEAN and ld.batch_size == 32
    # Evaluation loaders record that they do not augment.
    ev = build_loader("tensor", IMAGES[:64], LABELS[:64], opts, train=False, batch_size=50)
    assert ev.options == opts.replace(train=False, batch_size=50, augment=Augment.none())
    assert len(ev) == 2 and ev.num_examples == 64
    # The keyword shorthand builds the same options.
    kw = build_loader("tensor", IMAGES[:64], LABELS[:64], batch_size=32, train=True,
                      workers=0, mean=MEAN, std=STD, augment=Augment(cutout=4))
    assert kw.options == opts
    c100 = LoaderOptions.for_dataset("cifar-100", batch_size=8, train=False)
    assert c100.mean == (0.5071, 0.4865, 0.4409)


def test_options_without_statistics():
    from fastres.data import channel_mean_std

    # A training loader normalises with its images' exact statistics ...
    ld = build_loader("tensor", IMAGES[:200], LABELS[:200], batch_size=50, train=True)
    want = channel_mean_std(IMAGES[:200])
    assert ld.mean == want[0] and ld.std == want[1] and ld.options.mean == want[0]
    torch_images = build_loader("tensor", torch.from_numpy(IMAGES[:200]), LABELS[:200],
                                batch_size=50, train=True)
    assert torch_images.mean == want[0]
    # ... an evaluation loader must be told the training set's.
    with pytest.raises(ConfigError, match="training set's statistics"):
        build_loader("tensor", IMAGES[:200], LABELS[:200], batch_size=50, train=False)
    ev = build_loader("tensor", IMAGES[:200], LABELS[:200], ld.options, train=False)
    assert ev.mean == ld.mean


def test_option_errors():
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        build_loader("tensor", IMAGES[:10], LABELS[:10], batchsize=4, train=True)
    with pytest.raises(ConfigError, match="need batch_size and train"):
        build_loader("tensor", IMAGES[:10], LABELS[:10])
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        LoaderOptions.for_dataset("cifar1O", batch_size=4, train=True)
    with pytest.raises(ConfigError, match="not a device"):
        LoaderOptions(batch_size=4, train=True, device="gpu")
    with pytest.raises(ConfigError, match="train must be True or False"):
        LoaderOptions(batch_size=4, train="yes")
    with pytest.raises(ConfigError, match="flip"):
        LoaderOptions(batch_size=4, train=True, augment=Augment(flip="sometimes"))
    with pytest.raises(ConfigError, match="is a LoaderOptions"):
        build_loader("tensor", IMAGES[:10], LABELS[:10], {"batch_size": 4})


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("name", LOADERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_batches_match_cpu(name, dtype):
    kw = dict(batch_size=128, dtype=dtype, seed=9, augment=Augment(flip="alternate", cutout=8))
    gpu = make(name, IMAGES[:512], LABELS[:512], device="cuda", **kw)
    # The tensor and DALI loaders draw on the host: the same batches as on the CPU.
    ref = make("tensor" if name != "torch" else "torch", IMAGES[:512], LABELS[:512], **kw)
    for e in (0, 1):
        gpu.set_epoch(e)
        ref.set_epoch(e)
        for (x, y), (xr, yr) in zip(gpu, ref):
            assert x.is_cuda and y.is_cuda and x.dtype == dtype
            assert x.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(y.cpu(), yr)
            if name == "dali":      # DALI's GPU arithmetic may fuse multiply-adds
                torch.testing.assert_close(x.cpu().float(), xr.float(), atol=1e-5, rtol=2 ** -8)
            else:                   # same float32 arithmetic, same rounding: bit for bit
                assert torch.equal(x.cpu(), xr)
    assert gpu.sample(4).is_cuda


# --------------------------------------------------------------------------- GPU rules on the CPU
#
# Issue 20: on an H200 `fastres loader-parity` failed its crop and pixel checks while DALI and
# the tensor loader agreed with each other. The cause was the check's decoder, not a loader:
# CUDA divides a float tensor by a Python scalar as a multiplication by the float32
# reciprocal (ATen's div_true_kernel_cuda), the CPU divides exactly, and the decoder
# truncated float quotients. `CudaDivision` applies the GPU's rule on the CPU; under it the
# old decoder reproduced every H200 figure (e.g. speedrun dx counts [15039, 9951, 9914,
# 4994, 10102], 15,339,520 pixels) from CPU batches, so the GPU batches were right.

class CudaDivision(torch.overrides.TorchFunctionMode):
    """Float tensor / Python number (or CPU scalar tensor) computed as a * (1/b), with the
    reciprocal rounded to float32 first, as CUDA kernels do; `ulp` = +-1 also nudges every
    such quotient one float32 step up or down (any device's last-bit freedom)."""

    DIVS = {torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.div,
            torch.Tensor.div_, torch.div, torch.true_divide, torch.Tensor.true_divide}

    def __init__(self, ulp: int = 0):
        super().__init__()
        self.ulp = ulp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func in self.DIVS and len(args) == 2 and not kwargs.get("rounding_mode")
                and isinstance(args[0], torch.Tensor) and args[0].is_floating_point()
                and (isinstance(args[1], (int, float))
                     or isinstance(args[1], torch.Tensor) and args[1].dim() == 0)):
            a, b = args
            inv = torch.tensor(1.0) / torch.as_tensor(b, dtype=torch.float32)
            out = a * inv.to(a.dtype)
            if self.ulp:
                out = torch.nextafter(out, torch.full_like(out, self.ulp * math.inf))
            if func in (torch.Tensor.__itruediv__, torch.Tensor.div_):
                return a.copy_(out)
            return out
        return func(*args, **kwargs)


def test_cuda_division_rule_is_what_broke_the_float_decoder():
    red = torch.tensor([7.0 * 22 + 3])
    with CudaDivision():
        col = (red - 3) / 7
    assert col.item() != 22.0 and col.long().item() == 22          # 22.000002
    # A flipped image's offset, W + pad - 1 - j - col with W 32, pad 2, j 8: 2.999998,
    # truncated to 2 where the draw was 3.
    assert (32 + 2 - 1 - 8 - col).long().item() == 2
    assert (32 + 2 - 1 - 8 - (red - 3) / 7).long().item() == 3     # the CPU's exact division


@pytest.mark.parametrize("ulp", [0, 1, -1])
def test_parity_decoder_is_exact_under_gpu_division(ulp):
    """loader-parity's read_back recovers every draw with the GPU's division rule."""
    from fastres.pipelines.augment import pad_images
    from fastres.tools.gpu_kit import loader_parity as lp

    images, labels = lp.readable_images(600)
    for name, settings in lp.CASES.items():
        aug = Augment(**settings)
        ld = build_loader("tensor", images, labels, train=True, batch_size=200,
                          mean=lp.MEAN, std=lp.STD, augment=aug, seed=1)
        padded = pad_images(torch.as_tensor(images), aug.pad, aug.pad_mode)
        for epoch in (0, 1):
            plan = ld.plan(epoch)
            ld.set_epoch(epoch)
            x = torch.cat([b for b, _ in ld])
            with CudaDivision(ulp):
                d = lp.read_back(lp.unjitter(x, plan, 0), aug.pad, lp.MEAN, lp.STD)
            assert torch.equal(d["index"], plan.indices), name
            assert torch.equal(d["dy"], plan.dy) and torch.equal(d["dx"], plan.dx), name
            assert torch.equal(d["flip"], plan.flip), name
            exp = lp.rebuild(padded, d["index"], d["dy"], d["dx"], d["flip"]).float()
            assert ((exp != d["u8"]).any(-1) & ~d["cut"]).sum() == 0, name
            # The trap is exercised: flipped images at inner offsets, the ones that moved.
            assert ((plan.flip == 1) & (plan.dx > 0) & (plan.dx < 2 * aug.pad)).sum() > 20


def test_parity_check_passes_under_gpu_division(monkeypatch):
    """The whole check (crop chi-square, pixels, flips ...) under the GPU's rule, with the
    tensor loader standing in for DALI: what the H200 run does, minus DALI."""
    import fastres.pipelines as pipes
    from fastres.tools.gpu_kit import loader_parity as lp

    real = pipes.build_loader
    monkeypatch.setattr(pipes, "build_loader", lambda name, *a, **kw: real("tensor", *a, **kw))
    images, labels = lp.readable_images(1000)
    for case in ("speedrun", "jitter", "paper"):
        with CudaDivision():
            r = lp.run_case(case, lp.CASES[case], images, labels, device=torch.device("cpu"),
                            dtype=torch.float32, batch=200, epochs=2, seed=0, threads=1)
        assert r["ok"], {k: c for k, c in r["checks"].items() if not c["ok"]}


@pytest.mark.parametrize("pad", [1, 2, 3, 4, 5, 8])
def test_dali_crop_window_rounding(pad):
    """DALI places a crop at round(crop_pos * (W_in - W_out)) (half away from zero): the
    positions the DALI loader feeds give back the plan's offsets exactly, mirrored
    (2 pad - dx) for flipped images, since DALI crops first and mirrors after."""
    from fastres.pipelines.dali import epoch_arguments

    k = 2 * pad + 1
    dx = torch.arange(k).repeat(2)
    flip = torch.arange(2).repeat_interleave(k)
    plan = plan_epoch(64, Augment(pad=pad), train=True, batch_size=2 * k, rank=0,
                      world_size=1, seed=0, epoch=0, hw=(H, W))
    plan.indices, plan.dy, plan.dx, plan.flip = plan.indices[:2 * k], dx.flip(0), dx, flip
    args = epoch_arguments(plan, pad=pad, cutout=0, hw=(H, W))
    assert args["crop_x"].dtype == np.float32 and args["mirror"].dtype == np.int32
    span = np.float32(2 * pad)
    got_x = np.floor(args["crop_x"] * span + np.float32(0.5)).astype(int)
    got_y = np.floor(args["crop_y"] * span + np.float32(0.5)).astype(int)
    np.testing.assert_array_equal(got_x, np.where(flip == 1, 2 * pad - dx, dx))
    np.testing.assert_array_equal(got_y, plan.dy.numpy())
    assert np.abs(args["crop_x"] * span - np.rint(args["crop_x"] * span)).max() < 1e-4


# --------------------------------------------------------------------------- pre-augmented epochs

@pytest.mark.parametrize("aug", [Augment(crop="translate", pad=2, flip="alternate"),
                                 Augment(pad=4, pad_mode="zeros", cutout=8)])
@pytest.mark.parametrize("prenormalize", [False, True])
def test_tensor_loader_chunks_give_the_same_batches(aug, prenormalize):
    """Each batch augmented alone, a few batches at a time, or the whole epoch at once (the
    GPU's default, here with the GPU's normalised store too): the same batches."""
    from fastres.pipelines.augment import BatchAugment

    ld = make("tensor", IMAGES[:700], LABELS[:700], batch_size=64, augment=aug, seed=2,
              dtype=torch.bfloat16)
    if prenormalize:                  # the store a GPU keeps, on the CPU
        ld._aug = BatchAugment(torch.from_numpy(IMAGES[:700]), mean=MEAN, std=STD,
                               dtype=torch.bfloat16, pad=aug.pad, pad_mode=aug.pad_mode,
                               flip=True, cutout=aug.cutout, prenormalize=True)
    runs = {}
    for k in (1, 3, len(ld), None):
        ld.augment_batches = k
        ld.set_epoch(1)
        runs[k] = [(x, y) for x, y in ld]
        assert len(runs[k]) == len(ld) == 10
        for x, y in runs[k]:
            assert x.shape == (64, 3, H, W) and x.dtype == torch.bfloat16
            assert x.is_contiguous(memory_format=torch.channels_last)
    for k, batches in runs.items():
        for (x, y), (x1, y1) in zip(batches, runs[1]):
            assert torch.equal(x, x1) and torch.equal(y, y1), k
    assert ld.chunk_images(640) == 64 * max(1, 512 // 64)      # the CPU's default chunk
    with pytest.raises(ValueError, match="augment_batches"):
        ld.augment_batches = 0
        next(iter(ld))


def test_tensor_loader_batches_stay_valid():
    """Batches are views of a chunk that is never reused: holding one across later batches
    and epochs keeps its values."""
    ld = make("tensor", IMAGES[:512], LABELS[:512], batch_size=64, augment=Augment(cutout=4))
    ld.augment_batches = None
    ld.set_epoch(0)
    held = [(x, x.clone()) for x, _ in ld]
    for _ in range(2):
        for x, _ in ld:
            x.mul_(0)                      # a consumer that scribbles on its batch
    assert all(torch.equal(a, b) for a, b in held)


def test_tensor_loader_gpu_code_path_on_meta():
    """The GPU's code path (normalised store, whole-epoch chunk, plan moved to the device)
    runs on the meta device, which is how `fastres bench-loaders --host` times its host
    cost: a batch is a slice, a few ops, none of them arithmetic."""
    from fastres.tools.bench_loaders import _count_ops

    ld = make("tensor", IMAGES[:640], LABELS[:640], device="meta", batch_size=64,
              dtype=torch.bfloat16, augment=Augment(crop="translate", pad=2, flip="alternate"))
    assert ld._aug.prenormalized and ld.chunk_images(640) == 640
    it = iter(ld)
    first = _count_ops(lambda: next(it))
    later = _count_ops(lambda: next(it))
    x, y = next(it)
    assert x.device.type == "meta" and x.shape == (64, 3, H, W)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert later <= 2 < first                   # two slices; the epoch's work went first
    ld.augment_batches = 1
    it = iter(ld)
    next(it)
    assert _count_ops(lambda: next(it)) > later


def test_bench_loaders_host_mode(tmp_path, capsys):
    from fastres.tools import bench_loaders as bl

    out = tmp_path / "h.json"
    assert bl.main(["--host", "--synthetic", "256", "--batch-sizes", "64", "--repeats", "1",
                    "--crop", "translate", "--pad", "2", "--flip", "alternate", "--device",
                    "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "meta  per batch / pre-augmented" in text and "cpu   per batch" in text
    res = json.loads(out.read_text())
    meta = next(h for h in res["host"] if h["device"] == "meta")
    assert meta["pre-augmented"]["aten_ops_per_batch"] < meta["per batch"]["aten_ops_per_batch"]


# --------------------------------------------------------------------------- DALI, device by device

class FakePipe:
    """Records feed_input calls as DALI's Pipeline would receive them."""

    def __init__(self):
        self.fed = []

    def feed_input(self, name, data, layout=None, cuda_stream=None):
        self.fed.append((name, data, cuda_stream))


def _feeder_setup(aug, n=40):
    from fastres.pipelines.augment import pad_images
    from fastres.pipelines.dali import BatchFeeder, epoch_arguments

    store = pad_images(torch.from_numpy(IMAGES[:n]), aug.pad, aug.pad_mode).contiguous()
    plan = plan_epoch(n, aug, train=True, batch_size=8, rank=0, world_size=1, seed=3,
                      epoch=1, hw=(H, W))
    args = epoch_arguments(plan, pad=aug.pad, cutout=aug.cutout, hw=(H, W))
    return BatchFeeder, store, plan, args


@pytest.mark.parametrize("gpu_like", [False, True])
def test_dali_feeder_hands_whole_batches(gpu_like):
    """One feed: the images source gets the batch's padded images as one array (on a GPU a
    torch tensor on the store's device, with the consumer's stream; on the CPU a numpy
    array), every argument source a view of the epoch's host arrays, and the feeder returns
    what must stay alive for no_copy."""
    aug = Augment(pad=4, flip="random", cutout=6)
    BatchFeeder, store, plan, args = _feeder_setup(aug)
    stream = object() if gpu_like else None
    feeder = BatchFeeder(store, stream=stream)
    if gpu_like:                      # the device gather path, as on a GPU (here on the CPU)
        feeder.gather = lambda a, b: feeder.store.index_select(0, feeder.indices[a:b])
    feeder.start(plan.indices, args)
    pipe = FakePipe()
    images, views = feeder.feed(pipe, 8, 16)
    names = [f[0] for f in pipe.fed]
    assert names == ["images", "crop_x", "crop_y", "mirror", "cut_anchor", "cut_shape"]
    name, data, s = pipe.fed[0]
    assert data is images and s is stream
    assert isinstance(data, torch.Tensor) == gpu_like
    want = store[plan.indices[8:16]]
    if gpu_like:
        assert torch.equal(data, want) and data.is_contiguous()
    else:
        assert np.array_equal(data, want.numpy()) and data.flags["C_CONTIGUOUS"]
    for name, v, s in pipe.fed[1:]:
        assert s is None and v is views[name]
        assert np.shares_memory(v, args[name]) and len(v) == 8 and v.flags["C_CONTIGUOUS"]
    with pytest.raises(ValueError, match="indices on"):
        feeder.start(plan.indices.to("meta"), args)
    with pytest.raises(ValueError, match="uint8"):
        BatchFeeder(store.float())


def test_dali_graph_for_the_gpu_is_the_cpu_graph_on_gpu_nodes():
    """define_graph(device="gpu") (not built: there is no GPU) puts the images source and
    every operator on the GPU, keeps the argument inputs in host memory (DALI's rule),
    feeds whole batches without copies, and is otherwise the CPU graph the tests run."""
    if not HAS_DALI:
        pytest.skip("nvidia.dali is not importable")
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from fastres.pipelines.dali import define_graph

    specs = {}
    for device in ("cpu", "gpu"):
        pipe = Pipeline(batch_size=8, num_threads=1, device_id=0 if device == "gpu" else None)
        with pipe:
            out = define_graph(fn, types, device=device, hw=(H, W), pad=4, flip=True,
                               cutout=True, mean=MEAN, std=STD, fp16=True, bright=True,
                               contrast=True)
        nodes, todo = {}, [out]
        while todo:
            node = todo.pop()
            op = node.source
            nodes[op.name] = (node.device, str(op.spec))
            todo += list(op.inputs)          # argument inputs included
        specs[device] = nodes
        assert out.device == device
        ops = {n: d for n, (d, _) in nodes.items()}
        assert ops["images"] == device
    gpu = specs["gpu"]
    text = "\n".join(spec for _, spec in gpu.values())
    assert "ExternalSource" in text and "no_copy: True" in text
    cmn = next(spec for _, spec in gpu.values() if spec.startswith("OpSpec for CropMirror"))
    assert "images_gpu" in cmn and "crop_x_cpu" in cmn and "mirror_cpu" in cmn
    assert any(spec.startswith("OpSpec for Erase") and "cut_anchor_cpu" in spec
               and "device: gpu" in spec for _, spec in gpu.values())
    assert "device: gpu" in cmn
    # Colour jitter: the per-image values come from host sources and are moved to the GPU
    # for the arithmetic (which takes no CPU input beside a GPU one); then the fp16 cast.
    arith = [(d, spec) for d, spec in gpu.values()
             if spec.startswith("OpSpec for _ArithmeticGenericOp")]
    assert len(arith) == 2 and all(d == "gpu" for d, _ in arith)
    assert gpu["bright"][0] == gpu["contrast"][0] == "cpu"
    assert any(spec.startswith("OpSpec for Cast") and d == "gpu" for d, spec in gpu.values())
    assert set(specs["cpu"]) == set(gpu)


@pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not importable")
def test_dali_keeps_fed_memory_until_taken():
    ld = make("dali", IMAGES[:256], LABELS[:256], batch_size=32, augment=Augment(cutout=4))
    it = iter(ld)
    next(it)
    assert 1 <= len(ld._keep) <= 2          # queued runs only, each holding its inputs
    for _ in it:
        assert len(ld._keep) <= 2
    assert not ld._keep
    assert ld.timings["batches"] == 8 and all(ld.timings[k] > 0 for k in ("feed", "wait"))
    assert "no_copy" in ld.feed_path and "host memory" in ld.feed_path
    ld.reset_timings()
    assert ld.timings["batches"] == 0


@pytest.mark.gpu
def test_dali_gpu_feed_is_device_resident():
    """On a GPU the DALI loader's store lives on the device and every batch reaches DALI as
    a CUDA tensor (a GPU external source, no host copy); arguments stay host arrays."""
    if not HAS_DALI:
        pytest.skip("nvidia.dali is not importable")
    ld = make("dali", IMAGES[:512], LABELS[:512], device="cuda", batch_size=128,
              augment=Augment(flip="alternate", cutout=8))
    assert ld._store.is_cuda and ld.feeder.store.is_cuda
    fed = []
    real = ld._pipe.feed_input

    def record(name, data, *a, **kw):
        fed.append((name, type(data).__name__, getattr(data, "device", None), kw))
        return real(name, data, *a, **kw)

    ld._pipe.feed_input = record
    ref = make("tensor", IMAGES[:512], LABELS[:512], batch_size=128,
               augment=Augment(flip="alternate", cutout=8))
    for (x, y), (xr, yr) in zip(ld, ref):
        assert x.is_cuda and torch.equal(y.cpu(), yr)
        torch.testing.assert_close(x.cpu(), xr, atol=1e-5, rtol=2 ** -8)
    images = [f for f in fed if f[0] == "images"]
    assert images and all(t == "Tensor" and d == ld.device and kw.get("cuda_stream")
                          is not None for _, t, d, kw in images)
    assert all(t == "ndarray" for n, t, _, _ in fed if n != "images")
    assert "GPU external_source" in ld.feed_path
