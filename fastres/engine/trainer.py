"""The training loop: `train(cfg, model, loaders) -> RunResult`.

`train` is a `Session` (device, data-dependent init, DDP, the `TrainStep`, evaluation
weights, checkpoint schema) plus the loop, in three parts: `_setup` (records, the Session,
warm-up, resume), a loop of `train_one_epoch` (the steps, then the epoch's metrics,
logging evaluation and checkpoint), and `_finish` (the timed final evaluation and the
result). Nothing here touches a gradient. The loop reads device values at epoch ends and
`log_every` points only.

Timing follows the speed-run convention: the timed region runs from the first training step
(the speed-run net's data-dependent whitening init included) to the final test accuracy
(with TTA), and leaves out compilation and warm-up (on random data of the real shapes,
after which the initial state is restored), the per-epoch evaluations, logging and
checkpoints. On a GPU it is measured with CUDA events, on a CPU with a synchronised clock.
The timer also counts Python's garbage collections in the timed region (the result's
`gc_pauses`).
"""
from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from fastres.bench import Timer, environment
from fastres.config import Config, to_dict
from fastres.config import num_classes_for
from fastres.distributed import Dist, all_reduce_sum
from fastres.errors import ConfigError, FastresError, TrainingDiverged
from fastres.pipelines.base import check_loader

from .ema import EMA
from .modes import unwrap
from .progress import Progress
from .records import FiniteGuard, RunRecorder
from .rundir import check_compatible, check_step, open_recorder
from .session import INIT_IMAGES, Session
from .step import TrainStep

WHITEN_INIT_IMAGES = INIT_IMAGES  # the name this module exported before Session

__all__ = ["train", "train_one_epoch", "RunResult", "Interrupted", "unwrap",
           "WHITEN_INIT_IMAGES"]


class Interrupted(FastresError):
    """SIGTERM or Ctrl-C: a checkpoint was written and the run stopped cleanly."""

    exit_code = 130


@dataclass
class RunResult:
    """What a run produced. `final` is what result.json holds."""

    final: dict
    epochs: list[dict]
    model: nn.Module = field(repr=False)
    ema: EMA | None = field(default=None, repr=False)

    @property
    def top1(self) -> float:
        return self.final["top1"]

    @property
    def timed_s(self) -> float:
        return self.final["timed_s"]


class _SignalStop:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (no device sync)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.signal = None
        self.interrupt: Exception | None = None  # set: a signal raises it at once
        self.second: Callable[[], Exception] = KeyboardInterrupt  # a second signal raises it
        self._old = {}

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.interrupt is not None:  # the final evaluation: its state is on disk
            self.signal = signum
            raise self.interrupt
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise self.second()
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


@dataclass
class _Run:
    """Everything a run carries from setup to finish: the Session (model, step, evaluation)
    and the loop's own records."""

    session: Session
    test_loader: object
    recorder: RunRecorder
    timer: Timer
    env: dict
    epochs_log: list = field(default_factory=list)
    guard: FiniteGuard | None = None
    resumed_stage: str | None = None
    end: int = 0  # the step training stops at: the schedule's total, or `stop_at_step`
    reached: dict = field(default_factory=lambda: {"at_s": None, "at_epoch": None})

    @property
    def cfg(self) -> Config:
        return self.session.cfg

    @property
    def dist(self) -> Dist:
        return self.session.dist

    @property
    def device(self) -> torch.device:
        return self.session.device

    @property
    def model(self) -> nn.Module:
        return self.session.model

    @property
    def step(self) -> TrainStep:
        return self.session.step

    @property
    def train_loader(self):
        return self.session.train_loader

    @property
    def steps_per_epoch(self) -> int:
        return self.step.steps_per_epoch

    def checkpoint_state(self, epoch_done: int, epoch_step: int) -> dict:
        return self.session.state_dict(epoch=epoch_done, epoch_step=epoch_step,
                                       epochs=self.epochs_log, timed_s=self.timer.total,
                                       gc_pauses=self.timer.gc.as_dict())

    def evaluate(self, tta: str, label: str | None = None) -> dict:
        return self.session.evaluate(self.test_loader, tta,
                                     progress=self.cfg.run.progress if label else None,
                                     label=label or "evaluation")


