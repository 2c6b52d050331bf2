"""Fused BatchNorm (+ residual add) + activation for channels-last tensors, in Triton.

    y = act(batch_norm(x) + residual)        act in {relu, identity, gelu}, residual optional

Layers, bottom to top (STYLE.md habit 2):
    kernels      `_bn_stats_kernel`, `_bn_stats_combine_kernel`, `_bn_act_fwd_kernel`,
                 `_bn_act_bwd_reduce_kernel`, `_bn_act_bwd_combine_kernel`,
                 `_bn_act_bwd_dx_kernel` (no allocation, no autograd)
    launchers    `launch_bn_act_forward`, `launch_bn_act_backward` (pick tiles, allocate
                 the small fp32 scratch, launch; no autograd)
    custom ops   `fastres::bn_act_fwd` (mutates the running statistics) and
                 `fastres::bn_act_bwd`, registered with `torch.library.custom_op` plus fake
                 (meta) implementations, so `torch.compile(fullgraph=True)` keeps them whole
    autograd     `BNActFunction`, a `torch.autograd.Function` calling the two ops. It is an
                 autograd.Function rather than `register_autograd` on the op because torch
                 refuses autograd formulas for ops that mutate inputs, and the forward op
                 must update running_mean/var in place (splitting that update into another
                 op would cost one more launch per layer). Dynamo traces the Function.
    functional   `fused_bn_act(...)`: dispatches to the kernels or to the reference
    module       `FusedBatchNormAct2d`, an `nn.BatchNorm2d` subclass (same state dict)

Layout. A channels-last 4-D tensor (N, C, H, W) is, in memory, an (N*H*W, C) row-major
matrix: every kernel works on that matrix, one row per pixel, channels contiguous (vector
loads along C, coalesced rows). NCHW-contiguous input is refused with a ValueError naming
the fix (`.to(memory_format=torch.channels_last)`): converting it here would silently add a
full copy each way. A tensor with H = W = 1 (or C = 1) is both layouts and is accepted. The
incoming gradient in backward is the one exception: autograd hands us whatever layout the
next op produced (an expanded scalar from `.sum()`, an NCHW grad from a reshape), so a
non-channels-last gradient is copied to channels-last there (documented, and counted in the
benchmark only when it happens).

Passes and bytes moved (s = element size, MC = elements; the floor the benchmark reports):
    forward, training   stats: read x                        -> partial (mean, M2) per program
                        combine: partials -> mean, rstd, running stats (O(P*C), negligible)
                        normalise: read x, [read res], write y
                        floor: (3 + r) * M*C*s      r = 1 with a residual
    forward, eval       normalise only: (2 + r) * M*C*s
    backward, training  reduce: read dy, y (relu) / res (gelu), x; [write dres]
                        combine: partials -> dweight, dbias, the two channel sums
                        dx: read dres (= dz, when stored) or dy [, y / res], x; write dx
                        floor (relu + res): 7 * M*C*s (5 reads + 2 writes)
    backward, eval      one pass: read dy, y/res, x; write dx [, dres] (+ combine for dw/db)
Two passes over x in forward are the minimum unless a whole channel column fits on chip
(it does not for the CIFAR shapes: 512x64x32x32 holds 512K rows per channel).

Numerics: statistics in fp32 (fp64 for fp64 input): Welford per register lane on data
shifted by a sample of the same channel, Chan's parallel merge across lanes and then across
programs (no E[x^2] - E[x]^2 cancellation); partial buffers are combined in a fixed order,
so results are deterministic for a given shape and device (no atomics). Outputs are
rounded once, to the output dtype.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastres.kernels import _env
from fastres.kernels.reference import bn_act_reference
from fastres.models.layers import ACTIVATIONS, BatchNormAct2d

__all__ = ["FusedBatchNormAct2d", "fused_bn_act", "BNActFunction", "TileConfig",
           "tile_config", "candidate_configs", "forced_config", "launch_bn_act_forward",
           "launch_bn_act_backward"]

_ACT_IDS = {"identity": 0, "relu": 1, "gelu": 2}
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64,
              torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_FLOAT_DTYPES = tuple(_TL_DTYPES)


# =============================================================================== kernels

@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """act(z) in the accumulation dtype. ReLU written as a `where` so NaN propagates, as in
    torch (tl.maximum would return 0 for NaN)."""
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return z


@triton.jit
def _act_grad(dy, y, z, ACT: tl.constexpr):
    """dL/dz from dL/dy. ReLU reads the mask off the output, like torch's
    threshold_backward(grad, result, 0): y <= 0 blocks the gradient. GELU (erf form, as
    F.gelu's default) needs the pre-activation z = x_hat*w + b + res, recomputed by the
    caller: gelu'(z) = Phi(z) + z * phi(z)."""
    if ACT == 1:
        dy = tl.where(y <= 0, 0.0, dy)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        dy = dy * (cdf + z * pdf)
    return dy


@triton.jit
def _bn_stats_kernel(
    X,              # *T [M, C] input rows (one per N*H*W position), channel stride 1
    PART_MEAN,      # *ACC [P, C] out: mean of the rows this program reduced
    PART_M2,        # *ACC [P, C] out: sum of squared deviations from that mean
    M,              # number of rows, N*H*W
    C,              # number of channels
    stride_xm,      # elements between consecutive rows of X
    rows_per_prog,  # rows one program reduces (a multiple of BLOCK_M); P = cdiv(M, rows_per_prog)
    ACC: tl.constexpr,      # accumulation dtype (fp32; fp64 for fp64 input)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_C: tl.constexpr,  # channels per program
):
    """Pass 1 of the training forward: per-program (mean, M2) for a slab of rows.

    Per-lane Welford: every (row lane, channel) position of the BLOCK_M x BLOCK_C tile keeps
    its own count, mean and M2 in registers while the program walks its slab, so the loop
    body is elementwise (loads stay in flight; no cross-warp reduction and barrier per
    tile). The lanes are merged once at the end with Chan's parallel formula. Values are
    shifted by the slab's first row first, so that means stay small when |mean| >> std
    (fp32 cannot hold 1000 + 1e-2 noise to better than 6e-5).
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row0 = pid_m.to(tl.int64) * rows_per_prog  # int64: M*C may exceed 2**31
    shift = tl.load(X + row0 * stride_xm + cols, mask=cmask & (row0 < M), other=0.0).to(ACC)
    lanes = tl.arange(0, BLOCK_M)
    cnt = tl.zeros([BLOCK_M], dtype=ACC)          # rows seen by each row lane
    mean = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)  # relative to shift
    m2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    for start in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + start + lanes
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        cnt = cnt + rmask.to(ACC)
        inv = 1.0 / tl.maximum(cnt, 1.0)
        delta = tl.where(mask, x.to(ACC) - shift[None, :] - mean, 0.0)
        mean = mean + delta * inv[:, None]
        m2 = m2 + delta * tl.where(mask, x.to(ACC) - shift[None, :] - mean, 0.0)
    # Chan's merge of the lanes: n = sum n_l, mean = sum n_l mean_l / n,
    # M2 = sum M2_l + sum n_l (mean_l - mean)^2; lane 0 always holds rows.
    n = tl.sum(cnt, axis=0)
    mean_p = tl.sum(cnt[:, None] * mean, axis=0) / tl.maximum(n, 1.0)
    d = tl.where((cnt > 0)[:, None], mean - mean_p[None, :], 0.0)
    m2_p = tl.sum(m2, axis=0) + tl.sum(cnt[:, None] * d * d, axis=0)
    out = pid_m.to(tl.int64) * C + cols
    tl.store(PART_MEAN + out, shift + mean_p, mask=cmask)
    tl.store(PART_M2 + out, m2_p, mask=cmask)


@triton.jit
def _bn_stats_combine_kernel(
    PART_MEAN,      # *ACC [P, C] per-program means from _bn_stats_kernel
    PART_M2,        # *ACC [P, C] per-program M2 from _bn_stats_kernel
    MEAN,           # *ACC [C] out: batch mean
    RSTD,           # *ACC [C] out: 1 / sqrt(biased batch variance + eps)
    RUNNING_MEAN,   # *R [C] in/out: running mean (touched only if UPDATE_RUNNING)
    RUNNING_VAR,    # *R [C] in/out: running variance, unbiased (only if UPDATE_RUNNING)
    NBT,            # *int64 [1]: num_batches_tracked, already incremented (read only if CMA)
    P,              # number of partial rows
    M,              # rows of the input (the per-channel sample count), M > 1 when updating
    C,              # channels
    rows_per_prog,  # rows behind each partial (the last one may hold fewer)
    momentum,       # runtime float: running-stat factor (unused when CMA)
    eps,            # runtime float: variance epsilon (down to 1e-12 is fine in fp32)
    UPDATE_RUNNING: tl.constexpr,  # write the running statistics
    CMA: tl.constexpr,             # momentum=None: factor = 1 / num_batches_tracked
    ACC: tl.constexpr,             # accumulation dtype
    BLOCK_P: tl.constexpr,         # partials merged per iteration
    BLOCK_C: tl.constexpr,         # channels per program
):
    """Merge the P partials of each channel in a fixed order (deterministic), then the
    running-stat update exactly as nn.BatchNorm2d: new = f * batch + (1 - f) * old, with
    the unbiased variance M2 / (M - 1) for running_var."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    # Shift by the first partial mean: partial means differ by ~std/sqrt(rows), so the
    # weighted sums below stay small (and mu_p - shift is exact when the two are close).
    shift = tl.load(PART_MEAN + cols, mask=cmask, other=0.0).to(ACC)
    cnt = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)  # relative to shift
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        pmask = ps < P
        n_p = M - ps.to(tl.int64) * rows_per_prog
        n_p = tl.minimum(tl.maximum(n_p, 0), rows_per_prog)
        n_p = tl.where(pmask, n_p, 0).to(ACC)
        mask = pmask[:, None] & cmask[None, :]
        offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
        mu_p = tl.load(PART_MEAN + offs, mask=mask, other=0.0).to(ACC)
        mu_p = tl.where(mask, mu_p - shift[None, :], 0.0)
        q_p = tl.load(PART_M2 + offs, mask=mask, other=0.0).to(ACC)
        n_t = tl.sum(n_p, axis=0)
        mean_t = tl.sum(n_p[:, None] * mu_p, axis=0) / tl.maximum(n_t, 1.0)
        d = tl.where(mask, mu_p - mean_t[None, :], 0.0)
        m2_t = tl.sum(q_p + n_p[:, None] * d * d, axis=0)
        n_new = cnt + n_t
        frac = n_t / tl.maximum(n_new, 1.0)
        delta = mean_t - mean
        mean = mean + delta * frac
        m2 = m2 + m2_t + delta * delta * cnt * frac
        cnt = n_new
    mean = shift + mean
    var = m2 / M
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + cols, mean, mask=cmask)
    tl.store(RSTD + cols, rstd, mask=cmask)
    if UPDATE_RUNNING:
        if CMA:
            f = 1.0 / tl.load(NBT).to(ACC)
        else:
            f = momentum
        rm = tl.load(RUNNING_MEAN + cols, mask=cmask, other=0.0).to(ACC)
        rv = tl.load(RUNNING_VAR + cols, mask=cmask, other=0.0).to(ACC)
        unbiased = m2 / (M - 1)
        rm = f * mean + (1.0 - f) * rm
        rv = f * unbiased + (1.0 - f) * rv
        tl.store(RUNNING_MEAN + cols, rm.to(RUNNING_MEAN.dtype.element_ty), mask=cmask)
        tl.store(RUNNING_VAR + cols, rv.to(RUNNING_VAR.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_act_fwd_kernel(
    X,              # *T [M, C] input
    RES,            # *R [M, C] residual (read only if HAS_RES)
    Y,              # *O [M, C] out: act((x - mean) * rstd * w + b + res)
    MEAN,           # *S [C] mean: batch mean (training) or running mean (eval)
    STAT,           # *S [C] rstd (training) or running variance (eval, STAT_IS_VAR)
    W,              # *P [C] affine weight (read only if HAS_W)
    B,              # *P [C] affine bias (read only if HAS_B)
    MEAN_OUT,       # *ACC [C] out, eval only: the mean used, saved for backward
    RSTD_OUT,       # *ACC [C] out, eval only: the rstd used, saved for backward
    M,              # rows
    C,              # channels
    stride_xm,      # row stride of X (elements)
    stride_rm,      # row stride of RES
    stride_ym,      # row stride of Y
    eps,            # runtime float, used only with STAT_IS_VAR
    HAS_RES: tl.constexpr,      # a residual is added before the activation
    HAS_W: tl.constexpr,        # affine weight present (else 1)
    HAS_B: tl.constexpr,        # affine bias present (else 0)
    STAT_IS_VAR: tl.constexpr,  # eval: STAT is the running variance; also write MEAN/RSTD_OUT
    ACT: tl.constexpr,          # 0 identity, 1 relu, 2 gelu
    ACC: tl.constexpr,          # accumulation dtype
    BLOCK_M: tl.constexpr,      # rows per program
    BLOCK_C: tl.constexpr,      # channels per program
):
    """The elementwise pass: one BLOCK_M x BLOCK_C tile per program."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0).to(ACC)
    stat = tl.load(STAT + cols, mask=cmask, other=1.0).to(ACC)
    if STAT_IS_VAR:
        rstd = 1.0 / tl.sqrt(stat + eps)
        first = cmask & (pid_m == 0)
        tl.store(MEAN_OUT + cols, mean, mask=first)
        tl.store(RSTD_OUT + cols, rstd, mask=first)
    else:
        rstd = stat
    if HAS_W:
        scale = rstd * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    else:
        scale = rstd
    if HAS_B:
        shift = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    else:
        shift = tl.zeros([BLOCK_C], dtype=ACC)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(ACC)
    # (x - mean) * scale rather than x * scale + (b - mean * scale): no cancellation when
    # |mean| >> std.
    z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RES:
        z += tl.load(RES + rows[:, None] * stride_rm + cols[None, :], mask=mask,
                     other=0.0).to(ACC)
    y = _act_fwd(z, ACT)
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# Backward derivation (per channel; i runs over the M = N*H*W rows):
#
#   forward   mu = (1/M) sum_i x_i          var = (1/M) sum_i (x_i - mu)^2
#             r  = 1 / sqrt(var + eps)      xh_i = (x_i - mu) * r
#             z_i = w * xh_i + b + res_i    y_i = act(z_i)
#   given g_i = dL/dy_i:
#             dz_i   = g_i * act'(z_i)      relu: [y_i > 0] (y_i > 0 <=> z_i > 0, so the
#                                           saved output carries the mask); identity: 1;
#                                           gelu: Phi(z_i) + z_i phi(z_i), z recomputed
#             dres_i = dz_i
#             db     = sum_i dz_i                          =: S1
#             dw     = sum_i dz_i * xh_i                   =: S2
#             dxh_i  = w * dz_i
#   training: mu and r depend on x. With d xh_j / d x_i = r (delta_ij - 1/M - xh_i xh_j / M),
#             dx_i = r * (dxh_i - (1/M) sum_j dxh_j - xh_i (1/M) sum_j dxh_j xh_j)
#                  = w * r * (dz_i - S1/M - xh_i * S2/M)
#   eval:     mu and r are constants: dx_i = w * r * dz_i.
#
# Saved for backward: x (xh is needed at every element, masked ones included, because
# the S2 term of dx_i does not vanish where dz_i = 0 -- so y alone cannot replace x), the
# output y for relu (its mask; y is the next conv's input, so keeping it costs no memory
# that eager PyTorch's relu does not also keep), the residual for gelu (to recompute z;
# it is the block input, already held by the block's first conv), mean and rstd in fp32
# (C values each), and the affine parameters. Not saved: z, xh, a separate mask.
# The training backward is two passes over the rows (S1, S2 are needed before any dx_i):
# the reduce pass also writes dres = dz, and when it does the dx pass reads dz back from
# it instead of re-reading dy and y (one tensor instead of two).
# dz is rounded to the gradient's dtype before use, as eager PyTorch's separate
# relu/gelu backward produces it in that dtype; both passes then see the same dz.


@triton.jit
def _load_bwd_params(MEAN, RSTD, W, B, cols, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """The per-channel values both backward passes need: mean, rstd, w (1 without affine
    weight), b (0 without bias), all in the accumulation dtype."""
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0).to(ACC)
    rstd = tl.load(RSTD + cols, mask=cmask, other=0.0).to(ACC)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    else:
        w = tl.full([BLOCK_C], 1.0, dtype=ACC)
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    else:
        b = tl.zeros([BLOCK_C], dtype=ACC)
    return mean, rstd, w, b


@triton.jit
def _recompute_dz(DY, Y, RES, r2, c2, mask, xh, w, b, stride_dym, stride_ym, stride_rm,
                  HAS_RES: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr):
    """dz = dL/dz for one tile from dy and what the activation needs (relu: the saved
    output; gelu: z rebuilt from x_hat, w, b and the residual), rounded to the gradient's
    dtype as eager PyTorch's separate activation backward would leave it."""
    dy = tl.load(DY + r2 * stride_dym + c2, mask=mask, other=0.0).to(ACC)
    y = dy  # placeholder for the activations that do not read it
    z = dy
    if ACT == 1:
        y = tl.load(Y + r2 * stride_ym + c2, mask=mask, other=0.0).to(ACC)
    if ACT == 2:
        z = xh * w[None, :] + b[None, :]
        if HAS_RES:
            z += tl.load(RES + r2 * stride_rm + c2, mask=mask, other=0.0).to(ACC)
    dz = _act_grad(dy, y, z, ACT)
    return dz.to(DY.dtype.element_ty).to(ACC)


@triton.jit
def _bn_act_bwd_reduce_kernel(
    DY,             # *G [M, C] upstream gradient dL/dy
    X,              # *T [M, C] saved input
    Y,              # *O [M, C] saved output (ReLU mask; read only for ACT == 1)
    RES,            # *R [M, C] saved residual (read only for GELU with HAS_RES)
    MEAN,           # *ACC [C] saved mean
    RSTD,           # *ACC [C] saved rstd
    W,              # *P [C] affine weight (read only if HAS_W)
    B,              # *P [C] affine bias (read only for GELU with HAS_B)
    DRES,           # *R [M, C] out: d residual = dz (written only if STORE_DRES)
    DX,             # *T [M, C] out: dx = w * rstd * dz (eval only, STORE_DX)
    PART_DB,        # *ACC [P, C] out: per-program sum of dz (COMPUTE_SUMS)
    PART_DW,        # *ACC [P, C] out: per-program sum of dz * x_hat (COMPUTE_SUMS)
    M,              # rows
    C,              # channels
    stride_dym,     # row strides (elements) of DY, X, Y, RES, DRES, DX
    stride_xm,
    stride_ym,
    stride_rm,
    stride_drm,
    stride_dxm,
    rows_per_prog,  # rows per program (multiple of BLOCK_M)
    HAS_RES: tl.constexpr,      # the forward had a residual (needed by GELU's recompute)
    HAS_W: tl.constexpr,        # affine weight present
    HAS_B: tl.constexpr,        # affine bias present
    STORE_DRES: tl.constexpr,   # residual needs a gradient
    STORE_DX: tl.constexpr,     # eval mode: write dx in this same pass
    COMPUTE_SUMS: tl.constexpr, # accumulate S1, S2 partials
    ACT: tl.constexpr,          # 0 identity, 1 relu, 2 gelu
    ACC: tl.constexpr,          # accumulation dtype
    BLOCK_M: tl.constexpr,      # rows per tile
    BLOCK_C: tl.constexpr,      # channels per program
):
    """Backward pass 1: dz, [dres], [eval dx], and per-program S1 = sum dz, S2 = sum dz*xh."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, rstd, w, b = _load_bwd_params(MEAN, RSTD, W, B, cols, cmask, HAS_W, HAS_B, ACC,
                                        BLOCK_C)
    # Per-lane partial sums, reduced across the tile's rows once after the loop (an
    # elementwise loop body: no cross-warp reduction per tile).
    s1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    s2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    row0 = pid_m.to(tl.int64) * rows_per_prog
    for start in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        r2 = rows[:, None]
        c2 = cols[None, :]
        x = tl.load(X + r2 * stride_xm + c2, mask=mask, other=0.0).to(ACC)
        xh = (x - mean[None, :]) * rstd[None, :]
        dz = _recompute_dz(DY, Y, RES, r2, c2, mask, xh, w, b, stride_dym, stride_ym,
                           stride_rm, HAS_RES, ACT, ACC)
        if STORE_DRES:
            tl.store(DRES + r2 * stride_drm + c2, dz.to(DRES.dtype.element_ty), mask=mask)
        if STORE_DX:
            dx = dz * (w * rstd)[None, :]
            tl.store(DX + r2 * stride_dxm + c2, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_SUMS:
            dz = tl.where(mask, dz, 0.0)
            s1 += dz
            s2 += dz * xh
    if COMPUTE_SUMS:
        out = pid_m.to(tl.int64) * C + cols
        tl.store(PART_DB + out, tl.sum(s1, axis=0), mask=cmask)
        tl.store(PART_DW + out, tl.sum(s2, axis=0), mask=cmask)


@triton.jit
def _bn_act_bwd_combine_kernel(
    PART_DB,        # *ACC [P, C] per-program sums of dz
    PART_DW,        # *ACC [P, C] per-program sums of dz * x_hat
    SUM_DB,         # *ACC [C] out: S1 = sum dz (read by the dx pass)
    SUM_DW,         # *ACC [C] out: S2 = sum dz * x_hat
    DWEIGHT,        # *P [C] out: dL/dw = S2 (written only if STORE_DW)
    DBIAS,          # *P [C] out: dL/db = S1 (written only if STORE_DB)
    P,              # number of partial rows
    C,              # channels
    STORE_DW: tl.constexpr,
    STORE_DB: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partials summed per iteration
    BLOCK_C: tl.constexpr,  # channels per program
):
    """Sum the partials in a fixed order (deterministic); emit S1, S2, dweight, dbias."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s1 = tl.zeros([BLOCK_C], dtype=ACC)
    s2 = tl.zeros([BLOCK_C], dtype=ACC)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < P)[:, None] & cmask[None, :]
        offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
        s1 += tl.sum(tl.load(PART_DB + offs, mask=mask, other=0.0).to(ACC), axis=0)
        s2 += tl.sum(tl.load(PART_DW + offs, mask=mask, other=0.0).to(ACC), axis=0)
    tl.store(SUM_DB + cols, s1, mask=cmask)
    tl.store(SUM_DW + cols, s2, mask=cmask)
    if STORE_DW:
        tl.store(DWEIGHT + cols, s2.to(DWEIGHT.dtype.element_ty), mask=cmask)
    if STORE_DB:
        tl.store(DBIAS + cols, s1.to(DBIAS.dtype.element_ty), mask=cmask)


@triton.jit
def _bn_act_bwd_dx_kernel(
    DY,             # *G [M, C] upstream gradient (read unless DZ_STORED)
    X,              # *T [M, C] saved input
    Y,              # *O [M, C] saved output (relu mask; unless DZ_STORED)
    RES,            # *R [M, C] saved residual (gelu recompute; unless DZ_STORED)
    DZ,             # *R [M, C] dz written by the reduce pass as dres (read if DZ_STORED)
    MEAN,           # *ACC [C] saved mean
    RSTD,           # *ACC [C] saved rstd
    W,              # *P [C] affine weight (if HAS_W)
    B,              # *P [C] affine bias (gelu recompute, if HAS_B)
    SUM_DB,         # *ACC [C] S1 = sum dz
    SUM_DW,         # *ACC [C] S2 = sum dz * x_hat
    DX,             # *T [M, C] out: w * rstd * (dz - S1/M - x_hat * S2/M)
    M,              # rows
    C,              # channels
    stride_dym,     # row strides (elements) of DY, X, Y, RES, DZ, DX
    stride_xm,
    stride_ym,
    stride_rm,
    stride_dzm,
    stride_dxm,
    DZ_STORED: tl.constexpr,    # read dz from DZ instead of recomputing it from dy (and y/res)
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,          # 0 identity, 1 relu, 2 gelu
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,      # rows per program
    BLOCK_C: tl.constexpr,      # channels per program
):
    """Backward pass 2 (training): the elementwise dx."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, rstd, w, b = _load_bwd_params(MEAN, RSTD, W, B, cols, cmask, HAS_W, HAS_B, ACC,
                                        BLOCK_C)
    m1 = tl.load(SUM_DB + cols, mask=cmask, other=0.0).to(ACC) / M
    m2 = tl.load(SUM_DW + cols, mask=cmask, other=0.0).to(ACC) / M
    a = w * rstd
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & cmask[None, :]
    r2 = rows[:, None]
    c2 = cols[None, :]
    x = tl.load(X + r2 * stride_xm + c2, mask=mask, other=0.0).to(ACC)
    xh = (x - mean[None, :]) * rstd[None, :]
    if DZ_STORED:
        dz = tl.load(DZ + r2 * stride_dzm + c2, mask=mask, other=0.0).to(ACC)
    else:
        dz = _recompute_dz(DY, Y, RES, r2, c2, mask, xh, w, b, stride_dym, stride_ym,
                           stride_rm, HAS_RES, ACT, ACC)
    dx = a[None, :] * (dz - m1[None, :] - xh * m2[None, :])
    tl.store(DX + r2 * stride_dxm + c2, dx.to(DX.dtype.element_ty), mask=mask)


# ============================================================================ tile configs

@dataclass(frozen=True)
class TileConfig:
    """Tile shape and grid for one (M, C, dtype).

    block_m x block_c is the tile a program holds in registers; rows_per_prog is the slab
    one reduction program walks (a multiple of block_m), which fixes the number of partial
    rows P = cdiv(M, rows_per_prog) and so the (deterministic) combine order.
    """

    block_m: int
    block_c: int
    rows_per_prog: int
    num_warps: int
    block_c_combine: int = 128
    block_p: int = 64


_override: Optional[TileConfig] = None


@contextlib.contextmanager
def forced_config(config: TileConfig):
    """Use `config` for every launch inside the block (tests force many small programs to
    cover the partial-combine paths; the benchmark sweeps candidates). Not thread-safe."""
    global _override
    previous, _override = _override, config
    try:
        yield config
    finally:
        _override = previous


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_config(M: int, C: int, elem_size: int, device: torch.device) -> TileConfig:
    """The launch configuration for an (M, C) problem with `elem_size`-byte elements.

    GPU: a tile of 16 KB of input (4096 fp32 / 8192 bf16 elements), at most 256 bytes of
    channels wide so a warp reads whole 128-byte lines of a row, widened along C when M is
    small (C=2048 with a handful of rows); 8 warps for a full tile (16-32 elements per
    thread in 16-byte vectors; the reduction kernels also keep two fp32 accumulators per
    element, ~100 registers per thread for bf16, no spills at sm_90). Reductions use about
    4 programs per SM, each walking rows_per_prog rows.
    Interpreter (CPU tests): each program costs milliseconds of Python, so few large tiles.
    """
    if _override is not None:
        return _override
    interp = _env.interpreting() or device.type != "cuda"
    if interp:
        tile, max_c, target_programs = 16384, 1024, 2
    else:
        tile = 16384 // elem_size
        max_c = 256 // elem_size
        target_programs = 4 * _sm_count(device.index if device.index is not None
                                         else torch.cuda.current_device())
    block_c = min(_pow2(C), max_c)
    block_m = max(1, min(_pow2(M), tile // block_c))
    if block_m * block_c < tile:  # few rows: spend the tile on channels instead
        block_c = min(_pow2(C), max(block_c, tile // block_m))
    num_warps = max(1, min(8, block_m * block_c // 512))
    col_blocks = triton.cdiv(C, block_c)
    programs_m = max(1, target_programs // col_blocks)
    rows_per_prog = triton.cdiv(triton.cdiv(M, programs_m), block_m) * block_m
    partials = triton.cdiv(M, rows_per_prog)
    return TileConfig(block_m=block_m, block_c=block_c, rows_per_prog=rows_per_prog,
                      num_warps=num_warps, block_c_combine=min(_pow2(C), 1024 if interp else 128),
                      block_p=min(_pow2(partials), 64))


def candidate_configs(M: int, C: int, elem_size: int, device: torch.device) -> list[TileConfig]:
    """A modest sweep around `tile_config` (tile sizes x warps) for the benchmark's
    ``--sweep``: the heuristic is revised from its results, not autotuned at run time
    (autotuning would compile every variant of every kernel in the training run)."""
    base = tile_config(M, C, elem_size, device)
    out = [base]
    for scale, warps in ((0.5, 4), (2.0, 8), (1.0, 4), (4.0, 8)):
        bm = max(1, int(base.block_m * scale))
        if bm > _pow2(M):
            continue
        rpp = max(bm, triton.cdiv(base.rows_per_prog, bm) * bm)
        cfg = TileConfig(block_m=bm, block_c=base.block_c, rows_per_prog=rpp, num_warps=warps,
                         block_c_combine=base.block_c_combine,
                         block_p=min(_pow2(triton.cdiv(M, rpp)), 64))
        if cfg not in out:
            out.append(cfg)
    return out


# ============================================================================== launchers

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(t: Tensor) -> Tensor:
    """The (M, C) row view of a channels-last 4-D or a contiguous 2-D tensor (never a copy)."""
    if t.dim() == 4:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    return t


def _row_stride(t2: Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _device_guard(device: torch.device):
    if device.type == "cuda" and device.index is not None \
            and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch_bn_act_forward(x2: Tensor, y2: Tensor, weight: Optional[Tensor],
                          bias: Optional[Tensor], running_mean: Optional[Tensor],
                          running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                          res2: Optional[Tensor], training: bool, momentum: Optional[float],
                          eps: float, act: str, mean: Tensor, rstd: Tensor) -> None:
    """Fill y2 [M, C] and the saved statistics (mean, rstd [C]); update running stats.

    Training: stats -> combine -> normalise (3 launches). Eval: normalise only, reading
    the running statistics directly. No host synchronisation.
    """
    M, C = x2.shape
    cfg = tile_config(M, C, x2.element_size(), x2.device)
    acc = _TL_DTYPES[_acc_dtype(x2.dtype)]
    dummy = mean
    with _device_guard(x2.device):
        if training:
            partials = triton.cdiv(M, cfg.rows_per_prog)
            part = torch.empty((2, partials, C), device=x2.device, dtype=mean.dtype)
            grid = (partials, triton.cdiv(C, cfg.block_c))
            _bn_stats_kernel[grid](
                x2, part[0], part[1], M, C, _row_stride(x2), cfg.rows_per_prog,
                ACC=acc, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
            update = running_mean is not None and running_var is not None
            cma = update and momentum is None
            _bn_stats_combine_kernel[(triton.cdiv(C, cfg.block_c_combine),)](
                part[0], part[1], mean, rstd,
                running_mean if update else dummy, running_var if update else dummy,
                num_batches_tracked if cma else dummy,
                partials, M, C, cfg.rows_per_prog,
                0.0 if momentum is None else float(momentum), float(eps),
                UPDATE_RUNNING=update, CMA=cma, ACC=acc,
                BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c_combine, num_warps=4)
            stat_mean, stat, is_var = mean, rstd, False
        else:
            stat_mean, stat, is_var = running_mean, running_var, True
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(C, cfg.block_c))
        _bn_act_fwd_kernel[grid](
            x2, res2 if res2 is not None else x2, y2, stat_mean, stat,
            weight if weight is not None else dummy, bias if bias is not None else dummy,
            mean, rstd, M, C, _row_stride(x2),
            _row_stride(res2) if res2 is not None else 0, _row_stride(y2), float(eps),
            HAS_RES=res2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            STAT_IS_VAR=is_var, ACT=_ACT_IDS[act], ACC=acc,
            BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


def launch_bn_act_backward(dy2: Tensor, x2: Tensor, y2: Optional[Tensor],
                           res2: Optional[Tensor], weight: Optional[Tensor],
                           bias: Optional[Tensor], mean: Tensor, rstd: Tensor, training: bool,
                           act: str, dx2: Optional[Tensor], dres2: Optional[Tensor],
                           dweight: Optional[Tensor], dbias: Optional[Tensor]) -> None:
    """Fill whichever of dx2, dres2 [M, C], dweight, dbias [C] are given (None: not needed).

    Training: reduce (dz, dres, partial S1/S2) -> combine (S1, S2, dw, db) -> dx.
    Eval: reduce writes dx and dres directly; combine only when dw or db is wanted.
    """
    M, C = x2.shape
    cfg = tile_config(M, C, x2.element_size(), x2.device)
    acc_t = mean.dtype
    acc = _TL_DTYPES[acc_t]
    need_sums = dweight is not None or dbias is not None or (training and dx2 is not None)
    store_dx_now = not training and dx2 is not None
    if not (need_sums or store_dx_now or dres2 is not None):
        return
    partials = triton.cdiv(M, cfg.rows_per_prog)
    dummy = mean
    with _device_guard(x2.device):
        part = (torch.empty((2, partials, C), device=x2.device, dtype=acc_t) if need_sums
                else torch.empty((2, 1, 1), device=x2.device, dtype=acc_t))
        grid = (partials, triton.cdiv(C, cfg.block_c))
        _bn_act_bwd_reduce_kernel[grid](
            dy2, x2, y2 if y2 is not None else x2, res2 if res2 is not None else x2,
            mean, rstd, weight if weight is not None else dummy,
            bias if bias is not None else dummy,
            dres2 if dres2 is not None else dy2, dx2 if store_dx_now else dy2,
            part[0], part[1], M, C,
            _row_stride(dy2), _row_stride(x2), _row_stride(y2) if y2 is not None else 0,
            _row_stride(res2) if res2 is not None else 0,
            _row_stride(dres2) if dres2 is not None else 0,
            _row_stride(dx2) if store_dx_now else 0,
            cfg.rows_per_prog,
            HAS_RES=res2 is not None, HAS_W=weight is not None, HAS_B=bias is not None,
            STORE_DRES=dres2 is not None, STORE_DX=store_dx_now, COMPUTE_SUMS=need_sums,
            ACT=_ACT_IDS[act], ACC=acc, BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c,
            num_warps=cfg.num_warps)
        if not need_sums:
            return
        sums = torch.empty((2, C), device=x2.device, dtype=acc_t)
        _bn_act_bwd_combine_kernel[(triton.cdiv(C, cfg.block_c_combine),)](
            part[0], part[1], sums[0], sums[1],
            dweight if dweight is not None else dummy, dbias if dbias is not None else dummy,
            partials, C, STORE_DW=dweight is not None, STORE_DB=dbias is not None, ACC=acc,
            BLOCK_P=cfg.block_p, BLOCK_C=cfg.block_c_combine, num_warps=4)
        if not (training and dx2 is not None):
            return
        # dz can be read back from dres when the reduce pass stored it at the gradient's
        # precision (same dtype): one tensor read instead of dy (+ y or res).
        dz_stored = dres2 is not None and dres2.dtype == dy2.dtype
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(C, cfg.block_c))
        _bn_act_bwd_dx_kernel[grid](
            dy2, x2, y2 if y2 is not None else x2, res2 if res2 is not None else x2,
            dres2 if dz_stored else dy2, mean, rstd,
            weight if weight is not None else dummy, bias if bias is not None else dummy,
            sums[0], sums[1], dx2, M, C,
            _row_stride(dy2), _row_stride(x2), _row_stride(y2) if y2 is not None else 0,
            _row_stride(res2) if res2 is not None else 0,
            _row_stride(dres2) if dz_stored else 0, _row_stride(dx2),
            DZ_STORED=dz_stored, HAS_RES=res2 is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, ACT=_ACT_IDS[act], ACC=acc,
            BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)


# ============================================================================= custom ops

def _out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _channels_last_like(t: Tensor) -> Tensor:
    """`t` in the row layout the kernels read; a copy only for a non-channels-last gradient."""
    if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 2 and not t.is_contiguous():
        return t.contiguous()
    return t


def _empty_like_rows(x: Tensor, dtype: torch.dtype) -> Tensor:
    """An output shaped and laid out like x (channels-last stays channels-last)."""
    if x.dim() == 4:
        return torch.empty_like(x, dtype=dtype, memory_format=torch.channels_last)
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastres::bn_act_fwd", mutates_args=("running_mean", "running_var"))
def _bn_act_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], residual: Optional[Tensor],
                   training: bool, momentum: Optional[float], eps: float,
                   act: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd). Training updates running_mean/var in place when given."""
    x = _channels_last_like(x)
    res = _channels_last_like(residual) if residual is not None else None
    y = _empty_like_rows(x, _out_dtype(x, residual))
    C = x.shape[1]
    # Two allocations: custom-op outputs may not alias one another.
    mean = torch.empty((C,), device=x.device, dtype=_acc_dtype(x.dtype))
    rstd = torch.empty((C,), device=x.device, dtype=_acc_dtype(x.dtype))
    if x.numel() == 0:  # an empty batch (eval only: training needs > 1 value per channel)
        mean.copy_(running_mean)
        rstd.copy_(torch.rsqrt(running_var.to(rstd.dtype) + eps))
        return y, mean, rstd
    launch_bn_act_forward(_rows(x), _rows(y), weight, bias, running_mean, running_var,
                          num_batches_tracked, _rows(res) if res is not None else None,
                          training, momentum, eps, act, mean, rstd)
    return y, mean, rstd


@_bn_act_fwd_op.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training,
      momentum, eps, act):
    y = _empty_like_rows(x, _out_dtype(x, residual))
    C = x.shape[1]
    acc = _acc_dtype(x.dtype)
    return y, x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


