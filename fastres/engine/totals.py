"""What a training step counts, kept on the device and read once per epoch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EpochTotals:
    """Sums over the steps since `StepTotals.reset()`, read once (one host sync)."""

    loss_sum: float        # sum of the step losses (each as `optim.loss_reduction` defines)
    correct: int           # correct top-1 predictions on the training batches
    steps: int             # optimizer steps taken
    first_nonfinite: int   # first step whose loss was NaN/inf since the run began, or -1
    skipped: int           # fp16 steps skipped for non-finite gradients, since the run began


class StepTotals:
    """The epoch's loss and correct predictions, the run's first non-finite step and its
    skipped (fp16) steps, as 0-d device tensors a compiled step updates in place."""

    def __init__(self, device: torch.device):
        def zero(value=0, dtype=torch.int64):
            return torch.full((), value, dtype=dtype, device=device)
        self.loss_sum, self.correct = zero(dtype=torch.float32), zero()
        self.first_bad, self.skipped = zero(-1), zero()

    def add_(self, loss: Tensor, correct: Tensor, skipped: Tensor | None, t: Tensor) -> None:
        """Count one step (`t`: its index). A NaN/inf loss is left out of the sum and its
        step recorded, if it is the first."""
        bad = ~torch.isfinite(loss)
        self.first_bad.copy_(torch.where(bad & (self.first_bad < 0), t, self.first_bad))
        self.loss_sum.add_(torch.where(bad, 0.0, loss))
        self.correct.add_(correct)
        if skipped is not None:
            self.skipped.add_(skipped.long())

    def reset(self) -> None:
        """A new epoch's sums (the non-finite and skipped records run for the whole run)."""
        self.loss_sum.zero_()
        self.correct.zero_()

    def read(self, steps: int) -> EpochTotals:
        """The sums as host numbers: one host sync (epoch ends and log points)."""
        loss, correct, first, skipped = torch.stack([
            self.loss_sum.double(), self.correct.double(), self.first_bad.double(),
            self.skipped.double()]).tolist()  # host sync
        return EpochTotals(loss_sum=loss, correct=int(correct), steps=steps,
                           first_nonfinite=int(first), skipped=int(skipped))

    def tensors(self) -> list[Tensor]:
        return [self.loss_sum, self.correct, self.first_bad, self.skipped]
