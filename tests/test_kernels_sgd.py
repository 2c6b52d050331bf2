"""FusedSGD (SGD + EMA + AMP unscale/inf-skip in one Triton pass) against
torch.optim.SGD(foreach=True) plus a separately written EMA, after K steps; device-scalar
hyper-parameters, the cached host path, and the refusal of parameters that share memory.

Without CUDA the kernel runs on CPU tensors through Triton's interpreter (conftest.py);
with CUDA the same tests run on the GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fastres.errors import ConfigError
from fastres.kernels import FusedSGD, kernels_enabled
from fastres.kernels import _env
from fastres.kernels import sgd as S

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNELS_RUN = _env.HAS_TRITON and (DEVICE.type == "cuda" or _env.INTERPRET_AT_IMPORT)
pytestmark = [pytest.mark.skipif(not KERNELS_RUN, reason="Triton kernels cannot run here"),
              pytest.mark.usefixtures("interpreter_harness")]

# A conv net's worth of shapes: 4-D filters, vectors, a matrix, one tensor larger than a
# program's block on either backend, and sizes that are not multiples of anything.
SHAPES = [(8, 3, 3, 3), (8,), (8,), (10, 8), (70001,), (5,), (16, 8, 3, 3)]
ATOL, RTOL = 1e-6, 1e-5


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.delenv("FASTRES_KERNELS", raising=False)


def assert_close(actual, expected, name, atol=ATOL, rtol=RTOL):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bad.any():
        err = (a - e).abs()
        where = tuple(int(i) for i in torch.unravel_index(err.argmax(), a.shape))
        raise AssertionError(f"{name}: {int(bad.sum())}/{a.numel()} elements differ; worst "
                             f"|diff| {err.max().item():.3g} at {where}")


def _params(dtype=torch.float32, seed=0, memory_format=None):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in SHAPES:
        t = torch.randn(s, generator=g).to(DEVICE, dtype)
        if memory_format is not None and t.dim() == 4:
            t = t.to(memory_format=memory_format)
        ps.append(torch.nn.Parameter(t))
    return ps


def _groups(ps, spec):
    """spec: list of (slice, overrides) -> param groups."""
    return [dict(params=ps[sl], **kw) for sl, kw in spec]


def _grads(ps, step, scale=1.0):
    """Fresh gradients (new tensors each call), in each parameter's layout, as autograd
    would produce them."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.empty_like(p.detach()).copy_(torch.randn(p.shape, generator=g) * scale)
            for p in ps]


def _run(spec, defaults, steps=3, ema_decay=0.9, lrs=None, memory_format=None):
    """K steps of FusedSGD and of torch SGD(foreach) + reference EMA; compare everything."""
    p_fused = _params(memory_format=memory_format)
    p_ref = [torch.nn.Parameter(p.detach().clone()) for p in p_fused]
    opt = FusedSGD(_groups(p_fused, spec), **defaults, ema_decay=ema_decay)
    ref = torch.optim.SGD(_groups(p_ref, spec), foreach=True, **defaults)
    emas = [p.detach().clone() for p in p_ref]
    base = [g["lr"] for g in ref.param_groups]
    for step in range(steps):
        if lrs is not None:  # a schedule: lr changes every step, per group
            for go, gr, b in zip(opt.param_groups, ref.param_groups, base):
                go["lr"] = gr["lr"] = b * lrs(step)
        for p, g in zip(p_fused, _grads(p_fused, step)):
            p.grad = g.clone()
        for p, g in zip(p_ref, _grads(p_ref, step)):
            p.grad = g.clone()
        opt.step()
        ref.step()
        if ema_decay is not None:
            with torch.no_grad():
                for e, p in zip(emas, p_ref):
                    e.add_(p - e, alpha=1 - ema_decay)
    for i, (a, b) in enumerate(zip(p_fused, p_ref)):
        assert_close(a, b, f"param {i} {tuple(a.shape)}")
        if ref.state[b].get("momentum_buffer") is not None:
            assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"],
                         f"momentum_buffer {i}")
    if ema_decay is not None:
        for i, (a, b) in enumerate(zip(opt.ema_params(), emas)):
            assert_close(a, b, f"ema {i}")
    return opt, p_fused


ONE_GROUP = [(slice(None), {})]
THREE_GROUPS = [(slice(0, 3), dict(lr=0.1)),
                (slice(3, 5), dict(lr=0.03, weight_decay=0.0)),
                (slice(5, None), dict(lr=0.5, momentum=0.5, nesterov=False))]


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("weight_decay", [0.0, 5e-4], ids=["no_wd", "wd"])
def test_matches_torch_sgd_and_ema(nesterov, weight_decay):
    _run(ONE_GROUP, dict(lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay))


