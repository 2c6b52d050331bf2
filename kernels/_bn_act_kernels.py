"""The Triton kernels of the fused BN(+add)+act op (v2); launched by `fastres.kernels.bn_act`.

Imported only where Triton is (`fastres.kernels._env.HAS_TRITON`). Every tensor is a dense
(M, C) row-major matrix: a channels-last (N, C, H, W) tensor is one row per pixel with the
channels contiguous, so element (m, c) sits at ``base + m * C + c`` (row stride C). The
1-bit ReLU mask is an (M, CB) uint8 matrix, CB = cdiv(C, 8): bit c % 8 of byte (m, c // 8)
is [z > 0]. Statistics buffers are (2, C) in the accumulation dtype: row 0 the mean, row 1
rstd (forward) or S1 = sum dz, S2 = sum dz * x_hat (backward). Partials are (2, P, C).

Grids are 1-D, ``pid = m_block * NCB + c_block``: channel blocks fastest, so programs that
run side by side read neighbouring 128-byte pieces of the same rows; 1-D also lifts CUDA's
65535 limit on the second grid dimension (a 2**31-element tensor has ~2**18 row tiles).

Reductions (forward statistics, backward sums) use the last-program combine: every program
writes its partial for its (row slab, channel block), then takes a ticket with an acq_rel
atomic on that channel block's counter; the program that draws ticket P - 1 is the last one
to finish, sees every partial (release/acquire through the counter, after a CTA barrier so
the whole CTA's stores are covered; partials are read with `.cg`, past the non-coherent L1),
combines them in a fixed order (so results do not depend on which program came last), writes
the per-channel result and resets the counter to 0 for the next launch. One launch instead
of a reduce launch plus a one-CTA combine launch, and the combines of different channel
blocks run in parallel.

Numerics: everything in ACC (fp32; fp64 for fp64 input); division and square root are the
IEEE-rounded `div_rn` / `sqrt_rn` where they feed the statistics (a GPU's default `/` and
`sqrt` are approximate, the interpreter's exact: with these the two agree); outputs are
rounded once, to the output dtype. dz is never rounded before the reductions (only the
stored residual gradient is rounded, to its dtype). GELU uses `erf` and `exp`, SiLU `exp`
and a plain `/` (its sigmoid, 1 / (1 + exp(-z))), which are a few fp32 ulps off on a GPU:
far below bf16's resolution, inside the fp32 tolerances.

Activations (the ACT constexpr): 0 identity, 1 relu, 2 gelu, 3 silu. For ACT >= 2 the
derivative depends on z itself, so the backward rebuilds z = x_hat * w + b [+ res] from the
saved input (and the saved residual).
"""
from __future__ import annotations

