"""`fastres scaling`: runs `fastres train` at 1 and 2 processes and tabulates img/s."""
import json
from pathlib import Path

import pytest

from fastres.tools import scaling
from fastres.tools.cli import main
from fastres.testing import synthetic_dir


@pytest.mark.slow
def test_scaling_one_and_two_processes(tmp_path, capsys):
    synthetic_dir(tmp_path / "data", 512, 128)
    argv = ["scaling", "--preset", "smoke", "--data-dir", str(tmp_path / "data"),
            "--nprocs", "1,2", "--set", "schedule.epochs=1", "--set", "data.train_limit=512",
            "--set", "data.test_limit=128", "--out", str(tmp_path / "runs")]
    rc = main(argv + ["--json", str(tmp_path / "scaling.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| processes | img/s | speed-up | efficiency |" in out
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [r["world_size"] for r in rows] == [1, 2] and rows[0]["speedup"] == 1.0
    # The same --out again: refused up front, naming it (not a failed child run).
    assert main(argv) == 2
    assert f"{tmp_path / 'runs'} already holds 2 files (nproc_1, nproc_2)" in \
        capsys.readouterr().err


def test_scaling_rejects_bad_counts(tmp_path, capsys):
    assert main(["scaling", "--data-dir", str(tmp_path), "--nprocs", "0,2"]) == 2
    assert "--nprocs must be positive" in capsys.readouterr().err


def test_scaling_checks_the_preset_and_overrides_before_any_process(tmp_path, capsys):
    assert main(["scaling", "--preset", "smokee", "--data-dir", str(tmp_path)]) == 2
    assert "unknown preset 'smokee' (did you mean 'smoke'?)" in capsys.readouterr().err
    assert main(["scaling", "--data-dir", str(tmp_path), "--set", "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


# --------------------------------------------------------------------------- without training
# `fake_train` stands in for the `fastres train` child processes: it records each command
# and, for a run that succeeds, writes the result.json that scaling reads.


def fake_train(monkeypatch, *, returncode=0, stderr=""):
    calls = []

    class Run:  # subprocess.Popen, as scaling uses it
        def __init__(self, cmd, **kwargs):
            calls.append(cmd)
            self.pid, self.returncode = -1, returncode
            if returncode == 0:
                out = Path(cmd[cmd.index("--out") + 1])
                out.mkdir(parents=True)
                n = next((int(a.split("=")[1]) for a in cmd
                          if a.startswith("--nproc_per_node=")), 1)
                (out / "result.json").write_text(json.dumps(
                    {"img_per_s": 100.0 * n, "timed_s": 1.0, "top1": 0.5, "world_size": n,
                     "device": "cpu"}))

        def communicate(self):
            return "", stderr

    monkeypatch.setattr(scaling.subprocess, "Popen", Run)
    return calls


def test_scaling_refuses_an_earlier_run_in_out_unless_overwrite(tmp_path, monkeypatch, capsys):
    out, report = tmp_path / "sc", tmp_path / "scaling.json"
    (out / "nproc_1").mkdir(parents=True)
    (out / "nproc_1" / "result.json").write_text("{}")
    report.write_text("{}")
    calls = fake_train(monkeypatch)
    argv = ["scaling", "--data-dir", str(tmp_path / "data"), "--nprocs", "1", "--out", str(out)]
    # Refused in one line naming the folder, before any process starts; nothing moved.
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} already holds" in err and "--overwrite" in err
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["sc", "scaling.json"]
    # An existing --json FILE is refused too, before --out is touched.
    assert main(argv[:-2] + ["--out", str(tmp_path / "new"), "--json", str(report)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "new").exists()
    # --overwrite moves both aside (nothing deleted), then trains into the empty folder.
    assert main(argv + ["--json", str(report), "--overwrite"]) == 0
    assert "are now in" in capsys.readouterr().out and len(calls) == 1
    old = [p for p in tmp_path.iterdir() if p.name.startswith("sc.old-")]
    assert len(old) == 1 and (old[0] / "nproc_1" / "result.json").read_text() == "{}"
    assert [p.name.startswith("scaling.old-") for p in tmp_path.glob("scaling.*")].count(True) == 1
    assert json.loads(report.read_text())["rows"][0]["nproc"] == 1
    assert json.loads((out / "nproc_1" / "result.json").read_text())["top1"] == 0.5


@pytest.mark.parametrize("nprocs, message", [
    ("1,2,1", "--nprocs names 1 twice in '1,2,1'"),
    ("", "--nprocs: expected a comma-separated list"),
    (" , ", "--nprocs: expected a comma-separated list"),
    ("2,-1", "--nprocs must be positive"),
    ("1,two", "--nprocs must be positive"),
])
def test_scaling_checks_nprocs_before_any_process(tmp_path, monkeypatch, capsys, nprocs,
                                                  message):
    calls = fake_train(monkeypatch)
    assert main(["scaling", "--data-dir", str(tmp_path), "--nprocs", nprocs,
                 "--out", str(tmp_path / "sc")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert calls == [] and not (tmp_path / "sc").exists()


@pytest.mark.parametrize("args, message", [
    (["--nprocs", "1,3"], "does not split evenly over 3 processes"),
    (["--set", "run.out_dir=elsewhere"], "run.out_dir names a training run's directory"),
    (["--set", "model.name=resnet88"], "did you mean 'resnet8'"),
])
def test_scaling_checks_every_run_before_the_first(tmp_path, monkeypatch, capsys, args,
                                                   message):
    calls = fake_train(monkeypatch)
    assert main(["scaling", "--data-dir", str(tmp_path), "--out", str(tmp_path / "sc"),
                 *args]) == 2
    assert message in capsys.readouterr().err
    assert calls == [] and not (tmp_path / "sc").exists()


TORCHRUN_STDERR = """\
fastres train: [rank 1/2] error: no CIFAR-10 data in /d (it is empty)
fastres train: [rank 0/2] error: no CIFAR-10 data in /d (it is empty)
E1207 04:25:11.265000 2179 torch/distributed/elastic/multiprocessing/api.py:1002] failed
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
  exitcode  : 2 (pid: 2186)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
============================================================
"""


def test_scaling_shows_the_failed_runs_own_error(tmp_path, monkeypatch, capsys):
    fake_train(monkeypatch, returncode=1, stderr=TORCHRUN_STDERR)
    assert main(["scaling", "--data-dir", str(tmp_path), "--nprocs", "2",
                 "--out", str(tmp_path / "sc")]) == 2
    err = capsys.readouterr().err
    assert err == ("fastres scaling: error: the 2-process run failed (exit 1): fastres train: "
                   "[rank 1/2] error: no CIFAR-10 data in /d (it is empty)\n")
    # No such line (a crash): the last lines, as before.
    fake_train(monkeypatch, returncode=1, stderr="Traceback\n  ...\nRuntimeError: boom\n")
    assert main(["scaling", "--data-dir", str(tmp_path), "--nprocs", "1",
                 "--out", str(tmp_path / "sc")]) == 2
    assert "(exit 1): Traceback |   ... | RuntimeError: boom" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stopped_scaling_stops_the_run_it_was_training(tmp_path):
    """SIGTERM to `fastres scaling` left its `fastres train` child training into OUT; now the
    child's process group is stopped too (SIGINT first: it checkpoints), exit 128 + 15."""
    import os
    import signal
    import subprocess
    import sys
    import time

    synthetic_dir(tmp_path / "data", 512, 128)
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastres", "scaling", "--preset", "smoke", "--data-dir",
         str(tmp_path / "data"), "--nprocs", "1", "--set", "schedule.epochs=200",
         "--set", "data.train_limit=512", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "nproc_1" / "config.json").exists():  # the child has started training
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    child = json.loads((out / "nproc_1" / ".fastres.lock").read_text())["pid"]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal 15" in err
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone
