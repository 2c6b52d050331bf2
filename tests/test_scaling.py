"""`fastres scaling`: runs `fastres train` at 1 and 2 processes and tabulates img/s."""
import json

import pytest

from fastres.tools.cli import main
from fastres.testing import synthetic_dir


@pytest.mark.slow
def test_scaling_one_and_two_processes(tmp_path, capsys):
    synthetic_dir(tmp_path / "data", 512, 128)
    rc = main(["scaling", "--preset", "smoke", "--data-dir", str(tmp_path / "data"),
               "--nprocs", "1,2", "--set", "schedule.epochs=1", "--set", "data.train_limit=512",
               "--set", "data.test_limit=128", "--out", str(tmp_path / "runs"),
               "--json", str(tmp_path / "scaling.json")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| processes | img/s | speed-up | efficiency |" in out
    rows = json.loads((tmp_path / "scaling.json").read_text())["rows"]
    assert [r["world_size"] for r in rows] == [1, 2] and rows[0]["speedup"] == 1.0


def test_scaling_rejects_bad_counts(tmp_path, capsys):
    assert main(["scaling", "--data-dir", str(tmp_path), "--nprocs", "0,2"]) == 2
    assert "--nprocs must be positive" in capsys.readouterr().err


def test_scaling_checks_the_preset_and_overrides_before_any_process(tmp_path, capsys):
    assert main(["scaling", "--preset", "smokee", "--data-dir", str(tmp_path)]) == 2
    assert "unknown preset 'smokee' (did you mean 'smoke'?)" in capsys.readouterr().err
    assert main(["scaling", "--data-dir", str(tmp_path), "--set", "optim.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
