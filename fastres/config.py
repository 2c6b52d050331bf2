"""Run configuration: nested frozen dataclasses, named presets, overrides, one validator.

A run is described by `Config(data, model, optim, schedule, run)`. Every field is declared
once below with its type, default, unit and a help line; `validate()` is the only place
that checks values; `resolve()` replaces the "auto" values with what the device calls for;
the resolved config is what a run records and what `--resume` compares against.

    cfg = preset("speedrun")                                   # a named recipe
    cfg = override(cfg, ["optim.lr=0.2", "schedule.epochs=12"])  # `--set` on the CLI
    cfg = resolve(cfg, device="cuda")                            # "auto" -> concrete values

Only `tools/` and the CLI read argv; the library takes these objects.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import ConfigError, unknown_choice

__all__ = [
    "Config", "DataConfig", "ModelConfig", "OptimConfig", "ScheduleConfig", "RunConfig",
    "SECTIONS", "PRESETS", "FAMILY_RECIPES", "preset", "list_presets", "with_epochs",
    "recipe_preset", "list_recipes", "override", "replace", "to_dict", "from_dict",
    "describe", "validate", "resolve", "num_classes_for", "NUM_CLASSES", "TRAIN_SIZES",
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "ConfigError",
]

CPU_MICRO_BATCH = 500
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000}  # known before any file is read


def num_classes_for(dataset: str) -> int:
    """Classes of a data set the config can name (`data.dataset`)."""
    if dataset not in NUM_CLASSES:
        raise unknown_choice("data set", dataset, NUM_CLASSES)
    return NUM_CLASSES[dataset]


def _f(default, help: str, *, choices=None, unit: str | None = None, low=None, high=None,
       low_open: bool = False, high_open: bool = False):
    """A config field: default, a help line, and what `validate` checks."""
    meta = dict(help=help, choices=choices, unit=unit, low=low, high=high, low_open=low_open,
                high_open=high_open)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _f("cifar10", "data set", choices=("cifar10", "cifar100"))
    data_dir: str = _f("data", "folder holding cifar-10-batches-py/ (or the .tar.gz)")
    download: bool = _f(False, "download the official archive into data_dir if missing")
    loader: str = _f("tensor", "training data pipeline", choices=("tensor", "dali", "torch"))
    batch_size: int = _f(512, "training batch size (see batch_scope)", unit="images", low=1)
    batch_scope: str = _f("global", "whether batch_size counts all ranks or one rank",
                          choices=("global", "per_rank"))
    eval_batch_size: int = _f(1000, "evaluation batch size per rank", unit="images", low=1)
    crop: str = _f("pad_crop", "spatial augmentation", choices=("pad_crop", "translate", "none"))
    pad: int = _f(4, "padding for pad_crop / maximum shift for translate", unit="pixels", low=0)
    pad_mode: str = _f("reflect", "how padding is filled", choices=("reflect", "zeros"))
    flip: str = _f("random", "horizontal flip: random (p=0.5), alternate (each image flipped "
                   "on every other epoch) or none", choices=("random", "alternate", "none"))
    cutout: int = _f(0, "side of a random square zeroed in each image (0 = off)", unit="pixels",
                     low=0)
    brightness: float = _f(0.0, "colour jitter: add b, uniform in [-brightness, brightness], "
                           "to each normalised image (0 = off)", low=0.0)
    contrast: float = _f(0.0, "colour jitter: then multiply each image by c, uniform in "
                         "[1 - contrast, 1 + contrast] (0 = off)", low=0.0, high=1.0,
                         high_open=True)
    mean: Optional[tuple[float, ...]] = _f(None, "per-channel mean in [0,1] (None = data set's)",
                                           low=0.0, high=1.0)
    std: Optional[tuple[float, ...]] = _f(None, "per-channel std in (0,1] (None = data set's)",
                                          low=0.0, high=1.0, low_open=True)
    workers: int = _f(4, "worker processes for the torch loader", low=0)
    train_limit: int = _f(0, "train on a fixed random subset of N images (0 = all)", low=0)
    test_limit: int = _f(0, "test on a fixed random subset of N images (0 = all)", low=0)


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("resnet20", "registered model name (`fastres models` lists them)")
    kwargs: dict = _f({}, "extra keyword arguments for create_model, as JSON")
    zero_init_residual: bool = _f(False, "zero the last BN scale of each residual branch")
    fused_kernels: bool = _f(False, "route BN(+add)+act through the fused Triton kernels")
    bn_momentum: Optional[float] = _f(None, "BatchNorm running-stat momentum (None = model's)")


@dataclass(frozen=True)
class OptimConfig:
    name: str = _f("sgd", "optimizer: sgd, adam, adamw, or muon (orthogonalised updates for "
                   "conv filters, Nesterov SGD for the rest)",
                   choices=("sgd", "adam", "adamw", "muon"))
    impl: str = _f("auto", "implementation: auto, fused, foreach, for_loop (torch) or triton "
                   "(fastres' fused SGD+EMA step)",
                   choices=("auto", "fused", "foreach", "for_loop", "triton"))
    lr: float = _f(0.1, "peak learning rate, as torch optimizers take it: a step per unit "
                   "of the batch loss, so per image with loss_reduction=sum and per batch "
                   "with mean", low=0.0)
    momentum: float = _f(0.9, "SGD momentum (Adam: beta1 comes from betas)", low=0.0, high=1.0)
    nesterov: bool = _f(False, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "weight decay", low=0.0)
    decoupled_wd: bool = _f(False, "SGD: decay weights by weight_decay x schedule each step, "
                            "independent of the learning rate (torch weight_decay = wd / lr)")
    betas: tuple[float, float] = _f((0.9, 0.999), "Adam betas")
    eps: float = _f(1e-8, "Adam epsilon", low=0.0, low_open=True)
    decay_norm_and_bias: bool = _f(False, "apply weight decay to norm parameters and biases")
    bias_lr_scale: float = _f(1.0, "learning-rate multiplier for norm parameters and biases",
                              low=0.0)
    head_lr_scale: float = _f(1.0, "learning-rate multiplier for the classifier head", low=0.0)
    muon_lr: float = _f(0.24, "Muon learning rate for conv filters", low=0.0)
    muon_momentum: float = _f(0.6, "Muon momentum", low=0.0, high=1.0)
    muon_ns_steps: int = _f(3, "Newton-Schulz iterations for the Muon update", low=1)
    muon_ns_coefficients: tuple[float, float, float] = _f(
        (3.4445, -4.7750, 2.0315), "the Newton-Schulz iteration's (a, b, c): x <- a x + "
        "(b A + c A^2) x, A = x x^T")
    whiten_bias_epochs: float = _f(3.0, "epochs the whitening-conv bias trains (speed-run net)",
                                   unit="epochs", low=0.0)
    label_smoothing: float = _f(0.0, "label smoothing", low=0.0, high=1.0)
    loss_reduction: str = _f("mean", "batch loss: mean, or sum (the speed-run recipes)",
                             choices=("mean", "sum"))
    grad_clip: float = _f(0.0, "clip the global grad norm to this (0 = off)", low=0.0)
    ema_decay: float = _f(0.0, "EMA decay per update (0 = off; the reference uses 0.999-0.9999)",
                          low=0.0, high=1.0)
    ema_every: int = _f(1, "update the EMA every N steps (decay applies per update)",
                        unit="steps", low=1)
    ema_warmup: bool = _f(True, "ramp the EMA decay as min(decay, (1+n)/(10+n))")
    eval_weights: str = _f("auto", "weights to evaluate: raw, ema, or auto (ema when on)",
                           choices=("auto", "raw", "ema"))


@dataclass(frozen=True)
class ScheduleConfig:
    epochs: float = _f(10.0, "training length", unit="epochs", low=0.0, low_open=True)
    steps: int = _f(0, "training length in optimizer steps (overrides epochs when > 0)", low=0)
    lr_schedule: str = _f("linear", "learning-rate shape over the run",
                          choices=("constant", "step", "cosine", "linear", "triangular",
                                   "onecycle"))
    warmup: float = _f(0.0, "linear warm-up from start_factor, as a fraction of all steps",
                       low=0.0, high=1.0)
    start_factor: float = _f(0.0, "LR factor at step 0 (warm-up and triangular/onecycle)",
                             low=0.0)
    peak: float = _f(0.25, "triangular/onecycle: where the peak lies, fraction of the run",
                     low=0.0, high=1.0)
    final_factor: float = _f(0.0, "LR factor at the last step (linear, cosine, triangular, "
                             "onecycle)", low=0.0)
    milestones: tuple[float, ...] = _f((0.5, 0.75), "step schedule: where the LR drops, as "
                                       "fractions of the run")
    gamma: float = _f(0.1, "step schedule: LR multiplier at each milestone", low=0.0)
    cycle_momentum: bool = _f(False, "onecycle/triangular: cycle momentum inversely to the LR")
    momentum_range: tuple[float, float] = _f((0.85, 0.95), "momentum (low, high) when cycling",
                                             low=0.0, high=1.0)
    two_phase_epochs: float = _f(0.0, "last N epochs form phase 2: BatchNorm frozen (eval "
                                 "statistics, frozen affine) and the LR halved", unit="epochs",
                                 low=0.0)


@dataclass(frozen=True)
class RunConfig:
    seed: int = _f(0, "random seed (weights, shuffling, augmentation)", low=0,
                   high=2 ** 63 - 1)
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _f("auto", "autocast dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, "
                        "fp16 (with a grad scaler)", choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = _f(True, "channels-last (NHWC) activations and weights")
    compile: str = _f("auto", "torch.compile: on (the model), step (the whole training step "
                      "as one graph: forward, backward, optimizer, EMA, schedules; "
                      "fullgraph=True), off, or auto (on for GPU, off for CPU)",
                      choices=("auto", "on", "step", "off"))
    cuda_graph: str = _f("auto", "with compile=step on CUDA: replay the captured step as a "
                         "CUDA graph (auto = on with compile=step on CUDA, else off)",
                         choices=("auto", "on", "off"))
    compile_mode: str = _f("default", "torch.compile mode",
                           choices=("default", "reduce-overhead", "max-autotune",
                                    "max-autotune-no-cudagraphs"))
    cudnn_benchmark: str = _f("auto", "on a GPU, let cuDNN time its convolution algorithms "
                              "at each new shape and keep the fastest (the warm-up meets "
                              "every shape first); auto = on for CUDA, as airbench does",
                              choices=("auto", "on", "off"))
    micro_batch: Optional[int] = _f(None, "split each per-rank batch into micro-batches of "
                                    "at most this many images, as equal as possible, "
                                    "accumulating gradients (BatchNorm "
                                    "statistics then come from each micro-batch); None = auto: "
                                    "whole batches on a GPU, 500 on a CPU", unit="images")
    out_dir: str = _f("", "run directory (records, checkpoints); empty = no records")
    eval_every: float = _f(1.0, "evaluate every N epochs (0 = only at the end)", unit="epochs",
                           low=0.0)
    checkpoint_every: int = _f(0, "checkpoint every N epochs (0 = only at the end)",
                               unit="epochs", low=0)
    tta: str = _f("none", "test-time augmentation for the final evaluation",
                  choices=("none", "flip", "flip_translate"))
    tta_fraction: float = _f(1.0, "share of each test batch, least confident first (top "
                             "softmax probability of the plain view), that gets the TTA "
                             "views; the rest keep their plain prediction (1 = all)",
                             low=0.0, high=1.0, low_open=True)
    target_acc: float = _f(0.94, "accuracy the run is trying to reach (reported, not enforced)",
                           low=0.0, high=1.0)
    log_every: int = _f(0, "also log train loss every N steps (0 = per epoch; each log syncs)",
                        unit="steps", low=0)
    progress: str = _f("auto", "progress display: auto (bar on a terminal), bar, plain, none",
                       choices=("auto", "bar", "plain", "none"))
    sync_bn: bool = _f(False, "SyncBatchNorm across ranks (GPU only)")
    flush_denormal: bool = _f(True, "on a CPU, flush subnormal floats (< 1.2e-38) to zero in "
                              "every thread (x86 FTZ/DAZ): training that drifts into them "
                              "otherwise runs up to ~20x slower; no effect on a GPU")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                  "schedule": ScheduleConfig, "run": RunConfig}


# --------------------------------------------------------------------------- presets

def _speedrun() -> Config:
    # After Keller Jordan's airbench94_muon (94.0% mean in 2.59 s on an A100): a 3-group
    # conv net with a frozen whitening stem, Muon on the conv filters, Nesterov SGD on the
    # rest, label smoothing 0.2 on a summed loss, linear decay to zero, alternating flips,
    # 2-pixel reflect translate, 8 epochs at batch 2000, flip+translate TTA.
    # Units (airbench94_muon's own numbers): the loss is summed over the 2000 images of a
    # batch, so SGD's lr is a step per unit of summed loss -- lr 0.053 for biases and
    # BatchNorm equals lr 106 on a mean loss (0.053 x 2000), or 54 per 1024 examples on a
    # mean loss; the head's 0.67 (head_lr_scale = 0.67 / 0.053) likewise. Muon's 0.24 is a
    # step along the orthogonalised update (spectral norm ~1), which ignores the loss scale.
    # Weight decay 2e-6 per image = 4e-3 per step at batch 2000, decoupled: each step decays
    # by wd x the schedule factor, whatever the learning rate (airbench's convention).
    batch = 2000
    return Config(
        data=DataConfig(batch_size=batch, eval_batch_size=2000, crop="translate", pad=2,
                        pad_mode="reflect", flip="alternate"),
        model=ModelConfig(name="airbench94"),
        optim=OptimConfig(name="muon", lr=0.053, momentum=0.85, nesterov=True,
                          weight_decay=2e-6 * batch, decoupled_wd=True,
                          decay_norm_and_bias=True, head_lr_scale=0.67 / 0.053,
                          muon_lr=0.24, muon_momentum=0.6, muon_ns_steps=3,
                          whiten_bias_epochs=3.0, label_smoothing=0.2, loss_reduction="sum"),
        schedule=ScheduleConfig(epochs=8.0, lr_schedule="linear", final_factor=0.0),
        # Eager on a GPU too: on an H200 (torch 2.11) the eager step ran 236.4k img/s and
        # compile=on 159.3k (`fastres profile`, 2026-12-04); the whole step compiled and
        # replayed as a CUDA graph (compile=step) is the candidate, not yet measured there.
        run=RunConfig(tta="flip_translate", eval_every=0.0, target_acc=0.94, compile="off"),
    )


def _speedrun_hiverge() -> Config:
    # After hiverge's cifar10-speedrun (2025; 94% in 1.99 s on an A100, where
    # airbench94_muon takes 2.59 s), which is airbench94_muon retuned: SiLU in the conv
    # groups (GELU after the whitening conv, as before), per-image colour jitter on the
    # normalised images, batch 1536 for 7.63 epochs (245 steps), the whitening bias
    # trained for its first 0.19 epochs (7 steps) only, label smoothing 0.09, BatchNorm
    # running-stat momentum 0.4434 (its 0.5566 in airbench's convention), tuned rates and
    # momenta, retuned Newton-Schulz coefficients, and TTA for the least confident 20% of
    # the test images. Units as in `_speedrun`: wd 1.0418e-6 per image = 1.6e-3 per step
    # at batch 1536, decoupled; lr 0.0573 per unit of summed loss, the head's 0.5415.
    # Not ported (neither changes what is computed, up to scale and rounding): its fp16
    # Muon momentum buffers (ours follow the parameters' dtype), and its filter renorm
    # every 8 steps with a 1.6e-3 decoupled weight decay in between (ours renormalises
    # every step, which makes a decay of the filters moot: each is followed by BatchNorm,
    # so only the filters' direction matters, and the renorm fixes their scale).
    batch = 1536
    return replace(
        _speedrun(),
        data={"batch_size": batch, "brightness": 0.1399, "contrast": 0.1308},
        model={"kwargs": {"act": "silu"}, "bn_momentum": round(1 - 0.5566, 4)},
        optim={"lr": 0.0573, "momentum": 0.825, "weight_decay": 1.0418e-6 * batch,
               "head_lr_scale": 0.5415 / 0.0573, "muon_lr": 0.205, "muon_momentum": 0.655,
               "muon_ns_coefficients": (3.4576, -4.7391, 2.0843), "whiten_bias_epochs": 0.19,
               "label_smoothing": 0.09},
        schedule={"epochs": 7.63},
        run={"tta_fraction": 0.2})


def _resnet_paper() -> Config:
    # He et al. 2016, section 4.2: batch 128, SGD lr 0.1 momentum 0.9 wd 1e-4, lr / 10 at
    # 32k and 48k iterations, stop at 64k; 4-pixel zero pad + random crop + flip.
    # Units: lr on the batch's mean loss (0.8 per 1024 examples at linear scaling); L2 weight
    # decay 1e-4 added to the gradient (torch's convention), so it scales with the lr.
    return Config(
        data=DataConfig(batch_size=128, crop="pad_crop", pad=4, pad_mode="zeros", flip="random"),
        model=ModelConfig(name="resnet20"),
        optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4,
                          decay_norm_and_bias=True),
        schedule=ScheduleConfig(steps=64000, lr_schedule="step", milestones=(0.5, 0.75),
                                gamma=0.1),
        run=RunConfig(target_acc=0.9125, eval_every=5.0),
    )


def _seed() -> Config:
    # The reference article's recipe: Adam lr 1e-3 at batch 256, weight decay, EMA of the
    # weights, and a second phase with BatchNorm frozen and the learning rate halved.
    # Units: Adam's lr is a step size per update, independent of the loss scale; weight
    # decay 1e-4 is L2 on the mean loss (added to the gradient before Adam's moments); EMA
    # decay 0.999 per step (an average over ~1000 steps, ~5 epochs at batch 256).
    return Config(
        data=DataConfig(batch_size=256, crop="pad_crop", pad=4, flip="random"),
        model=ModelConfig(name="resnet20"),
        optim=OptimConfig(name="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=1e-4, ema_decay=0.999),
        schedule=ScheduleConfig(epochs=60.0, lr_schedule="constant", two_phase_epochs=10.0),
        run=RunConfig(target_acc=0.92),
    )


def _smoke() -> Config:
    # A few seconds on a 2-core CPU: a tiny ResNet on 1024 images, 2 epochs.
    return Config(
        data=DataConfig(batch_size=128, eval_batch_size=256, train_limit=1024, test_limit=512,
                        workers=0),
        model=ModelConfig(name="resnet8"),
        optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        schedule=ScheduleConfig(epochs=2.0, lr_schedule="linear", final_factor=0.1),
        run=RunConfig(target_acc=0.3, eval_every=1.0),
    )


# The `fast` recipe: ours, one preset per model family, each aiming at `seed`'s Top-1 + 0.5
# point in at most half its training time on the same data and device. Learning rates are
# torch's (the step size on the mean loss of one batch); "per 256" names the batch they go
# with. What they share, and why:
# - seed's batch (256) and data augmentation, so an epoch costs what seed's does and the
#   time saved comes from the recipe: half seed's epochs (or fewer) at a higher accuracy.
#   (Measured on the 2-core CPU, ResNet-20, 3 epochs of a 20,000-image subset: batch 500
#   at lr 0.4 reached 43.2% Top-1, batch 256 at lr 0.2 50.6%, seed 49.3%; at so few steps
#   the number of steps decides, and seed's Adam learns fast early.)
# - SGD, Nesterov momentum 0.9, instead of Adam: for BatchNorm ResNets on CIFAR it ends at
#   a higher accuracy for the same number of epochs once the rate anneals, though Adam
#   leads early (ResNet-20, 10 epochs on the JPEG-75 copy, CPU: seed led through epoch 8,
#   then fast finished at 79.81% Top-1 against seed's 79.01%, at the same img/s).
# - one-cycle schedule: half-cosine warm-up from 0.1x to the peak at 20% of the run, then
#   half-cosine down to 0. The warm-up makes the large rate safe at the start; the decay to
#   zero does what seed's EMA and halved-rate phase 2 do (average out the noise), so `fast`
#   has neither and keeps BatchNorm live to the end.
# - label smoothing 0.1 and weight decay 5e-4 on conv/linear weights only (not BatchNorm
#   or biases): the usual CIFAR regularisers, stronger than seed's 1e-4 on every weight.
# - zero-init of each residual branch's last BatchNorm (models that have one): each block
#   starts as the identity, so the large early rate does not blow up deep nets (the
#   reference article reports +0.2-0.3 point for it).
# - flip TTA in the final evaluation: reported apart ("TTA Top-1"); Top-1 stays plain.

def _fast() -> Config:
    # He et al.'s CIFAR ResNets (ResNet-8 ... ResNet-1202): lr 0.2 per 256 (He et al.'s
    # 0.1 per 128, scaled linearly with the batch); 30 epochs, half of seed's 60.
    return Config(
        data=DataConfig(batch_size=256, crop="pad_crop", pad=4, pad_mode="reflect",
                        flip="random"),
        model=ModelConfig(name="resnet20", zero_init_residual=True),
        optim=OptimConfig(name="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          label_smoothing=0.1),
        schedule=ScheduleConfig(epochs=30.0, lr_schedule="onecycle", start_factor=0.1,
                                peak=0.2, final_factor=0.0),
        run=RunConfig(tta="flip", target_acc=0.92),
    )


def _fast_preact() -> Config:
    # PreAct-ResNet-18 (and the ResNet-18 ... 152 layouts): ~11 M parameters and ~14x
    # ResNet-20's FLOPs; a wide net fits CIFAR-10 in fewer epochs, so 20 (a third of
    # seed's 60, leaving room for the slower step), at lr 0.1 per 256: half the CIFAR
    # ResNets' rate (kuangliu/pytorch-cifar's 0.1 per 128 is for 200 epochs; the peak of a
    # short one-cycle sits lower for a net this wide).
    return replace(_fast(), model={"name": "preact_resnet18"}, optim={"lr": 0.1},
                   schedule={"epochs": 20.0})


def _fast_googlenet() -> Config:
    # GoogLeNet (Inception v1, CIFAR layout): no residual branches to zero-init; the
    # rest as fast-preact (a 6.2 M-parameter net at ~38x ResNet-20's FLOPs).
    return replace(_fast_preact(), model={"name": "googlenet_cifar",
                                          "zero_init_residual": False})


def _fast_vgg() -> Config:
    # VGG-16 (torchvision layout, no BatchNorm, dropout 0.5): without BatchNorm the
    # ResNets' rates diverge, so lr 0.01 per 256 with a longer warm-up (peak at 30%) and
    # the global gradient norm clipped to 2; 30 epochs, half of seed's 60.
    return replace(_fast(), model={"name": "vgg16", "zero_init_residual": False},
                   optim={"lr": 0.01, "grad_clip": 2.0}, schedule={"peak": 0.3})


PRESETS = {
    "speedrun": _speedrun,
    "speedrun-hiverge": _speedrun_hiverge,
    "resnet-paper": _resnet_paper,
    "seed": _seed,
    "smoke": _smoke,
    "fast": _fast,
    "fast-preact": _fast_preact,
    "fast-googlenet": _fast_googlenet,
    "fast-vgg": _fast_vgg,
}

# Recipes whose preset depends on the model family (`fastres.models.model_info(name)
# ["family"]`): recipe -> {family -> preset}. Any other recipe name is a preset used as
# it is for every model (the article trains all its models with one recipe: `seed`).
FAMILY_RECIPES = {
    "fast": {"resnet-cifar": "fast", "preact-resnet": "fast-preact",
             "resnet-cifar-stem": "fast-preact", "resnet-imagenet": "fast-preact",
             "inception": "fast-googlenet", "vgg": "fast-vgg"},
}


def preset(name: str, epochs: float | None = None) -> Config:
    """The named preset; with `epochs`, trained that long instead (see `with_epochs`)."""
    if name not in PRESETS:
        raise unknown_choice("preset", name, PRESETS)
    cfg = PRESETS[name]()
    return cfg if epochs is None else with_epochs(cfg, epochs)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def with_epochs(cfg: Config, epochs: float) -> Config:
    """`cfg` trained for `epochs` epochs, with phase 2 (schedule.two_phase_epochs) kept at
    the same fraction of the run: `seed` is 60 epochs of which the last 10 are phase 2, so
    `with_epochs(preset("seed"), 10)` has the last 10/6 epochs in phase 2. A length set in
    steps (schedule.steps) gives way to `epochs`; its phase 2, if any, keeps its epochs.
    Other epoch counts (eval and checkpoint intervals, whiten_bias_epochs) are unchanged."""
    s = cfg.schedule
    two_phase = s.two_phase_epochs
    if two_phase > 0 and s.steps == 0:
        two_phase = two_phase * epochs / s.epochs
    return replace(cfg, schedule={"epochs": float(epochs), "steps": 0,
                                  "two_phase_epochs": two_phase})


def recipe_preset(recipe: str, family: str) -> str:
    """The preset `recipe` uses for a model of `family`: FAMILY_RECIPES' entry, or the
    preset named `recipe` itself. ConfigError for an unknown recipe or a family the
    recipe has no preset for."""
    if recipe in FAMILY_RECIPES:
        by_family = FAMILY_RECIPES[recipe]
        if family not in by_family:
            raise ConfigError(f"recipe {recipe!r} has no preset for model family {family!r} "
                              f"(it covers: {', '.join(sorted(by_family))}); name a preset "
                              f"instead: {', '.join(list_presets())}")
        return by_family[family]
    if recipe not in PRESETS:
        raise unknown_choice("recipe", recipe, list_recipes())
    return recipe


def list_recipes() -> list[str]:
    return sorted(set(PRESETS) | set(FAMILY_RECIPES))


# --------------------------------------------------------------------------- overrides

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(text: str, typ, where: str):
    """Parse `text` as `typ` (the field's annotation); ConfigError on mismatch."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:  # Optional[X]
        if text.strip().lower() in ("none", "null"):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _parse_value(text, inner, where)
    try:
        if typ is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if typ is int:
            value = float(text)
            if value != int(value):
                raise ValueError(text)
            return int(value)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if origin is tuple or typ is tuple:
            items = json.loads(text) if text.strip().startswith("[") else \
                [t for t in text.replace("(", "").replace(")", "").split(",") if t.strip()]
            elem = args[0] if args else float
            return tuple(_parse_value(str(v), elem, where) for v in items)
        if typ is dict or origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
    except (ValueError, OverflowError, json.JSONDecodeError):  # OverflowError: int("inf")
        pass
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{where}: cannot read {text!r} as {name}")


def override(cfg: Config, assignments) -> Config:
    """Apply `section.key=value` strings (the CLI's `--set`) to a config. A length given
    as `schedule.epochs` replaces one the config had in steps (as `--epochs` does), unless
    `schedule.steps` is set too."""
    paths = set()
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"--set {item!r}: expected section.key=value, "
                              f"sections: {', '.join(SECTIONS)}")
        section, key = parts
        if section not in _SECTION_TYPES:
            raise unknown_choice("config section", section, SECTIONS)
        cls = _SECTION_TYPES[section]
        hints = _hints(cls)
        if key not in hints:
            raise unknown_choice(f"key in section {section!r}:", key, hints)
        value = _parse_value(text, hints[key], f"{section}.{key}")
        cfg = replace(cfg, **{section: {key: value}})
        paths.add((section, key))
    if ("schedule", "epochs") in paths and ("schedule", "steps") not in paths:
        cfg = replace(cfg, schedule={"steps": 0})
    return cfg


