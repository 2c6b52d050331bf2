"""The Triton kernel of FusedSGD (v2); launched by `fastres.kernels.sgd`.

Imported only where Triton is (`fastres.kernels._env.HAS_TRITON`).
"""
from __future__ import annotations

import triton
import triton.language as tl


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
def _sgd_ema_block(p_ptr, g_ptr, b_ptr, e_ptr, offs, mask, scale, lr, momentum,
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
            g = g / scale
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
def sgd_ema_kernel(
    WORK_TENSOR,    # *int32 [n_work]: tensor index of each work item
    WORK_START,     # *int64 [n_work]: first element (of that tensor) of each work item
    TABLE,          # *int64 [5, T]: addresses of param, grad, momentum buffer, EMA; numel
    T,              # tensors in this launch (row stride of TABLE)
    n_work,         # work items; the grid is smaller (persistent: programs stride over them)
    GRAD_SCALE,     # *fp32 [1]: AMP loss scale to divide grads by (HAS_SCALE)
    FOUND_INF,      # *fp32 [1]: non-zero -> skip the whole step (HAS_FOUND_INF)
    LR,             # *float [1]: learning rate on the device (LR_ON_DEVICE)
    MOMENTUM,       # *float [1]: momentum on the device (MOMENTUM_ON_DEVICE)
    EMA_DECAY,      # *float [1]: EMA decay on the device (EMA_ON_DEVICE)
    lr,             # runtime fp32 learning rate (unless LR_ON_DEVICE): no recompile per value
    momentum,       # runtime fp32 momentum (unless MOMENTUM_ON_DEVICE)
    weight_decay,   # runtime fp32 L2 coefficient added to the gradient
    ema_alpha,      # runtime fp32 1 - ema_decay (unless EMA_ON_DEVICE)
    P_DTYPE: tl.constexpr,        # parameter (and momentum buffer) element type
    G_DTYPE: tl.constexpr,        # gradient element type
    E_DTYPE: tl.constexpr,        # EMA element type (e.g. fp32 shadows of bf16 params)
    HAS_GRAD: tl.constexpr,       # False: EMA-only launch for parameters without a grad
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_WD: tl.constexpr,
    HAS_EMA: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr,
    MOMENTUM_ON_DEVICE: tl.constexpr,
    EMA_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,        # every address is 16-byte aligned (loads vectorise)
    BLOCK: tl.constexpr,          # elements per work item
):
    """One SGD(+EMA) step over every tensor of the table, in one persistent launch.

    Hyper-parameters on the device are read once per program (no host read, no sync:
    the step can be captured in a CUDA graph and the schedule can write them in place).
    A skipped step (found_inf) masks every load and store: it moves almost no bytes."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if LR_ON_DEVICE:
        lr = tl.load(LR).to(tl.float32)
    if MOMENTUM_ON_DEVICE:
        momentum = tl.load(MOMENTUM).to(tl.float32)
    if EMA_ON_DEVICE:
        ema_alpha = 1.0 - tl.load(EMA_DECAY).to(tl.float32)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(GRAD_SCALE).to(tl.float32)
    live = 1
    if HAS_FOUND_INF:
        live = (tl.load(FOUND_INF) == 0).to(tl.int32)
    for w in range(pid, n_work, nprog):
        t = tl.load(WORK_TENSOR + w)
        start = tl.load(WORK_START + w)
        if ALIGNED:
            start = tl.multiple_of(start, BLOCK)
        numel = tl.load(TABLE + 4 * T + t) * live
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
            _sgd_ema_block(p_ptr, g_ptr, b_ptr, e_ptr, offs, mask, scale, lr, momentum,
                           weight_decay, ema_alpha, P_DTYPE, E_DTYPE, HAS_GRAD, HAS_MOMENTUM,
                           NESTEROV, HAS_WD, HAS_EMA, HAS_SCALE, MASKED=False)
        else:
            _sgd_ema_block(p_ptr, g_ptr, b_ptr, e_ptr, offs, mask, scale, lr, momentum,
                           weight_decay, ema_alpha, P_DTYPE, E_DTYPE, HAS_GRAD, HAS_MOMENTUM,
                           NESTEROV, HAS_WD, HAS_EMA, HAS_SCALE, MASKED=True)
