"""The training loop: `train(cfg, model, loaders) -> RunResult`.

What one step does, in order: set the learning rate (a pure function of the step), forward
under autocast, loss, backward (through a grad scaler for fp16), optimizer step(s), EMA
update, and device-side accumulation of the epoch's loss and accuracy. Nothing in the step
reads a value back to the host; the loop syncs once per epoch (timer, metrics) and every
`log_every` steps when asked.

Timing follows the speed-run convention: the timed region runs from the first training step
(the speed-run net's data-dependent whitening init included) to the final test accuracy
(with TTA), and leaves out compilation and warm-up (done on random data of the real shapes,
after which the initial state is restored), the per-epoch evaluations, logging and
checkpoints. On a GPU it is measured with CUDA events, on a CPU with a synchronised clock.
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres.bench import Timer, environment
from fastres.config import Config, to_dict
from fastres.distributed import Dist, all_reduce_sum, convert_sync_batchnorm
from fastres.errors import CheckpointError, ConfigError, FastresError, TrainingDiverged

from .ema import EMA
from .evaluate import autocast_for, evaluate, tta_logits
from .optim import Optimizers, build_optimizers
from .progress import Progress
from .records import RunRecorder
from .schedules import lr_factor, momentum_at, phase2_start, total_steps, whiten_bias_factor

WHITEN_INIT_IMAGES = 5000  # airbench initialises its whitening conv from 5000 train images


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


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile and DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _set_train_mode(model: nn.Module, bn_frozen: bool) -> None:
    model.train()
    if bn_frozen:  # phase 2: BatchNorm uses (and keeps) its running statistics
        for m in _batchnorms(model):
            m.eval()


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _loader_dtype(loader) -> tuple[torch.dtype, tuple]:
    x = loader.sample(1)
    return x.dtype, tuple(x.shape[1:])


class _SignalStop:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (no device sync)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.signal = None
        self._old = {}

    def __enter__(self):
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def train(cfg: Config, model: nn.Module, loaders, *, dist: Dist = Dist(),
          data_info: dict | None = None, resume: dict | None = None,
          handle_signals: bool = False,
          on_epoch: Callable[[dict], None] | None = None) -> RunResult:
    """Train `model` on `loaders = (train_loader, test_loader)` as `cfg` says.

    `cfg` must be resolved (`fastres.config.resolve`). `resume` is a checkpoint dict from
    `load_checkpoint`; the run continues so that its final weights equal an uninterrupted
    run's. `handle_signals` (the CLI sets it) makes SIGTERM/Ctrl-C write a checkpoint and
    raise `Interrupted`. `on_epoch` receives each epoch's metrics dict.
    """
    r, o, s = cfg.run, cfg.optim, cfg.schedule
    if r.precision == "auto" or r.compile == "auto" or o.impl == "auto" or r.device == "auto":
        raise ConfigError("train() needs a resolved config: call fastres.config.resolve(cfg, "
                          "device) first")
    device = torch.device(r.device)
    train_loader, test_loader = loaders
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"the training set ({getattr(train_loader, 'num_examples', '?')} "
                          f"images per rank) is smaller than one batch "
                          f"({train_loader.batch_size}); lower data.batch_size")
    total = total_steps(s, steps_per_epoch)
    n_epochs = math.ceil(total / steps_per_epoch)
    p2 = phase2_start(s, steps_per_epoch)
    whiten_steps = math.ceil(o.whiten_bias_epochs * steps_per_epoch)
    global_batch = train_loader.batch_size * dist.world_size

    recorder = RunRecorder(r.out_dir, enabled=dist.is_main)
    env = environment(device)
    env.update(world_size=dist.world_size, data=data_info or {})
    recorder.start(to_dict(cfg), env, resumed=resume is not None)

    memory_format = torch.channels_last if r.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    timer = Timer(device)

    # Data-dependent initialisation (airbench's whitening conv) is part of the timed run.
    data_init_s = 0.0
    if resume is None and hasattr(model, "data_init"):
        timer.start()
        model.data_init(train_loader.sample(WHITEN_INIT_IMAGES).to(device))
        data_init_s = timer.stop()

    if r.sync_bn and dist.enabled:
        model = convert_sync_batchnorm(model)
    net = model
    if dist.enabled:
        # Broadcasts rank 0's parameters and buffers, so all ranks start identical.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_net = torch.compile(net, mode=r.compile_mode) if r.compile == "on" else net
    eval_net = train_net if not dist.enabled else (
        torch.compile(model, mode=r.compile_mode) if r.compile == "on" else model)

    if r.compile == "on" or device.type == "cuda":
        _warm_up(cfg, model, train_net, eval_net, train_loader, test_loader, device)

    ema = EMA(model, o.ema_decay, o.ema_every, o.ema_warmup) if o.ema_decay > 0 else None
    triton_ema = ema is not None and o.impl == "triton"
    opts = build_optimizers(model, o, ema_shadows=ema.shadows_by_param(model)
                            if triton_ema else None)
    micro = r.micro_batch or train_loader.batch_size
    scaler = torch.amp.GradScaler(device.type) if r.precision == "fp16" else None
    criterion_scale = float(dist.world_size) if o.loss_reduction == "sum" else 1.0

    start_step, epochs_log, timed_before = 0, [], 0.0
    if resume is not None:
        start_step, epochs_log, timed_before = _restore(resume, cfg, model, opts, ema, scaler,
                                                        dist, device)
        recorder.truncate_log(start_step)
    timer.total = timed_before + data_init_s

    progress = Progress(r.progress, total=total, initial=start_step, enabled=dist.is_main)
    loss_sum = torch.zeros((), device=device, dtype=torch.float32)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    first_bad = torch.full((), -1, device=device, dtype=torch.int64)
    skipped = torch.zeros((), device=device, dtype=torch.int64)
    step = start_step
    eval_weights_ema = o.eval_weights == "ema" and ema is not None
    best = {"reached_at_s": None, "reached_at_epoch": None}

    def checkpoint_state(epoch_done: int, epoch_step: int) -> dict:
        return {"config": to_dict(cfg), "model": unwrap(model).state_dict(),
                "optimizers": opts.state_dict(), "ema": ema.state_dict() if ema else None,
                "scaler": scaler.state_dict() if scaler else None, "step": step,
                "epoch": epoch_done, "epoch_step": epoch_step, "epochs": epochs_log,
                "timed_s": timer.total, "world_size": dist.world_size,
                "rng": _rng_state(device)}

    def evaluate_now(tta: str) -> dict:
        if eval_weights_ema:
            with ema.swapped(model):
                return evaluate(eval_net, test_loader, tta, precision=r.precision, dist=dist,
                                device=device)
        return evaluate(eval_net, test_loader, tta, precision=r.precision, dist=dist,
                        device=device)

    with _SignalStop(handle_signals) as stopper:
        start_epoch = start_step // steps_per_epoch
        for epoch in range(start_epoch, n_epochs):
            if step >= total:
                break
            train_loader.set_epoch(epoch)
            _set_train_mode(train_net, bn_frozen=step >= p2)
            skip = step - epoch * steps_per_epoch  # batches already done (mid-epoch resume)
            epoch_start_step = step
            loss_sum.zero_()
            correct.zero_()
            timer.start()
            epoch_t0 = timer.total
            for i, (x, y) in enumerate(train_loader):
                if i < skip:
                    continue
                if step >= total:
                    break
                if step == p2 and p2 < total:
                    _set_train_mode(train_net, bn_frozen=True)
                factor = lr_factor(step, total, s, p2)
                opts.set_lr(factor, whiten_bias_factor(step, whiten_steps))
                if step >= p2:
                    for g in opts.param_groups:
                        if g.get("role") == "norm":
                            g["lr"] = 0.0  # phase 2: frozen affine (robust under DDP/compile)
                if s.cycle_momentum:
                    opts.set_momentum(momentum_at(step, total, s, opts.base_momentum[0]))

                due = ema is not None and ema.due(step)
                loss, batch_correct = _forward_backward(
                    train_net, x, y, micro, o, r.precision, device, criterion_scale, scaler,
                    dist)
                step_kw = {"ema_decay": ema.current_decay() if due else 1.0} \
                    if triton_ema else {}
                if scaler is not None:
                    scale_before = scaler._scale.clone()  # device tensor, no sync
                    if o.grad_clip > 0:
                        for opt in opts.optimizers:
                            scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                    opts.step(scaler, **step_kw)
                    scaler.update()
                    skipped += (scaler._scale < scale_before).long()
                else:
                    if o.grad_clip > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                    opts.step(**step_kw)
                opts.zero_grad()
                if due:
                    # With the Triton SGD the weights were averaged inside the step; the
                    # EMA then only follows the buffers (BatchNorm statistics).
                    ema.update(model, params=not triton_ema)

                bad = ~torch.isfinite(loss)
                first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
                loss_sum += torch.where(bad, 0.0, loss)
                correct += batch_correct
                step += 1
                progress.update()
                if r.log_every and step % r.log_every == 0:
                    _check_finite(first_bad, skipped, r.precision, steps_per_epoch)
                    done = step - epoch_start_step
                    denom = done if o.loss_reduction == "mean" else done * train_loader.batch_size
                    recorder.log({"step": step, "epoch": epoch, "lr_factor": factor,
                                  "train_loss_running": loss_sum.item() / max(denom, 1)})
                if stopper.signal is not None:
                    timer.stop()
                    recorder.checkpoint(checkpoint_state(epoch, step - epoch * steps_per_epoch))
                    progress.close()
                    raise Interrupted(
                        f"stopped by signal {stopper.signal} at step {step}; checkpoint "
                        f"written to {recorder.checkpoint_path}; continue with --resume")
            epoch_time = timer.stop()
            _check_finite(first_bad, skipped, r.precision, steps_per_epoch)

            steps_done = step - epoch_start_step
            stats = torch.stack([loss_sum.double(), correct.double(),
                                 torch.tensor(float(steps_done * train_loader.batch_size),
                                              dtype=torch.float64, device=device)])
            all_reduce_sum(stats, dist)
            tl, tc, tn = stats.tolist()  # host sync: epoch boundary
            # "mean" accumulates one batch mean per step, "sum" one batch sum per step.
            train_loss = tl / max(steps_done * dist.world_size, 1) \
                if o.loss_reduction == "mean" else tl / max(tn, 1.0)
            metrics = {"epoch": epoch + 1, "step": step, "epoch_steps": steps_done,
                       "lr_factor": lr_factor(
                           max(step - 1, 0), total, s, p2),
                       "train_loss": train_loss, "train_acc": tc / max(tn, 1.0),
                       "epoch_s": epoch_time, "timed_s": timer.total,
                       "img_per_s": tn / epoch_time if epoch_time > 0 else None,
                       "skipped_steps": int(skipped.item()) if scaler else 0}
            last_epoch = step >= total
            eval_due = r.eval_every > 0 and ((epoch + 1) % max(1, round(r.eval_every)) == 0)
            if eval_due and not last_epoch:
                ev = evaluate_now("none")  # not timed: logging evaluation
                metrics.update(test_top1=ev["top1"], test_top5=ev["top5"], test_loss=ev["loss"])
                if best["reached_at_s"] is None and ev["top1"] >= r.target_acc:
                    best.update(reached_at_s=timer.total, reached_at_epoch=epoch + 1)
            epochs_log.append(metrics)
            recorder.log(metrics)
            progress.epoch_done(metrics, n_epochs)
            if not last_epoch and r.checkpoint_every and (epoch + 1) % r.checkpoint_every == 0:
                recorder.checkpoint(checkpoint_state(epoch + 1, 0))
            if on_epoch is not None:
                on_epoch(metrics)

    # Final evaluation: timed, with the configured TTA.
    timer.start()
    final_eval = evaluate_now(r.tta)
    eval_s = timer.stop()
    plain = evaluate_now("none") if r.tta != "none" else final_eval  # not timed
    progress.close()

    train_images = step * global_batch
    train_s = sum(m["epoch_s"] for m in epochs_log)
    final = {
        "top1": plain["top1"], "top5": plain["top5"], "test_loss": plain["loss"],
        "tta": r.tta, "tta_top1": final_eval["top1"] if r.tta != "none" else None,
        "tta_top5": final_eval["top5"] if r.tta != "none" else None,
        "eval_weights": "ema" if eval_weights_ema else "raw",
        "timed_s": timer.total, "train_s": train_s, "data_init_s": data_init_s,
        "final_eval_s": eval_s, "steps": step, "epochs": step / steps_per_epoch,
        "images_seen": train_images,
        "img_per_s": train_images / train_s if train_s > 0 else None,
        "target_acc": r.target_acc,
        "reached_target": (final_eval["top1"] >= r.target_acc),
        "time_to_target_s": best["reached_at_s"] if best["reached_at_s"] is not None else (
            timer.total if final_eval["top1"] >= r.target_acc else None),
        "world_size": dist.world_size, "device": env.get("device"),
        "precision": r.precision, "compile": r.compile,
    }
    recorder.checkpoint(checkpoint_state(n_epochs, 0))
    recorder.finish(final)
    return RunResult(final=final, epochs=epochs_log, model=model, ema=ema)


def _forward_backward(train_net, x, y, micro: int, o, precision: str, device,
                      criterion_scale: float, scaler, dist: Dist):
    """Forward and backward of one batch, in micro-batches of `micro` images when smaller
    than the batch (gradients accumulate; DDP all-reduces only after the last one).

    Returns the batch loss (as `o.loss_reduction` defines it over the whole batch) and the
    number of correct predictions, both as device tensors.
    """
    n = len(y)
    starts = range(0, n, micro)
    loss_total = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for i, start in enumerate(starts):
        xs, ys = x[start:start + micro], y[start:start + micro]
        last = i == len(starts) - 1
        sync = contextlib.nullcontext() if last or not dist.enabled else train_net.no_sync()
        with sync:
            with autocast_for(device, precision):
                out = train_net(xs)
                loss = F.cross_entropy(out.float(), ys, label_smoothing=o.label_smoothing,
                                       reduction=o.loss_reduction)
            if o.loss_reduction == "mean" and len(ys) != n:
                loss = loss * (len(ys) / n)  # the mean over the whole batch
            backward_loss = loss * criterion_scale if criterion_scale != 1 else loss
            if scaler is not None:
                backward_loss = scaler.scale(backward_loss)
            backward_loss.backward()
        loss_total += loss.detach().float()
        correct += (out.detach().argmax(1) == ys).sum()
    return loss_total, correct


def _check_finite(first_bad, skipped, precision, steps_per_epoch) -> None:
    bad = int(first_bad.item())  # host sync: only at epoch ends / log points
    if bad < 0:
        return
    if precision == "fp16":
        return  # the grad scaler skipped those steps; they are counted, not fatal
    raise TrainingDiverged(
        f"the training loss became NaN or infinite at step {bad} (epoch "
        f"{bad // steps_per_epoch + 1}); lower optim.lr, use run.precision=fp32, or set "
        f"optim.grad_clip")


def _warm_up(cfg, model, train_net, eval_net, train_loader, test_loader, device) -> None:
    """Compile and autotune on random data of the real shapes, then restore the initial
    state (weights, BN statistics, RNG), so that warm-up does not count as training."""
    r, o = cfg.run, cfg.optim
    saved = copy.deepcopy(model.state_dict())
    rng = _rng_state(device)
    dtype, shape = _loader_dtype(train_loader)
    opts = build_optimizers(model, o)
    batch = min(r.micro_batch or train_loader.batch_size, train_loader.batch_size)
    x = torch.randn(batch, *shape, device=device).to(dtype=dtype,
                                                     memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    train_net.train()
    for _ in range(3):
        with autocast_for(device, r.precision):
            loss = F.cross_entropy(train_net(x).float(), y)
        loss.backward()
        opts.step()
        opts.zero_grad()
    n_test = getattr(test_loader, "num_examples", None)
    eval_sizes = {test_loader.batch_size}
    if n_test and n_test % test_loader.batch_size:
        eval_sizes.add(n_test % test_loader.batch_size)
    eval_net.eval()
    with torch.no_grad():
        for b in sorted(eval_sizes):
            xe = torch.randn(b, *shape, device=device).to(dtype=dtype,
                                                         memory_format=torch.channels_last)
            for tta in {"none", r.tta}:
                with autocast_for(device, r.precision):
                    tta_logits(eval_net, xe, tta)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.load_state_dict(saved)
    _set_rng_state(rng, device)
    train_net.train()


_RESUME_EXEMPT = {("run", "out_dir"), ("run", "progress"), ("data", "data_dir"),
                  ("data", "download"), ("data", "workers")}


def _restore(state: dict, cfg: Config, model, opts: Optimizers, ema, scaler, dist: Dist,
             device) -> tuple[int, list, float]:
    saved_cfg = state.get("config", {})
    now = to_dict(cfg)
    diffs = [f"{sec}.{k}: checkpoint {saved_cfg.get(sec, {}).get(k)!r} vs now {v!r}"
             for sec, vals in now.items() for k, v in vals.items()
             if (sec, k) not in _RESUME_EXEMPT and saved_cfg.get(sec, {}).get(k, v) != v
             and not (isinstance(v, tuple) and list(v) == saved_cfg.get(sec, {}).get(k))]
    if diffs:
        raise CheckpointError("cannot resume: the config differs from the checkpoint's (" +
                              "; ".join(diffs) + "); resume with the same settings")
    if state.get("world_size", 1) != dist.world_size:
        raise CheckpointError(
            f"cannot resume: the checkpoint was written by {state.get('world_size')} "
            f"process(es) and this run has {dist.world_size}; resume with the same world size "
            "(--nproc_per_node) so that shards and batches line up")
    unwrap(model).load_state_dict(state["model"])
    opts.load_state_dict(state["optimizers"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:
        _set_rng_state(state["rng"], device)
    return int(state["step"]), list(state.get("epochs", [])), float(state.get("timed_s", 0.0))
