"""The interpreter harness (fastres.kernels._harness) catches what it is there to catch, and
the kernels package stands on its own.

- A planted race (write/write, read/write across programs, a "last program" combine
  without its atomic ticket, a partial written after the ticket) fails the launch under
  ``race_check``; the correct ticket pattern and disjoint accesses pass.
- ``grid_order`` runs a launch's programs in natural, reversed and (seeded) shuffled order.
- ``rounding="rtne"`` rounds fp32 -> bf16/fp16 to nearest even as compiled kernels do; the
  interpreter's own truncation (``rounding="triton"``) is caught by the fp64-truth
  comparison at half an ulp: the planted truncation-vs-rounding difference.
- CI runs a representative subset of the kernel tests under
  ``FASTRES_GRID_ORDER=shuffle FASTRES_RACE_CHECK=1`` (one subprocess).
- `import fastres.kernels` loads no model zoo; without Triton the references run; changing
  TRITON_INTERPRET after import raises instead of silently running the reference.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastres.kernels import FusedBatchNormAct2d, _env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(
    not (_env.HAS_TRITON and _env.INTERPRET_AT_IMPORT),
    reason="the harness patches Triton's interpreter (TRITON_INTERPRET=1 at import)"),
    pytest.mark.usefixtures("interpreter_harness")]

if _env.HAS_TRITON and _env.INTERPRET_AT_IMPORT:
    import triton
    import triton.language as tl

    from fastres.kernels import _harness as H
    from fastres.kernels import testing as T

    @triton.jit
    def _same_cell_kernel(OUT):
        """Every program writes OUT[0]: a write/write race."""
        tl.store(OUT, tl.program_id(0).to(tl.float32))

    @triton.jit
    def _neighbour_kernel(X, N, BLOCK: tl.constexpr):
        """Program i reads its right neighbour's block and writes its own: read/write."""
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        right = tl.load(X + offs + BLOCK, mask=offs + BLOCK < N, other=0.0)
        tl.store(X + offs, right + 1.0, mask=offs < N)

    @triton.jit
    def _disjoint_kernel(X, N, BLOCK: tl.constexpr):
        """Each program reads and writes its own block only: no race."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < N) * 2.0, mask=offs < N)

    @triton.jit
    def _combine_kernel(PART, COUNTER, OUT, P, TICKET: tl.constexpr,
                        WRITE_AFTER_TICKET: tl.constexpr, BLOCK_P: tl.constexpr,
                        SEM: tl.constexpr = "acq_rel", SCOPE: tl.constexpr = "gpu",
                        BARRIER: tl.constexpr = True):
        """Each program writes a partial; one program sums them all. With TICKET the one
        that sums is the last to take a ticket (the kernels' pattern: a barrier, then an
        acq_rel atomic at GPU scope); without, program P-1 sums, racing the others;
        WRITE_AFTER_TICKET publishes the partial after the ticket (release too early).
        SEM, SCOPE and BARRIER plant the ticket's memory-order faults."""
        pid = tl.program_id(0)
        value = (pid + 1).to(tl.float32)
        if not WRITE_AFTER_TICKET:
            tl.store(PART + pid, value)
        if TICKET:
            if BARRIER:
                tl.debug_barrier()
            last = tl.atomic_add(COUNTER, 1, sem=SEM, scope=SCOPE) == P - 1
        else:
            last = pid == P - 1
        if WRITE_AFTER_TICKET:
            tl.store(PART + pid, value)
        if last:
            ps = tl.arange(0, BLOCK_P)
            tl.store(OUT, tl.sum(tl.load(PART + ps, mask=ps < P, other=0.0), axis=0))
            if TICKET:
                tl.atomic_xchg(COUNTER, 0)

    @triton.jit
    def _order_kernel(COUNTER, RANK):
        """RANK[pid] = the position of this program in execution order."""
        pid = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        tl.store(RANK + pid, tl.atomic_add(COUNTER, 1))

    @triton.jit
    def _downcast_kernel(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N)
        tl.store(Y + offs, x.to(Y.dtype.element_ty), mask=offs < N)


# ------------------------------------------------------------------------------ races

def test_planted_write_write_race_is_caught():
    out = torch.zeros(1)
    with H.configured(race_check=True):
        with pytest.raises(H.RaceError, match="write/write"):
            _same_cell_kernel[(3,)](out)
    with H.configured(race_check=False):
        _same_cell_kernel[(3,)](out)  # unchecked, the interpreter hides it


