"""`fastres table`: the results table, its training loop and the recipes it trains.

What is checked, on a tiny synthetic CIFAR-10 in the real on-disk format: `--train --scale
smoke` trains one run directory per (model, recipe) in its own process and writes table.md
(conventions first), table.csv and table.png; a second call trains nothing; a partial row
resumes, a failing row is reported while the others go on; rows trained with other
settings are refused before anything trains, and a missing data set before any row starts;
every row's command reproduces its config and is printed as it runs; runs read with --runs
share a row only as repeats (seeds); the `fast` presets cover the article's model families
and phase 2 scales with the run.
Timings are never asserted.
"""
import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from fastres import config as C
from fastres.testing import synthetic_dir
from fastres.tools import table as T
from fastres.tools.cli import main as cli_main
from fastres.tools.cli import run_tool

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return synthetic_dir(tmp_path_factory.mktemp("cifar"), 256, 128)


def smoke_argv(data_dir: str, out, *extra: str) -> list[str]:
    return ["--train", "--models", "resnet20", "--recipes", "seed,fast", "--scale", "smoke",
            "--device", "cpu", "--data-dir", data_dir, "--out", str(out), *extra]


def one_thread(mp) -> None:
    """Row processes inherit OMP_NUM_THREADS=1: on a busy 2-core machine, two OpenMP
    threads per process spin against the other jobs (measured beside one 2-thread
    training: a smoke row's timed region 10-12 s with 2 threads, 0.9-1.0 s with 1)."""
    mp.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def smoke_table(data_dir, tmp_path_factory):
    """The CI table: ResNet-20 x (seed, fast) at smoke scale, trained once per module."""
    out = tmp_path_factory.mktemp("table") / "t"
    with pytest.MonkeyPatch.context() as mp:
        one_thread(mp)
        assert T.main(smoke_argv(data_dir, out)) == 0
    return out


def read_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        return {(r["model"], r["recipe"]): r for r in csv.DictReader(f)}


