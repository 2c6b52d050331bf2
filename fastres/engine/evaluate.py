"""Evaluation: top-1 / top-5 accuracy and loss, with optional test-time augmentation.

Counts are accumulated on the device and read once at the end (one host sync per call);
under DDP the counts, not the accuracies, are summed over ranks, so uneven shards weigh
correctly. `progress=` shows a bar or a line every few seconds (images done, ETA) on the
main rank, counted from batch shapes (no extra sync).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastres.distributed import Dist, all_reduce_sum

from .amp import autocast_for
from .progress import EvalProgress

TTA_MODES = ("none", "flip", "flip_translate")


def tta_logits(model: nn.Module, x: Tensor, tta: str = "none", fraction: float = 1.0) -> Tensor:
    """Logits averaged over test-time views (airbench's weighting for flip_translate):

    flip:           1/2 (f(x) + f(mirror x))
    flip_translate: 1/2 flip(x) + 1/4 flip(x shifted up-left 1px) + 1/4 flip(x shifted
                    down-right 1px), shifts taken from a 1-pixel reflect pad

    `fraction` < 1 gives the views only to the least confident `ceil(fraction * len(x))`
    images of the batch (lowest top softmax probability of the plain view; hiverge's
    cifar10-speedrun uses 0.15); the others keep their plain logits. An image's plain view
    is computed once either way, so flip_translate costs 1 + 5 * fraction forward passes
    per image instead of 6, and the shapes stay fixed for a given batch size (a compiled
    network sees no new shape from one batch to the next).
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta mode {tta!r}; choose from {TTA_MODES}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"tta fraction must be in [0, 1], got {fraction!r}")
    # A copy of our own: a network replayed as a CUDA graph returns a buffer that its next
    # call overwrites, and the views below call it again before `plain` is read.
    plain = model(x).to(torch.float32, copy=True)
    if tta == "none":
        return plain
    if fraction >= 1.0:
        return _views(model, x, plain, tta)
    k = math.ceil(fraction * len(x))
    if k == 0:
        return plain
    confidence = plain.softmax(dim=1).amax(dim=1)
    pick = confidence.topk(k, largest=False, sorted=False).indices
    return plain.index_copy(0, pick, _views(model, x[pick], plain[pick], tta))


def describe_tta(tta: str, fraction: float = 1.0) -> str:
    """`tta` in words for logs: "flip_translate", or "flip_translate on the least
    confident 15%" when only a fraction of each batch gets the views."""
    return f"{tta} on the least confident {fraction:.0%}" \
        if tta != "none" and fraction < 1.0 else tta


def _views(model: nn.Module, x: Tensor, plain: Tensor, tta: str) -> Tensor:
    """The TTA average for `x`, whose plain logits `plain` are already computed."""
    def mirror(v, v_logits=None):
        if v_logits is None:
            v_logits = model(v).float()
        return 0.5 * v_logits + 0.5 * model(v.flip(-1)).float()

    if tta == "flip":
        return mirror(x, plain)
    h, w = x.shape[-2:]  # flip_translate
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left = padded[:, :, 0:h, 0:w]
    down_right = padded[:, :, 2:h + 2, 2:w + 2]
    return 0.5 * mirror(x, plain) + 0.25 * mirror(up_left) + 0.25 * mirror(down_right)


@torch.no_grad()
def evaluate(model: nn.Module, loader, tta: str = "none", *, tta_fraction: float = 1.0,
             precision: str = "fp32",
             dist: Dist = Dist(), device=None, progress: str | EvalProgress | None = None,
             label: str = "evaluation") -> dict:
    """Top-1, top-5 (%-free fractions), mean cross-entropy and example count over `loader`.

    `tta` and `tta_fraction` as in `tta_logits` (the fraction is taken per batch). The
    model is put in eval mode and restored to its previous mode afterwards. `progress`:
    None or "none" (silent), "auto", "bar" or "plain" (shown on the main rank, headed
    `label`), or an EvalProgress.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta mode {tta!r}; choose from {TTA_MODES}")
    if not 0.0 <= tta_fraction <= 1.0:
        raise ValueError(f"tta fraction must be in [0, 1], got {tta_fraction!r}")
    if progress is None or isinstance(progress, str):
        mode = progress if progress and dist.is_main else "none"
        if dist.enabled:  # the counts shown are this process's shard
            label += f" (rank {dist.rank}'s share of {dist.world_size} processes)"
        progress = EvalProgress(mode, total=getattr(loader, "num_examples", None), label=label)
    was_training = model.training
    model.eval()
    stats = None
    try:
        for x, y in loader:
            if stats is None:
                stats = torch.zeros(4, dtype=torch.float64, device=y.device)
            with autocast_for(x.device, precision):
                logits = tta_logits(model, x, tta, tta_fraction)
            k = min(5, logits.size(1))
            topk = logits.topk(k, dim=1).indices
            hit = topk == y[:, None]
            stats[0] += hit[:, 0].sum()
            stats[1] += hit.any(dim=1).sum()
            stats[2] += F.cross_entropy(logits, y, reduction="sum").double()
            stats[3] += y.numel()
            progress.update(y.numel())  # a host-known count: no sync
    finally:
        model.train(was_training)
        progress.close()
    if stats is None:
        stats = torch.zeros(4, dtype=torch.float64,
                            device=device if device is not None else "cpu")
    all_reduce_sum(stats, dist)
    top1, top5, loss, n = stats.tolist()  # the one host sync of an evaluation
    n = max(n, 1.0)
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "n": int(stats[3])}