def test_groups_with_different_hyperparameters_and_an_lr_schedule():
    _run(THREE_GROUPS, dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4), steps=4,
         lrs=lambda step: 1 - step / 4)


def test_no_momentum_and_no_ema():
    opt, _ = _run(ONE_GROUP, dict(lr=0.05), ema_decay=None)
    with pytest.raises(RuntimeError, match="no EMA"):
        opt.ema_params()


def test_channels_last_parameters():
    """4-D weights of a channels-last model: grads, buffers and EMA share that layout."""
    _run(ONE_GROUP, dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
         memory_format=torch.channels_last)


def test_ema_decay_override_and_skip():
    ps = _params()
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, ema_decay=0.99)
    ema0 = [e.clone() for e in opt.ema_params()]
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step(ema_decay=1.0)  # 1.0: the EMA does not move
    for e, e0 in zip(opt.ema_params(), ema0):
        assert torch.equal(e, e0)
    opt.step(ema_decay=0.0)  # 0.0: the EMA becomes the weights (up to rounding)
    for e, p in zip(opt.ema_params(), ps):
        assert_close(e, p, "ema at decay 0")


def test_params_without_grads_take_only_the_ema_update():
    ps = _params()
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, ema_decay=0.5)
    with torch.no_grad():
        ps[1].add_(1.0)  # changed outside the optimizer (e.g. re-initialised), no grad
    before = ps[1].detach().clone()
    ema_before = opt.ema_params()[1].clone()
    for i, (p, g) in enumerate(zip(ps, _grads(ps, 0))):
        p.grad = None if i == 1 else g
    opt.step()
    assert torch.equal(ps[1].detach(), before)
    assert "momentum_buffer" not in opt.state[ps[1]]
    assert_close(opt.ema_params()[1], ema_before + 0.5 * (before - ema_before), "ema (no grad)")


def test_external_fp32_ema_of_bf16_params():
    """fp32 shadows (e.g. an engine's EMA) updated in place from bf16 weights."""
    ps = _params(torch.bfloat16)
    shadows = [p.detach().float().clone() for p in ps]
    ids = [id(s) for s in shadows]
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, ema_decay=0.8, ema_tensors=shadows)
    ref_p = [p.detach().clone() for p in ps]
    ref_buf = [torch.zeros_like(p) for p in ps]
    ref_e = [s.clone() for s in shadows]
    for step in range(2):
        grads = _grads(ps, step)
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):  # the kernel's arithmetic: fp32, rounded on store
            buf = (0.9 * ref_buf[i].float() + g.float()).to(torch.bfloat16)
            ref_buf[i] = buf
            ref_p[i] = (ref_p[i].float() - 0.1 * buf.float()).to(torch.bfloat16)
            ref_e[i] = ref_e[i] + 0.2 * (ref_p[i].float() - ref_e[i])
    assert [id(e) for e in opt.ema_params()] == ids
    # Same fp32 arithmetic, rounded to nearest even on store: on a GPU and on the
    # interpreter under the harness's GPU-like rounding, the bf16 parameters agree bit for
    # bit with torch's (an fp32 contraction or reordering may move a value by one ulp: at
    # most a handful of elements).
    for i in range(len(ps)):
        off = (ps[i].detach().float() != ref_p[i].float()).sum().item()
        assert off <= max(2, ps[i].numel() // 1000), (i, off)
        assert_close(ps[i], ref_p[i], f"bf16 param {i}", atol=1e-2, rtol=8e-3)
        assert_close(opt.ema_params()[i], ref_e[i], f"fp32 ema {i}", atol=1e-2, rtol=8e-3)
        assert opt.ema_params()[i].dtype == torch.float32


def test_grad_scale_unscales_in_the_kernel():
    """Grads scaled by 2**10 and grad_scale=2**10 give the unscaled step exactly."""
    scale = torch.tensor(1024.0, device=DEVICE)
    pa, pb = _params(), _params()
    oa = FusedSGD(pa, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, ema_decay=0.9)
    ob = FusedSGD(pb, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, ema_decay=0.9)
    for step in range(2):
        for p, g in zip(pa, _grads(pa, step, scale=1024.0)):
            p.grad = g
        for p, g in zip(pb, _grads(pb, step)):
            p.grad = g
        oa.step(grad_scale=scale)
        ob.step()
    for a, b in zip(pa + oa.ema_params(), pb + ob.ema_params()):
        assert torch.equal(a.detach(), b.detach())
    # p.grad keeps the scaled values (unscaled in registers only).
    assert_close(pa[0].grad, _grads(pa, 1, scale=1024.0)[0], "scaled grad kept")


def test_found_inf_skips_params_buffers_and_ema():
    ps = _params()
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, ema_decay=0.9)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step()
    snap = ([p.detach().clone() for p in ps],
            [opt.state[p]["momentum_buffer"].clone() for p in ps],
            [e.clone() for e in opt.ema_params()])
    for p, g in zip(ps, _grads(ps, 1)):
        p.grad = g
    ps[3].grad[0, 0] = float("inf")
    opt.step(grad_scale=torch.tensor(2.0, device=DEVICE),
             found_inf=torch.tensor(1.0, device=DEVICE))
    after = ([p.detach() for p in ps], [opt.state[p]["momentum_buffer"] for p in ps],
             opt.ema_params())
    for before_list, after_list in zip(snap, after):
        for b, a in zip(before_list, after_list):
            assert torch.equal(a, b)
    # found_inf = 0 steps normally.
    ps[3].grad[0, 0] = 0.0
    opt.step(found_inf=torch.tensor(0.0, device=DEVICE))
    assert not torch.equal(ps[0].detach(), snap[0][0])


