"""Plain-PyTorch references for the fused ops: the single source of truth for what each
kernel computes. Tests compare the kernels with these, the benchmark times them as the
eager and `torch.compile` baselines, and the modules fall back to them where the kernels
do not run (CPU without Triton's interpreter, or the ``FASTRES_KERNELS=0`` kill switch).

- `bn_act_reference`: ``act(batch_norm(x) + residual)``, built from `F.batch_norm`; the
  module form is `fastres.norm_act.BatchNormAct2d`.
- `sgd_ema_reference_step`: one multi-tensor SGD step (L2 weight decay, momentum, Nesterov,
  optional grad unscale and inf skip) followed by the EMA update, in `torch._foreach_*` ops (through `fastres._compat.foreach`),
  with the same arithmetic order as the Triton kernel in `fastres.kernels.sgd`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastres._compat import foreach
from fastres.norm_act import ACTIVATIONS, apply_act

__all__ = ["bn_act_reference", "sgd_ema_reference_step"]


def bn_act_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     running_mean: Optional[Tensor], running_var: Optional[Tensor],
                     training: bool, momentum: Optional[float], eps: float,
                     residual: Optional[Tensor] = None, act: str = "relu", *,
                     num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``act(F.batch_norm(x, ...) + residual)``; the signature of `fused_bn_act`.

    `num_batches_tracked`, when given in training, is incremented by one, as
    nn.BatchNorm2d's forward does before it normalises (so pass the module's counter as it
    was before this batch). `momentum=None` is nn.BatchNorm2d's cumulative moving average:
    the running statistics are updated with factor ``1 / num_batches_tracked`` (after the
    increment). Reading that count is a host sync on CUDA; this is a reference path, not a
    hot one.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        if training and running_mean is not None:
            if num_batches_tracked is None:
                raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
            factor = 1.0 / float(num_batches_tracked)  # host sync: reference path only
        else:
            factor = 0.0
    else:
        factor = momentum
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, factor, eps)
    if residual is not None:
        y = y + residual
    return apply_act(y, act)


@torch.no_grad()
def sgd_ema_reference_step(params: Sequence[Tensor], grads: Sequence[Tensor],
                           momentum_buffers: Optional[Sequence[Tensor]],
                           emas: Optional[Sequence[Tensor]], *, lr: float,
                           momentum: float = 0.0, nesterov: bool = False,
                           weight_decay: float = 0.0, ema_decay: Optional[float] = None,
                           grad_scale: Optional[Tensor] = None,
                           found_inf: Optional[Tensor] = None) -> None:
    """One SGD step then one EMA update, in place, for tensors that share device and dtype.

    Per tensor, with g the gradient:
        g   = g / grad_scale                    (if grad_scale is given)
        g   = g + weight_decay * p              (L2, as torch.optim.SGD)
        buf = momentum * buf + g                (buffers start at zero: equals torch's
                                                 `buf = g` on the first step, dampening 0)
        g   = g + momentum * buf  if nesterov else buf
        p   = p - lr * g
        ema = ema + (1 - ema_decay) * (p - ema) (if ema_decay is given)
    When `found_inf` is non-zero nothing changes (params, buffers and EMA), without a host
    sync: the new values are computed and discarded with `torch.where`.
    `grads` may be empty (with `params` non-empty) for tensors that only take the EMA update.
    """
    params, grads = list(params), list(grads)
    old = None
    if found_inf is not None:
        old = [t.clone() for t in params]
        old_bufs = [t.clone() for t in momentum_buffers] if momentum_buffers else []
        old_emas = [t.clone() for t in emas] if emas else []
    if grads:
        if grad_scale is not None:
            grads = foreach.div(grads, grad_scale)
        if weight_decay != 0:
            grads = foreach.add(grads, params, alpha=weight_decay)
        if momentum != 0:
            foreach.mul_(momentum_buffers, momentum)
            foreach.add_(momentum_buffers, grads)
            if nesterov:
                grads = foreach.add(grads, momentum_buffers, alpha=momentum)
            else:
                grads = list(momentum_buffers)
        foreach.add_(params, grads, alpha=-lr)
    if emas and ema_decay is not None:
        p_in_ema_dtype = [p.to(e.dtype) for p, e in zip(params, emas)]
        foreach.add_(emas, foreach.sub(p_in_ema_dtype, emas), alpha=1.0 - ema_decay)
    if old is not None:
        skip = found_inf.reshape(()) != 0
        for t, o in zip(params, old):
            t.copy_(torch.where(skip, o, t))
        for t, o in zip(momentum_buffers or [], old_bufs):
            t.copy_(torch.where(skip, o, t))
        for t, o in zip(emas or [], old_emas):
            t.copy_(torch.where(skip, o, t))
