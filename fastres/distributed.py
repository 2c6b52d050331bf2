"""One code path for one process and many: torch.distributed under torchrun.

torchrun starts one process per device and tells each its place through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The command-line tools read that
environment and pass it here (`from_env(os.environ)`); the library itself never reads it.
NCCL on GPUs, gloo on CPUs. A single process is `Dist()` (rank 0 of 1), and every helper
below is then a no-op, so the trainer has no `if distributed` branches.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastres.errors import ConfigError, PeerLost
from fastres.norm_act import BatchNormAct2d, apply_act


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
    launch = "launch with `torchrun --nproc_per_node=N -m fastres train ...`"
    if "WORLD_SIZE" not in environ:
        return Dist()
    try:
        world = int(environ["WORLD_SIZE"])
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={environ['WORLD_SIZE']!r} is not a process count; "
                          f"{launch}") from None
    if world <= 1:
        return Dist()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set; {launch}")
    try:
        return Dist(rank=int(environ["RANK"]), world_size=world,
                    local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])))
    except ValueError as e:
        raise ConfigError(f"torchrun environment is malformed ({e}); {launch}") from None


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
    # Who is who, so that a rank that outlives another can name it (`peer_failure`); one
    # small collective at start-up.
    peers: list = [None] * d.world_size
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    _PEERS[:] = peers


_PEERS: list = []  # (host, pid) of each rank, filled by init_process_group

# What gloo and NCCL say when the other end of a collective has gone away.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe",
              "connection refused", "read error", "remote worker crashing", "ncclremoteerror",
              "socket timeout", "no route to host")


def _pid_alive(pid: int) -> bool:
    """False when `pid` is gone or a zombie (dead, not yet reaped by torchrun)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except OSError:
            return True


def dead_ranks(d: Dist, wait_s: float = 2.0) -> list[int]:
    """Ranks on this host whose process has ended (waiting up to `wait_s` for one to
    show), from the (host, pid) table exchanged at start-up."""
    host = socket.gethostname()
    mine = [(r, pid) for r, (h, pid) in enumerate(_PEERS) if h == host and r != d.rank]
    deadline = time.monotonic() + wait_s
    while True:
        dead = [r for r, pid in mine if not _pid_alive(pid)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.1)


def peer_failure(exc: BaseException, d: Dist) -> PeerLost | None:
    """A one-line PeerLost naming the dead rank when `exc` is a collective that failed
    because another process of the job died; None for any other error."""
    if not d.enabled or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    if not any(m in text for m in _PEER_GONE):
        return None
    dead = dead_ranks(d)
    if dead:
        who = ", ".join(f"rank {r} (pid {_PEERS[r][1]})" for r in dead)
        what = f"{who} of {d.world_size} stopped"
    else:
        others = sorted(set(range(d.world_size)) - {d.rank})
        what = (f"a process of the job stopped or lost its connection (rank(s) "
                f"{', '.join(map(str, others))} on other hosts or not identified)")
    return PeerLost(f"{what}, so rank {d.rank} cannot go on; see that rank's output for the "
                    "cause, then continue from the last checkpoint with --resume")


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor, d: Dist) -> Tensor:
    """Sum over ranks, in place (counts of correct predictions, losses, examples)."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


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
                 track_running_stats=True, act="identity", process_group=None):
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