def test_found_inf_on_the_first_step_leaves_valid_buffers():
    ps = _params()
    opt = FusedSGD(ps, lr=0.1, momentum=0.9)
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref = torch.optim.SGD(ref_ps, lr=0.1, momentum=0.9, foreach=True)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step(found_inf=torch.tensor(1.0, device=DEVICE))  # skipped
    for step in (1, 2):
        for p, g in zip(ps, _grads(ps, step)):
            p.grad = g
        for p, g in zip(ref_ps, _grads(ref_ps, step)):
            p.grad = g
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ps, ref_ps)):
        assert_close(a, b, f"param {i}")


def test_grad_scaler_integration():
    """torch.amp.GradScaler hands scale and found_inf to the optimizer (no unscale pass)."""
    device_type = DEVICE.type
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model_ref = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                    torch.nn.Linear(5, 3))
    model_ref.load_state_dict(model.state_dict())
    model.to(DEVICE)
    model_ref.to(DEVICE)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, ema_decay=0.9)
    ref = torch.optim.SGD(model_ref.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    assert FusedSGD._step_supports_amp_scaling
    scaler = torch.amp.GradScaler(device_type, init_scale=2.0 ** 12, growth_interval=1)
    x = torch.randn(8, 6, device=DEVICE)
    for step in range(3):
        opt.zero_grad()
        ref.zero_grad()
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        if step == 1:  # an overflow: the step must be skipped and the scale backed off
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        if step != 1:
            model_ref(x).square().mean().backward()
            ref.step()
    assert scaler.get_scale() == 2.0 ** 12 * 2 / 2 * 2  # grew, halved on inf, grew
    for (name, a), b in zip(model.named_parameters(), model_ref.parameters()):
        assert_close(a, b, name, atol=1e-6, rtol=1e-5)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_state_dict_round_trip():
    ps = _params()
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, ema_decay=0.9)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"momentum_buffer", "ema"}
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = FusedSGD(ps2, lr=0.1, momentum=0.9, ema_decay=0.9)
    opt2.load_state_dict(copy.deepcopy(sd))  # as through torch.save / torch.load
    for p, g in zip(ps, _grads(ps, 1)):
        p.grad = g
    for p, g in zip(ps2, _grads(ps2, 1)):
        p.grad = g
    opt.step()
    opt2.step()
    for a, b in zip(ps + opt.ema_params(), ps2 + opt2.ema_params()):
        assert torch.equal(a.detach(), b.detach())


def test_kill_switch_runs_the_foreach_reference(monkeypatch):
    """FASTRES_KERNELS=0: no launch, and the foreach reference gives the kernel's results,
    over four steps with fresh gradients each step; the third is skipped by found_inf
    (every step after it must use its own new gradients, not a remembered one)."""
    def boom(*a, **k):
        raise AssertionError("kernel launched despite FASTRES_KERNELS=0")

    pa, pb = _params(), _params()
    oa = FusedSGD(pa, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, ema_decay=0.9)
    ob = FusedSGD(pb, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, ema_decay=0.9)
    for step in range(4):
        for p, g in zip(pa, _grads(pa, step)):
            p.grad = g
        for p, g in zip(pb, _grads(pb, step)):
            p.grad = g
        skip = torch.tensor(float(step == 2), device=DEVICE)
        oa.step(found_inf=skip)
        with monkeypatch.context() as m:
            m.setenv("FASTRES_KERNELS", "0")
            m.setattr(S._env, "launch", boom)
            assert not kernels_enabled()
            ob.step(found_inf=skip)
        for a, b in zip(pa + oa.ema_params(), pb + ob.ema_params()):
            assert_close(a, b, f"kernel vs foreach reference after step {step + 1}")


