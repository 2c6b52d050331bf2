"""The training engine.

- `Session(cfg, model, train_loader)`: everything a run holds around its step (device, data
  init, DDP, the `TrainStep`, evaluation weights, warm-up, checkpoint schema).
- `TrainStep`: the one training step; `check_graph` proves it compiles whole.
- `train(cfg, model, loaders) -> RunResult`: a Session plus the epoch loop.
- `run_training(cfg, out)`: train() plus the run directory; `inspect(out)`: what one holds.
- `flush_denormals()`: subnormal floats flushed to zero in every CPU thread (Sessions on a
  CPU do it).
- `evaluate(...)`, and what these are built from.
"""
from .amp import LossScaler, autocast_for
from .build import Built, build, build_loaders, build_model, load_data, resolve_for
from .compile import GraphReport, check_graph
from .cpu import denormals_flushed, flush_denormals
from .ema import EMA
from .evaluate import evaluate, tta_logits
from .optim import Muon, Optimizers, build_optimizers, param_groups, param_roles
from .records import load_checkpoint, read_metrics, save_checkpoint
from .run import TrainingOutcome, prepare_training, run_training
from .rundir import RunInfo, inspect
from .schedules import lr_factor, momentum_at, phase2_start, total_steps
from .session import Session
from .step import EpochTotals, TrainStep, set_bn_frozen, unwrap
from .trainer import Interrupted, RunResult, train, train_one_epoch

__all__ = [
    "Session", "TrainStep", "EpochTotals", "check_graph", "GraphReport", "train",
    "train_one_epoch", "RunResult", "Interrupted", "run_training", "prepare_training",
    "TrainingOutcome", "inspect", "RunInfo", "Built", "build", "build_loaders", "build_model",
    "load_data", "resolve_for", "EMA", "evaluate", "tta_logits", "Muon", "Optimizers",
    "build_optimizers", "param_groups", "param_roles", "load_checkpoint", "read_metrics",
    "save_checkpoint", "lr_factor", "momentum_at", "phase2_start", "total_steps",
    "LossScaler", "autocast_for", "set_bn_frozen", "unwrap", "flush_denormals",
    "denormals_flushed",
]
