"""What the tools share: the config flags (the same names and meaning as `fastres train`'s),
the output contract for every folder and file a tool writes, aligned Markdown tables, JSON
output and the one-line environment header printed above every figure.

The output contract (the run directory's, `fastres.engine.rundir`, for every tool):

- a tool's output folder (`speedrun --out`, `table --out`, `profile --trace`,
  `device-check --out`) is taken with `claim_output_dir` before any data is read: its
  location is checked (not a file, not below one, not /proc or /sys, not read-only,
  writable), it is locked for the tool's life (a second process into it is refused,
  naming the first), and a folder that holds anything is refused unless `--overwrite`
  (the old contents move to OUT.old-<time>; nothing is deleted) or it is the tool's own
  folder the tool updates in place (`fastres table`'s rows);
- a tool's output file (`--json FILE`) is taken with `claim_output_file` before the tool
  measures anything (location as above; an existing file is refused unless
  `--overwrite`, which moves it to NAME.old-<time>.json at once), and written by
  `write_json` atomically (temporary file, fsync, rename), as every figure
  (`save_figure`) and text (`write_text`).

Kept small on purpose: anything one tool alone needs lives in that tool.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
from pathlib import Path
from typing import Callable, Iterable, Sequence


# --------------------------------------------------------------------------- config flags

CONFIG_FLAGS = ("data-dir", "download", "model", "epochs", "batch-size", "loader",
                "fused-kernels", "seed", "device", "precision", "compile")


def add_config_args(p: argparse.ArgumentParser, *, preset: str = "speedrun",
                    fields: Sequence[str] = CONFIG_FLAGS,
                    title: str = "run config (as in `fastres train`; --set reaches every "
                                 "field)") -> None:
    """`fastres train`'s config flags (the subset named in `fields`), same dests, so
    `config_from_args` maps them onto the config exactly as `fastres train` does (and
    `fastres train` itself takes them from here: one definition).

    --preset takes no argparse `choices`: an unknown name goes through `config.preset`
    (`check_preset`), whose ConfigError prints one line with a "did you mean" and the
    choices (argparse would print the whole usage block)."""
    from fastres import config as C

    g = p.add_argument_group(title)
    g.add_argument("--preset", default=preset, metavar="NAME",
                   help=f"recipe to start from: {', '.join(C.list_presets())} "
                        f"(default: {preset})")
    flags = {
        "data-dir": dict(help="folder with cifar-10-batches-py/ or the .tar.gz"),
        "download": dict(action="store_true",
                         help="download the official archive into --data-dir if missing"),
        "model": dict(help="model name (`fastres models` lists them)"),
        "epochs": dict(type=float, help="training length in epochs"),
        "batch-size": dict(type=int, help="global batch size"),
        "loader": dict(choices=("tensor", "dali", "torch"), help="training pipeline"),
        "fused-kernels": dict(action="store_true", default=None,
                              help="fused Triton BN(+add)+act kernels in the model"),
        "seed": dict(type=int, help="random seed"),
        "device": dict(help="auto, cpu, cuda, cuda:N"),
        "precision": dict(choices=("auto", "fp32", "bf16", "fp16"), help="autocast dtype"),
        "compile": dict(choices=("auto", "on", "step", "off"),
                        help="torch.compile the model (on) or the whole step (step)"),
    }
    for name in fields:
        g.add_argument(f"--{name}", **flags[name])
    g.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override any config field (repeatable; "
                   "`fastres train --help-config` lists them)")


def config_from(args: argparse.Namespace, **replace_sections):
    """The validated config the flags describe: preset, then flags, then --set (through
    `fastres train`'s own `config_from_args`), then `replace_sections` (what the tool
    itself fixes, e.g. `run={"progress": "none"}`). Flags a tool does not offer count as
    not given. The model name is checked here, so a typo fails before any data is read."""
    from fastres import config as C
    from fastres.errors import ConfigError
    from fastres.tools.train import config_from_args

    if any(item.split("=", 1)[0].strip() == "run.out_dir" for item in
           getattr(args, "overrides", [])):
        raise ConfigError("run.out_dir names a training run's directory, which this tool "
                          "does not take: its output folder is --out")
    given = dict(data_dir=None, download=False, batch_size=None, loader=None, model=None,
                 fused_kernels=None, epochs=None, seed=None, device=None, precision=None,
                 compile=None, sync_bn=None, overrides=[])
    given.update({k: v for k, v in vars(args).items() if k in given or k == "preset"})
    given["out"] = None  # a tool's --out is its output folder, not a run directory
    cfg = config_from_args(argparse.Namespace(**given))
    if replace_sections:
        cfg = C.validate(C.replace(cfg, **replace_sections))
    check_model(cfg.model.name)
    return cfg


def int_at_least(low: int):
    """An argparse `type`: an integer >= `low` (argparse's error names the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def float_at_least(low: float, *, exclusive: bool = False):
    """An argparse `type`: a finite number >= `low` (> `low` when `exclusive`)."""
    op = ">" if exclusive else ">="

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ((value > low if exclusive else value >= low) and value < float("inf")):
            raise argparse.ArgumentTypeError(f"must be a finite number {op} {low:g}, got {text}")
        return value

    parse.__name__ = f"float {op} {low:g}"
    return parse


positive_float = float_at_least(0, exclusive=True)


class Stopped(Exception):
    """A SIGTERM or SIGINT arrived while `signals_raise()` was on (`signum` says which)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


@contextlib.contextmanager
def signals_raise():
    """SIGTERM and SIGINT raise `Stopped` in the main thread while the block runs, so a
    tool stopped from outside (a time limit, Ctrl-C) can end its children and write what
    it has before exiting with 128 + the signal."""
    def handler(signum, frame):
        raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def kill_group(proc, grace: float = 10) -> None:
    """End the process group `proc` leads (started with `start_new_session=True`): SIGINT
    (a fastres tool writes what it has), SIGKILL after `grace` seconds, then nothing of the
    group left."""
    import subprocess

    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)    # the group this child started, nothing else
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    sweep_group(proc.pid)


def sweep_group(pgid: int) -> None:
    """SIGKILL what is left of a process group (a grandchild that ignored SIGINT, a
    background process): its leader has exited, so nothing outside the group is hit."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check_preset(name: str) -> None:
    """One-line ConfigError (with "did you mean") for a preset name that does not exist."""
    from fastres import config as C
    from fastres.errors import unknown_choice

    if name not in C.list_presets():
        raise unknown_choice("preset", name, C.list_presets())


def check_model(name: str) -> None:
    from fastres.models import check_model as check

    check(name)


def csv_list(text: str, what: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c']; a ConfigError for an empty list."""
    from fastres.errors import ConfigError

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def device_arg(name: str):
    """A tool's --device value as a torch.device: auto (cuda when present), cpu, cuda,
    cuda:N; a one-line error for a malformed name or CUDA asked for without a device."""
    import torch

    from fastres.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


# --------------------------------------------------------------------------- numbers

def summarize(values: Iterable[float | None]) -> dict:
    """n, mean, std (sample, n-1; 0 for one value), min, max over the values present."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(v), "mean": statistics.fmean(v),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0, "min": min(v), "max": max(v)}


def pct(x: float | None) -> float | None:
    """A fraction as a percentage; None stays None."""
    return None if x is None else 100 * x


def fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def fmt_pm(s: dict, spec: str = ".2f", scale: float = 1.0) -> str:
    """'mean ± std' of a `summarize` dict, scaled (e.g. 100 for percent)."""
    if not s["n"]:
        return "-"
    return f"{s['mean'] * scale:{spec}} ± {s['std'] * scale:{spec}}"


# --------------------------------------------------------------------------- output

def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                   align: str = "") -> str:
    """A Markdown table whose columns are padded to one width, so the same text reads well
    in a terminal and renders as a table. `align`: one letter per column, l or r
    (default: first column left, the rest right)."""
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r]
                                           for r in rows]
    n = len(headers)
    align = (align or "l" + "r" * (n - 1)).ljust(n, "r")
    width = [max(3, *(len(r[i]) for r in cells)) for i in range(n)]

    def line(r):
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                 for c, w, a in zip(r, width, align)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
                          for w, a in zip(width, align)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def add_overwrite_arg(p: argparse.ArgumentParser, what: str = "--out") -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"{what} holds an earlier output: move it to NAME.old-<time> first "
                        "(nothing is deleted); without it such a target is refused")


def claim_output_dir(out, *, overwrite: bool = False, flag: str = "--out",
                     update: Callable[[Path], bool] | None = None):
    """Take a tool's output folder under the run-directory contract, before any data is
    read: location checked, locked for the tool's life, refused when it holds anything
    unless `overwrite` (moved to OUT.old-<time>) or `update(path)` says it is this tool's
    own folder, which the tool updates in place. Returns the claim (a
    `fastres.engine.rundir.RunDir`: `.path`, `.moved_to`; call `.release()` when done, or
    leave it to the OS when the process ends). A refusal is one RunDirError line and
    changes nothing.

        out = claim_output_dir(args.out, overwrite=args.overwrite)
        try:
            ...  # read data, measure, write into out.path
        finally:
            out.release()
    """
    from fastres.engine import rundir

    path = rundir.check_location(out, flag=flag)
    mode = "overwrite" if overwrite else "new"
    if mode == "new" and update is not None and rundir.contents(path) and update(path):
        mode = "resume"
    return rundir.claim(path, mode, flag=flag, resumable=False)


def _file_summary(path: Path) -> str:
    import json
    import time

    st = path.stat()
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime))
    what = f"{st.st_size:,} bytes, written {when}"
    if st.st_size < 1 << 24:
        try:
            head = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return what
        if isinstance(head, dict) and isinstance(head.get("tool"), str):
            what = f"a `{head['tool']}` report, {what}"
    return what


def check_output_file(path: str | Path, *, overwrite: bool = False,
                      flag: str = "--json") -> Path:
    """Check a tool's output file before the tool reads data or measures anything: a
    place a file can be written (not a folder, not below a file, not /proc or /sys, not
    read-only, writable) and, unless `overwrite`, no file there yet (RunDirError naming it
    and what it holds). Changes nothing; returns the absolute path for `write_json`."""
    from fastres.engine import rundir
    from fastres.errors import RunDirError

    target = rundir.check_file_location(path, flag=flag)
    if target.exists() and not overwrite:
        raise RunDirError(f"{flag} {path} already exists ({_file_summary(target)}); "
                          "--overwrite moves it to "
                          f"{target.stem}.old-<time>{target.suffix} (nothing is deleted), or "
                          "choose another file")
    return target


def claim_output_file(path: str | Path, *, overwrite: bool = False,
                      flag: str = "--json") -> Path:
    """`check_output_file`, then, with `overwrite`, move the existing file to
    NAME.old-<time>.json now (before any work, as `--overwrite` does to a folder): the
    target is then this run's own, and `write_json(target, obj)` may replace it as often as
    the tool writes (a benchmark that saves each figure as it is measured)."""
    target = check_output_file(path, overwrite=overwrite, flag=flag)
    _prepare_target(target, True if overwrite else None)
    return target


def _prepare_target(path: Path, overwrite: bool | None) -> Path | None:
    """Apply the file contract at write time: None keeps the old call's meaning (replace);
    False refuses a file that appeared since `check_output_file`; True moves it aside."""
    from fastres.engine import rundir
    from fastres.errors import RunDirError

    if overwrite is None or not path.exists():
        return None
    if not overwrite:
        raise RunDirError(f"{path} appeared while this tool ran; the new output was not "
                          "written over it; run again with another file or --overwrite")
    aside = rundir.aside_path(path)
    try:
        os.replace(path, aside)
    except OSError as e:
        raise RunDirError(f"--overwrite: could not move {path} to {aside} "
                          f"({e.strerror or e}); nothing was written") from None
    return aside


def write_json(path: str | Path, obj, *, overwrite: bool | None = None) -> Path:
    """Atomic, indented, strict JSON (tuples and tensors as lists, paths as strings, NaN
    as null). `overwrite`: False refuses an existing file, True moves it to
    NAME.old-<time>.json first (call `check_output_file` at the start with the same value,
    so the answer comes before the work); None (older callers) replaces it."""
    from fastres.engine.records import atomic_write_json

    path = Path(path)
    _prepare_target(path, overwrite)
    atomic_write_json(path, obj)
    return path


def save_figure(fig, path: str | Path, *, overwrite: bool | None = None) -> Path:
    """A matplotlib figure written atomically (PNG by the suffix), as `write_json`."""
    import io

    from fastres.engine.records import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png")
    _prepare_target(path, overwrite)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_text(path: str | Path, text: str) -> Path:
    """A text file (a table, a summary) written atomically."""
    from fastres.engine.records import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, text.encode())
    return path


def env_line(env: dict) -> str:
    """'device | torch 2.x | triton 3.x | CUDA 12.x | git abc1234' for the top of a report."""
    parts = [str(env.get("device", "?")), f"torch {env.get('torch')}"]
    if env.get("triton"):
        parts.append(f"triton {env['triton']}")
    if env.get("cuda"):
        parts.append(f"CUDA {env['cuda']}")
    if env.get("dali"):
        parts.append(f"DALI {env['dali']}")
    sha = str(env.get("git_sha", "unknown"))
    parts.append(f"git {sha[:12]}{'+dirty' if sha.endswith('+dirty') else ''}")
    return " | ".join(parts)