def test_addresses_change_between_steps():
    """New grad tensors every step (zero_grad(set_to_none=True)): the table follows."""
    _run(ONE_GROUP, dict(lr=0.1, momentum=0.9), steps=3)  # _run assigns fresh grads


def test_bad_arguments():
    ps = _params()
    with pytest.raises(ValueError, match="0-d float tensor"):
        FusedSGD(ps, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="Nesterov"):
        FusedSGD(ps, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="ema_decay"):
        FusedSGD(ps, lr=0.1, ema_decay=1.5)
    with pytest.raises(ValueError, match="ema_tensors has"):
        FusedSGD(ps, lr=0.1, ema_decay=0.9, ema_tensors=[torch.zeros(1)])
    with pytest.raises(ValueError, match="weight_decay"):
        FusedSGD(ps, lr=0.1, weight_decay=torch.tensor(0.1))
    opt = FusedSGD(ps, lr=0.1, momentum=0.9)
    opt.param_groups[0]["dampening"] = 0.1
    for p in ps:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="dampening"):
        opt.step()
    if DEVICE.type == "cuda":  # a CPU lr for CUDA parameters would need a copy per step
        opt = FusedSGD(ps, lr=torch.tensor(0.1))
        with pytest.raises(ConfigError, match="parameters' device"):
            opt.step()


# ------------------------------------------------------------- device-scalar hyper-params

def test_device_scalar_hyperparameters():
    """lr and momentum as 0-d device tensors (and the EMA decay): a schedule writes them in
    place between steps; the kernel reads them, nothing is rebuilt, the results are
    torch's SGD with the same floats."""
    lr = torch.tensor(0.1, device=DEVICE)
    mom = torch.tensor(0.9, device=DEVICE)
    decay = torch.tensor(0.8, device=DEVICE)
    ps = _params()
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = FusedSGD(ps, lr=lr, momentum=mom, nesterov=True, weight_decay=5e-4, ema_decay=decay)
    ref = torch.optim.SGD(ref_ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          foreach=True)
    emas = [p.detach().clone() for p in ref_ps]
    plan = None
    for step in range(3):
        value = 0.1 * (1 - step / 4)
        lr.fill_(value)  # in place, as a device-side schedule would
        ref.param_groups[0]["lr"] = value
        for p, g in zip(ps, _grads(ps, step)):
            p.grad = g
        for p, g in zip(ref_ps, _grads(ref_ps, step)):
            p.grad = g
        opt.step()
        ref.step()
        with torch.no_grad():
            for e, p in zip(emas, ref_ps):
                e.add_(p - e, alpha=0.2)
        if plan is None:
            plan = opt._plans[0]
        assert opt._plans[0] is plan  # the plan survives new values (and new grads)
    for i, (a, b) in enumerate(zip(ps, ref_ps)):
        assert_close(a, b, f"param {i}")
    for i, (a, b) in enumerate(zip(opt.ema_params(), emas)):
        assert_close(a, b, f"ema {i}")
    assert opt.state_dict()["param_groups"][0]["lr"] is lr
    # A checkpoint round trip keeps the schedule's tensor (its value is loaded into it).
    sd = copy.deepcopy(opt.state_dict())
    lr.fill_(0.5)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.1 * (1 - 2 / 4))


def test_ema_decay_tensor_override():
    ps = _params()
    opt = FusedSGD(ps, lr=0.1, ema_decay=0.99)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step(ema_decay=torch.tensor(0.0, device=DEVICE))  # the EMA becomes the weights
    for e, p in zip(opt.ema_params(), ps):
        assert_close(e, p, "ema at decay 0 (tensor)")


# ------------------------------------------------------------------------- host path

def test_host_path_reuses_its_tables():
    """Grads kept (same objects): nothing is rebuilt. Grads reallocated at the same
    addresses: no table rewrite. At new addresses: the grad row is rewritten in place."""
    ps = _params()
    opt = FusedSGD(ps, lr=0.1, momentum=0.9)
    grads = _grads(ps, 0)
    for p, g in zip(ps, grads):
        p.grad = g
    opt.step()
    plan = opt._plans[0]
    table = plan.launches[0].table
    rows_before = table.clone()
    opt.step()
    for p, g in zip(ps, grads):  # new tensor objects over the same memory
        p.grad = g.view_as(g)
    opt.step()
    assert opt._plans[0] is plan and torch.equal(plan.launches[0].table, rows_before)
    for p, g in zip(ps, _grads(ps, 1)):  # new memory
        p.grad = g
    opt.step()
    assert opt._plans[0] is plan and plan.launches[0].table is table
    assert not torch.equal(table[1], rows_before[1]) and torch.equal(table[0], rows_before[0])
    with S.stub_launches():  # the host path alone runs (what bench-kernels --host times)
        opt.step()


