"""One code path for one process and many: torch.distributed under torchrun.

torchrun starts one process per device and tells each its place through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The command-line tools read that
environment and pass it here (`from_env(os.environ)`); the library itself never reads it.
NCCL on GPUs, gloo on CPUs. A single process is `Dist()` (rank 0 of 1), and every helper
below is then a no-op, so the trainer has no `if distributed` branches.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastres.errors import ConfigError
from fastres.models.layers import BatchNormAct2d, apply_act


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(environ: Mapping[str, str]) -> Dist:
    """Read torchrun's variables from `environ` (pass os.environ); Dist() when absent."""
    if "WORLD_SIZE" not in environ or int(environ["WORLD_SIZE"]) <= 1:
        return Dist()
    try:
        return Dist(rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                    local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])))
    except (KeyError, ValueError) as e:
        raise ConfigError(f"torchrun environment is incomplete or malformed ({e}); "
                          "launch with `torchrun --nproc_per_node=N -m fastres train ...`")


def device_for(d: Dist, requested: str) -> str:
    """The device this rank trains on: cuda:LOCAL_RANK under torchrun on GPUs."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"run.device={requested!r} but no CUDA device is visible")
        if d.enabled:
            if d.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {d.local_rank} but only "
                                  f"{torch.cuda.device_count()} GPUs are visible; use "
                                  "--nproc_per_node <= the number of GPUs")
            return f"cuda:{d.local_rank}"
        return requested if ":" in requested else "cuda:0"
    return "cpu"


def init_process_group(d: Dist, device: str, timeout_s: float = 600) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on CPU). No-op for one process."""
    if not d.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend=backend, rank=d.rank, world_size=d.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor, d: Dist) -> Tensor:
    """Sum over ranks, in place (counts of correct predictions, losses, examples)."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, d: Dist, src: int = 0):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def split_batch(global_batch: int, scope: str, d: Dist) -> int:
    """Per-rank batch size. `scope="global"`: the configured batch is split across ranks
    (it must divide evenly); `"per_rank"`: each rank takes the configured batch, so the
    global batch grows with the world size (scale the learning rate yourself)."""
    if scope == "per_rank":
        return global_batch
    if global_batch % d.world_size:
        raise ConfigError(f"data.batch_size={global_batch} does not split evenly over "
                          f"{d.world_size} processes; pick a multiple of {d.world_size} or "
                          "set data.batch_scope=per_rank")
    return global_batch // d.world_size


# --------------------------------------------------------------------------- SyncBatchNorm

class SyncBatchNormAct2d(nn.SyncBatchNorm):
    """SyncBatchNorm with BatchNormAct2d's forward(x, residual=None): statistics over the
    whole global batch, then the residual add and the activation."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, act="relu", process_group=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, process_group=process_group)
        self.act = act

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = super().forward(x)
        if residual is not None:
            y = y + residual
        return apply_act(y, self.act)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Like nn.SyncBatchNorm.convert_sync_batchnorm, but keeps BN-act modules (plain or
    fused) as BN-act modules: torch's converter would turn them into bare SyncBatchNorm and
    drop their residual add and activation."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, nn.SyncBatchNorm):
        if isinstance(module, BatchNormAct2d):
            out = SyncBatchNormAct2d(module.num_features, module.eps, module.momentum,
                                     module.affine, module.track_running_stats, module.act,
                                     process_group)
        else:
            out = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum,
                                   module.affine, module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
