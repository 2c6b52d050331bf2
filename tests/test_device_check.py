"""`fastres device-check` v2 and `fastres loader-parity`.

The dry run is the CPU rehearsal of the GPU run: every stage's command, with tiny budgets
and scales, on data written here in the real format. It runs in CI (~1.5 min of CPU), so a
GPU run never discovers a typo or a renamed flag. The rest checks the plan itself (the GPU
run's exact commands, "skipped: why" for each missing prerequisite), time limits, the
bundle's file cap, and the parity check's power to catch a loader that augments wrongly.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastres.testing import synthetic_dir
from fastres.tools.gpu_kit import device_check as dc
from fastres.tools.gpu_kit import loader_parity as lp
from fastres.tools.cli import run_tool

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _dali() -> bool:
    from fastres.pipelines.dali import dali_available

    return dali_available()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return synthetic_dir(tmp_path_factory.mktemp("cifar"), dc.DRY_TRAIN * 2, dc.DRY_TEST)


def one_line_error(capsys, argv, needle: str) -> None:
    assert run_tool("device-check", dc.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastres device-check: error:"), err
    assert needle in err[0], err[0]


# --------------------------------------------------------------------------- the rehearsal

def test_dry_run_runs_every_command(data_dir, tmp_path):
    out, bundle = tmp_path / "dc", tmp_path / "bundle"
    proc = subprocess.run([PY, "-m", "fastres", "device-check", "--dry-run", "--out", str(out),
                           "--stages", ",".join(dc.STAGES),  # the table's own run included
                           "--data-dir", data_dir, "--bundle", str(bundle)],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    # Every step of every stage, each one ran and exited 0; DALI's only when it imports.
    expected = [s.name for stage in dc.STAGES for s in dc.plan(
        stage, out=out, py=PY, repo=ROOT, data_dir=data_dir, runs=1, dry=True, limit=60,
        dali="x", gpu=False)]
    assert list(steps) == expected
    bad = {}
    for name, s in steps.items():
        if name.startswith("dali_") and not _dali():
            assert s["rc"] == "skipped: DALI not installed (see pack-dali)"
        elif s["rc"] != 0:
            bad[name] = (s["rc"], (out / s["log"]).read_text()[-1500:])
    assert not bad, "\n\n".join(f"{k}: rc={rc}\n{log}" for k, (rc, log) in bad.items())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The dry run really shrank the work: tiny steps, one run, smoke scale, on the CPU.
    cmds = {k: s["cmd"] for k, s in steps.items()}
    assert "--steps 1" in cmds["step_speedrun"] and "--device cpu" in cmds["step_speedrun"]
    assert "--runs 1" in cmds["speedrun"] and "--scale smoke" in cmds["table"]
    env = json.loads((out / "env.json").read_text())
    assert env["copy_gbps"] > 0 and env["bf16_matmul"]["tflops"] > 0
    for js in ("step_speedrun.json", "step_resnet18.json", "kernels.json"):
        assert (out / js).is_file(), js
    if _dali():
        assert json.loads((out / "parity.json").read_text())["ok"] is True
    files = sorted(p.name for p in bundle.iterdir())
    assert len(files) <= dc.BUNDLE_MAX_FILES
    assert {"summary.md", "report.txt", "results.json"} <= set(files)
    assert "device check summary" in proc.stdout


# --------------------------------------------------------------------------- the plan

def _plan(stage, **kw):
    base = dict(out=Path("/o"), py="py", repo=Path("/r"), data_dir="/d", runs=5, dry=False,
                limit=60.0, dali="2.4.0", gpu=True)
    base.update(kw)
    return dc.plan(stage, **base)


def test_gpu_plan_has_the_exact_commands():
    cmd = {s.name: " ".join(s.argv) for st in dc.STAGES for s in _plan(st)}
    assert all(not s.skip for st in dc.STAGES for s in _plan(st))
    assert "pytest -q -p no:cacheprovider -m gpu /r/tests/test_kernels_bn_act.py " \
           "/r/tests/test_kernels_sgd.py" in cmd["kernel_tests"]
    assert "bench-kernels --decisive --json /o/kernels_decisive.json" in cmd["kernels_decisive"]
    assert cmd["kernels_host"].endswith("bench-kernels --host --json /o/kernels_host.json")
    assert cmd["kernels_bench"].endswith("bench-kernels --quick --json /o/kernels.json")
    assert "profile --preset speedrun --modes eager,step+graph,model,eager+fused --steps 30 " \
           "--busy " \
           "--trace /o/traces --trace-steps 3 --json" in cmd["step_speedrun"]
    assert "profile --preset resnet-paper --model resnet18_cifar --batch-size 512 --modes " \
           "eager,step+graph,eager+fused --steps 30 --json" in cmd["step_resnet18"]
    assert "speedrun --preset speedrun --loader dali --runs 2 --data-dir /d --out " \
           "/o/speedrun_dali" in cmd["speedrun_dali"]
    assert "speedrun --preset speedrun --runs 3 --data-dir /d" in cmd["speedrun"]
    assert "speedrun --preset speedrun-hiverge --runs 5 --data-dir /d" \
        in cmd["speedrun_hiverge"]
    assert "speedrun --preset speedrun --runs 3 --set run.compile=step --data-dir /d" \
        in cmd["speedrun_step_graph"]
    minutes = (60.0 - dc.TABLE_MARGIN_S) / 60  # the stage's limit less the table's margin
    assert "table --train --models resnet20,resnet32,resnet44,resnet56 --recipes " \
           f"seed,fast --scale full --compile step --parallel 4 --budget-min {minutes:.2f} " \
           "--data-dir /d --out /o/table" \
           in cmd["table"]
    assert "--device" not in " ".join(cmd.values())     # the GPU run uses each tool's auto


def test_v3_orders_stages_by_what_they_decide():
    """The speed-run first; every default stage's limit covers what it took on the H200
    (env 9 s, speed-run 51 s, DALI 13 + 20 + 18 s, kernel tests 30 s + decisive 18 s + host
    8 s, two profile modes 28 s) with room to spare; the table runs on its own."""
    assert dc.DEFAULT_STAGES[:2] == ("env", "speedrun") and "table" not in dc.DEFAULT_STAGES
    took = {"env": 9, "speedrun": 51, "loaders": 13 + 20 + 18, "kernels": 30 + 18 + 8,
            "step": 28}
    for stage, seconds in took.items():
        assert dc.BUDGET_S[stage] >= 1.3 * seconds, stage


def test_missing_prerequisites_skip_with_a_reason():
    no_gpu = [s.skip for st in dc.STAGES if st != "env" for s in _plan(st, gpu=False)]
    assert no_gpu and all(s.startswith("skipped: no CUDA device") for s in no_gpu)
    assert not _plan("env", gpu=False)[0].skip
    assert all(s.skip == "skipped: DALI not installed (see pack-dali)"
               for s in _plan("loaders", dali=None))
    assert _plan("speedrun", data_dir=None)[0].skip == "skipped: no --data-dir or --jpeg-pack"
    assert _plan("table", data_dir=None)[0].skip.startswith("skipped: no --data-dir")
    loaders = _plan("loaders", data_dir=None)
    assert [bool(s.skip) for s in loaders] == [False, False, True]


def test_merge_replaces_values_and_appends_flags():
    argv = ["x", "--steps", "50", "--json", "f", "--set", "a=1"]
    got = dc._merge(argv, ["--steps", "1", "--quick", "--set", "b=2"])
    assert got == ["x", "--steps", "1", "--json", "f", "--set", "a=1", "--quick", "--set",
                   "b=2"]


def test_stage_shares_sum_to_one():
    for stage in dc.STAGES:
        assert sum(s.share for s in _plan(stage)) == pytest.approx(1.0), stage
    default = sum(dc.BUDGET_S[st] for st in dc.DEFAULT_STAGES)
    assert default + dc.PREPARE_S <= dc.TOTAL_S <= 9 * 60
    assert dc.BUDGET_S["table"] + dc.PREPARE_S <= dc.TOTAL_S


# --------------------------------------------------------------------------- running

def test_a_step_over_its_limit_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "MIN_START_S", 1)
    step = dc.Step("sleepy", [PY, "-c", "import subprocess, sys, time; "
                              "subprocess.Popen([sys.executable, '-c', 'import time; "
                              "time.sleep(60)']); print('started', flush=True); "
                              "time.sleep(60)"], 1.0)
    t0 = time.perf_counter()
    rec = dc.run_step(step, tmp_path, limit=2)
    assert rec["rc"] == "timeout" and time.perf_counter() - t0 < 30
    log = (tmp_path / "sleepy.log").read_text()
    assert "started" in log and "stopped at its 2 s limit" in log


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _pid_written(path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} was never written")


@pytest.mark.parametrize("how", ["exits", "times out"])
def test_nothing_a_step_started_outlives_it(tmp_path, monkeypatch, how):
    """A grandchild that ignores SIGINT (compute-sanitizer's target, a worker) is killed
    with its step's process group, whether the step ends by itself or at its limit."""
    monkeypatch.setattr(dc, "MIN_START_S", 1)
    pid_file = tmp_path / "grandchild.pid"
    grandchild = ("import signal, time, os; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    tail = "time.sleep(0.5)" if how == "exits" else "time.sleep(120)"
    step = dc.Step("leaves", [PY, "-c", f"import subprocess, sys, time; subprocess.Popen("
                              f"[sys.executable, '-c', {grandchild!r}]); {tail}"], 1.0)
    if how == "exits":
        rec = dc.run_step(step, tmp_path, limit=60)
        assert rec["rc"] == 0
    else:
        rec = dc.run_step(step, tmp_path, limit=3)
        assert rec["rc"] == "timeout"
    pid = _pid_written(pid_file)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def test_a_stopped_check_ends_its_step_and_keeps_what_it_measured(tmp_path, monkeypatch,
                                                                    capsys):
    """SIGTERM (an outer time limit) while a step runs: the step's group is ended, the
    summary and the bundle are written with the steps done so far, exit 128 + 15."""
    import signal
    import threading

    monkeypatch.setattr(dc, "MIN_START_S", 1)
    pid_file = tmp_path / "step.pid"
    steps = [dc.Step("quick", [PY, "-c", "print('measured 42')"], 0.5),
             dc.Step("slow", [PY, "-c", f"import os, time; open({str(pid_file)!r}, 'w')"
                              f".write(str(os.getpid())); time.sleep(120)"], 0.5)]
    monkeypatch.setattr(dc, "plan", lambda stage, **kw: steps if stage == "env" else [])
    threading.Thread(target=lambda: (_pid_written(pid_file),
                                     os.kill(os.getpid(), signal.SIGTERM)),
                     daemon=True).start()
    out, bundle = tmp_path / "o", tmp_path / "b"
    rc = dc.main(["--out", str(out), "--stages", "env", "--bundle", str(bundle)])
    assert rc == 128 + signal.SIGTERM
    assert not _alive(_pid_written(pid_file))
    summary = json.loads((out / "summary.json").read_text())["steps"]
    assert [r["step"] for r in summary] == ["quick", "(check stopped)"]
    assert summary[0]["rc"] == 0 and "measured 42" in (bundle / "report.txt").read_text()
    assert "stopped by a signal" in (out / "slow.log").read_text()
    assert "1 of 2 steps ok, 0 skipped, 1 failed" in capsys.readouterr().out


def test_skipped_and_out_of_time_steps_do_not_run(tmp_path):
    never = [PY, "-c", "open('ran', 'w')"]
    rec = dc.run_step(dc.Step("s", never, 1.0, skip="skipped: because"), tmp_path, limit=60)
    assert rec["rc"] == "skipped: because"
    rec = dc.run_step(dc.Step("t", never, 1.0), tmp_path, limit=dc.MIN_START_S - 1)
    assert rec["rc"].startswith("skipped: out of time")
    assert not (tmp_path / "ran").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_stages_skip_and_the_run_passes(tmp_path, capsys):
    out, bundle = tmp_path / "o", tmp_path / "b"
    rc = dc.main(["--out", str(out), "--stages", "env,kernels,speedrun", "--bundle",
                  str(bundle)])
    text = capsys.readouterr().out
    assert rc == 0, text
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps[0]["step"] == "env" and steps[0]["rc"] == 0
    assert all(str(s["rc"]).startswith("skipped: no CUDA device") for s in steps[1:])
    assert "skipped: no CUDA device" in (bundle / "summary.md").read_text()


def test_bundle_never_exceeds_eight_files(tmp_path):
    out = tmp_path / "o"
    (out / "deep" / "er").mkdir(parents=True)
    for i in range(12):
        (out / "deep" / "er" / f"plot{i}.png").write_bytes(b"\x89PNG")
    (out / "a.log").write_text("log")
    (out / "x.json").write_text('{"k": 1}')
    (out / "bad.json").write_text("{")
    results = [{"stage": "env", "step": "a", "rc": 0, "seconds": 1.0, "log": "a.log",
                "cmd": "c", "limit_s": 1}]
    files = dc.bundle(out, tmp_path / "b", results, "summary")
    assert len(files) == dc.BUNDLE_MAX_FILES == len(list((tmp_path / "b").iterdir()))
    merged = json.loads((tmp_path / "b" / "results.json").read_text())
    assert merged["x.json"] == {"k": 1} and merged["bad.json"].startswith("unreadable")


def test_argument_errors(tmp_path, capsys):
    one_line_error(capsys, ["--stages", "env"], "--out is required")
    one_line_error(capsys, ["--out", str(tmp_path), "--stages", "env,gpuz"], "unknown stage")
    one_line_error(capsys, ["--out", str(tmp_path), "--budget", "env=soon"], "STAGE=SECONDS")
    one_line_error(capsys, ["--out", str(tmp_path), "--budget", "nope=3"], "unknown stage")
    one_line_error(capsys, ["--out", str(tmp_path), "--jpeg-pack", str(tmp_path)],
                   "no prepare.py")
    one_line_error(capsys, ["--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "no")],
                   "no such folder")
    (tmp_path / "o" / "old.log").parent.mkdir()
    (tmp_path / "o" / "old.log").write_text("an earlier check")
    one_line_error(capsys, ["--out", str(tmp_path / "o")], "--overwrite")
    one_line_error(capsys, ["--out", str(tmp_path / "p"), "--total", "-1"],
                   "--total must be a positive number")
    one_line_error(capsys, ["--out", str(tmp_path / "p"), "--bundle", str(tmp_path / "o")],
                   "--bundle")
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- loader parity

def test_read_back_recovers_the_plan():
    """The decoder of the readable images gives back exactly the tensor loader's draws."""
    from fastres.pipelines import Augment, build_loader
    from fastres.pipelines.augment import pad_images

    images, labels = lp.readable_images(300)
    for settings in lp.CASES.values():
        aug = Augment(**settings)
        loader = build_loader("tensor", images, labels, train=True, batch_size=100,
                              device="cpu", dtype=torch.float32, mean=lp.MEAN, std=lp.STD,
                              augment=aug, seed=3)
        plan = loader.plan(1)
        loader.set_epoch(1)
        x, y = next(iter(loader))
        d = lp.read_back(lp.unjitter(x, plan, 0), aug.pad, lp.MEAN, lp.STD)
        assert torch.equal(d["index"], plan.indices[:100])
        assert torch.equal(d["dy"], plan.dy[:100]) and torch.equal(d["dx"], plan.dx[:100])
        assert torch.equal(d["flip"], plan.flip[:100])
        assert torch.equal(y, d["index"] % 10)
        padded = pad_images(torch.as_tensor(images), aug.pad, aug.pad_mode)
        exp = lp.rebuild(padded, d["index"], d["dy"], d["dx"], d["flip"]).float()
        assert ((exp != d["u8"]).any(-1) & ~d["cut"]).sum() == 0


@pytest.mark.parametrize("breakage", ["mirror", "channels", "labels"])
def test_parity_catches_a_broken_loader(monkeypatch, breakage):
    """A 'DALI' loader that mirrors once too often, swaps channels or shifts labels fails."""
    import fastres.pipelines as pipes

    real = pipes.build_loader

    class Broken:
        def __init__(self, inner):
            self.inner = inner
            self.num_examples = inner.num_examples

        def __len__(self):
            return len(self.inner)

        def set_epoch(self, e):
            self.inner.set_epoch(e)

        def __iter__(self):
            for x, y in self.inner:
                if breakage == "mirror":
                    x = x.flip(-1)
                elif breakage == "channels":
                    x = x[:, [1, 0, 2]]
                else:
                    y = (y + 1) % 10
                yield x, y

    def fake(name, *a, **kw):
        return Broken(real("tensor", *a, **kw)) if name == "dali" else real(name, *a, **kw)

    monkeypatch.setattr(pipes, "build_loader", fake)
    images, labels = lp.readable_images(256)
    r = lp.run_case("paper", lp.CASES["paper"], images, labels, device=torch.device("cpu"),
                    dtype=torch.float32, batch=64, epochs=2, seed=0, threads=1)
    failed = {k for k, c in r["checks"].items() if not c["ok"]}
    assert not r["ok"] and "same batches fp32" in failed, r["checks"]
    want = {"mirror": "flips", "channels": "labels", "labels": "labels"}[breakage]
    assert want in failed, failed


def test_parity_passes_on_the_cpu_operators(tmp_path, capsys):
    if not _dali():
        pytest.skip("NVIDIA DALI is not installed")
    rc = lp.main(["--device", "cpu", "--images", "128", "--batch-size", "32", "--dtype",
                  "bf16", "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["ok"] and set(res["cases"]) == set(lp.CASES)
    assert all("same batches bfloat16" in c["checks"] for c in res["cases"].values())


def test_parity_arguments(capsys):
    for argv, needle in ((["--cases", "nope"], "unknown case"),
                         (["--images", "70000"], "--images must lie"),
                         (["--images", "64", "--batch-size", "128"], "--batch-size must lie")):
        assert run_tool("loader-parity", lp.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
