"""What `fastres speedrun`, `fastres profile` and `fastres table` share: the config flags
(the same names and meaning as `fastres train`'s), aligned Markdown tables, JSON output and
the one-line environment header printed above every figure.

Kept small on purpose: anything one tool alone needs lives in that tool.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Iterable, Sequence


# --------------------------------------------------------------------------- config flags

def add_config_args(p: argparse.ArgumentParser, *, preset: str = "speedrun",
                    fields: Sequence[str] = ("data-dir", "download", "model", "epochs",
                                             "batch-size", "loader", "fused-kernels", "seed",
                                             "device", "precision", "compile")) -> None:
    """`fastres train`'s config flags (the subset named in `fields`), same dests, so
    `config_from_args` maps them onto the config exactly as `fastres train` does.

    --preset takes no argparse `choices`: an unknown name goes through `config.preset`,
    whose ConfigError prints one line naming the choices (argparse would print the whole
    usage block)."""
    from fastres import config as C

    g = p.add_argument_group("run config (as in `fastres train`; --set reaches every field)")
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
    from fastres.tools.train import config_from_args

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


def check_model(name: str) -> None:
    from fastres.errors import unknown_choice
    from fastres.models import list_models

    if name not in list_models():
        raise unknown_choice("model", name, list_models())


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


def write_json(path: str | Path, obj) -> Path:
    """Atomic, indented JSON (tuples as lists, tensors as lists, paths as strings)."""
    from fastres.engine.records import atomic_write_json

    path = Path(path)
    atomic_write_json(path, obj)
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
