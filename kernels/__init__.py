"""Fused Triton kernels for fastres, each with its plain-PyTorch reference.

- `FusedBatchNormAct2d` / `fused_bn_act`: ``act(batch_norm(x) + residual)`` for
  channels-last tensors, forward and backward (kernels/bn_act.py). `FusedBatchNormAct2d(C)`
  is a drop-in `nn.BatchNorm2d(C)` (act defaults to "identity"); act="relu"/"gelu"/"silu"
  fuses the activation, `forward(x, residual)` the residual add.
- `FusedSGD`: a multi-tensor SGD step (momentum, Nesterov, L2 weight decay, per-group lr,
  lr/momentum as floats or device scalars) with the weight EMA and the AMP grad unscale /
  inf skip in the same pass (kernels/sgd.py).
- `bn_act_reference`, `sgd_ema_reference_step`: the references (kernels/reference.py),
  used by the tests, the benchmark and the fallbacks; the unfused module is
  `fastres.norm_act.BatchNormAct2d`.
- `fastres.kernels.testing`: fp64 truths, ulp-based comparisons with a ReLU tie band, the
  GPU-configuration and interpreter-harness switches, the decisive GPU experiment.

Where the kernels run: CUDA tensors; CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` before import, as in CI); nowhere when ``FASTRES_KERNELS=0``
(the kill switch) or when Triton is not installed (`HAS_TRITON`). Everywhere else the
references run (see `fastres.kernels._env`). Importing this package does not import the
model zoo (the norm-act layer is the leaf module `fastres.norm_act`) and changes nothing
outside it: `install_harness()` patches Triton's interpreter (GPU-like rounding, grid
orders, the race check) only when a test or a user calls it.
"""
from fastres.kernels._env import (HAS_TRITON, KILL_SWITCH, install_harness, interpreting,
                                  kernels_enabled, use_triton)
from fastres.kernels.bn_act import FusedBatchNormAct2d, fused_bn_act
from fastres.kernels.reference import bn_act_reference, sgd_ema_reference_step
from fastres.kernels.sgd import FusedSGD

__all__ = [
    "FusedBatchNormAct2d", "fused_bn_act", "FusedSGD", "kernels_enabled", "use_triton",
    "interpreting", "KILL_SWITCH", "HAS_TRITON", "bn_act_reference",
    "sgd_ema_reference_step", "install_harness",
]
