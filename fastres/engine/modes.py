"""Small pieces the step, the session and the evaluation share: the plain module under its
wrappers, BatchNorm's mode in each phase, how a batch splits into micro-batches, and the
random-number state a rehearsal restores."""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["unwrap", "set_bn_frozen", "micro_batches", "rng_state", "set_rng_state"]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def micro_batches(n: int, micro: int) -> list[tuple[int, int]]:
    """(start, stop) of the micro-batches a batch of `n` is split into: as few as keep each
    at most `micro` (0: the whole batch), sizes as equal as possible -- 512 at 500 is 256 +
    256, not 500 + 12, whose BatchNorm statistics would come from 12 images."""
    k = -(-n // micro) if 0 < micro < n else 1
    size, extra = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        stop = start + size + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def set_bn_frozen(net: nn.Module, frozen: bool) -> None:
    """Training mode, with every BatchNorm in eval mode when `frozen` (phase 2: BatchNorm
    uses and keeps its running statistics)."""
    net.train()
    if frozen:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