def no_training(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the table started a training process")
    monkeypatch.setattr(T.subprocess, "Popen", refuse)


def one_line_error(capsys, argv, needle: str) -> None:
    assert run_tool("table", T.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastres table: error:"), err
    assert needle in err[0]


# --------------------------------------------------------------------------- training

def test_smoke_table_trains_every_row_then_nothing(smoke_table, data_dir, monkeypatch,
                                                   capsys):
    out = smoke_table
    for recipe in ("seed", "fast"):
        assert (out / "resnet20" / recipe / "result.json").is_file()
        assert (out / "logs" / f"resnet20-{recipe}.log").is_file()
    assert (out / "table.png").read_bytes()[:8] == PNG_MAGIC

    md = (out / "table.md").read_text()
    head = " ".join(md.split("| Model")[0].split())  # unwrapped
    assert "SMOKE SCALE" in head and "Device: cpu" in head
    assert "Training time:" in head and "Compilation, warm-up, data loading" in head
    assert "JPEG-75" in head                       # synthetic files are not the official ones
    assert "Written by: `fastres table --train" in md
    lines = [x for x in md.splitlines() if x.startswith("| ")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(T.HEADERS)

    rows = read_csv(out / "table.csv")
    assert set(rows) == {("resnet20", "seed"), ("resnet20", "fast")}
    seed, fast = rows[("resnet20", "seed")], rows[("resnet20", "fast")]
    assert list(seed) == list(T.CSV_FIELDS)
    assert seed["preset"] == "seed" and fast["preset"] == "fast"
    for r in (seed, fast):
        assert r["status"] == "1 run" and float(r["train_min"]) > 0
        assert 0 <= float(r["top1"]) <= 100 and float(r["epochs"]) == 2
        assert r["data_official"] == "no" and r["device"].startswith("cpu")
        assert r["article_top1"] == "92.02" and r["article_gflops"] == "0.9"
        assert abs(float(r["gflops"]) - 0.082) < 0.01      # true FLOPs beside the article's
    assert fast["tta"] == "flip" and fast["tta_top1"] != "" and seed["tta_top1"] == ""

    # Phase 2 scaled with the run: seed's last 1/6 of 2 epochs.
    cfg = json.loads((out / "resnet20" / "seed" / "config.json").read_text())
    assert cfg["schedule"]["two_phase_epochs"] == pytest.approx(2 / 6)

    # A second call trains nothing and leaves the rows as they were.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()
              and p.parent.name in ("seed", "fast", "checkpoints")}
    no_training(monkeypatch)
    capsys.readouterr()
    assert T.main(smoke_argv(data_dir, out)) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime_ns for p in before}


@pytest.mark.slow
def test_partial_row_resumes_and_failed_row_lets_others_go_on(smoke_table, data_dir,
                                                               tmp_path, capsys, monkeypatch):
    one_thread(monkeypatch)
    out = tmp_path / "t"
    shutil.copytree(smoke_table, out)
    # fast: stopped after its last checkpoint (no result.json): --resume finishes it.
    (out / "resnet20" / "fast" / "result.json").unlink()
    # seed: an unreadable checkpoint, so its --resume fails; it runs first.
    (out / "resnet20" / "seed" / "result.json").unlink()
    (out / "resnet20" / "seed" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")

    assert T.main(smoke_argv(data_dir, out)) == 1
    printed = capsys.readouterr().out
    assert "resuming resnet20 / seed" in printed and "resuming resnet20 / fast" in printed
    assert "FAILED with exit status 2" in printed
    assert (out / "resnet20" / "fast" / "result.json").is_file()
    rows = read_csv(out / "table.csv")
    assert rows[("resnet20", "fast")]["status"] == "1 run"
    assert rows[("resnet20", "seed")]["status"].startswith("failed (exit 2")
    assert rows[("resnet20", "seed")]["top1"] == ""
    assert "corrupt" in (out / "logs" / "resnet20-seed.log").read_text()


def test_rows_with_other_settings_are_refused(smoke_table, data_dir, capsys, monkeypatch):
    no_training(monkeypatch)
    one_line_error(capsys, smoke_argv(data_dir, smoke_table, "--epochs", "3"),
                   "holds a finished run with other settings (schedule.epochs")


def test_budget_spent_trains_nothing(data_dir, tmp_path, monkeypatch, capsys):
    no_training(monkeypatch)
    assert T.main(smoke_argv(data_dir, tmp_path / "t", "--budget-min", "0")) == 0
    assert "the budget is spent" in capsys.readouterr().out
    rows = read_csv(tmp_path / "t" / "table.csv")
    assert {r["status"] for r in rows.values()} == {"not trained (budget spent)"}
    assert not (tmp_path / "t" / "table.png").exists()   # nothing to plot


def test_data_checked_once_before_any_row(data_dir, smoke_table, tmp_path, capsys,
                                          monkeypatch):
    """A missing or broken data set is one line, exit 2, before any row starts (not one
    failed `fastres train` per row), and leaves no table folder behind; finished rows
    need no data."""
    no_training(monkeypatch)
    out = tmp_path / "t"
    one_line_error(capsys, smoke_argv(str(tmp_path / "nowhere"), out),
                   f"data directory {tmp_path / 'nowhere'} does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, smoke_argv(str(tmp_path / "empty"), out), "no CIFAR-10 data in")
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    (broken / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    one_line_error(capsys, smoke_argv(str(broken), out), "test_batch")
    assert not out.exists()
    assert T.main(smoke_argv(str(tmp_path / "nowhere"), smoke_table)) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_printed_row_command_runs_as_shown(data_dir, tmp_path, capsys, monkeypatch):
    """The `$ ...` line printed (and logged) for a row is the exact command the table
    runs, interpreter included: pasted into a shell, it reproduces the row."""
    import shlex
    import sys

    launched = []

    class Failed:  # a row process that fails at once
        returncode = 2

        def __init__(self, cmd, **kwargs):
            launched.append(cmd)
            self.stdout = iter(["error\n"])

        def poll(self):
            return self.returncode

    monkeypatch.setattr(T.subprocess, "Popen", Failed)
    out = tmp_path / "t"
    assert T.main(smoke_argv(data_dir, out)) == 1
    shown = [line.strip()[2:] for line in capsys.readouterr().out.splitlines()
             if line.strip().startswith("$ ")]
    assert [shlex.split(line) for line in shown] == launched and len(launched) == 2
    assert launched[0][:4] == [sys.executable, "-m", "fastres", "train"]
    for recipe, line in zip(("seed", "fast"), shown):
        assert f": {line}\n" in (out / "logs" / f"resnet20-{recipe}.log").read_text()


def fake_nvidia_smi(tmp_path, monkeypatch, busy: int) -> None:
    """An `nvidia-smi` on PATH that answers `busy` % every 50 ms, as the real one streams
    `--query-gpu=utilization.gpu -lms N`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\nwhile true; do echo {busy}; sleep 0.05; done\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_parallel_rows_share_the_device_and_record_gpu_busy(data_dir, tmp_path, monkeypatch,
                                                            capsys):
    """--parallel 2: both rows train at once (each line tagged with its row), each row's
    record holds its wall clock and the device's busy share while it ran, and the table
    shows that share. The rows run on the CPU; the GPU they would share is stood in for by
    an nvidia-smi that answers 40%."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fake_nvidia_smi(tmp_path, monkeypatch, 40)
    monkeypatch.setattr(T, "rows_gpu", lambda plan: "0")
    out = tmp_path / "t"
    assert T.main(smoke_argv(data_dir, out, "--parallel", "2")) == 0
    printed = capsys.readouterr().out
    assert "[resnet20/seed] " in printed and "[resnet20/fast] " in printed
    assert "up to 2 rows at a time" in printed
    rows = read_csv(out / "table.csv")
    for recipe in ("seed", "fast"):
        rec = json.loads((out / "logs" / f"resnet20-{recipe}.json").read_text())
        assert rec["parallel"] == 2 and rec["processes"] == 1 and rec["wall_s"] > 0
        assert rec["gpu_busy"] == pytest.approx(0.40) and rec["busy_samples"] > 0
        row = rows[("resnet20", recipe)]
        assert row["status"] == "1 run" and float(row["gpu_busy"]) == pytest.approx(40)
        assert row["parallel"] == "2" and float(row["wall_min"]) > 0
    head = " ".join((out / "table.md").read_text().split("| Model")[0].split())
    assert "up to 2 at a time on one device" in head and "GPU busy %: the device's" in head


@pytest.mark.slow
def test_sigterm_stops_parallel_rows_resumably(data_dir, tmp_path):
    """SIGTERM to a table training 2 rows side by side reaches both trainers: each writes
    its checkpoint and stops, the table exits 130 with neither row finished, and the same
    command resumes both to the end."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "t"
    argv = [sys.executable, "-m", "fastres", "table", *smoke_argv(data_dir, out, "--epochs",
                                                                   "100", "--parallel", "2")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    ckpts = [out / "resnet20" / r / "checkpoints" / "last.pt" for r in ("seed", "fast")]
    deadline = time.monotonic() + 240
    while not all(c.is_file() for c in ckpts):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    printed = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130, printed[-3000:]
    for recipe in ("seed", "fast"):
        assert f"resnet20 / {recipe}: partial: stopped after" in printed
        assert not (out / "resnet20" / recipe / "result.json").exists()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "resuming resnet20 / seed" in done.stdout and "resuming resnet20 / fast" in done.stdout
    rows = read_csv(out / "table.csv")
    assert {r["status"] for r in rows.values()} == {"1 run"}
    for recipe in ("seed", "fast"):
        rec = json.loads((out / "logs" / f"resnet20-{recipe}.json").read_text())
        assert rec["processes"] == 2 and rec["parallel"] == 2


def test_row_env_splits_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert "OMP_NUM_THREADS" not in T._row_env(1)
    assert T._row_env(2)["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert T._row_env(10 * cores)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")     # the caller's choice stands
    assert T._row_env(2)["OMP_NUM_THREADS"] == "3"


def test_busy_sampler_averages_its_window(tmp_path, monkeypatch):
    import time

    fake_nvidia_smi(tmp_path, monkeypatch, 75)
    sampler = T.GpuBusySampler("0", period_ms=50)
    t0 = time.monotonic()
    time.sleep(0.5)
    sampler.stop()
    busy, n = sampler.mean(t0, time.monotonic())
    assert n > 0 and busy == pytest.approx(0.75)
    assert sampler.mean(0.0, t0 - 10) == (None, 0)
    (tmp_path / "bin" / "nvidia-smi").write_text(
        "#!/bin/sh\nwhile true; do echo '[N/A]'; sleep 0.05; done\n")  # no reading
    silent = T.GpuBusySampler("0", period_ms=50)
    time.sleep(0.3)
    silent.stop()
    assert silent.mean(0.0, time.monotonic()) == (None, 0)
    assert silent.error == "nvidia-smi gave no readable sample"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    missing = T.GpuBusySampler("0")
    assert missing.error and missing.mean(0.0, time.monotonic()) == (None, 0)
    missing.stop()


def test_rows_gpu_maps_visible_devices(monkeypatch):
    def plan(device):
        return [{"cfg": C.replace(C.preset("smoke"), run={"device": device})}]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert T.rows_gpu(plan("cpu")) is None
    assert T.rows_gpu(plan("cuda")) == "0" and T.rows_gpu(plan("cuda:1")) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-abc")
    assert T.rows_gpu(plan("cuda:0")) == "3" and T.rows_gpu(plan("cuda:1")) == "GPU-abc"


# --------------------------------------------------------------------------- reading

def test_read_runs_beside_untrained_models(smoke_table, tmp_path, capsys, monkeypatch):
    no_training(monkeypatch)
    out = tmp_path / "read"
    assert T.main(["--runs", str(smoke_table), "--models", "resnet20,preact_resnet18",
                   "--out", str(out)]) == 0
    assert "| Model" in capsys.readouterr().out
    rows = read_csv(out / "table.csv")
    # Recipes recognised from the recorded configs; the other model keeps article figures.
    assert rows[("resnet20", "seed")]["runs"] == "1"
    assert rows[("resnet20", "fast")]["runs"] == "1"
    assert "32-image subset of the 128 test images" in rows[("resnet20", "seed")]["notes"]
    pre = rows[("preact_resnet18", "fast")]
    assert pre["status"] == "not trained" and pre["top1"] == ""
    assert pre["preset"] == "fast-preact" and pre["article_top1"] == "90.77"
    assert abs(float(pre["params_m"]) - 11.17) < 0.01
    assert "article prints 1.17 M params" in pre["notes"]


def copy_run(src: Path, dst: Path, config: dict | None = None,
             result: dict | None = None) -> None:
    """A copy of the finished run `src` whose config.json ('section.key': value) and
    result.json (key: value) say it was trained otherwise."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for field, value in (config or {}).items():
        sec, key = field.split(".")
        cfg[sec][key] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    res = {**json.loads((dst / "result.json").read_text()), **(result or {})}
    (dst / "result.json").write_text(json.dumps(res))


def test_runs_pool_only_as_repeats(smoke_table, tmp_path, capsys, monkeypatch):
    """Runs of one model and recipe share a row (mean ± std) only when they differ in the
    seed alone (or in how often they evaluate, or how progress shows); another length or
    data limit is a row of its own, its recipe naming what differs."""
    no_training(monkeypatch)
    src, runs = smoke_table / "resnet20" / "seed", tmp_path / "runs"
    copy_run(src, runs / "a")
    copy_run(src, runs / "b", {"run.seed": 1, "run.eval_every": 1.0, "run.progress": "none"},
             {"top1": 0.5})
    copy_run(src, runs / "long", {"schedule.epochs": 6.0, "schedule.two_phase_epochs": 1.0},
             {"epochs": 6.0})
    copy_run(src, runs / "small", {"data.train_limit": 32})
    copy_run(src, runs / "ddp", result={"world_size": 2})  # same config, 2 processes
    out = tmp_path / "read"
    assert T.main(["--runs", str(runs), "--out", str(out)]) == 0
    with open(out / "table.csv", newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    short = "train_limit=64, epochs=2, two_phase_epochs=0.333333, processes=1"
    long = "train_limit=64, epochs=6, two_phase_epochs=1, processes=1"
    small = "train_limit=32, epochs=2, two_phase_epochs=0.333333, processes=1"
    ddp = "train_limit=64, epochs=2, two_phase_epochs=0.333333, processes=2"
    assert list(rows) == [short, ddp, long, small]
    assert rows[ddp]["runs"] == "1"
    assert {r["model"] for r in rows.values()} == {"resnet20"}
    assert {r["recipe"] for r in rows.values()} == {"seed"}
    assert rows[short]["runs"] == "2" and rows[short]["status"] == "2 runs"
    assert rows[short]["run_dirs"] == f"{runs / 'a'} {runs / 'b'}"
    assert float(rows[short]["top1_std"]) > 0
    assert rows[long]["runs"] == "1" and float(rows[long]["epochs"]) == 6
    assert rows[small]["runs"] == "1" and "32-image subset of the training" in \
        rows[small]["notes"]
    md = (out / "table.md").read_text()
    assert f"| seed ({long})" in md and f"| seed ({short})" in md
    assert "2 runs" in capsys.readouterr().out


def test_arguments(tmp_path, capsys, data_dir):
    out = str(tmp_path / "t")
    one_line_error(capsys, ["--models", "resnet20,resnet2o", "--out", out], "unknown model")
    one_line_error(capsys, ["--train", "--recipes", "seed,fsat", "--models", "resnet20",
                            "--out", out, "--data-dir", data_dir], "unknown recipe 'fsat'")
    one_line_error(capsys, ["--recipes", "sed", "--models", "resnet20", "--out", out],
                   "unknown recipe 'sed' (did you mean 'seed'?)")  # without --train too
    one_line_error(capsys, ["--models", "resnet20", "--set", "optim.lrr=2", "--out", out],
                   "--set only shape rows that --train trains")
    assert not (tmp_path / "t").exists()
    one_line_error(capsys, ["--train", "--recipes", "fast", "--models", "airbench94",
                            "--out", out, "--data-dir", data_dir],
                   "has no preset for model family 'speedrun'")
    one_line_error(capsys, ["--runs", str(tmp_path / "missing"), "--out", out],
                   "no such directory")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["--runs", str(tmp_path / "empty"), "--out", out],
                   "no finished run")
    one_line_error(capsys, ["--budget-min", "-1", "--out", out], "--budget-min")
    one_line_error(capsys, ["--parallel", "0", "--out", out], "--parallel must be >= 1")


def test_help_through_the_cli(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["table", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--train" in text and "--recipes" in text and "--budget-min" in text


# --------------------------------------------------------------------------- recipes

def test_row_command_reproduces_the_row_config(tmp_path):
    """The per-row `fastres train` line, parsed as `fastres train` parses it, gives the
    exact config the table planned (phase 2 scaled, table settings, --set)."""
    from fastres.tools import train as train_tool

    args = T.get_args_parser().parse_args(
        ["--train", "--epochs", "10", "--data-dir", str(tmp_path), "--set",
         "data.cutout=8", "--set", "schedule.milestones=[0.3,0.6]", "--device", "cpu"])
    for model, recipe, preset in (("resnet56", "seed", "seed"), ("resnet56", "fast", "fast"),
                                  ("vgg16", "fast", "fast-vgg"),
                                  ("googlenet_cifar", "fast", "fast-googlenet")):
        name, cfg = T.row_config(model, recipe, args)
        assert name == preset and cfg.model.name == model and cfg.schedule.epochs == 10
        cfg = C.replace(cfg, run={"out_dir": str(tmp_path / model / recipe)})
        cmd = T.train_command(name, cfg, tmp_path / model / recipe, resume=False,
                              overwrite=False)
        assert cmd[1:4] == ["-m", "fastres", "train"]
        parsed = train_tool.get_args_parser().parse_args(cmd[4:])
        assert train_tool.config_from_args(parsed) == cfg
    _, seed = T.row_config("resnet20", "seed", args)
    assert seed.schedule.two_phase_epochs == pytest.approx(10 / 6)


def test_fast_presets_cover_the_article_families():
    from fastres.models import model_info

    for model in T.ARTICLE_MODELS:
        name = C.recipe_preset("fast", model_info(model)["family"])
        cfg = C.validate(C.preset(name))
        assert cfg.schedule.epochs <= C.preset("seed").schedule.epochs / 2   # half seed's
        assert cfg.optim.name == "sgd" and cfg.optim.nesterov
    assert C.recipe_preset("seed", "vgg") == "seed"      # a plain preset, for every family
    with pytest.raises(C.ConfigError, match="unknown recipe"):
        C.recipe_preset("fsat", "resnet-cifar")


def test_with_epochs_keeps_phase_2_fraction():
    seed = C.preset("seed")
    assert seed.schedule.two_phase_epochs / seed.schedule.epochs == pytest.approx(1 / 6)
    for epochs in (1, 10, 90):
        s = C.preset("seed", epochs=epochs).schedule
        assert s.epochs == epochs and s.two_phase_epochs == pytest.approx(epochs / 6)
        C.validate(C.preset("seed", epochs=epochs))
    paper = C.preset("resnet-paper", epochs=5).schedule   # a length in steps gives way
    assert paper.steps == 0 and paper.epochs == 5 and paper.two_phase_epochs == 0
    assert C.preset("fast", epochs=7).schedule.two_phase_epochs == 0