import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _div_rn(a, b, ACC: tl.constexpr):
    """a / b rounded to nearest (a GPU's fp32 `/` is approximate; fp64's is IEEE already,
    and div_rn takes fp32 only)."""
    if ACC == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _rsqrt_rn(v, ACC: tl.constexpr):
    """1 / sqrt(v), both correctly rounded (`tl.math.rsqrt` / `sqrt` are approximate)."""
    one = tl.full(v.shape, 1.0, dtype=ACC)
    if ACC == tl.float32:
        return tl.math.div_rn(one, tl.math.sqrt_rn(v))
    else:
        return one / tl.sqrt(v)


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)), stable at both ends: exp(-z) overflows to inf for z < -88 (fp32),
    giving 0, and underflows to 0 for large z, giving 1; no inf / inf, no cancellation."""
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    """act(z). ReLU as a `where`, so NaN propagates as in torch (tl.maximum would drop it)."""
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))
    elif ACT == 3:
        z = z * _sigmoid(z)
    return z


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """act'(z) for the activations whose derivative needs z (ACT >= 2).
    gelu: Phi(z) + z phi(z); silu: s (1 + z (1 - s)) with s = sigmoid(z)."""
    if ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
        pdf = _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
        g = cdf + z * pdf
    else:
        s = _sigmoid(z)
        g = s * (1.0 + z * (1.0 - s))
    return g


@triton.jit
def _tile(pid, NCB, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, M, C):
    """(rows int64 [BLOCK_M], cols [BLOCK_C], mask [BLOCK_M, BLOCK_C], c_block) of program pid
    for an elementwise pass (one BLOCK_M x BLOCK_C tile per program)."""
    pid_c = pid % NCB
    pid_m = pid // NCB
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    return rows, cols, mask, pid_c


@triton.jit
def _relu_bits(MASK, rows, pid_c, M, CB, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """[z > 0] for a BLOCK_M x BLOCK_C tile, from its BLOCK_M x BLOCK_C/8 bytes of the 1-bit
    mask: one contiguous byte tile per row (vector loads), bits spread out in registers."""
    bcols = pid_c * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
    bmask = (rows < M)[:, None] & (bcols < CB)[None, :]
    packed = tl.load(MASK + rows[:, None] * CB + bcols[None, :], mask=bmask, other=0)
    bits = (packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
    return tl.reshape(bits, [BLOCK_M, BLOCK_C]) != 0


@triton.jit
def _dz(DY, MASK, RES, rows, cols, mask, xh, w, b, M, C, CB, pid_c, HAS_RES: tl.constexpr,
        ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """dL/dz for one tile, in ACC (never rounded: it feeds the sums).
    relu: dy where z > 0 (from the mask); identity: dy; gelu: dy * (Phi(z) + z phi(z));
    silu: dy * s (1 + z (1 - s)), s = sigmoid(z); for gelu and silu
    z = x_hat * w + b [+ res] is rebuilt from the saved input."""
    offs = rows[:, None] * C + cols[None, :]
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    if ACT == 1:
        dy = tl.where(_relu_bits(MASK, rows, pid_c, M, CB, BLOCK_M, BLOCK_C), dy, 0.0)
    elif ACT >= 2:  # gelu, silu: act' needs z
        z = xh * w[None, :] + b[None, :]
        if HAS_RES:
            z += tl.load(RES + offs, mask=mask, other=0.0).to(ACC)
        dy = dy * _act_grad(z, ACT)
    return dy


@triton.jit
def _channel_params(STATS, W, B, cols, cmask, C, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean, rstd (from the (2, C) stats buffer), w (1 without affine), b (0 without)."""
    mean = tl.load(STATS + cols, mask=cmask, other=0.0).to(ACC)
    rstd = tl.load(STATS + C + cols, mask=cmask, other=0.0).to(ACC)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    else:
        w = tl.full([BLOCK_C], 1.0, dtype=ACC)
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    else:
        b = tl.zeros([BLOCK_C], dtype=ACC)
    return mean, rstd, w, b


# ============================================================================== forward