def train(cfg: Config, model: nn.Module, loaders, *, dist: Dist = Dist(),
          data_info: dict | None = None, resume: dict | None = None,
          handle_signals: bool = False, recorder: RunRecorder | None = None,
          on_epoch: Callable[[dict], None] | None = None,
          stop_at_step: int | None = None) -> RunResult:
    """Train `model` on `loaders = (train_loader, test_loader)` as `cfg` says.

    `cfg` must be resolved (`fastres.config.resolve`). `resume` is a checkpoint dict from
    `load_checkpoint`; the run continues so that its final weights equal an uninterrupted
    run's. `handle_signals` (the CLI sets it) makes SIGTERM/Ctrl-C write a checkpoint and
    raise `Interrupted`. `recorder` writes the run's records (default: one for
    `cfg.run.out_dir`, or none when it is empty). `on_epoch` receives each epoch's metrics
    dict. `stop_at_step` ends training after that many steps of the full schedule, then
    runs the final evaluations: a warm-up or profiling run whose compiled step is the one
    the full-length run uses (the schedule's length is part of the compiled graph). It
    keeps no records (a run directory holds complete runs only).
    """
    if stop_at_step is not None:
        if stop_at_step < 1:
            raise ConfigError(f"train(stop_at_step={stop_at_step}): the step must be >= 1")
        if recorder is not None or cfg.run.out_dir:
            raise ConfigError("train(stop_at_step=...) keeps no records: pass no recorder "
                              "and leave run.out_dir empty")
    run = _setup(cfg, model, loaders, dist, data_info, resume, recorder)
    run.end = min(run.step.total, stop_at_step or run.step.total)
    r = cfg.run
    progress = Progress(r.progress, total=run.end, initial=run.step.step,
                        enabled=dist.is_main)
    n_epochs = math.ceil(run.end / run.steps_per_epoch)
    with _SignalStop(handle_signals) as stopper, contextlib.ExitStack() as cleanup:
        stopper.second = lambda: Interrupted(_second_signal_note(run.recorder))
        cleanup.callback(run.timer.gc.stop)  # an error inside an epoch leaves the timer on
        for epoch in range(run.step.step // run.steps_per_epoch, n_epochs):
            if run.step.step >= run.end:
                break
            metrics = train_one_epoch(run, epoch, progress, stopper)
            last_epoch = run.step.step >= run.end
            if r.eval_every > 0 and (epoch + 1) % max(1, round(r.eval_every)) == 0 \
                    and not last_epoch:
                ev = run.evaluate("none")  # not timed: a logging evaluation
                metrics.update(test_top1=ev["top1"], test_top5=ev["top5"], test_loss=ev["loss"])
                if run.reached["at_s"] is None and ev["top1"] >= r.target_acc:
                    run.reached.update(at_s=run.timer.total, at_epoch=epoch + 1)
            run.epochs_log.append(metrics)
            run.recorder.log(metrics)
            progress.epoch_done(metrics, n_epochs, run.steps_per_epoch)
            if not last_epoch and r.checkpoint_every and (epoch + 1) % r.checkpoint_every == 0:
                run.recorder.checkpoint(run.checkpoint_state(epoch + 1, 0))
            if on_epoch is not None:
                on_epoch(metrics)
            if stopper.signal is not None and not last_epoch:  # arrived in the last step
                _stop(run, stopper, progress, epoch + 1, 0)
        progress.close()
        try:
            return _finish(run, n_epochs, stopper)
        except BaseException:
            run.recorder.close()
            raise


def _stop(run: _Run, stopper: _SignalStop, progress: Progress, epoch: int,
          epoch_step: int) -> None:
    """Checkpoint where a signal stopped the run (`epoch_step` steps into `epoch`), then
    raise Interrupted."""
    run.recorder.checkpoint(run.checkpoint_state(epoch, epoch_step))
    progress.close()
    raise Interrupted(f"stopped by signal {stopper.signal} at step {run.step.step}; "
                      f"checkpoint written to {run.recorder.checkpoint_path}; continue "
                      "with --resume")


def _second_signal_note(recorder: RunRecorder) -> str:
    path = recorder.checkpoint_path
    then = ("--resume continues from it" if path is not None and path.exists() else
            "--resume starts the run again" if path is not None else "")
    return (f"stopped at once by a second signal, before this step's checkpoint; "
            f"{recorder.kept_note()}" + (f"; {then}" if then else ""))


def train_one_epoch(run: _Run, epoch: int, progress: Progress, stopper: _SignalStop) -> dict:
    """The steps of one epoch (from where a mid-epoch resume left off), timed; returns the
    epoch's metrics (one host sync, at the end)."""
    step, loader, r = run.step, run.train_loader, run.cfg.run
    loader.set_epoch(epoch)
    step.train_mode()  # after the last epoch's evaluation put the model in eval mode
    skip = step.step - epoch * run.steps_per_epoch  # batches already done (resume)
    step.reset_totals()
    run.timer.start()
    for i, (x, y) in enumerate(loader):
        if i < skip:
            continue
        if step.step >= run.end:
            break
        step(x, y)
        progress.update()
        if r.log_every and step.step % r.log_every == 0:
            totals = _checked_totals(run)
            run.guard.check(step.step)
            denom = totals.steps if run.cfg.optim.loss_reduction == "mean" else \
                totals.steps * loader.batch_size
            run.recorder.log({"step": step.step, "epoch": epoch, "lr_factor": step.lr_factor(),
                              "train_loss_running": totals.loss_sum / max(denom, 1)})
        done = step.step - epoch * run.steps_per_epoch
        if stopper.signal is not None and done < run.steps_per_epoch and step.step < run.end:
            # (on an epoch's last step the epoch is finished and recorded first: train())
            run.timer.stop()
            _checked_totals(run)                 # a NaN loss: say at which step
            run.guard.check(step.step)           # NaN/inf weights or buffers
            _stop(run, stopper, progress, epoch, done)
    epoch_time = run.timer.stop()
    totals = _checked_totals(run)
    run.guard.check(step.step)  # parameters and buffers too, not only the loss
    images = totals.steps * loader.batch_size
    stats = torch.tensor([totals.loss_sum, totals.correct, images], dtype=torch.float64,
                         device=run.device)
    all_reduce_sum(stats, run.dist)
    tl, tc, tn = stats.tolist()  # host sync: epoch boundary
    # "mean" accumulates one batch mean per step, "sum" one batch sum per step.
    train_loss = tl / max(totals.steps * run.dist.world_size, 1) \
        if run.cfg.optim.loss_reduction == "mean" else tl / max(tn, 1.0)
    return {"epoch": epoch + 1, "step": step.step, "epoch_steps": totals.steps,
            "lr_factor": step.lr_factor(), "train_loss": train_loss,
            "train_acc": tc / max(tn, 1.0), "epoch_s": epoch_time, "timed_s": run.timer.total,
            "img_per_s": tn / epoch_time if epoch_time > 0 else None,
            "skipped_steps": totals.skipped}


def _checked_totals(run: _Run):
    """The step's sums (one host sync), raising TrainingDiverged at a non-finite loss."""
    totals = run.step.epoch_totals()
    bad = totals.first_nonfinite
    if bad >= 0 and run.cfg.run.precision != "fp16":  # fp16: skipped by the scaler, counted
        raise TrainingDiverged(
            f"the training loss became NaN or infinite at step {bad} (epoch "
            f"{bad // run.steps_per_epoch + 1}); {run.recorder.kept_note()}; lower optim.lr, "
            "use run.precision=fp32, or set optim.grad_clip")
    return totals


def _setup(cfg: Config, model: nn.Module, loaders, dist: Dist, data_info, resume,
           recorder: RunRecorder | None = None) -> _Run:
    r = cfg.run
    if "auto" in (r.precision, r.compile, cfg.optim.impl, r.device, r.cuda_graph):
        raise ConfigError("train() needs a resolved config: call fastres.config.resolve(cfg, "
                          "device) first")
    device = torch.device(r.device)
    if not isinstance(loaders, (tuple, list)) or len(loaders) != 2:
        raise ConfigError(f"train() takes loaders=(train_loader, test_loader), got "
                          f"{type(loaders).__name__}")
    train_loader, test_loader = loaders
    check_loader(train_loader, "train")
    check_loader(test_loader, "test")
    if len(train_loader) == 0:
        raise ConfigError(f"the training set ({getattr(train_loader, 'num_examples', '?')} "
                          f"images per rank) is smaller than one batch "
                          f"({train_loader.batch_size}); lower data.batch_size or use more "
                          "data")
    if resume is not None:  # before the recorder writes anything into the directory
        check_compatible(resume.get("config"), resume.get("world_size", 1), cfg,
                         dist.world_size)
    if recorder is None:
        recorder = open_recorder(r.out_dir, enabled=dist.is_main, resumed=resume is not None)
    env = environment(device)
    env.update(world_size=dist.world_size, data=data_info or {})
    recorder.start(to_dict(cfg), env, resumed=resume is not None)

    # the data-dependent init is part of the timed run (Session.init_s)
    session = Session(cfg, model, train_loader, dist=dist, init=resume is None)
    timer = Timer(device)
    timer.total = session.init_s
    run = _Run(session, test_loader, recorder, timer, env)
    if r.compile != "off" or device.type == "cuda":
        session.warm_up(test_loader)
    if resume is not None:
        _restore(resume, run)
        recorder.truncate_log(run.step.step)
    run.guard = FiniteGuard(unwrap(run.model), ema=run.step.ema, recorder=recorder,
                            start_step=run.step.step)
    return run


def _finish(run: _Run, n_epochs: int, stopper: _SignalStop) -> RunResult:
    """Checkpoint the end of training, then the timed final evaluation (with TTA), an
    untimed plain one, the result record. A signal during the evaluations stops at once:
    `--resume` then runs the evaluations only."""
    r, step = run.cfg.run, run.step
    if run.resumed_stage != "final_eval":
        run.guard.check(step.step)
        run.recorder.checkpoint({**run.checkpoint_state(n_epochs, 0), "stage": "final_eval"})
    stopper.interrupt = Interrupted(
        f"stopped by a signal during the final evaluation; training is complete and "
        f"checkpointed (step {step.step}, {run.recorder.checkpoint_path}); --resume runs the "
        "final evaluation only")
    if stopper.signal is not None:  # arrived during the last step
        raise stopper.interrupt
    run.timer.start()
    final_eval = run.evaluate(r.tta, label="final evaluation")
    eval_s = run.timer.stop()
    plain = run.evaluate("none", label="final evaluation, no TTA") \
        if r.tta != "none" else final_eval  # not timed
    images = step.step * run.train_loader.batch_size * run.dist.world_size
    train_s = sum(m["epoch_s"] for m in run.epochs_log)
    flops = _training_flops(run, images)
    final = {
        "top1": plain["top1"], "top5": plain["top5"], "test_loss": plain["loss"],
        "tta": r.tta, "tta_fraction": r.tta_fraction if r.tta != "none" else None,
        "tta_top1": final_eval["top1"] if r.tta != "none" else None,
        "tta_top5": final_eval["top5"] if r.tta != "none" else None,
        "eval_weights": "ema" if (run.cfg.optim.eval_weights == "ema" and step.ema) else "raw",
        "timed_s": run.timer.total, "train_s": train_s, "data_init_s": run.session.init_s,
        "final_eval_s": eval_s, "steps": step.step, "epochs": step.step / run.steps_per_epoch,
        "images_seen": images, "img_per_s": images / train_s if train_s > 0 else None,
        "target_acc": r.target_acc, "reached_target": final_eval["top1"] >= r.target_acc,
        "time_to_target_s": run.reached["at_s"] if run.reached["at_s"] is not None else (
            run.timer.total if final_eval["top1"] >= r.target_acc else None),
        "gc_pauses": run.timer.gc.as_dict(),
        "world_size": run.dist.world_size, "device": run.env.get("device"),
        "precision": r.precision, "compile": r.compile, **flops,
    }
    run.recorder.finish(final)  # result.json: the run is finished; releases the directory
    return RunResult(final=final, epochs=run.epochs_log, model=run.model, ema=step.ema)


def _training_flops(run: _Run, images: int) -> dict:
    """Training FLOPs of the run (forward + backward, counted once per image) and, on a
    device with a known peak, the model FLOPs utilisation of the training steps."""
    from fastres.bench import device_peak, math_mode, mfu, training_flops

    x = run.train_loader.sample(1)
    try:
        per_image = training_flops(unwrap(run.model), batch=1, count_batch=1,
                                   num_classes=num_classes_for(run.cfg.data.dataset),
                                   input_shape=tuple(x.shape[1:]), device=run.device)
    except Exception:  # a model the counter cannot run on one image: no FLOP figures
        return {"train_flops": None, "mfu": None}
    total = per_image["per_step"] * images
    train_s = sum(m["epoch_s"] for m in run.epochs_log)
    peak = device_peak(run.env.get("device", ""), math_mode(run.cfg.run.precision, run.device)) \
        if run.device.type == "cuda" else None
    # each rank's share of the FLOPs runs on its own device
    return {"train_flops": total,
            "mfu": mfu(total / run.dist.world_size, train_s, peak[1] if peak else None)}


def _restore(state: dict, run: _Run) -> None:
    check_step(state, run.step.total, "the checkpoint resumed")
    run.session.load_state_dict(state, what="the checkpoint resumed")
    run.resumed_stage = state.get("stage", "train")
    run.epochs_log[:] = list(state.get("epochs", []))
    run.timer.total = float(state.get("timed_s", 0.0))
    run.timer.gc.load(state.get("gc_pauses"))
