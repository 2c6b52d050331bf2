"""`fastres device-check`: every GPU path of fastres in one prepared run of at most 9 minutes.

Made for a GPU machine lent for minutes, offline, that returns few files: each stage runs
its commands as subprocesses, each under its own time limit, inside a cap on the whole run;
every log and JSON goes under --out, a summary table is printed last, and --bundle packs the
results into at most 8 files. A stage whose prerequisite is missing prints "skipped: why"
instead of failing the run.

    fastres device-check --out /tmp/dc --bundle OUT --jpeg-pack data/cifar10-jpeg75
    fastres device-check --out /tmp/dc --stages env,kernels         # a subset
    fastres device-check --out /tmp/dc --stages table --jpeg-pack P # the table: its own run
    fastres device-check --out /tmp/dc --dry-run --data-dir D       # the CPU rehearsal

v3: stages run in the order of what they decide, each limit sized from what the stage took
on an H200 (torch 2.11, 2026-12-04) with room to spare (seconds; the default run is capped
by --total, 540, with 30 s of it for decoding the JPEG pack):
  env       versions, device, DALI, copy bandwidth, bf16 matmul rate        (15; took 9)
  speedrun  the speed-run preset over 3 seeds (its default mode), hiverge's recipe
            (speedrun-hiverge) over --runs seeds, then 3 seeds of the speed-run preset with
            the whole step compiled and replayed as a CUDA graph    (150; 5 seeds took 51
            with compile=on, 28 of them warm-up)
  step      profile of the speed-run step in the modes eager, step+graph, model, step,
            with the GPU-busy share and the kernel table (--trace); resnet18_cifar at
            batch 512, eager against step+graph                  (130; 2 of 4 modes took 28)
  kernels   the GPU kernel tests (each kernel compiled once), bench-kernels --decisive,
            --host, --quick                  (135; 21 tests took 30, decisive 18, host 8)
  loaders   DALI (needs `import nvidia.dali`; see `fastres pack-dali`): parity with the
            tensor loader, bench-loaders img/s, 2 speed-runs through DALI (against the
            speedrun stage's tensor-loader runs)      (70; took 13, 20, and 18 for 2 epochs)
  table     `table --train --compile step --parallel 4` on ResNet-20/32/44/56 x the seed
            and fast recipes: a run of its own (`--stages table`), not in the default
            stages                                                             (500)

--dry-run runs every command on the CPU with tiny scales (one profile step at batch 8, one
speed-run of one epoch on 64 images, --scale smoke, bench-kernels --quick, ...), with
compilation off and 3x the time limits: a GPU run never meets a typo, a renamed flag or a
missing file. It needs --data-dir (small data will do) for the stages that train.

`--data-dir` is a folder with cifar-10-batches-py/; or give `--jpeg-pack` (the folder with
train.npz.xz, test.npz.xz and prepare.py of a JPEG-75 CIFAR-10 pack, 18 MB) and the data
are decoded into OUT/data first. Accuracy on that copy is not CIFAR-10 accuracy: it scores
~3 points lower (see its README).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastres.tools._common import Stopped, kill_group, signals_raise, sweep_group

STAGES = ("env", "speedrun", "step", "kernels", "loaders", "table")
DEFAULT_STAGES = ("env", "speedrun", "step", "kernels", "loaders")  # the table runs alone
BUDGET_S = {"env": 15, "speedrun": 150, "step": 130, "kernels": 135, "loaders": 70,
            "table": 500}
TOTAL_S = 540               # 9 minutes: a 10-minute device call with room to install
PREPARE_S = 30              # decoding the JPEG pack (~15 s on 2 cores)
# compute-sanitizer's share of the decisive kernel experiment (bench-kernels' default, 120 s,
# would take the whole kernels stage).
SANITIZER_S = 40
TABLE_MARGIN_S = 40         # the table's start-up, its rows' last checkpoints, the table
MIN_START_S = 10            # a step with less time than this left is skipped, not started
BUNDLE_MAX_FILES = 8
TABLE_MODELS = "resnet20,resnet32,resnet44,resnet56"
# Rows side by side on the GPU: one ResNet-20 step at batch 128-256 leaves most of an H200
# idle; 4 keeps each of the 16 host cores' share at 4 threads. Unmeasured on a GPU so far.
TABLE_PARALLEL = 4
# The dry run's data limits: enough for a few steps of every training command.
DRY_TRAIN, DRY_TEST, DRY_BATCH = 64, 64, 32
# The rehearsal runs the GPU budgets' commands on a CPU, where one step of the speed-run net
# takes seconds: its time limits (and the cap) are this many times the GPU run's.
DRY_SLACK = 3.0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres device-check", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for every log and JSON (created)")
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)} (default: "
                        f"{','.join(DEFAULT_STAGES)}; the table needs a run of its own)")
    p.add_argument("--data-dir", help="folder with cifar-10-batches-py/ (loaders' training "
                   "run, speedrun, table)")
    p.add_argument("--jpeg-pack", help="folder with the JPEG-75 pack and prepare.py; decoded "
                   "into OUT/data first")
    p.add_argument("--runs", type=int, default=5, help="speed-run seeds (default 5)")
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's time limit (repeatable)")
    p.add_argument("--total", type=float, default=TOTAL_S,
                   help=f"cap on the whole run in seconds (default {TOTAL_S})")
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU rehearsal: every command, tiny scales, compilation off")
    p.add_argument("--overwrite", action="store_true",
                   help="--out holds an earlier check: move it to OUT.old-<time> first")
    p.add_argument("--bundle", metavar="DIR",
                   help=f"also write the results into DIR as at most {BUNDLE_MAX_FILES} files: "
                        "summary.md, report.txt (every log), results.json (every JSON), "
                        "and the plots")
    p.add_argument("--env-probe", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument("--probe-small", action="store_true", help=argparse.SUPPRESS)
    return p


# --------------------------------------------------------------------------- env probe

def env_probe(path: Path, small: bool) -> dict:
    """The env stage's work, run in a child process so that its limit holds even if the
    driver hangs: environment record, nvidia-smi, DALI, and two measured ceilings."""
    import torch

    from fastres.bench import copy_bandwidth, environment, time_fn

    gpu = torch.cuda.is_available()
    dev = torch.device("cuda" if gpu else "cpu")
    small = small or not gpu             # a CPU gets the small sizes: 1 GiB copies take long
    info = {"environment": environment(dev), "cuda_available": gpu}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True,
            timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable ({type(e).__name__})"
    try:
        import nvidia.dali as dali

        info["dali_import"] = {"version": dali.__version__, "path": str(Path(
            dali.__file__).parent)}
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        info["dali_import"] = f"fails: {type(e).__name__}: {e}"
    # Two ceilings measured here, not read off a datasheet: device-to-device copy (bytes
    # read + written) and a large bf16 matrix product on random data (zeros run faster).
    nbytes = 2**22 if small else 2**30
    info["copy_gbps"] = round(copy_bandwidth(dev, nbytes=nbytes, repeats=5 if small else 10), 1)
    n = 256 if small else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, device=dev, repeats=3 if small else 10, warmup=1 if small else 3)
    info["bf16_matmul"] = {"n": n, "median_ms": round(t.median_ms, 3),
                           "tflops": round(2 * n**3 / t.median_s / 1e12, 3)}
    path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    e = info["environment"]
    print(f"device {e['device']} | torch {e['torch']} | triton {e['triton']} | CUDA "
          f"{e['cuda']} | python {e['python']} | git {e['git_sha']}")
    print(f"nvidia-smi: {info['nvidia_smi']}")
    print(f"DALI: {info['dali_import']}")
    print(f"copy {info['copy_gbps']} GB/s (read + write, {nbytes >> 20} MiB); bf16 matmul "
          f"{n}^3: {info['bf16_matmul']['tflops']} TFLOP/s")
    return info


# --------------------------------------------------------------------------- the plan

@dataclass
class Step:
    """One command of a stage. `share`: its part of the stage's time limit. `dry`: what the
    dry run adds (or replaces: a flag given here replaces the same flag's value)."""

    name: str
    argv: list[str]
    share: float
    dry: list[str] = field(default_factory=list)
    skip: str | None = None          # "why" when a prerequisite is missing
    env: dict = field(default_factory=dict)


def _merge(argv: list[str], extra: list[str]) -> list[str]:
    """argv with `extra`'s flags: a flag already in argv gets extra's value; the rest is
    appended. A flag's value is the next item unless that starts with '--'."""
    out = list(argv)
    i = 0
    while i < len(extra):
        flag = extra[i]
        has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        value = extra[i + 1] if has_value else None
        i += 2 if has_value else 1
        if flag in out and flag != "--set":
            j = out.index(flag)
            if value is not None and j + 1 < len(out) and not out[j + 1].startswith("--"):
                out[j + 1] = value
            continue
        out += [flag] + ([value] if value is not None else [])
    return out


def plan(stage: str, *, out: Path, py: str, repo: Path, data_dir: str | None, runs: int,
         dry: bool, limit: float, dali: str | None, gpu: bool,
         pytest: bool = True) -> list[Step]:
    """The steps of one stage, with the dry run's additions applied (`pytest`: whether the
    kernel tests can run)."""
    fr = [py, "-m", "fastres"]
    no_gpu = None if gpu or dry else "skipped: no CUDA device (--dry-run rehearses on the CPU)"
    no_data = None if data_dir else "skipped: no --data-dir or --jpeg-pack"
    small = ["--set", f"data.train_limit={DRY_TRAIN}", "--set", f"data.test_limit={DRY_TEST}",
             "--batch-size", str(DRY_BATCH), "--set", f"data.eval_batch_size={DRY_BATCH}"]
    steps: list[Step] = []
    if stage == "env":
        steps = [Step("env", fr + ["device-check", "--env-probe", str(out / "env.json")], 1.0,
                      dry=["--probe-small"])]
    elif stage == "speedrun":
        steps = [
            Step("speedrun", fr + ["speedrun", "--preset", "speedrun", "--runs",
                                   str(min(runs, 3)), "--data-dir", str(data_dir), "--out",
                                   str(out / "speedrun")], 0.2,
                 dry=["--runs", "1", "--epochs", "1", "--warmup-steps", "0", *small]),
            # The candidate recipe: 245 steps of 1,536 images (0.94x the speed-run's images)
            # and TTA for a fifth of the test set.
            Step("speedrun_hiverge", fr + ["speedrun", "--preset", "speedrun-hiverge",
                                           "--runs", str(runs), "--data-dir", str(data_dir),
                                           "--out", str(out / "speedrun_hiverge")], 0.3,
                 dry=["--runs", "1", "--epochs", "1", "--warmup-steps", "0", *small]),
            # The candidate GPU default: forward, backward, update as one graph, replayed as
            # a CUDA graph (its compilation is the warm-up, outside the timed runs).
            Step("speedrun_step_graph", fr + ["speedrun", "--preset", "speedrun", "--runs",
                                              str(min(runs, 3)), "--set", "run.compile=step",
                                              "--data-dir", str(data_dir), "--out",
                                              str(out / "speedrun_step_graph")], 0.5,
                 dry=["--runs", "1", "--epochs", "1", "--warmup-steps", "0", *small]),
        ]
        for s in steps:
            s.skip = no_gpu or no_data
    elif stage == "step":
        dry_prof = ["--steps", "1", "--warmup", "0", "--batch-size", "8", "--images", "16",
                    "--trace-steps", "1"]
        steps = [
            # What decides first: eager (the GPU default) against the whole step replayed
            # as a CUDA graph; then compile=on (why it lost to eager: the kernel table) and
            # the fused BN-GELU kernels in eager. step+graph's graph is the one the speedrun
            # stage compiled (Inductor's on-disk cache may hold it). `step` without the CUDA
            # graph is left out: the GPU-busy share of step+graph answers what it would.
            # The Triton kernels come last in both: a kernel fault would end the process.
            Step("step_speedrun", fr + ["profile", "--preset", "speedrun", "--modes",
                                        "eager,step+graph,model,eager+fused", "--steps", "30",
                                        "--busy", "--trace", str(out / "traces"),
                                        "--trace-steps", "3", "--json",
                                        str(out / "step_speedrun.json")], 0.68,
                 dry=dry_prof),
            Step("step_resnet18", fr + ["profile", "--preset", "resnet-paper", "--model",
                                        "resnet18_cifar", "--batch-size", "512", "--modes",
                                        "eager,step+graph,eager+fused", "--steps", "30", "--json",
                                        str(out / "step_resnet18.json")], 0.32, dry=dry_prof),
        ]
        for s in steps:
            s.skip = no_gpu
    elif stage == "kernels":
        tests = [str(repo / "tests" / f) for f in ("test_kernels_bn_act.py",
                                                    "test_kernels_sgd.py")]
        steps = [
            Step("kernel_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m",
                                  "gpu", *tests], 0.44,
                 skip=None if pytest else
                 "skipped: pytest is not installed (pip install pytest)"),
            Step("kernels_decisive", fr + ["bench-kernels", "--decisive", "--json",
                                           str(out / "kernels_decisive.json"),
                                           "--sanitizer-timeout", str(SANITIZER_S)], 0.16,
                 dry=["--quick"]),
            Step("kernels_host", fr + ["bench-kernels", "--host", "--json",
                                       str(out / "kernels_host.json")], 0.07, dry=["--quick"]),
            Step("kernels_bench", fr + ["bench-kernels", "--quick", "--json",
                                        str(out / "kernels.json")], 0.33),
        ]
        for s in steps:
            s.skip = no_gpu or s.skip
    elif stage == "loaders":
        no_dali = None if dali else "skipped: DALI not installed (see pack-dali)"
        steps = [
            Step("dali_parity", fr + ["loader-parity", "--json", str(out / "parity.json")],
                 0.25, dry=["--device", "cpu", "--images", "128", "--batch-size", "32"]),
            Step("dali_bench", fr + ["bench-loaders", "--loaders", "tensor,dali",
                                     "--batch-sizes", "2000", "--model", "airbench94",
                                     "--json", str(out / "loaders.json")], 0.33,
                 dry=["--synthetic", "512", "--batch-sizes", "64", "--repeats", "1",
                      "--batches", "2", "--warmup", "1", "--model", "resnet8",
                      "--train-steps", "1"]),
            # Training through DALI, timed as the speed-run times the tensor loader (the
            # speedrun stage's first step): the target is within 5% of it.
            Step("speedrun_dali", fr + ["speedrun", "--preset", "speedrun", "--loader",
                                        "dali", "--runs", "2", "--data-dir", str(data_dir),
                                        "--out", str(out / "speedrun_dali")], 0.42,
                 dry=["--runs", "1", "--epochs", "1", "--warmup-steps", "0", *small]),
        ]
        for s in steps:
            s.skip = no_gpu or no_dali
        steps[2].skip = steps[2].skip or no_data
    elif stage == "table":
        # The table tool sizes its runs to fit --budget-min; leave it a margin for start-up
        # and writing the table.
        minutes = max(0.1, (limit - TABLE_MARGIN_S) / 60)
        steps = [Step("table", fr + ["table", "--train", "--models", TABLE_MODELS, "--recipes",
                                     "seed,fast", "--scale", "full", "--compile", "step",
                                     "--parallel", str(TABLE_PARALLEL), "--budget-min",
                                     f"{minutes:.2f}", "--data-dir", str(data_dir), "--out",
                                     str(out / "table")], 1.0,
                      dry=["--scale", "smoke", "--budget-min", "0.2"],
                      skip=no_gpu or no_data)]
    if dry:
        for s in steps:
            s.argv = _merge(s.argv, s.dry)
            # No compilation in the rehearsal: inductor on a 2-core CPU takes minutes, and
            # the rehearsal is about commands and flags, not compiled speed.
            s.env["TORCHDYNAMO_DISABLE"] = "1"
            if "--device" not in s.argv and s.argv[:3] == fr and s.argv[3] in (
                    "train", "speedrun", "profile", "table", "bench-kernels",
                    "bench-loaders"):
                s.argv += ["--device", "cpu"]
    return steps


