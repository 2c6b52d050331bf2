"""Fused BN(+add)+act kernels against the PyTorch reference (`BatchNormAct2d`).

On a machine without CUDA the Triton kernels run on CPU tensors through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before fastres.kernels is imported);
with CUDA the same cases run on the GPU, and the `gpu`-marked tests add the CIFAR-sized
shapes. Interpreted programs cost milliseconds each, so the CPU shapes are small but cover
N=1, H=W=1, odd channel counts, C=2048 with few rows, sizes that are not multiples of the
tile, and (through `forced_config`) many programs per reduction.

Low-precision outputs are compared with the reference evaluated on fp32 copies of the same
inputs: the kernel computes in fp32 and rounds once, whereas the bf16 reference rounds after
the normalisation and again after the add, so near-zero pre-activations can land on the
other side of the ReLU threshold and the same-dtype reference is not a fair yardstick.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from fastres.kernels import (BatchNormAct2d, FusedBatchNormAct2d, bn_act_reference,
                             fused_bn_act, kernels_enabled)
from fastres.kernels import _env
from fastres.kernels import bn_act as K

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not (_env.HAS_TRITON and (DEVICE.type == "cuda" or _env.INTERPRET_AT_IMPORT)),
    reason="Triton kernels cannot run here (no CUDA, and TRITON_INTERPRET was not 1 at import)")


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    """A kill switch left in the caller's environment would turn every comparison into
    reference-vs-reference."""
    monkeypatch.delenv("FASTRES_KERNELS", raising=False)

CL = torch.channels_last

# Tolerances per dtype: (atol, rtol). Outputs and gradients are rounded once to the dtype
# from fp32, so the bound is about one ulp of the dtype at the values' magnitude (|y| and
# |dx| stay below ~10 in these tests); fp32 leaves room for reduction-order differences.
# bf16 allows two ulps: Triton's interpreter (3.8) rounds fp32 -> bf16 toward zero, even
# with fp_downcast_rounding="rtne", where compiled kernels round to nearest even.
# float64 runs in fp64 throughout, but Triton's literals (GELU's 1/sqrt(2)) and runtime
# float scalars (eps, momentum) are fp32, which leaves ~1e-8 relative error: fine for
# gradcheck, not bit-for-bit fp64.
TOL = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
# dweight / dbias are sums over N*H*W elements (magnitudes ~ sqrt(M)); running statistics
# are fp32 whatever the input dtype.
SUM_TOL = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 4e-3),
    torch.bfloat16: (1e-1, 2e-2),
}
STAT_TOL = (1e-5, 1e-5)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                 name: str) -> None:
    """torch.testing-style closeness that says how many elements fail and where."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a = actual.detach().double()  # compared on the device: GPU cases hold 33M elements
    e = expected.detach().double().to(a.device)
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bad.any():
        idx = bad.nonzero()
        err = (a - e).abs()
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        first = [tuple(int(v) for v in row) for row in idx[:5]]
        raise AssertionError(
            f"{name}: {int(bad.sum())} / {a.numel()} elements differ beyond atol={atol}, "
            f"rtol={rtol}; first at {first}; worst at {worst}: got {a[worst].item():.6g}, "
            f"expected {e[worst].item():.6g} (|diff| {err.max().item():.3g})")


def _make_pair(C, act="relu", affine=True, momentum=0.1, eps=1e-5, track=True,
               freeze_weight=False, freeze_bias=False, dtype=torch.float32, seed=0):
    """A reference BatchNormAct2d and a FusedBatchNormAct2d with identical state."""
    g = torch.Generator().manual_seed(seed)
    ref = BatchNormAct2d(C, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track, act=act)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(C, generator=g) + 0.5)
            ref.bias.copy_(torch.rand(C, generator=g) - 0.5)
    if track:
        with torch.no_grad():
            ref.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
            ref.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    fus = FusedBatchNormAct2d(C, eps=eps, momentum=momentum, affine=affine,
                              track_running_stats=track, act=act)
    fus.load_state_dict(ref.state_dict())
    for m in (ref, fus):
        if affine:
            m.weight.requires_grad_(not freeze_weight)
            m.bias.requires_grad_(not freeze_bias)
    # fp64 runs fully in fp64 (params too); low-precision inputs keep fp32 parameters and
    # statistics, as under AMP.
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return ref.to(DEVICE, pdtype), fus.to(DEVICE, pdtype)


def _inputs(shape, dtype, residual, seed=1, mean=1.0, std=2.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn():
        return torch.randn(shape, generator=g, device=DEVICE)

    x = (randn() * std + mean).to(dtype).to(memory_format=CL).requires_grad_()
    r = None
    if residual:
        r = randn().to(dtype).to(memory_format=CL).requires_grad_()
    dy = randn().to(dtype).to(memory_format=CL)
    return x, r, dy


def x_rows(shape) -> int:
    """M = N*H*W, the rows each channel's statistics and sums run over."""
    return math.prod(shape) // shape[1]


def run_case(shape, dtype=torch.float32, act="relu", residual=True, training=True, steps=1,
             **pair_kw):
    """Forward + backward through both modules (`steps` times in training, to exercise the
    running-stat updates) and compare everything that can differ."""
    C = shape[1]
    ref, fus = _make_pair(C, act=act, dtype=dtype, **pair_kw)
    ref.train(training)
    fus.train(training)
    atol, rtol = TOL[dtype]
    satol, srtol = SUM_TOL[dtype]
    # Sums over M = N*H*W rows: summation-order error grows like sqrt(M).
    sum_scale = max(1.0, math.sqrt(x_rows(shape) / 4096))
    for step in range(steps):
        x, r, dy = _inputs(shape, dtype, residual, seed=step + 1)
        # The reference on fp32 copies for low precision (see the module docstring).
        up = dtype in (torch.bfloat16, torch.float16)
        xr = x.detach().float().requires_grad_() if up else x
        rr = (r.detach().float().requires_grad_() if up else r) if r is not None else None
        y_ref = ref(xr, rr)
        y = fus(x, r)
        assert y.dtype == dtype
        assert y.is_contiguous(memory_format=CL), "output must stay channels-last"
        assert_close(y, y_ref.to(dtype), atol, rtol, "y")
        wrt_ref = [t for t in (xr, rr, ref.weight, ref.bias) if t is not None and t.requires_grad]
        wrt = [t for t in (x, r, fus.weight, fus.bias) if t is not None and t.requires_grad]
        names = [n for n, t in zip(("dx", "dres", "dweight", "dbias"), (x, r, fus.weight, fus.bias))
                 if t is not None and t.requires_grad]
        g_ref = torch.autograd.grad(y_ref, wrt_ref, dy.to(y_ref.dtype))
        g_fus = torch.autograd.grad(y, wrt, dy)
        # Every gradient is compared before failing, so one (GPU) run reports them all.
        failures = []
        for name, a, e in zip(names, g_fus, g_ref):
            tol = (satol * sum_scale, srtol * sum_scale) if name in ("dweight", "dbias") \
                else (atol, rtol)
            assert a.dtype == (e.dtype if not up or name in ("dweight", "dbias") else dtype)
            try:
                assert_close(a, e.to(a.dtype), *tol, name)
            except AssertionError as err:
                failures.append(str(err))
        assert not failures, "\n".join(failures)
        if training and pair_kw.get("track", True):
            assert_close(fus.running_mean, ref.running_mean, *STAT_TOL, "running_mean")
            assert_close(fus.running_var, ref.running_var, *STAT_TOL, "running_var")
            assert torch.equal(fus.num_batches_tracked, ref.num_batches_tracked)
    return ref, fus


# ----------------------------------------------------------------------------- fp32 grid

SHAPES = [
    (1, 3, 4, 4),      # N=1, odd C
    (5, 24, 1, 1),     # H=W=1 (both memory formats at once)
    (2, 100, 3, 5),    # odd C, rows not a multiple of anything
    (3, 2048, 1, 2),   # wide C, six rows
    (2, 8, 40, 40),    # 3200 rows: two reduction programs with the default tiles
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("act", ["relu", "identity", "gelu"])
@pytest.mark.parametrize("residual", [True, False], ids=["res", "nores"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_reference_fp32(shape, act, residual, training):
    run_case(shape, torch.float32, act, residual, training)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("act", ["relu", "identity", "gelu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, 24, 5, 3), (4, 100, 2, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_low_precision(dtype, act, training, shape):
    run_case(shape, dtype, act, residual=True, training=training)


def test_float64():
    run_case((2, 5, 3, 3), torch.float64, "gelu", residual=True, training=True, steps=2)


# -------------------------------------------------------------------- module semantics

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", ["affine_off", "weight_frozen", "bias_frozen",
                                     "both_frozen"])
def test_affine_variants(variant, training):
    kw = dict(affine=variant != "affine_off", freeze_weight=variant in ("weight_frozen",
                                                                        "both_frozen"),
              freeze_bias=variant in ("bias_frozen", "both_frozen"))
    ref, fus = run_case((2, 6, 3, 3), act="relu", residual=True, training=training, **kw)
    if kw["affine"]:
        # A frozen parameter gets no gradient at all.
        assert (fus.weight.grad is None) and (fus.bias.grad is None)


def test_momentum_none_cumulative_average():
    ref, fus = run_case((3, 7, 3, 3), act="relu", residual=False, training=True, steps=3,
                        momentum=None)
    assert int(fus.num_batches_tracked) == 3


def test_momentum_non_default_and_tiny_eps():
    run_case((3, 7, 3, 3), act="identity", residual=True, training=True, steps=2,
             momentum=0.4, eps=1e-12)


def test_no_running_stats_uses_batch_stats_in_eval():
    # track_running_stats=False: batch statistics in train and eval, no buffers updated.
    run_case((2, 6, 2, 3), act="relu", residual=True, training=True, track=False)
    run_case((2, 6, 2, 3), act="relu", residual=True, training=False, track=False)


def test_many_programs_per_reduction():
    """Tiny forced tiles: many partial rows, ragged last tile, combine over several
    BLOCK_P chunks, several channel blocks -- the paths the default CPU tiles skip."""
    cfg = K.TileConfig(block_m=4, block_c=8, rows_per_prog=8, num_warps=1,
                       block_c_combine=8, block_p=2)
    with K.forced_config(cfg):
        for act in ("relu", "gelu"):
            run_case((3, 20, 3, 5), act=act, residual=True, training=True, steps=2)
            run_case((3, 20, 3, 5), act=act, residual=True, training=False)


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
    assert_close(y, y_exact, 5e-3, 0, "y (|mean|/std = 1e5)")
    unbiased = x32.var((0, 2, 3), unbiased=True)
    assert_close(fus.running_var, 0.9 + 0.1 * unbiased, 1e-9, 1e-5, "running_var")


def test_deterministic():
    cfg = K.TileConfig(block_m=4, block_c=8, rows_per_prog=8, num_warps=1,
                       block_c_combine=8, block_p=2)
    outs = []
    for _ in range(2):
        _, fus = _make_pair(20, act="relu")
        x, r, dy = _inputs((3, 20, 3, 5), torch.float32, True)
        with K.forced_config(cfg):
            y = fus(x, r)
            grads = torch.autograd.grad(y, (x, r, fus.weight, fus.bias), dy)
        outs.append((y, *grads, fus.running_mean.clone(), fus.running_var.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_state_dict_is_batchnorm2d():
    fus = FusedBatchNormAct2d(16, act="gelu")
    bn = torch.nn.BatchNorm2d(16)
    assert isinstance(fus, torch.nn.BatchNorm2d)
    assert fus.state_dict().keys() == bn.state_dict().keys()
    bn.load_state_dict(fus.state_dict())
    assert "act=gelu" in repr(fus)


def test_functional_matches_reference():
    C = 5
    x, r, _ = _inputs((2, C, 3, 3), torch.float32, True)
    w = torch.rand(C, device=DEVICE) + 0.5
    b = torch.randn(C, device=DEVICE)
    rm1, rv1 = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y = fused_bn_act(x, w, b, rm1, rv1, True, 0.2, 1e-5, residual=r, act="gelu")
    y_ref = bn_act_reference(x, w, b, rm2, rv2, True, 0.2, 1e-5, residual=r, act="gelu")
    assert_close(y, y_ref, *TOL[torch.float32], "y")
    assert_close(rm1, rm2, *STAT_TOL, "running_mean")
    assert_close(rv1, rv2, *STAT_TOL, "running_var")
    # 2-D (N, C) input: BatchNorm1d-style rows.
    x2 = torch.randn(7, C, device=DEVICE)
    y2 = fused_bn_act(x2, w, b, None, None, True, 0.1, 1e-5, act="relu")
    assert_close(y2, bn_act_reference(x2, w, b, None, None, True, 0.1, 1e-5, act="relu"),
                 *TOL[torch.float32], "y (2-D)")


def test_mixed_dtypes_bf16_input_fp32_params():
    """AMP-style: bf16 activations, fp32 affine parameters and running stats."""
    run_case((2, 12, 3, 3), torch.bfloat16, "relu", residual=True, training=True, steps=2)


def test_incoming_gradient_layout_is_handled():
    """y.sum() gives an expanded (stride-0) gradient; backward copies it to channels-last."""
    ref, fus = _make_pair(6)
    x, r, _ = _inputs((2, 6, 3, 3), torch.float32, True)
    fus(x, r).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    r2 = r.detach().clone().requires_grad_()
    ref(x2, r2).sum().backward()
    assert_close(x.grad, x2.grad, *TOL[torch.float32], "dx")
    assert_close(r.grad, r2.grad, *TOL[torch.float32], "dres")


# -------------------------------------------------------------------------- bad input

def test_nchw_input_is_refused_with_the_fix():
    fus = FusedBatchNormAct2d(4).to(DEVICE)
    x = torch.randn(2, 4, 3, 3, device=DEVICE)  # NCHW-contiguous
    with pytest.raises(ValueError, match="channels_last"):
        fus(x)
    xc = x.to(memory_format=CL)
    with pytest.raises(ValueError, match="channels_last"):
        fus(xc, torch.randn(2, 4, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="residual shape"):
        fus(xc, torch.randn(2, 4, 1, 1, device=DEVICE))
    # (N, C, 1, 1) is both layouts: accepted as is.
    fus(torch.randn(3, 4, 1, 1, device=DEVICE))


def test_single_value_per_channel_in_training_raises():
    fus = FusedBatchNormAct2d(4).to(DEVICE)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fus(torch.randn(1, 4, 1, 1, device=DEVICE))
    fus.eval()
    fus(torch.randn(1, 4, 1, 1, device=DEVICE))  # fine in eval


def test_bad_act_and_dtype():
    with pytest.raises(ValueError, match="act must be one of"):
        FusedBatchNormAct2d(4, act="silu")
    x = torch.randint(0, 5, (2, 4, 2, 2), device=DEVICE).to(memory_format=CL)
    with pytest.raises(ValueError, match="float"):
        fused_bn_act(x, None, None, None, None, True, 0.1, 1e-5)


# ---------------------------------------------------------------------- dispatch, switch

def test_kill_switch_selects_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("kernel launched despite FASTRES_KERNELS=0")

    monkeypatch.setattr(K, "launch_bn_act_forward", boom)
    monkeypatch.setenv("FASTRES_KERNELS", "0")
    assert not kernels_enabled()
    ref, fus = _make_pair(6)
    x, r, _ = _inputs((2, 6, 3, 3), torch.float32, True)
    assert_close(fus(x, r), ref(x, r), 0, 0, "y (reference path)")
    monkeypatch.setenv("FASTRES_KERNELS", "1")
    with pytest.raises(AssertionError, match="kernel launched"):
        fus(x, r)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU dispatch")
def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.setattr(_env, "INTERPRET_AT_IMPORT", False)
    monkeypatch.setattr(K, "launch_bn_act_forward",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("launched")))
    ref, fus = _make_pair(6)
    x, r, _ = _inputs((2, 6, 3, 3), torch.float32, True)
    assert_close(fus(x, r), ref(x, r), 0, 0, "y")
    # NCHW is fine on the reference path (it is plain PyTorch).
    fus(x.contiguous(), r.contiguous())


# -------------------------------------------------------------- autograd and compile

def test_gradcheck_float64():
    """Finite differences on tiny float64 inputs: x, residual, weight, bias, training and
    eval, with GELU (the activation whose backward has the most terms) and ReLU."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 2, 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, memory_format=CL)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, memory_format=CL)
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(DEVICE)
    b = torch.randn(3, generator=g, dtype=torch.float64).to(DEVICE)
    rm = torch.zeros(3, dtype=torch.float64, device=DEVICE)
    rv = torch.ones(3, dtype=torch.float64, device=DEVICE)
    inputs = tuple(t.requires_grad_() for t in (x, r, w, b))
    for act, training in (("gelu", True), ("relu", True), ("gelu", False)):
        def f(x, r, w, b):
            return fused_bn_act(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5,
                                residual=r, act=act)
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-4,
                                        fast_mode=True), (act, training)


def test_custom_ops_pass_opcheck():
    C = 4
    x, r, dy = _inputs((2, C, 3, 3), torch.float32, True)
    x, r = x.detach(), r.detach()
    w = torch.rand(C, device=DEVICE) + 0.5
    b = torch.randn(C, device=DEVICE)
    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.fastres.bn_act_fwd.default,
                          (x, w, b, rm, rv, None, r, True, 0.1, 1e-5, "relu"),
                          test_utils=checks)
    y, mean, rstd = torch.ops.fastres.bn_act_fwd(x, w, b, rm, rv, None, r, True, 0.1, 1e-5,
                                                 "relu")
    torch.library.opcheck(torch.ops.fastres.bn_act_bwd.default,
                          (dy, x, y, None, w, b, mean, rstd, True, "relu", True, True, True,
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
        assert_close(y, y_ref, 1e-5, 1e-5, f"y (compiled, step {step})")
        y_ref.square().sum().backward()
        y.square().sum().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), fus.parameters()):
        assert_close(p.grad, p_ref.grad, 1e-4, 1e-4, f"{name}.grad (compiled)")
    for (name, b_ref), b in zip(ref.named_buffers(), fus.buffers()):
        assert_close(b, b_ref, 1e-5, 1e-5, f"{name} (compiled)")
    fus.eval()
    ref.eval()
    x = torch.randn(2, 4, 5, 5, device=DEVICE).to(memory_format=CL)
    assert_close(cfus(x), ref(x), 1e-5, 1e-5, "y (compiled, eval)")


def test_compile_fullgraph_aot_eager():
    """Dynamo + AOTAutograd trace the custom ops (fake impls, running-stat mutation)."""
    torch._dynamo.reset()
    _compile_check("aot_eager")


def test_compile_fullgraph_inductor():
    """The real thing: Inductor codegen around the opaque ops (C++ on CPU, ~10 s cold)."""
    torch._dynamo.reset()
    _compile_check("inductor")


# ------------------------------------------------------------------------------- GPU

GPU_SHAPES = [(512, 16, 32, 32), (512, 64, 8, 8), (512, 512, 4, 4), (64, 2048, 2, 2),
              (3, 37, 31, 29)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_gpu_cifar_shapes(shape, dtype, act):
    run_case(shape, dtype, act, residual=True, training=True, steps=2)
    run_case(shape, dtype, act, residual=False, training=False)


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
    assert_close(fus.running_mean, torch.zeros(8, device="cuda"), 1e-3, 0, "running_mean")
    assert_close(fus.running_var, torch.full((8,), 0.9 + 0.1, device="cuda"), 1e-2, 0,
                 "running_var")


@pytest.mark.gpu
def test_gpu_compile_inductor():
    torch._dynamo.reset()
    _compile_check("inductor")


# -------------------------------------------------------------------------- benchmark

def test_bench_kernels_quick_smoke(tmp_path, capsys):
    """`fastres bench-kernels --quick` runs here (references only on CPU) and writes JSON."""
    import json

    from fastres.tools import bench_kernels

    out = tmp_path / "bench.json"
    assert bench_kernels.main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torch" in printed and "optimizer step" in printed
    result = json.loads(out.read_text())
    assert result["header"]["torch"] == torch.__version__
    row = result["bn_act"][0]
    assert row["bytes"]["fwd+bwd"] == 11 * 8 * 16 * 8 * 8 * 4
    assert {"fwd", "bwd", "fwd+bwd"} <= set(row["ms"]["eager"])
    assert result["optimizer"] and all(r["ms"] > 0 for r in result["optimizer"])


# ------------------------------------------------------- GPU codegen, checked on the CPU

# Compiles the kernels for sm_90 (H100/H200) to PTX and cubin with Triton's own compiler and
# ptxas -- no GPU needed, nothing launched -- so CI catches code that the interpreter
# accepts but the compiler rejects, and checks that the row loads are 16-byte vectors.
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
    return {"v4_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
            "loads": ptx.count("ld.global"), "local": ptx.count(".local"),
            "cubin": len(k.asm["cubin"])}
"""

SM90_BN_SCRIPT = SM90_HARNESS + r"""
from fastres.kernels import bn_act as K
out = {}
F = "*fp32"
INTS = ("M", "C", "stride_xm", "stride_rm", "stride_ym", "stride_dym", "stride_drm",
        "stride_dxm", "stride_dzm", "rows_per_prog")
for name, P, bm in (("fp32", "*fp32", 256), ("bf16", "*bf16", 512)):
    for act in (1, 2):
        t = dict(X=P, PART_MEAN=F, PART_M2=F, M="i32", C="i32", stride_xm="i32",
                 rows_per_prog="i32")
        out[f"stats {name}"] = compile_sm90(K._bn_stats_kernel, t, dict(
            ACC=tl.float32, BLOCK_M=bm, BLOCK_C=16), 8, INTS)
        t = dict(X=P, RES=P, Y=P, MEAN=F, STAT=F, W=F, B=F, MEAN_OUT=F, RSTD_OUT=F, M="i32",
                 C="i32", stride_xm="i32", stride_rm="i32", stride_ym="i32", eps="fp32")
        for is_var in (False, True):
            out[f"fwd {name} act{act} eval{is_var}"] = compile_sm90(K._bn_act_fwd_kernel, t, dict(
                HAS_RES=True, HAS_W=True, HAS_B=True, STAT_IS_VAR=is_var, ACT=act,
                ACC=tl.float32, BLOCK_M=bm, BLOCK_C=16), 8, INTS)
        t = dict(DY=P, X=P, Y=P, RES=P, MEAN=F, RSTD=F, W=F, B=F, DRES=P, DX=P, PART_DB=F,
                 PART_DW=F, M="i32", C="i32", stride_dym="i32", stride_xm="i32",
                 stride_ym="i32", stride_rm="i32", stride_drm="i32", stride_dxm="i32",
                 rows_per_prog="i32")
        out[f"bwd_reduce {name} act{act}"] = compile_sm90(K._bn_act_bwd_reduce_kernel, t, dict(
            HAS_RES=True, HAS_W=True, HAS_B=True, STORE_DRES=True, STORE_DX=False,
            COMPUTE_SUMS=True, ACT=act, ACC=tl.float32, BLOCK_M=bm, BLOCK_C=16), 8, INTS)
        t = dict(DY=P, X=P, Y=P, RES=P, DZ=P, MEAN=F, RSTD=F, W=F, B=F, SUM_DB=F, SUM_DW=F,
                 DX=P, M="i32", C="i32", stride_dym="i32", stride_xm="i32", stride_ym="i32",
                 stride_rm="i32", stride_dzm="i32", stride_dxm="i32")
        out[f"bwd_dx {name} act{act}"] = compile_sm90(K._bn_act_bwd_dx_kernel, t, dict(
            DZ_STORED=act == 1, HAS_RES=True, HAS_W=True, HAS_B=True, ACT=act,
            ACC=tl.float32, BLOCK_M=bm, BLOCK_C=16), 8, INTS)
t = dict(PART_MEAN=F, PART_M2=F, MEAN=F, RSTD=F, RUNNING_MEAN=F, RUNNING_VAR=F, NBT="*i64",
         P="i32", M="i32", C="i32", rows_per_prog="i32", momentum="fp32", eps="fp32")
out["combine cma"] = compile_sm90(K._bn_stats_combine_kernel, t, dict(
    UPDATE_RUNNING=True, CMA=True, ACC=tl.float32, BLOCK_P=64, BLOCK_C=16), 4)
t = dict(PART_DB=F, PART_DW=F, SUM_DB=F, SUM_DW=F, DWEIGHT=F, DBIAS=F, P="i32", C="i32")
out["bwd_combine"] = compile_sm90(K._bn_act_bwd_combine_kernel, t, dict(
    STORE_DW=True, STORE_DB=True, ACC=tl.float32, BLOCK_P=64, BLOCK_C=16), 4)
t = dict(X="*fp64", PART_MEAN="*fp64", PART_M2="*fp64", M="i64", C="i32", stride_xm="i32",
         rows_per_prog="i32")
out["stats fp64 int64-rows"] = compile_sm90(K._bn_stats_kernel, t, dict(
    ACC=tl.float64, BLOCK_M=64, BLOCK_C=16), 4)
print(json.dumps(out))
"""


def run_sm90_script(script: str) -> dict:
    import json
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run them")
def test_kernels_compile_for_sm90_with_vector_loads():
    results = run_sm90_script(SM90_BN_SCRIPT)
    for name, r in results.items():
        assert r["cubin"] > 0 and r["local"] == 0, (name, r)  # built, no register spills
        if not name.startswith(("combine", "bwd_combine", "stats fp64")):
            # C = 16 channels: the tile's row loads (most loads) should be 16-byte vectors.
            assert r["v4_loads"] >= 0.75 * r["loads"], (name, r)
