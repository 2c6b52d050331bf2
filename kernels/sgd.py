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

Host path (issue 11, v3 in issue 21): per parameter group a cached plan holds the device
tables of addresses (param, grad, buffer, EMA, numel) and the work list. Each step checks,
cheaply (C-level map calls, ~0.06 us a tensor), that nothing the tables point at moved --
the same parameter objects, the same parameter, momentum-buffer and EMA addresses
(`p.data = ...`, `model.to`, `.half()`, a re-init), no state entry replaced -- and rebuilds
the plan if anything did: the kernel never writes old storage. Gradients may be new
tensors every step (`zero_grad(set_to_none=True)`): their layout is checked and, only when
an address moved, the tables' grad rows are rewritten with an asynchronous copy from
pinned memory (no host sync; see `_upload`). lr and momentum may be Python floats
(runtime kernel scalars: a new value each step never recompiles) or 0-d tensors on the
parameters' device (read by the kernel: no `.item()`, no host sync, so a schedule can
update them in place); weight_decay is a float. One persistent launch per (group, dtype
combination): the grid is a few programs per SM and each program strides over the work
list. The tensors the kernel does not take run the foreach reference in the same step,
reading their gradients, buffers and EMA at that step.

Parameters that share memory (the same tensor twice, or overlapping views) are refused at
construction: the kernel updates each tensor independently, so two programs would
read-modify-write the same bytes concurrently on a GPU (a race the CPU interpreter, which
runs programs one after another, would hide; the race check in CI finds it).

