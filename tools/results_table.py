"""`fastres table`: the reference article's CIFAR-10 results table, reproduced and completed.

    fastres table                                    # counts + article figures, no accuracy
    fastres table --runs runs/                       # every finished run under runs/
    fastres table --models resnet20,resnet56 --launch --preset resnet-paper \\
                  --data-dir data --epochs 30 --out table.md

For each model: Top-1 and Top-5 test accuracy (mean ± std over its runs), parameters,
forward FLOPs at 32x32 with the multiply-adds (MACs = FLOPs / 2) beside them, the training
time (the trainer's timed region, in minutes: the column the article left empty) and the
device it was measured on; then the article's printed Top-1, Top-5, parameters and FLOPs,
and our Top-1 minus the article's, so the differences are in plain sight.

Accuracy and time come from finished run directories (config.json, result.json, env.json
as `fastres train` writes them): --runs takes run directories or folders holding them.
--launch trains, in this process and one after another, every listed model that has no
finished run yet, into LAUNCH_DIR/MODEL (read back like any other run, so an interrupted
table picks up where it stopped). Writes Markdown (--out) and CSV (same name, .csv).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import textwrap
from pathlib import Path

from fastres.tools._common import (add_config_args, check_model, config_from, csv_list, fmt,
                                   markdown_table, pct, summarize)

# The article's table, in its order (VGG-16 is its ImageNet reference row).
ARTICLE_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202",
                  "preact_resnet18", "googlenet_cifar", "vgg16")
# The article's printed Top-1 / Top-5 (%), shared/REFERENCE.md; used where the model
# registry's `article` figures do not carry them (it holds params_m and gflops).
ARTICLE_ACCURACY = {
    "resnet20": ("92.02", "99.02"), "resnet32": ("92.40", "99.15"),
    "resnet44": ("92.49", "99.18"), "resnet56": ("92.62", "99.21"),
    "resnet110": ("92.65", "99.22"), "resnet1202": ("92.84", "99.26"),
    "preact_resnet18": ("90.77", "98.63"), "googlenet_cifar": ("91.22", "98.90"),
}
CSV_FIELDS = ("model", "runs", "top1", "top1_std", "top5", "top5_std", "tta_top1", "params",
              "params_m", "flops", "gflops", "gmacs", "train_min", "train_min_std", "epochs",
              "device", "article_top1", "article_top5", "article_params_m", "article_gflops",
              "delta_top1", "run_dirs", "notes")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres table", description="The reference article's results table for any "
        "list of models: accuracy, params, FLOPs/MACs, training time, device, beside the "
        "article's printed figures.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  fastres table --models resnet20,resnet56 --launch --preset "
               "resnet-paper --data-dir data --epochs 30 --out table.md")
    p.add_argument("--models", help="comma-separated model names (default: the models of "
                   "the runs given, else the article's: " + ",".join(ARTICLE_MODELS) + ")")
    p.add_argument("--runs", nargs="+", default=[], metavar="DIR",
                   help="finished run directories, or folders searched for them")
    p.add_argument("--out", default="table.md", metavar="FILE",
                   help="Markdown output (default table.md); the CSV goes beside it")
    p.add_argument("--csv", metavar="FILE", help="CSV output (default: --out with .csv)")
    lg = p.add_argument_group("launching the missing runs")
    lg.add_argument("--launch", action="store_true",
                    help="train every listed model that has no finished run, in this process")
    lg.add_argument("--launch-dir", default="runs/table", metavar="DIR",
                    help="where launched runs go, one folder per model (default runs/table); "
                         "finished runs already there are reused")
    add_config_args(p, preset="resnet-paper",
                    fields=("data-dir", "download", "epochs", "batch-size", "loader",
                            "fused-kernels", "seed", "device", "precision", "compile"))
    return p


# --------------------------------------------------------------------------- run records

def _load_json(path: Path) -> dict:
    from fastres.errors import DataError

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable run record ({e}); re-run that training or leave "
                        "its directory out of --runs") from None


def read_run(run_dir: str | Path) -> dict:
    """One finished run: model, accuracy, timing and device from its record files."""
    run_dir = Path(run_dir)
    cfg = _load_json(run_dir / "config.json")
    res = _load_json(run_dir / "result.json")
    env = _load_json(run_dir / "env.json") if (run_dir / "env.json").exists() else {}
    data = env.get("data") or {}
    return {
        "dir": str(run_dir), "model": cfg["model"]["name"],
        "kwargs": cfg["model"].get("kwargs") or {}, "dataset": cfg["data"]["dataset"],
        "test_limit": cfg["data"].get("test_limit", 0), "top1": res["top1"],
        "top5": res["top5"], "tta_top1": res.get("tta_top1"), "timed_s": res["timed_s"],
        "epochs": res.get("epochs"), "device": res.get("device") or env.get("device"),
        "test_size": data.get("test_size"),
        "world_size": res.get("world_size", 1), "official": data.get("official"),
        "git_sha": env.get("git_sha"),
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


def launch(models: list[str], args, have: set[str]) -> list[str]:
    """Train each model not in `have` into LAUNCH_DIR/MODEL; return their run directories."""
    from fastres import config as C
    from fastres.engine import build, load_data, resolve_for, train

    todo = [m for m in models if m not in have]
    if not todo:
        return []
    base = config_from(args)
    data = None
    dirs = []
    for i, name in enumerate(todo):
        out = Path(args.launch_dir) / name
        cfg = resolve_for(C.validate(C.replace(base, model={"name": name},
                                               run={"out_dir": str(out)})))
        data = data if data is not None else load_data(cfg)  # read once for all models
        print(f"[{i + 1}/{len(todo)}] training {name}: preset {args.preset}, "
              f"{cfg.schedule.steps or cfg.schedule.epochs} "
              f"{'steps' if cfg.schedule.steps else 'epochs'}, {cfg.run.device}, "
              f"{cfg.run.precision}, compile {cfg.run.compile} -> {out}", flush=True)
        built = build(cfg, data=data)
        result = train(cfg, built.model, built.loaders, data_info=built.data_info)
        f = result.final
        print(f"    top-1 {100 * f['top1']:.2f}%, top-5 {100 * f['top5']:.2f}%, "
              f"{f['timed_s'] / 60:.2f} min", flush=True)
        dirs.append(str(out))
    return dirs


# --------------------------------------------------------------------------- rows

def model_counts(name: str, num_classes: int, kwargs: dict) -> dict:
    """Parameters and forward FLOPs at 32x32, batch 1, built on the meta device (counts
    depend on shapes only), with the run's model kwargs."""
    import torch

    from fastres.models import count_flops, count_params, create_model

    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, **kwargs)
    flops = count_flops(model, (1, 3, 32, 32))
    return {"params": count_params(model), "flops": flops}