def replace(cfg: Config, **sections: dict) -> Config:
    """`replace(cfg, optim={"lr": 0.2})`: a copy with some fields of some sections changed."""
    new = {}
    for section, values in sections.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"unknown config section {section!r}")
        hints = _hints(_SECTION_TYPES[section])
        for key in values:
            if key not in hints:
                raise unknown_choice(f"key in section {section!r}:", key, hints)
        new[section] = dataclasses.replace(getattr(cfg, section), **values)
    return dataclasses.replace(cfg, **new)


# --------------------------------------------------------------------------- (de)serialise

def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Inverse of `to_dict` (JSON round trip); unknown keys are an error."""
    if not isinstance(d, dict):
        raise ConfigError(f"a config is a JSON object of sections, got {type(d).__name__}")
    sections = {}
    for section, values in d.items():
        if section not in _SECTION_TYPES:
            raise ConfigError(f"unknown config section {section!r}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} is a {type(values).__name__}, not "
                              "an object of key: value")
        cls = _SECTION_TYPES[section]
        hints = _hints(cls)
        kw = {}
        for key, value in values.items():
            if key not in hints:
                raise unknown_choice(f"key in section {section!r}:", key, hints)
            typ = hints[key]
            if isinstance(value, list):
                value = tuple(value)
            if value is not None and (typ is float or
                                      typing.get_args(typ)[:1] == (float,)) and \
                    isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            kw[key] = value
        sections[section] = cls(**kw)
    return Config(**sections)


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field: used by `fastres train --help-config`."""
    rows = []
    for section, cls in _SECTION_TYPES.items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_line = meta.get("help", "")
            if meta.get("unit"):
                help_line += f" [{meta['unit']}]"
            if meta.get("choices"):
                help_line += f" {{{'|'.join(meta['choices'])}}}"
            typ = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
            rows.append((f"{section}.{f.name}", typ, repr(default), help_line))
    return rows


