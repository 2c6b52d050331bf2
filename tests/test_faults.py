"""Faults a careful user runs into, one test per item of issue 12 (numbered as there), then
one or more per item of issue 23 (`test_23_*`, the items named in each docstring).

What is checked: the run directory is the user's data (locked while used, never replaced
without --resume or --overwrite, unchanged by a refused command, validated before any data
is read), no checkpoint holds a non-finite state, JSON is strict, every fault ends in one
line (exit 2, or 130 for a signal, 1 for a dead DDP peer), and evaluations show progress.
Issue 23: every tool's output folder and file is under the same contract; a checkpoint is
checked for NaN/inf when loaded; last.pt and last.json never disagree and a kill's temporary
files go at the next start; a resume keeps the record's history; library writers never
replace data; typos, resumes and a batch larger than the data each say one clear line.
Signals and second processes are real (subprocesses); everything else calls the CLI in
process. Smoke scale: resnet8 on 128 synthetic images written in the real CIFAR-10 format.
Timings are never asserted.
"""
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastres import config as C
from fastres.engine import rundir
from fastres.engine.evaluate import evaluate
from fastres.engine.progress import EvalProgress
from fastres.engine.records import (FiniteGuard, RunRecorder, load_checkpoint, load_state_dict_checked, named_tensors,
                                    nonfinite, save_checkpoint, strict_dumps)
from fastres.errors import CheckpointError, ConfigError, RunDirError, TrainingDiverged
from fastres.testing import synthetic_dir
from fastres.tools.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
MISSING_DATA = "/nonexistent/fastres-data"  # a run that got this far would fail on it


# --------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return synthetic_dir(tmp_path_factory.mktemp("cifar"), 128, 128)


def smoke(data_dir: str, out, *extra: str) -> list[str]:
    """`fastres train` at smoke scale: 128 train / 64 test images, batch 32, one epoch."""
    return ["train", "--preset", "smoke", "--data-dir", str(data_dir), "--out", str(out),
            "--set", "data.train_limit=128", "--set", "data.test_limit=64",
            "--set", "data.batch_size=32", "--set", "data.eval_batch_size=64",
            "--set", "run.progress=plain", "--epochs", "1", *extra]


def cli(capsys, argv) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_line(err: str, tool: str = "train") -> str:
    """The one error line a fault must produce (warnings about the synthetic data aside)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"fastres {tool}"), lines[0]
    return lines[0]


def snapshot(path: Path) -> dict:
    """Every file under `path` (hidden ones too): content hash and mtime."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name} in {path}")

    return [json.loads(line, parse_constant=refuse)
            for line in path.read_text().splitlines() if line.strip()]


def finite_checkpoint(path: Path) -> dict:
    state = load_checkpoint(path)
    n, bad = nonfinite(named_tensors({k: v for k, v in state.items()
                                      if k not in ("rng", "config", "epochs")}))
    assert n > 0 and not bad, f"{path} holds non-finite tensors: {bad[:5]}"
    return state


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """One finished smoke run (in process) and what it printed."""
    out = tmp_path_factory.mktemp("finished") / "run"
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = cli_main(smoke(data_dir, out))
    assert rc == 0, buf_err.getvalue()[-3000:]
    return out, buf_out.getvalue() + buf_err.getvalue()


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def test_a_run_names_its_data_and_the_limits_it_trains_on(finished):
    """The data line says what was read and what the run used of it (a 128-image run on a
    256-image set must not read as a run on all of it)."""
    _, printed = finished
    line = next(x for x in printed.splitlines() if x.startswith("data cifar10 "))
    assert "NOT official" in line and line.endswith("limits train 128, test 64"), line
    from fastres.data import describe  # a limit above the data's size limits nothing
    assert describe({"train_size": 256, "test_size": 128}, 1024, 64).endswith(
        "limits train all, test 64")


def wait_for(predicate, proc, timeout: float = 240.0) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- 1

