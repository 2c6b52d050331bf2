"""TrainStep: the one training step, eager and compiled as one graph (CPU).

Three recipes at tiny scale (the speed-run recipe on `airbench_tiny`: Muon + SGD, whitening
bias schedule, label smoothing, summed loss, micro-batches; the ResNet paper's step
schedule; the reference article's Adam + EMA + two-phase recipe) are run

- by TrainStep in eager mode, against a reference loop written the way fastres trained
  before TrainStep (torch's optimizers' own `step()`, learning rates set from Python each
  step, one Newton-Schulz per matrix, `EMA.update`);
- by TrainStep with `run.compile=step` (forward, backward, optimizer, EMA and schedules in
  one `torch.compile(fullgraph=True)` graph per phase), against eager TrainStep.

Why a tolerance and not bit equality: TrainStep takes each learning rate as an fp32 device
tensor and applies `p += g * (-lr)` (torch's own tensor-lr path), where the reference uses a
Python float64 lr in `p.add_(g, alpha=-lr)` (a fused multiply-add on CPU); Adam's bias
corrections are computed on the device (torch's capturable arithmetic) instead of in Python;
Muon stacks same-shape filters into one batched matmul; Inductor reorders and fuses fp32
arithmetic. Each is a last-bit difference per operation; over six steps of these small nets
the eager comparisons stay within 1e-5 relative (RTOL/ATOL leave a factor ~10). Compiled
against eager differs more: Inductor reduces BatchNorm's gradient sums (N*H*W = 8192 terms
per channel) in another order, a ~1e-6 relative difference per sum that six SGD steps at
lr 0.1 on random labels grow to ~1e-4 absolute in the weights (measured: 1.1e-4 at most);
COMPILED_ATOL = 5e-4 allows that, while a wrong learning rate, a lost momentum or EMA term,
or a missed phase switch moves weights by 1e-2 or more.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastres import config as C
from fastres.engine import EMA, TrainStep, build_model, build_optimizers
from fastres.engine.evaluate import autocast_for
from fastres.engine.optim import Muon, zeropower_newton_schulz
from fastres.engine.schedules import lr_factor, phase2_start, total_steps, whiten_bias_factor
from fastres.engine.step import micro_batches, set_bn_frozen
from fastres.errors import ConfigError

STEPS_PER_EPOCH = 2
BATCH = 8
RTOL, ATOL = 1e-4, 1e-6
COMPILED_RTOL, COMPILED_ATOL = 1e-3, 5e-4


def tiny(name: str, **sections) -> C.Config:
    """A preset shrunk to a few steps on 8-image batches, resolved for the CPU."""
    cfg = C.preset(name)
    small = {
        "speedrun": dict(model={"name": "airbench_tiny"}, run={"micro_batch": 4},
                         schedule={"epochs": 3.0}, optim={"whiten_bias_epochs": 1.0}),
        "resnet-paper": dict(model={"name": "resnet8"}, schedule={"steps": 6}),
        "seed": dict(model={"name": "resnet8"},
                     schedule={"epochs": 3.0, "two_phase_epochs": 1.0}),
    }[name]
    cfg = C.replace(cfg, data={"batch_size": BATCH}, **small)
    cfg = C.replace(cfg, run={"progress": "none", "compile": "off", "micro_batch":
                              small.get("run", {}).get("micro_batch", 0)}, **sections)
    return C.resolve(cfg, "cpu")


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(BATCH, 3, 32, 32, generator=g).contiguous(
            memory_format=torch.channels_last)
        out.append((x, torch.randint(0, 10, (BATCH,), generator=g)))
    return out


def fresh_model(cfg: C.Config) -> nn.Module:
    model = build_model(cfg, 10).to(memory_format=torch.channels_last)
    if hasattr(model, "data_init"):
        model.data_init(batches(1, seed=99)[0][0])
    return model


def state(model: nn.Module, ema: EMA | None) -> dict:
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ema is not None:
        out.update({f"ema.{n}": s.clone() for n, s in zip(ema.names, ema.shadow)})
    return out


def assert_states_close(a: dict, b: dict, rtol=RTOL, atol=ATOL) -> None:
    assert a.keys() == b.keys()
    bad = []
    for k in a:
        if a[k].is_floating_point():
            if not torch.allclose(a[k], b[k], rtol=rtol, atol=atol):
                bad.append(f"{k}: max abs diff {(a[k] - b[k]).abs().max().item():.3g}")
        elif not torch.equal(a[k], b[k]):
            bad.append(f"{k}: {a[k]} vs {b[k]}")
    assert not bad, "\n".join(bad)


def run_train_step(cfg: C.Config, data, fullgraph: bool = True) -> tuple[TrainStep, dict]:
    model = fresh_model(cfg)
    step = TrainStep(cfg, model, steps_per_epoch=STEPS_PER_EPOCH, fullgraph=fullgraph)
    for x, y in data:
        step(x, y)
    return step, state(model, step.ema)


def _old_muon_step(opt: Muon) -> None:
    """Muon as fastres ran it before TrainStep: one Newton-Schulz per matrix."""
    for group in opt.param_groups:
        lr, m = group["lr"], group["momentum"]
        for p in group["params"]:
            buf = opt.state[p]["momentum_buffer"]
            buf.mul_(m).add_(p.grad)
            u = p.grad.add(buf, alpha=m) if group["nesterov"] else buf
            p.mul_(len(p) ** 0.5 / p.norm())
            upd = zeropower_newton_schulz(u.reshape(len(u), -1), group["ns_steps"],
                                          dtype=torch.float32)
            p.add_(upd.view_as(p), alpha=-lr)


@torch.no_grad()
def _no_grad_step(opts):
    for opt in opts.optimizers:
        _old_muon_step(opt) if isinstance(opt, Muon) else opt.step()


def run_reference_loop(cfg: C.Config, data) -> dict:
    """The training loop as written before TrainStep (trainer.py at e1f2c94)."""
    o, s = cfg.optim, cfg.schedule
    model = fresh_model(cfg)
    total = total_steps(s, STEPS_PER_EPOCH)
    p2 = phase2_start(s, STEPS_PER_EPOCH)
    whiten_steps = math.ceil(o.whiten_bias_epochs * STEPS_PER_EPOCH)
    ema = EMA(model, o.ema_decay, o.ema_every, o.ema_warmup) if o.ema_decay > 0 else None
    opts = build_optimizers(model, o)
    for step, (x, y) in enumerate(data):
        set_bn_frozen(model, step >= p2)
        factor = lr_factor(step, total, s, p2)
        for g in opts.param_groups:
            f = whiten_bias_factor(step, whiten_steps) if g["role"] == "whiten_bias" else factor
            g["lr"] = 0.0 if (g["role"] == "norm" and step >= p2) else g["base_lr"] * f
        for start, stop in micro_batches(len(y), cfg.run.micro_batch or 0):
            xs, ys = x[start:stop], y[start:stop]
            with autocast_for("cpu", cfg.run.precision):
                loss = F.cross_entropy(model(xs).float(), ys, label_smoothing=o.label_smoothing,
                                       reduction=o.loss_reduction)
            if o.loss_reduction == "mean" and len(ys) != len(y):
                loss = loss * (len(ys) / len(y))
            loss.backward()
        _no_grad_step(opts)
        opts.zero_grad()
        if ema is not None and ema.due(step):
            ema.update(model)
    return state(model, ema)


PRESETS = ["speedrun", "resnet-paper", "seed"]


def test_micro_batches_are_as_equal_as_possible():
    assert micro_batches(2000, 500) == [(0, 500), (500, 1000), (1000, 1500), (1500, 2000)]
    assert micro_batches(512, 500) == [(0, 256), (256, 512)]
    assert micro_batches(32, 12) == [(0, 11), (11, 22), (22, 32)]
    assert micro_batches(8, 0) == micro_batches(8, 8) == micro_batches(8, 100) == [(0, 8)]


@pytest.mark.parametrize("name", PRESETS)
def test_eager_step_matches_the_reference_loop(name):
    cfg = tiny(name)
    data = batches(6)
    _, got = run_train_step(cfg, data)
    assert_states_close(got, run_reference_loop(cfg, data))


def test_micro_batches_phase2_and_ema_are_exercised():
    """The tiny recipes really cover what the comparisons claim to cover."""
    sr, seed = tiny("speedrun"), tiny("seed")
    step, _ = run_train_step(seed, batches(6))
    assert step.phase2 == 4 and step.total == 6 and step.ema.updates == 6
    assert not any(m.training for m in step.model.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm))
    assert sr.run.micro_batch == 4 and sr.optim.name == "muon"
    roles = {g["role"] for g in TrainStep(sr, fresh_model(sr), steps_per_epoch=2)
             .optimizers.param_groups}
    assert "whiten_bias" in roles and "filter" in roles


def test_schedules_are_device_tables_indexed_by_the_step():
    cfg = tiny("seed")
    step = TrainStep(cfg, fresh_model(cfg), steps_per_epoch=STEPS_PER_EPOCH)
    norm = [g.index for g in step.optimizers.groups if g.group["role"] == "norm"]
    for t in range(step.total):
        f = lr_factor(t, step.total, cfg.schedule, step.phase2)
        for g in step.optimizers.groups:
            want = 0.0 if (g.index in norm and t >= step.phase2) else g.group["base_lr"] * f
            assert step.tables.lr[g.index, t].item() == pytest.approx(want, rel=1e-7)
        assert step.tables.ema_decay[t].item() == pytest.approx(step.ema.decay_at(t), rel=1e-7)


def test_state_dict_round_trip_continues_exactly():
    cfg = tiny("speedrun")
    data = batches(6)
    step, whole = run_train_step(cfg, data)
    model = fresh_model(cfg)
    a = TrainStep(cfg, model, steps_per_epoch=STEPS_PER_EPOCH)
    for x, y in data[:3]:
        a(x, y)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = a.state_dict()
    model2 = fresh_model(cfg)
    b = TrainStep(cfg, model2, steps_per_epoch=STEPS_PER_EPOCH)
    held = [t for g in b.optimizers.groups for vs in g.state.values() for t in vs]
    model2.load_state_dict(saved_model)
    b.load_state_dict(saved)
    assert all(t is u for t, u in zip(held, [t for g in b.optimizers.groups for vs in g.state.values()
                                             for t in vs])), "state must load in place"
    for x, y in data[3:]:
        b(x, y)
    assert_states_close(whole, state(model2, b.ema), rtol=0, atol=0)


def test_rehearsal_restores_everything():
    cfg = tiny("seed")
    model = fresh_model(cfg)
    step = TrainStep(cfg, model, steps_per_epoch=STEPS_PER_EPOCH)
    x, y = batches(1)[0]
    step(x, y)
    before = state(model, step.ema)
    step.warm_up(x, y, steps=3)
    assert step.step == 1
    assert_states_close(before, state(model, step.ema), rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["foreach", "triton"])
def test_a_warmed_up_run_trains_as_one_that_was_not(impl):
    """A warm-up (every GPU run has one) restores the optimizers' state through torch's
    `load_state_dict`, which replaces the param-group dicts. The Triton SGD takes each
    step's learning rate through its group dict: before the dicts kept their identity, a
    warmed-up run trained at the first step's rate for good (0.1 where the schedule said
    0.09, 0.08, ...). Same weights to the bit with and without the warm-up."""
    cfg = tiny("resnet-paper", optim={"impl": impl, "ema_decay": 0.9},
               schedule={"lr_schedule": "linear", "final_factor": 0.0})
    data = batches(4)
    runs = []
    for warm in (False, True):
        model = fresh_model(cfg)
        step = TrainStep(cfg, model, steps_per_epoch=STEPS_PER_EPOCH)
        groups = list(step.optimizers.optimizers[0].param_groups)
        if warm:
            step.warm_up(*data[0], steps=2)
        assert all(a is b for a, b in zip(groups, step.optimizers.optimizers[0].param_groups))
        for x, y in data:
            step(x, y)
        runs.append(state(model, step.ema))
    assert_states_close(*runs, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["foreach", "triton"])
def test_fp16_loss_scaler_skips_non_finite_steps(impl):
    """fp16 autocast with the device-side loss scaler (CPU autocast supports fp16): a step
    whose gradients overflow changes nothing, is counted, and the scale backs off. The
    Triton SGD keeps its momentum buffers and EMA itself: it gets found_inf and writes
    nothing (before, they took the overflow and the next step made the weights NaN)."""
    cfg = tiny("resnet-paper", optim={"impl": impl, "ema_decay": 0.9})
    cfg = C.Config(**{**{f: getattr(cfg, f) for f in ("data", "model", "optim", "schedule")},
                      "run": C.replace(cfg, run={"precision": "fp16"}).run})
    model = fresh_model(cfg)
    step = TrainStep(cfg, model, steps_per_epoch=STEPS_PER_EPOCH)
    x, y = batches(1)[0]
    step(x, y)
    assert step.scaler.scale.item() == 2.0 ** 16
    before = state(model, None)
    step.scaler.scale.fill_(3e38)  # the scaled loss overflows: every gradient is inf/NaN
    step(x, y)
    after = state(model, None)
    for k in before:  # BatchNorm statistics move in the forward pass, as with GradScaler
        if "num_batches_tracked" not in k and "running" not in k:
            assert torch.equal(before[k], after[k]), k
    assert step.epoch_totals().skipped == 1
    assert step.scaler.scale.item() == pytest.approx(1.5e38)  # backed off by 0.5
    opt_state = step.optimizers.optimizers[0].state
    assert all(torch.isfinite(v["momentum_buffer"]).all() for v in opt_state.values())
    assert all(torch.isfinite(v).all() for v in state(model, step.ema).values())
    step.scaler.scale.fill_(2.0 ** 16)
    step(x, y)
    assert all(torch.isfinite(v).all() for v in state(model, step.ema).values())


# --------------------------------------------------------------------------- compile=step

def _cache_entries(fn) -> int:
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__))


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESETS)
def test_compiled_step_is_one_graph_without_recompiles(name):
    """compile=step with fullgraph=True (a graph break would raise): 0 breaks; the
    learning rate changes at every step of these schedules and the seed recipe crosses into
    phase 2, yet after the first call of each phase function nothing recompiles; the
    weights equal eager's within the fp32 tolerance."""
    torch._dynamo.reset()
    eager = tiny(name)
    cfg = C.replace(eager, run={"compile": "step"})
    data = batches(6)
    step, got = run_train_step(cfg, data)
    _, want = run_train_step(eager, data)
    assert_states_close(got, want, rtol=COMPILED_RTOL, atol=COMPILED_ATOL)
    phases = [TrainStep._phase1_step] + ([TrainStep._phase2_step] if step.phase2 < step.total
                                         else [])
    assert [_cache_entries(f) for f in phases] == [1] * len(phases)
    # Another run (a new TrainStep and model, as each run of `fastres speedrun` builds)
    # finds the graphs compiled: nothing the step reads is guarded by object identity.
    run_train_step(cfg, data[:1])
    assert [_cache_entries(f) for f in phases] == [1] * len(phases)
    if name == "seed":
        assert step.phase2 < step.total  # the phase-2 switch happened inside the 6 steps


def test_compile_step_refusals():
    cfg = C.replace(tiny("resnet-paper"), run={"compile": "step"}, optim={"impl": "triton"})
    with pytest.raises(ConfigError, match="impl=triton"):
        TrainStep(cfg, fresh_model(cfg), steps_per_epoch=2)
    with pytest.raises(ConfigError, match="resolved config"):
        TrainStep(C.preset("smoke"), nn.Linear(2, 2), steps_per_epoch=2)
