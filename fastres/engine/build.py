"""Assemble a run from its config: data, loaders and model.

`build(cfg)` is what `fastres train`, the speed-run tool and the tests share; a library user
with their own model or data calls `train()` directly instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from fastres.config import Config, resolve
from fastres.distributed import Dist, device_for, split_batch

from .amp import PRECISION_DTYPES



@dataclass
class Built:
    model: nn.Module
    loaders: tuple
    data_info: dict
    num_classes: int


def resolve_for(cfg: Config, dist: Dist = Dist()) -> Config:
    """Resolve "auto" values for the device this process trains on."""
    return resolve(cfg, device_for(dist, cfg.run.device))


def subset(images: np.ndarray, labels: np.ndarray, limit: int):
    """A fixed random subset of `limit` examples (seed 0, the same for every run), so a
    limited test set covers all classes even when the files are sorted by class."""
    if not limit or limit >= len(labels):
        return images, labels
    idx = np.sort(np.random.default_rng(0).permutation(len(labels))[:limit])
    return images[idx], labels[idx]


def load_data(cfg: Config, dist: Dist = Dist()):
    """The data set `cfg` names. Every rank loads it; only the main rank prints warnings
    (the run record carries `official` either way)."""
    from fastres.data import load_cifar

    kw = {} if dist.is_main else {"warn": lambda message: None}
    return load_cifar(cfg.data.data_dir, cfg.data.dataset, download=cfg.data.download, **kw)


def loader_options(cfg: Config, dist: Dist = Dist()):
    """The training loader's options for this rank, as `cfg` (resolved) describes them."""
    from fastres.pipelines import Augment, LoaderOptions

    d, r = cfg.data, cfg.run
    return LoaderOptions(
        batch_size=split_batch(d.batch_size, d.batch_scope, dist), train=True,
        device=r.device, dtype=PRECISION_DTYPES[r.precision], mean=d.mean, std=d.std,
        augment=Augment(crop=d.crop, pad=d.pad, pad_mode=d.pad_mode, flip=d.flip,
                        cutout=d.cutout, brightness=d.brightness, contrast=d.contrast),
        rank=dist.rank, world_size=dist.world_size, seed=r.seed, workers=d.workers)


def build_loaders(cfg: Config, data, dist: Dist = Dist()):
    """(train, test) loaders for this rank: `data.loader` for training, the tensor loader
    for evaluation. `cfg` must be resolved (mean/std filled in)."""
    from fastres.pipelines import build_loader

    from .rundir import check_data_fits

    d = cfg.data
    check_data_fits(cfg, dist.world_size, n_train=len(data.train.labels))
    train_x, train_y = subset(data.train.images, data.train.labels, d.train_limit)
    test_x, test_y = subset(data.test.images, data.test.labels, d.test_limit)
    options = loader_options(cfg, dist)
    train = build_loader(d.loader, train_x, train_y, options)
    # Evaluation always uses the GPU-resident tensor loader: no augmentation to run, and
    # the whole test set fits in memory; the loader choice is about training throughput.
    test = build_loader("tensor", test_x, test_y, options,
                        train=False, batch_size=d.eval_batch_size)
    return train, test


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    from fastres.models import create_model

    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    return create_model(m.name, num_classes=num_classes, fused_kernels=m.fused_kernels,
                        zero_init_residual=m.zero_init_residual, bn_momentum=m.bn_momentum,
                        **m.kwargs)


def build(cfg: Config, dist: Dist = Dist(), data=None) -> Built:
    """Data (loaded unless given), loaders for this rank, and the model, seeded."""
    if data is None:
        data = load_data(cfg, dist)
    num_classes = len(data.classes)
    model = build_model(cfg, num_classes)
    loaders = build_loaders(cfg, data, dist)
    info = data.info() if hasattr(data, "info") else {}
    return Built(model=model, loaders=loaders, data_info=info, num_classes=num_classes)
