"""`fastres device-check`: everything that needs a GPU, in one go, inside a time budget.

Made for a GPU machine lent for a few minutes: it runs each stage as a subprocess with its
own time limit, writes every log and JSON under one folder, and prints a summary table last.

    python tools/device_check.py --out OUT --data-dir D            # all stages
    python tools/device_check.py --out OUT --stages tests,kernels   # a subset
    python tools/device_check.py --out OUT --jpeg-pack shared/data/cifar10-jpeg75

Stages (default budget in seconds):
    env       GPU, driver, torch/triton/CUDA versions, a copy-bandwidth and matmul ceiling
    tests     the GPU-marked tests plus the kernel tests on the real device            (150)
    kernels   tools/bench_kernels.py: fused BN-act and optimizer step vs torch          (120)
    loaders   tools/bench_loaders.py: tensor (and DALI if installed) vs DataLoader       (60)
    profile   tools/profile_step.py --compare on the speed-run net                            (90)
    speedrun  tools/speedrun.py: the speedrun preset over N seeds                       (240)

`--data-dir` is a folder with cifar-10-batches-py/; or give `--jpeg-pack` (the folder that
holds train.npz.xz, test.npz.xz and prepare.py from shared/data/cifar10-jpeg75, 18 MB, easy
to carry) and the data are decoded first. Results on that copy are not CIFAR-10 accuracy:
the JPEG-75 copy scores ~3 points lower (see its README).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("env", "tests", "kernels", "loaders", "profile", "speedrun")
BUDGET_S = {"env": 60, "tests": 150, "kernels": 120, "loaders": 60, "profile": 90,
            "speedrun": 240}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastres device-check", add_help=add_help,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for logs and results")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--data-dir", help="folder with cifar-10-batches-py/ (for speedrun)")
    p.add_argument("--jpeg-pack", help="folder with the JPEG-75 pack and prepare.py; decoded "
                   "into OUT/data first")
    p.add_argument("--runs", type=int, default=5, help="speed-run seeds")
    p.add_argument("--budget", action="append", default=[], metavar="STAGE=SECONDS",
                   help="override a stage's time limit")
    p.add_argument("--speedrun-args", default="", help="extra arguments for the speedrun")
    p.add_argument("--bundle", help="also write report.txt (every log), results.json (every "
                   "JSON) and the speed-run plot into this folder: three files to fetch")
    return p


def _bundle(out: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    logs = sorted(out.glob("*.log"))
    with open(dest / "report.txt", "w") as f:
        for log in logs:
            f.write(f"===== {log.name} =====\n{log.read_text(errors='replace')}\n")
    merged = {}
    for js in sorted(out.rglob("*.json")):
        try:
            merged[str(js.relative_to(out))] = json.loads(js.read_text())
        except (json.JSONDecodeError, OSError) as e:
            merged[str(js.relative_to(out))] = f"unreadable: {e}"
    (dest / "results.json").write_text(json.dumps(merged, indent=1))
    for png in out.rglob("*.png"):
        (dest / png.name).write_bytes(png.read_bytes())


def _run(name: str, cmd: list[str], out: Path, limit: float) -> dict:
    """Run one stage; its stdout+stderr go to OUT/NAME.log; never raises."""
    log = out / f"{name}.log"
    t0 = time.time()
    print(f"[{name}] {' '.join(shlex.quote(c) for c in cmd)}  (limit {limit:.0f} s)",
          flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=limit,
                                  env=env)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    dt = time.time() - t0
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    print("\n".join(f"    {line}" for line in tail), flush=True)
    print(f"[{name}] rc={rc} in {dt:.0f} s", flush=True)
    return {"stage": name, "rc": rc, "seconds": round(dt, 1), "log": log.name}


def _env_stage(out: Path) -> dict:
    import torch

    from fastres.bench import environment

    info = {"nvidia_smi": None}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        info.update(environment(dev))
        # Two ceilings measured here, not taken from a datasheet: device-to-device copy
        # bandwidth (bytes read + written) and a large bf16 matmul rate (random data).
        x = torch.randn(2**28, device=dev)
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(10):
            y.copy_(x)
        end.record()
        end.synchronize()
        info["copy_tb_per_s"] = round(2 * x.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3)
                                      / 1e12, 3)
        del x, y
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        end.synchronize()
        info["bf16_matmul_tflops"] = round(2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3)
                                           / 1e12, 1)
    else:
        info.update(environment("cpu"))
        info["warning"] = "no CUDA device: GPU stages will skip or run their CPU paths"
    (out / "env.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2), flush=True)
    return {"stage": "env", "rc": 0, "seconds": 0, "log": "env.json"}


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        from fastres.errors import ConfigError

        raise ConfigError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    budget = dict(BUDGET_S)
    for item in args.budget:
        k, _, v = item.partition("=")
        budget[k] = float(v)
    py = sys.executable
    repo = Path(__file__).resolve().parent.parent
    results = []
    t_start = time.time()

    data_dir = args.data_dir
    if "speedrun" in stages and args.jpeg_pack and not data_dir:
        data_dir = str(out / "data")
        results.append(_run("prepare_data", [py, str(Path(args.jpeg_pack) / "prepare.py"),
                                             data_dir], out, 120))

    for stage in stages:
        limit = budget[stage]
        if stage == "env":
            results.append(_env_stage(out))
        elif stage == "tests":
            results.append(_run("tests", [py, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                          str(repo / "tests"), "-m", "gpu"], out, limit))
        elif stage == "kernels":
            results.append(_run("kernels", [py, "-m", "fastres", "bench-kernels", "--json",
                                            str(out / "kernels.json")], out, limit))
        elif stage == "loaders":
            results.append(_run("loaders", [py, "-m", "fastres", "bench-loaders", "--json",
                                            str(out / "loaders.json")], out, limit))
        elif stage == "profile":
            results.append(_run("profile", [py, "-m", "fastres", "profile", "--model",
                                            "airbench94", "--batch-size", "2000", "--compare",
                                            "--memory-formats", "channels_last", "--steps",
                                            "30", "--json", str(out / "profile.json")], out,
                                limit))
        elif stage == "speedrun":
            if not data_dir:
                results.append({"stage": "speedrun", "rc": "skipped (no --data-dir or "
                                "--jpeg-pack)", "seconds": 0, "log": ""})
                continue
            cmd = [py, "-m", "fastres", "speedrun", "--preset", "speedrun", "--data-dir",
                   data_dir, "--runs", str(args.runs), "--out", str(out / "speedrun")]
            results.append(_run("speedrun", cmd + shlex.split(args.speedrun_args), out, limit))

    total = time.time() - t_start
    (out / "summary.json").write_text(json.dumps({"stages": results, "seconds": total},
                                                 indent=2))
    print("\n== device check summary ==")
    for r in results:
        print(f"  {r['stage']:<14} rc={str(r['rc']):<10} {r['seconds']:>6} s   {r['log']}")
    print(f"  total {total:.0f} s; logs in {out}")
    if args.bundle:
        _bundle(out, Path(args.bundle))
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("device-check", main))
