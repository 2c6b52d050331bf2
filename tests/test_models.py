"""The model zoo: every registered model builds, trains a step and evaluates deterministically;
parameter counts match the papers and torchvision; the registry's errors are clear.

Counting tests build models on the meta device (no memory, no init), so even VGG-16 and
ResNet-152 cost milliseconds there; forward/backward tests use batch 2 at 32x32.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from fastres.errors import ConfigError
from fastres.models import (count_flops, count_params, create_model, list_models, model_info,
                            register_model)
from fastres.models import registry
from fastres.models.airbench import AirbenchNet
from fastres.models.cifar_resnet import ShortcutA
from fastres.models.preact_resnet import PreActBlock
from fastres.models.resnet import BasicBlock, Bottleneck
from fastres.norm_act import BatchNormAct2d

CIFAR_RESNETS = ["resnet8", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                 "resnet1202"]
IMAGENET_RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
EXPECTED = (CIFAR_RESNETS + ["preact_resnet18"] + IMAGENET_RESNETS
            + [f"{n}_cifar" for n in IMAGENET_RESNETS]
            + ["vgg16", "vgg16_cifar", "googlenet_cifar", "airbench94", "airbench_tiny"])

# Exact counts at 10 classes. CIFAR ResNets: option A (the default) and option B; option B
# adds two 1x1 projections + BN, 2,752 parameters, at every depth. He et al. print 0.27 /
# 0.46 / 0.66 / 0.85 / 1.7 / 19.4 M, which fits both.
CIFAR_PARAMS_A = {"resnet8": 75_290, "resnet20": 269_722, "resnet32": 464_154,
                  "resnet44": 658_586, "resnet56": 853_018, "resnet110": 1_727_962,
                  "resnet1202": 19_421_274}
CIFAR_PARAMS_B = {"resnet8": 78_042, "resnet20": 272_474, "resnet32": 466_906,
                  "resnet44": 661_338, "resnet56": 855_770, "resnet110": 1_730_714,
                  "resnet1202": 19_424_026}
OTHER_PARAMS = {
    "preact_resnet18": 11_172_170,   # kuangliu's layout + the paper's final BN-ReLU
    "resnet18_cifar": 11_173_962,    # = kuangliu/pytorch-cifar ResNet18
    "vgg16_cifar": 14_724_042,       # kuangliu's VGG16 minus the 4,224 redundant conv biases
    "googlenet_cifar": 6_158_346,    # kuangliu's GoogLeNet minus 7,904 redundant conv biases
    "airbench94": 1_972_792,
}
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808, "vgg16": 138_357_544}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this file's forward/backward passes on one thread.

    These nets are thousands of small ops (resnet1202: ~3,600 per forward at batch 2); on a
    shared 2-core machine every OpenMP barrier waits for a descheduled sibling thread, and
    the file took 2-3x longer with 2 threads than with 1 when other jobs were running.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_every_model_is_registered():
    assert set(EXPECTED) <= set(list_models())
    assert list_models("airbench") == ["airbench94", "airbench_tiny"]
    assert list_models()[:2] == ["resnet8", "resnet20"]  # reference-table order first


# --------------------------------------------------------------------------- every model

@pytest.mark.parametrize("name", EXPECTED)
def test_model_trains_and_evaluates(name):
    """Builds, right output shape, finite, every trainable parameter gets a finite gradient,
    eval is deterministic, channels_last gives the same logits."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])

    model.train()
    out = model(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    F.cross_entropy(out, y).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for n, p in trainable:
        assert p.grad is not None, f"{name}: {n} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {n} has a non-finite gradient"

    model.eval()
    x = x[:1]  # eval checks at batch 1: half the cost for the big models
    with torch.no_grad():
        a = model(x)
        b = model(x)
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()
        model = model.to(memory_format=torch.channels_last)
        c = model(x.contiguous(memory_format=torch.channels_last))
    assert (a - c).abs().max() <= 1e-4 * a.abs().max() + 1e-5


@pytest.mark.parametrize("name", ["resnet8", "airbench_tiny", "resnet18"])
def test_forward_backward_under_autocast(name):
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "resnet1202"])  # = resnet110's code
def test_norm_act_layer_is_swappable(name, monkeypatch):
    """Every BN(+act) a model builds comes from norm_act_layer (so the fused module drops in),
    and swapping it changes no parameter or buffer name."""

    class Marked(BatchNormAct2d):
        pass

    plain = meta_model(name)
    monkeypatch.setattr(registry, "norm_act_factory", lambda fused: Marked)
    swapped = meta_model(name)
    assert list(plain.state_dict()) == list(swapped.state_dict())
    bn_act = [m for m in swapped.modules() if isinstance(m, BatchNormAct2d)]
    assert all(type(m) is Marked for m in bn_act)
    if name != "vgg16":  # the original VGG has no BatchNorm
        assert bn_act
    # Only BNs that are followed by no activation (projection shortcuts) stay plain.
    for mod_name, m in swapped.named_modules():
        if type(m) is nn.BatchNorm2d:
            assert ".downsample." in f".{mod_name}.", mod_name


