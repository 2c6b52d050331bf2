"""`fastres table`: the reference article's CIFAR-10 results table, filled by one command.

    fastres table                                        # params, FLOPs, article figures
    fastres table --train --models resnet20,resnet56 --recipes seed,fast \\
                  --data-dir data --out runs/table       # train the missing rows, then write
    fastres table --train --models resnet20 --recipes seed,fast --epochs 10 \\
                  --data-dir data --out runs/table-10ep  # both recipes at an equal length
    fastres table --runs runs/ --out runs/table          # finished runs from elsewhere too

One row per (model, recipe). A recipe is a preset, or `fast`, whose preset depends on the
model's family (`fastres.config.FAMILY_RECIPES`: `fast` for He et al.'s CIFAR ResNets,
`fast-preact`, `fast-googlenet`, `fast-vgg`). Runs of one (model, recipe) share a row
(mean ± std) only as repeats, differing in the seed alone (or in NOT_TRAINING: how often
they evaluate, log, checkpoint); runs of another length, data limit, config or process
count are rows of their own, the recipe column naming what differs ('smoke (epochs=6)'). With --train, each
row is a run directory OUT/MODEL/RECIPE trained by its own `python -m fastres train`
process (so a failing row cannot take the others down; the line printed and logged is the
exact command, interpreter included): the data are checked first (once, as `fastres train`
checks them: a missing data set is one line, exit 2), a finished row (result.json) is
read, never re-trained; a partial one (a checkpoint, no result) continues with --resume; a
row that failed is reported and the others go on. Running the same command again
finishes what is left.

--epochs sets every row's length, with each recipe's phase 2 kept at the same fraction of
the run (`fastres.config.with_epochs`: seed's last 10 of 60 epochs become the last 10/6 of
10). --scale smoke shrinks every row to seconds (64 training images, 2 epochs) for tests.
--budget-min stops launching rows when the budget is spent and stops a row that runs past
it with SIGTERM (the trainer checkpoints; the next call resumes it).

Writes OUT/table.md (conventions at the top: device, data, what the training time
includes), OUT/table.csv and OUT/table.png (Top-1 against training time, one marker per
row, one colour per recipe), each atomically. Each row's training log is
OUT/logs/MODEL-RECIPE.log. OUT is taken before any run is read or trained, under the
run-directory contract: its location is checked, it is locked (a second table process into
it is refused), and a folder holding anything but a table (table files, logs/, MODEL/
directories) is refused unless --overwrite (moved to OUT.old-<time>, nothing deleted). Run
directories are read through `fastres.engine.rundir.inspect`.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from fastres.tools._common import (add_overwrite_arg, check_model, claim_output_dir, csv_list,
                                   env_line, fmt, markdown_table, pct, save_figure, summarize,
                                   write_text)

# The article's table, in its order (VGG-16 is its ImageNet reference row).
ARTICLE_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                  "preact_resnet18", "googlenet_cifar", "vgg16")
DEFAULT_RECIPES = ("seed", "fast")
# The article's printed Top-1 / Top-5 (%), shared/REFERENCE.md; used where the model
# registry's `article` figures do not carry them (it holds params_m and gflops).
ARTICLE_ACCURACY = {
    "resnet20": ("92.02", "99.02"), "resnet32": ("92.40", "99.15"),
    "resnet44": ("92.49", "99.18"), "resnet56": ("92.62", "99.21"),
    "resnet110": ("92.65", "99.22"), "resnet1202": ("92.84", "99.26"),
    "preact_resnet18": ("90.77", "98.63"), "googlenet_cifar": ("91.22", "98.90"),
}
# --scale smoke: every row cut to seconds on a 2-core CPU (4 steps of 32 images, phase 2
# included, one evaluation at the end); its accuracy means nothing, the point is the whole
# path (train, resume, read, write).
SMOKE = {"data": {"train_limit": 64, "test_limit": 32, "batch_size": 32,
                  "eval_batch_size": 32, "workers": 0}, "run": {"eval_every": 0.0}}
SMOKE_EPOCHS = 2.0
# Fixed for every row the table trains: a checkpoint every epoch, so a row stopped
# mid-run (budget, Ctrl-C, a crash) loses at most one epoch.
ROW_RUN = {"checkpoint_every": 1}
# What may be in a table folder besides the rows' MODEL/ directories: the table updates
# such a folder in place; anything else there is the user's and refuses the folder.
TABLE_FILES = ("table.md", "table.csv", "table.png", "logs")
# Config fields in which runs of one model and recipe may differ and still be repeats,
# pooled in one row (mean ± std): the seed, and what does not change what is trained (how
# often the run evaluates, logs and checkpoints, the accuracy it reports aiming for). The
# resume-exempt fields (run directory, data folder, progress, workers) are skipped too.
# Any other difference (length, data limits, optimizer, device, ...) makes another row.
NOT_TRAINING = (("run", "seed"), ("run", "eval_every"), ("run", "checkpoint_every"),
                ("run", "log_every"), ("run", "target_acc"))
JPEG_NOTE = ("a JPEG-75 copy of CIFAR-10 scores ~3 points below the official files")
CSV_FIELDS = ("model", "recipe", "variant", "preset", "status", "runs", "top1", "top1_std",
              "top5", "top5_std", "tta", "tta_top1", "article_top1", "article_top5", "delta_top1",
              "train_min", "train_min_std", "img_per_s", "gpu_busy", "wall_min", "parallel",
              "epochs", "params", "params_m",
              "article_params_m", "flops", "gflops", "gmacs", "article_gflops", "device",
              "data_official", "test_images", "run_dirs", "notes")
HEADERS = ("Model", "Recipe", "Top-1 %", "Top-5 %", "TTA Top-1 %", "Article Top-1/5",
           "Δ Top-1", "Time (min)", "img/s", "GPU busy %", "Epochs", "Params (M)",
           "Article params (M)", "GFLOPs", "Article GFLOPs", "Device", "Data", "Status")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres table", description="The reference article's CIFAR-10 results table, "
        "one row per (model, recipe): Top-1, Top-5, parameters, FLOPs and training time "
        "beside the article's figures; --train trains the rows that are missing.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  fastres table --train --models resnet20,resnet56 --recipes "
               "seed,fast --data-dir data --out runs/table")
    p.add_argument("--models", help="comma-separated model names (default: the models of "
                   "the runs found, else the article's: " + ",".join(ARTICLE_MODELS) + ")")
    p.add_argument("--recipes", help="comma-separated recipes: `fast` (ours, per model "
                   "family) or any preset (default: the recipes of the runs found, else "
                   + ",".join(DEFAULT_RECIPES) + ")")
    p.add_argument("--out", default="runs/table", metavar="DIR",
                   help="table folder: table.md, table.csv, table.png, and the rows' run "
                        "directories OUT/MODEL/RECIPE (default runs/table)")
    add_overwrite_arg(p, "--out")
    p.add_argument("--runs", nargs="+", default=[], metavar="DIR",
                   help="also read finished runs from these run directories or folders "
                        "(their recipe is recognised from their config, else 'custom'; "
                        "runs share a row only as repeats that differ in the seed)")
    tg = p.add_argument_group("training the missing rows")
    tg.add_argument("--train", action="store_true",
                    help="train every listed row OUT/MODEL/RECIPE that is not finished "
                         "(resuming partial ones), one process per row")
    tg.add_argument("--scale", choices=("full", "smoke"), default="full",
                    help="full: the recipes as registered; smoke: a few seconds per row "
                         "(64 train / 32 test images, 2 epochs) for tests")
    tg.add_argument("--epochs", type=float, help="every row's length in epochs (phase 2 "
                    "scaled to the same fraction of the run); default: each recipe's own")
    tg.add_argument("--budget-min", type=float, metavar="M",
                    help="wall-clock minutes for training: no row starts after them, and a "
                         "row running past them is stopped with a checkpoint (resumable)")
    tg.add_argument("--parallel", type=int, default=1, metavar="N",
                    help="train up to N rows at once, each its own process on the same "
                         "device (small nets leave a large GPU idle; on a CPU the rows split "
                         "the cores); default 1")
    tg.add_argument("--data-dir", help="folder with cifar-10-batches-py/ or the .tar.gz")
    tg.add_argument("--download", action="store_true",
                    help="download the official archive into --data-dir if missing")
    tg.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    tg.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    tg.add_argument("--compile", choices=("auto", "on", "step", "off"))
    tg.add_argument("--seed", type=int, help="random seed")
    tg.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="SECTION.KEY=VALUE", help="override a config field in every row "
                    "(repeatable; `fastres train --help-config` lists them)")
    return p


# --------------------------------------------------------------------------- run records

def _is_table_dir(path: Path) -> bool:
    """True when everything in `path` is what a table folder holds (its files, logs/, and
    one directory per registered model): the table may update it in place."""
    from fastres.engine import rundir
    from fastres.models import list_models

    models = set(list_models())
    return all(name in TABLE_FILES or (name in models and (path / name).is_dir())
               for name in rundir.contents(path))


def read_run(run_dir: str | Path, recipe: str | None = None) -> dict:
    """One finished run: model, recipe, accuracy, timing and device from its record files
    (`rundir.inspect`). `recipe`: known from the table's layout; None = recognised from the
    config."""
    from fastres.engine import rundir

    info = rundir.inspect(run_dir)
    info.require("config", "result")
    cfg, res, env = info.config, info.result, info.env or {}
    run_dir = info.path
    data = env.get("data") or {}
    return {
        "dir": str(run_dir), "model": cfg["model"]["name"],
        "recipe": recipe or recipe_of(cfg), "config": cfg,
        "kwargs": cfg["model"].get("kwargs") or {}, "dataset": cfg["data"]["dataset"],
        "test_limit": cfg["data"].get("test_limit", 0), "top1": res["top1"],
        "top5": res["top5"], "tta": res.get("tta") or "none", "tta_top1": res.get("tta_top1"),
        "timed_s": res["timed_s"], "img_per_s": res.get("img_per_s"),
        "epochs": res.get("epochs"), "device": res.get("device") or env.get("device"),
        "test_size": data.get("test_size"), "world_size": res.get("world_size", 1),
        "official": data.get("official"), "env": env,
        "fingerprints": info.data_fingerprints,
    }


def find_runs(paths) -> list[dict]:
    """Finished runs (a result.json beside a config.json) at or under each path."""
    from fastres.errors import ConfigError

    runs = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"--runs {p}: no such directory")
        found = [p] if (p / "result.json").is_file() else sorted(
            r.parent for r in p.rglob("result.json") if (r.parent / "config.json").is_file())
        if not found:
            raise ConfigError(f"--runs {p}: no finished run there (a folder with result.json "
                              "and config.json, as `fastres train --out` writes)")
        runs += [read_run(d) for d in found]
    return runs


def recipe_of(cfg: dict) -> str:
    """The recipe a recorded config was trained with: the first recipe whose preset (for
    the model's family) has the same optimizer settings and schedule shape, else 'custom'.
    Lengths, data (limits, batch) and run settings may differ: a shorter run, or the smoke
    scale's, is the same recipe (in a row of its own: `repeat_groups`)."""
    from fastres import config as C
    from fastres.errors import ConfigError
    from fastres.models import list_models, model_info

    name = cfg.get("model", {}).get("name")
    family = model_info(name)["family"] if name in list_models() else None
    shape = ("lr_schedule", "warmup", "start_factor", "peak", "final_factor", "milestones",
             "gamma")
    for recipe in C.list_recipes():
        try:
            want = C.to_dict(C.preset(C.recipe_preset(recipe, family)))
        except ConfigError:
            continue
        if _differences(cfg, want, sections={"optim": None, "schedule": shape}) == []:
            return recipe
    return "custom"


def _differences(have: dict, want: dict, sections: dict) -> list[str]:
    """'section.key: a there, b now' for each field of `want` (only the keys listed per
    section, all when None) that is set (not auto/None) and recorded in `have` with another
    value. Resolved fields (auto -> a device's choice) and resume-exempt ones are skipped."""
    from fastres.engine.records import RESUME_EXEMPT

    diffs = []
    for sec, keys in sections.items():
        for key, value in want.get(sec, {}).items():
            if keys is not None and key not in keys:
                continue
            if (sec, key) in RESUME_EXEMPT or value is None or value == "auto":
                continue
            if sec == "optim" and key in ("impl", "eval_weights"):
                continue
            if key not in have.get(sec, {}):
                continue  # a field newer than the record: nothing to compare
            got = have[sec][key]
            norm = list(value) if isinstance(value, tuple) else value
            got = list(got) if isinstance(got, tuple) else got
            if got != norm:
                diffs.append(f"{sec}.{key}: {got!r} there, {norm!r} now")
    return diffs


def training_settings(cfg: dict) -> dict:
    """'section.key' -> value for every field of a recorded config that shapes what the run
    trained: all but NOT_TRAINING and the resume-exempt fields (where the files are, how
    progress shows). Runs with the same model, recipe and settings are repeats of one row."""
    from fastres.engine.records import RESUME_EXEMPT

    skip = RESUME_EXEMPT | set(NOT_TRAINING)
    return {f"{sec}.{key}": value for sec, values in cfg.items() if isinstance(values, dict)
            for key, value in values.items() if (sec, key) not in skip}


def run_settings(run: dict) -> dict:
    """A finished run's training settings, with the number of processes it trained on
    (not a config field: the world size) as 'run.processes'."""
    return {**training_settings(run["config"]), "run.processes": run.get("world_size", 1)}


def repeat_groups(runs: list[dict]) -> list[list[dict]]:
    """`runs` (of one model and recipe) in groups of repeats, one per row: runs with the
    same training settings on as many processes (so they differ in the seed alone), in the
    order of their first run."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        key = json.dumps(run_settings(r), sort_keys=True)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def variant_labels(groups: list[list[dict]]) -> list[str]:
    """What tells apart the rows of one model and recipe: for each group, the settings in
    which the groups differ ('train_limit=64, epochs=2'); '' when there is one group. A
    field is named by its key alone where no other section has that key."""
    if len(groups) < 2:
        return [""] * len(groups)
    settings = [run_settings(g[0]) for g in groups]
    fields = list(dict.fromkeys(k for s in settings for k in s))
    differ = [k for k in fields if len({json.dumps(s.get(k, "?")) for s in settings}) > 1]
    keys = [k.partition(".")[2] for k in fields]

    def name(field: str) -> str:
        key = field.partition(".")[2]
        return key if keys.count(key) == 1 else field

    def value(v) -> str:
        return format(v, ".6g") if isinstance(v, float) else _set_value(v)

    return [", ".join(f"{name(k)}={value(s[k]) if k in s else '?'}" for k in differ)
            for s in settings]


# --------------------------------------------------------------------------- planning rows

def row_config(model: str, recipe: str, args):
    """(preset name, validated config) for one row: the recipe's preset for the model's
    family, the model, --epochs (phase 2 scaled), --scale, the table's checkpointing, then
    the flags and --set."""
    from fastres import config as C
    from fastres.models import model_info

    preset_name = C.recipe_preset(recipe, model_info(model)["family"])
    epochs = args.epochs if args.epochs is not None else \
        SMOKE_EPOCHS if args.scale == "smoke" else None
    cfg = C.preset(preset_name, epochs=epochs)
    cfg = C.replace(cfg, model={"name": model}, run=dict(ROW_RUN))
    if args.scale == "smoke":
        cfg = C.replace(cfg, **SMOKE)
    flags = {"data": {"data_dir": args.data_dir, "download": args.download or None},
             "run": {"device": args.device, "precision": args.precision,
                     "compile": args.compile, "seed": args.seed}}
    cfg = C.replace(cfg, **{sec: {k: v for k, v in vals.items() if v is not None}
                            for sec, vals in flags.items()})
    return preset_name, C.validate(C.override(cfg, args.overrides))


def check_recipe(recipe: str, train: bool) -> None:
    """ConfigError for a recipe name that is neither a recipe nor a preset (with a
    suggestion); 'custom' (runs read with --runs whose config matches no recipe) is a row
    that can be shown, not trained."""
    from fastres import config as C
    from fastres.errors import unknown_choice

    if recipe not in C.list_recipes() and not (recipe == "custom" and not train):
        raise unknown_choice("recipe", recipe, C.list_recipes())


def plan_rows(models: list[str], recipes: list[str], out: Path, args) -> list[dict]:
    """One entry per (model, recipe): its directory, state and, with --train, its preset
    and config. Every row is planned before any trains: a typo, a recipe without a preset
    for a model's family, or a finished row trained with other settings stops here, not
    hours in."""
    from fastres import config as C
    from fastres.engine import rundir
    from fastres.errors import ConfigError
    from fastres.models import model_info

    plan = []
    for m in models:
        for recipe in recipes:
            d = out / m / recipe
            row = dict(model=m, recipe=recipe, preset="", cfg=None, state=row_state(d), dir=d)
            plan.append(row)
            if not args.train:
                with contextlib.suppress(ConfigError):  # 'custom', or no preset: fine to read
                    row["preset"] = C.recipe_preset(recipe, model_info(m)["family"])
                continue
            row["preset"], cfg = row_config(m, recipe, args)
            row["cfg"] = cfg = C.replace(cfg, run={"out_dir": str(d)})
            recorded = rundir.inspect(d).config
            if row["state"] in ("finished", "partial") and recorded is not None:
                diffs = _differences(recorded, C.to_dict(cfg), {s: None for s in C.SECTIONS})
                if diffs:
                    raise ConfigError(
                        f"{d} holds a {row['state']} run with other settings "
                        f"({'; '.join(diffs)}); train it with the same --epochs/--scale/--set, "
                        "or into another --out")
    return plan


def _set_value(value) -> str:
    """A config value as `--set` reads it back (fastres.config.override)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return repr(value) if isinstance(value, float) else str(value)


def train_command(preset_name: str, cfg, row_dir: Path, resume: bool,
                  overwrite: bool) -> list[str]:
    """The `python -m fastres train` line for one row: its preset, then `--set` for every
    field the row changes, so the command alone reproduces the row."""
    from fastres import config as C
    from fastres.engine.records import RESUME_EXEMPT

    base, now = C.to_dict(C.preset(preset_name)), C.to_dict(cfg)
    cmd = [sys.executable, "-m", "fastres", "train", "--preset", preset_name,
           "--data-dir", cfg.data.data_dir, "--out", str(row_dir)]
    if cfg.data.download:
        cmd.append("--download")
    for sec, values in now.items():
        for key, value in values.items():
            if (sec, key) not in RESUME_EXEMPT and value != base[sec][key]:
                cmd += ["--set", f"{sec}.{key}={_set_value(value)}"]
    if resume:
        cmd.append("--resume")
    elif overwrite:
        cmd.append("--overwrite")
    return cmd


def check_data(plan: list[dict]) -> None:
    """Read the data of the rows to train, once per data set, before any row starts: the
    check `fastres train` itself makes (`load_data`: the folder exists and holds a readable
    data set in a layout fastres reads; with --download, the archive is fetched here, once).
    A missing or broken data set is one DataError line (exit 2), not a failed process per
    row."""
    from fastres.engine.build import load_data

    seen = set()
    for row in plan:
        cfg = row["cfg"]
        if row["state"] == "finished" or cfg is None:
            continue
        key = (cfg.data.data_dir, cfg.data.dataset, cfg.data.download)
        if key not in seen:
            seen.add(key)
            load_data(cfg)


def row_state(row_dir: Path) -> str:
    """finished (result.json), partial (a checkpoint to resume), stale (started, nothing to
    resume: a new run must replace it) or new."""
    from fastres.engine import rundir

    return {"finished": "finished", "checkpoint": "partial", "started": "stale",
            "other": "stale"}.get(rundir.inspect(row_dir).state, "new")


def epochs_done(row_dir: Path) -> int:
    """Epochs a partial row has logged (metrics.jsonl lines with an epoch time)."""
    from fastres.engine import rundir

    return rundir.inspect(row_dir).epochs_logged


def _train_supports_overwrite() -> bool:
    # `fastres train --overwrite` (strict run directories) replaces a started run that left
    # nothing to resume; before that flag exists, a new run simply writes over it.
    from fastres.tools.train import get_args_parser as train_parser

    _, unknown = train_parser(add_help=False).parse_known_args(["--overwrite"])
    return not unknown


# --------------------------------------------------------------------------- training

def _tee(stream, log, prefix: str) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        print(prefix + line, end="", flush=True)


class GpuBusySampler:
    """The device's busy share while rows train: `nvidia-smi` streams the GPU's utilisation
    (the share of the last sample period in which any kernel ran, the driver's figure)
    every `period_ms`; `mean(t0, t1)` averages the samples taken between two
    time.monotonic() readings. With rows trained side by side it is the whole device's
    share, which is the point: it says whether the GPU is saturated. None where nvidia-smi
    is missing or answers nothing."""

    def __init__(self, gpu: str, period_ms: int = 500):
        self.samples: list[tuple[float, float]] = []
        self.error: str | None = None
        self._proc = None
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
               "-i", gpu, "-lms", str(period_ms)]
        # Into a pipe, nvidia-smi's stdio would buffer ~4 KB (minutes of 3-byte samples)
        # before the first line arrives: line-buffer it where coreutils' stdbuf exists.
        if shutil.which("stdbuf"):
            cmd = ["stdbuf", "-oL", *cmd]
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except OSError as e:
            self.error = f"nvidia-smi: {e.strerror or e}"
            return
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import time

        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.monotonic(), float(line.strip()) / 100.0))

    def mean(self, t0: float, t1: float) -> tuple[float | None, int]:
        """(mean busy fraction, samples) over [t0, t1]."""
        got = [v for t, v in list(self.samples) if t0 <= t <= t1]
        return (sum(got) / len(got) if got else None), len(got)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and not self.samples and self.error is None:
            self.error = "nvidia-smi gave no readable sample"


