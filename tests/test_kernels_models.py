"""Model-level equivalence: a model built with fused_kernels=True (every BN(+add)+act a
`FusedBatchNormAct2d`) computes what the unfused model computes -- outputs, parameter
gradients and running statistics -- from the same state dict, channels-last, in train and
in eval mode. On CPU the fused modules run the Triton kernels through the interpreter.
"""
from __future__ import annotations

import pytest
import torch

from fastres.kernels import FusedBatchNormAct2d
from fastres.kernels import _env

models = pytest.importorskip("fastres.models")
if not hasattr(models, "create_model"):  # pragma: no cover - until the model zoo lands
    pytest.skip("fastres.models.create_model is not available yet", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [pytest.mark.skipif(
    not (_env.HAS_TRITON and (DEVICE.type == "cuda" or _env.INTERPRET_AT_IMPORT)),
    reason="Triton kernels cannot run here"), pytest.mark.usefixtures("interpreter_harness")]
CL = torch.channels_last


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.delenv("FASTRES_KERNELS", raising=False)


def _pair(name, **kw):
    torch.manual_seed(0)
    plain = models.create_model(name, fused_kernels=False, **kw)
    fused = models.create_model(name, fused_kernels=True, **kw)
    fused.load_state_dict(plain.state_dict())
    n_fused = sum(isinstance(m, FusedBatchNormAct2d) for m in fused.modules())
    assert n_fused > 0, f"{name} built no FusedBatchNormAct2d with fused_kernels=True"
    assert not any(isinstance(m, FusedBatchNormAct2d) for m in plain.modules())
    # Non-trivial affine parameters and statistics, so eval mode tests something.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name_, a), b in zip(plain.named_buffers(), fused.buffers()):
            if name_.endswith("running_var"):
                a.copy_(torch.rand(a.shape, generator=g) + 0.5)
            elif name_.endswith("running_mean"):
                a.copy_(torch.randn(a.shape, generator=g) * 0.1)
            b.copy_(a)
        for a, b in zip(plain.parameters(), fused.parameters()):
            if a.dim() == 1 and a.requires_grad:
                a.add_(torch.randn(a.shape, generator=g) * 0.1)
            b.copy_(a)
    return (plain.to(DEVICE, memory_format=CL), fused.to(DEVICE, memory_format=CL))


def _close(a, b, what, atol, rtol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    bad = ~torch.isclose(a, b, atol=atol, rtol=rtol)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{a.numel()} elements differ, worst "
                           f"|diff| {(a - b).abs().max().item():.3g}")


@pytest.mark.parametrize("name", ["resnet8", "airbench_tiny"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_model_matches_unfused(name, training):
    plain, fused = _pair(name)
    plain.train(training)
    fused.train(training)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 32, 32, generator=g).to(DEVICE, memory_format=CL)
    target = torch.randint(0, 10, (4,), generator=g).to(DEVICE)
    out_p, out_f = plain(x), fused(x)
    _close(out_f, out_p, f"{name} logits", 1e-4, 1e-4)
    torch.nn.functional.cross_entropy(out_p, target).backward()
    torch.nn.functional.cross_entropy(out_f, target).backward()
    for (pname, a), b in zip(plain.named_parameters(), fused.parameters()):
        if a.grad is None:
            assert b.grad is None, pname
            continue
        # Gradients pass through several BN backward passes: allow fp32 reduction-order
        # noise relative to each tensor's scale.
        scale = a.grad.abs().max().item()
        _close(b.grad, a.grad, f"{name} {pname}.grad", 1e-4 * max(scale, 1e-3), 1e-3)
    for (bname, a), b in zip(plain.named_buffers(), fused.buffers()):
        if a.is_floating_point():
            _close(b, a, f"{name} {bname}", 1e-5, 1e-5)
        else:
            assert torch.equal(a, b), bname


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet18_cifar", "resnet20", "airbench94"])
def test_gpu_fused_model_bf16_autocast(name):
    """Under bf16 autocast, as the trainer runs: logits agree to bf16 precision."""
    plain, fused = _pair(name)
    x = torch.randn(64, 3, 32, 32, device=DEVICE).to(memory_format=CL)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_p, out_f = plain(x), fused(x)
    rel = (out_f.float() - out_p.float()).norm() / out_p.float().norm()
    assert rel < 3e-2, f"{name}: relative logit difference {rel:.3g}"
    out_p.float().square().mean().backward()
    out_f.float().square().mean().backward()
    for (pname, a), b in zip(plain.named_parameters(), fused.parameters()):
        if a.grad is not None:
            rel = (b.grad.float() - a.grad.float()).norm() / (a.grad.float().norm() + 1e-12)
            assert rel < 5e-2, f"{name} {pname}.grad: relative difference {rel:.3g}"
