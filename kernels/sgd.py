"""Fused multi-tensor SGD step with the weight EMA and the AMP unscale / inf skip, in Triton.

What one pass does per element, for every parameter of a group (kernel `_sgd_ema_kernel`):

    g   = grad / grad_scale                   (AMP: the GradScaler's scale; optional)
    g   = g + weight_decay * p                (L2 weight decay, exactly torch.optim.SGD's)
    buf = momentum * buf + g                  (momentum buffer; zero-initialised, which
                                               equals torch's `buf = g` first step because
                                               dampening is 0)
    g   = g + momentum * buf  (Nesterov)  or  buf
    p   = p - lr * g
    ema = ema + (1 - ema_decay) * (p - ema)   (weight EMA; optional)
    ... and none of it (no write at all) when `found_inf` is non-zero.

Why it exists: `torch.optim.SGD(fused=True)` covers the first five lines. A trainer with
weight averaging then runs a second multi-tensor pass for the EMA (reading p again and
ema, writing ema: ~12 B/element in fp32) and more launches. Here the EMA rides along while
p is in registers. Bytes per element (fp32): read p, g, buf, ema + write p, buf, ema =
28 B, against 20 B (fused SGD) + 12 B (foreach EMA) = 32 B and two sets of launches.

Packing: one launch per (param group, param dtype, grad dtype, EMA dtype) -- usually one
per group. The host builds a small int64 table of addresses (param, grad, momentum buffer,
EMA) and element counts, and a work list of (tensor index, block start) pairs, one per
program; the kernel loads its tensor's addresses from the table and casts them to
pointers. The work list depends only on the tensors' sizes and is cached; the address
table is rebuilt (one small host-to-device copy) only when an address changes, e.g. when
`zero_grad(set_to_none=True)` frees the grads and the allocator hands back different
memory. The alternative -- flattening parameters into one buffer -- would change what
the model's parameters are (views of an arena), which DDP, checkpoints and user code
would all notice. Hyper-parameters (lr, momentum, weight decay, EMA decay) are runtime
fp32 scalars, so a schedule that changes lr every step never recompiles.

Where it runs: CUDA tensors, or CPU tensors under Triton's interpreter (CI); anywhere else
(or with FASTRES_KERNELS=0) the same step runs as `torch._foreach_*` ops
(`fastres.kernels.reference.sgd_ema_reference_step`).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastres.kernels import _env
from fastres.kernels.reference import sgd_ema_reference_step

__all__ = ["FusedSGD"]

_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
              torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    if MASKED:
        value = tl.load(ptrs, mask=mask, other=0.0)
    else:
        value = tl.load(ptrs)
    return value.to(tl.float32)


@triton.jit
def _store(ptrs, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def _sgd_ema_block(p_ptr, g_ptr, b_ptr, e_ptr, offs, mask, GRAD_SCALE, lr, momentum,
                   weight_decay, ema_alpha, P_DTYPE: tl.constexpr, E_DTYPE: tl.constexpr,
                   HAS_GRAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, HAS_WD: tl.constexpr, HAS_EMA: tl.constexpr,
                   HAS_SCALE: tl.constexpr, MASKED: tl.constexpr):
    """The update of one block; MASKED=False for whole blocks, whose loads can then be
    16-byte vectors (a mask built from a runtime element count defeats vectorisation)."""
    p = _load(p_ptr + offs, mask, MASKED)
    if HAS_GRAD:
        g = _load(g_ptr + offs, mask, MASKED)
        if HAS_SCALE:
            g = g / tl.load(GRAD_SCALE).to(tl.float32)
        if HAS_WD:
            g = g + weight_decay * p
        if HAS_MOMENTUM:
            buf = momentum * _load(b_ptr + offs, mask, MASKED) + g
            buf = buf.to(P_DTYPE)  # stored at the parameter's precision, as torch does
            _store(b_ptr + offs, buf, mask, MASKED)
            if NESTEROV:
                g = g + momentum * buf.to(tl.float32)
            else:
                g = buf.to(tl.float32)
        p = (p - lr * g).to(P_DTYPE)
        _store(p_ptr + offs, p, mask, MASKED)
        p = p.to(tl.float32)  # the EMA averages the stored (rounded) parameter
    if HAS_EMA:
        e = _load(e_ptr + offs, mask, MASKED)
        e = e + ema_alpha * (p - e)
        _store(e_ptr + offs, e.to(E_DTYPE), mask, MASKED)


@triton.jit
def _sgd_ema_kernel(
    WORK_TENSOR,    # *int32 [n_programs]: index of the tensor this program updates
    WORK_START,     # *int64 [n_programs]: first element (of that tensor) of this program's block
    TABLE,          # *int64 [5, T]: addresses of param, grad, momentum buffer, EMA; numel
    T,              # number of tensors in this launch (row stride of TABLE)
    GRAD_SCALE,     # *fp32 [1]: AMP loss scale to divide grads by (read only if HAS_SCALE)
    FOUND_INF,      # *fp32 [1]: non-zero -> skip the whole step (read only if HAS_FOUND_INF)
    lr,             # runtime fp32: learning rate (changes every step without recompiling)
    momentum,       # runtime fp32: momentum factor
    weight_decay,   # runtime fp32: L2 coefficient added to the gradient
    ema_alpha,      # runtime fp32: 1 - ema_decay
    P_DTYPE: tl.constexpr,        # parameter (and momentum buffer) element type
    G_DTYPE: tl.constexpr,        # gradient element type
    E_DTYPE: tl.constexpr,        # EMA element type (e.g. fp32 shadows of bf16 params)
    HAS_GRAD: tl.constexpr,       # False: EMA-only launch for parameters without a grad
    HAS_MOMENTUM: tl.constexpr,   # momentum != 0
    NESTEROV: tl.constexpr,       # Nesterov momentum
    HAS_WD: tl.constexpr,         # weight_decay != 0
    HAS_EMA: tl.constexpr,        # update the EMA tensors
    HAS_SCALE: tl.constexpr,      # divide grads by *GRAD_SCALE
    HAS_FOUND_INF: tl.constexpr,  # honour *FOUND_INF
    ALIGNED: tl.constexpr,        # every address is 16-byte aligned (lets loads vectorise)
    BLOCK: tl.constexpr,          # elements per program
):
    pid = tl.program_id(0)
    t = tl.load(WORK_TENSOR + pid)
    start = tl.load(WORK_START + pid)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    numel = tl.load(TABLE + 4 * T + t)
    if HAS_FOUND_INF:
        # A skipped step masks off every load and store: it moves (almost) no bytes.
        numel = tl.where(tl.load(FOUND_INF) == 0, numel, 0)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    p_ptr = tl.load(TABLE + t).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(TABLE + T + t).to(tl.pointer_type(G_DTYPE))
    b_ptr = tl.load(TABLE + 2 * T + t).to(tl.pointer_type(P_DTYPE))
    e_ptr = tl.load(TABLE + 3 * T + t).to(tl.pointer_type(E_DTYPE))
    if ALIGNED:
        # Addresses loaded from memory carry no alignment facts; the host checked them.
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
    if start + BLOCK <= numel:
        _sgd_ema_block(p_ptr, g_ptr, b_ptr, e_ptr, offs, mask, GRAD_SCALE, lr, momentum,
                       weight_decay, ema_alpha, P_DTYPE, E_DTYPE, HAS_GRAD, HAS_MOMENTUM,
                       NESTEROV, HAS_WD, HAS_EMA, HAS_SCALE, MASKED=False)
    else:
        _sgd_ema_block(p_ptr, g_ptr, b_ptr, e_ptr, offs, mask, GRAD_SCALE, lr, momentum,
                       weight_decay, ema_alpha, P_DTYPE, E_DTYPE, HAS_GRAD, HAS_MOMENTUM,
                       NESTEROV, HAS_WD, HAS_EMA, HAS_SCALE, MASKED=True)


def _block_for(device: torch.device) -> tuple[int, int]:
    """(elements per program, warps). GPU: 4096 elements, 8 warps = 16 per thread (4 x 16 B
    vectors for fp32). Interpreter: large blocks, since each program costs ~ms of Python."""
    if device.type == "cuda" and not _env.interpreting():
        return 4096, 8
    return 65536, 1


def _kernel_layout_ok(p: Tensor, *others: Optional[Tensor]) -> bool:
    """The kernel walks raw memory, so p and its grad/buffer/EMA must be dense with one
    shared element order (contiguous, or all channels-last like 4-D conv weights after
    `model.to(memory_format=torch.channels_last)`). Anything else takes the foreach path."""
    if not (p.is_contiguous() or (p.dim() == 4
                                  and p.is_contiguous(memory_format=torch.channels_last))):
        return False
    return all(t is None or t.stride() == p.stride() for t in others)


class _Launch:
    """Cached tables for one kernel launch (a set of tensors of one dtype combination)."""

    __slots__ = ("sizes", "addresses", "table", "work_tensor", "work_start", "aligned")

    def __init__(self):
        self.sizes = None
        self.addresses = None


class FusedSGD(torch.optim.Optimizer):
    """SGD (momentum, Nesterov, L2 weight decay, per-group lr) + weight EMA in one pass.

    Args:
        params: parameters or parameter groups (per-group lr, momentum, nesterov and
            weight_decay as in torch.optim.SGD).
        lr, momentum, nesterov, weight_decay: as `torch.optim.SGD` (dampening is fixed at
            0; `lr` must be a float -- a tensor lr would need a device read per step).
        ema_decay: None for no EMA; otherwise the default decay of the EMA of every
            parameter, updated in the same pass after each step (`step(ema_decay=...)`
            overrides it for one step, e.g. for a warm-up ramp; 1.0 skips the update).
        ema_tensors: optional tensors to hold the EMA, one per parameter in the order of
            `[p for g in param_groups for p in g["params"]]`, same shape and device (any
            float dtype, e.g. fp32 shadows of bf16 weights): pass the parameters of an EMA
            model copy, or an engine's shadow list, to have them updated in place. Without
            it, the EMA starts as a copy of the parameters at construction.

    AMP: `_step_supports_amp_scaling = True`, so `torch.amp.GradScaler.step(opt)` hands the
    scale and the inf flag over (as the `grad_scale` / `found_inf` attributes) instead of
    unscaling the grads in a separate pass; they can also be passed to `step` directly.
    Grads are unscaled in registers only (p.grad keeps the scaled values). When found_inf
    is non-zero, parameters, momentum buffers and EMA are all left untouched, with no host
    sync. State (`momentum_buffer`, `ema`) lives in `self.state[p]`, so `state_dict()`
    checkpoints it; momentum buffers use torch.optim.SGD's key.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, *,
                 ema_decay: Optional[float] = None,
                 ema_tensors: Optional[Iterable[Tensor]] = None):
        if isinstance(lr, Tensor):
            raise ValueError("FusedSGD takes lr as a Python float (it is passed to the kernel "
                             "as a runtime scalar); call float() on a tensor lr once, outside "
                             "the training loop")
        if lr < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        if ema_decay is not None and not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        defaults = dict(lr=lr, momentum=momentum, dampening=0.0, nesterov=nesterov,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.ema_decay = ema_decay
        self._launches: dict = {}
        if ema_decay is None:
            if ema_tensors is not None:
                raise ValueError("ema_tensors given without ema_decay")
            return
        params_all = [p for g in self.param_groups for p in g["params"]]
        if ema_tensors is None:
            emas = [p.detach().clone() for p in params_all]
        else:
            emas = list(ema_tensors)
            if len(emas) != len(params_all):
                raise ValueError(f"ema_tensors has {len(emas)} tensors for "
                                 f"{len(params_all)} parameters")
            for i, (p, e) in enumerate(zip(params_all, emas)):
                if e.shape != p.shape or e.device != p.device or not e.is_floating_point():
                    raise ValueError(f"ema_tensors[{i}] must be a float tensor of shape "
                                     f"{tuple(p.shape)} on {p.device}, got {tuple(e.shape)} "
                                     f"{e.dtype} on {e.device}")
                if e.stride() != p.stride():
                    raise ValueError(f"ema_tensors[{i}] must have its parameter's strides "
                                     f"{p.stride()} (same memory format), got {e.stride()}")
        for p, e in zip(params_all, emas):
            self.state[p]["ema"] = e

    def __setstate__(self, state):
        super().__setstate__(state)
        self._launches = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if getattr(self, "ema_decay", None) is not None:
            for p in self.param_groups[-1]["params"]:
                self.state[p].setdefault("ema", p.detach().clone())
        self._launches = {}

    def load_state_dict(self, state_dict: dict) -> None:
        # External EMA tensors keep their identity: copy the loaded values into them.
        external = {p: self.state[p]["ema"] for g in self.param_groups for p in g["params"]
                    if "ema" in self.state.get(p, {})}
        super().load_state_dict(state_dict)
        for p, e in external.items():
            loaded = self.state[p].get("ema")
            if loaded is not None and loaded is not e:
                e.copy_(loaded)
                self.state[p]["ema"] = e
        self._launches = {}

    def ema_params(self) -> list[Tensor]:
        """The EMA tensors, in the order of `[p for g in param_groups for p in g["params"]]`."""
        if self.ema_decay is None:
            raise RuntimeError("this FusedSGD keeps no EMA (ema_decay=None)")
        return [self.state[p]["ema"] for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None, *, ema_decay: Optional[float] = None,
             grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None):
        """One step for every group. `grad_scale` / `found_inf` default to the attributes
        that GradScaler sets; `ema_decay` overrides the constructor's for this step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        decay = self.ema_decay if ema_decay is None else ema_decay
        use_ema = self.ema_decay is not None and decay is not None and decay != 1.0
        if use_ema and not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, decay if use_ema else None, grad_scale, found_inf)
        return loss

    # ---------------------------------------------------------------------------- internals

    def _step_group(self, gi: int, group: dict, decay: Optional[float],
                    grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        momentum = group["momentum"]
        if group.get("dampening", 0.0) != 0.0:
            raise ValueError("FusedSGD supports dampening=0 only")
        if isinstance(group["lr"], Tensor):
            raise ValueError("FusedSGD takes lr as a Python float, got a tensor in a param group")
        # Bucket by (device, dtypes, has grad): each bucket is one launch.
        buckets: dict = {}
        for p in group["params"]:
            state = self.state[p]
            ema = state.get("ema") if decay is not None else None
            g = p.grad
            if g is None:
                if ema is None:
                    continue
                key = (p.device, p.dtype, None, ema.dtype, False)
                buckets.setdefault(key + (_kernel_layout_ok(p, ema),), []).append(
                    (p, None, None, ema))
                continue
            if g.is_sparse:
                raise RuntimeError("FusedSGD does not support sparse gradients")
            buf = None
            if momentum != 0:
                buf = state.get("momentum_buffer")
                if buf is None:
                    # Zeros, not torch's clone(grad): with dampening 0 the first update
                    # momentum * 0 + g gives exactly g, and a first step skipped by
                    # found_inf leaves a valid (zero) buffer behind.
                    buf = state["momentum_buffer"] = torch.zeros_like(p)
            key = (p.device, p.dtype, g.dtype, ema.dtype if ema is not None else None, True)
            buckets.setdefault(key + (_kernel_layout_ok(p, g, buf, ema),), []).append(
                (p, g, buf, ema))
        for key, items in buckets.items():
            device = key[0]
            scale = grad_scale.to(device, non_blocking=True) if grad_scale is not None else None
            inf = found_inf.to(device, non_blocking=True) if found_inf is not None else None
            has_grad = key[4]
            if _env.use_triton(device) and key[5]:
                self._launch(gi, key[:5], items, group, decay, scale, inf)
                continue
            params = [it[0] for it in items]
            sgd_ema_reference_step(
                params, [it[1] for it in items] if has_grad else [],
                [it[2] for it in items] if has_grad and momentum != 0 else None,
                [it[3] for it in items] if decay is not None else None,
                lr=group["lr"], momentum=momentum, nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], ema_decay=decay,
                grad_scale=scale, found_inf=inf)

    def _launch(self, gi: int, key: tuple, items: list, group: dict, decay: Optional[float],
                grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        device, p_dtype, g_dtype, e_dtype, has_grad = key
        momentum = group["momentum"]
        has_momentum = has_grad and momentum != 0
        has_ema = decay is not None
        launch = self._launches.setdefault((gi, key), _Launch())
        block, warps = _block_for(device)
        sizes = tuple(it[0].numel() for it in items)
        if launch.sizes != sizes:
            # Work list: one (tensor, start) pair per BLOCK elements. Sizes never change
            # between steps, so this runs once per launch key.
            tensor_ids, starts = [], []
            for i, n in enumerate(sizes):
                for s in range(0, n, block):
                    tensor_ids.append(i)
                    starts.append(s)
            launch.work_tensor = torch.tensor(tensor_ids, dtype=torch.int32, device=device)
            launch.work_start = torch.tensor(starts, dtype=torch.int64, device=device)
            launch.sizes = sizes
            launch.addresses = None
        # Addresses: cheap to collect; the device table is re-sent only when one changed.
        addresses = tuple(
            t.data_ptr() if t is not None else 0
            for row in range(4) for t in (it[row] for it in items))
        if launch.addresses != addresses:
            T = len(items)
            rows = [list(addresses[r * T:(r + 1) * T]) for r in range(4)] + [list(sizes)]
            launch.table = torch.tensor(rows, dtype=torch.int64, device=device)
            launch.addresses = addresses
            launch.aligned = all(a % 16 == 0 for a in addresses)
        T = len(items)
        dummy = launch.table
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            _sgd_ema_kernel[(launch.work_tensor.numel(),)](
                launch.work_tensor, launch.work_start, launch.table, T,
                grad_scale if grad_scale is not None else dummy,
                found_inf if found_inf is not None else dummy,
                float(group["lr"]), float(momentum), float(group["weight_decay"]),
                float(1.0 - decay) if has_ema else 0.0,
                P_DTYPE=_TL_DTYPES[p_dtype],
                G_DTYPE=_TL_DTYPES[g_dtype] if g_dtype is not None else _TL_DTYPES[p_dtype],
                E_DTYPE=_TL_DTYPES[e_dtype] if e_dtype is not None else _TL_DTYPES[p_dtype],
                HAS_GRAD=has_grad, HAS_MOMENTUM=has_momentum,
                NESTEROV=bool(group["nesterov"]) and has_momentum,
                HAS_WD=has_grad and group["weight_decay"] != 0, HAS_EMA=has_ema,
                HAS_SCALE=grad_scale is not None and has_grad,
                HAS_FOUND_INF=found_inf is not None, ALIGNED=launch.aligned,
                BLOCK=block, num_warps=warps)