def rows_gpu(plan: list[dict]) -> str | None:
    """The nvidia-smi id (index or UUID) of the GPU the rows train on, None on a CPU. The
    rows share one device (their config says which); CUDA_VISIBLE_DEVICES maps torch's
    index to the driver's."""
    devices = {r["cfg"].run.device for r in plan if r.get("cfg") is not None}
    if not devices:
        return None
    device = sorted(devices)[0]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return None
    index = int(device.partition(":")[2] or 0)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def row_record_path(out: Path, model: str, recipe: str) -> Path:
    """The table's own record of training one row (wall clock, rows beside it, GPU busy):
    in OUT/logs, not in the row's run directory, which is the trainer's."""
    return out / "logs" / f"{model}-{recipe}.json"


def read_row_record(out: Path, model: str, recipe: str) -> dict:
    path = row_record_path(out, model, recipe)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _record_row(out: Path, row: dict, wall_s: float, parallel: int,
                busy: tuple[float | None, int]) -> None:
    """Add one training process's wall clock and busy samples to the row's record (a
    resumed row sums its processes; busy is averaged over all their samples)."""
    rec = read_row_record(out, row["model"], row["recipe"])
    # A mean is None exactly when it has no samples, so sums weight by sample count.
    total = (rec.get("gpu_busy") or 0.0) * rec.get("busy_samples", 0) + (busy[0] or 0.0) * busy[1]
    n = rec.get("busy_samples", 0) + busy[1]
    rec.update(wall_s=rec.get("wall_s", 0.0) + wall_s, processes=rec.get("processes", 0) + 1,
               parallel=max(rec.get("parallel", 1), parallel),
               gpu_busy=total / n if n else None, busy_samples=n)
    write_text(row_record_path(out, row["model"], row["recipe"]),
               json.dumps(rec, indent=1) + "\n")


