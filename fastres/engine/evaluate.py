"""Evaluation: top-1 / top-5 accuracy and loss, with optional test-time augmentation.

Counts are accumulated on the device and read once at the end (one host sync per call);
under DDP the counts, not the accuracies, are summed over ranks, so uneven shards weigh
correctly. `progress=` shows a bar or a line every few seconds (images done, ETA) on the
main rank, counted from batch shapes (no extra sync).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastres.distributed import Dist, all_reduce_sum

from .amp import autocast_for
from .progress import EvalProgress

TTA_MODES = ("none", "flip", "flip_translate")


def tta_logits(model: nn.Module, x: Tensor, tta: str = "none") -> Tensor:
    """Logits averaged over test-time views (airbench's weighting for flip_translate):

    flip:           1/2 (f(x) + f(mirror x))
    flip_translate: 1/2 flip(x) + 1/4 flip(x shifted up-left 1px) + 1/4 flip(x shifted
                    down-right 1px), shifts taken from a 1-pixel reflect pad
    """
    if tta == "none":
        return model(x).float()

    def mirror(v):
        return 0.5 * model(v).float() + 0.5 * model(v.flip(-1)).float()

    if tta == "flip":
        return mirror(x)
    if tta == "flip_translate":
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        up_left = padded[:, :, 0:h, 0:w]
        down_right = padded[:, :, 2:h + 2, 2:w + 2]
        return 0.5 * mirror(x) + 0.25 * mirror(up_left) + 0.25 * mirror(down_right)
    raise ValueError(f"unknown tta mode {tta!r}; choose from {TTA_MODES}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, tta: str = "none", *, precision: str = "fp32",
             dist: Dist = Dist(), device=None, progress: str | EvalProgress | None = None,
             label: str = "evaluation") -> dict:
    """Top-1, top-5 (%-free fractions), mean cross-entropy and example count over `loader`.

    The model is put in eval mode and restored to its previous mode afterwards. `progress`:
    None or "none" (silent), "auto", "bar" or "plain" (shown on the main rank, headed
    `label`), or an EvalProgress.
    """
    if tta not in TTA_MODES:
        raise ValueError(f"unknown tta mode {tta!r}; choose from {TTA_MODES}")
    if progress is None or isinstance(progress, str):
        mode = progress if progress and dist.is_main else "none"
        progress = EvalProgress(mode, total=getattr(loader, "num_examples", None), label=label)
    was_training = model.training
    model.eval()
    stats = None
    try:
        for x, y in loader:
            if stats is None:
                stats = torch.zeros(4, dtype=torch.float64, device=y.device)
            with autocast_for(x.device, precision):
                logits = tta_logits(model, x, tta)
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