@triton.jit
def bn_fwd_stats_kernel(
    X,              # *T [M, C] input
    PART,           # *ACC [2, P, C] scratch: per-slab mean and M2
    COUNTER,        # *int32 [NCB] tickets, 0 between launches (the last program resets)
    STATS,          # *ACC [2, C] out: batch mean, rstd = 1 / sqrt(biased var + eps)
    RUNNING_MEAN,   # *R [C] in/out (UPDATE_RUNNING)
    RUNNING_VAR,    # *R [C] in/out, unbiased variance (UPDATE_RUNNING)
    NBT,            # *int64 [1] num_batches_tracked before this batch (read if CMA)
    M,              # rows (N*H*W), > 1
    C,              # channels
    NCB,            # channel blocks = cdiv(C, BLOCK_C)
    P,              # row slabs = number of partials per channel
    rows_per_prog,  # rows per slab (a multiple of BLOCK_M)
    momentum,       # running-stat factor (unused when CMA)
    eps,            # variance epsilon
    UPDATE_RUNNING: tl.constexpr,
    CMA: tl.constexpr,          # momentum=None: factor 1 / (num_batches_tracked + 1)
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,      # partials merged per step by the last program
    NUM_STAGES: tl.constexpr,   # software-pipelining depth of the row loop (GPU)
):
    """Training forward, launch 1 of 2: statistics of one (row slab, channel block), then,
    in the last program of the channel block, the fixed-order merge and the running stats.

    Per-lane Welford (each (row lane, channel) of the tile keeps count, mean, M2: the loop
    body is elementwise, no cross-warp reduction per tile) on data shifted by the slab's
    first row (|mean| >> std stays accurate); lanes merged once with Chan's formula."""
    pid = tl.program_id(0)
    pid_c = pid % NCB
    pid_m = pid // NCB
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row0 = pid_m.to(tl.int64) * rows_per_prog
    shift = tl.load(X + row0 * C + cols, mask=cmask, other=0.0).to(ACC)
    lanes = tl.arange(0, BLOCK_M)
    cnt = tl.zeros([BLOCK_M], dtype=ACC)
    mean = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    one = tl.full([BLOCK_M], 1.0, dtype=ACC)
    for start in tl.range(0, rows_per_prog, BLOCK_M, num_stages=NUM_STAGES):
        rows = row0 + start + lanes
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(ACC)
        cnt = cnt + rmask.to(ACC)
        inv = _div_rn(one, tl.maximum(cnt, one), ACC)
        delta = tl.where(mask, x - shift[None, :] - mean, 0.0)
        mean = mean + delta * inv[:, None]
        m2 = m2 + delta * tl.where(mask, x - shift[None, :] - mean, 0.0)
    n = tl.sum(cnt, axis=0)
    mean_p = tl.sum(cnt[:, None] * mean, axis=0) / tl.maximum(n, 1.0)
    d = tl.where((cnt > 0)[:, None], mean - mean_p[None, :], 0.0)
    m2_p = tl.sum(m2, axis=0) + tl.sum(cnt[:, None] * d * d, axis=0)
    part = pid_m.to(tl.int64) * C + cols
    tl.store(PART + part, shift + mean_p, mask=cmask)
    tl.store(PART + P * C + part, m2_p, mask=cmask)
    # Every thread's partial stores before the ticket (the atomic is one thread's).
    tl.debug_barrier()
    ticket = tl.atomic_add(COUNTER + pid_c, 1, sem="acq_rel")
    if ticket == P - 1:
        # The last program: merge the P partials in slab order (deterministic), shifted by
        # the first partial mean (partial means differ by ~std/sqrt(rows): small sums).
        ref = tl.load(PART + cols, mask=cmask, other=0.0, cache_modifier=".cg").to(ACC)
        tot = tl.zeros([BLOCK_C], dtype=ACC)
        mu = tl.zeros([BLOCK_C], dtype=ACC)
        q = tl.zeros([BLOCK_C], dtype=ACC)
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            pmask = ps < P
            n_p = M - ps.to(tl.int64) * rows_per_prog
            n_p = tl.where(pmask, tl.minimum(tl.maximum(n_p, 0), rows_per_prog), 0).to(ACC)
            mask = pmask[:, None] & cmask[None, :]
            offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
            mu_p = tl.load(PART + offs, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
            mu_p = tl.where(mask, mu_p - ref[None, :], 0.0)
            q_p = tl.load(PART + P * C + offs, mask=mask, other=0.0,
                          cache_modifier=".cg").to(ACC)
            n_t = tl.sum(n_p, axis=0)
            mean_t = tl.sum(n_p[:, None] * mu_p, axis=0) / tl.maximum(n_t, 1.0)
            dd = tl.where(mask, mu_p - mean_t[None, :], 0.0)
            q_t = tl.sum(q_p + n_p[:, None] * dd * dd, axis=0)
            n_new = tot + n_t
            frac = n_t / tl.maximum(n_new, 1.0)
            delta_t = mean_t - mu
            mu = mu + delta_t * frac
            q = q + q_t + delta_t * delta_t * tot * frac
            tot = n_new
        mu = ref + mu
        var = q / M
        rstd = _rsqrt_rn(var + eps, ACC)
        tl.store(STATS + cols, mu, mask=cmask)
        tl.store(STATS + C + cols, rstd, mask=cmask)
        if UPDATE_RUNNING:
            if CMA:
                f = 1.0 / (tl.load(NBT) + 1).to(ACC)
            else:
                f = momentum
            rm = tl.load(RUNNING_MEAN + cols, mask=cmask, other=0.0).to(ACC)
            rv = tl.load(RUNNING_VAR + cols, mask=cmask, other=0.0).to(ACC)
            unbiased = q / (M - 1)
            rm = f * mu + (1.0 - f) * rm
            rv = f * unbiased + (1.0 - f) * rv
            tl.store(RUNNING_MEAN + cols, rm.to(RUNNING_MEAN.dtype.element_ty), mask=cmask)
            tl.store(RUNNING_VAR + cols, rv.to(RUNNING_VAR.dtype.element_ty), mask=cmask)
        tl.atomic_xchg(COUNTER + pid_c, 0, sem="relaxed")


@triton.jit
def bn_fwd_apply_kernel(
    X,              # *T [M, C] input
    RES,            # *R [M, C] residual (HAS_RES)
    Y,              # *O [M, C] out: act((x - mean) * rstd * w + b + res)
    MASK,           # *uint8 [M, CB] out: 1-bit [z > 0] (STORE_MASK)
    STATS,          # *ACC [2, C] training: mean, rstd from launch 1
    RUNNING_MEAN,   # *R [C] eval: the mean used
    RUNNING_VAR,    # *R [C] eval: the variance used
    STATS_OUT,      # *ACC [2, C] eval: out, the mean and rstd used (STORE_STATS)
    W,              # *P [C] (HAS_W)
    B,              # *P [C] (HAS_B)
    NBT,            # *int64 [1] num_batches_tracked, incremented once (INC_NBT)
    M,
    C,
    CB,             # mask bytes per row
    NCB,            # channel blocks
    eps,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    EVAL: tl.constexpr,         # statistics from the running buffers
    STORE_STATS: tl.constexpr,  # eval with a backward to come: save mean, rstd
    STORE_MASK: tl.constexpr,   # relu with a backward to come
    INC_NBT: tl.constexpr,      # training with running stats: num_batches_tracked += 1
    ACT: tl.constexpr,          # 0 identity, 1 relu, 2 gelu, 3 silu
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Normalise + add + act for one tile (training launch 2 of 2; eval's only launch)."""
    pid = tl.program_id(0)
    rows, cols, mask, pid_c = _tile(pid, NCB, BLOCK_M, BLOCK_C, M, C)
    cmask = cols < C
    if EVAL:
        mean = tl.load(RUNNING_MEAN + cols, mask=cmask, other=0.0).to(ACC)
        var = tl.load(RUNNING_VAR + cols, mask=cmask, other=1.0).to(ACC)
        rstd = _rsqrt_rn(var + eps, ACC)
        if STORE_STATS:
            first = cmask & (pid < NCB)
            tl.store(STATS_OUT + cols, mean, mask=first)
            tl.store(STATS_OUT + C + cols, rstd, mask=first)
    else:
        mean = tl.load(STATS + cols, mask=cmask, other=0.0).to(ACC)
        rstd = tl.load(STATS + C + cols, mask=cmask, other=0.0).to(ACC)
        if INC_NBT:
            if pid == 0:  # one program; launch 1 read the old value (no race)
                tl.store(NBT, tl.load(NBT) + 1)
    if HAS_W:
        scale = rstd * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    else:
        scale = rstd
    if HAS_B:
        shift = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    else:
        shift = tl.zeros([BLOCK_C], dtype=ACC)
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    # (x - mean) * scale, not x * scale + (b - mean * scale): no cancellation at |mean| >> std.
    z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RES:
        z += tl.load(RES + offs, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, _act_fwd(z, ACT).to(Y.dtype.element_ty), mask=mask)
    if STORE_MASK:
        bits = ((z > 0) & mask).to(tl.int32)
        bits = tl.reshape(bits, [BLOCK_M, BLOCK_C // 8, 8])
        weights = 1 << tl.arange(0, 8)
        packed = tl.sum(bits * weights[None, None, :], axis=2).to(tl.uint8)
        bcols = pid_c * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
        bmask = (rows < M)[:, None] & (bcols < CB)[None, :]
        tl.store(MASK + rows[:, None] * CB + bcols[None, :], packed, mask=bmask)


# ============================================================================= backward
#
# Per channel (i over the M rows):
#   forward   mu = (1/M) sum x_i     var = (1/M) sum (x_i - mu)^2     r = 1/sqrt(var + eps)
#             xh_i = (x_i - mu) r    z_i = w xh_i + b + res_i        y_i = act(z_i)
#   given g_i = dL/dy_i:
#             dz_i = g_i act'(z_i)   (relu: [z_i > 0], the saved 1-bit mask; identity: 1;
#                                     gelu: Phi(z_i) + z_i phi(z_i); silu: s_i (1 + z_i
#                                     (1 - s_i)), s_i = sigmoid(z_i); z rebuilt from x)
#             dres_i = dz_i          db = sum dz_i =: S1          dw = sum dz_i xh_i =: S2
#   training: dx_i = w r (dz_i - S1/M - xh_i S2/M)       (mu and r depend on x)
#   eval:     dx_i = w r dz_i                             (they do not)
# Saved: x (xh is needed at every element: the S2 term of dx_i does not vanish where
# dz_i = 0), the 1-bit mask (relu), the residual (gelu, silu), mean and rstd, w and b. Not
# saved: y, z, xh. dz stays in ACC for S1 and S2 and for dx; only dres is rounded, to its
# dtype.


@triton.jit
def bn_bwd_reduce_kernel(
    DY,             # *G [M, C] dL/dy
    X,              # *T [M, C] saved input
    MASK,           # *uint8 [M, CB] saved relu mask (ACT == 1)
    RES,            # *R [M, C] saved residual (gelu/silu with HAS_RES)
    STATS,          # *ACC [2, C] saved mean, rstd
    W,              # *P [C] (HAS_W)
    B,              # *P [C] (gelu/silu with HAS_B)
    DRES,           # *R [M, C] out: dres = dz (STORE_DRES)
    DX,             # *T [M, C] out, eval: w rstd dz (STORE_DX)
    PART,           # *ACC [2, P, C] scratch: per-slab S1, S2 (COMPUTE_SUMS)
    COUNTER,        # *int32 [NCB] tickets (COMPUTE_SUMS)
    SUMS,           # *ACC [2, C] out: S1, S2 for the dx pass (COMPUTE_SUMS)
    DW,             # *P [C] out: dL/dw = S2 (STORE_DW)
    DB,             # *P [C] out: dL/db = S1 (STORE_DB)
    M,
    C,
    CB,
    NCB,
    P,
    rows_per_prog,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STORE_DRES: tl.constexpr,
    STORE_DX: tl.constexpr,
    COMPUTE_SUMS: tl.constexpr,
    STORE_DW: tl.constexpr,
    STORE_DB: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Backward launch 1: dz, [dres], [eval dx], and the channel sums S1, S2 (per-lane
    partial sums over the slab, then the last-program combine -> S1, S2, dw, db)."""
    pid = tl.program_id(0)
    pid_c = pid % NCB
    pid_m = pid // NCB
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, rstd, w, b = _channel_params(STATS, W, B, cols, cmask, C, HAS_W, HAS_B, ACC, BLOCK_C)
    s1 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    s2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    row0 = pid_m.to(tl.int64) * rows_per_prog
    for start in tl.range(0, rows_per_prog, BLOCK_M, num_stages=NUM_STAGES):
        rows = row0 + start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        xh = (x - mean[None, :]) * rstd[None, :]
        dz = _dz(DY, MASK, RES, rows, cols, mask, xh, w, b, M, C, CB, pid_c, HAS_RES, ACT,
                 ACC, BLOCK_M, BLOCK_C)
        if STORE_DRES:
            tl.store(DRES + offs, dz.to(DRES.dtype.element_ty), mask=mask)
        if STORE_DX:
            tl.store(DX + offs, (dz * (w * rstd)[None, :]).to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_SUMS:
            dz = tl.where(mask, dz, 0.0)
            s1 += dz
            s2 += dz * xh
    if COMPUTE_SUMS:
        part = pid_m.to(tl.int64) * C + cols
        tl.store(PART + part, tl.sum(s1, axis=0), mask=cmask)
        tl.store(PART + P * C + part, tl.sum(s2, axis=0), mask=cmask)
        tl.debug_barrier()
        ticket = tl.atomic_add(COUNTER + pid_c, 1, sem="acq_rel")
        if ticket == P - 1:
            t1 = tl.zeros([BLOCK_C], dtype=ACC)
            t2 = tl.zeros([BLOCK_C], dtype=ACC)
            for p0 in range(0, P, BLOCK_P):
                ps = p0 + tl.arange(0, BLOCK_P)
                mask = (ps < P)[:, None] & cmask[None, :]
                offs = ps.to(tl.int64)[:, None] * C + cols[None, :]
                t1 += tl.sum(tl.load(PART + offs, mask=mask, other=0.0,
                                     cache_modifier=".cg").to(ACC), axis=0)
                t2 += tl.sum(tl.load(PART + P * C + offs, mask=mask, other=0.0,
                                     cache_modifier=".cg").to(ACC), axis=0)
            tl.store(SUMS + cols, t1, mask=cmask)
            tl.store(SUMS + C + cols, t2, mask=cmask)
            if STORE_DW:
                tl.store(DW + cols, t2.to(DW.dtype.element_ty), mask=cmask)
            if STORE_DB:
                tl.store(DB + cols, t1.to(DB.dtype.element_ty), mask=cmask)
            tl.atomic_xchg(COUNTER + pid_c, 0, sem="relaxed")


@triton.jit
def bn_bwd_dx_kernel(
    DY,             # *G [M, C] dL/dy (unless DZ_STORED)
    X,              # *T [M, C] saved input
    MASK,           # *uint8 [M, CB] saved relu mask (ACT == 1, unless DZ_STORED)
    RES,            # *R [M, C] saved residual (gelu/silu recompute, unless DZ_STORED)
    DZ,             # *R [M, C] dres written by launch 1 (DZ_STORED)
    STATS,          # *ACC [2, C] saved mean, rstd
    W,
    B,
    SUMS,           # *ACC [2, C] S1, S2 from launch 1
    DX,             # *T [M, C] out: w rstd (dz - S1/M - xh S2/M)
    M,
    C,
    CB,
    NCB,
    DZ_STORED: tl.constexpr,    # read dz back from DZ instead of rebuilding it
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Training backward launch 2 of 2: the elementwise dx."""
    pid = tl.program_id(0)
    rows, cols, mask, pid_c = _tile(pid, NCB, BLOCK_M, BLOCK_C, M, C)
    cmask = cols < C
    mean, rstd, w, b = _channel_params(STATS, W, B, cols, cmask, C, HAS_W, HAS_B, ACC, BLOCK_C)
    count = tl.full([BLOCK_C], M, dtype=ACC)
    m1 = _div_rn(tl.load(SUMS + cols, mask=cmask, other=0.0).to(ACC), count, ACC)
    m2 = _div_rn(tl.load(SUMS + C + cols, mask=cmask, other=0.0).to(ACC), count, ACC)
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    xh = (x - mean[None, :]) * rstd[None, :]
    if DZ_STORED:
        dz = tl.load(DZ + offs, mask=mask, other=0.0).to(ACC)
    else:
        dz = _dz(DY, MASK, RES, rows, cols, mask, xh, w, b, M, C, CB, pid_c, HAS_RES, ACT,
                 ACC, BLOCK_M, BLOCK_C)
    dx = (w * rstd)[None, :] * (dz - m1[None, :] - xh * m2[None, :])
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
