"""`fastres data`: say what a CIFAR data folder holds, and download the official data.

    fastres data --data-dir data                      # inspect data/cifar-10-batches-py or the .tar.gz
    fastres data --data-dir data --download           # fetch the official archive first if absent
    fastres data --data-dir data --dataset cifar100 --json

Prints the source, whether every file matched the official MD5s (and the warning when not),
split sizes, per-class counts, the train split's per-channel mean and std in [0, 1] units
(what `normalize` takes) and the content fingerprint that run records carry.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from fastres.data import DATASETS, channel_mean_std, load_cifar


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastres data", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data",
                   help="folder holding cifar-10-batches-py/ or cifar-10-python.tar.gz "
                        "(cifar-100-python/ for CIFAR-100), or that folder/archive itself "
                        "(default: %(default)s)")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help="(default: %(default)s)")
    p.add_argument("--download", action="store_true",
                   help="download the official archive into --data-dir when the data is absent "
                        "(its MD5 is verified; it is read without extracting)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


def summarize(data, load_seconds: float, warning: str | None) -> dict:
    """Everything `fastres data` reports, as a JSON-able dict."""
    k = data.num_classes
    train_counts = np.bincount(data.train.labels, minlength=k).tolist()
    test_counts = np.bincount(data.test.labels, minlength=k).tolist()
    mean, std = channel_mean_std(data.train.images) if len(data.train) else ((), ())
    return {
        **data.info(),
        "warning": warning,
        "classes": list(data.classes),
        "train_per_class": dict(zip(data.classes, train_counts)),
        "test_per_class": dict(zip(data.classes, test_counts)),
        "train_mean": [round(m, 6) for m in mean],
        "train_std": [round(s, 6) for s in std],
        "md5": dict(data.md5),
        "load_seconds": round(load_seconds, 3),
    }


def format_text(s: dict) -> str:
    lines = [
        f"{s['name']} from {s['source']}",
        f"  official:    {'yes (every MD5 matches the official files)' if s['official'] else 'NO (MD5s differ from the official files; see the warning)'}",
        f"  fingerprint: {s['fingerprint']}",
        f"  sizes:       train {s['train_size']}, test {s['test_size']}, {s['num_classes']} classes",
        f"  loaded in:   {s['load_seconds']:.2f} s",
    ]
    if s["train_mean"]:
        lines += [f"  train mean (R, G, B): {', '.join(f'{v:.4f}' for v in s['train_mean'])}",
                  f"  train std  (R, G, B): {', '.join(f'{v:.4f}' for v in s['train_std'])}"]
    width = max(map(len, s["classes"]))
    lines.append(f"  per class ({'train':>7} {'test':>7}):")
    for name in s["classes"]:
        lines.append(f"    {name:<{width}} {s['train_per_class'][name]:>7} {s['test_per_class'][name]:>7}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        print(f"fastres data: warning: {message}", file=sys.stderr)

    t0 = time.perf_counter()
    data = load_cifar(args.data_dir, args.dataset, download=args.download, warn=warn)
    summary = summarize(data, time.perf_counter() - t0, warnings[0] if warnings else None)
    print(json.dumps(summary, indent=2) if args.json else format_text(summary))
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("data", main))
