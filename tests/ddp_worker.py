"""Worker for tests/test_distributed.py, launched by torchrun (or run in-process).

Trains a small BatchNorm-free net through the real engine and tensor loader on synthetic
data, with a global batch that equals the whole training set, so every epoch is one step:
after each step the ranks all-gather their flattened parameters and record the largest
difference between ranks. Rank 0 writes the final weights and the evaluation to OUT.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from fastres import config as C
from fastres.testing import synthetic
from fastres.distributed import (Dist, destroy_process_group, from_env, init_process_group)
from fastres.engine import build_loaders, evaluate, train

N_TRAIN, N_TEST, GLOBAL_BATCH, EPOCHS = 64, 50, 64, 4


class NoBNNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def config(loss_reduction="mean"):
    cfg = C.replace(C.preset("smoke"),
                    data={"batch_size": GLOBAL_BATCH, "eval_batch_size": 16, "crop": "none",
                          "flip": "none", "train_limit": 0, "test_limit": 0},
                    # A summed loss has GLOBAL_BATCH times the gradient of a mean: scale the
                    # lr down so both runs take steps of the same size.
                    optim={"name": "sgd", "lr": 0.05 if loss_reduction == "mean" else
                           0.05 / GLOBAL_BATCH, "momentum": 0.9, "nesterov": True,
                           "weight_decay": 5e-4, "loss_reduction": loss_reduction},
                    schedule={"epochs": float(EPOCHS), "lr_schedule": "linear"},
                    run={"progress": "none", "eval_every": 1.0})
    return C.resolve(cfg, "cpu")


def run(dist: Dist, loss_reduction="mean"):
    cfg = config(loss_reduction)
    data = synthetic(N_TRAIN, N_TEST, seed=3)
    torch.manual_seed(0)
    model = NoBNNet()
    loaders = build_loaders(cfg, data, dist)
    diffs = []

    def check_ranks(metrics):
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        if dist.enabled:
            gathered = [torch.empty_like(flat) for _ in range(dist.world_size)]
            torch_dist.all_gather(gathered, flat)
            diffs.append(max((g - gathered[0]).abs().max().item() for g in gathered))

    res = train(cfg, model, loaders, dist=dist, on_epoch=check_ranks)
    ev = evaluate(model, loaders[1], dist=dist)
    return model, res, ev, diffs


def main(out: str, loss_reduction: str) -> int:
    dist = from_env(os.environ)
    init_process_group(dist, "cpu")
    try:
        model, res, ev, diffs = run(dist, loss_reduction)
        if dist.is_main:
            torch.save(model.state_dict(), os.path.join(out, "ddp_model.pt"))
            with open(os.path.join(out, "ddp.json"), "w") as f:
                json.dump({"diffs": diffs, "eval": ev, "final": res.final,
                           "steps": res.final["steps"]}, f)
    finally:
        destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "mean"))