@pytest.mark.parametrize("order", ["natural", "reverse", "shuffle"])
def test_planted_read_write_race_is_caught_in_any_order(order):
    x = torch.zeros(40)
    with H.configured(race_check=True, grid_order=order):
        with pytest.raises(H.RaceError, match="race in _neighbour_kernel"):
            _neighbour_kernel[(5,)](x, 40, BLOCK=8)


def test_disjoint_programs_pass():
    x = torch.ones(40)
    with H.configured(race_check=True, grid_order="shuffle"):
        _disjoint_kernel[(5,)](x, 40, BLOCK=8)
    assert torch.equal(x, torch.full((40,), 2.0))


@pytest.mark.parametrize("order", ["natural", "reverse", "shuffle"])
def test_last_program_combine_through_a_ticket_is_not_a_race(order):
    P = 6
    part, counter, out = torch.zeros(P), torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    with H.configured(race_check=True, grid_order=order):
        _combine_kernel[(P,)](part, counter, out, P, TICKET=True, WRITE_AFTER_TICKET=False,
                              BLOCK_P=8)
    assert out.item() == P * (P + 1) / 2 and counter.item() == 0


def test_planted_combine_without_ticket_is_caught():
    P = 6
    part, counter, out = torch.zeros(P), torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    # (natural order set explicitly: the suite also runs under FASTRES_GRID_ORDER=shuffle)
    with H.configured(race_check=True, grid_order="natural"):
        with pytest.raises(H.RaceError, match="write/read"):
            _combine_kernel[(P,)](part, counter, out, P, TICKET=False,
                                  WRITE_AFTER_TICKET=False, BLOCK_P=8)
    # Without the check the natural order even gives the right sum: the CPU hides it.
    with H.configured(race_check=False, grid_order="natural"):
        _combine_kernel[(P,)](part, counter, out, P, TICKET=False, WRITE_AFTER_TICKET=False,
                              BLOCK_P=8)
    assert out.item() == P * (P + 1) / 2


def test_planted_partial_published_after_the_ticket_is_caught():
    P = 6
    part, counter, out = torch.zeros(P), torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    with H.configured(race_check=True, grid_order="shuffle"):
        with pytest.raises(H.RaceError):
            _combine_kernel[(P,)](part, counter, out, P, TICKET=True,
                                  WRITE_AFTER_TICKET=True, BLOCK_P=8)


@pytest.mark.parametrize("fault", [dict(SEM="relaxed"), dict(SEM="release"),
                                   dict(SEM="acquire"), dict(SCOPE="cta"),
                                   dict(BARRIER=False)],
                         ids=["relaxed_ticket", "release_only", "acquire_only", "cta_scope",
                              "no_barrier"])
@pytest.mark.parametrize("order", ["natural", "shuffle"])
def test_planted_memory_order_faults_in_the_ticket_are_caught(fault, order):
    """Negative controls (issue 21 item 5): a ticket that does not order the partials --
    relaxed, release without acquire (the last program's reads are not ordered after the
    others' stores), acquire without release, CTA scope (orders nothing between programs),
    or no tl.debug_barrier() before the atomic (the one thread's release does not cover
    the other threads' stores) -- is a race on a GPU, and the race check reports it even
    though the interpreter, running programs one after another, gets the right sum."""
    P = 6
    part, counter, out = torch.zeros(P), torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    with H.configured(race_check=True, grid_order=order):
        with pytest.raises(H.RaceError, match="write/read"):
            _combine_kernel[(P,)](part, counter, out, P, TICKET=True,
                                  WRITE_AFTER_TICKET=False, BLOCK_P=8, **fault)
    counter.zero_()
    with H.configured(race_check=False, grid_order="natural"):
        _combine_kernel[(P,)](part, counter, out, P, TICKET=True, WRITE_AFTER_TICKET=False,
                              BLOCK_P=8, **fault)
    assert out.item() == P * (P + 1) / 2  # the CPU alone would never show it


