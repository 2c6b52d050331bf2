"""`fastres speedrun` and `fastres profile` on the CPU smoke preset.

What is checked: each tool runs end to end on a tiny synthetic CIFAR-10 written in the real
on-disk format, its outputs exist with the documented keys, columns and rows (PNG, JSON,
Markdown, CSV, Chrome trace), and argument mistakes end with exit status 2 and one line.
Timings are never asserted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastres.tools.cli import main as cli_main
from fastres.tools.cli import run_tool
from fastres.testing import synthetic_dir
from fastres import bench
from fastres.tools import profile as prof
from fastres.tools import speedrun
from fastres.tools._common import markdown_table, summarize

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return synthetic_dir(tmp_path_factory.mktemp("cifar"), 256, 128)


def smoke(data_dir: str, *extra: str) -> list[str]:
    """The smoke preset cut down to a few steps: 128 train / 64 test images, batch 64."""
    return ["--preset", "smoke", "--data-dir", data_dir, "--set", "data.train_limit=128",
            "--set", "data.test_limit=64", "--set", "data.batch_size=64",
            "--set", "data.eval_batch_size=64", *extra]


def one_line_error(capsys, tool: str, main, argv, needle: str) -> None:
    assert run_tool(tool, main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastres {tool}: error:"), err
    assert needle in err[0]


def test_profile_and_train_build_the_same_step(capsys):
    """`fastres profile` times the step `fastres train` runs: the same resolved config, so
    the same micro-batching (500-image micro-batches of the 2000-image batch on a CPU)."""
    from fastres.tools import train as train_tool

    assert prof.main(["--preset", "speedrun", "--print-config"]) == 0
    profiled = json.loads(capsys.readouterr().out)
    assert train_tool.main(["--preset", "speedrun", "--print-config"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert profiled["run"]["micro_batch"] == trained["run"]["micro_batch"] == 500
    assert profiled["data"]["batch_size"] == trained["data"]["batch_size"] == 2000
    for section in ("optim", "schedule", "model"):
        assert profiled[section] == trained[section], section


@pytest.mark.slow
def test_profile_check_graph(capsys, tmp_path):
    """The CPU-side proof that the whole step is one graph per phase: the same tiny
    resnet-paper step as tests/test_step.py (so Inductor's cache is warm)."""
    js = tmp_path / "g.json"
    rc = prof.main(["--preset", "resnet-paper", "--model", "resnet8", "--batch-size", "8",
                    "--images", "64", "--set", "schedule.steps=6", "--set", "run.micro_batch=0",
                    "--check-graph", "--json", str(js)])
    assert rc == 0
    assert "graph breaks: 0, recompiles: 0" in capsys.readouterr().out
    report = json.loads(js.read_text())["graph_check"]
    assert report["breaks"] == 0 and report["recompiles"] == 0 and report["reasons"] == []
    assert report["steps"][:3] == [0, 1, 2] and 5 in report["steps"]


# --------------------------------------------------------------------------- helpers

def test_markdown_table_aligns_columns():
    text = markdown_table(["model", "top-1"], [["resnet20", "92.02"], ["r8", "9.5"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1          # every line the same width
    assert lines[1].startswith("|:") and lines[1].endswith(":|")  # left, then right
    assert lines[3] == "| r8       |   9.5 |"


def test_summarize():
    s = summarize([1.0, 2.0, 3.0, None])
    assert s == {"n": 3, "mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert summarize([5.0])["std"] == 0.0
    assert summarize([None])["mean"] is None


@pytest.mark.parametrize("name,math,key,peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.4),
    ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.5),
    ("NVIDIA H100 NVL", "tf32", "H100 NVL", 417.5),
    ("NVIDIA H200", "fp16", "H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", "tf32", "A100", 156.0),
    ("NVIDIA A100 80GB PCIe", "fp32", "A100", 19.5),
])
def test_device_peaks(name, math, key, peak):
    assert bench.device_peak(name, math) == (key, peak)


def test_unknown_device_has_no_peak():
    assert bench.device_peak("NVIDIA GeForce RTX 4090", "bf16") is None


def test_timer_counts_the_gc_pauses_of_its_timed_intervals_only():
    import gc

    timer = bench.Timer("cpu")
    gc.disable()  # only the collections asked for below: none triggered by allocations
    try:
        gc.collect()                              # stopped: not counted
        timer.start()
        gc.collect()                              # a full collection
        gc.collect(0)
        timer.stop()
    finally:
        gc.enable()
    assert timer.gc._callback not in gc.callbacks  # nothing left behind
    gc.collect()                                  # stopped again: not counted
    g = timer.gc.as_dict()
    assert g["collections"] == 2 and g["by_generation"] == [1, 0, 1]
    assert 0 < g["max_s"] <= g["seconds"]
    assert "2 GC pauses (1 full)" in str(timer.gc)
    resumed = bench.GCPauses()                    # a resumed run continues the counts
    resumed.load(g)
    assert resumed.as_dict() == g
    assert str(bench.GCPauses()) == "no GC pauses"


def test_gc_pauses_of_several_runs_are_summed():
    runs = [{"gc_pauses": {"collections": 3, "by_generation": [2, 0, 1], "seconds": 0.25,
                           "max_s": 0.2}},
            {"gc_pauses": {"collections": 1, "by_generation": [1, 0, 0], "seconds": 0.001,
                           "max_s": 0.001}},
            {"gc_pauses": None}]                  # a record from before the count
    assert bench.GCPauses.total(r["gc_pauses"] for r in runs).as_dict() == {
        "collections": 4, "by_generation": [3, 0, 1], "seconds": 0.251, "max_s": 0.2}
    assert bench.GCPauses.total([None]).describe("in the timed regions") == \
        "0 in the timed regions (0 full), 0.0 ms in all, longest 0.0 ms"


# --------------------------------------------------------------------------- speedrun

def test_speedrun_smoke(data_dir, tmp_path, capsys):
    out = tmp_path / "sr"
    rc = speedrun.main(smoke(data_dir, "--runs", "2", "--epochs", "2", "--curve",
                             "--warmup-steps", "1", "--target", "0.05",
                             "--set", "run.tta=flip", "--out", str(out)))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| run | seed |" in printed and "summary over 2 runs" in printed
    assert "GC pauses" in printed and "in the timed regions" in printed
    assert "of which    data-dependent init" in printed and "+ final evaluation" in printed

    result = json.loads((out / "speedrun.json").read_text())
    for key in ("schema", "device", "env", "data", "config", "seeds", "warmup", "runs",
                "summary"):
        assert key in result, key
    assert result["env"]["torch"] and result["env"]["git_sha"]
    assert result["data"]["official"] is False and result["data"]["fingerprint"]
    assert result["config"]["model"]["name"] == "resnet8"
    assert result["config"]["run"]["eval_every"] == 1.0          # --curve
    assert result["seeds"] == [0, 1] and result["warmup"]["steps"] == 1
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    for r in result["runs"]:
        for key in ("timed_s", "epochs", "top1", "tta_top1", "reached_target",
                    "time_to_target_s", "curve"):
            assert key in r, key
        assert r["epochs"] == 2.0 and r["tta_top1"] is not None
        assert [c["epoch"] for c in r["curve"]] == [1, 2.0]      # epoch 1 eval + final
        assert r["reached_target"] and r["time_to_target_s"] is not None  # target 5%
        assert set(r["gc_pauses"]) == {"collections", "by_generation", "seconds", "max_s"}
    s = result["summary"]
    for key in ("mean", "std", "min", "max"):
        assert s["timed_s"][key] is not None
    parts = sum(s[k]["mean"] for k in ("data_init_s", "train_s", "final_eval_s"))
    assert parts == pytest.approx(s["timed_s"]["mean"], rel=1e-6)  # the timed region, split
    assert s["reached_fraction"] == 1.0 and s["runs"] == 2
    assert (out / "speedrun.png").read_bytes()[:8] == PNG_MAGIC

    # The same command again: refused before the data are read; the first result stays.
    first = (out / "speedrun.json").read_bytes()
    one_line_error(capsys, "speedrun", speedrun.main,
                   ["--preset", "smoke", "--data-dir", "/nonexistent", "--out", str(out)],
                   "already holds")
    assert (out / "speedrun.json").read_bytes() == first


@pytest.mark.slow
def test_speedrun_compiles_the_step_once(data_dir, tmp_path, capsys):
    """The warm-up run trains the timed runs' schedule (stopped early): the schedule's
    length is part of the compiled step, so a shorter warm-up schedule compiled the whole
    step a second time in run 1 (a dynamic-shape graph, not the one `--check-graph` traced)."""
    import torch
    from fastres.engine.step import TrainStep

    torch._dynamo.reset()
    rc = speedrun.main(smoke(data_dir, "--runs", "2", "--epochs", "2", "--set",
                             "run.compile=step", "--out", str(tmp_path / "sr")))
    assert rc == 0
    assert "warm-up: 3 steps" in capsys.readouterr().out
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(
        TrainStep._phase1_step.__code__)
    assert len(entries) == 1


def test_speedrun_arguments(data_dir, capsys):
    one_line_error(capsys, "speedrun", speedrun.main, ["--preset", "nope"], "unknown preset")
    one_line_error(capsys, "speedrun", speedrun.main, smoke(data_dir, "--model", "resnet9000"),
                   "unknown model")
    one_line_error(capsys, "speedrun", speedrun.main, smoke(data_dir, "--runs", "0"), "--runs")
    one_line_error(capsys, "speedrun", speedrun.main, smoke(data_dir, "--set", "run.bogus=1"),
                   "bogus")


# --------------------------------------------------------------------------- profile

PROFILE_SMALL = ["--preset", "smoke", "--batch-size", "32", "--steps", "2", "--warmup", "1",
                 "--images", "64"]


def test_profile_single(tmp_path, capsys):
    js = tmp_path / "p.json"
    assert prof.main(PROFILE_SMALL + ["--trace", str(tmp_path / "tr"), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    for word in ("| data", "| forward", "| backward", "| optimizer", "img/s", "MFU n/a",
                 "peak memory"):
        assert word in printed, word
    out = json.loads(js.read_text())
    assert out["schema"] == "fastres-profile-v2" and out["peak"] is None
    (m,) = out["results"]
    assert set(m["phases_ms"]) == {"data", "forward", "backward", "optimizer"}
    assert m["img_per_s"] > 0 and m["flops_per_step"] > 0 and m["mfu"] is None
    assert m["peak_memory_bytes"] > 0 and m["batch_size"] == 32
    assert m["memory_format"] == "channels_last" and m["compile"] == "off"
    trace = json.loads(Path(m["trace"]).read_text())
    assert trace["traceEvents"]
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"data", "forward", "backward", "optimizer"} <= names


def test_a_failing_profile_mode_costs_only_itself(tmp_path, capsys, monkeypatch):
    """A mode that fails (a compile error on a GPU) is reported in one line; the other
    modes are measured, the JSON keeps them, and the exit status is 1."""
    real = prof.measure

    def measure(cfg, *args, **kwargs):
        if cfg.run.compile == "on":
            raise RuntimeError("BackendCompilerFailed: no kernel for this op\nmore lines")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(prof, "measure", measure)
    js = tmp_path / "p.json"
    assert prof.main(PROFILE_SMALL + ["--modes", "model,eager", "--json", str(js)]) == 1
    printed = capsys.readouterr().out
    assert "model, channels_last: FAILED: RuntimeError: BackendCompilerFailed" in printed
    modes = {m["mode"]: m for m in json.loads(js.read_text())["results"]}
    assert "error" in modes["model"] and modes["eager"]["img_per_s"] > 0


def test_gpu_kernel_time_counts_kernels_once():
    """What a GPU profile holds, built by hand: CPU ops, the kernels they launched on the
    device's timeline, and `record_function` labels that the profiler also puts there (as
    CUDA-typed user annotations spanning their kernels). Kernel time is the kernels' union:
    labels left out, overlapping kernels (two streams) counted once."""
    from types import SimpleNamespace as NS

    import torch

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, start, end, device=cuda, annotation=False):
        return NS(name=name, device_type=device, is_user_annotation=annotation,
                  time_range=NS(start=start, end=end), cpu_parent=None)

    events = [event("aten::conv", 0, 5, device=cpu), event("forward", 0, 100, cpu),
              event("forward", 10, 60, annotation=True),          # a label, not a kernel
              event("conv_kernel", 10, 40), event("copy_kernel", 30, 50),  # overlapping
              event("bn_kernel", 70, 80)]
    what, kernels = bench.profiled_kernels(NS(events=lambda: events))
    assert what == "GPU kernels"
    assert [k[0] for k in kernels] == ["conv_kernel", "copy_kernel", "bn_kernel"]
    assert bench.busy_us(kernels) == 50.0                         # 10-50 and 70-80
    summary = bench.kernel_summary(kernels, steps=1)
    assert summary["busy_ms_per_step"] == 0.05 and summary["launches_per_step"] == 3
    assert summary["gap_ms_per_step"] == 0.02                     # 50 to 70
    assert [t["name"] for t in summary["top"]] == ["conv_kernel", "copy_kernel", "bn_kernel"]


def test_profile_flops_scale_with_batch():
    """Counted at a small batch and scaled: 64 images cost twice 32."""
    import torch

    from fastres import config as C

    cfg = C.resolve(C.preset("smoke"), "cpu")
    a = prof.count_step_flops(cfg, 10, 32, torch.device("cpu"))
    b = prof.count_step_flops(cfg, 10, 64, torch.device("cpu"))
    assert b["per_step"] == 2 * a["per_step"] and a["counted_at_batch"] == 32
    assert a["per_step"] > 2 * a["forward_per_step"]   # backward costs about twice forward


def test_profile_compare(tmp_path, capsys):
    js = tmp_path / "c.json"
    rc = prof.main(PROFILE_SMALL + ["--compare", "--modes", "eager,step+graph",
                                    "--memory-formats", "channels_last,contiguous",
                                    "--peak-tflops", "1.0", "--json", str(js)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "vs eager" in printed and "1.00x" in printed
    assert "skipped: CUDA graphs need a CUDA device" in printed
    results = json.loads(js.read_text())["results"]
    assert [(m["mode"], m["memory_format"]) for m in results] == [
        ("eager", "channels_last"), ("step+graph", "channels_last"),
        ("eager", "contiguous"), ("step+graph", "contiguous")]
    ran = [m for m in results if "skipped" not in m]
    assert len(ran) == 2 and all(m["mfu"] is not None and m["peak_tflops"] == 1.0 for m in ran)


def test_profile_arguments(capsys):
    one_line_error(capsys, "profile", prof.main, PROFILE_SMALL + ["--model", "nope"],
                   "unknown model")
    one_line_error(capsys, "profile", prof.main,
                   PROFILE_SMALL + ["--modes", "eagre"], "did you mean 'eager'")
    one_line_error(capsys, "profile", prof.main, ["--preset", "smoke", "--images", "16"],
                   "fewer than one batch")
    # --compile was ignored beside --modes (each entry is a compile mode): refused
    one_line_error(capsys, "profile", prof.main, PROFILE_SMALL + ["--modes", "eager",
                   "--compile", "step"], "--compile step and --modes both choose")
    one_line_error(capsys, "profile", prof.main, PROFILE_SMALL + ["--check-graph",
                   "--compile", "on"], "--compile on contradicts it")


def test_profile_script_help():
    """`python tools/profile.py` runs as a script, like `fastres profile`: named after its
    subcommand, it must not shadow the standard library's `profile` (which torch's compiler
    imports through cProfile) when its folder is the script's sys.path[0]."""
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "profile.py"), "--help"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--memory-format" in r.stdout and "--compare" in r.stdout


# --------------------------------------------------------------------------- help

@pytest.mark.parametrize("command,flag", [("speedrun", "--runs"), ("profile", "--compare")])
def test_help_through_the_cli(command, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([command, "--help"])
    assert e.value.code == 0
    assert flag in capsys.readouterr().out


# --------------------------------------------------------------------------- models

def test_fastres_models_builds_no_model(monkeypatch, capsys):
    """`fastres models` lists the figures it keeps (issue 23: 17 s -> ~2 s, most of it
    importing torch): no model is built or counted at the defaults."""
    import fastres.models as M
    import fastres.models.flops as F

    def refuse(*a, **k):
        raise AssertionError("fastres models built a model")

    monkeypatch.setattr(M, "create_model", refuse)
    monkeypatch.setattr(F, "create_model", refuse)
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{len(M.list_models())} models") and "resnet1202" in out
    assert "article prints 1.17 M params, true 11.17 M" in out


@pytest.mark.slow
def test_known_counts_match_the_models():
    """Every figure `fastres models` keeps equals a fresh count (a model that changes must
    update KNOWN_COUNTS), and every registered model has its figures."""
    import torch

    from fastres.models import count_flops, count_params, create_model, list_models
    from fastres.tools.models import KNOWN_COUNTS

    assert sorted(KNOWN_COUNTS) == sorted(list_models())
    for name, (params, flops) in KNOWN_COUNTS.items():
        for classes, want in params.items():
            with torch.device("meta"):
                got = count_params(create_model(name, num_classes=classes))
            assert got == want, (name, classes, got)
        for (classes, side), want in flops.items():
            with torch.device("meta"):
                model = create_model(name, num_classes=classes)
            got = count_flops(model, (1, 3, side, side))
            assert got == want, (name, classes, side, got)