def table_row(name: str, runs: list[dict]) -> dict:
    from fastres.models import model_info
    from fastres.tools.models import reference_notes

    info = model_info(name)
    num_classes = 100 if runs and runs[0]["dataset"] == "cifar100" else 10
    kwargs = runs[0]["kwargs"] if runs else {}
    counts = model_counts(name, num_classes, kwargs)
    notes = reference_notes(dict(name=name, params=counts["params"], num_classes=num_classes,
                                 image_size=32, gflops=counts["flops"] / 1e9, info=info))
    if kwargs:
        notes.insert(0, "model " + ", ".join(f"{k}={v}" for k, v in kwargs.items()))
    limited = [r for r in runs if r["test_limit"] and r["test_limit"] < (r["test_size"] or 0)]
    if limited:
        notes.append(f"tested on a {limited[0]['test_limit']}-image subset of the "
                     f"{limited[0]['test_size']} test images")
    if any(r["official"] is False for r in runs):
        notes.append("data not the official CIFAR files")
    if any(r["world_size"] > 1 for r in runs):
        notes.append(f"{runs[0]['world_size']} processes")
    article = dict(info["article"])
    top1_a, top5_a = ARTICLE_ACCURACY.get(name, (None, None))
    article.setdefault("top1", top1_a)
    article.setdefault("top5", top5_a)
    top1, top5 = summarize(r["top1"] for r in runs), summarize(r["top5"] for r in runs)
    minutes = summarize(r["timed_s"] / 60 for r in runs)
    devices = sorted({str(r["device"]) for r in runs})
    return {
        "model": name, "runs": len(runs),
        "top1": pct(top1["mean"]), "top1_std": pct(top1["std"]),
        "top5": pct(top5["mean"]), "top5_std": pct(top5["std"]),
        "tta_top1": summarize(r["tta_top1"] for r in runs)["mean"],
        "params": counts["params"], "params_m": counts["params"] / 1e6,
        "flops": counts["flops"], "gflops": counts["flops"] / 1e9,
        "gmacs": counts["flops"] / 2e9, "train_min": minutes["mean"],
        "train_min_std": minutes["std"], "epochs": summarize(r["epochs"] for r in runs)["mean"],
        "device": "; ".join(devices), "article_top1": article.get("top1"),
        "article_top5": article.get("top5"), "article_params_m": article.get("params_m"),
        "article_gflops": article.get("gflops"),
        "delta_top1": (100 * top1["mean"] - float(article["top1"]))
        if top1["n"] and article.get("top1") else None,
        "run_dirs": [r["dir"] for r in runs], "notes": notes,
    }


