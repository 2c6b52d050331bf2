"""`Session`: everything a training run holds around its step.

    session = Session(cfg, model, train_loader)   # device, data init, DDP, the TrainStep
    session.warm_up(test_loader)                  # compile (both phases) on random data
    for epoch in range(...):
        train_loader.set_epoch(epoch)
        for x, y in train_loader:
            session.step(x, y)
    print(session.evaluate(test_loader, tta=cfg.run.tta))   # the recipe's weights (EMA)

A Session owns what every user of the step would otherwise rebuild by hand, and get
subtly wrong: the device and memory format; on a CPU, subnormal floats flushed to zero in
every thread (`run.flush_denormal`; process-wide, see `fastres.engine.cpu`); on a GPU,
cuDNN's algorithm timing (`run.cudnn_benchmark`, also process-wide); the model's
data-dependent init (the speed-run net's whitening filters, from `INIT_IMAGES` training
images); SyncBatchNorm and the DDP wrapper; the `TrainStep`; the evaluation network
(compiled with the step's compile setting) and the weights a recipe evaluates (the EMA when
it keeps one); warm-up; and the one checkpoint schema (`state_dict` / `load_state_dict`).
`fastres.engine.train` is a Session plus the epoch loop and the run directory; the profiler,
the loader benchmark, `fastres eval` and the README's examples build Sessions too.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from fastres.bench import Timer
from fastres.config import Config, to_dict
from fastres.distributed import Dist, convert_sync_batchnorm
from fastres.errors import CheckpointError, ConfigError, warn

from .amp import autocast_for
from .cpu import flush_denormals
from .evaluate import evaluate, tta_logits
from .modes import rng_state, set_rng_state, unwrap
from .records import load_state_dict_checked
from .step import TrainStep

__all__ = ["Session", "INIT_IMAGES"]

INIT_IMAGES = 5000  # airbench initialises its whitening conv from 5000 training images


class Session:
    """The step of `cfg` for `model`, and what a run needs around it (module docstring).

    Args:
        cfg: a resolved Config (`fastres.config.resolve`).
        model: the plain module; the Session moves it to `cfg.run.device` and its memory
            format (in place, as `nn.Module.to` does).
        train_loader: the training loader; its length is the epoch (the schedules' time
            base) and its `sample()` feeds the data-dependent init.
        dist: the process group (DDP when enabled).
        init: run the model's data-dependent init (`model.data_init`, where it has one);
            False when the weights come from a checkpoint.

    Attributes: `cfg`, `device`, `model` (plain), `net` (what the step calls: the DDP wrapper
    or the model), `eval_net` (what evaluation calls), `step` (the TrainStep), `init_s`
    (seconds the data-dependent init took, part of a timed run).
    """

    def __init__(self, cfg: Config, model: nn.Module, train_loader, *, dist: Dist = Dist(),
                 init: bool = True):
        r = cfg.run
        if "auto" in (r.precision, r.compile, cfg.optim.impl, r.device, r.cuda_graph,
                      r.cudnn_benchmark):
            raise ConfigError("Session needs a resolved config: call fastres.config.resolve("
                              "cfg, device) first")
        if len(train_loader) == 0:
            raise ConfigError(
                f"the training set ({getattr(train_loader, 'num_examples', '?')} images per "
                f"rank) is smaller than one batch ({train_loader.batch_size}); lower "
                "data.batch_size or use more data")
        self.cfg, self.dist, self.train_loader = cfg, dist, train_loader
        self.device = torch.device(r.device)
        if self.device.type == "cpu" and not flush_denormals(r.flush_denormal) \
                and r.flush_denormal:
            warn("this CPU or its thread pool cannot flush subnormal floats to zero in every "
                 "thread (run.flush_denormal): a run whose values drift below 1.2e-38 may "
                 "slow down many times over")
        if self.device.type == "cuda":  # process-wide, as the subnormal flush on a CPU
            torch.backends.cudnn.benchmark = r.cudnn_benchmark == "on"
        memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
        self.model = model.to(device=self.device, memory_format=memory_format)
        self.init_s = 0.0
        if init and hasattr(self.model, "data_init"):
            timer = Timer(self.device)
            timer.start()
            n = min(INIT_IMAGES, getattr(train_loader, "num_examples", INIT_IMAGES))
            self.model.data_init(train_loader.sample(n).to(self.device))
            self.init_s = timer.stop()
        if r.sync_bn and dist.enabled:
            self.model = convert_sync_batchnorm(self.model)
        self.net = self.model
        if dist.enabled:  # broadcasts rank 0's parameters and buffers: all ranks start equal
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        self.step = TrainStep(cfg, self.model, steps_per_epoch=len(train_loader), dist=dist,
                              net=self.net)
        self.eval_net = torch.compile(self.model, mode=r.compile_mode) \
            if r.compile != "off" else self.model

    @property
    def ema(self):
        return self.step.ema

    @property
    def eval_weights(self) -> str:
        """"ema" or "raw": the weights `evaluate` uses (the recipe's `optim.eval_weights`)."""
        return "ema" if self.cfg.optim.eval_weights == "ema" and self.ema is not None \
            else "raw"

    def evaluate(self, loader, tta: str = "none", *, tta_fraction: float | None = None,
                 progress: str | None = None, label: str = "evaluation") -> dict:
        """Top-1, top-5, loss and count over `loader` with the recipe's weights (the EMA's,
        swapped in and back, where it keeps one), under the run's precision; `tta` and
        `tta_fraction` (default: the run's `run.tta_fraction`) as in
        `fastres.engine.tta_logits`. One host sync."""
        if tta_fraction is None:
            tta_fraction = self.cfg.run.tta_fraction
        kw = dict(tta_fraction=tta_fraction, precision=self.cfg.run.precision, dist=self.dist,
                  device=self.device, progress=progress, label=label)
        if self.eval_weights == "ema":
            with self.ema.swapped(self.model):
                out = evaluate(self.eval_net, loader, tta, **kw)
        else:
            out = evaluate(self.eval_net, loader, tta, **kw)
        self.step.train_mode()
        return out

    def warm_up(self, test_loader=None, steps: int = 3) -> None:
        """Compile and autotune the step (both phases) and the evaluation (each test batch
        size and TTA mode) on random data of the real shapes, then restore the initial state
        -- weights, optimizer, RNG --, so that warm-up does not count as training."""
        r, device = self.cfg.run, self.device
        x = self.train_loader.sample(1)
        dtype, shape = x.dtype, tuple(x.shape[1:])
        rng = rng_state(device)

        def batch(n):
            return torch.randn(n, *shape, device=device).to(
                dtype=dtype, memory_format=torch.channels_last)

        n = self.train_loader.batch_size
        self.step.warm_up(batch(n), torch.randint(0, 2, (n,), device=device), steps=steps)
        if test_loader is not None:
            sizes = {test_loader.batch_size}
            n_test = getattr(test_loader, "num_examples", None)
            if n_test and n_test % test_loader.batch_size:
                sizes.add(n_test % test_loader.batch_size)
            self.eval_net.eval()
            with torch.no_grad():
                for b in sorted(sizes):
                    for tta in {"none", r.tta}:
                        with autocast_for(device, r.precision):
                            tta_logits(self.eval_net, batch(b), tta, r.tta_fraction)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        set_rng_state(rng, device)
        self.step.train_mode()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self, **extra) -> dict:
        """The checkpoint (the one schema every tool reads; `save_checkpoint` adds its
        format tag): resolved config, model weights, the step's state (optimizers, EMA,
        loss scale, step count), world size and RNG, plus `extra` (the trainer adds its
        epoch and timing records)."""
        return {"config": to_dict(self.cfg),
                "model": unwrap(self.model).state_dict(), **self.step.state_dict(),
                "world_size": self.dist.world_size, "rng": rng_state(self.device), **extra}

    def load_state_dict(self, state: dict, *, what: str = "the checkpoint",
                        weights_only: bool = False) -> None:
        """Load a `state_dict()` in place (a compiled step keeps its tensors): weights
        checked against the model first (one CheckpointError naming the mismatch), then
        optimizer, EMA and loss-scale state, the step count and the RNG. `weights_only`:
        the model's weights and the EMA's, nothing else (evaluating a checkpoint)."""
        load_state_dict_checked(unwrap(self.model), state.get("model"), what)
        if weights_only:
            if self.ema is not None and state.get("ema") is not None:
                try:
                    self.ema.load_state_dict(state["ema"])
                except (KeyError, ValueError, RuntimeError) as e:
                    raise CheckpointError(f"{what}: its EMA weights do not fit the model "
                                          f"({str(e).splitlines()[0][:200]})") from None
            return
        try:
            self.step.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError) as e:  # optimizer/EMA/scaler state
            raise CheckpointError(f"{what} does not fit this run's optimizer or EMA "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
                from None
        if "rng" in state:
            set_rng_state(state["rng"], self.device)