# --------------------------------------------------------------------- shared memory

def test_parameters_that_share_memory_are_refused():
    base = torch.nn.Parameter(torch.randn(10, device=DEVICE))
    other = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    with pytest.raises(ConfigError, match="share memory"):
        FusedSGD([base, other, base], lr=0.1)
    flat = torch.randn(20, device=DEVICE)
    a = torch.nn.Parameter(flat[0:12])
    b = torch.nn.Parameter(flat[8:20])  # overlaps a by 4 elements
    with pytest.raises(ConfigError, match="share memory"):
        FusedSGD([a, b], lr=0.1)
    c = torch.nn.Parameter(flat[12:20])  # disjoint views of one storage are fine
    FusedSGD([a, c], lr=0.1)
    opt = FusedSGD([a], lr=0.1)
    with pytest.raises(ConfigError, match="share memory"):
        opt.add_param_group({"params": [torch.nn.Parameter(flat[4:6])]})
    with pytest.raises(ConfigError, match="ema_tensors"):
        FusedSGD([other], lr=0.1, ema_decay=0.9, ema_tensors=[other.detach()])


@pytest.mark.skipif(not _env.INTERPRET_AT_IMPORT, reason="the race check is the interpreter's")
def test_aliased_parameters_race_and_the_race_check_sees_it(monkeypatch):
    """Why they are refused: with the refusal bypassed, two programs update the same bytes
    (on a GPU, concurrently); the interpreter would silently apply both updates in turn,
    the race check fails the launch."""
    from fastres.kernels import _harness as H

    monkeypatch.setattr(S, "check_no_shared_memory", lambda *a, **k: None)
    p = torch.nn.Parameter(torch.randn(8))
    opt = FusedSGD([p, p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(8)
    with H.configured(race_check=True):
        with pytest.raises(H.RaceError, match="sgd_ema_kernel"):
            opt.step()


@pytest.mark.gpu
def test_gpu_resnet18_sized_step():
    """ResNet-18 (CIFAR stem): 11.2M parameters in 62 tensors, one launch, vs torch's fused
    SGD + a foreach EMA."""
    from fastres.models import create_model

    model = create_model("resnet18_cifar", num_classes=10).cuda()
    ps = [p for p in model.parameters()]
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, ema_decay=0.99)
    ref = torch.optim.SGD(ref_ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          fused=True)
    emas = [p.detach().clone() for p in ref_ps]
    for step in range(3):
        for p, q in zip(ps, ref_ps):
            g = torch.randn_like(p)
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
        torch._foreach_lerp_(emas, [p.detach() for p in ref_ps], 0.01)
    for a, b in zip(ps + opt.ema_params(), ref_ps + emas):
        assert_close(a, b, "resnet18 tensor", atol=1e-5, rtol=1e-4)



SM90_SGD_SCRIPT = r"""
import json, os
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from fastres.kernels import _sgd_kernels as S

fn = S.sgd_ema_kernel
types = dict(WORK_TENSOR="*i32", WORK_START="*i64", TABLE="*i64", T="i32", n_work="i32",
             GRAD_SCALE="*fp32", FOUND_INF="*fp32", LR="*fp32", MOMENTUM="*fp32",
             EMA_DECAY="*fp32", lr="fp32", momentum="fp32", weight_decay="fp32",
             ema_alpha="fp32")
DEV = dict(LR_ON_DEVICE=False, MOMENTUM_ON_DEVICE=False, EMA_ON_DEVICE=False)
out = {}
for name, consts in {
    "fp32 all features aligned": dict(P_DTYPE=tl.float32, G_DTYPE=tl.float32,
        E_DTYPE=tl.float32, HAS_GRAD=True, HAS_MOMENTUM=True, NESTEROV=True, HAS_WD=True,
        HAS_EMA=True, HAS_SCALE=True, HAS_FOUND_INF=True, ALIGNED=True, BLOCK=4096,
        LR_ON_DEVICE=True, MOMENTUM_ON_DEVICE=True, EMA_ON_DEVICE=True),
    "fp32 unaligned": dict(P_DTYPE=tl.float32, G_DTYPE=tl.float32, E_DTYPE=tl.float32,
        HAS_GRAD=True, HAS_MOMENTUM=True, NESTEROV=False, HAS_WD=False, HAS_EMA=True,
        HAS_SCALE=False, HAS_FOUND_INF=False, ALIGNED=False, BLOCK=4096, **DEV),
    "bf16 ema only": dict(P_DTYPE=tl.bfloat16, G_DTYPE=tl.bfloat16, E_DTYPE=tl.float32,
        HAS_GRAD=False, HAS_MOMENTUM=False, NESTEROV=False, HAS_WD=False, HAS_EMA=True,
        HAS_SCALE=False, HAS_FOUND_INF=False, ALIGNED=True, BLOCK=4096, **DEV),
}.items():
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if n not in consts and types[n].startswith("*")}
    k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts,
                                                 attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    ptx = k.asm["ptx"]
    out[name] = {"v4_loads": ptx.count("ld.global.v4") + ptx.count("ld.global.nc.v4"),
                 "v4_stores": ptx.count("st.global.v4"), "local": ptx.count(".local"),
                 "cubin": len(k.asm["cubin"])}
print(json.dumps(out))
"""


@pytest.mark.skipif(torch.cuda.is_available() or not _env.HAS_TRITON,
                    reason="the GPU tests compile and run it")
def test_kernel_compiles_for_sm90_with_vector_loads():
    """Compile for sm_90 on the CPU (Triton's compiler + bundled ptxas, nothing launched):
    catches what the interpreter accepts but the compiler rejects, and checks that the
    alignment hints on table-loaded addresses give 16-byte vector loads and stores."""
    import json
    import os
    import subprocess
    import sys

    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("Triton's bundled ptxas is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SM90_SGD_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, r in out.items():
        assert r["cubin"] > 0 and r["local"] == 0, (name, r)
    assert out["fp32 all features aligned"]["v4_loads"] > 0
    assert out["fp32 all features aligned"]["v4_stores"] > 0
    assert out["bf16 ema only"]["v4_loads"] > 0
    assert out["fp32 unaligned"]["v4_loads"] == 0  # no hint, no vectors: the hint matters


# ---------------------------------------------- fresh gradients every step, on every path

def _kernel_path_params(path: str) -> list:
    """Parameters for one dispatch path of FusedSGD (all fp32 unless the path says)."""
    g = torch.Generator().manual_seed(3)
    if path == "layout_fallback":
        # A transposed (non-dense-in-order) parameter the kernel does not take, beside two
        # it does: one group, one plan with both a launch and fallback items.
        return [torch.nn.Parameter(torch.randn(5, 3, generator=g).to(DEVICE).t()),
                torch.nn.Parameter(torch.randn(7, generator=g).to(DEVICE)),
                torch.nn.Parameter(torch.randn(4, 2, generator=g).to(DEVICE))]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE))
            for s in ((7,), (4, 2), (70001,))]


