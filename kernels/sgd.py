"""Fused multi-tensor SGD step with the weight EMA and the AMP unscale / inf skip, in Triton.

What one pass does per element, for every parameter of a group (`_sgd_kernels`):

    g   = grad / grad_scale                   (AMP: the GradScaler's scale; optional)
    g   = g + weight_decay * p                (L2 weight decay, exactly torch.optim.SGD's)
    buf = momentum * buf + g                  (momentum buffer; zero-initialised, which
                                               equals torch's `buf = g` first step because
                                               dampening is 0)
    g   = g + momentum * buf  (Nesterov)  or  buf
    p   = p - lr * g
    ema = ema + (1 - ema_decay) * (p - ema)   (weight EMA; optional)
    ... and none of it (no write at all) when `found_inf` is non-zero.

Why it exists: `torch.optim.SGD(fused=True)` covers the first five lines; a trainer with
weight averaging then runs a second multi-tensor pass for the EMA. Here the EMA rides along
while p is in registers: 28 B per fp32 element (read p, g, buf, ema; write p, buf, ema)
against 20 + 12 = 32 B, and one launch per group instead of two sets.

v2 host path (issue 11): per parameter group a cached plan holds the parameter list, the
momentum buffers and EMA tensors, the layout checks, a device table of addresses (param,
grad, buffer, EMA, numel) and the work list, all built once. A step reads the grads
(`[p.grad for p in params]`); when every grad is the same object as last step (grads kept
across steps: `zero_grad(set_to_none=False)`, or a CUDA graph's static memory) nothing
else runs before the launch. When grads were reallocated (`zero_grad(set_to_none=True)`),
their addresses and strides are compared with the table's, and the table is rewritten
(one small host-to-device copy) only if an address moved. lr and momentum may be Python
floats (runtime kernel scalars: a new value each step never recompiles) or 0-d tensors on
the parameters' device (read by the kernel: no `.item()`, no host sync, so the step can be
captured in a CUDA graph and a schedule can update them in place); weight_decay is a float.
One persistent launch per (group, dtype combination): the grid is a few programs per SM
and each program strides over the work list.

Parameters that share memory (the same tensor twice, or overlapping views) are refused at
construction: the kernel updates each tensor independently, so two programs would
read-modify-write the same bytes concurrently on a GPU (a race the CPU interpreter, which
runs programs one after another, would hide; the race check in CI finds it).

Where it runs: CUDA tensors, or CPU tensors under Triton's interpreter (CI); anywhere else
(or with FASTRES_KERNELS=0, or without Triton) the same step runs as `torch._foreach_*` ops
(`fastres.kernels.reference.sgd_ema_reference_step`). `step` is host code (it builds
address tables): call it outside `torch.compile`d regions, or capture it in a CUDA graph --
after one eager step (the first step builds the tables with host-to-device copies, which
a capture does not allow) and with the grads at fixed addresses (the graph pool's), lr and
momentum as device tensors if a schedule changes them.
"""
from __future__ import annotations

import operator
from typing import Iterable, Optional, Sequence

import torch
import torch.optim.optimizer as _optim
from torch import Tensor

from fastres.errors import ConfigError
from fastres.kernels import _env
from fastres.kernels.reference import sgd_ema_reference_step

