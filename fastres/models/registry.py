"""The model registry: `@register_model` entry points and `create_model`, after timm.

An entry point is a function that builds one network:

    @register_model(family="cifar-resnet", paper_params=0.27)
    def resnet20(num_classes=10, norm_act_layer=BatchNormAct2d, zero_init_residual=False,
                 shortcut="A"):
        '''One-line description (shown by `fastres models`).'''

Its signature is the contract. `num_classes` and `norm_act_layer` are passed by
`create_model` (the latter from `fused_kernels`); `zero_init_residual` is passed only to
entry points that declare it (a model without residual blocks does not, and asking for it
there is a `ConfigError`); every other parameter is a model-specific keyword that users can
set (`create_model("resnet20", shortcut="B")`, or `model.kwargs` in the run config), and
anything else is refused with the list of what the model does take.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.nn as nn

from fastres.errors import ConfigError, unknown_choice

from fastres.norm_act import norm_act_factory

# Parameters of an entry point that create_model supplies itself.
_MANAGED = ("num_classes", "norm_act_layer", "zero_init_residual")


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one model, besides how to build it."""

    name: str
    fn: Callable[..., nn.Module]
    family: str
    description: str
    # Parameter count (millions) printed by the paper (or reference implementation) that
    # defines the model, at `paper_num_classes` outputs; None where there is none.
    paper_params: Optional[float]
    paper_source: str
    paper_num_classes: int
    # Image side the architecture was designed for (all of them also run at 32x32).
    input_size: int
    # The reference article's results-table figures for this model, as printed (strings,
    # so their precision is known): {"params_m": "0.26", "gflops": "0.9"}.
    article: dict = field(default_factory=dict)
    note: str = ""

    @property
    def residual(self) -> bool:
        return "zero_init_residual" in self.kwargs_all

    @property
    def kwargs_all(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.fn).parameters)

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """Model-specific keyword arguments and their defaults."""
        return {k: p.default for k, p in self.kwargs_all.items() if k not in _MANAGED}


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(fn: Optional[Callable] = None, *, name: Optional[str] = None,
                   family: str = "", paper_params: Optional[float] = None,
                   paper_source: str = "", paper_num_classes: int = 10, input_size: int = 32,
                   description: Optional[str] = None, article: Optional[dict] = None,
                   note: str = ""):
    """Register a model entry point; usable bare (`@register_model`) or with arguments.

    `name` defaults to the function's name, `description` to the first line of its
    docstring. Registering a name twice is a programming error (ValueError).
    """

    def wrap(f: Callable) -> Callable:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered "
                             f"(by {_REGISTRY[key].fn.__module__})")
        params = inspect.signature(f).parameters
        for required in ("num_classes", "norm_act_layer"):
            if required not in params:
                raise TypeError(f"model entry point {key!r} must take {required!r}")
        desc = description or (inspect.getdoc(f) or "").strip().split("\n")[0]
        _REGISTRY[key] = ModelEntry(
            name=key, fn=f, family=family, description=desc, paper_params=paper_params,
            paper_source=paper_source, paper_num_classes=paper_num_classes,
            input_size=input_size, article=dict(article or {}), note=note)
        return f

    return wrap(fn) if fn is not None else wrap


def _entry(name: str) -> ModelEntry:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise unknown_choice("model", str(name), _REGISTRY)
    return _REGISTRY[name]


def check_model(name: str) -> None:
    """ConfigError (one line, with "did you mean") unless `name` is a registered model: what
    the tools and `run_training` check before any data is read."""
    _entry(name)


# Listing order: the reference table's CIFAR models first, then the larger designs.
FAMILY_ORDER = ("resnet-cifar", "preact-resnet", "resnet-cifar-stem", "resnet-imagenet", "vgg",
                "inception", "speedrun")


def list_models(filter: str = "") -> list[str]:
    """Registered model names containing `filter`: by family (FAMILY_ORDER), then in
    registration order."""
    def rank(name: str) -> int:
        fam = _REGISTRY[name].family
        return FAMILY_ORDER.index(fam) if fam in FAMILY_ORDER else len(FAMILY_ORDER)

    return sorted((n for n in _REGISTRY if filter in n), key=rank)  # sorted() is stable


def model_info(name: str) -> dict:
    """Family, description, reference figures and design input size of a model."""
    e = _entry(name)
    return dict(name=e.name, family=e.family, description=e.description,
                paper_params_m=e.paper_params, paper_source=e.paper_source,
                paper_num_classes=e.paper_num_classes, input_size=e.input_size,
                residual=e.residual, kwargs=e.model_kwargs, article=dict(e.article),
                note=e.note)


def create_model(name: str, num_classes: int = 10, *, fused_kernels: bool = False,
                 zero_init_residual: bool = False, bn_momentum: Optional[float] = None,
                 **kwargs) -> nn.Module:
    """Build a registered model.

    fused_kernels: build every BN(+add)+act with `fastres.kernels.FusedBatchNormAct2d`
        instead of the plain-PyTorch `BatchNormAct2d` (same parameters and state dict).
    zero_init_residual: zero the last BN scale of each residual branch (models with
        residual blocks only).
    bn_momentum: running-stat momentum (torch convention: new = (1-m)*old + m*batch) for
        every BatchNorm in the model; None keeps the model's own default.
    kwargs: model-specific options (see `model_info(name)["kwargs"]`).
    """
    e = _entry(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if bn_momentum is not None and (isinstance(bn_momentum, bool)
                                    or not isinstance(bn_momentum, (int, float))
                                    or not 0.0 <= bn_momentum <= 1.0):
        raise ConfigError(f"bn_momentum must be a number in [0, 1] or None (the model's "
                          f"default), got {bn_momentum!r}")
    accepted = e.model_kwargs
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = (", ".join(f"{k}={v!r}" for k, v in accepted.items())
                 or "no model-specific options")
        raise ConfigError(f"model {name!r} does not take {', '.join(map(repr, unknown))}; "
                          f"it accepts: {takes}")
    build_kwargs = dict(kwargs, num_classes=num_classes,
                        norm_act_layer=norm_act_factory(fused_kernels))
    if zero_init_residual:
        if not e.residual:
            raise ConfigError(f"zero_init_residual=True: model {name!r} has no residual blocks "
                              "to zero-initialise (turn zero_init_residual off)")
        build_kwargs["zero_init_residual"] = True
    model = e.fn(**build_kwargs)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = float(bn_momentum)
    return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