FRESH_GRAD_PATHS = ["kernel", "kill_switch", "no_kernel_device", "layout_fallback"]


@pytest.mark.parametrize("path", FRESH_GRAD_PATHS)
def test_fresh_gradients_every_step_on_every_path(path, monkeypatch):
    """Issue 21 item 1: new gradient tensors every step (zero_grad(set_to_none=True)), with
    values 1, 10, 100 and lr 1: torch.optim.SGD moves each element -1, -11, -111. The
    fallback once applied the first step's gradient forever (-1, -2, -3)."""
    if path == "kill_switch":
        monkeypatch.setenv("FASTRES_KERNELS", "0")
    elif path == "no_kernel_device":  # a CPU without the interpreter (optim.impl=triton)
        monkeypatch.setattr(S._env, "use_triton", lambda device: False)
    if path in ("kill_switch", "no_kernel_device"):
        def boom(*a, **k):
            raise AssertionError("a kernel was launched on a reference path")
        monkeypatch.setattr(S._env, "launch", boom)
    ps = _kernel_path_params(path)
    start = [p.detach().clone() for p in ps]
    opt = FusedSGD(ps, lr=1.0)
    for step, value in enumerate((1.0, 10.0, 100.0)):
        for p in ps:
            # A new, contiguous tensor each step, as after set_to_none (for the transposed
            # parameter a dense grad in another element order than its parameter's).
            p.grad = torch.full(p.shape, value, device=DEVICE)
        opt.step()
        moved = (-1.0, -11.0, -111.0)[step]
        for i, (p, p0) in enumerate(zip(ps, start)):
            assert_close(p, p0 + moved, f"{path}: param {i} after step {step + 1}")
    if path == "layout_fallback":
        plan = opt._plans[0]
        assert plan.fallback and plan.launches  # both kinds of item really ran


