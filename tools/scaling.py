"""`fastres scaling`: training throughput at 1, 2, ... processes, same global batch.

    fastres scaling --preset smoke --data-dir data --nprocs 1,2
    fastres scaling --preset speedrun --data-dir data --nprocs 1,2,4,8 --set schedule.epochs=2

Runs `fastres train` once per process count (through torchrun for more than one), with the
same preset, overrides and global batch, and reads each run's record: training img/s (the
trainer's timed training time, compilation and warm-up excluded), timed seconds and final
accuracy, printed as speed-up and scaling efficiency against one process. On a CPU the
processes share the machine's cores (each gets cores / N threads), so expect little or no
gain there; the numbers that matter come from one GPU per process.

Everything is checked before the first process starts: --nprocs (whole numbers >= 1, each
once), the preset and --set, the batch against every process count, and the outputs. --out
(records in OUT/nproc_N) is taken under the run-directory contract: a file, /proc, a
read-only or unwritable place is one line and exit 2; a folder another process uses is
refused naming it; a folder that holds anything (an earlier scaling run) is refused unless
--overwrite, which moves it to OUT.old-<time> first (nothing is deleted). The same
--overwrite moves an existing --json FILE to NAME.old-<time>.json. A stop (SIGTERM, Ctrl-C)
ends the run being trained too (it checkpoints into OUT/nproc_N first); exit 128 + signal.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastres.tools._common import (Stopped, add_overwrite_arg, check_output_file,
                                   claim_output_dir, claim_output_file, config_from, csv_list,
                                   kill_group, signals_raise, write_json)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastres scaling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke", help="preset to train (default smoke)")
    p.add_argument("--data-dir", required=True, help="folder with the data set")
    p.add_argument("--nprocs", default="1,2", help="comma-separated process counts")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="config overrides for every run")
    p.add_argument("--out", metavar="DIR", help="folder for the runs' records, DIR/nproc_N "
                   "(default: a new temporary one)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    add_overwrite_arg(p, "--out (or --json FILE)")
    return p


def _counts(text: str) -> list[int]:
    """--nprocs '1,2,4' -> [1, 2, 4]; a one-line ConfigError for anything but whole numbers
    >= 1, each given once (a repeated count would train into the same OUT/nproc_N)."""
    from fastres.errors import ConfigError

    counts = []
    for item in csv_list(text, "--nprocs"):
        try:
            n = int(item)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"--nprocs must be positive integers like 1,2,4; got {text!r}")
        if n in counts:
            raise ConfigError(f"--nprocs names {n} twice in {text!r}; give each process "
                              "count once")
        counts.append(n)
    return counts


def _child_error(output: str) -> str:
    """The failed run's own one-line error (`fastres train: [rank R/W] error: ...`) when it
    printed one, else its last lines. Under torchrun the last lines are torchrun's summary,
    and the trainer's message is above it."""
    lines = output.strip().splitlines()
    for line in lines:
        if line.startswith("fastres train:") and " error: " in line:
            return line
    return " | ".join(lines[-3:])


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
    # Its own process group: a stop (SIGTERM, Ctrl-C) ends the run and its ranks (SIGINT
    # first: the run checkpoints), never leaving one training into OUT.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:
        kill_group(proc)
        raise
    if proc.returncode != 0:
        from fastres.errors import FastresError

        raise FastresError(f"the {n}-process run failed (exit {proc.returncode}): "
                           + _child_error(stderr or stdout))
    return json.loads((out / "result.json").read_text())


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from fastres.distributed import Dist
    from fastres.engine import prepare_training, rundir

    # Every input, before any process starts: one line here, not a failed run later.
    counts = _counts(args.nprocs)
    cfg = config_from(args)  # the preset, --set (run.out_dir refused: --out is ours), model
    for n in counts:  # what `fastres train` checks before its data, as rank 0 of n
        prepare_training(cfg, "", dist=Dist(rank=0, world_size=n))
    if args.json:
        check_output_file(args.json, overwrite=args.overwrite)  # reads only
    # The output folder, then the file: location, lock, refusal (--overwrite moves aside).
    out = args.out or tempfile.mkdtemp(prefix="fastres-scaling-")
    rundir.check_apart(out, args.data_dir)
    claimed = claim_output_dir(out, overwrite=args.overwrite)
    try:
        if claimed.moved_to is not None:
            print(f"--overwrite: the previous contents of {claimed.path} are now in "
                  f"{claimed.moved_to}", flush=True)
        if args.json:
            args.json = str(claim_output_file(args.json, overwrite=args.overwrite))
        with signals_raise():
            return _scaling(args, counts, claimed.path)
    except Stopped as e:
        print(f"fastres scaling: stopped by signal {e.signum}; the run it was training is "
              "stopped too (its checkpoint stays in OUT/nproc_N)", file=sys.stderr)
        return 128 + e.signum
    finally:
        claimed.release()


def _scaling(args, counts: list[int], root: Path) -> int:
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
        write_json(args.json, {"preset": args.preset, "rows": rows})
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("scaling", main))