# --------------------------------------------------------------------------- running

def _tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-n:]
    except OSError:
        return []


def run_step(step: Step, out: Path, limit: float) -> dict:
    """Run one step; stdout and stderr go to OUT/<name>.log; never raises."""
    rec = {"step": step.name, "cmd": " ".join(shlex.quote(c) for c in step.argv),
           "limit_s": round(limit, 1), "log": f"{step.name}.log"}
    if step.skip:
        print(f"[{step.name}] {step.skip}", flush=True)
        (out / rec["log"]).write_text(f"$ {rec['cmd']}\n{step.skip}\n")
        return {**rec, "rc": step.skip, "seconds": 0.0}
    if limit < MIN_START_S:
        why = f"skipped: out of time (only {max(limit, 0):.0f} s left for it)"
        print(f"[{step.name}] {why}", flush=True)
        (out / rec["log"]).write_text(f"$ {rec['cmd']}\n{why}\n")
        return {**rec, "rc": why, "seconds": 0.0}
    print(f"[{step.name}] {rec['cmd']}  (limit {limit:.0f} s)", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **step.env)
    t0 = time.perf_counter()
    log = out / rec["log"]
    with open(log, "w") as f:
        f.write(f"$ {rec['cmd']}\n")
        f.flush()
        # A new session, so a timeout ends the command's children (DataLoader workers,
        # compile workers) with it.
        proc = subprocess.Popen(step.argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc = "timeout"
        except BaseException:  # device-check itself stopped (a signal): end the step too
            kill_group(proc, grace=2)
            with open(log, "a") as g:
                g.write("\n[device-check] stopped by a signal\n")
            raise
        finally:
            sweep_group(proc.pid)  # whatever the step left running in its group
    dt = time.perf_counter() - t0
    if rc == "timeout":
        with open(log, "a") as f:
            f.write(f"\n[device-check] stopped at its {limit:.0f} s limit\n")
    print("\n".join(f"    {line}" for line in _tail(log, 12)), flush=True)
    print(f"[{step.name}] rc={rc} in {dt:.0f} s", flush=True)
    return {**rec, "rc": rc, "seconds": round(dt, 1)}


def _importable(py: str, module: str) -> bool:
    """Whether `import module` works in the interpreter `py` (a fresh process)."""
    try:
        return subprocess.run([py, "-c", f"import {module}"], capture_output=True,
                              timeout=60).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _dali_importable(py: str) -> tuple[str | None, str]:
    """(version, where) when `import nvidia.dali` works in a fresh interpreter; else
    (None, why)."""
    try:
        p = subprocess.run([py, "-c", "import nvidia.dali as d, os; print(d.__version__, "
                            "os.path.dirname(d.__file__))"], capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        return None, "import nvidia.dali took over 120 s"
    if p.returncode == 0:
        v, _, where = p.stdout.strip().partition(" ")
        return v, where
    last = (p.stderr.strip().splitlines() or ["?"])[-1]
    return None, last


# --------------------------------------------------------------------------- results

def _ok(rc) -> bool:
    return rc == 0


def _skipped(rc) -> bool:
    return isinstance(rc, str) and rc.startswith("skipped")


def counts(results: list[dict]) -> str:
    """"N ok, S skipped, F failed (names)": what ran and what did not, in one line."""
    ok = sum(_ok(r["rc"]) for r in results)
    skipped = sum(_skipped(r["rc"]) for r in results)
    failed = [r["step"] for r in results if not _ok(r["rc"]) and not _skipped(r["rc"])]
    text = f"{ok} of {len(results)} steps ok, {skipped} skipped, {len(failed)} failed"
    return text + (f" ({', '.join(failed)})" if failed else "")


def summary_markdown(results: list[dict], *, total: float, dry: bool, env: dict | None,
                     out: Path) -> str:
    from fastres.tools._common import env_line, markdown_table

    lines = [f"# fastres device-check{' (dry run, CPU)' if dry else ''}", ""]
    if env:
        e = env.get("environment", {})
        lines += [env_line(e), "",
                  f"nvidia-smi: {env.get('nvidia_smi')}", f"DALI: {env.get('dali_import')}",
                  f"copy bandwidth: {env.get('copy_gbps')} GB/s; bf16 matmul: "
                  f"{env.get('bf16_matmul', {}).get('tflops')} TFLOP/s", ""]
    rows = [[r["stage"], r["step"], "ok" if _ok(r["rc"]) else str(r["rc"]),
             f"{r['seconds']:.0f}", f"{r['limit_s']:.0f}"] for r in results]
    lines += [markdown_table(["stage", "step", "result", "s", "limit s"], rows,
                             align="llrrr"), "", f"total {total:.0f} s; {counts(results)}", ""]
    for r in results:
        if isinstance(r["rc"], str) and r["rc"].startswith("skipped"):
            continue
        tail = [t for t in _tail(out / r["log"], 9) if t != f"$ {r['cmd']}"][-8:]
        lines += [f"## {r['step']}", "", "```", f"$ {r['cmd']}", *tail, "```", ""]
    return "\n".join(lines)


def bundle(out: Path, dest: Path, results: list[dict], summary: str) -> list[Path]:
    """At most BUNDLE_MAX_FILES files in `dest`: summary.md, report.txt (every log and text
    result), results.json (every JSON), then plots while room is left."""
    dest.mkdir(parents=True, exist_ok=True)
    written = [dest / "summary.md"]
    written[0].write_text(summary + "\n")
    parts = [summary, ""]
    for r in results:
        log = out / r["log"]
        text = log.read_text(errors="replace") if log.is_file() else "(no log)"
        if len(text) > 2_000_000:       # keep the file well under the 16 MiB a file cap
            text = text[:200_000] + "\n[... cut ...]\n" + text[-1_000_000:]
        parts.append(f"===== {r['step']} (rc={r['rc']}, {r['seconds']} s) =====\n{text}")
    for extra in sorted(out.rglob("*")):
        if extra.suffix in (".md", ".csv") and extra.is_file() and extra.stat().st_size < 2e6:
            parts.append(f"===== {extra.relative_to(out)} =====\n"
                         f"{extra.read_text(errors='replace')}")
    (dest / "report.txt").write_text("\n".join(parts))
    written.append(dest / "report.txt")
    merged = {"summary": results}
    for js in sorted(out.rglob("*.json")):
        if js.stat().st_size > 4e6:
            merged[str(js.relative_to(out))] = f"skipped: {js.stat().st_size} bytes"
            continue
        try:
            merged[str(js.relative_to(out))] = json.loads(js.read_text())
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
            merged[str(js.relative_to(out))] = f"unreadable: {e}"
    (dest / "results.json").write_text(json.dumps(merged, indent=1, default=str))
    written.append(dest / "results.json")
    for png in sorted(out.rglob("*.png")):
        if len(written) >= BUNDLE_MAX_FILES:
            break
        name = str(png.relative_to(out)).replace(os.sep, "_")
        (dest / name).write_bytes(png.read_bytes())
        written.append(dest / name)
    return written


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from fastres.errors import ConfigError

    if args.env_probe:
        env_probe(Path(args.env_probe), args.probe_small)
        return 0
    if not args.out:
        raise ConfigError("--out is required: the folder for every log and JSON")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"unknown stage(s) {unknown or args.stages!r}; choose from "
                          f"{', '.join(STAGES)}")
    budget = dict(BUDGET_S)
    for item in args.budget:
        k, _, v = item.partition("=")
        if k not in budget:
            raise ConfigError(f"--budget {item!r}: unknown stage {k!r}; choose from "
                              f"{', '.join(STAGES)}")
        try:
            budget[k] = float(v)
        except ValueError:
            raise ConfigError(f"--budget {item!r}: expected STAGE=SECONDS") from None
    if not args.total > 0:
        raise ConfigError(f"--total must be a positive number of seconds, got {args.total}")
    cap = args.total
    if args.dry_run:
        budget = {k: v * DRY_SLACK for k, v in budget.items()}
        cap *= DRY_SLACK
    if args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {args.runs}")
    if args.data_dir and args.jpeg_pack:
        raise ConfigError("give --data-dir or --jpeg-pack, not both")
    if args.jpeg_pack and not (Path(args.jpeg_pack) / "prepare.py").is_file():
        raise ConfigError(f"--jpeg-pack {args.jpeg_pack}: no prepare.py there (the folder "
                          f"shared/data/cifar10-jpeg75, copied whole)")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise ConfigError(f"--data-dir {args.data_dir}: no such folder")
    # One check, one folder (the training commands refuse to write over earlier runs, and
    # the bundle would mix two checks' results): the output contract's claim, before any
    # work; --overwrite moves an earlier check aside.
    from fastres.tools._common import claim_output_dir

    claimed = claim_output_dir(args.out, overwrite=args.overwrite, flag="--out")
    if args.bundle:  # the bundle is rewritten after every step: it must be this check's
        try:
            bundle_dir = claim_output_dir(args.bundle, overwrite=args.overwrite,
                                          flag="--bundle")
        except BaseException:
            claimed.release()
            raise
        bundle_dir.release()
    try:
        return _run(args, stages, budget, cap, Path(claimed.path).resolve())
    finally:
        claimed.release()


def _run(args, stages: list[str], budget: dict, cap: float, out: Path) -> int:
    py = sys.executable
    repo = Path(__file__).resolve().parents[2]
    t_start = time.perf_counter()

    def left() -> float:
        return cap - (time.perf_counter() - t_start)

    import torch

    gpu = torch.cuda.is_available()
    print(f"fastres device-check{' --dry-run (CPU rehearsal)' if args.dry_run else ''}: "
          f"stages {','.join(stages)}; cap {cap:.0f} s; out {out}", flush=True)
    if not gpu and not args.dry_run:
        print("no CUDA device: GPU stages are skipped (--dry-run rehearses them on the CPU)")
    results: list[dict] = []
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    needs_data = {"loaders", "speedrun", "table"} & set(stages)
    if args.jpeg_pack and needs_data and not _importable(py, "PIL"):
        print("prepare_data: skipped: Pillow is not installed (the JPEG pack's prepare.py "
              "decodes with it: pip install pillow); the stages that need data skip",
              flush=True)
        results.append({"stage": "prepare", "step": "prepare_data", "cmd": "-", "log": "-",
                        "rc": "skipped: Pillow is not installed", "seconds": 0.0,
                        "limit_s": 0.0})
    elif args.jpeg_pack and needs_data:
        data_dir = str(out / "data")
        step = Step("prepare_data", [py, str(Path(args.jpeg_pack).resolve() / "prepare.py"),
                                     data_dir], 1.0)
        rec = run_step(step, out, min(PREPARE_S * (DRY_SLACK if args.dry_run else 1), left()))
        results.append({"stage": "prepare", **rec})
        if not _ok(rec["rc"]):
            data_dir = None
    dali = None
    if "loaders" in stages:
        version, where = _dali_importable(py)
        dali = version
        print(f"DALI: {version} from {where}" if version else
              f"DALI: not importable ({where})", flush=True)
    def record() -> list[Path]:
        """summary.json, summary.md and the bundle as they stand: rewritten after every
        step, so a check stopped from outside still leaves what it measured."""
        total = time.perf_counter() - t_start
        env = None
        if (out / "env.json").is_file():
            try:
                env = json.loads((out / "env.json").read_text())
            except json.JSONDecodeError:
                env = None
        summary = summary_markdown(results, total=total, dry=args.dry_run, env=env, out=out)
        (out / "summary.json").write_text(json.dumps(
            {"dry_run": args.dry_run, "seconds": total, "steps": results}, indent=2) + "\n")
        (out / "summary.md").write_text(summary + "\n")
        return bundle(out, Path(args.bundle), results, summary) if args.bundle else []

    stopped = None
    with signals_raise():
        try:
            for stage in stages:
                stage_end = time.perf_counter() + min(budget[stage], max(0.0, left()))
                steps = plan(stage, out=out, py=py, repo=repo, data_dir=data_dir,
                             runs=args.runs, dry=args.dry_run,
                             limit=min(budget[stage], left()), dali=dali, gpu=gpu,
                             pytest=stage != "kernels" or _importable(py, "pytest"))
                for i, step in enumerate(steps):
                    # This step's limit: its share of the stage's time left, against the
                    # shares of the steps after it; time a step leaves unused flows on.
                    later = sum(s.share for s in steps[i + 1:] if not s.skip)
                    limit = (stage_end - time.perf_counter()) * step.share / (step.share +
                                                                                later)
                    results.append({"stage": stage,
                                    **run_step(step, out, min(limit, left()))})
                    record()
        except Stopped as e:
            stopped = e.signum
            results.append({"stage": "-", "step": "(check stopped)",
                            "rc": f"stopped by signal {e.signum}", "seconds": 0.0,
                            "limit_s": 0.0, "log": "-", "cmd": "-"})
    files = record()
    total = time.perf_counter() - t_start
    print("\n== device check summary ==")
    for r in results:
        res = "ok" if _ok(r["rc"]) else str(r["rc"])
        print(f"  {r['stage']:<9} {r['step']:<17} {res:<44.44} {r['seconds']:>5.0f} s")
    print(f"  total {total:.0f} s of a {cap:.0f} s cap; {counts(results)}; logs in {out}")
    if args.bundle:
        print(f"  bundle: {len(files)} files in {args.bundle}: "
              f"{', '.join(f.name for f in files)}")
    if stopped is not None:
        return 128 + stopped
    failed = [r for r in results if not _ok(r["rc"]) and not _skipped(r["rc"])]
    return 0 if not failed else 1



if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("device-check", main))