# --------------------------------------------------------------------------- counts

@pytest.mark.parametrize("name", CIFAR_RESNETS)
def test_cifar_resnet_params_option_a_and_b(name):
    a = meta_model(name)
    b = meta_model(name, shortcut="B")
    assert count_params(a) == CIFAR_PARAMS_A[name]
    assert count_params(b) == CIFAR_PARAMS_B[name]
    assert count_params(b) - count_params(a) == 2752
    paper = model_info(name)["paper_params_m"]
    if paper is not None:  # resnet8 is not in the paper
        assert abs(count_params(a) / 1e6 - paper) < 0.03


def test_shortcut_options_structure():
    a = create_model("resnet20")
    b = create_model("resnet20", shortcut="B")
    assert isinstance(a.layer2[0].downsample, ShortcutA)
    assert a.layer1[0].downsample is None
    assert isinstance(b.layer2[0].downsample[0], nn.Conv2d)
    assert type(b.layer2[0].downsample[1]) is nn.BatchNorm2d
    # Option A: every second pixel, zero channels on both sides, input channels in the middle.
    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()
    with pytest.raises(ConfigError, match="shortcut"):
        create_model("resnet20", shortcut="C")


@pytest.mark.parametrize("name", sorted(OTHER_PARAMS))
def test_param_counts(name):
    assert count_params(meta_model(name)) == OTHER_PARAMS[name]


def test_airbench_silu_variant():
    net = create_model("airbench_tiny", act="silu")
    acts = [m.act for m in net.modules() if isinstance(m, BatchNormAct2d)]
    assert acts == ["silu"] * 6
    assert [m.act for m in create_model("airbench_tiny").modules()
            if isinstance(m, BatchNormAct2d)] == ["gelu"] * 6
    with pytest.raises(ConfigError, match="act must be one of gelu, silu"):
        create_model("airbench94", act="relu6")


def test_airbench_trainable_params():
    model = meta_model("airbench94")
    frozen = 24 * 3 * 2 * 2 + 2 * (64 + 256 + 256)  # whitening filters + BN scales
    assert count_params(model, trainable_only=True) == OTHER_PARAMS["airbench94"] - frozen


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_torchvision_counts_and_state_dict_keys(name):
    """Counts equal torchvision's at 1000 classes and its state dict loads strictly (meta)."""
    with torch.device("meta"):
        ref = getattr(torchvision.models, name)(weights=None)
        ours = create_model(name, num_classes=1000)
    assert count_params(ours) == count_params(ref) == TORCHVISION_PARAMS[name]
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_weights_give_the_same_outputs(name):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    # Non-trivial running statistics, so that eval-mode BN is actually exercised.
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    ours = create_model(name, num_classes=1000)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- init options

def _last_bns(model):
    for m in model.modules():
        if isinstance(m, BasicBlock):
            yield m.bn2
        elif isinstance(m, Bottleneck):
            yield m.bn3


@pytest.mark.parametrize("name", ["resnet20", "resnet50_cifar"])
def test_zero_init_residual(name):
    plain = create_model(name)
    zero = create_model(name, zero_init_residual=True)
    assert all((bn.weight == 1).all() for bn in _last_bns(plain))
    last = list(_last_bns(zero))
    assert last and all((bn.weight == 0).all() for bn in last)
    others = [m for m in zero.modules() if isinstance(m, nn.BatchNorm2d)
              and all(m is not bn for bn in last)]
    assert others and all((m.weight == 1).all() for m in others)
    # Every block starts as its shortcut: in eval mode with fresh statistics, a block
    # without downsample returns relu(x) = x for the non-negative input it gets.
    block = zero.layer1[1].eval()
    x = torch.rand(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)


