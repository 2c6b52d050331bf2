"""`fastres table`: the results table, its training loop and the recipes it trains.

What is checked, on a tiny synthetic CIFAR-10 in the real on-disk format: `--train --scale
smoke` trains one run directory per (model, recipe) in its own process and writes table.md
(conventions first), table.csv and table.png; a second call trains nothing; a partial row
resumes, a failing row is reported while the others go on; rows trained with other
settings are refused before anything trains; every row's command reproduces its config;
the `fast` presets cover the article's model families and phase 2 scales with the run.
Timings are never asserted.
"""
import csv
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
    import json
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


def test_arguments(tmp_path, capsys, data_dir):
    out = str(tmp_path / "t")
    one_line_error(capsys, ["--models", "resnet20,resnet2o", "--out", out], "unknown model")
    one_line_error(capsys, ["--train", "--recipes", "seed,fsat", "--models", "resnet20",
                            "--out", out, "--data-dir", data_dir], "unknown recipe 'fsat'")
    one_line_error(capsys, ["--train", "--recipes", "fast", "--models", "airbench94",
                            "--out", out, "--data-dir", data_dir],
                   "has no preset for model family 'speedrun'")
    one_line_error(capsys, ["--runs", str(tmp_path / "missing"), "--out", out],
                   "no such directory")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["--runs", str(tmp_path / "empty"), "--out", out],
                   "no finished run")
    one_line_error(capsys, ["--budget-min", "-1", "--out", out], "--budget-min")


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