if _env.HAS_TRITON:
    import triton.language as tl

    from fastres.kernels import _sgd_kernels as _k

    _TL = {torch.float32: tl.float32, torch.float64: tl.float64,
           torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
else:  # pragma: no cover - exercised by the no-Triton subprocess test
    _k = None
    _TL = {}

__all__ = ["FusedSGD", "check_no_shared_memory", "stub_launches"]

_is = operator.is_
_is_contiguous = Tensor.is_contiguous
_data_ptr = Tensor.data_ptr
_get_grad = operator.attrgetter("grad")


stub_launches = _env.stub_launches  # re-exported: `bench-kernels --host`


def _block_and_grid(device: torch.device, n_work: int) -> tuple[int, int, int]:
    """(elements per work item, warps, programs). GPU: 4096 elements and 8 warps (16 per
    thread, 4 x 16 B vectors for fp32), at most 4 programs per SM striding over the work.
    Interpreter: large blocks (each program costs ~ms of Python) and 2 programs, so the
    persistent loop runs in CI too."""
    if device.type == "cuda" and not _env.interpreting():
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return 4096, 8, max(1, min(n_work, 4 * sms))
    return 65536, 1, max(1, min(n_work, 2))


def _extent(t: Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) that `t` can touch."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def check_no_shared_memory(tensors: Sequence[Tensor], names: Sequence[str]) -> None:
    """ConfigError naming the first two of `tensors` whose memory overlaps (the same
    tensor twice, or views whose byte ranges intersect). Disjoint views of one storage are
    fine: no byte is updated twice."""
    spans = []
    for t, name in zip(tensors, names):
        lo, hi = _extent(t)
        if hi > lo:
            spans.append((t.device, lo, hi, name))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise ConfigError(
                f"FusedSGD: {a[3]} and {b[3]} share memory (overlapping byte ranges "
                f"[{a[1]:#x}, {a[2]:#x}) and [{b[1]:#x}, {b[2]:#x})); the fused kernel would "
                f"update those bytes twice, racing on a GPU. Pass each parameter once, as a "
                f"tensor of its own (tied weights: one Parameter, used twice in the model)")


def _kernel_layout_ok(p: Tensor, *others: Optional[Tensor]) -> bool:
    """The kernel walks raw memory, so p and its grad/buffer/EMA must be dense with one
    shared element order (contiguous, or all channels-last like 4-D conv weights after
    `model.to(memory_format=torch.channels_last)`). Anything else takes the foreach path."""
    if not (p.is_contiguous() or (p.dim() == 4
                                  and p.is_contiguous(memory_format=torch.channels_last))):
        return False
    return all(t is None or t.stride() == p.stride() for t in others)


class _Launch:
    """One kernel launch of a group plan: a set of tensors of one dtype combination."""

    __slots__ = ("items", "rows", "table", "table_ptrs", "work_tensor", "work_start",
                 "n_work", "grid", "meta", "has_grad", "device")


class _GroupPlan:
    """Everything a group's step needs that does not change between steps."""

    __slots__ = ("params", "grads", "grad_ptrs", "with_grad", "without_grad", "contig", "cl",
                 "kind", "launches", "fallback", "device")


class FusedSGD(torch.optim.Optimizer):
    """SGD (momentum, Nesterov, L2 weight decay, per-group lr) + weight EMA in one pass.

    Args:
        params: parameters or parameter groups (per-group lr, momentum, nesterov and
            weight_decay as in torch.optim.SGD). Parameters must not share memory
            (ConfigError otherwise).
        lr, momentum: Python floats, or 0-d tensors on the parameters' device that the
            kernel reads (no host sync; update them in place between steps, e.g. from a
            schedule, without rebuilding anything). Also per group.
        nesterov, weight_decay: as `torch.optim.SGD` (weight_decay a float; dampening is
            fixed at 0).
        ema_decay: None for no EMA; otherwise the default decay (float or 0-d device
            tensor) of the EMA of every parameter, updated in the same pass after each
            step (`step(ema_decay=...)` overrides it for one step, e.g. a warm-up ramp;
            a float 1.0 skips the update).
        ema_tensors: optional tensors to hold the EMA, one per parameter in the order of
            `[p for g in param_groups for p in g["params"]]`, same shape, strides and
            device (any float dtype, e.g. fp32 shadows of bf16 weights), not sharing
            memory with the parameters or each other. Without it, the EMA starts as a copy
            of the parameters at construction.

    AMP: `_step_supports_amp_scaling = True`, so `torch.amp.GradScaler.step(opt)` hands the
    scale and the inf flag over (as the `grad_scale` / `found_inf` attributes) instead of
    unscaling the grads in a separate pass; they can also be passed to `step` directly.
    Grads are unscaled in registers only (p.grad keeps the scaled values). When found_inf
    is non-zero, parameters, momentum buffers and EMA are all left untouched, with no host
    sync. State (`momentum_buffer`, `ema`) lives in `self.state[p]`, so `state_dict()`
    checkpoints it; momentum buffers use torch.optim.SGD's key.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, momentum=0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, *, ema_decay=None,
                 ema_tensors: Optional[Iterable[Tensor]] = None):
        for name, value in (("lr", lr), ("momentum", momentum)):
            if isinstance(value, Tensor):
                if value.numel() != 1 or not value.is_floating_point():
                    raise ConfigError(f"FusedSGD: a tensor {name} must be a 0-d float tensor "
                                      f"on the parameters' device, got shape "
                                      f"{tuple(value.shape)} {value.dtype}")
            elif value < 0.0:
                raise ConfigError(f"invalid {'learning rate' if name == 'lr' else name}: "
                                  f"{value}")
        if isinstance(weight_decay, Tensor) or weight_decay < 0.0:
            raise ConfigError(f"invalid weight_decay: {weight_decay!r} (a float >= 0)")
        if nesterov and not isinstance(momentum, Tensor) and momentum <= 0:
            raise ConfigError("Nesterov momentum requires momentum > 0")
        _check_decay(ema_decay)
        defaults = dict(lr=lr, momentum=momentum, dampening=0.0, nesterov=nesterov,
                        weight_decay=weight_decay)
        self._plans: dict = {}
        super().__init__(params, defaults)
        self.ema_decay = ema_decay
        params_all = [p for g in self.param_groups for p in g["params"]]
        check_no_shared_memory(params_all, [f"parameter {i}" for i in range(len(params_all))])
        if ema_decay is None:
            if ema_tensors is not None:
                raise ConfigError("ema_tensors given without ema_decay")
            return
        if ema_tensors is None:
            emas = [p.detach().clone() for p in params_all]
        else:
            emas = list(ema_tensors)
            if len(emas) != len(params_all):
                raise ConfigError(f"ema_tensors has {len(emas)} tensors for "
                                  f"{len(params_all)} parameters")
            for i, (p, e) in enumerate(zip(params_all, emas)):
                if e.shape != p.shape or e.device != p.device or not e.is_floating_point():
                    raise ConfigError(f"ema_tensors[{i}] must be a float tensor of shape "
                                      f"{tuple(p.shape)} on {p.device}, got "
                                      f"{tuple(e.shape)} {e.dtype} on {e.device}")
                if e.stride() != p.stride():
                    raise ConfigError(f"ema_tensors[{i}] must have its parameter's strides "
                                      f"{p.stride()} (same memory format), got {e.stride()}")
            check_no_shared_memory(
                params_all + emas, [f"parameter {i}" for i in range(len(params_all))]
                + [f"ema_tensors[{i}]" for i in range(len(emas))])
        for p, e in zip(params_all, emas):
            self.state[p]["ema"] = e

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plans = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        params_all = [p for g in self.param_groups for p in g["params"]]
        check_no_shared_memory(params_all, [f"parameter {i}" for i in range(len(params_all))])
        if getattr(self, "ema_decay", None) is not None:
            for p in self.param_groups[-1]["params"]:
                self.state[p].setdefault("ema", p.detach().clone())
        self._plans = {}

    def load_state_dict(self, state_dict: dict) -> None:
        # External EMA tensors and device-scalar hyper-parameters (a schedule may hold and
        # write them) keep their identity: the loaded values are copied into them.
        external = {p: self.state[p]["ema"] for g in self.param_groups for p in g["params"]
                    if "ema" in self.state.get(p, {})}
        scalars = [{k: g[k] for k in ("lr", "momentum") if isinstance(g.get(k), Tensor)}
                   for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, held in zip(self.param_groups, scalars):
            for key, tensor in held.items():
                loaded = group[key]
                if loaded is not tensor:
                    with torch.no_grad():
                        tensor.copy_(torch.as_tensor(loaded, dtype=tensor.dtype))
                    group[key] = tensor
        for p, e in external.items():
            loaded = self.state[p].get("ema")
            if loaded is not None and loaded is not e:
                e.copy_(loaded)
                self.state[p]["ema"] = e
        self._plans = {}

    def ema_params(self) -> list[Tensor]:
        """The EMA tensors, in the order of `[p for g in param_groups for p in g["params"]]`."""
        if self.ema_decay is None:
            raise RuntimeError("this FusedSGD keeps no EMA (ema_decay=None)")
        return [self.state[p]["ema"] for g in self.param_groups for p in g["params"]]

    def step(self, closure=None, *, ema_decay=None, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None):
        """One step for every group. `grad_scale` / `found_inf` default to the attributes
        that GradScaler sets; `ema_decay` (float or 0-d device tensor) overrides the
        constructor's for this step.

        torch.optim wraps every optimizer's step in a profiler label and the step-hook
        loop (~10 µs); here that wrapper runs only when a hook is registered or the
        profiler is on, so the common step costs the kernel launches and little else."""
        if (_optim._global_optimizer_pre_hooks or _optim._global_optimizer_post_hooks
                or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _profiler_enabled()):
            return _hooked_step(self, closure, ema_decay=ema_decay, grad_scale=grad_scale,
                                found_inf=found_inf)
        return self._step(closure, ema_decay=ema_decay, grad_scale=grad_scale,
                          found_inf=found_inf)

    step.hooked = True  # tells torch.optim not to wrap it (see above)

    def _step(self, closure=None, *, ema_decay=None, grad_scale: Optional[Tensor] = None,
              found_inf: Optional[Tensor] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        decay = None
        if self.ema_decay is not None:
            decay = self.ema_decay if ema_decay is None else ema_decay
            if not isinstance(decay, Tensor):
                decay = float(decay)
                if decay == 1.0:
                    decay = None  # the EMA does not move: skip its bytes
            if decay is not None:
                _check_decay(decay)
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, decay, grad_scale, found_inf)
        return loss

    # ---------------------------------------------------------------------------- internals

    def _step_group(self, gi: int, group: dict, decay, grad_scale: Optional[Tensor],
                    found_inf: Optional[Tensor]) -> None:
        lr = group["lr"]
        momentum = group["momentum"]
        wd = group["weight_decay"]
        params = group["params"]
        kind = (type(lr) is Tensor, type(momentum) is Tensor or momentum != 0,
                type(momentum) is Tensor, bool(group["nesterov"]), wd != 0,
                decay is not None, type(decay) is Tensor, group.get("dampening", 0.0),
                bool(params) and (_env.stubbed() or _env.use_triton(params[0].device)))
        plan = self._plans.get(gi)
        grads = list(map(_get_grad, params))
        if plan is None or plan.kind != kind or len(plan.grads) != len(grads) \
                or not all(map(_is, grads, plan.grads)):
            if plan is None or plan.kind != kind or not self._grads_still_fit(plan, grads):
                plan = self._plans[gi] = self._build(group, grads, kind)
            plan.grads = grads
        device = plan.device
        if grad_scale is not None and grad_scale.device != device:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        lr_f = 0.0 if kind[0] else float(lr)
        mom_f = 0.0 if kind[2] else float(momentum)
        alpha = 0.0 if decay is None or kind[6] else 1.0 - float(decay)
        for launch in plan.launches:
            dummy = launch.table
            _env.launch(_k.sgd_ema_kernel, launch.grid, launch.work_tensor, launch.work_start,
                        launch.table, len(launch.items), launch.n_work,
                        grad_scale if grad_scale is not None else dummy,
                        found_inf if found_inf is not None else dummy,
                        lr if kind[0] else dummy, momentum if kind[2] else dummy,
                        decay if kind[6] else dummy, lr_f, mom_f, float(wd), alpha,
                        HAS_SCALE=grad_scale is not None and launch.has_grad,
                        HAS_FOUND_INF=found_inf is not None, **launch.meta)
        if plan.fallback:
            with torch.no_grad():
                self._fallback_step(plan, group, decay, grad_scale, found_inf)

    def _grads_still_fit(self, plan: _GroupPlan, grads: list) -> bool:
        """Grads were replaced (new objects, e.g. after zero_grad(set_to_none=True)): do the
        new ones fit the plan? They have their parameters' shapes, dtypes and devices
        (torch's grad setter and autograd enforce those), so the layout is the one thing to
        check -- contiguous (or channels-last) like the grads the plan was built from,
        which with equal shapes means the same element order -- and then only the
        addresses may have moved: the grad row of each table is rewritten (one small
        copy) if one did. Costs ~0.1 µs per grad (C-level map calls, no per-grad Python)."""
        if len(grads) != len(plan.grads) or plan.contig is None:
            return False
        try:
            if plan.without_grad:
                present = [grads[i] for i in plan.with_grad]
            else:
                present = grads
            contig = present if not plan.cl else [grads[i] for i in plan.contig]
            if not (all(map(_is_contiguous, contig)) and
                    all(grads[i].is_contiguous(memory_format=torch.channels_last)
                        for i in plan.cl)):
                return False
            ptrs = list(map(_data_ptr, present))
        except (TypeError, RuntimeError, AttributeError):  # a None or a sparse grad
            return False
        if any(grads[i] is not None for i in plan.without_grad):
            return False
        if ptrs != plan.grad_ptrs:
            plan.grad_ptrs = ptrs
            full = [0] * len(grads)
            for i, a in zip(plan.with_grad, ptrs):
                full[i] = a
            for launch in plan.launches:
                if launch.has_grad:
                    _write_table(launch, [full[r] for r in launch.rows])
        return True

    def _build(self, group: dict, grads: list, kind: tuple) -> _GroupPlan:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        lr_dev, has_momentum, mom_dev, nesterov, has_wd, has_ema, ema_dev, dampening, kern = kind
        if dampening != 0.0:
            raise ConfigError("FusedSGD supports dampening=0 only")
        params = list(group["params"])
        plan = _GroupPlan()
        plan.kind = kind
        plan.params = params
        plan.grads = grads
        plan.device = params[0].device if params else torch.device("cpu")
        for name, value in (("lr", lr if lr_dev else None),
                            ("momentum", momentum if mom_dev else None)):
            if value is not None and (value.device != plan.device or value.numel() != 1):
                raise ConfigError(f"FusedSGD: the tensor {name} must be a 0-d tensor on the "
                                  f"parameters' device {plan.device}, got shape "
                                  f"{tuple(value.shape)} on {value.device}")
        plan.with_grad = [i for i, g in enumerate(grads) if g is not None]
        plan.without_grad = [i for i, g in enumerate(grads) if g is None]
        plan.grad_ptrs = [grads[i].data_ptr() for i in plan.with_grad]
        plan.contig = [i for i in plan.with_grad if grads[i].is_contiguous()]
        plan.cl = [i for i in plan.with_grad if not grads[i].is_contiguous()
                   and grads[i].dim() == 4
                   and grads[i].is_contiguous(memory_format=torch.channels_last)]
        if len(plan.contig) + len(plan.cl) != len(plan.with_grad):
            plan.contig = None  # an odd layout: every new grad object rebuilds the plan
        buckets: dict = {}
        plan.fallback = []
        for i, (p, g) in enumerate(zip(params, grads)):
            state = self.state[p]
            ema = state.get("ema") if has_ema else None
            if g is None:
                if ema is None:
                    continue
                buf = None
            else:
                if g.is_sparse:
                    raise ConfigError("FusedSGD does not support sparse gradients")
                buf = None
                if has_momentum:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        # Zeros, not torch's clone(grad): with dampening 0 the first update
                        # momentum * 0 + g gives exactly g, and a first step skipped by
                        # found_inf leaves a valid (zero) buffer behind.
                        buf = state["momentum_buffer"] = torch.zeros_like(p)
            item = (i, p, g, buf, ema)
            if not (kern and p.device == plan.device
                    and _kernel_layout_ok(p, g, buf, ema) and p.dtype in _TL
                    and (g is None or g.dtype in _TL) and (ema is None or ema.dtype in _TL)):
                plan.fallback.append(item)
                continue
            key = (p.dtype, g.dtype if g is not None else None,
                   ema.dtype if ema is not None else None, g is not None)
            buckets.setdefault(key, []).append(item)
        plan.launches = [self._make_launch(key, items, kind, plan.device)
                         for key, items in buckets.items()]
        return plan

    def _make_launch(self, key, items, kind, device) -> _Launch:
        p_dtype, g_dtype, e_dtype, has_grad = key
        lr_dev, has_momentum, mom_dev, nesterov, has_wd, has_ema, ema_dev, _, _ = kind
        launch = _Launch()
        launch.items = items
        launch.rows = [it[0] for it in items]
        launch.has_grad = has_grad
        launch.device = device
        sizes = [it[1].numel() for it in items]
        block = _block_and_grid(device, 1)[0]
        block, warps, programs = _block_and_grid(device, sum(_cdiv(n, block) for n in sizes))
        tensor_ids, starts = [], []
        for t, n in enumerate(sizes):
            for s in range(0, n, block):
                tensor_ids.append(t)
                starts.append(s)
        launch.work_tensor = torch.tensor(tensor_ids, dtype=torch.int32, device=device)
        launch.work_start = torch.tensor(starts, dtype=torch.int64, device=device)
        launch.n_work = len(tensor_ids)
        launch.grid = (max(1, min(launch.n_work, programs)),)
        rows = [[it[r].data_ptr() if it[r] is not None else 0 for it in items]
                for r in (1, 2, 3, 4)]
        launch.table = torch.tensor(rows + [sizes], dtype=torch.int64, device=device)
        aligned = all(a % 16 == 0 for row in rows for a in row)
        has_m = has_grad and has_momentum
        launch.meta = dict(
            P_DTYPE=_TL[p_dtype], G_DTYPE=_TL[g_dtype or p_dtype],
            E_DTYPE=_TL[e_dtype or p_dtype], HAS_GRAD=has_grad, HAS_MOMENTUM=has_m,
            NESTEROV=nesterov and has_m, HAS_WD=has_grad and has_wd, HAS_EMA=has_ema,
            LR_ON_DEVICE=lr_dev and has_grad, MOMENTUM_ON_DEVICE=mom_dev and has_m,
            EMA_ON_DEVICE=ema_dev and has_ema, ALIGNED=aligned, BLOCK=block, num_warps=warps)
        return launch

    def _fallback_step(self, plan, group, decay, grad_scale, found_inf) -> None:
        """The foreach reference for tensors the kernel does not take (layout, device, no
        Triton): one call per (has grad) set."""
        lr, momentum = group["lr"], group["momentum"]
        if isinstance(lr, Tensor) or isinstance(momentum, Tensor) or isinstance(decay, Tensor):
            # The reference takes floats: a host read, on the fallback path only.
            lr = float(lr)
            momentum = float(momentum)
            decay = float(decay) if decay is not None else None
        for has_grad in (True, False):
            items = [it for it in plan.fallback if (it[2] is not None) == has_grad]
            if not items:
                continue
            sgd_ema_reference_step(
                [it[1] for it in items], [it[2] for it in items] if has_grad else [],
                [it[3] for it in items] if has_grad and momentum != 0 else None,
                [it[4] for it in items] if decay is not None else None,
                lr=lr, momentum=momentum, nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], ema_decay=decay,
                grad_scale=grad_scale, found_inf=found_inf)


_hooked_step = torch.optim.Optimizer.profile_hook_step(FusedSGD._step)
_profiler_enabled = torch._C._autograd._profiler_enabled


def _write_table(launch: _Launch, grad_ptrs: list) -> None:
    """Rewrite the grad row of a launch's address table (grads were reallocated)."""
    row = torch.tensor(grad_ptrs, dtype=torch.int64)
    launch.table[1].copy_(row, non_blocking=False)
    if any(a % 16 for a in grad_ptrs) and launch.meta["ALIGNED"]:
        launch.meta = dict(launch.meta, ALIGNED=False)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_decay(decay) -> None:
    if decay is None:
        return
    if isinstance(decay, Tensor):
        if decay.numel() != 1 or not decay.is_floating_point():
            raise ConfigError(f"ema_decay as a tensor must be a 0-d float tensor, got shape "
                              f"{tuple(decay.shape)} {decay.dtype}")
        return
    if not 0.0 <= decay <= 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1], got {decay}")