@pytest.mark.slow
def test_01_signal_in_the_final_evaluation_resumes_into_evaluation_only(data_dir, tmp_path,
                                                                        capsys):
    """The end of training is checkpointed before the final evaluation, signals stay handled
    through it, and --resume then runs the evaluation only."""
    out = tmp_path / "run"
    # All 128 test images with 6-view TTA: a final evaluation long enough to interrupt.
    argv = smoke(data_dir, out, "--set", "run.tta=flip_translate", "--set",
                 "data.test_limit=0", "--set", "data.eval_batch_size=16")
    proc = subprocess.Popen([sys.executable, "-m", "fastres", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    info = out / "checkpoints" / "last.json"
    in_eval = wait_for(lambda: (read_json(info) or {}).get("stage") == "final_eval", proc)
    if in_eval:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert in_eval, ("the run reached its final evaluation without a checkpoint of stage "
                     "'final_eval' (checkpoints/last.json): " + (stdout + stderr)[-2000:])
    assert proc.returncode == 130, (stdout + stderr)[-3000:]
    line = error_line(stderr)
    assert "--resume" in line and "final evaluation" in line, line
    assert not (out / "result.json").exists()
    state = finite_checkpoint(out / "checkpoints" / "last.pt")
    assert state["stage"] == "final_eval" and state["step"] == 4
    epochs_before = strict_json_lines(out / "metrics.jsonl")

    rc, printed, err = cli(capsys, [*argv, "--resume"])
    assert rc == 0, err[-3000:]
    assert "epoch 1/1" not in printed          # no training, evaluation only
    assert strict_json_lines(out / "metrics.jsonl") == epochs_before
    result = read_json(out / "result.json")
    assert result["steps"] == 4 and result["tta_top1"] is not None


# --------------------------------------------------------------------------- 2

SELF_SIGNAL = '''"""`fastres ARGV...` that sends itself SIGNAL at its Nth training forward pass:
`python self_signal.py SIGNAL N RANK ARGV...` (RANK: only that torchrun rank, or "any")."""
import os, signal, sys
import fastres.models as M

SIGNAL, KILL_AT, RANK = getattr(signal, sys.argv[1]), int(sys.argv[2]), sys.argv[3]
_create = M.create_model


def create_model(*a, **k):
    model = _create(*a, **k)
    calls = [0]

    def hook(module, inputs, output):
        if module.training:
            calls[0] += 1
            if calls[0] == KILL_AT:
                os.kill(os.getpid(), SIGNAL)

    model.register_forward_hook(hook)
    return model


if RANK in ("any", os.environ.get("RANK")):
    M.create_model = create_model
from fastres.tools.cli import main
sys.exit(main(sys.argv[4:]))
'''


@pytest.mark.slow
def test_02_nan_then_sigterm_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    """Epoch 1 (steps 0-3) is finite and checkpointed; the LR then jumps 1e30-fold, the loss
    turns NaN at step 5, and SIGTERM arrives at step 5, mid-epoch 2."""
    script = tmp_path / "self_signal.py"
    script.write_text(SELF_SIGNAL)
    out = tmp_path / "run"
    argv = smoke(data_dir, out, "--epochs", "2", "--set", "run.checkpoint_every=1",
                 "--set", "schedule.lr_schedule=step", "--set", "schedule.milestones=(0.5,)",
                 "--set", "schedule.gamma=1e30", "--set", "run.eval_every=0")
    proc = subprocess.run([sys.executable, str(script), "SIGTERM", "6", "any", *argv], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    line = error_line(proc.stderr)
    assert "NaN or infinite" in line and "step 4" in line, line   # the checkpoint kept
    assert "continue with --resume" not in line
    state = finite_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == 4
    assert read_json(out / "checkpoints" / "last.json")["step"] == 4
    strict_json_lines(out / "metrics.jsonl")


# --------------------------------------------------------------------------- 3

@pytest.mark.slow
def test_03_parameters_and_buffers_are_checked_not_only_the_loss(data_dir, tmp_path, capsys):
    """An LR growing 3000x over the run: the loss stays finite, BatchNorm's running_var
    does not. The run must not end "done", and no checkpoint may hold the inf."""
    out = tmp_path / "grow"
    rc, printed, err = cli(capsys, smoke(data_dir, out, "--epochs", "2", "--set",
                                         "optim.lr=10", "--set", "schedule.final_factor=3000",
                                         "--set", "run.checkpoint_every=1", "--set",
                                         "run.eval_every=0"))
    assert rc == 2, (printed + err)[-3000:]
    line = error_line(err)
    assert "NaN or infinite" in line and "running_var" in line, line
    assert "done:" not in printed and not (out / "result.json").exists()
    if (out / "checkpoints" / "last.pt").exists():
        finite_checkpoint(out / "checkpoints" / "last.pt")
    strict_json_lines(out / "metrics.jsonl")

    # optim.lr=1e6: running_var is already inf at the end of epoch 1, where the periodic
    # checkpoint falls: it must not be written as the "last good" one.
    out = tmp_path / "huge"
    rc, printed, err = cli(capsys, smoke(data_dir, out, "--epochs", "2", "--set",
                                         "optim.lr=1e6", "--set", "run.checkpoint_every=1",
                                         "--set", "run.eval_every=0"))
    assert rc == 2, (printed + err)[-3000:]
    assert "NaN or infinite" in error_line(err)
    if (out / "checkpoints" / "last.pt").exists():
        finite_checkpoint(out / "checkpoints" / "last.pt")


def test_03_finite_guard_names_the_tensors_and_the_kept_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    rec = RunRecorder(tmp_path / "run")
    rec.start({"run": {}}, {})
    rec.checkpoint({"model": model.state_dict(), "step": 8, "epoch": 1})
    guard = FiniteGuard(model, recorder=rec, start_step=8)
    guard.check(12)
    assert guard.last_good == 12
    model[1].running_var[2] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"between step 12 and step 16 \(1 of 6 "
                                                r"tensors: 1.running_var\).*step 8"):
        guard.check(16)
    with pytest.raises(TrainingDiverged, match="not checkpointing"):
        rec.checkpoint({"model": model.state_dict(), "step": 16, "epoch": 2})
    assert load_checkpoint(rec.checkpoint_path)["step"] == 8
    rec.close()


# --------------------------------------------------------------------------- 4

def test_04_records_are_strict_json(tmp_path):
    rec = RunRecorder(tmp_path / "run")
    rec.start({"run": {}}, {"peak": float("inf")})
    rec.log({"step": 1, "train_loss": float("nan"), "img_per_s": 3.0,
             "extra": {"loss": float("-inf")}})
    rec.log({"step": 2, "train_loss": 1.5})
    rows = strict_json_lines(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["train_loss"] is None and rows[0]["extra"]["loss"] is None
    assert rows[0]["nonfinite"] == ["train_loss", "extra.loss"]
    assert rows[1] == {"step": 2, "train_loss": 1.5}
    env = json.loads((tmp_path / "run" / "env.json").read_text(),
                     parse_constant=lambda c: pytest.fail(c))
    assert env == {"peak": None, "nonfinite": ["peak"]}
    rec.finish({"top1": torch.tensor(float("nan")), "tta_top1": None})
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result == {"top1": None, "tta_top1": None, "nonfinite": ["top1"]}
    assert json.loads(strict_dumps([1.0, float("nan")])) == [1.0, None]


# --------------------------------------------------------------------------- 5

@pytest.mark.slow
def test_05_a_second_run_into_a_used_directory_is_refused(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = smoke(data_dir, out)
    first = subprocess.Popen([sys.executable, "-m", "fastres", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    locked = wait_for(lambda: (read_json(out / rundir.LOCK_NAME) or {}).get("pid")
                      == first.pid, first)
    assert locked, first.communicate()[1][-3000:]
    for extra in ([], ["--resume"], ["--overwrite"]):
        rc, _, err = cli(capsys, [*argv, *extra])
        assert rc == 2, err[-3000:]
        line = error_line(err)
        assert f"pid {first.pid}" in line and "in use" in line, line
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert [r["epoch"] for r in strict_json_lines(out / "metrics.jsonl")] == [1]
    assert read_json(out / "result.json")["steps"] == 4
    assert not list(tmp_path.glob("run.old-*"))  # the refused --overwrite moved nothing


def test_05_lock_claim_and_release(tmp_path):
    out = tmp_path / "new" / "run"
    rd = rundir.claim(out, "new", job="j1")
    assert rundir.held(out) is rd and rundir.lock_info(out)["pid"] == os.getpid()
    assert rundir.lock_info(out)["job"] == "j1"
    rd.release()
    assert not out.exists()  # created, never written into: removed again
    rd = rundir.claim(out, "new")
    rd.started = True
    (out / "config.json").write_text("{}")
    rd.release()
    assert (out / "config.json").exists() and rundir.held(out) is None
    with pytest.raises(RunDirError, match="already holds a run stopped before its first"):
        rundir.claim(out, "new")


# --------------------------------------------------------------------------- 6

@pytest.mark.slow
def test_06_a_new_run_never_replaces_a_run_and_overwrite_moves_it_aside(finished, tmp_path,
                                                                        data_dir, capsys):
    out = copy_run(finished[0], tmp_path / "run")
    (out / "notes.txt").write_text("the user's own notes")
    before = snapshot(out)
    rc, _, err = cli(capsys, smoke(data_dir, out))
    assert rc == 2
    line = error_line(err)
    assert "already holds a finished run" in line and "--overwrite" in line, line
    assert snapshot(out) == before

    rc, printed, err = cli(capsys, smoke(data_dir, out, "--overwrite"))
    assert rc == 0, err[-3000:]
    aside = list(tmp_path.glob("run.old-*"))
    assert len(aside) == 1 and str(aside[0]) in printed
    assert snapshot(aside[0]) == {k: v for k, v in before.items() if k != rundir.LOCK_NAME}
    assert not (out / "notes.txt").exists()               # no mix of old and new files
    assert (out / "result.json").exists()
    assert [r["epoch"] for r in strict_json_lines(out / "metrics.jsonl")] == [1]


# --------------------------------------------------------------------------- 7

def test_07_a_refused_resume_changes_nothing(finished, tmp_path, capsys):
    out = copy_run(finished[0], tmp_path / "run")
    (out / "result.json").unlink()  # an unfinished run with a checkpoint
    before = snapshot(out)
    rc, _, err = cli(capsys, ["train", "--out", str(out), "--resume", "--model", "resnet20",
                              "--data-dir", MISSING_DATA])
    assert rc == 2
    line = error_line(err)
    assert "model.name: checkpoint 'resnet8' vs now 'resnet20'" in line, line
    assert snapshot(out) == before
    assert json.loads((out / "config.json").read_text())["model"]["name"] == "resnet8"


@pytest.mark.parametrize("step", [-5, 10 ** 9])
def test_07_a_checkpoint_at_a_step_the_run_does_not_have_is_refused_unchanged(
        finished, tmp_path, capsys, data_dir, step):
    out = copy_run(finished[0], tmp_path / "run")
    (out / "result.json").unlink()
    ckpt = out / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=True)
    state["step"] = step
    torch.save(state, ckpt)
    (out / "checkpoints" / "last.json").unlink()
    before = snapshot(out)
    rc, _, err = cli(capsys, smoke(data_dir, out, "--resume"))
    assert rc == 2 and f"is at step {step}, outside this run's 0..4 steps" in error_line(err)
    lock = rundir.LOCK_NAME  # the claim's note of who held the folder last: not run data
    assert {k: v for k, v in snapshot(out).items() if k != lock} == \
        {k: v for k, v in before.items() if k != lock}


# --------------------------------------------------------------------------- 8

def test_08_resume_on_a_finished_run_reports_it_and_changes_nothing(finished, tmp_path,
                                                                   capsys):
    out = copy_run(finished[0], tmp_path / "run")
    before = snapshot(out)
    rc, printed, err = cli(capsys, ["train", "--out", str(out), "--resume",
                                    "--data-dir", MISSING_DATA])
    assert rc == 0, err[-3000:]
    assert "already finished" in printed and "nothing changed" in printed
    assert snapshot(out) == before


# --------------------------------------------------------------------------- 9

def _unusable(tmp_path) -> dict:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {"a file": (a_file, "is a file"),
             "below a file": (a_file / "run", "lies below"),
             "/proc": ("/proc/fastres-run", "cannot hold"),
             "/sys (read-only)": ("/sys/fastres-run", "cannot hold")}
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        cases["no write permission"] = (ro / "run", "not writable")
    return cases


def test_09_an_unusable_out_is_one_line_before_the_data(tmp_path, capsys):
    for name, (out, needle) in _unusable(tmp_path).items():
        rc, _, err = cli(capsys, ["train", "--preset", "smoke", "--out", str(out),
                                  "--data-dir", MISSING_DATA])
        assert rc == 2, name
        line = error_line(err)
        assert needle in line and MISSING_DATA not in line, (name, line)


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -rm` for a read-only mount")
def test_09_a_read_only_mount_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = (f"mount -t tmpfs -o ro,size=1m tmpfs {ro} && exec {sys.executable} -m fastres "
           f"train --preset smoke --out {ro}/run --data-dir {MISSING_DATA}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True,
                          env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "read-only file system" in error_line(proc.stderr)


# --------------------------------------------------------------------------- 10

@pytest.mark.slow
def test_10_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(
        data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_fsync = os.fsync
    writes = []

    def fsync(fd):  # the second checkpoint write finds the disk full
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, printed, err = cli(capsys, smoke(data_dir, out, "--epochs", "2", "--set",
                                         "run.checkpoint_every=1"))
    assert rc == 2, (printed + err)[-3000:]
    line = error_line(err)
    assert "No space left on device" in line and "step 4" in line, line
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 4
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_10_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})
    good = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunDirError, match="No space left on device.*unchanged"):
        save_checkpoint(path, {"step": 2}, overwrite=True)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


# --------------------------------------------------------------------------- 11

def test_11_weights_that_do_not_fit_are_one_short_line(finished, tmp_path, capsys):
    from fastres.models import create_model

    out = copy_run(finished[0], tmp_path / "run")
    (out / "result.json").unlink()
    ckpt = out / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    state.pop("format")
    state["model"] = create_model("resnet20").state_dict()
    save_checkpoint(ckpt, state, overwrite=True)
    before = snapshot(out)
    # train --resume: refused before any data is read, nothing changed
    rc, _, err = cli(capsys, ["train", "--out", str(out), "--resume",
                              "--data-dir", MISSING_DATA])
    assert rc == 2
    line = error_line(err)
    assert "does not fit the model" in line and "unexpected (" in line and len(line) < 500, line
    assert snapshot(out) == before

    # fastres eval: a checkpoint without a model entry
    bare = tmp_path / "bare.pt"
    save_checkpoint(bare, {"config": state["config"], "step": 3})
    rc, _, err = cli(capsys, ["eval", "--checkpoint", str(bare), "--data-dir", MISSING_DATA])
    assert rc == 2
    assert "'model' entry missing" in error_line(err, "eval")


def test_11_eval_on_another_models_weights(finished, data_dir, tmp_path, capsys):
    from fastres.models import create_model

    state = load_checkpoint(finished[0] / "checkpoints" / "last.pt")
    state.pop("format")
    state["model"] = create_model("resnet20").state_dict()
    save_checkpoint(tmp_path / "r20.pt", state)
    rc, _, err = cli(capsys, ["eval", "--checkpoint", str(tmp_path / "r20.pt"),
                              "--data-dir", data_dir, "--progress", "none"])
    assert rc == 2
    line = error_line(err, "eval")
    assert "unexpected (" in line and len(line) < 500, line


def test_11_load_state_dict_checked_summarises():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    state = {f"x{i}": torch.zeros(1) for i in range(5)}
    state["0.weight"] = torch.zeros(5, 5)
    with pytest.raises(CheckpointError) as e:
        load_state_dict_checked(model, state, "ckpt")
    msg = str(e.value)
    assert "3 missing (0.bias, 1.weight, 1.bias)" in msg
    assert "5 unexpected (x0, x1, x2, ...)" in msg and "1 mis-shaped (0.weight)" in msg


# --------------------------------------------------------------------------- 12

def test_12_python_m_fastres_beside_a_checkout_named_fastres(tmp_path):
    (tmp_path / "fastres").symlink_to(ROOT, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-m", "fastres", "train", "--preset", "smoke",
                           "--print-config"], capture_output=True, text=True, cwd=tmp_path,
                          env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["model"]["name"] == "resnet8"
    proc = subprocess.run([sys.executable, "-m", "fastres", "--version"], capture_output=True,
                          text=True, cwd=tmp_path, env=ENV, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("fastres "), proc.stderr[-3000:]


# --------------------------------------------------------------------------- 13

@pytest.mark.slow
def test_13_a_dead_rank_is_named_by_the_survivor(data_dir, tmp_path):
    """Rank 1 kills itself (SIGKILL) in its 3rd step."""
    script = tmp_path / "self_signal.py"
    script.write_text(SELF_SIGNAL)
    argv = ["SIGKILL", "3", "1", *smoke(data_dir, tmp_path / "run", "--epochs", "4")]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), *argv],
                          capture_output=True, text=True, env=ENV, timeout=300)
    both = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "fastres train: [rank 0/2] error: rank 1 (pid" in both, both[-4000:]
    assert "[rank0]: Traceback" not in both and "pair.cc" not in both, both[-4000:]


# --------------------------------------------------------------------------- 14

def test_14_a_batch_larger_than_the_data_is_refused_before_loading(capsys):
    rc, _, err = cli(capsys, ["train", "--preset", "smoke", "--set", "data.batch_size=1000000",
                              "--data-dir", MISSING_DATA])
    assert rc == 2
    line = error_line(err)
    assert "1024 images (data.train_limit)" in line and "0 images" not in line, line
    cfg = C.replace(C.preset("smoke"), data={"batch_size": 1024})
    rundir.check_data_fits(cfg, 1)
    with pytest.raises(ConfigError, match="512 per process over 2 processes.*at most 1024"):
        rundir.check_data_fits(C.replace(cfg, data={"batch_size": 2048}), 2)
    with pytest.raises(ConfigError, match="at most 512"):
        rundir.check_data_fits(C.replace(cfg, data={"batch_scope": "per_rank"}), 2)


# --------------------------------------------------------------------------- 15

def test_15_eval_progress_lines_count_images_and_give_an_eta():
    now = [0.0]
    stream = io.StringIO()
    p = EvalProgress("plain", total=1000, label="final evaluation", every_s=5.0, stream=stream,
                     clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1.0
        p.update(100)
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "final evaluation: started, 1000 images"
    assert lines[1] == "final evaluation: 500/1000 images, 50%, 100 img/s, eta 0:05"
    assert lines[2] == "final evaluation: 1000/1000 images, 100%, 100 img/s, eta 0:00"
    assert lines[3] == "final evaluation: 1000 images in 0:10"


def test_15_fastres_eval_shows_progress(finished, data_dir, capsys):
    rc, printed, err = cli(capsys, ["eval", "--checkpoint",
                                    str(finished[0] / "checkpoints" / "last.pt"),
                                    "--data-dir", data_dir, "--progress", "plain", "--json"])
    assert rc == 0, err[-3000:]
    assert "fastres eval (tta none): started, 64 images" in err
    assert "fastres eval (tta none): 64 images in" in err
    assert json.loads(printed)["n"] == 64   # progress on stderr: stdout stays JSON


def test_15_fastres_eval_tta_fraction(finished, data_dir, capsys):
    ckpt = str(finished[0] / "checkpoints" / "last.pt")
    rc, printed, err = cli(capsys, ["eval", "--checkpoint", ckpt, "--data-dir", data_dir,
                                    "--tta", "flip", "--tta-fraction", "0.25",
                                    "--progress", "none"])
    assert rc == 0, err[-3000:]
    assert "tta flip on the least confident 25%" in printed and "64 images in" in printed
    rc, printed, err = cli(capsys, ["eval", "--checkpoint", ckpt, "--data-dir", data_dir,
                                    "--tta", "flip", "--repeats", "2", "--json",
                                    "--progress", "none"])
    assert rc == 0, err[-3000:]
    res = json.loads(printed)
    assert res["timing"] == "median of 2 after an untimed one" and res["seconds"] > 0
    rc, _, err = cli(capsys, ["eval", "--checkpoint", ckpt, "--data-dir", MISSING_DATA,
                              "--repeats", "-1"])
    assert rc == 2 and "--repeats: must be >= 0, got -1" in error_line(err, "eval")
    rc, _, err = cli(capsys, ["eval", "--checkpoint", ckpt, "--data-dir", MISSING_DATA,
                              "--tta-fraction", "0"])
    assert rc == 2
    assert "--tta-fraction must be in (0, 1], got 0" in error_line(err, "eval")


def test_15_evaluate_progress_needs_no_sync():
    class Loader:
        num_examples = 8

        def __iter__(self):
            for _ in range(2):
                yield torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)

    stream = io.StringIO()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))
    res = evaluate(model, Loader(), progress=EvalProgress("plain", total=8, stream=stream))
    assert res["n"] == 8 and "evaluation: 8 images in" in stream.getvalue()


def test_15_the_final_evaluation_shows_progress(finished):
    assert "final evaluation" in finished[1], finished[1][-2000:]


# --------------------------------------------------------------------------- resume planning

def test_resume_and_restart_detection(tmp_path):
    out = tmp_path / "run"
    assert rundir.plan_run(out).action == "new"
    with pytest.raises(CheckpointError, match="nothing to resume"):
        rundir.plan_run(out, resume=True)
    with pytest.raises(ConfigError, match="give one of them"):
        rundir.plan_run(out, resume=True, overwrite=True)
    rd = rundir.claim(out, "new", job="job-1")
    rd.started = True
    (out / "config.json").write_text(json.dumps(C.to_dict(C.preset("smoke"))))
    # A torchrun restart of the same job, before any checkpoint: again from step 0.
    plan = rundir.plan_run(out, restart_count=1, job_id="job-1")
    assert plan.action == "restart" and "torchrun restart 1" in plan.note
    # ... of another job: the ordinary rules (a new run into a folder holding one is
    # refused, when planned: before torchrun starts, for `fastres train --nproc N`).
    with pytest.raises(RunDirError, match="already holds a run in progress"):
        rundir.plan_run(out, restart_count=1, job_id="job-2")
    save_checkpoint(out / "checkpoints" / "last.pt", {"config": {}, "model": {}, "step": 3,
                                                      "world_size": 1})
    plan = rundir.plan_run(out, restart_count=1, job_id="job-1")
    assert plan.action == "resume" and plan.state["step"] == 3
    assert rundir.plan_run(out, resume=True).action == "resume"
    (out / "result.json").write_text(json.dumps({"top1": 0.5, "world_size": 1}))
    assert rundir.plan_run(out, resume=True).finished
    rd.release()


# =========================================================================== issue 23

from fastres.engine import records as R  # noqa: E402
from fastres.engine.run import run_training  # noqa: E402
from fastres.errors import OutputError  # noqa: E402
from fastres.testing import synthetic, write_cifar  # noqa: E402
from fastres.tools._common import (check_output_file, claim_output_dir,  # noqa: E402
                                   claim_output_file, write_json)

HOLD_LOCK = '''import fcntl, json, os, sys, time
path = sys.argv[1]
os.makedirs(path, exist_ok=True)
fd = os.open(os.path.join(path, ".fastres.lock"), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "since": "now"}).encode())
print("locked", flush=True)
time.sleep(120)
'''


@contextlib.contextmanager
def held_by_another_process(path: Path, tmp_path: Path):
    """`path` locked (.fastres.lock) by a second process, as a running tool would hold it."""
    script = tmp_path / "hold_lock.py"
    script.write_text(HOLD_LOCK)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def smoke_cfg(data_dir: str, **sections) -> C.Config:
    """The `smoke()` command line as a config, for library calls."""
    cfg = C.replace(C.preset("smoke", epochs=1), data={
        "data_dir": str(data_dir), "train_limit": 128, "test_limit": 64, "batch_size": 32,
        "eval_batch_size": 64}, run={"progress": "none"})
    return C.replace(cfg, **sections) if sections else cfg


# --------------------------------------------------------------------------- 23.1 outputs

SPEEDRUN = ["speedrun", "--preset", "smoke", "--data-dir", MISSING_DATA, "--runs", "1"]


def test_23_speedrun_out_unusable_is_one_line_before_the_data(tmp_path, capsys):
    """Item 1: `speedrun --out` a file, below a file, /proc, /sys, a folder without write
    permission: one line, exit 2, before the (missing) data are read."""
    for name, (out, needle) in _unusable(tmp_path).items():
        rc, _, err = cli(capsys, [*SPEEDRUN, "--out", str(out)])
        assert rc == 2, name
        line = error_line(err, "speedrun")
        assert needle in line and MISSING_DATA not in line, (name, line)


def test_23_speedrun_never_replaces_an_earlier_result(tmp_path, capsys):
    """Item 1: a second speed run into the same --out (with or without --records) is
    refused before any data is read, suggests only flags speedrun has, and changes
    nothing; --overwrite moves the earlier result aside first."""
    out = tmp_path / "sr"
    out.mkdir()
    (out / "speedrun.json").write_text('{"schema": "fastres-speedrun-v1", "runs": [1]}\n')
    before = snapshot(out)
    for extra in ([], ["--records"]):
        rc, _, err = cli(capsys, [*SPEEDRUN, "--out", str(out), *extra])
        assert rc == 2
        line = error_line(err, "speedrun")
        assert "already holds" in line and "speedrun.json" in line, line
        assert "--overwrite" in line and "--resume" not in line, line
        assert MISSING_DATA not in line
    assert snapshot(out) == before
    rc, printed, err = cli(capsys, [*SPEEDRUN, "--out", str(out), "--overwrite"])
    assert rc == 2 and MISSING_DATA in error_line(err, "speedrun")  # got as far as the data
    (aside,) = tmp_path.glob("sr.old-*")
    assert str(aside) in printed
    assert (aside / "speedrun.json").read_text().startswith('{"schema"')
    assert not (out / "speedrun.json").exists()


def test_23_a_tool_folder_in_use_is_refused_naming_the_process(tmp_path, capsys):
    """Item 1: speedrun and table into a folder another process holds: one line with its
    pid; nothing read, nothing written."""
    out = tmp_path / "busy"
    with held_by_another_process(out, tmp_path) as pid:
        for argv, tool in (([*SPEEDRUN, "--out", str(out)], "speedrun"),
                           (["table", "--out", str(out)], "table")):
            rc, _, err = cli(capsys, argv)
            assert rc == 2
            line = error_line(err, tool)
            assert f"pid {pid}" in line and "in use" in line, line
    assert rundir.contents(out) == []


def test_23_table_out_is_checked_locked_and_never_takes_a_foreign_folder(tmp_path, capsys):
    """Item 1: `fastres table --out` a file or /proc is one line; a folder holding other
    files is refused unchanged (--overwrite moves them aside); its own folder is updated
    in place, each file written atomically."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, needle in ((a_file, "is a file"), ("/proc/fastres-table", "cannot hold")):
        rc, _, err = cli(capsys, ["table", "--models", "resnet20", "--out", str(out)])
        assert rc == 2 and needle in error_line(err, "table")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("the user's own work")
    before = snapshot(mine)
    rc, _, err = cli(capsys, ["table", "--models", "resnet20", "--out", str(mine)])
    assert rc == 2
    line = error_line(err, "table")
    assert "thesis.tex" in line and "--overwrite" in line, line
    assert snapshot(mine) == before
    rc, _, err = cli(capsys, ["table", "--models", "resnet20", "--out", str(mine),
                              "--overwrite"])
    assert rc == 0, err[-2000:]
    (aside,) = tmp_path.glob("mine.old-*")
    assert (aside / "thesis.tex").read_text() == "the user's own work"
    assert (mine / "table.md").is_file() and (mine / "table.csv").is_file()
    rc, _, err = cli(capsys, ["table", "--models", "resnet20,resnet32", "--out", str(mine)])
    assert rc == 0, err[-2000:]                      # its own folder: updated in place
    assert "resnet32" in (mine / "table.md").read_text()
    assert not [p for p in mine.iterdir() if p.name.endswith(".tmp")]


def test_23_json_file_targets_are_checked_first_and_never_replaced_silently(tmp_path):
    """Item 1 (`--json FILE` of profile, bench-kernels, bench-loaders, loader-parity): the
    location is checked before any work; an existing file is refused unless overwrite,
    which moves it to NAME.old-<time>.json; the write is atomic."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for target, needle in ((tmp_path, "is a folder"), (a_file / "r.json", "lies below"),
                           ("/proc/fastres.json", "cannot hold"),
                           ("/sys/fastres.json", "cannot hold")):
        with pytest.raises(RunDirError, match=needle):
            check_output_file(target)
    report = tmp_path / "sub" / "report.json"
    assert check_output_file(report) == report          # a missing folder is created later
    write_json(report, {"tool": "fastres profile", "x": float("nan")}, overwrite=False)
    assert json.loads(report.read_text()) == {"tool": "fastres profile", "x": None,
                                              "nonfinite": ["x"]}
    with pytest.raises(RunDirError, match=r"report.json already exists \(a `fastres profile` "
                                          r"report.*--overwrite moves it to report.old-"):
        check_output_file(report)
    with pytest.raises(RunDirError, match="appeared while"):
        write_json(report, {"x": 2}, overwrite=False)
    assert check_output_file(report, overwrite=True) == report
    write_json(report, {"x": 3}, overwrite=True)
    (old,) = report.parent.glob("report.old-*.json")
    assert json.loads(old.read_text())["tool"] == "fastres profile"
    assert json.loads(report.read_text()) == {"x": 3}
    assert sorted(p.name for p in report.parent.iterdir()) == sorted(["report.json",
                                                                       old.name])
    # A tool that writes its report several times claims the file once, at its start.
    with pytest.raises(RunDirError, match="already exists"):
        claim_output_file(report)
    assert claim_output_file(report, overwrite=True) == report and not report.exists()
    for figures in ({"x": 4}, {"x": 4, "y": 5}):
        write_json(report, figures)
    assert json.loads(report.read_text()) == {"x": 4, "y": 5}
    assert len(list(report.parent.glob("report.old-*.json"))) == 2


@pytest.mark.parametrize("tool,module", [
    ("profile", "fastres.tools.profile"), ("bench-kernels", "fastres.tools.bench_kernels"),
    ("bench-loaders", "fastres.tools.bench_loaders"), ("scaling", "fastres.tools.scaling"),
    ("loader-parity", "fastres.tools.gpu_kit.loader_parity")])
def test_23_every_tools_json_target_is_refused_before_any_work(tool, module, tmp_path,
                                                                 capsys):
    """Each tool that writes `--json FILE` claims it at its start: an existing report is
    one line, exit 2, before anything is measured, and stays as it was."""
    import importlib

    from fastres.tools.cli import run_tool

    report = tmp_path / "report.json"
    report.write_text('{"tool": "an earlier run"}')
    main = importlib.import_module(module).main
    need = ["--data-dir", str(tmp_path)] if tool == "scaling" else []
    assert run_tool(tool, main, need + ["--json", str(report)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0], err
    assert report.read_text() == '{"tool": "an earlier run"}'


def test_23_claim_output_dir_is_the_one_contract_for_tool_folders(tmp_path):
    """Item 1 (profile --trace DIR, device-check --out): the helper the tools call."""
    with pytest.raises(RunDirError, match="--trace .* is a file"):
        claim_output_dir(__file__, flag="--trace")
    with pytest.raises(RunDirError, match="cannot hold"):
        claim_output_dir("/proc/traces", flag="--trace")
    traces = tmp_path / "traces"
    claimed = claim_output_dir(traces, flag="--trace")
    (traces / "step.json").write_text("{}")
    claimed.release()
    with pytest.raises(RunDirError, match=r"holds 1 file \(step.json\).*--overwrite.*another "
                                          r"--trace"):
        claim_output_dir(traces, flag="--trace")
    claimed = claim_output_dir(traces, flag="--trace", overwrite=True)
    assert (claimed.moved_to / "step.json").is_file() and rundir.contents(traces) == []
    claimed.release()
    unused = claim_output_dir(tmp_path / "unused", flag="--trace")
    unused.release()
    assert not (tmp_path / "unused").exists()   # created, nothing written: removed again


# --------------------------------------------------------------------------- 23.2 finite

def test_23_a_checkpoint_with_nan_is_refused_by_resume_and_eval(finished, tmp_path, data_dir,
                                                                capsys):
    """Item 2: a NaN in a BatchNorm running_var (written to disk by something else): resume
    and eval refuse it in one line naming the tensor, exit 2, before any data is read."""
    out = copy_run(finished[0], tmp_path / "run")
    (out / "result.json").unlink()
    ckpt = out / "checkpoints" / "last.pt"
    state = load_checkpoint(ckpt)
    state.pop("format")
    name = next(k for k in state["model"] if k.endswith("running_var"))
    state["model"][name][0] = float("nan")
    save_checkpoint(ckpt, state, overwrite=True)
    before = snapshot(out)
    rc, printed, err = cli(capsys, ["train", "--out", str(out), "--resume", "--data-dir",
                                    MISSING_DATA])
    assert rc == 2
    line = error_line(err)
    assert "NaN or infinite" in line and f"model.{name}" in line, line
    assert "last good" not in line and "epoch 1" not in printed
    assert snapshot(out) == before
    for target in (ckpt, out):   # the checkpoint, or its run directory
        rc, printed, err = cli(capsys, ["eval", "--checkpoint", str(target), "--data-dir",
                                        data_dir, "--progress", "none"])
        assert rc == 2 and "top-1" not in printed
        assert f"model.{name}" in error_line(err, "eval")
    with pytest.raises(CheckpointError, match=f"1 of .* tensors: model.{name}"):
        load_checkpoint(ckpt)
    assert load_checkpoint(ckpt, check_finite=False)["step"] == 4


# --------------------------------------------------------------------------- 23.3 last.json

def test_23_last_json_lagging_last_pt_is_detected_and_repaired(tmp_path, monkeypatch):
    """Item 3, in process: the process dies between last.pt and last.json (the write of
    last.json never happens). Readers take the step from last.pt; the next start repairs
    last.json and removes the temporary files a kill left."""
    out = tmp_path / "run"
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    rec = R.RunRecorder(rundir.claim(out, "new"))
    rec.start({"run": {}}, {})
    rec.checkpoint({"model": model.state_dict(), "step": 4, "epoch": 1})

    def killed(*a, **k):
        raise KeyboardInterrupt("killed between last.pt and last.json")

    monkeypatch.setattr(R, "write_checkpoint_info", killed)
    with pytest.raises(KeyboardInterrupt):
        rec.checkpoint({"model": model.state_dict(), "step": 8, "epoch": 2})
    monkeypatch.undo()
    rec.close()
    assert read_json(out / "checkpoints" / "last.json")["step"] == 4   # lagging
    info = rundir.inspect(out)
    assert info.step == 8 and info.checkpoint["source"] == "last.pt"
    assert "step 8" in info.describe()
    for stale in (out / "checkpoints" / ".last.pt.a1b2c3d4.tmp",
                  out / ".config.json.zz99_x0y.tmp"):
        stale.write_bytes(b"half a file")
    theirs = out / ".notes.abcdefgh.tmp"        # not a file fastres writes: left alone
    theirs.write_text("x")
    rd = rundir.claim(out, "resume")
    assert sorted(p.name for p in rd.removed) == [".config.json.zz99_x0y.tmp",
                                                   ".last.pt.a1b2c3d4.tmp"]
    assert theirs.exists()
    rec = R.RunRecorder(rd)
    rec.start({"run": {}}, {}, resumed=True)
    assert rec.kept_step == 8 and "(step 8)" in rec.kept_note()
    side = read_json(out / "checkpoints" / "last.json")
    assert side["step"] == 8 and rundir.inspect(out).checkpoint["source"] == "last.json"
    rec.close()


KILL_AT_WRITE = '''"""`fastres ARGV...` that SIGKILLs itself when it is about to rename the
Nth temporary file of TARGET into place: `python kill_at_write.py TARGET N ARGV...`."""
import os, signal, sys

TARGET, NTH = sys.argv[1], int(sys.argv[2])
_replace, seen = os.replace, [0]


def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == TARGET:
        seen[0] += 1
        if seen[0] == NTH:
            os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *a, **k)


os.replace = replace
from fastres.tools.cli import main
sys.exit(main(sys.argv[3:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("target,step", [("last.json", 8), ("last.pt", 4)])
def test_23_sigkill_between_checkpoint_writes(target, step, data_dir, tmp_path, capsys):
    """Item 3, a real SIGKILL: at the second checkpoint (step 8, before the final
    evaluation), just before last.json's rename (last.pt is new, last.json old) or
    last.pt's (both old, a half-written temporary file left). Readers name the step last.pt
    holds; --resume continues from it, and the next start leaves no temporary file."""
    script = tmp_path / "kill_at_write.py"
    script.write_text(KILL_AT_WRITE)
    out = tmp_path / "run"
    argv = smoke(data_dir, out, "--epochs", "2", "--set", "run.checkpoint_every=1",
                 "--set", "run.eval_every=0")
    proc = subprocess.run([sys.executable, str(script), target, "2", *argv],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
    temps = [p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    assert temps and temps[0].startswith(f".{target}."), temps
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == step
    assert rundir.inspect(out).step == step
    assert f"checkpoint at step {step}" in rundir.describe(out)

    rc, printed, err = cli(capsys, [*argv, "--resume"])
    assert rc == 0, err[-3000:]
    assert f"from step {step} (epoch {step // 4}" in printed, printed
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    side = read_json(out / "checkpoints" / "last.json")
    assert side["step"] == 8 and rundir.inspect(out).checkpoint["source"] == "last.json"
    assert read_json(out / "result.json")["steps"] == 8


# --------------------------------------------------------------------------- 23.4 history

def test_23_a_resume_keeps_the_record_and_appends_what_changed(finished, tmp_path, capsys):
    """Item 4: resumed on another copy of the data with config.json edited by hand: the
    first config.json (as edited) and env.json stay, the edit is one line, and
    history.jsonl names both data sets; --resume says where it resumes (item 6)."""
    out = copy_run(finished[0], tmp_path / "run")
    (out / "result.json").unlink()
    other = synthetic_dir(tmp_path / "other", 128, 128, seed=1)
    config = json.loads((out / "config.json").read_text())
    config["optim"]["lr"] = 0.5
    (out / "config.json").write_text(json.dumps(config, indent=2))
    config_bytes = (out / "config.json").read_bytes()
    env_bytes = (out / "env.json").read_bytes()
    first_fp = json.loads(env_bytes)["data"]["fingerprint"]

    rc, printed, err = cli(capsys, ["train", "--out", str(out), "--resume", "--data-dir",
                                    other])
    assert rc == 0, err[-3000:]
    ckpt = out / "checkpoints" / "last.pt"
    assert f"resuming {out} from step 4 (epoch 1, stage final_eval): {ckpt}" in printed
    edited = [line for line in (printed + err).splitlines() if "edited by hand" in line]
    assert len(edited) == 1 and "optim.lr: 0.5 in the file" in edited[0], edited
    assert (out / "config.json").read_bytes() == config_bytes
    assert (out / "env.json").read_bytes() == env_bytes
    history = R.read_history(out)
    assert [h["event"] for h in history] == ["start", "resume"]
    resume = history[1]
    assert resume["step"] == 4 and resume["stage"] == "final_eval"
    assert resume["changed"]["data.fingerprint"][0] == first_fp
    assert resume["changed"]["data.data_dir"] == [str(Path(config["data"]["data_dir"])),
                                                  other]
    assert resume["config_json_edited"] == ["optim.lr: 0.5 in the file, 0.05 in the run"]
    fps = rundir.inspect(out).data_fingerprints
    assert len(fps) == 2 and fps[0] == first_fp
    assert any("other data" in line for line in (printed + err).splitlines())


# --------------------------------------------------------------------------- 23.5 writers

def test_23_write_cifar_never_replaces_data(tmp_path):
    """Item 5: write_cifar (and synthetic_dir) refuse a folder or archive that holds data,
    naming it and what it holds; overwrite=True replaces it."""
    first, second = synthetic(100, 20, seed=0), synthetic(30, 10, seed=1)
    for archive in (False, True):
        root = tmp_path / ("archive" if archive else "folder")
        write_cifar(root, train=(first.train.images, first.train.labels),
                    test=(first.test.images, first.test.labels), archive=archive)
        before = snapshot(root)
        what = r"an archive, .* MiB" if archive else r"7 files, .* MiB \(batches.meta"
        with pytest.raises(OutputError, match=f"already holds {what}.*overwrite=True"):
            write_cifar(root, train=(second.train.images, second.train.labels),
                        test=(second.test.images, second.test.labels), archive=archive)
        assert snapshot(root) == before
        with pytest.raises(OutputError, match="never replaces data"):
            synthetic_dir(root, 30, 10) if not archive else write_cifar(
                root, train=(second.train.images, second.train.labels),
                test=(second.test.images, second.test.labels), archive=True)
        write_cifar(root, train=(second.train.images, second.train.labels),
                    test=(second.test.images, second.test.labels), archive=archive,
                    overwrite=True)
        from fastres.data import load_cifar

        assert len(load_cifar(root).train) == 30
    with pytest.raises(RunDirError, match="already exists.*overwrite=True"):
        save_checkpoint(tmp_path / "archive" / "cifar-10-python.tar.gz", {"step": 1})


# --------------------------------------------------------------------------- 23.6 messages

@pytest.mark.parametrize("tool", ["train", "speedrun", "profile"])
def test_23_a_preset_typo_is_one_line_with_a_suggestion(tool, capsys):
    """Item 6: every tool that takes --preset: one line with "did you mean", no usage."""
    rc, _, err = cli(capsys, [tool, "--preset", "speedrunn"])
    assert rc == 2
    assert "did you mean 'speedrun'?" in error_line(err, tool)
    assert "usage:" not in err


def test_23_an_argparse_typo_is_one_line_with_a_suggestion(capsys):
    rc, _, err = cli(capsys, ["train", "--loader", "dalli"])
    assert rc == 2 and "usage:" not in err
    assert "did you mean 'dali'?" in error_line(err)
    rc, _, err = cli(capsys, ["eval"])
    assert rc == 2 and "required: --checkpoint" in error_line(err, "eval")
    rc, _, err = cli(capsys, ["train", "--preset", "smoke", "--epochz", "1"])
    assert rc == 2 and "--epochz 1 (did you mean '--epochs'?)" in error_line(err)


def test_23_library_batch_larger_than_the_data_names_both_numbers(tmp_path):
    """Item 6: preset("speedrun") (batch 2000) on 1,024 images, through the library: the
    error names the batch and the data size, and the run directory is left as it was."""
    data = synthetic_dir(tmp_path / "data", 1024, 64)
    cfg = C.replace(C.preset("speedrun"), data={"data_dir": data}, run={"device": "cpu"})
    with pytest.raises(ConfigError, match=r"data.batch_size=2000 is larger than the training "
                                          r"set \(1024 images in the data given\).*at most "
                                          r"1024"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"2000 .*\(1024 images"):
        rundir.check_data_fits(C.preset("speedrun"), 1, n_train=1024)
    rundir.check_data_fits(C.preset("speedrun"), 1, n_train=2000)


class _RunsCode:
    """An object whose unpickling runs code (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path, capsys, data_dir):
    """A checkpoint is unpickled with torch's restricted loader (tensors and plain values,
    all fastres writes): one that holds other objects is refused, and the code it carries
    never runs -- not by eval, not by resume, not by a look at the folder."""
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    torch.save({"format": "fastres-checkpoint-v1", "x": _RunsCode(marker)},
               run / "checkpoints" / "last.pt")
    rc, _, err = cli(capsys, ["eval", "--checkpoint", str(run), "--data-dir", data_dir])
    assert rc == 2 and "will not unpickle (unpickling can run code)" in error_line(err, "eval")
    assert "GLOBAL" in error_line(err, "eval")
    rc, _, err = cli(capsys, smoke(data_dir, run) + ["--resume"])
    assert rc == 2 and "will not unpickle" in error_line(err)
    rundir.describe(run)
    assert not marker.exists()


def test_an_output_folder_never_holds_the_data_or_sits_inside_a_run(tmp_path, capsys,
                                                                    data_dir):
    """--out equal to the data folder, or above it: refused before anything is claimed (an
    --overwrite there moved the data set aside). --out inside a run directory: refused (two
    runs' files mixed). --overwrite of a folder with a run in progress below it: refused."""
    data = Path(data_dir)
    before = sorted(p.name for p in data.iterdir())
    for out in (data, data.parent):
        rc, _, err = cli(capsys, smoke(data_dir, out, "--overwrite"))
        assert rc == 2 and "the data folder" in error_line(err), err
    rc, _, err = cli(capsys, ["speedrun", "--preset", "smoke", "--data-dir", data_dir,
                              "--out", data_dir])
    assert rc == 2 and "is the data folder" in error_line(err, "speedrun")
    assert sorted(p.name for p in data.iterdir()) == before
    assert not list(data.parent.glob(f"{data.name}.old-*"))

    run = tmp_path / "runs" / "A"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / rundir.LOCK_NAME).write_text("{}")
    rc, _, err = cli(capsys, smoke(data_dir, run / "checkpoints"))
    assert rc == 2 and f"inside the run directory {run}" in error_line(err)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (run / rundir.LOCK_NAME).write_text(json.dumps({"pid": alive.pid,
                                                         "host": socket.gethostname()}))
        rc, _, err = cli(capsys, smoke(data_dir, tmp_path / "runs", "--overwrite"))
        assert rc == 2 and "a run in progress" in error_line(err), err
        assert run.is_dir() and not list(tmp_path.glob("runs.old-*"))
    finally:
        alive.kill()
        alive.wait()


def test_run_out_dir_is_the_run_directory_or_refused(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    argv = smoke(data_dir, out)
    i = argv.index("--out")
    rc, _, err = cli(capsys, argv[:i] + argv[i + 2:] + ["--set", f"run.out_dir={out}"])
    assert rc == 0 and (out / "result.json").is_file(), err  # --set run.out_dir: recorded
    rc, _, err = cli(capsys, ["train", "--preset", "smoke", "--data-dir", data_dir,
                              "--out", str(tmp_path / "a"), "--set",
                              f"run.out_dir={tmp_path / 'b'}"])
    assert rc == 2 and "name two run directories" in error_line(err)
    rc, _, err = cli(capsys, ["speedrun", "--preset", "smoke", "--data-dir", data_dir,
                              "--set", f"run.out_dir={tmp_path / 'b'}"])
    assert rc == 2 and "its output folder is --out" in error_line(err, "speedrun")
    assert not (tmp_path / "b").exists()


def sigterm_at_train_call(monkeypatch, n: int) -> None:
    """SIGTERM this process as `fastres.engine.train` is called the n-th time."""
    import fastres.engine

    real, calls = fastres.engine.train, []

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread before this returns
        return real(*args, **kwargs)

    monkeypatch.setattr(fastres.engine, "train", train)


def test_a_stopped_speedrun_keeps_the_runs_that_finished(tmp_path, capsys, data_dir,
                                                         monkeypatch):
    """SIGTERM during the second of three runs: the first run's row and speedrun.json
    (marked stopped) are written, exit 128 + 15."""
    sigterm_at_train_call(monkeypatch, 2)
    out = tmp_path / "sr"
    rc, printed, _ = cli(capsys, ["speedrun", "--preset", "smoke", "--data-dir", data_dir,
                                  "--runs", "3", "--epochs", "1", "--no-plot",
                                  "--set", "data.train_limit=128", "--set",
                                  "data.test_limit=64", "--out", str(out)])
    assert rc == 128 + signal.SIGTERM
    assert "stopped by signal 15 after 1 of 3 runs" in printed
    result = json.loads((out / "speedrun.json").read_text())
    assert len(result["runs"]) == 1 and result["stopped"] == {
        "signal": 15, "runs_finished": 1, "runs_planned": 3}


def test_a_speedrun_stopped_in_its_warm_up_records_how_long_it_ran(tmp_path, capsys, data_dir,
                                                                  monkeypatch):
    """A time limit that ends a speed-run while it compiles (the warm-up) left no record;
    the warm-up's length is the result then (e.g. a compile that takes too long)."""
    sigterm_at_train_call(monkeypatch, 1)
    out = tmp_path / "sr"
    rc, printed, _ = cli(capsys, ["speedrun", "--preset", "smoke", "--data-dir", data_dir,
                                  "--runs", "2", "--epochs", "1", "--warmup-steps", "2",
                                  "--set", "data.train_limit=128", "--set",
                                  "data.test_limit=64", "--out", str(out)])
    assert rc == 128 + signal.SIGTERM
    assert "stopped by signal 15 in the warm-up after" in printed
    result = json.loads((out / "speedrun.json").read_text())
    assert result["runs"] == [] and result["stopped"]["runs_finished"] == 0
    assert result["warmup"]["steps"] == 2 and result["warmup"]["stopped_after_s"] > 0


def test_eval_refuses_what_it_cannot_do_as_asked(finished, capsys, data_dir):
    run = str(finished[0])
    for argv, words in ((["--device", "tpu"], "run.device must be auto, cpu, cuda or cuda:N"),
                        (["--batch-size", "0"], "--batch-size: must be >= 1"),
                        (["--repeats", "-1"], "--repeats: must be >= 0")):
        rc, _, err = cli(capsys, ["eval", "--checkpoint", run, "--data-dir", data_dir, *argv])
        assert rc == 2 and words in error_line(err, "eval"), err
    rc, _, err = cli(capsys, ["eval", "--checkpoint", "/dev/null", "--data-dir", data_dir])
    assert rc == 2 and "/dev/null is not a regular file" in error_line(err, "eval")
    # a TTA fraction without TTA was accepted and ignored; refused before the data are read
    rc, _, err = cli(capsys, ["eval", "--checkpoint", run, "--data-dir", MISSING_DATA,
                              "--tta-fraction", "0.5"])
    assert rc == 2 and "--tta-fraction 0.5 needs test-time augmentation" in \
        error_line(err, "eval")


def test_eval_says_it_scores_the_runs_test_subset(finished, capsys, data_dir):
    """The run's data.test_limit subset was evaluated without a word; --test-limit 0
    evaluates the whole test set."""
    run = str(finished[0])
    rc, printed, _ = cli(capsys, ["eval", "--checkpoint", run, "--data-dir", data_dir,
                                  "--progress", "none"])
    assert rc == 0 and "64 images in" in printed
    assert "a fixed subset of the test set (the run's data.test_limit 64); --test-limit 0 " \
        "evaluates all of it" in printed
    rc, printed, _ = cli(capsys, ["eval", "--checkpoint", run, "--data-dir", data_dir,
                                  "--progress", "none", "--test-limit", "0", "--json"])
    res = json.loads(printed)
    assert rc == 0 and res["n"] == res["data"]["test_size"] > 64
    rc, printed, _ = cli(capsys, ["eval", "--checkpoint", run, "--data-dir", data_dir,
                                  "--progress", "none", "--test-limit", "100000"])
    assert rc == 0 and "subset" not in printed  # a limit above the test set: all of it


def test_the_warm_up_records_the_steps_it_trained(tmp_path, capsys, data_dir):
    """--warmup-steps beyond the schedule's end: the warm-up stops at the end, and says
    how many steps it trained, not how many were asked for."""
    out = tmp_path / "sr"
    rc, printed, _ = cli(capsys, ["speedrun", "--preset", "smoke", "--data-dir", data_dir,
                                  "--runs", "1", "--epochs", "1", "--warmup-steps", "100",
                                  "--no-plot", "--set", "data.train_limit=128", "--set",
                                  "data.test_limit=64", "--batch-size", "64", "--out", str(out)])
    assert rc == 0 and "warm-up: 2 steps" in printed
    assert json.loads((out / "speedrun.json").read_text())["warmup"]["steps"] == 2


def test_a_run_in_progress_is_not_called_stopped(tmp_path):
    """A run directory with config.json and no checkpoint yet: in progress while the
    process named in its lock lives, stopped once it is gone."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    lock = run / rundir.LOCK_NAME
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname()}))
        assert rundir.describe(run) == f"a run in progress (pid {alive.pid}) that has not " \
            "written its first checkpoint yet"
    finally:
        alive.kill()
        alive.wait()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname()}))
    assert rundir.describe(run) == "a run stopped before its first checkpoint"


def test_speedrun_refuses_a_batch_larger_than_the_data_before_reading_it(capsys, tmp_path,
                                                                           monkeypatch, data_dir):
    import fastres.engine

    def no_reading(*args, **kwargs):
        raise AssertionError("the data were read")

    monkeypatch.setattr(fastres.engine, "load_data", no_reading)
    rc, _, err = cli(capsys, ["speedrun", "--preset", "smoke", "--data-dir", data_dir,
                              "--set", "data.train_limit=64", "--set", "data.batch_size=128",
                              "--out", str(tmp_path / "sr")])
    assert rc == 2 and "data.batch_size=128 is larger than the training set (64 images " \
        "(data.train_limit))" in error_line(err, "speedrun")


# --------------------------------------------------------------------------- 22.2 engine

def test_23_run_training_owns_the_run_directory(data_dir, tmp_path):
    """Issue 22 item 2: the sequence `fastres train` ran, as one library call."""
    out = tmp_path / "run"
    said = []
    first = run_training(smoke_cfg(data_dir), out, say=said.append)
    assert first.action == "new" and first.final["steps"] == 4
    assert any(line.startswith("data cifar10") for line in said)
    info = rundir.inspect(out)
    assert info.finished and info.stage == "finished" and info.config["model"]["name"] == \
        "resnet8"
    assert [h["event"] for h in info.history] == ["start"]
    with pytest.raises(RunDirError, match="already holds a finished run"):
        run_training(smoke_cfg(data_dir), out)
    again = run_training(smoke_cfg(data_dir), out, resume=True)
    assert again.finished_before and again.final == info.result
    replaced = run_training(smoke_cfg(data_dir), out, overwrite=True)
    assert replaced.moved_to is not None and (replaced.moved_to / "result.json").is_file()
    assert rundir.held(out) is None   # released


def test_23_inspect_reads_every_state(tmp_path):
    assert rundir.inspect(tmp_path / "nope").state == "missing"
    assert rundir.inspect(tmp_path).state == "empty"
    (tmp_path / "notes.txt").write_text("x")
    assert rundir.inspect(tmp_path).describe() == "1 file (notes.txt)"
    (tmp_path / "config.json").write_text("{not json")
    info = rundir.inspect(tmp_path)
    assert info.state == "started" and "config.json" in info.problems
    with pytest.raises(RunDirError, match="config.json: unreadable"):
        info.require("config")


def test_23_records_does_not_import_rundir():
    """Issue 22 item 2: records (writing) sits below rundir (the contract): one direction."""
    import ast

    tree = ast.parse((ROOT / "fastres" / "engine" / "records.py").read_text())
    imported = [(getattr(n, "module", "") or "") + ":" + ",".join(a.name for a in n.names)
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [i for i in imported if "rundir" in i], imported


# --------------------------------------------------------------------------- new-user probes

def test_nproc_checks_the_config_before_torchrun_starts(data_dir, tmp_path, capsys,
                                                        monkeypatch):
    """A config error under --nproc was one line inside torchrun's traceback (exit 1), after
    the data were read and the run directory written; now it comes before the launch."""
    from fastres.tools import train as T

    monkeypatch.setattr(T, "_launch_torchrun", lambda *a: pytest.fail("torchrun launched"))
    out = tmp_path / "ddp"
    rc, _, err = cli(capsys, smoke(data_dir, out, "--nproc", "2", "--compile", "step"))
    assert rc == 2 and "compile=step does not support DDP" in error_line(err)
    assert not out.exists()
    rc, _, err = cli(capsys, smoke(data_dir, out, "--nproc", "0"))
    assert rc == 2 and "--nproc: must be >= 1" in error_line(err)
    rc, printed, _ = cli(capsys, smoke(data_dir, out, "--nproc", "2", "--print-config"))
    assert rc == 0 and json.loads(printed)["data"]["train_limit"] == 128  # JSON, not launched
    assert not out.exists()
    # a 1-process run resumed with 2 processes: refused before the launch too
    assert cli(capsys, smoke(data_dir, out, "--set", "run.checkpoint_every=1",
                             "--epochs", "2"))[0] == 0
    (out / "result.json").unlink()  # as if stopped before its end
    rc, _, err = cli(capsys, smoke(data_dir, out, "--set", "run.checkpoint_every=1",
                                   "--epochs", "2", "--resume", "--nproc", "2"))
    assert rc == 2 and "written by 1 process(es) and this run has 2" in error_line(err)
    # a new run into a folder holding one: refused before the launch, not by rank 0
    rc, _, err = cli(capsys, smoke(data_dir, out, "--nproc", "2"))
    assert rc == 2 and "already holds an unfinished" in error_line(err)


def test_resume_with_another_preset_is_refused(data_dir, tmp_path, capsys):
    """`--resume --preset seed` on a smoke run trained the smoke run on, without a word."""
    out = tmp_path / "run"
    assert cli(capsys, smoke(data_dir, out, "--set", "run.checkpoint_every=1",
                             "--epochs", "2"))[0] == 0
    (out / "result.json").unlink()
    argv = smoke(data_dir, out, "--set", "run.checkpoint_every=1", "--epochs", "2",
                 "--resume")
    rc, _, err = cli(capsys, [a if a != "smoke" else "seed" for a in argv])
    assert rc == 2 and "cannot resume with --preset seed" in error_line(err)
    rc, printed, _ = cli(capsys, argv)  # the run's own command again: resumes
    assert rc == 0 and "done: top-1" in printed
    (out / "result.json").unlink()
    rc, printed, _ = cli(capsys, ["train", "--out", str(out), "--resume"])  # no preset named
    assert rc == 0 and "done: top-1" in printed