@pytest.mark.parametrize("path", FRESH_GRAD_PATHS)
def test_fresh_gradients_match_torch_sgd_with_momentum_and_ema(path, monkeypatch):
    """The same paths with momentum, Nesterov, weight decay and the EMA, random fresh
    gradients for four steps, against torch.optim.SGD + a separately written EMA."""
    if path == "kill_switch":
        monkeypatch.setenv("FASTRES_KERNELS", "0")
    elif path == "no_kernel_device":
        monkeypatch.setattr(S._env, "use_triton", lambda device: False)
    ps = _kernel_path_params(path)
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    hp = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt = FusedSGD(ps, **hp, ema_decay=0.8)
    ref = torch.optim.SGD(ref_ps, **hp)
    emas = [p.detach().clone() for p in ref_ps]
    for step in range(4):
        gen = torch.Generator().manual_seed(50 + step)
        for p, q in zip(ps, ref_ps):
            grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
        with torch.no_grad():
            for e, q in zip(emas, ref_ps):
                e.add_(q - e, alpha=0.2)
    for i, (a, b) in enumerate(zip(ps, ref_ps)):
        assert_close(a, b, f"{path}: param {i}")
        assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"],
                     f"{path}: momentum_buffer {i}")
    for i, (a, b) in enumerate(zip(opt.ema_params(), emas)):
        assert_close(a, b, f"{path}: ema {i}")


# ------------------------------------------------------------------- storage that moves

def _step_both(opt, ref, ps, ref_ps, step):
    gen = torch.Generator().manual_seed(80 + step)
    for p, q in zip(ps, ref_ps):
        grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        p.grad = grad.to(p.dtype).contiguous(memory_format=_layout(p))
        q.grad = grad.to(q.dtype).contiguous(memory_format=_layout(q))
    opt.step()
    ref.step()


def _layout(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
            memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


@pytest.mark.parametrize("move", ["param_data", "param_reinit", "channels_last",
                                  "momentum_buffer_data", "momentum_buffer_replaced",
                                  "ema_data", "ema_replaced", "param_list_replaced"])
def test_storage_that_moves_is_followed_never_the_old_storage(move):
    """Issue 21 item 2: after `p.data = ...` (model.to, .half(), a re-init), a momentum
    buffer or EMA tensor moved or replaced in `opt.state`, the next step updates the new
    storage (and leaves the old one alone), matching torch.optim.SGD doing the same."""
    ps = _params()
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    hp = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt = FusedSGD(ps, **hp, ema_decay=0.5)
    ref = torch.optim.SGD(ref_ps, **hp)
    emas = [p.detach().clone() for p in ref_ps]

    def ema_ref():
        with torch.no_grad():
            for e, q in zip(emas, ref_ps):
                e.add_(q - e, alpha=0.5)

    _step_both(opt, ref, ps, ref_ps, 0)
    ema_ref()
    i = 6  # the (16, 8, 3, 3) conv filter
    p, q = ps[i], ref_ps[i]
    old = None
    with torch.no_grad():
        if move == "param_data":
            old = p.data
            p.data = p.data.clone()
            q.data = q.data.clone()
        elif move == "param_reinit":
            old = p.data
            fresh = torch.randn(p.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
            p.data, q.data = fresh.clone(), fresh.clone()
        elif move == "channels_last":  # what model.to(memory_format=channels_last) does
            old = p.data
            p.data = p.data.to(memory_format=torch.channels_last)
            q.data = q.data.to(memory_format=torch.channels_last)
        elif move == "momentum_buffer_data":
            old = opt.state[p]["momentum_buffer"].data
            opt.state[p]["momentum_buffer"].data = old.clone()
        elif move == "momentum_buffer_replaced":
            old = opt.state[p]["momentum_buffer"]
            opt.state[p]["momentum_buffer"] = old.clone()
        elif move == "ema_data":
            old = opt.state[p]["ema"].data
            opt.state[p]["ema"].data = old.clone()
        elif move == "ema_replaced":
            old = opt.state[p]["ema"]
            opt.state[p]["ema"] = old.clone()
        elif move == "param_list_replaced":  # the group's list replaced, same length
            fresh = [torch.nn.Parameter(t.detach().clone()) for t in ps]
            for a, b in zip(fresh, ps):
                opt.state[a] = {k: v.clone() for k, v in opt.state[b].items()}
            opt.param_groups[0]["params"] = fresh
            old = ps[i].detach().clone()
            ps = fresh
        snapshot = old.clone() if old is not None else None
    for step in (1, 2):
        _step_both(opt, ref, ps, ref_ps, step)
        ema_ref()
    if old is not None and move != "param_list_replaced":
        if not torch.equal(old, snapshot):
            raise AssertionError(f"{move}: the old storage was written after it moved")
    for k, (a, b) in enumerate(zip(ps, ref_ps)):
        assert_close(a, b, f"{move}: param {k}")
        assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"],
                     f"{move}: momentum_buffer {k}")
    for k, (a, b) in enumerate(zip(opt.ema_params(), emas)):
        assert_close(a, b, f"{move}: ema {k}")


# ------------------------------------------------------------- no host sync per step

def _table_writes(monkeypatch, opt):
    """Record every copy into a launch's address table (the only host-to-device traffic of
    a step): (non_blocking, source pinned, destination on CUDA)."""
    writes = []
    original = torch.Tensor.copy_

    def spy(self, src, non_blocking=False):
        plan = opt._plans.get(0)
        tables = [lc.table for lc in plan.launches] if plan is not None else []
        if any(self.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
               for t in tables):
            writes.append((bool(non_blocking), src.is_pinned() if src.device.type == "cpu"
                           else None, self.is_cuda))
        return original(self, src, non_blocking=non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    return writes


def test_fresh_gradients_need_no_synchronous_table_copy(monkeypatch):
    """Issue 21 item 3: with new gradient tensors every step the grad row of the address
    table is rewritten only when an address moved, and then with an asynchronous copy
    (pinned staging on a GPU; torch's caching host allocator keeps the staging block until
    the copy has run), never a synchronous pageable copy (a host sync per step)."""
    ps = _params()
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, ema_decay=0.9)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    opt.step()  # builds the plan
    writes = _table_writes(monkeypatch, opt)
    held = _grads(ps, 1)  # new memory: the addresses move
    for p, g in zip(ps, held):
        p.grad = g
    opt.step()
    assert writes, "new grad addresses but no table write"
    for non_blocking, pinned, cuda in writes:
        assert non_blocking, "a synchronous copy into the address table"
        if cuda:
            assert pinned, "an asynchronous copy from pageable memory is synchronous"
    writes.clear()
    for p, g in zip(ps, held):  # new objects over the same memory: nothing to write
        p.grad = g.view_as(g)
    opt.step()
    assert not writes, writes


@pytest.mark.gpu
def test_gpu_fresh_gradients_step_without_a_host_sync():
    """On a GPU: steps with new gradient tensors at new addresses every step, under torch's
    sync debug mode set to raise on any synchronising call."""
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                   ema_decay=0.9)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step builds the tables (also asynchronously)
    keep = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            grads = [torch.randn_like(p) for p in ps]
            keep.append(grads)  # hold them: every step's grads at new addresses
            for p, g in zip(ps, grads):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ---------------------------------------------------------------- minor: issue 21 item 7

