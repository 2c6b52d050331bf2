"""The GPU's training step, traced on the CPU (`check_graph(as_device="cuda")`).

A GPU run should confirm, not discover: the step a GPU compiles (bf16, compile=step, CUDA
graphs, the GPU's optimizer implementation and Muon path) is traced here with fake tensors
and lowered by Inductor for an sm_90 device. The presets CI checks are the ones a GPU run
uses; the negative controls show that each kind of fault the H200 met is reported.
"""
from __future__ import annotations

import pytest
import torch

from fastres import config as C
from fastres import _compat
from fastres.engine import build_model, check_graph
from fastres.engine.optim import Optimizers
from fastres.errors import ConfigError
from fastres.tools import profile


def gpu_config(name: str, **sections) -> C.Config:
    """`name` resolved for CUDA with the step compiled whole, at a small batch."""
    cfg = C.replace(C.preset(name), run={"compile": "step"}, **sections)
    return C.resolve(cfg, "cuda")


def tiny_gpu_config(**sections) -> C.Config:
    return gpu_config("resnet-paper", model={"name": "resnet8"}, data={"batch_size": 16},
                      **sections)


def test_resolving_for_cuda_gives_the_gpu_configuration():
    cfg = gpu_config("speedrun")
    assert (cfg.run.precision, cfg.run.compile, cfg.run.cuda_graph, cfg.run.micro_batch) == \
        ("bf16", "step", "on", 0)
    # torch's fused optimizer ops have no fake implementation: a compiled step runs the
    # foreach arithmetic (Inductor fuses it); eager and compile=on keep the fused kernels.
    assert cfg.optim.impl == "foreach"
    eager = C.resolve(C.replace(C.preset("speedrun"), run={"compile": "off"}), "cuda")
    assert eager.optim.impl == "fused"
    with pytest.raises(ConfigError, match="impl=fused cannot be compiled"):
        C.validate(C.replace(cfg, optim={"impl": "fused"}))


def test_profile_modes_that_compile_the_step_take_the_foreach_update():
    cfg = C.resolve(C.preset("speedrun"), "cuda")  # eager on a GPU: torch's fused kernels
    assert cfg.optim.impl == "fused"
    assert profile.mode_config(cfg, "step+graph", None).optim.impl == "foreach"
    assert profile.mode_config(cfg, "model", None).optim.impl == "fused"


def test_as_device_needs_a_config_resolved_for_cuda():
    cfg = C.resolve(C.preset("smoke"), "cpu")
    with pytest.raises(ConfigError, match="resolved for CUDA"):
        check_graph(cfg, build_model(cfg, 10), steps_per_epoch=2, as_device="cuda")


def test_the_gpu_step_traces_whole_and_lowers_for_sm90():
    cfg = tiny_gpu_config()
    rep = check_graph(cfg, build_model(cfg, 10), steps_per_epoch=4, as_device="cuda")
    assert rep.ok, rep
    assert (rep.breaks, rep.recompiles, rep.missing_fake, rep.errors) == (0, 0, [], [])
    assert rep.device == "cuda" and rep.cudagraph == []
    (k,) = rep.kernels  # one graph: forward, backward and update traced into the step
    assert k["graph"] == "phase 1 step" and "error" not in k, k
    assert k["triton_kernels"] > 10 and k["launches"] >= k["triton_kernels"]
    assert k["library_calls"] > 0 and "convolution" in k["aten_fallbacks"]


