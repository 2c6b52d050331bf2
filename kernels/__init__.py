"""Fused Triton kernels for fastres, each with its plain-PyTorch reference.

- `FusedBatchNormAct2d` / `fused_bn_act`: ``act(batch_norm(x) + residual)`` for
  channels-last tensors, forward and backward (kernels/bn_act.py).
- `FusedSGD`: a multi-tensor SGD step (momentum, Nesterov, L2 weight decay, per-group lr)
  with the weight EMA and the AMP grad unscale / inf skip in the same pass (kernels/sgd.py).
- `bn_act_reference`, `sgd_ema_reference_step`, `BatchNormAct2d`: the references
  (kernels/reference.py), used by the tests, the benchmark and the fallbacks.

Where the kernels run: CUDA tensors; CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` before import, as in CI); nowhere when ``FASTRES_KERNELS=0``
(the kill switch, see `fastres.kernels._env`). Everywhere else the references run.
"""
from fastres.kernels._env import KILL_SWITCH, interpreting, kernels_enabled, use_triton
from fastres.kernels.bn_act import FusedBatchNormAct2d, fused_bn_act
from fastres.kernels.reference import BatchNormAct2d, bn_act_reference, sgd_ema_reference_step
from fastres.kernels.sgd import FusedSGD

__all__ = [
    "FusedBatchNormAct2d", "fused_bn_act", "FusedSGD", "kernels_enabled", "use_triton",
    "interpreting", "KILL_SWITCH", "BatchNormAct2d", "bn_act_reference",
    "sgd_ema_reference_step",
]