@pytest.mark.parametrize("fault", ["no_barrier", "relaxed"])
def test_the_race_check_sees_a_fault_planted_in_the_real_kernels(fault, tmp_path, monkeypatch):
    """The fused BN kernels' own tickets (a barrier, then an acq_rel atomic): a copy of
    the kernels with the barrier removed, or the ticket relaxed, is reported by the race
    check on a forward + backward with many programs per channel block; the real ones
    pass the same run."""
    import importlib.util

    from fastres.kernels import _bn_act_kernels as BK
    from fastres.kernels import bn_act as K

    text = Path(BK.__file__).read_text()
    ticket = 'ticket = tl.atomic_add(COUNTER + pid_c, 1, sem="acq_rel")'
    assert text.count("tl.debug_barrier()\n") == 2 and text.count(ticket) == 2
    if fault == "no_barrier":
        text = text.replace("tl.debug_barrier()\n", "pass\n")
    else:
        text = text.replace(ticket, ticket.replace("acq_rel", "relaxed"))
    path = tmp_path / f"bn_kernels_{fault}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"_planted_{fault}", path)
    planted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planted)

    def run():
        m = FusedBatchNormAct2d(20, act="relu")
        x = torch.randn(3, 20, 3, 5).to(memory_format=torch.channels_last).requires_grad_()
        y = m(x)
        torch.autograd.grad(y, (x, m.weight), torch.randn_like(y))

    small = K.TileConfig(block_m=4, block_c=8, rows_per_prog=8, num_warps=1, block_p=2)
    with H.configured(race_check=True, grid_order="shuffle"), K.forced_config(small):
        run()  # the real kernels
        monkeypatch.setattr(K, "_k", planted)
        with pytest.raises(H.RaceError, match="bn_fwd_stats_kernel|bn_bwd_reduce_kernel"):
            run()


def test_grid_orders():
    def ranks(order, seed=0):
        counter = torch.zeros(1, dtype=torch.int32)
        rank = torch.full((12,), -1, dtype=torch.int32)
        with H.configured(grid_order=order, seed=seed):
            _order_kernel[(3, 4)](counter, rank)
        return rank.tolist()

    assert ranks("natural") == list(range(12))
    assert ranks("reverse") == list(range(11, -1, -1))
    shuffled = ranks("shuffle")
    assert sorted(shuffled) == list(range(12)) and shuffled != list(range(12))
    assert ranks("shuffle", seed=5) != ranks("shuffle", seed=6)


# ---------------------------------------------------------------------------- rounding

def _rounding_probe() -> torch.Tensor:
    """fp32 values that separate truncation from round-to-nearest-even in bf16: just above
    and below halfway, exact ties (to even, both directions), a carry into the exponent,
    negative values, subnormals, inf and NaN."""
    one = 1.0
    ulp = 2.0 ** -7
    vals = [one + 0.75 * ulp, one + 0.25 * ulp, one + 0.5 * ulp, one + 1.5 * ulp,
            2.0 - 0.25 * ulp, -(one + 0.75 * ulp), 3.0e-39, 1e30, float("inf"),
            float("nan"), 0.0, -0.0]
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.tensor(vals), torch.randn(500, generator=g) * 10])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_rtne_rounding_matches_torch(dtype):
    x = _rounding_probe()
    y = torch.empty(x.numel(), dtype=dtype)
    with H.configured(rounding="rtne"):
        _downcast_kernel[(1,)](x, y, x.numel(), BLOCK=1024)
    expect = x.to(dtype)
    assert torch.equal(y.view(torch.int16), expect.view(torch.int16))