Where it runs: CUDA tensors, or CPU tensors under Triton's interpreter (CI); anywhere else
(or with FASTRES_KERNELS=0, or without Triton) the same step runs as `torch._foreach_*` ops
(`fastres.kernels.reference.sgd_ema_reference_step`), as do fp64 tensors and layouts the
kernel does not take. `step` is host code: call it outside `torch.compile`d regions, or
capture it in a CUDA graph after one eager step (a step that must build tables cannot be
captured: ConfigError), lr and momentum as device tensors if a schedule changes them.
"""
from __future__ import annotations

import collections
import operator
from typing import Iterable, Optional, Sequence

import torch
import torch.optim.optimizer as _optim
from torch import Tensor

from fastres._compat import profiler_enabled
from fastres.errors import ConfigError
from fastres.kernels import _env
from fastres.kernels.reference import sgd_ema_reference_step

if _env.HAS_TRITON:
    import triton.language as tl

    from fastres.kernels import _sgd_kernels as _k

    # No fp64: the kernel computes in fp32, so fp64 tensors take the (exact) reference.
    _TL = {torch.float32: tl.float32, torch.float16: tl.float16,
           torch.bfloat16: tl.bfloat16}
else:  # pragma: no cover - exercised by the no-Triton subprocess test
    _k = None
    _TL = {}

__all__ = ["FusedSGD", "check_no_shared_memory", "stub_launches"]

_is = operator.is_
_is_contiguous = Tensor.is_contiguous
_data_ptr = Tensor.data_ptr
_get_grad = operator.attrgetter("grad")
_CL = torch.channels_last


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


class _ParamState(dict):
    """One parameter's optimizer state: a dict (as torch.optim keeps it) that counts writes.

    The cached address tables hold the momentum buffer and EMA tensors; a pointer check
    sees them move (`buf.data = ...`) but not being replaced by other tensors
    (`opt.state[p]["momentum_buffer"] = buf.to(...)`, the usual "move the optimizer" idiom).
    Counting writes makes replacement visible for one integer compare per step. Copies and
    pickles are plain dicts (`__reduce__`), so checkpoints never name this class."""

    __slots__ = ("writes",)

    def __init__(self, writes: list, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes = writes

    def _bump(self) -> None:
        self.writes[0] += 1

    def __setitem__(self, key, value):
        self._bump()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._bump()
        super().__delitem__(key)

    def pop(self, *args):
        self._bump()
        return super().pop(*args)

    def popitem(self):
        self._bump()
        return super().popitem()

    def clear(self):
        self._bump()
        super().clear()

    def update(self, *args, **kwargs):
        self._bump()
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        if key not in self:
            self._bump()
        return super().setdefault(key, default)

    def __reduce__(self):
        return dict, (dict(self),)


class _State(collections.defaultdict):
    """`optimizer.state` (a defaultdict of per-parameter dicts, as torch.optim's) whose
    per-parameter dicts count writes (`_ParamState`); replacing a whole entry counts too."""

    def __init__(self, writes: list, items=()):
        super().__init__(None)
        self.writes = writes
        for key, value in dict(items).items():
            super().__setitem__(key, _ParamState(writes, value))

    def __missing__(self, key):
        value = _ParamState(self.writes)
        super().__setitem__(key, value)
        return value

    def __setitem__(self, key, value):
        self.writes[0] += 1
        if not isinstance(value, _ParamState):
            value = _ParamState(self.writes, value)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.writes[0] += 1
        super().__delitem__(key)

    def pop(self, *args):
        self.writes[0] += 1
        return super().pop(*args)

    def clear(self):
        self.writes[0] += 1
        super().clear()

    def __reduce__(self):
        return collections.defaultdict, (dict,), None, None, (
            (k, dict(v)) for k, v in self.items())


class _Launch:
    """One kernel launch of a group plan: the tensors of one dtype combination. Holds
    device tables and addresses only -- no tensor -- so it keeps nothing alive."""

    __slots__ = ("rows", "table", "grad_row", "work_tensor", "work_start", "n_work", "grid",
                 "meta", "has_grad")


class _GroupPlan:
    """What a group's step needs that does not change between steps, and what tells the
    step that it did change: the parameter objects, every table address (param, momentum
    buffer, EMA) and the state's write count; the gradients' addresses and layout."""

    __slots__ = ("kind", "params", "param_objs", "watched", "watched_ptrs", "state_writes",
                 "with_grad", "without_grad", "grad_ptrs", "contig", "cl", "launches",
                 "fallback", "device", "rewrite_always", "keep")


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
        maximize: accepted for torch.optim.SGD's signature; only False (the default) is
            implemented: True raises ConfigError here and in a group at `step`.
        ema_decay: None for no EMA; otherwise the default decay (float or 0-d device
            tensor) of the EMA of every parameter, updated in the same pass after each
            step (`step(ema_decay=...)` overrides it for one step, e.g. a warm-up ramp;
            a float 1.0 skips the update).
        ema_tensors: optional tensors to hold the EMA, one per parameter in the order of
            `[p for g in param_groups for p in g["params"]]`, same shape, strides and
            device (any float dtype, e.g. fp32 shadows of bf16 weights), not sharing
            memory with the parameters or each other. Without it, the EMA starts as a copy
            of the parameters at construction.

    Which tensors the kernel takes: fp32/bf16/fp16 parameters, gradients and EMA, dense
    (contiguous or channels-last) with one element order per parameter. fp64 parameters
    (or EMA) and other layouts take the foreach reference, exact in their own dtype, in the
    same step (the kernel computes in fp32 and would round fp64 silently).

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
                 weight_decay: float = 0.0, *, maximize: bool = False, ema_decay=None,
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
        _check_maximize(maximize)
        _check_decay(ema_decay)
        defaults = dict(lr=lr, momentum=momentum, dampening=0.0, nesterov=nesterov,
                        weight_decay=weight_decay, maximize=False)
        self._plans: dict = {}
        super().__init__(params, defaults)
        self._state_writes = [0]
        self.state = _State(self._state_writes, self.state)
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
        super().__setstate__(state)  # also what load_state_dict calls, with a plain state
        if not hasattr(self, "_state_writes"):
            self._state_writes = [0]
        if not isinstance(self.state, _State):
            self.state = _State(self._state_writes, self.state)
        self._plans = {}

    def add_param_group(self, param_group: dict) -> None:
        _check_maximize(param_group.get("maximize", False))
        super().add_param_group(param_group)
        params_all = [p for g in self.param_groups for p in g["params"]]
        check_no_shared_memory(params_all, [f"parameter {i}" for i in range(len(params_all))])
        if getattr(self, "ema_decay", None) is not None:
            for p in self.param_groups[-1]["params"]:
                self.state[p].setdefault("ema", p.detach().clone())
        self._plans = {}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}  # plain dicts on disk
        return sd

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
        groups = self.param_groups
        if len(self._plans) > len(groups):  # groups were removed: drop their plans
            self._plans = {gi: plan for gi, plan in self._plans.items() if gi < len(groups)}
        for gi, group in enumerate(groups):
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
                group.get("maximize", False),
                bool(params) and (_env.stubbed() or _env.use_triton(params[0].device)))
        plan = self._plans.get(gi)
        grads = list(map(_get_grad, params))
        if plan is None or plan.kind != kind or not self._still_valid(plan, params, grads):
            plan = self._plans[gi] = self._build(group, grads, kind)
        device = plan.device
        if grad_scale is not None and grad_scale.device != device:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        if plan.launches:
            lr_f = 0.0 if kind[0] else float(lr)
            mom_f = 0.0 if kind[2] else float(momentum)
            alpha = 0.0 if decay is None or kind[6] else 1.0 - float(decay)
            for launch in plan.launches:
                dummy = launch.table
                _env.launch(_k.sgd_ema_kernel, launch.grid, launch.work_tensor,
                            launch.work_start, launch.table, len(launch.rows), launch.n_work,
                            grad_scale if grad_scale is not None else dummy,
                            found_inf if found_inf is not None else dummy,
                            lr if kind[0] else dummy, momentum if kind[2] else dummy,
                            decay if kind[6] else dummy, lr_f, mom_f, float(wd), alpha,
                            HAS_SCALE=grad_scale is not None and launch.has_grad,
                            HAS_FOUND_INF=found_inf is not None, **launch.meta)
        if plan.fallback:
            with torch.no_grad():
                self._fallback_step(plan, group, decay, grad_scale, found_inf)

    def _still_valid(self, plan: _GroupPlan, params: list, grads: list) -> bool:
        """Whether the cached tables still describe this step (else the plan is rebuilt).

        Every step, ~0.1 µs per tensor, C-level map calls: the group holds the same
        parameter objects; no parameter, momentum buffer or EMA tensor moved (`p.data =
        ...`, `model.to(...)`, `.half()`, a re-init: the table would point at the old,
        possibly freed, storage) or was replaced in `state` (the write count); the gradients
        are present where the plan has them and laid out as it expects (contiguous, or
        channels-last like their parameters). Then only gradient addresses may differ --
        new tensors every step after zero_grad(set_to_none=True) -- and the grad rows are
        rewritten, asynchronously, when one moved (`_write_grad_rows`)."""
        if (params is not plan.params or len(params) != len(plan.param_objs)
                or plan.state_writes != self._state_writes[0]
                or not all(map(_is, params, plan.param_objs))
                or list(map(_data_ptr, plan.watched)) != plan.watched_ptrs
                or plan.contig is None):
            return False
        try:
            present = [grads[i] for i in plan.with_grad] if plan.without_grad else grads
            contig = [grads[i] for i in plan.contig] if plan.cl else present
            if not all(map(_is_contiguous, contig)) or not all(
                    grads[i].is_contiguous(memory_format=_CL) for i in plan.cl):
                return False
            ptrs = list(map(_data_ptr, present))
        except (TypeError, RuntimeError, AttributeError):  # a None or a sparse grad
            return False
        if plan.without_grad and any(grads[i] is not None for i in plan.without_grad):
            return False
        if ptrs != plan.grad_ptrs or plan.rewrite_always:
            _write_grad_rows(plan, ptrs)
        return True

    def _build(self, group: dict, grads: list, kind: tuple) -> _GroupPlan:
        lr, momentum = group["lr"], group["momentum"]
        (lr_dev, has_momentum, mom_dev, nesterov, has_wd, has_ema, ema_dev, dampening,
         maximize, kern) = kind
        _check_maximize(maximize)
        if dampening != 0.0:
            raise ConfigError("FusedSGD supports dampening=0 only")
        params = group["params"]
        plan = _GroupPlan()
        plan.kind = kind
        plan.params = params
        plan.param_objs = list(params)
        plan.device = params[0].device if params else torch.device("cpu")
        plan.rewrite_always = False
        plan.keep = []
        if kern and _capturing(plan.device):
            raise ConfigError(
                "FusedSGD: this step must build its address tables (the first step, or the "
                "first after a parameter, momentum buffer or EMA tensor moved), which "
                "cannot be captured in a CUDA graph; run one step eagerly before capturing")
        for name, value in (("lr", lr if lr_dev else None),
                            ("momentum", momentum if mom_dev else None)):
            if value is not None and (value.device != plan.device or value.numel() != 1):
                raise ConfigError(f"FusedSGD: the tensor {name} must be a 0-d tensor on the "
                                  f"parameters' device {plan.device}, got shape "
                                  f"{tuple(value.shape)} on {value.device}")
        plan.with_grad = [i for i, g in enumerate(grads) if g is not None]
        plan.without_grad = [i for i, g in enumerate(grads) if g is None]
        plan.contig = [i for i in plan.with_grad if grads[i].is_contiguous()]
        plan.cl = [i for i in plan.with_grad if not grads[i].is_contiguous()
                   and grads[i].dim() == 4 and grads[i].is_contiguous(memory_format=_CL)]
        if len(plan.contig) + len(plan.cl) != len(plan.with_grad):
            plan.contig = None  # an odd layout: every step rebuilds the plan
        buckets: dict = {}
        plan.fallback = []
        watched = []
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
                        # (not counted as a state write: no other plan holds this
                        # parameter, and this one reads the new buffer below)
                        buf = torch.zeros_like(p)
                        dict.__setitem__(state, "momentum_buffer", buf)
            if not (kern and p.device == plan.device
                    and _kernel_layout_ok(p, g, buf, ema) and p.dtype in _TL
                    and (g is None or g.dtype in _TL) and (ema is None or ema.dtype in _TL)
                    and (buf is None or buf.dtype == p.dtype)):
                plan.fallback.append(i)
                continue
            watched += [t for t in (p, buf, ema) if t is not None]
            key = (p.dtype, g.dtype if g is not None else None,
                   ema.dtype if ema is not None else None, g is not None)
            buckets.setdefault(key, []).append((i, p, g, buf, ema))
        plan.watched = watched
        plan.watched_ptrs = list(map(_data_ptr, watched))
        plan.grad_ptrs = [grads[i].data_ptr() for i in plan.with_grad]
        plan.launches = [_make_launch(key, items, kind, plan.device)
                         for key, items in buckets.items()]
        plan.state_writes = self._state_writes[0]
        return plan

    def _fallback_step(self, plan, group, decay, grad_scale, found_inf) -> None:
        """The foreach reference for the tensors the kernel does not take (layout, dtype,
        device, no Triton, the kill switch): gradients, buffers and EMA read now, as
        torch.optim.SGD does, so new gradient tensors every step are the ones applied."""
        lr, momentum = group["lr"], group["momentum"]
        if isinstance(lr, Tensor) or isinstance(momentum, Tensor) or isinstance(decay, Tensor):
            # The reference takes floats: a host read, on the fallback path only.
            lr = float(lr)
            momentum = float(momentum)
            decay = float(decay) if decay is not None else None
        params = plan.params
        for has_grad in (True, False):
            ps = [params[i] for i in plan.fallback if (params[i].grad is not None) == has_grad]
            if not ps:
                continue
            states = [self.state[p] for p in ps]
            sgd_ema_reference_step(
                ps, [p.grad for p in ps] if has_grad else [],
                [s["momentum_buffer"] for s in states] if has_grad and momentum != 0 else None,
                [s["ema"] for s in states] if decay is not None else None,
                lr=lr, momentum=momentum, nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], ema_decay=decay,
                grad_scale=grad_scale, found_inf=found_inf)


_hooked_step = torch.optim.Optimizer.profile_hook_step(FusedSGD._step)
_profiler_enabled = profiler_enabled


def _make_launch(key, items, kind, device) -> _Launch:
    p_dtype, g_dtype, e_dtype, has_grad = key
    lr_dev, has_momentum, mom_dev, nesterov, has_wd, has_ema, ema_dev, _, _, _ = kind
    launch = _Launch()
    launch.rows = [it[0] for it in items]
    launch.has_grad = has_grad
    sizes = [it[1].numel() for it in items]
    block = _block_and_grid(device, 1)[0]
    block, warps, programs = _block_and_grid(device, sum(_cdiv(n, block) for n in sizes))
    tensor_ids, starts = [], []
    for t, n in enumerate(sizes):
        for s in range(0, n, block):
            tensor_ids.append(t)
            starts.append(s)
    launch.work_tensor = _to_device(tensor_ids, torch.int32, device)
    launch.work_start = _to_device(starts, torch.int64, device)
    launch.n_work = len(tensor_ids)
    launch.grid = (max(1, min(launch.n_work, programs)),)
    rows = [[it[r].data_ptr() if it[r] is not None else 0 for it in items]
            for r in (1, 2, 3, 4)]
    launch.table = _to_device([a for row in rows + [sizes] for a in row], torch.int64,
                              device).view(5, len(items))
    launch.grad_row = launch.table[1]
    aligned = all(a % 16 == 0 for row in rows for a in row)
    has_m = has_grad and has_momentum
    launch.meta = dict(
        P_DTYPE=_TL[p_dtype], G_DTYPE=_TL[g_dtype or p_dtype],
        E_DTYPE=_TL[e_dtype or p_dtype], HAS_GRAD=has_grad, HAS_MOMENTUM=has_m,
        NESTEROV=nesterov and has_m, HAS_WD=has_grad and has_wd, HAS_EMA=has_ema,
        LR_ON_DEVICE=lr_dev and has_grad, MOMENTUM_ON_DEVICE=mom_dev and has_m,
        EMA_ON_DEVICE=ema_dev and has_ema, ALIGNED=aligned, BLOCK=block, num_warps=warps)
    return launch


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _upload(dst: Tensor, values: list) -> Tensor:
    """Copy host integers into `dst` without a host sync; returns the host staging tensor.

    On a GPU the staging tensor is pinned and the copy asynchronous: a copy from pageable
    memory would wait for the stream (a host sync per step). torch's caching host allocator
    is the ring of staging buffers: `copy_(non_blocking=True)` records an event on the
    pinned block, which is not handed out again until that copy has run (see
    ATen/cuda/CachingHostAllocator.h), so a later step cannot overwrite pointers a queued
    kernel has yet to read. On the CPU (the interpreter) the copy is a plain one."""
    src = torch.tensor(values, dtype=dst.dtype, pin_memory=dst.is_cuda)
    dst.copy_(src, non_blocking=True)
    return src


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(len(values), dtype=dtype, device=device)
    _upload(out, values)
    return out


def _write_grad_rows(plan: _GroupPlan, ptrs: list) -> None:
    """New gradient addresses: rewrite each launch's grad row (asynchronously, `_upload`).
    Inside a CUDA-graph capture the copy is captured too: its staging tensor is kept for
    the graph's life, and every later eager step rewrites the rows, since a replay may
    have written the captured addresses back."""
    full = [0] * len(plan.param_objs)
    for i, a in zip(plan.with_grad, ptrs):
        full[i] = a
    capturing = _capturing(plan.device)
    for launch in plan.launches:
        if not launch.has_grad:
            continue
        row = [full[r] for r in launch.rows]
        staging = _upload(launch.grad_row, row)
        if capturing:
            plan.keep.append(staging)
            plan.rewrite_always = True
        if launch.meta["ALIGNED"] and any(a % 16 for a in row):
            launch.meta = dict(launch.meta, ALIGNED=False)
    plan.grad_ptrs = ptrs


def _check_maximize(maximize) -> None:
    if maximize:
        raise ConfigError("FusedSGD does not implement maximize=True; minimise the negated "
                          "objective instead, or use torch.optim.SGD(maximize=True)")


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