# --------------------------------------------------------------------------- validation

def _check_type(value, typ, where: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union:
        if value is None:
            return
        typ = [a for a in args if a is not type(None)][0]
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
    }
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{where}: expected a tuple, got {value!r}")
        elem = args[0] if args else float
        for v in value:
            _check_type(v, elem, where)
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return
    check = ok.get(origin or typ)
    if check is not None and not check(value):
        raise ConfigError(f"{where}: expected {getattr(typ, '__name__', typ)}, got {value!r}")


def _check_number(value, meta, where: str) -> None:
    """ConfigError unless `value` is finite and within the field's `low`/`high`."""
    if not math.isfinite(value):
        raise ConfigError(f"{where} must be finite, got {value}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value < low or (meta.get("low_open") and value == low)):
        op = ">" if meta.get("low_open") else ">="
        raise ConfigError(f"{where} must be {op} {low}, got {value}")
    if high is not None and (value > high or (meta.get("high_open") and value == high)):
        op = "<" if meta.get("high_open") else "<="
        raise ConfigError(f"{where} must be {op} {high}, got {value}")


def validate(cfg: Config) -> Config:
    """Check every field's type and range and the combinations that cannot work.

    Returns `cfg` unchanged, or raises ConfigError naming the field and the valid choices.
    """
    if not isinstance(cfg, Config):
        raise ConfigError(f"expected a fastres Config, got {type(cfg).__name__}")
    for section, cls in _SECTION_TYPES.items():
        sec = getattr(cfg, section)
        if not isinstance(sec, cls):
            raise ConfigError(f"config section {section!r} must be a {cls.__name__}")
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            where = f"{section}.{f.name}"
            value = getattr(sec, f.name)
            _check_type(value, hints[f.name], where)
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                raise unknown_choice(f"value for {where}:", str(value), meta["choices"])
            # a number, or each number of a tuple (mean, std, momentum_range, ...)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    _check_number(v, meta, where)

    d, o, s, r = cfg.data, cfg.optim, cfg.schedule, cfg.run
    for name in ("mean", "std"):
        v = getattr(d, name)
        if v is not None and len(v) != 3:
            raise ConfigError(f"data.{name} needs 3 values (R, G, B), got {v}")
    if d.std is not None and min(d.std) <= 0:
        raise ConfigError(f"data.std must be positive, got {d.std}")
    if d.crop == "pad_crop" and d.pad > 16:
        raise ConfigError(f"data.pad={d.pad} is larger than half a 32x32 image")
    if d.cutout > 32:
        raise ConfigError(f"data.cutout={d.cutout} is larger than a 32x32 image")
    if len(o.betas) != 2 or not all(0.0 <= b < 1.0 for b in o.betas):
        raise ConfigError(f"optim.betas must be two values in [0, 1), got {o.betas}")
    if o.nesterov and o.name in ("sgd", "muon") and o.momentum == 0:
        raise ConfigError("optim.nesterov needs optim.momentum > 0")
    if o.impl == "triton" and o.name != "sgd":
        raise ConfigError(f"optim.impl=triton is the fused SGD step; optim.name={o.name!r} "
                          "has no Triton implementation (use auto, fused, foreach or for_loop)")
    if o.impl == "fused" and r.compile == "step":
        raise ConfigError("optim.impl=fused cannot be compiled into the step (torch's fused "
                          "optimizer ops with a tensor lr have no fake implementation, so "
                          "Inductor refuses them); with run.compile=step use optim.impl="
                          "foreach (or auto), whose arithmetic Inductor fuses itself")
    if o.impl == "fused" and s.cycle_momentum:
        raise ConfigError("optim.impl=fused takes a constant momentum (torch's fused kernels "
                          "read it as a float); schedule.cycle_momentum needs optim.impl="
                          "foreach (or auto)")
    if o.eval_weights == "ema" and o.ema_decay == 0:
        raise ConfigError("optim.eval_weights=ema needs an EMA of the weights: set "
                          "optim.ema_decay > 0 (e.g. 0.999), or evaluate the raw weights")
    if o.decoupled_wd and o.name not in ("sgd", "muon"):
        raise ConfigError("optim.decoupled_wd applies to SGD/Muon; use optim.name=adamw for "
                          "decoupled decay with Adam")
    if o.decoupled_wd and o.lr == 0 and o.weight_decay > 0:
        raise ConfigError("optim.decoupled_wd with optim.lr=0 cannot express the decay")
    if s.lr_schedule == "step":
        if not s.milestones or any(not 0 < m < 1 for m in s.milestones) or \
                list(s.milestones) != sorted(s.milestones):
            raise ConfigError(f"schedule.milestones must be increasing fractions in (0, 1), "
                              f"got {s.milestones}")
    if len(s.momentum_range) != 2 or s.momentum_range[0] > s.momentum_range[1]:
        raise ConfigError(f"schedule.momentum_range must be (low, high), got {s.momentum_range}")
    if s.steps == 0 and s.two_phase_epochs >= s.epochs:
        raise ConfigError(f"schedule.two_phase_epochs={s.two_phase_epochs} must be shorter "
                          f"than the run ({s.epochs} epochs); to shorten a two-phase recipe "
                          "use --epochs N (preset(name, epochs=N)), which scales its second "
                          "phase too")
    if s.warmup > 0 and s.lr_schedule in ("triangular", "onecycle"):
        raise ConfigError("schedule.warmup does not combine with triangular/onecycle, which "
                          "warm up by themselves (set schedule.peak instead)")
    dev = r.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"run.device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if dev == "cpu" and r.precision == "fp16":
        raise ConfigError("run.precision=fp16 needs a GPU (fp16 autocast with a grad scaler); "
                          "use fp32 or bf16 on the CPU")
    if dev == "cpu" and r.sync_bn:
        raise ConfigError("run.sync_bn needs GPUs: torch's SyncBatchNorm runs on CUDA only")
    if r.cuda_graph == "on" and r.compile not in ("step", "auto"):
        raise ConfigError("run.cuda_graph=on replays the compiled training step: it needs "
                          "run.compile=step")
    if r.cuda_graph == "on" and r.compile_mode == "max-autotune-no-cudagraphs":
        raise ConfigError("run.cuda_graph=on contradicts run.compile_mode="
                          "max-autotune-no-cudagraphs; use compile_mode=max-autotune (CUDA "
                          "graphs included) or cuda_graph=off")
    if r.cudnn_benchmark == "on" and dev == "cpu":
        raise ConfigError("run.cudnn_benchmark=on needs a CUDA device (cuDNN)")
    if r.cuda_graph == "on" and dev == "cpu":
        raise ConfigError("run.cuda_graph=on needs a CUDA device")
    if r.micro_batch is not None and r.micro_batch < 0:
        raise ConfigError(f"run.micro_batch must be >= 0 (0 = whole batches), got "
                          f"{r.micro_batch}")
    return cfg


# --------------------------------------------------------------------------- resolution

def resolve(cfg: Config, device: str) -> Config:
    """Replace "auto" values for `device` ('cpu', 'cuda', 'cuda:N') and fill data defaults.

    On a GPU: bf16 autocast and torch.compile. On a CPU: fp32 eager (measured on the 2-core
    Zen 3 build machine: bf16 is ~11x slower than fp32 and compile gives no speed-up for
    ResNet-20 training; see README).
    """
    on_gpu = device.startswith("cuda")
    r = cfg.run
    run = {"device": device}
    if r.precision == "auto":
        run["precision"] = "bf16" if on_gpu else "fp32"
    if r.compile == "auto":
        run["compile"] = "on" if on_gpu else "off"
    if r.cuda_graph == "auto":
        run["cuda_graph"] = "on" if on_gpu and run.get("compile", r.compile) == "step" and \
            r.compile_mode != "max-autotune-no-cudagraphs" else "off"
    if r.cudnn_benchmark == "auto":
        run["cudnn_benchmark"] = "on" if on_gpu else "off"
    if r.micro_batch is None:
        # Measured on the 2-core build machine: the speed-run net trains at 151 img/s in
        # batches of 500 and 128 img/s in batches of 2000 (cache-bound convolutions), so
        # large batches are accumulated from 500-image micro-batches there.
        run["micro_batch"] = 0 if on_gpu else CPU_MICRO_BATCH
    d = cfg.data
    data = {}
    mean, std = (CIFAR100_MEAN, CIFAR100_STD) if d.dataset == "cifar100" else \
        (CIFAR10_MEAN, CIFAR10_STD)
    if d.mean is None:
        data["mean"] = mean
    if d.std is None:
        data["std"] = std
    o = cfg.optim
    optim = {}
    if o.impl == "auto":
        # torch's fused SGD/Adam kernels (one launch for all tensors) on a GPU, except where
        # they cannot run: a momentum schedule (they take momentum as a float) and a step
        # compiled whole (they have no fake implementation; Inductor fuses the foreach
        # arithmetic into a few kernels there instead)
        fused_ok = on_gpu and not cfg.schedule.cycle_momentum and \
            run.get("compile", r.compile) != "step"
        optim["impl"] = "fused" if fused_ok else "foreach"
    if o.eval_weights == "auto":
        optim["eval_weights"] = "ema" if o.ema_decay > 0 else "raw"
    out = replace(cfg, run=run, data=data, optim=optim)
    validate(out)
    # model.fused_kernels stays opt-in (default False) but is not refused on a GPU: the v2
    # kernels passed every GPU correctness case run on an H200 (kernels/NOTES.md, "GPU run
    # 2026-12-04"); their GPU speed is unmeasured, so no preset turns them on.
    if not on_gpu and out.run.precision == "fp16":
        raise ConfigError("run.precision=fp16 needs a GPU; use fp32 or bf16 on the CPU")
    if not on_gpu and out.run.sync_bn:
        raise ConfigError("run.sync_bn needs GPUs: torch's SyncBatchNorm runs on CUDA only")
    return out