def test_planted_truncation_is_caught_by_the_half_ulp_truth():
    """The interpreter's own fp32 -> bf16 cast truncates; the fp64-truth comparison at half
    an ulp (what the kernel tests use) fails it, and passes the GPU-like rounding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g) * 3
    y = torch.empty(4096, dtype=torch.bfloat16)
    with H.configured(rounding="rtne"):
        _downcast_kernel[(1,)](x, y, 4096, BLOCK=4096)
    T.assert_ulp_close(y, x.double(), torch.bfloat16, "rtne")
    with H.configured(rounding="triton"):
        _downcast_kernel[(1,)](x, y, 4096, BLOCK=4096)
    with pytest.raises(AssertionError, match=r"elements off by more than 0.5 ulp"):
        T.assert_ulp_close(y, x.double(), torch.bfloat16, "truncated")


def test_harness_settings_come_from_the_environment():
    """What fastres.kernels._env read at import (the CI subprocess below sets them)."""
    s = H.settings()
    assert s.grid_order == os.environ.get("FASTRES_GRID_ORDER", "natural")
    assert s.race_check == (os.environ.get("FASTRES_RACE_CHECK", "0") == "1")
    assert s.rounding == "rtne" and s.exact_sums


def test_harness_settings_are_validated():
    with pytest.raises(ValueError, match="grid order"):
        with H.configured(grid_order="sideways"):
            pass
    with pytest.raises(ValueError, match="rounding"):
        with H.configured(rounding="up"):
            pass


# ------------------------------------------------------ CI run under shuffle + race check

HARNESS_SUBSET = [  # every kernel, every flag family, small and forced many-program tiles
    "tests/test_kernels_harness.py::test_harness_settings_come_from_the_environment",
    "tests/test_kernels_bn_act.py::test_matches_truth_fp32[train-res-relu-2x100x3x5]",
    "tests/test_kernels_bn_act.py::test_matches_truth_fp32[eval-res-gelu-2x100x3x5]",
    "tests/test_kernels_bn_act.py::test_matches_truth_fp32[train-nores-identity-3x2048x1x2]",
    "tests/test_kernels_bn_act.py::test_matches_truth_fp32[train-res-gelu-2x8x40x40]",
    "tests/test_kernels_bn_act.py::test_matches_truth_low_precision[2x24x5x3-train-gelu-bf16]",
    "tests/test_kernels_bn_act.py::test_matches_truth_low_precision[4x100x2x2-eval-relu-fp16]",
    "tests/test_kernels_bn_act.py::test_many_programs_per_reduction",
    "tests/test_kernels_bn_act.py::test_momentum_none_cumulative_average",
    "tests/test_kernels_bn_act.py::test_gpu_tiles_on_the_cpu[bf16-relu-3x37x31x29]",
    "tests/test_kernels_bn_act.py::test_decisive_experiment_runs_on_a_small_shape",
    "tests/test_kernels_sgd.py::test_matches_torch_sgd_and_ema[wd-nesterov]",
    "tests/test_kernels_sgd.py::test_device_scalar_hyperparameters",
    "tests/test_kernels_sgd.py::test_found_inf_skips_params_buffers_and_ema",
    "tests/test_kernels_sgd.py::test_external_fp32_ema_of_bf16_params",
]


def test_kernel_tests_pass_under_shuffled_grids_and_the_race_check():
    """The issue's CI requirement: the kernel tests under FASTRES_GRID_ORDER=shuffle
    FASTRES_RACE_CHECK=1 (a representative subset: every kernel, every reduction path,
    forced small and GPU tiles), in a fresh interpreter so the settings apply at import."""
    env = dict(os.environ, TRITON_INTERPRET="1", FASTRES_GRID_ORDER="shuffle",
               FASTRES_RACE_CHECK="1", FASTRES_GRID_SEED="11")
    env.pop("FASTRES_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         *HARNESS_SUBSET],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


# ------------------------------------------------------------------ self-contained package

def _python(code: str, env_changes: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for k, v in (env_changes or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_kernels_does_not_import_the_model_zoo():
    proc = _python("import fastres.kernels, sys; "
                   "bad = [m for m in sys.modules if m.startswith('fastres.models')]; "
                   "assert not bad, bad; import fastres.norm_act")
    assert proc.returncode == 0, proc.stderr[-2000:]


HIDE_TRITON = r"""
import sys
# Hide Triton: `import triton` raises ImportError and importlib's find_spec says "absent"
# (a None entry in sys.modules is the import system's own blocker).
sys.modules["triton"] = None
import torch
from fastres.kernels import FusedBatchNormAct2d, FusedSGD, HAS_TRITON, fused_bn_act, use_triton
from fastres.norm_act import BatchNormAct2d
import fastres.kernels._env as E
assert not HAS_TRITON and not E.INTERPRET_AT_IMPORT and not use_triton(torch.device("cpu"))
assert sys.modules["triton"] is None and not any(m.startswith("triton.") for m in sys.modules)
torch.manual_seed(0)
CL = torch.channels_last
ref, fus = BatchNormAct2d(6, act="relu"), FusedBatchNormAct2d(6, act="relu")
x = torch.randn(2, 6, 3, 3).to(memory_format=CL)
r = torch.randn(2, 6, 3, 3).to(memory_format=CL)
assert torch.equal(fus(x, r), ref(x, r))
try:
    fus(x.contiguous())
except ValueError as e:
    assert "channels_last" in str(e)
else:
    raise AssertionError("NCHW accepted on the no-Triton path")
ps = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
opt = FusedSGD(ps, lr=0.1, momentum=0.9, ema_decay=0.9)
for p in ps:
    p.grad = torch.ones(5)
before = [p.detach().clone() for p in ps]
opt.step()
assert all(torch.allclose(p, b - 0.1) for p, b in zip(ps, before))
print("ok")
"""


def test_without_triton_the_references_run():
    proc = _python(HIDE_TRITON, {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


CHANGED_AFTER_IMPORT = r"""
import os, torch
from fastres.errors import ConfigError
from fastres.kernels import FusedBatchNormAct2d, FusedSGD
os.environ["TRITON_INTERPRET"] = "1"      # too late: the kernels were defined compiled
m = FusedBatchNormAct2d(4, act="relu")
x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
try:
    m(x)
