"""The training engine on small synthetic problems (CPU)."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastres import config as C
from fastres.engine import EMA, Muon, build_optimizers, evaluate, param_roles, train, tta_logits
from fastres.engine.optim import zeropower_newton_schulz
from fastres.engine.records import load_checkpoint, read_metrics, save_checkpoint
from fastres.engine.trainer import Interrupted
from fastres.errors import CheckpointError, ConfigError, TrainingDiverged
from fastres.norm_act import BatchNormAct2d


class ToyLoader:
    """A Loader-protocol stand-in: a fixed learnable data set, shuffled by (seed, epoch)."""

    def __init__(self, x, y, batch_size, train=True, seed=0):
        self.x, self.y, self.batch_size, self.train, self.seed = x, y, batch_size, train, seed
        self.epoch = 0
        self.num_examples = len(y)

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def sample(self, n):
        return self.x[:n]

    def __iter__(self):
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(len(self.y), generator=g)
        else:
            order = torch.arange(len(self.y))
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.x[idx].contiguous(memory_format=torch.channels_last), self.y[idx]


def toy_data(n=256, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    # Class c brightens channel c % 3 (classes 3.. darken it): learnable in a few steps.
    sign = torch.where(y < 3, 1.5, -1.5).view(-1, 1, 1)
    x[torch.arange(n), y % 3] += sign
    return x, y


class ToyNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(8, act="relu")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.pool(self.bn(self.conv(x))).flatten(1))


def toy_cfg(tmp_path=None, **sections):
    cfg = C.preset("smoke")
    cfg = C.replace(cfg, data={"batch_size": 32},
                    optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
                           "weight_decay": 5e-4},
                    schedule={"epochs": 4.0, "lr_schedule": "linear", "final_factor": 0.1},
                    run={"out_dir": str(tmp_path) if tmp_path else "", "progress": "none",
                         "eval_every": 1.0, "target_acc": 0.5})
    cfg = C.replace(cfg, **sections)
    return C.resolve(cfg, "cpu")


def run(cfg, seed=0, n=256, resume=None, model=None, **kw):
    torch.manual_seed(seed)
    model = model or ToyNet()
    x, y = toy_data(n)
    xt, yt = toy_data(128, seed=1)
    loaders = (ToyLoader(x, y, cfg.data.batch_size, seed=cfg.run.seed),
               ToyLoader(xt, yt, 64, train=False))
    return train(cfg, model, loaders, resume=resume, **kw)


def test_one_run_learns_and_records(tmp_path):
    res = run(toy_cfg(tmp_path))
    losses = [m["train_loss"] for m in res.epochs]
    assert len(res.epochs) == 4 and losses[-1] < losses[0]
    assert res.final["top1"] > 0.8 and 0 < res.final["top5"] <= 1.0
    assert res.final["steps"] == 4 * (256 // 32)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["optim"]["lr"] == 0.05 and cfg["run"]["device"] == "cpu"
    env = json.loads((tmp_path / "env.json").read_text())
    assert {"torch", "git_sha", "device", "world_size"} <= set(env)
    metrics = read_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert "test_top1" in metrics[0] and metrics[-1]["img_per_s"] > 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["top1"] == res.final["top1"] and result["timed_s"] > 0
    assert result["gc_pauses"]["collections"] == sum(result["gc_pauses"]["by_generation"])
    assert (tmp_path / "checkpoints" / "last.pt").exists()


def test_stop_at_step_runs_the_full_schedule_stopped_early(tmp_path):
    """A warm-up run: the first k steps of the full-length schedule (the same learning
    rates, the same compiled step), then the final evaluations; no records."""
    full = run(toy_cfg())
    short = run(toy_cfg(), stop_at_step=11)
    assert short.final["steps"] == 11 and short.final["tta_top1"] is None
    assert [m["epoch_steps"] for m in short.epochs] == [8, 3]
    assert short.epochs[0]["lr_factor"] == full.epochs[0]["lr_factor"]  # not a shorter schedule
    assert short.epochs[0]["train_loss"] == full.epochs[0]["train_loss"]
    assert run(toy_cfg(), stop_at_step=10_000).final["steps"] == 32  # the schedule's end
    with pytest.raises(ConfigError, match="keeps no records"):
        run(toy_cfg(tmp_path), stop_at_step=2)
    with pytest.raises(ConfigError, match=">= 1"):
        run(toy_cfg(), stop_at_step=0)
    assert not any(tmp_path.iterdir())


def test_an_epoch_of_fewer_steps_says_so(capsys):
    """After a mid-epoch resume (or in a fractional last epoch) the epoch line's loss and
    accuracy cover fewer steps: the line says how many."""
    run(toy_cfg(run={"progress": "plain", "eval_every": 0.0}), stop_at_step=11)
    printed = capsys.readouterr()
    lines = [l for l in (printed.out + printed.err).splitlines() if l.startswith("epoch ")]
    assert lines[0].startswith("epoch 1/2  loss") and lines[1].startswith(
        "epoch 2/2 (3 of 8 steps)  loss"), lines


def test_an_error_inside_an_epoch_leaves_no_gc_counter_behind():
    import gc

    class Broken(ToyLoader):
        def __iter__(self):
            it = super().__iter__()
            yield next(it)
            raise RuntimeError("the loader broke")

    before = list(gc.callbacks)
    x, y = toy_data(256)
    xt, yt = toy_data(128, seed=1)
    with pytest.raises(RuntimeError, match="the loader broke"):
        train(toy_cfg(), ToyNet(), (Broken(x, y, 32), ToyLoader(xt, yt, 64, train=False)))
    assert gc.callbacks == before


def test_resume_equals_uninterrupted(tmp_path):
    full = run(toy_cfg(tmp_path / "full"))
    part_cfg = toy_cfg(tmp_path / "part", run={"checkpoint_every": 1})
    # Interrupt after two epochs by raising from the epoch callback; the checkpoint of
    # epoch 2 is on disk.
    class Stop(Exception):
        pass

    def stop_after_two(m):
        if m["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run(part_cfg, on_epoch=stop_after_two)
    state = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert state["epoch"] == 2 and state["step"] == 16
    resumed = run(part_cfg, resume=state)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [m["epoch"] for m in read_metrics(tmp_path / "part")] == [1, 2, 3, 4]


class SignalAt(ToyLoader):
    """Sends SIGTERM as it hands out its `at`-th batch (counted over all epochs)."""

    def __init__(self, *args, at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.handed = at, 0

    def __iter__(self):
        for batch in super().__iter__():
            self.handed += 1
            if self.handed == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def stopped_at(cfg, at: int):
    """Train with a SIGTERM during step `at`; the checkpoint it leaves."""
    torch.manual_seed(0)
    x, y = toy_data(256)
    xt, yt = toy_data(128, seed=1)
    loaders = (SignalAt(x, y, cfg.data.batch_size, seed=cfg.run.seed, at=at),
               ToyLoader(xt, yt, 64, train=False))
    with pytest.raises(Interrupted, match="continue with --resume"):
        train(cfg, ToyNet(), loaders, handle_signals=True)
    return load_checkpoint(Path(cfg.run.out_dir) / "checkpoints" / "last.pt")


@pytest.mark.parametrize("at, epoch, epoch_step", [(10, 1, 2), (8, 1, 0)])
def test_sigterm_checkpoints_and_resumes_exactly(tmp_path, at, epoch, epoch_step):
    """Mid-epoch (step 10: two steps into epoch 2), or on an epoch's last step (step 8),
    where the epoch is finished and recorded first: its metrics row and evaluation were
    lost before (the resume started at the next epoch)."""
    cfg = toy_cfg(tmp_path / "part")
    full = run(toy_cfg(tmp_path / "full"))
    state = stopped_at(cfg, at)
    assert (state["step"], state["epoch"], state["epoch_step"]) == (at, epoch, epoch_step)
    resumed = run(cfg, resume=state)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    epochs = [m["epoch"] for m in read_metrics(tmp_path / "part") if "train_loss" in m]
    assert epochs == [1, 2, 3, 4]
    assert all("test_top1" in m for m in read_metrics(tmp_path / "part")
               if m.get("epoch") in (1, 2, 3))


def test_a_second_signal_stops_at_once_and_says_what_is_kept(tmp_path):
    """The first signal asks for a checkpoint at the next step; a second one (Ctrl-C
    twice) stops at once, saying which checkpoint stays and what --resume will do."""
    cfg = toy_cfg(tmp_path, run={"checkpoint_every": 1})

    def twice(m):
        if m["epoch"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match=r"stopped at once by a second signal, before this "
                       r"step's checkpoint; the last good checkpoint \(step 16\) is kept in "
                       r".*last.pt; --resume continues from it"):
        run(cfg, on_epoch=twice, handle_signals=True)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 16


def test_resume_rejects_a_different_config(tmp_path):
    run(toy_cfg(tmp_path))
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(CheckpointError, match="optim.lr: checkpoint 0.05 vs now 0.1"):
        run(toy_cfg(tmp_path, optim={"lr": 0.1}), resume=state)
    state["world_size"] = 2
    with pytest.raises(CheckpointError, match="written by 2 process"):
        run(toy_cfg(tmp_path), resume=state)


def test_checkpoints_are_atomic_and_errors_are_clear(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})
    assert load_checkpoint(path)["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastres checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_nan_loss_stops_with_the_step():
    cfg = toy_cfg(optim={"lr": 1e30, "weight_decay": 0.0})
    with pytest.raises(TrainingDiverged, match=r"at step \d+ \(epoch 1\)"):
        run(cfg)


def test_two_phase_freezes_batchnorm():
    cfg = toy_cfg(schedule={"epochs": 4.0, "two_phase_epochs": 2.0, "lr_schedule": "constant"})
    seen = {}

    class Spy(ToyNet):
        def forward(self, x):
            if self is model:  # not the copy the FLOP count runs on
                seen.setdefault(self.bn.training, []).append(
                    (self.bn.weight.detach().clone(), self.bn.running_mean.clone()))
            return super().forward(x)

    model = Spy()
    run(cfg, model=model)
    # Phase 2 (steps 16..31) runs BN in eval mode: running stats and affine stay fixed.
    frozen = [s for s in seen[False] if True]
    train_mode = seen[True]
    assert len(train_mode) == 16
    w0, m0 = frozen[0]
    phase2 = frozen[-16:]
    assert all(torch.equal(w, phase2[0][0]) for w, _ in phase2)
    assert all(torch.equal(m, phase2[0][1]) for _, m in phase2)
    assert not torch.equal(train_mode[0][1], train_mode[-1][1])


def test_ema_math():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.9, warmup=False)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    assert torch.allclose(ema.shadow[0], 0.9 * w0 + 0.1 * (w0 + 1.0))
    with ema.swapped(net):
        assert torch.allclose(net.weight, ema.shadow[0])
    assert torch.allclose(net.weight, w0 + 1.0)
    warm = EMA(net, decay=0.999)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)


def test_ema_run_evaluates_averaged_weights(tmp_path):
    cfg = toy_cfg(tmp_path, optim={"ema_decay": 0.9})
    res = run(cfg)
    assert res.final["eval_weights"] == "ema"
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert state["ema"]["updates"] == res.final["steps"]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "muon"])
def test_optimizers_learn(name):
    optim = {"name": name, "lr": 0.05 if name in ("sgd", "muon") else 3e-3}
    if name == "muon":
        optim.update(muon_lr=0.05, nesterov=True)
    res = run(toy_cfg(optim=optim, schedule={"epochs": 3.0}))
    assert res.epochs[-1]["train_loss"] < res.epochs[0]["train_loss"]


def test_param_roles_and_groups():
    net = ToyNet()
    roles = param_roles(net)
    assert roles == {"conv.weight": "filter", "bn.weight": "norm", "bn.bias": "norm",
                     "fc.weight": "head", "fc.bias": "head"}
    o = C.OptimConfig(lr=0.1, weight_decay=1e-3, bias_lr_scale=2.0, head_lr_scale=3.0,
                      impl="foreach")
    groups = {g["role"]: g for g in build_optimizers(net, o).param_groups}
    assert groups["norm"]["lr"] == pytest.approx(0.2) and groups["norm"]["weight_decay"] == 0
    assert groups["head"]["lr"] == pytest.approx(0.3)
    assert groups["filter"]["weight_decay"] == 1e-3
    o2 = C.OptimConfig(lr=0.1, weight_decay=1e-3, decoupled_wd=True, decay_norm_and_bias=True,
                       impl="foreach")
    g2 = {g["role"]: g for g in build_optimizers(net, o2).param_groups}
    assert g2["filter"]["weight_decay"] == pytest.approx(1e-2)  # wd / lr


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    g = torch.randn(16, 72)
    x = zeropower_newton_schulz(g, steps=5, dtype=torch.float32)
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.5 and s.max() < 1.5
    muon = Muon([nn.Parameter(torch.randn(8, 4, 3, 3))], lr=0.1)
    p = muon.param_groups[0]["params"][0]
    p.grad = torch.randn_like(p)
    muon.step()
    assert p.norm().item() == pytest.approx(8 ** 0.5, rel=0.2)


def test_newton_schulz_takes_its_coefficients():
    torch.manual_seed(1)
    g = torch.randn(3, 8, 20, dtype=torch.float64)
    a, b, c = 3.4576, -4.7391, 2.0843
    x = g / (torch.linalg.vector_norm(g, dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(2):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    got = zeropower_newton_schulz(g, steps=2, dtype=torch.float64, coefficients=(a, b, c))
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)
    assert not torch.allclose(got, zeropower_newton_schulz(g, steps=2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(a, b, c\)"):
        Muon([nn.Parameter(torch.randn(4, 2, 3, 3))], ns_coefficients=(3.4, -4.7))
    o = C.OptimConfig(name="muon", impl="foreach", muon_ns_coefficients=(3.5, -4.8, 2.0))
    opts = build_optimizers(ToyNet(), o)
    assert [opt.ns_coefficients for opt in opts.optimizers if isinstance(opt, Muon)] == \
        [(3.5, -4.8, 2.0)]


def test_tta_views():
    class Left(nn.Module):  # logit 0 = mean of the left half, logit 1 = right half
        def forward(self, x):
            return torch.stack([x[..., :4].mean((1, 2, 3)), x[..., 4:].mean((1, 2, 3))], 1)

    x = torch.randn(2, 3, 8, 8)
    flip = tta_logits(Left(), x, "flip")
    both = x.mean((1, 2, 3))
    assert torch.allclose(flip[:, 0], flip[:, 1]) and torch.allclose(flip[:, 0], both, atol=1e-6)
    ft = tta_logits(Left(), x, "flip_translate")
    assert ft.shape == (2, 2) and torch.allclose(ft[:, 0], ft[:, 1], atol=1e-6)


def test_tta_fraction_gives_the_views_to_the_least_confident_only():
    class Counting(nn.Module):  # a per-image net that counts the images it sees
        def __init__(self):
            super().__init__()
            self.seen = 0
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(),
                                     nn.Linear(4 * 8 * 8, 10))

        def forward(self, x):
            self.seen += len(x)
            return self.net(x)

    torch.manual_seed(0)
    model, x = Counting().eval(), torch.randn(20, 3, 8, 8)
    with torch.no_grad():
        plain = tta_logits(model, x, "none")
        full = tta_logits(model, x, "flip_translate")
        model.seen = 0
        part = tta_logits(model, x, "flip_translate", fraction=0.25)
        assert model.seen == 20 + 5 * 5  # the plain view once, 5 more views for 5 images
        assert torch.equal(tta_logits(model, x, "flip_translate", fraction=1.0), full)
        assert torch.equal(tta_logits(model, x, "flip", fraction=0.0), plain)
    least = plain.softmax(1).amax(1).argsort()[:5]
    picked = torch.zeros(20, dtype=torch.bool)
    picked[least] = True
    assert torch.allclose(part[picked], full[picked], atol=1e-6)
    assert torch.equal(part[~picked], plain[~picked])
    with pytest.raises(ValueError, match="tta fraction"):
        tta_logits(model, x, "flip", fraction=1.5)
    # evaluate() takes it per batch; the fraction left out means every image
    loader = [(x[:10], torch.zeros(10, dtype=torch.long)), (x[10:], torch.ones(10, dtype=torch.long))]
    some = evaluate(model, loader, "flip_translate", tta_fraction=0.25)
    all_ = evaluate(model, loader, "flip_translate")
    expect = (full.argmax(1) == torch.tensor([0] * 10 + [1] * 10)).float().mean().item()
    assert all_["top1"] == pytest.approx(expect) and some["n"] == 20


def test_evaluate_counts_top1_top5():
    class Fixed(nn.Module):
        def forward(self, x):
            logits = -torch.arange(10.0).repeat(len(x), 1)  # ranks 3, 7, 0, 1, 2, ...
            logits[:, 3] = 2.0
            logits[:, 7] = 1.0
            return logits

    y = torch.tensor([3, 7, 1, 9])
    loader = [(torch.zeros(4, 3, 2, 2), y)]
    res = evaluate(Fixed(), loader)
    assert res["top1"] == 0.25 and res["top5"] == 0.75 and res["n"] == 4


def test_train_needs_a_resolved_config():
    with pytest.raises(ConfigError, match="resolved config"):
        run(C.preset("smoke"))


def test_batch_larger_than_data_is_a_clear_error():
    with pytest.raises(ConfigError, match="smaller than one batch"):
        run(toy_cfg(data={"batch_size": 512}))


class NoBN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_micro_batches_accumulate_to_the_whole_batch(reduction):
    lr = 0.05 if reduction == "mean" else 0.05 / 32
    torch.manual_seed(0)
    whole = run(toy_cfg(run={"micro_batch": 0}, optim={"loss_reduction": reduction, "lr": lr}),
                model=NoBN())
    torch.manual_seed(0)
    split = run(toy_cfg(run={"micro_batch": 12}, optim={"loss_reduction": reduction, "lr": lr}),
                model=NoBN())  # 11 + 11 + 10 per batch of 32
    for a, b in zip(whole.model.state_dict().values(), split.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert whole.epochs[-1]["train_loss"] == pytest.approx(split.epochs[-1]["train_loss"],
                                                           rel=1e-5)


def test_cpu_resolves_micro_batches():
    assert C.resolve(C.preset("speedrun"), "cpu").run.micro_batch == 500
    assert C.resolve(C.preset("speedrun"), "cuda").run.micro_batch == 0


def test_triton_sgd_with_ema_matches_torch_sgd_with_ema():
    ref = run(toy_cfg(optim={"ema_decay": 0.9, "impl": "foreach"}))
    tri = run(toy_cfg(optim={"ema_decay": 0.9, "impl": "triton"}))
    for a, b in zip(ref.model.state_dict().values(), tri.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(ref.ema.shadow, tri.ema.shadow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# A child process: the flags are process-wide, and the thread pool must exist before the call.
_FLUSH_CHILD = r"""
import torch
from fastres import config as C
from fastres.engine import Session, build_loaders, build_model, denormals_flushed, flush_denormals
from fastres.testing import synthetic

