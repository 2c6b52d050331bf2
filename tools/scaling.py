"""`fastres scaling`: training throughput at 1, 2, ... processes, same global batch.

    fastres scaling --preset smoke --data-dir data --nprocs 1,2
    fastres scaling --preset speedrun --data-dir data --nprocs 1,2,4,8 --set schedule.epochs=2

Runs `fastres train` once per process count (through torchrun for more than one), with the
same preset, overrides and global batch, and reads each run's record: training img/s (the
trainer's timed training time, compilation and warm-up excluded), timed seconds and final
accuracy, printed as speed-up and scaling efficiency against one process. On a CPU the
processes share the machine's cores (each gets cores / N threads), so expect little or no
gain there; the numbers that matter come from one GPU per process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastres scaling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", help="preset to train (default smoke)")
    p.add_argument("--data-dir", required=True, help="folder with the data set")
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="config overrides for every run")
    p.add_argument("--out", help="folder for the runs' records (default: a temporary one)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--overwrite", action="store_true",
                   help="--json FILE exists: move it to NAME.old-<time>.json first (nothing is "
                        "deleted); without it an existing file is refused")
    return p


def _counts(text: str) -> list[int]:
    from fastres.errors import ConfigError

    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--nprocs must be positive integers like 1,2,4; got {text!r}")
    return counts


def run_once(n: int, args, out: Path) -> dict:
    """Train with `n` processes into `out`; the run's result.json, or the error output."""
    train = ["-m", "fastres", "train", "--preset", args.preset, "--data-dir", args.data_dir,
             "--out", str(out)]
    for item in args.overrides:
        train += ["--set", item]
    cmd = [sys.executable, *train] if n == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={n}", *train]
    # Processes on one machine split its cores instead of each taking all of them.
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // n)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        from fastres.errors import FastresError

        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FastresError(f"the {n}-process run failed (exit {proc.returncode}): "
                           + " | ".join(tail))
    return json.loads((out / "result.json").read_text())


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from fastres import config as C

    # A mistyped preset or --set: one line here, not a failed worker process later.
    C.validate(C.override(C.preset(args.preset), args.overrides))
    if args.json:  # checked (and claimed) before any work: the output contract
        from fastres.tools._common import claim_output_file

        args.json = str(claim_output_file(args.json, overwrite=args.overwrite))
    counts = _counts(args.nprocs)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fastres-scaling-"))
    rows = []
    for n in counts:
        res = run_once(n, args, root / f"nproc_{n}")
        rows.append({"nproc": n, "img_per_s": res["img_per_s"], "timed_s": res["timed_s"],
                     "top1": res["top1"], "world_size": res["world_size"],
                     "device": res.get("device")})
        print(f"  {n} process(es): {res['img_per_s']:,.0f} img/s", flush=True)
    first = rows[0]
    print(f"\nfastres scaling: preset {args.preset}, device {first['device']}")
    print("| processes | img/s | speed-up | efficiency | timed s | top-1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speedup = r["img_per_s"] / first["img_per_s"]
        r["speedup"] = speedup
        r["efficiency"] = speedup * first["nproc"] / r["nproc"]
        print(f"| {r['nproc']} | {r['img_per_s']:,.0f} | {speedup:.2f}x | "
              f"{100 * r['efficiency']:.0f}% | {r['timed_s']:.1f} | {r['top1']:.4f} |")
    print(f"\nrecords in {root}")
    if args.json:
        from fastres.tools._common import write_json

        write_json(args.json, {"preset": args.preset, "rows": rows})
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("scaling", main))
