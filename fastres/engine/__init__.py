"""The training engine: `TrainStep` (the one training step), `train(cfg, model, loaders)
-> RunResult`, `evaluate(...)`, and what they are built from."""
from .build import Built, build, build_loaders, build_model, load_data, resolve_for
from .ema import EMA
from .evaluate import evaluate, tta_logits
from .optim import Muon, Optimizers, build_optimizers, param_groups, param_roles
from .records import load_checkpoint, read_metrics, save_checkpoint
from .schedules import lr_factor, momentum_at, phase2_start, total_steps
from .step import EpochTotals, LossScaler, TrainStep, set_bn_frozen, unwrap
from .trainer import Interrupted, RunResult, train, train_one_epoch

__all__ = [
    "Built", "build", "build_loaders", "build_model", "load_data", "resolve_for", "EMA",
    "evaluate", "tta_logits", "Muon", "Optimizers", "build_optimizers", "param_groups",
    "param_roles", "load_checkpoint", "read_metrics", "save_checkpoint", "lr_factor",
    "momentum_at", "phase2_start", "total_steps", "EpochTotals", "LossScaler", "TrainStep",
    "set_bn_frozen", "unwrap", "Interrupted", "RunResult", "train", "train_one_epoch",
]