def test_the_model_handed_in_is_not_changed():
    cfg = tiny_gpu_config()
    model = build_model(cfg, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_graph(cfg, model, steps_per_epoch=4, as_device="cuda")
    after = model.state_dict()
    assert all(type(after[k]) is torch.Tensor and torch.equal(before[k], after[k])
               for k in before)


def test_a_missing_fake_impl_is_reported_as_on_the_h200():
    """The H200's failure with resnet-paper: torch's fused SGD with a tensor lr inside a
    compiled step (`aten::_fused_sgd_.tensor_lr ... no fake impl or Meta kernel`). The
    config is built past validation, as the code before this check resolved it."""
    cfg = C.replace(tiny_gpu_config(), optim={"impl": "fused"})
    rep = check_graph(cfg, build_model(cfg, 10), steps_per_epoch=4, as_device="cuda")
    assert "aten._fused_sgd_.tensor_lr" in rep.missing_fake
    assert rep.errors and "_fused_sgd_" in rep.errors[0]
    assert not rep.ok and "missing fake impls: 1" in rep.line()


def test_a_graph_break_is_reported(monkeypatch):
    """The H200's failure with the speed-run preset was a graph break (a Python construct
    torch 2.11's Dynamo could not trace); any break in the GPU step is counted."""
    step = Optimizers.step

    def breaking(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Optimizers, "step", breaking)
    cfg = tiny_gpu_config()
    rep = check_graph(cfg, build_model(cfg, 10), steps_per_epoch=4, as_device="cuda")
    assert rep.breaks >= 1 and rep.reasons and not rep.ok


def test_state_a_cuda_graph_could_not_replay_is_reported(monkeypatch):
    """CUDA-graph replay mutates the step's state in place only where the compiler knows
    the addresses are fixed: without the static marks, the check says so."""
    monkeypatch.setattr(_compat, "mark_static_address", lambda t: None)
    cfg = tiny_gpu_config()
    rep = check_graph(cfg, build_model(cfg, 10), steps_per_epoch=4, as_device="cuda")
    assert rep.cudagraph and "not marked static" in rep.cudagraph[0]


def test_a_step_guarded_on_what_a_run_owns_is_reported(monkeypatch):
    """Muon's update rule read its settings off the optimizer object, so Dynamo guarded
    the step on that object's identity: every new TrainStep (each run of `fastres
    speedrun`) compiled again, and the ninth hit Dynamo's recompile limit. The check builds
    a second TrainStep and reports a graph compiled for it, with the failed guard."""
    from fastres.engine import optim

    rule, names = optim.UPDATE_RULES["sgd"]

    def reading_the_optimizer(g, *args):
        if g.opt.defaults["nesterov"]:  # what the Muon rule did (g.opt.ns_dtype)
            return rule(g, *args)
        return rule(g, *args)

    monkeypatch.setitem(optim.UPDATE_RULES, "sgd", (reading_the_optimizer, names))
    cfg = tiny_gpu_config()
    rep = check_graph(cfg, build_model(cfg, 10), steps_per_epoch=4, as_device="cuda")
    assert rep.recompiles == rep.new_step_recompiles == 1 and not rep.ok, rep.line()
    assert "(1 for a new TrainStep)" in rep.line()
    assert any("opt" in r for r in rep.recompile_reasons), rep.recompile_reasons
    assert [k["graph"] for k in rep.kernels] == ["phase 1 step", "phase 1 step (a new TrainStep)"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["speedrun", "speedrun-hiverge", "resnet-paper", "seed",
                                    "fast"])
def test_the_presets_gpu_steps_compile_whole(preset, capsys):
    """What CI proves for every preset a GPU run uses, at its real size: `fastres profile
    --preset P --check-graph --as-device cuda` exits 0 (0 breaks, 0 recompiles, 0 missing
    fake impls, no compile error, CUDA-graph safe, lowered for sm_90)."""
    code = profile.main(["--preset", preset, "--check-graph", "--as-device", "cuda"])
    out = capsys.readouterr().out
    assert "graph breaks: 0, recompiles: 0, missing fake impls: 0" in out, out
    assert "lowering stopped" not in out and "phase 1 step" in out, out
    if preset == "seed":  # two-phase: phase 2 is its own graph, compiled once
        assert "phase 2 step" in out, out
    assert code == 0, out
