"""Fused BN(+add)+act kernels against an fp64 truth (fastres.kernels.testing).

On a machine without CUDA the Triton kernels run on CPU tensors through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before fastres.kernels is imported), with the
harness's GPU-like round-to-nearest-even casts; with CUDA the same cases run on the GPU, and
the `gpu`-marked tests add the CIFAR-sized shapes.

Every result (y, dx, dres, dweight, dbias, running statistics, num_batches_tracked) is
compared with fp64 computed from the same quantised inputs: elementwise outputs within half
an ulp of their dtype plus the fp32 arithmetic's slack, channel sums within a sqrt(M)-ulp
bound, ReLU ties (|z| inside fp32's error) counted and excluded -- see the testing module.
`test_gpu_tiles_on_the_cpu` forces the H100/H200 tile configuration (tile shapes, slab
sizes, number of partials, combine order) at M ~ 3k-33k rows, which is where the v1 design
faults (dz rounded before the sums, truncation vs rounding) show up on the CPU.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastres.errors import ConfigError
from fastres.kernels import FusedBatchNormAct2d, bn_act_reference, fused_bn_act, kernels_enabled
from fastres.kernels import _env
from fastres.kernels import bn_act as K
from fastres.kernels import testing as T
from fastres.norm_act import ACTIVATIONS, BatchNormAct2d

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS_RUN = _env.HAS_TRITON and (DEVICE.type == "cuda" or _env.INTERPRET_AT_IMPORT)
needs_kernels = pytest.mark.skipif(
    not KERNELS_RUN,
    reason="Triton kernels cannot run here (no CUDA, and TRITON_INTERPRET was not 1 at import)")
CL = torch.channels_last
pytestmark = pytest.mark.usefixtures("interpreter_harness")  # GPU-like rounding on the CPU


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    """A kill switch left in the caller's environment would turn every comparison into
    reference-vs-reference."""
    monkeypatch.delenv("FASTRES_KERNELS", raising=False)


def _make(C, act="relu", affine=True, momentum=0.1, eps=1e-5, track=True, seed=0,
          pdtype=torch.float32, cls=FusedBatchNormAct2d):
    g = torch.Generator().manual_seed(seed)
    m = cls(C, eps=eps, momentum=momentum, affine=affine, track_running_stats=track, act=act)
    with torch.no_grad():
        if affine:
            m.weight.copy_(torch.rand(C, generator=g) + 0.5)
            m.bias.copy_(torch.rand(C, generator=g) - 0.5)
        if track:
            m.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    # fp64 runs fully in fp64; low-precision inputs keep fp32 parameters and statistics,
    # as under AMP.
    return m.to(DEVICE, pdtype)


def _inputs(shape, dtype, residual, seed=1, mean=1.0, std=2.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * std + mean).to(DEVICE, dtype)
    r = torch.randn(shape, generator=g).to(DEVICE, dtype) if residual else None
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    x = x.to(memory_format=CL).requires_grad_()
    if r is not None:
        r = r.to(memory_format=CL).requires_grad_()
    return x, r, dy.to(memory_format=CL)


def run_case(shape, dtype=torch.float32, act="relu", residual=True, training=True, steps=1,
             freeze_weight=False, freeze_bias=False, **make_kw):
    """Forward + backward through the fused module (`steps` times, to exercise the running
    statistics), every result against the fp64 truth."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    fus = _make(shape[1], act=act, pdtype=pdtype, **make_kw)
    fus.train(training)
    if fus.affine:
        fus.weight.requires_grad_(not freeze_weight)
        fus.bias.requires_grad_(not freeze_bias)
    for step in range(steps):
        x, r, dy = _inputs(shape, dtype, residual, seed=step + 1)
        track = fus.track_running_stats
        bn_training = training or not track
        nbt = int(fus.num_batches_tracked) if track else 0
        # Frozen parameters still scale and shift; they just get no gradient (and are then
        # absent from `results`, so not compared).
        truth = T.bn_act_truth(
            x, r, fus.weight if fus.affine else None, fus.bias if fus.affine else None,
            fus.running_mean.clone() if track else None,
            fus.running_var.clone() if track else None, dy, training=bn_training, act=act,
            momentum=fus.momentum, eps=fus.eps, num_batches_tracked=nbt)
        y = fus(x, r)
        assert y.dtype == (dtype if r is None else torch.promote_types(dtype, r.dtype))
        assert y.is_contiguous(memory_format=CL), "output must stay channels-last"
        names = ["dx", "dres", "dweight", "dbias"]
        wrt = [x, r, fus.weight, fus.bias]
        keep = [(n, t) for n, t in zip(names, wrt) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(y, [t for _, t in keep], dy)
        results = {"y": y, **{n: g for (n, _), g in zip(keep, grads)}}
        if bn_training and track:
            results["running_mean"] = fus.running_mean
            results["running_var"] = fus.running_var
        T.assert_matches_truth(results, truth)
        if training and track:
            assert int(fus.num_batches_tracked) == nbt + 1
        if fus.affine:
            assert (fus.weight.grad is None) and (fus.bias.grad is None)
    return fus


# ----------------------------------------------------------------------------- fp32 grid

SHAPES = [
    (1, 3, 4, 4),      # N=1, odd C
    (5, 24, 1, 1),     # H=W=1 (both memory formats at once)
    (2, 100, 3, 5),    # odd C, rows not a multiple of anything
    (3, 2048, 1, 2),   # wide C, six rows
    (2, 8, 40, 40),    # 3200 rows
]


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["relu", "identity", "gelu", "silu"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_truth_fp32(shape, act, residual, training):
    run_case(shape, torch.float32, act, residual, training)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("act", ["relu", "identity", "gelu", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 24, 5, 3), (4, 100, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_truth_low_precision(dtype, act, training, shape):
    run_case(shape, dtype, act, residual=True, training=training)


@needs_kernels
def test_float64():
    for act in ("gelu", "silu"):
        run_case((2, 5, 3, 3), torch.float64, act, residual=True, training=True, steps=2)


# ------------------------------------------------------------ GPU tile configs, on the CPU

GPU_TILE_CASES = [  # (dtype, act, shape, SMs): M = N*H*W rows
    ("bf16", "relu", (3, 37, 31, 29), T.H100_SMS),     # M = 2697, one ragged channel block
    ("bf16", "gelu", (3, 37, 31, 29), T.H100_SMS),
    ("fp16", "relu", (3, 37, 31, 29), T.H100_SMS),
    ("fp16", "gelu", (3, 37, 31, 29), T.H100_SMS),
    ("bf16", "relu", (32, 64, 32, 32), T.H100_SMS),    # M = 32768: 256 slabs, 256 partials
    ("fp16", "gelu", (8, 128, 32, 32), T.H100_PCIE_SMS),  # M = 8192, two channel blocks
    ("bf16", "silu", (3, 37, 31, 29), T.H100_SMS),
    ("fp16", "silu", (8, 128, 32, 32), T.H100_PCIE_SMS),
    ("fp32", "relu", (8, 64, 32, 32), T.H100_SMS),     # the 64x64 fp32 tile of the H200 fault
]
_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@needs_kernels
@pytest.mark.parametrize("dtype,act,shape,sms", GPU_TILE_CASES,
                         ids=[f"{d}-{a}-{'x'.join(map(str, s))}" for d, a, s, _ in GPU_TILE_CASES])
def test_gpu_tiles_on_the_cpu(dtype, act, shape, sms):
    """The H100/H200 launch configuration (tiles, slabs, partials, combine order) forced on
    the interpreter, at GPU-like rounding: training forward + backward with a residual."""
    M = shape[0] * shape[2] * shape[3]
    cfg = K.tile_config(M, shape[1], _DT[dtype].itemsize, sms)
    assert cfg.num_warps >= 4 and cfg.block_m * cfg.block_c >= 4096  # a real GPU tile
    with K.gpu_configs(sms):
        run_case(shape, _DT[dtype], act, residual=True, training=True)


# -------------------------------------------------------------------- module semantics

@needs_kernels
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["affine_off", "weight_frozen", "bias_frozen",
                                     "both_frozen"])
def test_affine_variants(variant, training):
    run_case((2, 6, 3, 3), act="relu", residual=True, training=training,
             affine=variant != "affine_off",
             freeze_weight=variant in ("weight_frozen", "both_frozen"),
             freeze_bias=variant in ("bias_frozen", "both_frozen"))


@needs_kernels
def test_momentum_none_cumulative_average():
    fus = run_case((3, 7, 3, 3), act="relu", residual=False, training=True, steps=3,
                   momentum=None)
    assert int(fus.num_batches_tracked) == 3


@needs_kernels
def test_momentum_non_default_and_tiny_eps():
    run_case((3, 7, 3, 3), act="identity", residual=True, training=True, steps=2,
             momentum=0.4, eps=1e-12)


@needs_kernels
def test_no_running_stats_uses_batch_stats_in_eval():
    run_case((2, 6, 2, 3), act="relu", residual=True, training=True, track=False)
    run_case((2, 6, 2, 3), act="relu", residual=True, training=False, track=False)


SMALL_TILES = K.TileConfig(block_m=4, block_c=8, rows_per_prog=8, num_warps=1, block_p=2)


@needs_kernels
def test_many_programs_per_reduction():
    """Tiny forced tiles: many partials, a ragged last slab, the last-program combine over
    several BLOCK_P chunks, three channel blocks (one ragged) -- what default CPU tiles skip."""
    with K.forced_config(SMALL_TILES):
        for act in ("relu", "gelu", "silu"):
            run_case((3, 20, 3, 5), act=act, residual=True, training=True, steps=2)
            run_case((3, 20, 3, 5), act=act, residual=True, training=False)


@needs_kernels
def test_large_mean_is_numerically_safe():
    """|mean| >> std: a sum / sum-of-squares variance would lose every digit in fp32."""
    C = 4
    fus = FusedBatchNormAct2d(C, act="identity").to(DEVICE)
    x64 = torch.randn(4, C, 6, 6, dtype=torch.float64) * 0.01 + 1000.0
    x = x64.float().to(DEVICE, memory_format=CL)
    y = fus(x)
    x32 = x.double().cpu()  # the fp32 values, exactly, in fp64
    mean = x32.mean((0, 2, 3))
    var = x32.var((0, 2, 3), unbiased=False)
    y_exact = (x32 - mean[None, :, None, None]) / torch.sqrt(var + 1e-5)[None, :, None, None]
    # The fp32 mean itself can only be stored to half an ulp of 1000 (3.05e-5 = 0.3% of
    # the std), which bounds y's error at ~3e-3; a sum-based mean misses by ~10x more.
    assert (y.double().cpu() - y_exact).abs().max() < 5e-3
    unbiased = x32.var((0, 2, 3), unbiased=True)
    assert torch.allclose(fus.running_var.double().cpu(), 0.9 + 0.1 * unbiased, atol=1e-9,
                          rtol=1e-5)


@needs_kernels
def test_deterministic_whatever_the_program_order():
    """Partials are combined in slab order by whichever program finishes last: results are
    bitwise identical across runs and across grid orders (shuffled on the interpreter)."""
    from contextlib import nullcontext

    orders = ["natural", "reverse", "shuffle"] if _env.INTERPRET_AT_IMPORT else [None] * 2
    outs = []
    for order in orders:
        fus = _make(20, act="gelu")
        x, r, dy = _inputs((3, 20, 3, 5), torch.float32, True)
        ctx = T.configured(grid_order=order) if order else nullcontext()
        with ctx, K.forced_config(SMALL_TILES):
            y = fus(x, r)
            grads = torch.autograd.grad(y, (x, r, fus.weight, fus.bias), dy)
        outs.append((y, *grads, fus.running_mean.clone(), fus.running_var.clone()))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_default_act_is_a_drop_in_batchnorm2d():
    """FusedBatchNormAct2d(C) computes nn.BatchNorm2d(C): same defaults (act="identity"),
    same state dict, same outputs and running statistics (train and eval)."""
    C = 16
    fus = FusedBatchNormAct2d(C).to(DEVICE)
    bn = torch.nn.BatchNorm2d(C).to(DEVICE)
    assert fus.act == "identity" and BatchNormAct2d(C).act == "identity"
    assert isinstance(fus, torch.nn.BatchNorm2d)
    assert fus.state_dict().keys() == bn.state_dict().keys()
    bn.load_state_dict(fus.state_dict())
    x = torch.randn(4, C, 3, 3, device=DEVICE).to(memory_format=CL)
    for training in (True, False):
        fus.train(training)
        bn.train(training)
        assert torch.allclose(fus(x), bn(x), atol=1e-5, rtol=1e-5)
    for a, b in zip(fus.state_dict().values(), bn.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6, rtol=1e-5)
    assert "act=gelu" in repr(FusedBatchNormAct2d(C, act="gelu"))
    assert "act=silu" in repr(FusedBatchNormAct2d(C, act="silu"))


def test_every_eager_activation_has_a_fused_kernel():
    """An activation added to fastres.norm_act (the eager modules) without a fused kernel
    would pass `check_act` and fail with a KeyError inside the launch plan: catch it here."""
    assert set(K._ACT_IDS) == set(ACTIVATIONS)
    assert len(set(K._ACT_IDS.values())) == len(K._ACT_IDS)
    # Whatever needs z in backward must have it saved (the residual, for gelu and silu).
    assert {a for a in ACTIVATIONS if K._needs_z(a)} == {"gelu", "silu"}


@needs_kernels
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
def test_silu_matches_the_eager_module(residual):
    """FusedBatchNormAct2d(C, act="silu") against the eager BatchNormAct2d(C, act="silu")
    (F.batch_norm + add + F.silu): outputs, every gradient (x, residual, weight, bias) and
    the running statistics, two training steps then eval."""
    C = 12
    ref = _make(C, act="silu", cls=BatchNormAct2d)
    fus = _make(C, act="silu")
    tol = dict(atol=2e-5, rtol=2e-5)
    for step, training in ((1, True), (2, True), (3, False)):
        ref.train(training)
        fus.train(training)
        x, r, dy = _inputs((3, C, 5, 4), torch.float32, residual, seed=step)
        x2 = x.detach().clone().requires_grad_()
        r2 = r.detach().clone().requires_grad_() if r is not None else None
        y, y_ref = fus(x, r), ref(x2, r2)
        torch.testing.assert_close(y, y_ref, **tol)
        keep = [(n, a, b) for n, a, b in zip(("dx", "dres", "dweight", "dbias"),
                                              (x, r, fus.weight, fus.bias),
                                              (x2, r2, ref.weight, ref.bias)) if a is not None]
        grads = torch.autograd.grad(y, [a for _, a, _ in keep], dy)
        grads_ref = torch.autograd.grad(y_ref, [b for _, _, b in keep], dy)
        for (name, _, _), g, g_ref in zip(keep, grads, grads_ref):
            torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4, msg=name)
        for (name, b), b_ref in zip(fus.named_buffers(), ref.buffers()):
            torch.testing.assert_close(b, b_ref, atol=1e-6, rtol=1e-5, msg=name)


@needs_kernels
def test_functional_matches_reference():
    """fused_bn_act and bn_act_reference mean the same thing, num_batches_tracked (which
    both increment in training) and 2-D input included."""
    C = 5
    x, r, _ = _inputs((2, C, 3, 3), torch.float32, True)
    w = torch.rand(C, device=DEVICE) + 0.5
    b = torch.randn(C, device=DEVICE)
    rm1, rv1 = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    rm2, rv2 = rm1.clone(), rv1.clone()
    n1 = torch.tensor(2, device=DEVICE)
    n2 = n1.clone()
    y = fused_bn_act(x, w, b, rm1, rv1, True, None, 1e-5, residual=r, act="gelu",
                     num_batches_tracked=n1)
    y_ref = bn_act_reference(x, w, b, rm2, rv2, True, None, 1e-5, residual=r, act="gelu",
                             num_batches_tracked=n2)
    assert int(n1) == int(n2) == 3
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(rm1, rm2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rv1, rv2, atol=1e-6, rtol=1e-5)
    x2 = torch.randn(7, C, device=DEVICE)  # 2-D (N, C): BatchNorm1d-style rows
    torch.testing.assert_close(
        fused_bn_act(x2, w, b, None, None, True, 0.1, 1e-5, act="relu"),
        bn_act_reference(x2, w, b, None, None, True, 0.1, 1e-5, act="relu"),
        atol=2e-5, rtol=2e-5)


@needs_kernels
def test_mixed_dtypes_bf16_input_fp32_params():
    """AMP-style: bf16 activations, fp32 affine parameters and running stats."""
    run_case((2, 12, 3, 3), torch.bfloat16, "relu", residual=True, training=True, steps=2)


@needs_kernels
def test_incoming_gradient_layout_is_handled():
    """y.sum() gives an expanded (stride-0) gradient, a reshape an NCHW one; backward
    copies either to channels-last."""
    for make_dy in (lambda y: y.sum(), lambda y: (y.contiguous() * 1.0).square().sum()):
        ref = _make(6, cls=BatchNormAct2d)
        fus = _make(6)
        x, r, _ = _inputs((2, 6, 3, 3), torch.float32, True)
        make_dy(fus(x, r)).backward()
        x2 = x.detach().clone().requires_grad_()
        r2 = r.detach().clone().requires_grad_()
        make_dy(ref(x2, r2)).backward()
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.grad, r2.grad, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_channels_last_contract_is_the_same_on_every_path(path, monkeypatch):
    if path == "kernels" and not KERNELS_RUN:
        pytest.skip("kernels cannot run here")
    if path == "reference":
        monkeypatch.setenv("FASTRES_KERNELS", "0")
    fus = FusedBatchNormAct2d(4, act="relu").to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)  # NCHW-contiguous
    with pytest.raises(ConfigError, match="channels_last"):
        fus(x)
    with pytest.raises(ValueError, match="channels_last"):  # ConfigError is a ValueError
        fused_bn_act(x, None, None, None, None, True, 0.1, 1e-5)
    xc = x.to(memory_format=CL)
    with pytest.raises(ConfigError, match="channels_last"):
        fus(xc, torch.randn(2, 4, 3, 3, device=DEVICE))
    with pytest.raises(ConfigError, match="residual shape"):
        fused_bn_act(xc, None, None, None, None, True, 0.1, 1e-5,
                     residual=torch.randn(2, 4, 1, 1, device=DEVICE))
    with pytest.raises(ConfigError, match="contiguous"):
        fused_bn_act(torch.randn(4, 7, device=DEVICE).t(), None, None, None, None, True, 0.1,
                     1e-5)
    fus(torch.randn(3, 4, 1, 1, device=DEVICE))  # (N, C, 1, 1) is both layouts
    fus(xc)


@needs_kernels
def test_single_value_per_channel_in_training_raises():
    fus = FusedBatchNormAct2d(4).to(DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fus(torch.randn(1, 4, 1, 1, device=DEVICE))
    fus.eval()
    fus(torch.randn(1, 4, 1, 1, device=DEVICE))  # fine in eval
    empty = torch.randn(0, 4, 3, 3, device=DEVICE).to(memory_format=CL).requires_grad_()
    assert fus(empty).shape == (0, 4, 3, 3)


def test_bad_act_and_dtype():
    with pytest.raises(ValueError, match="act must be one of"):
        FusedBatchNormAct2d(4, act="mish")
    with pytest.raises(ValueError, match="act must be one of"):
        fused_bn_act(torch.randn(2, 4, device=DEVICE), None, None, None, None, True, 0.1,
                     1e-5, act="mish")
    x = torch.randint(0, 5, (2, 4, 2, 2), device=DEVICE).to(memory_format=CL)
    with pytest.raises(ValueError, match="float"):
        fused_bn_act(x, None, None, None, None, True, 0.1, 1e-5)


# ---------------------------------------------------------------------- dispatch, switch

@needs_kernels
def test_kill_switch_selects_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel launched despite FASTRES_KERNELS=0")

    monkeypatch.setattr(K._env, "launch", boom)
    monkeypatch.setenv("FASTRES_KERNELS", "0")
    assert not kernels_enabled()
    ref, fus = _make(6, cls=BatchNormAct2d), _make(6)
    x, r, _ = _inputs((2, 6, 3, 3), torch.float32, True)
    torch.testing.assert_close(fus(x, r), ref(x, r), atol=0, rtol=0)
    monkeypatch.setenv("FASTRES_KERNELS", "1")
    with pytest.raises(AssertionError, match="kernel launched"):
        fus(x, r)


@needs_kernels
def test_host_path_is_cached():
    """The second call of a shape builds no plan and allocates no scratch: everything but
    the outputs comes from the plan cache (what keeps the host cost at tens of µs)."""
    fus = _make(8, act="relu")
    x, r, dy = _inputs((2, 8, 3, 3), torch.float32, True)
    with K.stub_launches():
        torch.autograd.grad(fus(x, r), (x, r, fus.weight, fus.bias), dy)
        n = len(K._plans)
        for _ in range(3):
            torch.autograd.grad(fus(x, r), (x, r, fus.weight, fus.bias), dy)
        assert len(K._plans) == n


# -------------------------------------------------------------- autograd and compile

@needs_kernels
def test_gradcheck_float64():
    """Finite differences on tiny float64 inputs: x, residual, weight, bias, training and
    eval, with GELU (the activation whose backward has the most terms), SiLU and ReLU."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 2, 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, memory_format=CL)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, memory_format=CL)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    rm = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    rv = torch.ones(3, dtype=torch.float64, device=DEVICE)
    inputs = tuple(t.requires_grad_() for t in (x, r, w, b))
    for act, training in (("gelu", True), ("relu", True), ("gelu", False), ("silu", True),
                          ("silu", False)):
        def f(x, r, w, b):
            return fused_bn_act(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5,
                                residual=r, act=act)
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4,
                                        fast_mode=True), (act, training)


@needs_kernels
def test_custom_ops_pass_opcheck():
    C = 4
    x, r, dy = _inputs((2, C, 3, 3), torch.float32, True)
    x, r = x.detach(), r.detach()
    w = torch.rand(C, device=DEVICE) + 0.5
    b = torch.randn(C, device=DEVICE)
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    nbt = torch.tensor(0, device=DEVICE)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastres.bn_act_fwd.default,
                          (x, w, b, rm, rv, nbt, r, True, None, 1e-5, "relu", True),
                          test_utils=checks)
    y, mask, stats = torch.ops.fastres.bn_act_fwd(x, w, b, rm, rv, nbt, r, True, 0.1, 1e-5,
                                                  "relu", True)
    assert mask.dtype == torch.uint8 and mask.shape == (18, 1)
    torch.library.opcheck(torch.ops.fastres.bn_act_bwd.default,
                          (dy, x, mask, None, w, b, stats, True, "relu", True, True, True,
                           True, torch.float32),
                          test_utils=checks)


class _Block(torch.nn.Module):
    """conv -> BN-act, then BN + add + act: the shape of a residual block's tail."""

    def __init__(self, layer):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn1 = layer(8, act="relu")
        self.bn2 = layer(8, act="gelu", momentum=None)

    def forward(self, x):
        h = self.conv(x)
        h1 = self.bn1(h)
        return self.bn2(h, h1)


def _compile_check(backend):
    torch.manual_seed(0)
    ref = _Block(BatchNormAct2d).to(DEVICE, memory_format=CL)
    fus = _Block(FusedBatchNormAct2d).to(DEVICE, memory_format=CL)
    fus.load_state_dict(ref.state_dict())
    cfus = torch.compile(fus, fullgraph=True, backend=backend)
    for step in range(2):
        x = torch.randn(2, 4, 5, 5, device=DEVICE).to(memory_format=CL)
        y_ref, y = ref(x), cfus(x)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        y_ref.square().sum().backward()
        y.square().sum().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), fus.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, b_ref), b in zip(ref.named_buffers(), fus.buffers()):
        torch.testing.assert_close(b, b_ref, atol=1e-5, rtol=1e-5, msg=name)
    fus.eval()
    ref.eval()
    x = torch.randn(2, 4, 5, 5, device=DEVICE).to(memory_format=CL)
    torch.testing.assert_close(cfus(x), ref(x), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_compile_fullgraph_aot_eager():
    """Dynamo + AOTAutograd trace the custom ops (fake impls, running-stat mutation)."""
    torch._dynamo.reset()
    _compile_check("aot_eager")


@needs_kernels
def test_compile_fullgraph_inductor():
    """The real thing: Inductor codegen around the opaque ops (C++ on CPU, ~10 s cold)."""
    torch._dynamo.reset()
    _compile_check("inductor")


# ------------------------------------------------------------------------------- GPU

# The GPU run's correctness cases, sized for a device check of <= 60 s: every case compiles
# its own kernel set once (Triton caches it for the rest of the process), so the list is the
# cases that decide, not a grid. Each runs two training steps (forward + backward with a
# residual) and one eval step against the fp64 truth.
GPU_CASES = [
    ((512, 64, 8, 8), "fp32", "relu"),      # the decisive case (H200 v1.2 fault; v2 exact)
    ((512, 64, 8, 8), "bf16", "relu"),
    ((512, 16, 32, 32), "bf16", "relu"),    # the largest row count
    ((3, 37, 31, 29), "bf16", "gelu"),      # ragged channels and rows; v1.2's gelu-bf16 fault
    ((3, 37, 31, 29), "fp32", "relu"),
    ((64, 2048, 2, 2), "fp32", "gelu"),     # wide C: many channel blocks
    ((512, 512, 4, 4), "bf16", "gelu"),
    ((3, 37, 31, 29), "bf16", "silu"),      # silu: z rebuilt in backward, as gelu
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,act", GPU_CASES,
                         ids=[f"{a}-{d}-{'x'.join(map(str, s))}" for s, d, a in GPU_CASES])
def test_gpu_cifar_shapes(shape, dtype, act):
    run_case(shape, _DT[dtype], act, residual=True, training=True, steps=2)
    run_case(shape, _DT[dtype], act, residual=False, training=False)


@pytest.mark.gpu
def test_gpu_two_streams_keep_their_own_scratch():
    """The same plan launched on two streams at once: each stream has its own partials,
    ticket counters and sums, so both give what one stream alone gives."""
    shape = (512, 64, 8, 8)  # the decisive case's kernels, already compiled above
    mods = [_make(64) for _ in range(2)]
    ins = [_inputs(shape, torch.float32, True, seed=s) for s in (1, 2)]

    def run(m, x, r, dy):
        y = m(x, r)
        return (y, *torch.autograd.grad(y, (x, r, m.weight, m.bias), dy))

    alone = [run(_make(64), *i) for i in ins]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    outs = []
    for st, m, i in zip(streams, mods, ins):
        with torch.cuda.stream(st):
            outs.append(run(m, *i))
    torch.cuda.synchronize()
    for got, want in zip(outs, alone):
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """More than 2**31 elements: row offsets must be computed in int64."""
    free, _ = torch.cuda.mem_get_info()
    shape = (1, 8, 2 ** 14, 2 ** 14 + 1)  # 2**31 + 2**17 elements, 4.3 GB in bf16
    if free < 24 * 2 ** 30:
        pytest.skip("needs ~24 GB of free GPU memory")
    x = torch.empty(shape, dtype=torch.bfloat16, device="cuda", memory_format=CL)
    x.normal_()
    fus = FusedBatchNormAct2d(8, act="identity").cuda()
    y = fus(x)
    tail = y[..., -4:, -4:].float()
    assert torch.isfinite(tail).all() and tail.abs().max() < 10
    torch.testing.assert_close(fus.running_mean, torch.zeros(8, device="cuda"), atol=1e-3,
                               rtol=0)
    torch.testing.assert_close(fus.running_var, torch.full((8,), 0.9 + 0.1, device="cuda"),
                               atol=1e-2, rtol=0)


@pytest.mark.gpu
def test_gpu_compile_inductor():
    torch._dynamo.reset()
    _compile_check("inductor")


# ------------------------------------------------------------------- the experiment, CPU

@needs_kernels
def test_decisive_experiment_runs_on_a_small_shape():
    """The experiment's plumbing (every variant, the truth, the rerun comparison) on a
    small shape; the tool runs it on a GPU at 512x64x8x8."""
    out = T.decisive_experiment(DEVICE, shape=(2, 16, 3, 3), reruns=2)
    assert set(out["runs"]) >= {"fused", "fused dz_stored=True", "fused dz_stored=False",
                                "fused num_warps=4"}
    for name, run in out["runs"].items():
        assert run["deterministic"], name
        assert not run["messages"], (name, run["messages"])
    json.dumps(out)


# -------------------------------------------------------------------------- benchmark

def test_bench_kernels_quick_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    """`fastres bench-kernels --quick --device cpu`: every decisive case (BN+add+ReLU bf16
    at the three ResNet-18 shapes, BN+GELU at the speed-run net's, FusedSGD+EMA on two
    parameter lists) through the same code the GPU runs, at reduced sizes; the fused path
    too where the kernels are interpreted. Writes the JSON."""
    from fastres.tools import bench_kernels as B

    out = tmp_path / "quick.json"
    # One thread: on the shared 2-core CI machine two OpenMP threads stall on each other.
    assert B.main(["--quick", "--device", "cpu", "--threads", "1", "--budget", "600",
                   "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dry run at reduced sizes" in printed and "x compile" in printed
    result = json.loads(out.read_text())
    assert result["dry_run"] and not result["skipped"]
    assert result["environment"]["torch"] == torch.__version__
    cases = result["cases"]
    bn = [c for c in cases if c["case"] != "SGD+EMA"]
    assert [c["shape"] for c in bn] == ["2x64x4x4", "2x128x4x4", "2x256x4x4", "2x64x4x4",
                                        "2x256x4x4", "2x256x3x3"]
    assert [c["case"] for c in bn] == ["BN+add+relu"] * 3 + ["BN+gelu"] * 3
    for c in bn:
        assert {"eager", "compile"} <= set(c["ms"]) and set(c["first_call_s"]) >= {"eager"}
        if KERNELS_RUN:
            assert c["speedup"]["compile"]["fwd+bwd"] > 0
    sgd = [c for c in cases if c["case"] == "SGD+EMA"]
    assert [c["params"] for c in sgd] == ["resnet18_cifar", "airbench94"]
    assert all(c["ms"]["baseline"] > 0 for c in sgd)
    if KERNELS_RUN:
        assert all(c["speedup"]["baseline"] > 0 for c in sgd)


def test_bench_kernels_quick_stops_at_its_budget(tmp_path, capsys):
    from fastres.tools import bench_kernels as B

    out = tmp_path / "quick.json"
    assert B.main(["--quick", "--dry-run", "--device", "cpu", "--no-compile", "--budget",
                   "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["cases"]) == 1 and len(result["skipped"]) == len(B.QUICK_CASES) - 1
    assert "skipped (budget 0 s spent)" in capsys.readouterr().out


def test_bench_kernels_host_and_decisive_on_cpu(tmp_path, capsys):
    """--host works on any machine (launches stubbed) and prints the issue's line;
    --decisive says it needs a GPU and exits 0."""
    from fastres.tools import bench_kernels

    out = tmp_path / "host.json"
    assert bench_kernels.main(["--host", "--json", str(out), "--reps", "3"]) == 0
    printed = capsys.readouterr().out
    assert "host µs: fwd " in printed and ", fwd+bwd " in printed
    assert "FusedSGD host µs per step" in printed and "fresh grads at new addresses" in printed
    result = json.loads(out.read_text())
    assert result["host_us"]["fwd"] > 0 and result["host_us"]["fwd+bwd"] > 0
    sgd = result["host_us"]["fused_sgd"]
    assert sgd["grads kept"] > 0 and sgd["grad assignment (subtracted)"] > 0
    assert {"fresh grads, same addresses", "fresh grads, new addresses"} <= set(sgd)
    dec = tmp_path / "dec.json"
    assert bench_kernels.main(["--decisive", "--json", str(dec)]) == 0
    if not torch.cuda.is_available():
        assert "skipped: needs a CUDA device" in capsys.readouterr().out
        assert json.loads(dec.read_text())["skipped"] == "needs a CUDA device"


# ------------------------------------------------------- GPU codegen, checked on the CPU

# Compiles the kernels for sm_90 (H100/H200) to PTX and cubin with Triton's own compiler and
# ptxas -- no GPU needed, nothing launched -- so CI catches code that the interpreter
# accepts but the compiler rejects (the atomic ticket, the mask packing, tl.range
# pipelining), checks that the row loads are 16-byte vectors, and that nothing spills.
# Runs in a subprocess because the kernels in this process were defined under
# TRITON_INTERPRET=1 (interpreted for their whole life).
SM90_HARNESS = r"""
import json, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget

def compile_sm90(fn, types, consts, num_warps, div16=()):
    names = fn.arg_names
    sig = {n: ("constexpr" if n in consts else types[n]) for n in names}
    # What Triton's launcher would specialise: 16-byte aligned tensors, ints divisible by 16.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n not in consts and (types[n].startswith("*") or n in div16)}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = k.asm["ptx"]
    return {"v4_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4")
                        + ptx.count("ld.global.cg.v4"),
            "loads": ptx.count("ld.global"), "local": ptx.count(".local"),
            "atom": ptx.count("atom."), "cp_async": ptx.count("cp.async"),
            "cubin": len(k.asm["cubin"]), **ticket(k.asm["ttgir"], ptx)}

def _barrier_between_store_and_ticket(lines, is_ticket, is_store, is_barrier):
    first = next((i for i, l in enumerate(lines) if is_ticket(l)), None)
    if first is None:
        return None
    stores = [i for i in range(first) if is_store(lines[i])]
    start = stores[-1] if stores else 0
    return any(is_barrier(lines[i]) for i in range(start, first))

def ticket(ttgir, ptx):
    # The last-program combine needs, in this order: the partial stores, a CTA barrier
    # (every thread's stores before the one thread's atomic), the ticket atomic with
    # acq_rel semantics at GPU scope. Checked twice: in Triton's GPU IR, the kernel's own
    # tl.debug_barrier() (Triton may add a barrier of its own when the atomic's result
    # reuses shared memory, but nothing promises it), and in the PTX the GPU runs.
    import re
    tt = ttgir.splitlines()
    px = ptx.splitlines()
    acq = lambda l: re.search(r"tt\.atomic_rmw add, acq_rel, (gpu|sys)", l) is not None
    return {
        "acq_rel_ticket": sum(map(acq, tt)),
        "ptx_acq_rel_ticket": sum(bool(re.search(r"atom\.global\.(gpu|sys)\.acq_rel\.add", l))
                                  for l in px),
        "barrier_before_ticket": _barrier_between_store_and_ticket(
            tt, acq, lambda l: "tt.store" in l,
            lambda l: re.search(r"\b(gpu|ttg)\.barrier\b", l) is not None),
        "ptx_barrier_before_ticket": _barrier_between_store_and_ticket(
            px, lambda l: re.search(r"atom\.global\.(gpu|sys)\.acq_rel\.add", l) is not None,
            lambda l: "st.global" in l, lambda l: re.search(r"\bbar(rier)?\.sync\b", l)),
    }
"""


SM90_BN_SCRIPT = SM90_HARNESS + r"""
from fastres.kernels import _bn_act_kernels as K
out = {}
F = "*fp32"
INTS = ("M", "C")
for name, P, bm, bc in (("fp32", "*fp32", 64, 64), ("bf16", "*bf16", 128, 64)):
    t = dict(X=P, PART=F, COUNTER="*i32", STATS=F, RUNNING_MEAN=F, RUNNING_VAR=F, NBT="*i64",
             M="i32", C="i32", NCB="i32", P="i32", rows_per_prog="i32", momentum="fp32",
             eps="fp32")
    out[f"stats {name}"] = compile_sm90(K.bn_fwd_stats_kernel, t, dict(
        UPDATE_RUNNING=True, CMA=False, ACC=tl.float32, BLOCK_M=bm, BLOCK_C=bc, BLOCK_P=64,
        NUM_STAGES=3), 8, INTS)
    for act in (1, 2, 3):
        t = dict(X=P, RES=P, Y=P, MASK="*u8", STATS=F, RUNNING_MEAN=F, RUNNING_VAR=F,
                 STATS_OUT=F, W=F, B=F, NBT="*i64", M="i32", C="i32", CB="i32", NCB="i32",
                 eps="fp32")
        for ev in (False, True):
            out[f"apply {name} act{act} eval{ev}"] = compile_sm90(K.bn_fwd_apply_kernel, t, dict(
                HAS_RES=True, HAS_W=True, HAS_B=True, EVAL=ev, STORE_STATS=ev,
                STORE_MASK=act == 1, INC_NBT=not ev, ACT=act, ACC=tl.float32, BLOCK_M=bm,
                BLOCK_C=bc), 8, INTS)
        t = dict(DY=P, X=P, MASK="*u8", RES=P, STATS=F, W=F, B=F, DRES=P, DX=P, PART=F,
                 COUNTER="*i32", SUMS=F, DW=F, DB=F, M="i32", C="i32", CB="i32", NCB="i32",
                 P="i32", rows_per_prog="i32")
        out[f"reduce {name} act{act}"] = compile_sm90(K.bn_bwd_reduce_kernel, t, dict(
            HAS_RES=True, HAS_W=True, HAS_B=True, STORE_DRES=True, STORE_DX=False,
            COMPUTE_SUMS=True, STORE_DW=True, STORE_DB=True, ACT=act, ACC=tl.float32,
            BLOCK_M=bm, BLOCK_C=bc, BLOCK_P=64, NUM_STAGES=3), 8, INTS)
        t = dict(DY=P, X=P, MASK="*u8", RES=P, DZ=P, STATS=F, W=F, B=F, SUMS=F, DX=P,
                 M="i32", C="i32", CB="i32", NCB="i32")
        out[f"dx {name} act{act}"] = compile_sm90(K.bn_bwd_dx_kernel, t, dict(
            DZ_STORED=False, HAS_RES=True, HAS_W=True, HAS_B=True, ACT=act, ACC=tl.float32,
            BLOCK_M=bm, BLOCK_C=bc), 8, INTS)
t = dict(X="*fp64", PART="*fp64", COUNTER="*i32", STATS="*fp64", RUNNING_MEAN="*fp64",
         RUNNING_VAR="*fp64", NBT="*i64", M="i64", C="i32", NCB="i32", P="i32",
         rows_per_prog="i32", momentum="fp32", eps="fp32")
out["stats fp64 int64-rows cma"] = compile_sm90(K.bn_fwd_stats_kernel, t, dict(
    UPDATE_RUNNING=True, CMA=True, ACC=tl.float64, BLOCK_M=64, BLOCK_C=16, BLOCK_P=64,
    NUM_STAGES=1), 4)
# Negative control: the same statistics kernel with its tl.debug_barrier() removed must
# fail the barrier check (else the check would pass whatever the code).
import importlib.util, pathlib, tempfile
text = pathlib.Path(K.__file__).read_text().replace("tl.debug_barrier()\n", "pass\n")
planted = pathlib.Path(tempfile.mkdtemp()) / "planted_no_barrier.py"
planted.write_text(text)
spec = importlib.util.spec_from_file_location("planted_no_barrier", planted)
P_ = importlib.util.module_from_spec(spec)
spec.loader.exec_module(P_)
t = dict(X="*fp32", PART=F, COUNTER="*i32", STATS=F, RUNNING_MEAN=F, RUNNING_VAR=F,
         NBT="*i64", M="i32", C="i32", NCB="i32", P="i32", rows_per_prog="i32",
         momentum="fp32", eps="fp32")
out["planted stats without barrier"] = compile_sm90(P_.bn_fwd_stats_kernel, t, dict(
    UPDATE_RUNNING=True, CMA=False, ACC=tl.float32, BLOCK_M=64, BLOCK_C=64, BLOCK_P=64,
    NUM_STAGES=3), 8, INTS)
print(json.dumps(out))
"""


def run_sm90_script(script: str) -> dict:
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available() or not _env.HAS_TRITON,
                    reason="the GPU tests compile and run them")
def test_kernels_compile_for_sm90_with_vector_loads():
    results = run_sm90_script(SM90_BN_SCRIPT)
    planted = results.pop("planted stats without barrier")
    assert planted["acq_rel_ticket"] == 1 and not planted["barrier_before_ticket"], planted
    for name, r in results.items():
        assert r["cubin"] > 0 and r["local"] == 0, (name, r)  # built, no register spills
        if name.startswith(("stats", "reduce")):
            assert r["atom"] >= 2, (name, r)  # the ticket and its reset
            # The ticket: one acq_rel atomic at GPU scope, a CTA barrier after the partial
            # stores and before it (what the interpreter's race check also demands).
            assert r["acq_rel_ticket"] == 1 and r["barrier_before_ticket"], (name, r)
            assert r["ptx_acq_rel_ticket"] == 1 and r["ptx_barrier_before_ticket"], (name, r)
        if name.startswith(("apply", "dx")):
            # 64 channels: the tile's row loads (most loads) should be 16-byte vectors.
            assert r["v4_loads"] >= 0.5 * r["loads"], (name, r)
    assert results["stats bf16"]["cp_async"] > 0, results["stats bf16"]  # pipelined loop


# ------------------------------------------------------- ticket counters and scratch

def _ticket_counters() -> list:
    """Every ticket-counter tensor the fused op's launches can use (issue 21 item 4)."""
    return [s.counter for s in K._scratch.values()]


def _train_step_results(fus, shape, seed=1):
    x, r, dy = _inputs(shape, torch.float32, True, seed=seed)
    truth = T.bn_act_truth(x, r, fus.weight, fus.bias, fus.running_mean.clone(),
                           fus.running_var.clone(), dy, training=True, act="relu",
                           momentum=fus.momentum, eps=fus.eps,
                           num_batches_tracked=int(fus.num_batches_tracked))
    y = fus(x, r)
    grads = torch.autograd.grad(y, (x, r, fus.weight, fus.bias), dy)
    results = dict(zip(("y", "dx", "dres", "dweight", "dbias"), (y, *grads)),
                   running_mean=fus.running_mean, running_var=fus.running_var)
    return results, truth


@needs_kernels
def test_ticket_counters_are_zero_after_every_launch(monkeypatch):
    """The last program of each reduction launch puts its counter back to 0 (checked
    after every stats and reduce launch, with many programs per channel block)."""
    K.clear_plans()  # only this test's scratch below
    seen = []
    original = K._env.launch

    def checked(kernel, grid, *args, **meta):
        original(kernel, grid, *args, **meta)
        if kernel in (K._k.bn_fwd_stats_kernel, K._k.bn_bwd_reduce_kernel):
            counters = _ticket_counters()
            assert counters and all(int(c.abs().sum()) == 0 for c in counters), (
                kernel, [c.tolist() for c in counters])
            seen.append(kernel)

    monkeypatch.setattr(K._env, "launch", checked)
    with K.forced_config(SMALL_TILES):
        for act in ("relu", "gelu"):
            run_case((3, 20, 3, 5), act=act, residual=True, training=True, steps=2)
    assert len(seen) == 8


@needs_kernels
def test_a_stale_ticket_counter_cannot_corrupt_a_launch():
    """If a counter is ever not 0 when a launch starts (an interrupted launch, another
    stream, a stray write), that launch and every later one still combine correctly: the
    counters are reset on the stream before each reduction launch."""
    K.clear_plans()  # only this test's scratch below
    fus = _make(20)
    with K.forced_config(SMALL_TILES):
        _train_step_results(fus, (3, 20, 3, 5), seed=1)  # builds plans and scratch
        for stale in (1, 3, 7):
            for c in _ticket_counters():
                c.fill_(stale)
            results, truth = _train_step_results(fus, (3, 20, 3, 5), seed=1 + stale)
            T.assert_matches_truth(results, truth)
            assert all(int(c.abs().sum()) == 0 for c in _ticket_counters())


@needs_kernels
def test_scratch_is_kept_per_stream(monkeypatch):
    """Two streams never share partials, counters or sums: the scratch is keyed by the
    current stream (a stand-in stream id on the CPU), and both give the truth."""
    fus = _make(20)
    K.clear_plans()
    with K.forced_config(SMALL_TILES):
        monkeypatch.setattr(K, "_current_stream", lambda device: 101)
        _train_step_results(fus, (3, 20, 3, 5))
        monkeypatch.setattr(K, "_current_stream", lambda device: 202)
        results, truth = _train_step_results(fus, (3, 20, 3, 5), seed=2)
        T.assert_matches_truth(results, truth)
    streams = {key[1] for key in K._scratch}
    K.clear_plans()  # the stand-in streams' scratch goes
    assert streams == {101, 202}, streams


def test_launch_plans_are_bounded():
    """A long run through many shapes (varying batch sizes, say) keeps at most
    PLAN_CACHE_SIZE plans; plans hold no device memory, so dropping one is always safe."""
    K.clear_plans()
    with K.stub_launches():
        for n in range(1, K.PLAN_CACHE_SIZE + 40):
            x = torch.randn(n + 1, 4, device=DEVICE)
            fused_bn_act(x, None, None, None, None, True, 0.1, 1e-5, act="relu")
    assert len(K._plans) <= K.PLAN_CACHE_SIZE
    K.clear_plans()