def _pm(mean, std, n: int, spec: str = ".2f") -> str:
    if mean is None:
        return "—"
    return f"{mean:{spec}} ± {std:{spec}}" if n > 1 else f"{mean:{spec}}"


HEADERS = ("Model", "Runs", "Top-1 %", "Top-5 %", "Params (M)", "FLOPs (G)", "MACs (G)",
           "Training Time (min)", "Device", "Article Top-1", "Article Top-5",
           "Article Params (M)", "Article FLOPs (G)", "Δ Top-1")


def markdown(rows: list[dict]) -> str:
    cells = [[r["model"], r["runs"], _pm(r["top1"], r["top1_std"], r["runs"]),
              _pm(r["top5"], r["top5_std"], r["runs"]), f"{r['params_m']:.2f}",
              f"{r['gflops']:.3f}", f"{r['gmacs']:.3f}",
              _pm(r["train_min"], r["train_min_std"], r["runs"], ".2f"),
              r["device"] or "—", r["article_top1"] or "—", r["article_top5"] or "—",
              r["article_params_m"] or "—", r["article_gflops"] or "—",
              fmt(r["delta_top1"], "+.2f", "—")] for r in rows]
    return markdown_table(HEADERS, cells, align="lrrrrrrrlrrrrr")


def notes_text(rows: list[dict]) -> str:
    lines = ["FLOPs (G): one forward pass of a 3x32x32 image, counted by "
             "torch.utils.flop_counter (convolutions and matrix products); MACs = FLOPs / 2. "
             "Training time: the trainer's timed region (first step to final evaluation; "
             "compilation and warm-up excluded), mean ± std over runs. Top-1/Top-5: mean ± "
             "std over runs, on the test set. Article columns: as printed in the reference "
             "article (its FLOPs column is neither forward FLOPs nor MACs at 32x32; "
             "Δ Top-1 = ours − article)."]
    lines = [textwrap.fill(lines[0], width=100)]
    for r in rows:
        if r["notes"]:
            lines.append(textwrap.fill(f"- {r['model']}: {'; '.join(r['notes'])}", width=100,
                                       subsequent_indent="  "))
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (" ".join(r[k]) if k == "run_dirs" else "; ".join(r[k])
                            if k == "notes" else "" if r[k] is None else r[k])
                        for k in CSV_FIELDS})


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    runs = find_runs(args.runs)
    launch_dir = Path(args.launch_dir)
    if args.launch and launch_dir.is_dir() and any(launch_dir.rglob("result.json")):
        known = {r["dir"] for r in runs}
        runs += [r for r in find_runs([launch_dir]) if r["dir"] not in known]
    if args.models:
        models = csv_list(args.models, "--models")
    elif runs:
        from fastres.models import list_models

        found = {r["model"] for r in runs}
        models = [m for m in list_models() if m in found]
    else:
        models = list(ARTICLE_MODELS)
    for m in models:
        check_model(m)
    if args.launch:
        runs += [read_run(d) for d in launch(models, args, {r["model"] for r in runs})]
    elif not runs:
        print("note: no runs given (--runs) or launched (--launch): accuracy and time columns "
              "stay empty", file=sys.stderr)
    skipped = sorted({r["model"] for r in runs} - set(models))
    if skipped:
        print(f"note: runs of {', '.join(skipped)} are not in --models; left out",
              file=sys.stderr)

    rows = [table_row(m, [r for r in runs if r["model"] == m]) for m in models]
    table = markdown(rows)
    notes = notes_text(rows)
    print(table)
    print()
    print(notes)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shas = sorted({str(r["git_sha"])[:12] for r in runs if r.get("git_sha")})
    head = "# CIFAR-10 results (fastres)\n\n" + (
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}" + (f", git {', '.join(shas)}"
                                                            if shas else "") + ".\n\n"
        if runs else "No runs: parameter and FLOP counts only.\n\n")
    out.write_text(head + table + "\n\n" + notes + "\n")
    csv_path = Path(args.csv) if args.csv else out.with_suffix(".csv")
    write_csv(csv_path, rows)
    print(f"\nwrote {out}, {csv_path}")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("table", main))