class _RowProcess:
    """One row's training process: its output goes to its log and, prefixed, to the
    terminal."""

    def __init__(self, row: dict, cmd: list[str], log_path: Path, prefix: str, env: dict):
        import time

        self.row, self.log_path = row, log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "a")
        self.log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(cmd)}\n")
        self.log.flush()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, env=env)
        self.reader = threading.Thread(target=_tee, args=(self.proc.stdout, self.log, prefix),
                                       daemon=True)
        self.reader.start()
        self.stopped = False   # sent SIGTERM at the budget
        self.stop_at = None    # when to kill it if SIGTERM was not enough

    def stop(self) -> None:
        import time

        if not self.stopped and self.proc.poll() is None:
            self.stopped = True
            self.stop_at = time.monotonic() + 300
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> float:
        import time

        wall = time.monotonic() - self.t0
        self.reader.join(timeout=10)
        self.log.close()
        return wall


def _row_env(parallel: int) -> dict:
    """Each row process's environment. Side by side, the rows split the host's cores
    (OMP_NUM_THREADS, unless the caller set it): N processes each running one OpenMP team
    per core spin against each other."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if parallel > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // parallel))
    return env


def train_rows(plan: list[dict], out: Path, budget_min: float | None,
               parallel: int = 1) -> float:
    """Train each planned row that is not finished, each in its own process, up to
    `parallel` at a time on the same device; record each row's outcome in its plan entry
    ("status", "log") and its wall clock and GPU-busy share in OUT/logs/MODEL-RECIPE.json.
    Returns the wall-clock seconds spent. Past the budget no row starts and running rows
    get SIGTERM (the trainer checkpoints; the next call resumes them); a SIGTERM or Ctrl-C
    to the table reaches every row the same way, then stops the table."""
    import collections
    import time

    todo = [r for r in plan if r["state"] != "finished"]
    if not todo:
        print("every row is finished: nothing to train", flush=True)
        return 0.0
    overwrite = _train_supports_overwrite()
    t_start = time.monotonic()
    deadline = None if budget_min is None else t_start + 60 * budget_min
    gpu = rows_gpu(todo)
    sampler = GpuBusySampler(gpu) if gpu is not None else None
    env = _row_env(parallel)
    pending = collections.deque(enumerate(todo))
    running: list[_RowProcess] = []
    terminated: list[int] = []

    def forward(signum, frame):
        terminated.append(signum)
        for rp in running:
            if rp.proc.poll() is None:
                rp.proc.send_signal(signum)

    def launch(i: int, row: dict) -> None:
        name = f"{row['model']} / {row['recipe']}"
        resume = row["state"] == "partial"
        cmd = train_command(row["preset"], row["cfg"], row["dir"], resume,
                            overwrite and row["state"] == "stale")
        log = out / "logs" / f"{row['model']}-{row['recipe']}.log"
        row["log"] = str(log)
        print(f"[{i + 1}/{len(todo)}] {'resuming' if resume else 'training'} {name} "
              f"(preset {row['preset']}) -> {row['dir']}\n    $ {shlex.join(cmd)}",
              flush=True)
        prefix = "    " if parallel == 1 else f"    [{row['model']}/{row['recipe']}] "
        running.append(_RowProcess(row, cmd, log, prefix, env))

    def finish(rp: _RowProcess) -> None:
        wall = rp.close()
        row, name = rp.row, f"{rp.row['model']} / {rp.row['recipe']}"
        busy = sampler.mean(rp.t0, rp.t0 + wall) if sampler else (None, 0)
        _record_row(out, row, wall, parallel, busy)
        if (row["dir"] / "result.json").is_file():
            # result.json exists only for a finished run, whatever the exit status (a stop
            # at the budget can land after the run has written it).
            row["state"] = "finished"
            print(f"    {name}: finished in {wall / 60:.1f} min wall clock" +
                  (f", GPU busy {100 * busy[0]:.0f}%" if busy[0] is not None else ""),
                  flush=True)
        elif rp.stopped or terminated:
            row["status"] = (f"partial: stopped {'at the budget ' if rp.stopped else ''}"
                             f"after {epochs_done(row['dir'])} epochs; the same command "
                             "resumes it")
            print(f"    {name}: {row['status']}", flush=True)
        else:
            row["status"] = f"failed (exit {rp.proc.returncode}; log {rp.log_path})"
            print(f"    {name}: FAILED with exit status {rp.proc.returncode}; the other "
                  f"rows go on; log: {rp.log_path}", flush=True)

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, forward)
    try:
        while pending or running:
            now = time.monotonic()
            over = deadline is not None and now >= deadline
            while pending and len(running) < parallel and not over and not terminated:
                launch(*pending.popleft())
            if over or terminated:
                why = "the budget is spent" if over else "the table was stopped"
                for i, row in pending:
                    row["status"] = "not trained (budget spent)" if over else \
                        "not trained (stopped)"
                    print(f"[{i + 1}/{len(todo)}] {row['model']} / {row['recipe']}: not "
                          f"started, {why}", flush=True)
                pending.clear()
            if over:
                for rp in running:
                    rp.stop()
            for rp in list(running):
                if rp.proc.poll() is not None:
                    running.remove(rp)
                    finish(rp)
                elif rp.stop_at is not None and time.monotonic() >= rp.stop_at:
                    rp.proc.kill()
            if running:
                time.sleep(0.2)
    except KeyboardInterrupt:
        # Ctrl-C reached every trainer too (same process group): let them checkpoint.
        for rp in running:
            rp.proc.wait()
            finish(rp)
        raise
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if sampler is not None:
            sampler.stop()
    wall = time.monotonic() - t_start
    print(f"training: {wall / 60:.1f} min wall clock, up to {parallel} row"
          f"{'s' if parallel != 1 else ''} at a time", flush=True)
    if sampler is not None and sampler.error:
        print(f"GPU busy %: not measured ({sampler.error})", file=sys.stderr, flush=True)
    if terminated:
        raise KeyboardInterrupt  # stop the table too; the next call resumes the rows
    return wall


# --------------------------------------------------------------------------- rows

def model_counts(name: str, num_classes: int, kwargs: dict) -> dict:
    """Parameters and forward FLOPs at 32x32, batch 1, with the run's model kwargs: the
    `fastres models` figures at the defaults, else built on the meta device (counts
    depend on shapes only)."""
    import torch

    from fastres.models import count_flops, count_params, create_model
    from fastres.tools.models import counts

    if not kwargs:
        return counts(name, num_classes, 32)

    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kwargs)
    flops = count_flops(model, (1, 3, 32, 32))
    return {"params": count_params(model), "flops": flops}


def table_row(name: str, recipe: str, runs: list[dict], status: str | None = None,
              preset_name: str | None = None, counts: dict | None = None,
              record: dict | None = None, variant: str = "") -> dict:
    """One row of the table from its runs (repeats: `repeat_groups`); `record` is the
    table's own record of training it (read_row_record: wall clock, rows beside it, GPU
    busy), empty for runs trained elsewhere; `variant` tells it apart from other rows of
    the same model and recipe (`variant_labels`)."""
    from fastres.models import model_info
    from fastres.tools.models import reference_notes

    from fastres.config import num_classes_for

    info = model_info(name)
    num_classes = num_classes_for(runs[0]["dataset"] if runs else "cifar10")
    kwargs = runs[0]["kwargs"] if runs else {}
    counts = counts or model_counts(name, num_classes, kwargs)
    notes = reference_notes(dict(name=name, params=counts["params"], num_classes=num_classes,
                                 image_size=32, gflops=counts["flops"] / 1e9, info=info))
    if kwargs:
        notes.insert(0, "model " + ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    limited = [r for r in runs if r["test_limit"] and r["test_limit"] < (r["test_size"] or 0)]
    if limited:
        notes.append(f"tested on a {limited[0]['test_limit']}-image subset of the "
                     f"{limited[0]['test_size']} test images")
    trained_on = [r["config"]["data"].get("train_limit", 0) for r in runs]
    if any(trained_on):
        notes.append(f"trained on a {max(trained_on)}-image subset of the training set")
    if any(len(r.get("fingerprints") or []) > 1 for r in runs):
        notes.append("resumed on another copy of the data (its history.jsonl names "
                     "each data fingerprint)")
    if any(r["world_size"] > 1 for r in runs):
        notes.append(f"{runs[0]['world_size']} processes")
    article = dict(info["article"])
    top1_a, top5_a = ARTICLE_ACCURACY.get(name, (None, None))
    article.setdefault("top1", top1_a)
    article.setdefault("top5", top5_a)
    top1, top5 = summarize(r["top1"] for r in runs), summarize(r["top5"] for r in runs)
    minutes = summarize(r["timed_s"] / 60 for r in runs)
    official = {r["official"] for r in runs}
    tta = sorted({r["tta"] for r in runs if r["tta"] != "none"})
    return {
        "model": name, "recipe": recipe, "variant": variant, "preset": preset_name or "",
        "status": status or (f"{len(runs)} run{'s' if len(runs) != 1 else ''}" if runs
                             else "not trained"),
        "runs": len(runs), "top1": pct(top1["mean"]), "top1_std": pct(top1["std"]),
        "top5": pct(top5["mean"]), "top5_std": pct(top5["std"]), "tta": ",".join(tta),
        "tta_top1": pct(summarize(r["tta_top1"] for r in runs)["mean"]),
        "article_top1": article.get("top1"), "article_top5": article.get("top5"),
        "delta_top1": (100 * top1["mean"] - float(article["top1"]))
        if top1["n"] and article.get("top1") else None,
        "train_min": minutes["mean"], "train_min_std": minutes["std"],
        "img_per_s": summarize(r["img_per_s"] for r in runs)["mean"],
        "gpu_busy": pct(record.get("gpu_busy")) if record else None,
        "wall_min": record["wall_s"] / 60 if record and "wall_s" in record else None,
        "parallel": record.get("parallel") if record else None,
        "epochs": summarize(r["epochs"] for r in runs)["mean"],
        "params": counts["params"], "params_m": counts["params"] / 1e6,
        "article_params_m": article.get("params_m"), "flops": counts["flops"],
        "gflops": counts["flops"] / 1e9, "gmacs": counts["flops"] / 2e9,
        "article_gflops": article.get("gflops"),
        "device": "; ".join(sorted({str(r["device"]) for r in runs})),
        "data_official": "" if not runs else "yes" if official == {True} else
        "no" if official == {False} else "mixed",
        "test_images": summarize((r["test_limit"] or r["test_size"]) for r in runs)["mean"],
        "run_dirs": [r["dir"] for r in runs], "notes": notes,
    }


def _recipe_label(r: dict) -> str:
    """The row's recipe, with what tells it apart from other rows of the same model and
    recipe: 'smoke (epochs=6)'."""
    return f"{r['recipe']} ({r['variant']})" if r["variant"] else r["recipe"]


def _pm(mean, std, n: int, spec: str = ".2f") -> str:
    if mean is None:
        return "—"
    return f"{mean:{spec}} ± {std:{spec}}" if n > 1 else f"{mean:{spec}}"


def markdown(rows: list[dict]) -> str:
    data = {"yes": "official", "no": "not official", "mixed": "mixed", "": "—"}
    cells = [[r["model"], _recipe_label(r), _pm(r["top1"], r["top1_std"], r["runs"]),
              _pm(r["top5"], r["top5_std"], r["runs"]), fmt(r["tta_top1"], ".2f", "—"),
              f"{r['article_top1'] or '—'} / {r['article_top5'] or '—'}",
              fmt(r["delta_top1"], "+.2f", "—"),
              _pm(r["train_min"], r["train_min_std"], r["runs"], ".2f"),
              fmt(r["img_per_s"], ",.0f", "—"), fmt(r["gpu_busy"], ".0f", "—"),
              fmt(r["epochs"], "g", "—"),
              f"{r['params_m']:.2f}", r["article_params_m"] or "—", f"{r['gflops']:.3f}",
              r["article_gflops"] or "—", r["device"] or "—", data[r["data_official"]],
              r["status"]] for r in rows]
    return markdown_table(HEADERS, cells, align="llrrrrrrrrrrrrrlll")


def conventions(rows: list[dict], runs: list[dict], scale: str) -> str:
    """The lines at the top of table.md: device, data, what the columns mean."""
    envs = sorted({env_line(r["env"]) for r in runs if r.get("env")})
    official = {r["official"] for r in runs}
    if not runs:
        data = "no trained rows yet."
    elif official == {True}:
        data = "the official CIFAR-10 files (MD5s match); 50,000 training / 10,000 test images."
    else:
        data = ("rows marked 'not official' used files whose MD5s differ from the official "
                f"CIFAR-10 ones (e.g. a re-encoded copy: {JPEG_NOTE}); compare their accuracy "
                "with the article's with that in mind.")
    items = [
        "Device: " + ("; ".join(envs) if envs else "none yet (no trained rows)") + ".",
        "Data: " + data,
        "Training time: the trainer's timed region, in minutes: the training steps and the "
        "timed final evaluation (with the recipe's TTA). Compilation, warm-up, data loading, "
        "process start-up and the untimed per-epoch evaluations are outside it. img/s: "
        "training images per second of training steps.",
        "Top-1/Top-5: final test accuracy of the evaluated weights (the EMA where the recipe "
        "keeps one), without TTA; TTA Top-1 uses the recipe's test-time augmentation. "
        "Mean ± std where a row has several runs.",
        "Recipes: seed = the article's (Adam 1e-3, batch 256, weight decay 1e-4, EMA 0.999, "
        "a last phase with BatchNorm frozen and the lr halved); fast = ours (SGD-Nesterov, "
        "one-cycle, label smoothing; one preset per model family, see "
        "fastres.config.FAMILY_RECIPES). With --epochs, phase 2 keeps its fraction of the "
        "run.",
        "Params and GFLOPs: ours, counted on the model (one forward pass of a 3x32x32 image, "
        "torch.utils.flop_counter; MACs = FLOPs / 2 in the CSV). Article columns: as printed "
        "(its FLOPs are neither forward FLOPs nor MACs at 32x32); Δ Top-1 = ours − article.",
    ]
    side = max((r["parallel"] or 1 for r in rows), default=1)
    if side > 1:
        items.insert(3, f"Rows trained up to {side} at a time on one device (--parallel): "
                        "each row's time and img/s are its own while sharing it; the "
                        "table's wall clock is printed when it trains.")
    if any(r["gpu_busy"] is not None for r in rows):
        items.insert(3, "GPU busy %: the device's utilisation (nvidia-smi: the share of "
                        "time any kernel ran) while the row trained, start-up and "
                        "evaluations included; with rows side by side it is the whole "
                        "device's, shared.")
    if scale == "smoke":
        items.insert(0, "SMOKE SCALE: every row trained for seconds on a tiny subset; the "
                        "accuracy and times are meaningless.")
    return "\n".join(textwrap.fill(f"- {t}", width=100, subsequent_indent="  ")
                     for t in items)


def notes_text(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["notes"]:
            lines.append(textwrap.fill(f"- {r['model']} / {_recipe_label(r)}: "
                                       f"{'; '.join(r['notes'])}", width=100,
                                       subsequent_indent="  "))
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(r[k]) if k == "run_dirs" else "; ".join(r[k])
                        if k == "notes" else "" if r[k] is None else r[k])
                    for k in CSV_FIELDS})
    write_text(path, f.getvalue())


def _recipe_order(recipe: str) -> tuple:
    """seed, fast, then the others by name: the same order (and plot colour) every call."""
    return (DEFAULT_RECIPES.index(recipe) if recipe in DEFAULT_RECIPES else
            len(DEFAULT_RECIPES), recipe)


def plot(path: Path, rows: list[dict], title: str) -> bool:
    """Top-1 against training time: one marker per trained row (labelled with its model,
    and its variant where the model has several rows of one recipe), one colour per
    recipe. False when no row has both figures, or matplotlib is missing (`pip install
    fastres[plot]`; the table itself does not need it)."""
    try:
        import matplotlib
    except ImportError:
        print("table.png: skipped (matplotlib is not installed: pip install fastres[plot])",
              file=sys.stderr)
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["top1"] is not None and r["train_min"] is not None]
    if not done:
        return False
    recipes = sorted({r["recipe"] for r in done}, key=_recipe_order)
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for i, recipe in enumerate(recipes):
        mine = [r for r in done if r["recipe"] == recipe]
        ax.scatter([r["train_min"] for r in mine], [r["top1"] for r in mine], s=40,
                   color=colours(i % 10), label=recipe, zorder=3)
        for r in mine:
            label = f"{r['model']} ({r['variant']})" if r["variant"] else r["model"]
            ax.annotate(label, (r["train_min"], r["top1"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
    times = [r["train_min"] for r in done]
    if min(times) > 0 and max(times) / min(times) > 20:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0, right=1.1 * max(times))  # time from zero: no zoomed-in gaps
    ax.margins(y=0.25)
    ax.set_xlabel("training time (min): training steps + timed final evaluation")
    ax.set_ylabel("test Top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title="recipe")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    from fastres.engine import rundir
    from fastres.errors import ConfigError

    if args.budget_min is not None and args.budget_min < 0:
        raise ConfigError(f"--budget-min must be >= 0, got {args.budget_min}")
    if args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    if args.epochs is not None and not args.epochs > 0:
        raise ConfigError(f"--epochs must be > 0, got {args.epochs}")
    for m in csv_list(args.models, "--models") if args.models else []:
        check_model(m)
    for recipe in csv_list(args.recipes, "--recipes") if args.recipes else []:
        check_recipe(recipe, args.train)
    if not args.train:  # the options of training: nothing would use them
        given = [flag for flag, value in (("--set", args.overrides), ("--epochs", args.epochs),
                                          ("--compile", args.compile),
                                          ("--budget-min", args.budget_min))
                 if value not in (None, [])]
        if given:
            raise ConfigError(f"{', '.join(given)} only shape rows that --train trains; add "
                              "--train, or leave them out to read the finished runs")
    # The table's folder, before any run is read or trained: location, lock, refusal.
    rundir.check_apart(args.out, args.data_dir)
    claimed = claim_output_dir(args.out, overwrite=args.overwrite, update=_is_table_dir)
    try:
        if claimed.moved_to is not None:
            print(f"--overwrite: the previous contents of {args.out} are now in "
                  f"{claimed.moved_to}", flush=True)
        return _table(args, argv, Path(args.out))
    finally:
        claimed.release()


def _table(args, argv: list[str], out: Path) -> int:
    from fastres import config as C
    from fastres.models import list_models

    extra = find_runs(args.runs)
    own = {}  # (model, recipe) -> finished run in OUT/MODEL/RECIPE
    if out.is_dir():
        for res in sorted(out.glob("*/*/result.json")):
            # OUT/MODEL/RECIPE; a run moved aside by `fastres train --overwrite`
            # (RECIPE.old-<time>) is not a row.
            if res.parent.name in C.list_recipes() and (res.parent / "config.json").is_file():
                run = read_run(res.parent, recipe=res.parent.name)
                own[(run["model"], run["recipe"])] = run
    mine = {Path(r["dir"]).resolve() for r in own.values()}
    extra = [r for r in extra if Path(r["dir"]).resolve() not in mine]
    found = list(own.values()) + extra
    if args.models:
        models = csv_list(args.models, "--models")
    elif found:
        have = {r["model"] for r in found}
        models = [m for m in list_models() if m in have]
    else:
        models = list(ARTICLE_MODELS)
    for m in models:
        check_model(m)
    recipes = csv_list(args.recipes, "--recipes") if args.recipes else sorted(
        {r["recipe"] for r in found if not (args.train and r["recipe"] == "custom")},
        key=_recipe_order) or list(DEFAULT_RECIPES)

    plan = plan_rows(models, recipes, out, args)
    if args.train:
        if not args.data_dir and not any(o.startswith("data.data_dir=")
                                         for o in args.overrides):
            print("note: no --data-dir given; the rows read the default 'data'",
                  file=sys.stderr)
        check_data(plan)
        train_rows(plan, out, args.budget_min, args.parallel)
        for p in plan:
            if p["state"] == "finished" and (p["model"], p["recipe"]) not in own:
                own[(p["model"], p["recipe"])] = read_run(p["dir"], recipe=p["recipe"])
    elif not found:
        print("note: no trained rows in --out and no --runs: accuracy and time columns stay "
              "empty (--train trains them)", file=sys.stderr)

    rows, used, counts = [], [], {}
    for p in plan:
        key = (p["model"], p["recipe"])
        runs = ([own[key]] if key in own else []) + [
            r for r in extra if (r["model"], r["recipe"]) == key]
        used += runs
        status = p.get("status")
        if status is None and not runs and p["state"] == "partial":
            status = f"partial: {epochs_done(p['dir'])} epochs; --train resumes it"
        # One row per group of repeats (OUT/MODEL/RECIPE's group first, with the status
        # of training it), so that runs of another length, data or config never pool.
        groups = repeat_groups(runs) or [[]]
        for i, (group, variant) in enumerate(zip(groups, variant_labels(groups))):
            classes = C.num_classes_for(group[0]["dataset"] if group else "cifar10")
            kwargs = group[0]["kwargs"] if group else {}
            ckey = (p["model"], classes, json.dumps(kwargs, sort_keys=True))
            if ckey not in counts:  # counting builds the model: once per model
                counts[ckey] = model_counts(p["model"], classes, kwargs)
            record = read_row_record(out, *key) if key in own and own[key] in group else {}
            rows.append(table_row(p["model"], p["recipe"], group, status if i == 0 else None,
                                  p["preset"], counts[ckey], record, variant))
    skipped = sorted({(r["model"], r["recipe"]) for r in found} -
                     {(p["model"], p["recipe"]) for p in plan})
    if skipped:
        print("note: runs of " + ", ".join(f"{m}/{r}" for m, r in skipped) + " are not in "
              "--models x --recipes; left out", file=sys.stderr)

    table = markdown(rows)
    head = conventions(rows, used, args.scale)
    notes = notes_text(rows)
    command = "fastres table " + shlex.join(argv)
    print(head)
    print()
    print(table)
    if notes:
        print()
        print(notes)

    md, csv_path, png = out / "table.md", out / "table.csv", out / "table.png"
    write_text(md, "# CIFAR-10 results (fastres)\n\n" + head + "\n\n" + table + "\n\n" +
               (notes + "\n\n" if notes else "") + f"Written by: `{command}`\n")
    write_csv(csv_path, rows)
    devices = sorted({r["device"] for r in rows if r["device"]})
    wrote = [md, csv_path]
    if plot(png, rows, "CIFAR-10 Top-1 vs training time" +
            (f" ({'; '.join(devices)})" if devices else "")):
        wrote.append(png)
    print(f"\nwrote {', '.join(map(str, wrote))}")
    failed = [r for r in rows if r["status"].startswith("failed")]
    if failed:
        print(f"{len(failed)} row{'s' if len(failed) != 1 else ''} failed: " +
              ", ".join(f"{r['model']}/{_recipe_label(r)}" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("table", main))