@torch.library.custom_op("fastres::bn_act_bwd", mutates_args=())
def _bn_act_bwd_op(dy: Tensor, x: Tensor, y: Optional[Tensor], residual: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                   rstd: Tensor, training: bool, act: str, needs_dx: bool, needs_dres: bool,
                   needs_dweight: bool, needs_dbias: bool,
                   res_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dres, dweight, dbias); a gradient that is not needed comes back as an empty
    tensor (custom ops cannot return None)."""
    dy = _channels_last_like(dy)
    dx = _empty_like_rows(x, x.dtype) if needs_dx else x.new_empty(0)
    dres = (_empty_like_rows(x, res_dtype if res_dtype is not None else dy.dtype)
            if needs_dres else x.new_empty(0))
    dw = torch.empty_like(weight) if needs_dweight else x.new_empty(0)
    db = torch.empty_like(bias) if needs_dbias else x.new_empty(0)
    if x.numel() == 0:
        dw.zero_()
        db.zero_()
        return dx, dres, dw, db
    launch_bn_act_backward(
        _rows(dy), _rows(x), _rows(y) if y is not None else None,
        _rows(residual) if residual is not None else None, weight, bias, mean, rstd,
        training, act, _rows(dx) if needs_dx else None, _rows(dres) if needs_dres else None,
        dw if needs_dweight else None, db if needs_dbias else None)
    return dx, dres, dw, db


@_bn_act_bwd_op.register_fake
def _(dy, x, y, residual, weight, bias, mean, rstd, training, act, needs_dx, needs_dres,
      needs_dweight, needs_dbias, res_dtype):
    dx = _empty_like_rows(x, x.dtype) if needs_dx else x.new_empty(0)
    dres = (_empty_like_rows(x, res_dtype if res_dtype is not None else dy.dtype)
            if needs_dres else x.new_empty(0))
    dw = torch.empty_like(weight) if needs_dweight else x.new_empty(0)
    db = torch.empty_like(bias) if needs_dbias else x.new_empty(0)
    return dx, dres, dw, db


# ============================================================================== autograd

class BNActFunction(torch.autograd.Function):
    """Autograd for `fastres::bn_act_fwd` / `fastres::bn_act_bwd`; saves x, y (relu),
    residual (gelu), mean and rstd -- see the derivation above the backward kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                residual, training, momentum, eps, act):
        y, mean, rstd = torch.ops.fastres.bn_act_fwd(
            x, weight, bias, running_mean, running_var, num_batches_tracked, residual,
            training, momentum, eps, act)
        ctx.training = training
        ctx.act = act
        ctx.has_res = residual is not None
        ctx.res_dtype = residual.dtype if residual is not None else None
        ctx.save_for_backward(
            x, y if act == "relu" else None, residual if act == "gelu" else None,
            weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, residual, weight, bias, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        needs_dx, needs_dw, needs_db = needs[0], needs[1], needs[2]
        needs_dres = ctx.has_res and needs[6]
        dx, dres, dw, db = torch.ops.fastres.bn_act_bwd(
            dy, x, y, residual, weight, bias, mean, rstd, ctx.training, ctx.act,
            needs_dx, needs_dres, needs_dw, needs_db, ctx.res_dtype)
        return (dx if needs_dx else None, dw if needs_dw else None, db if needs_db else None,
                None, None, None, dres if needs_dres else None, None, None, None, None)


# ============================================================================ functional

def _check_layout(t: Tensor, what: str) -> None:
    if t.dim() == 4:
        if not t.is_contiguous(memory_format=torch.channels_last):
            raise ValueError(
                f"fused BN-act kernels need channels-last tensors, but {what} has shape "
                f"{tuple(t.shape)} and strides {t.stride()}; convert the model and its input "
                f"with `.to(memory_format=torch.channels_last)` (or set FASTRES_KERNELS=0 for "
                f"the PyTorch path)")
    elif t.dim() == 2:
        if not t.is_contiguous():
            raise ValueError(f"fused BN-act kernels need a contiguous (N, C) {what}, got "
                             f"strides {t.stride()}; call `.contiguous()` first")
    else:
        raise ValueError(f"fused BN-act kernels take 4-D (N, C, H, W) or 2-D (N, C) input, "
                         f"got {what} of shape {tuple(t.shape)}")


def fused_bn_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 training: bool, momentum: Optional[float], eps: float,
                 residual: Optional[Tensor] = None, act: str = "relu", *,
                 num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``act(batch_norm(x) + residual)`` with `F.batch_norm`'s meaning of the arguments.

    x: channels-last (N, C, H, W) or contiguous (N, C), fp32/bf16/fp16/fp64 (a ValueError
    otherwise; see the module docstring). residual: same shape and layout; the output dtype
    is promote(x.dtype, residual.dtype). momentum=None means the cumulative average and needs
    `num_batches_tracked` (already incremented for this batch; read on the device, no sync).
    Runs the Triton kernels where `fastres.kernels.kernels_enabled` and the device allow,
    else `bn_act_reference`.
    """
    if act not in _ACT_IDS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if not _env.use_triton(x.device):
        return bn_act_reference(x, weight, bias, running_mean, running_var, training,
                                momentum, eps, residual, act,
                                num_batches_tracked=num_batches_tracked)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fused BN-act takes float32/bfloat16/float16/float64 input, "
                         f"got {x.dtype}")
    _check_layout(x, "the input")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} must equal the input "
                             f"shape {tuple(x.shape)} (no broadcasting in the fused kernel)")
        _check_layout(residual, "the residual")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("eval mode (training=False) needs running_mean and running_var")
    rows = x.numel() // C if C else 0
    if training and rows <= 1:
        raise ValueError(f"expected more than 1 value per channel when training, got input "
                         f"of shape {tuple(x.shape)}")
    if training and running_mean is not None and momentum is None \
            and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    return BNActFunction.apply(x, weight, bias, running_mean, running_var,
                               num_batches_tracked, residual, bool(training), momentum,
                               float(eps), act)


# ================================================================================ module

class FusedBatchNormAct2d(BatchNormAct2d):
    """`BatchNormAct2d` (``act(bn(x) + residual)``) through the fused Triton kernels.

    Same constructor, parameters, buffers and state dict as `nn.BatchNorm2d`; running
    statistics, `num_batches_tracked` and `momentum=None` behave as nn.BatchNorm2d's.
    CUDA tensors run the kernels; CPU tensors run the PyTorch reference (the parent's
    forward) unless Triton's interpreter was on at import (CI); ``FASTRES_KERNELS=0``
    selects the reference everywhere. Input must be channels-last (ValueError otherwise).
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if not _env.use_triton(x.device):
            return super().forward(x, residual)
        self._check_input_dim(x)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return fused_bn_act(
            x, self.weight, self.bias, self.running_mean if track else None,
            self.running_var if track else None, bn_training, self.momentum, self.eps,
            residual, self.act,
            num_batches_tracked=self.num_batches_tracked if track else None)