if not torch.set_flush_denormal(False):
    raise SystemExit("no flush-to-zero mode")
torch.set_num_threads(2)
(torch.randn(256, 256) @ torch.randn(256, 256)).sum()   # the pool's threads exist already
assert not denormals_flushed()
torch.set_flush_denormal(True)   # torch's own call reaches the calling thread only
main_only = denormals_flushed()
assert flush_denormals(True) and denormals_flushed()
assert flush_denormals(False) and not denormals_flushed()
for flush in (True, False):
    cfg = C.resolve(C.replace(C.preset("smoke"), run={"flush_denormal": flush}), "cpu")
    train_loader, _ = build_loaders(cfg, synthetic(256, 64))
    Session(cfg, build_model(cfg, num_classes=10), train_loader)
    assert denormals_flushed() == flush, flush
print("main thread only:", main_only)
"""


def test_a_cpu_session_flushes_subnormals_in_every_thread():
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", _FLUSH_CHILD], capture_output=True, text=True,
                          env=env, timeout=300)
    if "no flush-to-zero mode" in done.stderr:
        pytest.skip("this CPU has no flush-to-zero mode")
    assert done.returncode == 0, done.stderr[-3000:]
    # torch.set_flush_denormal alone leaves the pool's other thread computing subnormals
    assert "main thread only: False" in done.stdout