def test_maximize_is_refused_with_a_clear_error():
    ps = _params()
    with pytest.raises(ConfigError, match="maximize"):
        FusedSGD(ps, lr=0.1, maximize=True)
    opt = FusedSGD(ps, lr=0.1)
    opt.param_groups[0]["maximize"] = True  # e.g. groups loaded from torch.optim.SGD's
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g
    with pytest.raises(ConfigError, match="maximize"):
        opt.step()


def test_float64_parameters_are_not_rounded_to_float32():
    """fp64 parameters take the fp64 reference path (the kernel computes in fp32): the
    result is torch.optim.SGD's to fp64 precision, also beside fp32 parameters."""
    g = torch.Generator().manual_seed(4)
    base = 1.0 + torch.rand(1000, generator=g, dtype=torch.float64) * 2.0 ** -30
    ps = [torch.nn.Parameter(base.clone().to(DEVICE)),
          torch.nn.Parameter(torch.randn(9, generator=g).to(DEVICE))]
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    hp = dict(lr=2.0 ** -35, momentum=0.9, nesterov=True)
    opt = FusedSGD(ps, **hp, ema_decay=0.5)
    ref = torch.optim.SGD(ref_ps, **hp)
    for step in range(2):
        for p, q in zip(ps, ref_ps):
            grad = torch.rand(p.shape, generator=g, dtype=p.dtype).to(DEVICE)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    assert ps[0].dtype == torch.float64
    torch.testing.assert_close(ps[0], ref_ps[0], atol=0, rtol=1e-15)
    assert opt.ema_params()[0].dtype == torch.float64
    assert not torch.equal(ps[0].detach().float().double(), ps[0].detach())  # fp64 digits
    assert_close(ps[1], ref_ps[1], "fp32 beside fp64")


def test_the_optimizer_keeps_no_gradient_alive():
    """zero_grad(set_to_none=True) must free the gradients: the cached plan holds their
    addresses, not the tensors (it once kept the last step's, and the first step's on the
    fallback, a whole extra gradient set during the next backward)."""
    import gc
    import weakref

    ps = _params()
    ps.append(torch.nn.Parameter(torch.randn(5, 3, device=DEVICE).t()))  # a fallback item
    opt = FusedSGD(ps, lr=0.1, momentum=0.9, ema_decay=0.9)
    refs = []
    for step in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, device=DEVICE)
        refs = [weakref.ref(p.grad) for p in ps]
        opt.step()
        opt.zero_grad(set_to_none=True)
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert not alive, f"gradients {alive} kept alive by the optimizer"