except ConfigError as e:
    assert "TRITON_INTERPRET" in str(e) and "before the first" in str(e), e
else:
    raise AssertionError("ran silently")
p = torch.nn.Parameter(torch.randn(3))
p.grad = torch.ones(3)
try:
    FusedSGD([p], lr=0.1).step()
except ConfigError as e:
    assert "TRITON_INTERPRET" in str(e)
else:
    raise AssertionError("ran silently")
os.environ["FASTRES_KERNELS"] = "0"       # the kill switch: the reference, on purpose
m(x)
print("ok")
"""


def test_triton_interpret_changed_after_import_raises():
    proc = _python(CHANGED_AFTER_IMPORT, {"TRITON_INTERPRET": None, "FASTRES_KERNELS": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_an_interpreter_numpy_cannot_feed_is_named_before_the_first_launch(monkeypatch):
    """Triton 3.6's interpreter (torch 2.11's) with numpy >= 2.4 fails deep inside the first
    kernel; the launch names the two versions instead."""
    from fastres.errors import ConfigError
    from fastres.kernels.bn_act import fused_bn_act

    old = 'scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))'
    new = 'scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))'
    assert "numpy 2.4.0" in _env.interpreter_clash(old, "2.4.0")
    assert _env.interpreter_clash(old, "2.3.5") is None
    assert _env.interpreter_clash(new, "2.4.0") is None
    assert _env.interpreter_clash("", "2.4.0") is None  # an interpreter without that patch
    monkeypatch.setattr(_env, "_interpreter_ok", False)
    monkeypatch.setattr(_env, "interpreter_clash", lambda: "Triton 3.6's interpreter ...")
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    w, b = torch.ones(4), torch.zeros(4)
    with pytest.raises(ConfigError, match="Triton 3.6's interpreter"):
        fused_bn_act(x, w, b, None, None, True, 0.1, 1e-5)


CPU_WITHOUT_INTERPRETER = r"""
import torch
from fastres.kernels import FusedBatchNormAct2d, FusedSGD, use_triton
from fastres.norm_act import BatchNormAct2d
from fastres.kernels import bn_act as K, sgd as S
assert not use_triton(torch.device("cpu"))
def boom(*a, **k):
    raise AssertionError("a kernel was launched on the CPU without the interpreter")
K._env.launch = boom  # every launch goes through fastres.kernels._env.launch
CL = torch.channels_last
ref, fus = BatchNormAct2d(6, act="gelu"), FusedBatchNormAct2d(6, act="gelu")
x = torch.randn(2, 6, 3, 3).to(memory_format=CL)
assert torch.equal(fus(x, x), ref(x, x))
p = torch.nn.Parameter(torch.ones(4))
p.grad = torch.ones(4)
FusedSGD([p], lr=0.5).step()
assert torch.equal(p.detach(), torch.full((4,), 0.5))
print("ok")
"""


def test_cpu_without_the_interpreter_runs_the_references():
    proc = _python(CPU_WITHOUT_INTERPRETER, {"TRITON_INTERPRET": None, "FASTRES_KERNELS": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


# ---------------------------------------------------- no side effects at import (issue 22)

NO_SIDE_EFFECTS = r"""
import triton.runtime.interpreter as I
before = (I.GridExecutor.__call__, I.interpreter_builder.create_masked_load,
          I.ReduceOps.sum)
import fastres.kernels
from fastres.kernels import _harness, install_harness
after = (I.GridExecutor.__call__, I.interpreter_builder.create_masked_load, I.ReduceOps.sum)
assert not _harness.installed() and after == before, "import patched Triton's interpreter"
install_harness(grid_order="reverse")
assert _harness.installed() and _harness.settings().grid_order == "reverse"
assert I.GridExecutor.__call__ is not before[0]
try:
    install_harness(grid_order="sideways")
except ValueError as e:
    assert "grid order" in str(e), e
else:
    raise AssertionError("a bad setting was accepted")
print("ok")
"""


def test_import_has_no_side_effects_and_the_harness_is_installed_on_request():
    """`import fastres.kernels` under TRITON_INTERPRET=1 leaves Triton's interpreter as it
    was; `fastres.kernels.install_harness()` patches it when a test or a user asks."""
    proc = _python(NO_SIDE_EFFECTS, {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_notes_ship_with_the_package():
    """kernels/NOTES.md, which error messages cite, is package data of fastres.kernels."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = cfg["tool"]["setuptools"].get("package-data", {})
    assert "NOTES.md" in data.get("fastres.kernels", []), data
    assert (ROOT / "kernels" / "NOTES.md").is_file()