def test_zero_init_residual_preact_zeroes_last_conv():
    model = create_model("preact_resnet18", zero_init_residual=True)
    blocks = [m for m in model.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == 8 and all(not b.conv2.weight.any() for b in blocks)


@pytest.mark.parametrize("name", ["vgg16", "vgg16_cifar", "googlenet_cifar", "airbench94"])
def test_zero_init_residual_needs_residual_blocks(name):
    with pytest.raises(ConfigError, match="no residual blocks"):
        meta_model(name, zero_init_residual=True)


def test_bn_momentum_applies_to_every_batchnorm():
    for name, default in [("resnet20", 0.1), ("airbench_tiny", 0.4)]:
        bns = [m for m in create_model(name).modules() if isinstance(m, nn.BatchNorm2d)]
        assert bns and all(m.momentum == default for m in bns)
        bns = [m for m in create_model(name, bn_momentum=0.05).modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert all(m.momentum == 0.05 for m in bns)
    b = create_model("resnet20", shortcut="B", bn_momentum=0.2)
    assert b.layer2[0].downsample[1].momentum == 0.2


# --------------------------------------------------------------------------- airbench

def test_airbench_structure():
    torch.manual_seed(0)
    model = create_model("airbench94")
    assert isinstance(model, AirbenchNet)
    w = model.whiten
    assert (w.in_channels, w.out_channels, w.kernel_size, w.padding) == (3, 24, (2, 2), (0, 0))
    assert not w.weight.requires_grad and w.bias.requires_grad
    assert model.head.bias is None and model.head.in_features == 256
    assert abs(model.head.weight.std().item() - 1) < 1e-5
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6
    for bn in bns:
        assert isinstance(bn, BatchNormAct2d) and bn.act == "gelu"
        assert bn.eps == 1e-12 and bn.momentum == 0.4
        assert not bn.weight.requires_grad and bn.bias.requires_grad
    widths = [(g.conv1.in_channels, g.conv1.out_channels)
              for g in (model.group1, model.group2, model.group3)]
    assert widths == [(24, 64), (64, 256), (256, 256)]
    # Identity (Dirac) init on the first in_channels filters of every 3x3 conv.
    for conv in (model.group1.conv1, model.group2.conv2):
        k = conv.in_channels
        expected = torch.zeros(k, k, 3, 3)
        expected[range(k), range(k), 1, 1] = 1
        assert torch.equal(conv.weight[:k], expected)
    # Logits are the head's output divided by the width.
    feats = torch.randn(4, 256)
    torch.testing.assert_close(model.head(feats) / 256, F.linear(feats, model.head.weight) / 256)
    assert count_params(create_model("airbench94", widths=(16, 32, 32))) == \
        count_params(create_model("airbench_tiny"))


def test_airbench_data_init_whitens_patches():
    torch.manual_seed(0)
    # Correlated input: channels mixed and neighbouring pixels smoothed, as in real images.
    base = torch.randn(64, 3, 17, 17)
    smooth = (base[:, :, :-1, :-1] + base[:, :, 1:, :-1] + base[:, :, :-1, 1:]
              + 0.3 * base[:, :, 1:, 1:])
    mix = torch.tensor([[1.0, 0.6, 0.3], [0.2, 1.0, 0.5], [0.4, 0.1, 1.0]])
    images = torch.einsum("ij,njhw->nihw", mix, smooth) + 0.5
    model = create_model("airbench_tiny")
    model.data_init(images, eps=5e-4)
    out = F.conv2d(images, model.whiten.weight)             # without the bias
    w = out[:, :12].permute(1, 0, 2, 3).reshape(12, -1)     # (12, patches)
    second_moment = w @ w.T / w.size(1)
    torch.testing.assert_close(second_moment, torch.eye(12), atol=2e-2, rtol=0)
    torch.testing.assert_close(model.whiten.weight[12:], -model.whiten.weight[:12])
    assert not model.whiten.weight.requires_grad
    with pytest.raises(ValueError, match="NCHW"):
        model.data_init(images[:, :2])


def test_airbench_residual_option():
    torch.manual_seed(0)
    plain = create_model("airbench_tiny")
    res = create_model("airbench_tiny", residual=True)
    assert count_params(plain) == count_params(res)
    g = res.group2.eval()
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        mid = g.norm1(g.pool(g.conv1(x)))
        torch.testing.assert_close(g(x), mid + g.norm2(g.conv2(mid)))
    with pytest.raises(ConfigError, match="widths"):
        create_model("airbench94", widths=(64, 256))


# --------------------------------------------------------------------------- FLOPs

def _macs_by_hooks(model, x):
    """Independent multiply-add count from conv/linear output shapes (cross-check only)."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out.numel() * (m.in_channels // m.groups) * kh * kw
        else:
            total += out.numel() * m.in_features

    hs = [m.register_forward_hook(hook) for m in model.modules()
          if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["resnet20", "airbench_tiny"])
def test_count_flops_is_two_per_multiply_add(name):
    model = create_model(name)
    macs = _macs_by_hooks(model, torch.zeros(1, 3, 32, 32))
    model.train()
    assert count_flops(model) == 2 * macs
    assert model.training  # mode restored
    assert count_flops(meta_model(name)) == 2 * macs  # meta device gives the same count


@pytest.mark.parametrize("name", ["googlenet_cifar", "vgg16", "resnet50_cifar",
                                  "preact_resnet18"])
def test_count_flops_big_models_on_meta(name):
    model = meta_model(name)
    assert count_flops(model) == 2 * _macs_by_hooks(model, torch.zeros(1, 3, 32, 32,
                                                                       device="meta"))


def test_flops_match_reference_figures():
    # REFERENCE.md: ResNet-20 is about 41 M multiply-adds at 32x32 (~0.08 GFLOPs).
    assert 40e6 < count_flops(meta_model("resnet20")) / 2 < 42e6
    assert count_flops(meta_model("resnet20"), (4, 3, 32, 32)) == \
        4 * count_flops(meta_model("resnet20"))


# --------------------------------------------------------------------------- registry

def test_unknown_model_suggests_a_name():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet_20'.*did you mean 'resnet20'"):
        create_model("resnet_20")
    # a letter O for a zero: one edit from resnet20, two from resnet32 (difflib ties them)
    with pytest.raises(ConfigError, match=r"did you mean 'resnet20'"):
        create_model("resnet2O")
    with pytest.raises(ConfigError, match=r"did you mean 'resnet20'"):
        create_model("RESNET20")  # case aside
    with pytest.raises(ConfigError, match="unknown model"):
        model_info("nope")


def test_bad_kwargs_are_refused_with_what_is_accepted():
    with pytest.raises(ConfigError, match=r"'resnet20' does not take 'widths'.*shortcut='A'"):
        create_model("resnet20", widths=(1, 2, 3))
    with pytest.raises(ConfigError, match="no model-specific options"):
        create_model("vgg16_cifar", dropout=0.1)
    for bad in (dict(num_classes=0), dict(num_classes=2.5), dict(bn_momentum=1.5),
                dict(bn_momentum="0.1")):
        with pytest.raises(ConfigError):
            create_model("resnet8", **bad)


def test_model_info():
    info = model_info("resnet56")
    assert info["family"] == "resnet-cifar" and info["input_size"] == 32
    assert info["paper_params_m"] == 0.85 and info["residual"]
    assert info["kwargs"] == {"shortcut": "A"}
    assert info["article"] == {"params_m": "0.85", "gflops": "3.6"}
    assert info["description"]
    assert model_info("vgg16")["input_size"] == 224
    assert model_info("airbench94")["kwargs"] == {"widths": (64, 256, 256), "residual": False,
                                                  "act": "gelu"}
    assert not model_info("googlenet_cifar")["residual"]


def test_register_model_bare_and_duplicate():
    try:
        @register_model
        def _tmp_net(num_classes=10, norm_act_layer=BatchNormAct2d, depth=2):
            """A test-only model."""
            return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

        assert "_tmp_net" in list_models()
        assert model_info("_tmp_net")["description"] == "A test-only model."
        with pytest.raises(ConfigError, match="no residual blocks"):
            create_model("_tmp_net", zero_init_residual=True)
        with pytest.raises(ValueError, match="already registered"):
            register_model(name="_tmp_net")(_tmp_net)
    finally:
        registry._REGISTRY.pop("_tmp_net", None)
    with pytest.raises(TypeError, match="norm_act_layer"):
        register_model(name="_bad")(lambda num_classes=10: None)
    assert "_bad" not in list_models()


# --------------------------------------------------------------------------- CLI

def test_models_cli_table(capsys):
    from fastres.tools import models as tool

    assert tool.main(["--filter", "resnet5"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet56", "resnet50", "resnet50_cifar"):
        assert name in out
    assert "resnet20 " not in out
    assert "FLOPs = 2 x MACs" in out
    row = next(line for line in out.splitlines() if line.startswith("resnet56 "))
    assert "0.85" in row and "0.251" in row and "0.125" in row
    assert "article's 3.6 GFLOPs: not forward FLOPs/MACs at 32x32" in row
    assert "params" not in row.split("  ")[-1]  # 0.85 M is the printed (truncated) count
    row = next(line for line in out.splitlines() if line.startswith("resnet50 "))
    assert "25.56 (1000 cl.)" in row


def test_models_cli_json(capsys):
    from fastres.tools.cli import main as cli

    assert cli(["models", "--filter", "preact", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "2 x MACs" in data["units"] and data["image_size"] == 32
    (row,) = data["models"]
    assert row["name"] == "preact_resnet18" and row["params"] == 11_172_170
    assert row["gmacs"] == pytest.approx(row["gflops"] / 2)
    assert any("1.17 M" in n for n in row["notes"])

    assert cli(["models", "--filter", "vgg16", "--num-classes", "1000", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["vgg16"]["params"] == 138_357_544
    assert not any("params" in n for n in rows["vgg16"]["notes"])  # 138.36 M as printed
    assert any("733.8" in n for n in rows["vgg16"]["notes"])


def test_models_cli_errors(capsys):
    from fastres.tools.cli import main as cli

    assert cli(["models", "--filter", "no-such-net"]) == 2
    assert "no model name contains 'no-such-net'" in capsys.readouterr().err
    assert cli(["models", "--filter", "resnet8", "--num-classes", "0"]) == 2
