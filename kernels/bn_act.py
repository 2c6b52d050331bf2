"""Fused BatchNorm (+ residual add) + activation for channels-last tensors, in Triton (v2).

    y = act(batch_norm(x) + residual)   act in {relu, identity, gelu, silu}, residual optional

Layers, bottom to top (STYLE.md habit 2):
    kernels      `fastres.kernels._bn_act_kernels` (imported only where Triton is):
                 training forward = stats (+ last-program combine, running stats) and
                 apply (normalise + add + act + 1-bit ReLU mask); training backward =
                 reduce (dz in fp32, dres, sums + last-program combine, dw, db) and dx.
                 Eval: one launch each way.
    launchers    `_forward`, `_backward`: look up a cached launch plan (tile config, grids,
                 constexprs) per (shape, dtypes, flags) and the current stream's scratch
                 (partials, ticket counters -- zeroed on the stream before each
                 reduction launch -- and sums), allocate the outputs, launch. No
                 autograd, no host sync, no `triton.cdiv` in hot code.
    custom ops   `fastres::bn_act_fwd` (mutates the running statistics and
                 num_batches_tracked) and `fastres::bn_act_bwd`, with fake impls, so that
                 `torch.compile(fullgraph=True)` keeps them whole.
    autograd     `BNActFunction`: in eager mode it calls the launchers directly (the custom
                 op dispatch costs ~30 µs a call); while Dynamo traces, it calls the ops. It
                 is an autograd.Function rather than `register_autograd` because torch
                 refuses autograd formulas for ops that mutate inputs.
    functional   `fused_bn_act(...)`: validates, then the kernels or the reference.
    module       `FusedBatchNormAct2d`, an `nn.BatchNorm2d` subclass (same state dict).

The channels-last contract, the same on every path (kernels, interpreter, reference):
4-D input must be channels-last (`x.is_contiguous(memory_format=torch.channels_last)`),
2-D (N, C) input contiguous; anything else raises `ConfigError` (a ValueError) naming the
fix, `.to(memory_format=torch.channels_last)`, because converting here would silently add a
full copy each way. (N, C, 1, 1) and C = 1 tensors are both layouts and pass. The residual
must have x's shape and layout. The incoming gradient in backward is the one thing
converted: autograd hands over whatever layout the next op produced.

Bytes per element of one activation tensor (s = element size; the mask is 1/8 byte):
    forward, training   stats: read x | apply: read x [, res], write y [, mask]
                        relu + res: 4 s + 1/8
    forward, eval       read x [, res], write y: (2 + r) s
    backward, training  reduce: read dy, x [, mask | res], [write dres] |
                        dx: read dy, x [, mask | res] (or dres, x), write dx
                        relu + res: 6 s + 2/8 (v1 read y twice: 7 s)
See kernels/NOTES.md for the table per shape and the design.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor

from fastres.errors import ConfigError
from fastres.kernels import _env
from fastres.kernels.reference import bn_act_reference
from fastres.norm_act import BatchNormAct2d, check_act

if _env.HAS_TRITON:
    import triton.language as tl

    from fastres.kernels import _bn_act_kernels as _k

    _TL = {torch.float32: tl.float32, torch.float64: tl.float64}
else:  # pragma: no cover - exercised by the no-Triton subprocess test
    _k = None
    _TL = {}

__all__ = ["FusedBatchNormAct2d", "fused_bn_act", "BNActFunction", "TileConfig",
           "tile_config", "candidate_configs", "forced_config", "gpu_configs",
           "stub_launches", "clear_plans", "check_layout"]

# The kernels' ACT constexpr per activation (fastres.norm_act.ACTIVATIONS: a test checks
# that every activation the eager modules know has a fused kernel).
_ACT_IDS = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3}
# Activations whose derivative depends on z itself: the backward rebuilds z from x, so
# autograd saves the residual (relu keeps a 1-bit mask instead; identity needs nothing).
_Z_ACTS = frozenset(("gelu", "silu"))
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CL = torch.channels_last


def _needs_z(act: str) -> bool:
    """Whether act's backward rebuilds z = x_hat * w + b [+ residual] (gelu, silu)."""
    return act in _Z_ACTS


# ============================================================================ tile configs

@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiles and grid of one (M, C, dtype) problem.

    block_m x block_c is the tile a program holds (block_c >= 8: one mask byte per 8
    channels); rows_per_prog is the row slab one reduction program walks (a multiple of
    block_m), which fixes P = cdiv(M, rows_per_prog) partials per channel and so the
    (deterministic) combine order. num_stages pipelines the reduction loops on a GPU.
    dz_stored forces (True/False) or leaves automatic (None) the dx pass reading dz back
    from the stored residual gradient instead of rebuilding it from dy.
    """

    block_m: int
    block_c: int
    rows_per_prog: int
    num_warps: int
    block_p: int = 64
    num_stages: int = 1
    dz_stored: Optional[bool] = None


_override: Optional[TileConfig] = None
_emulated_sms: Optional[int] = None


@contextlib.contextmanager
def forced_config(config: TileConfig):
    """Use `config` for every launch inside the block (tests force small tiles to cover the
    combine paths; the benchmark sweeps candidates; the decisive experiment forces
    num_warps and dz_stored). Not thread-safe."""
    global _override
    previous, _override = _override, config
    try:
        yield config
    finally:
        _override = previous


@contextlib.contextmanager
def gpu_configs(sm_count: int = 132):
    """Choose tiles as on a GPU with `sm_count` SMs (H100 SXM / H200: 132; H100 PCIe: 114)
    whatever the device, so the interpreter runs the GPU's tile shapes, slab sizes and
    combine orders on the CPU."""
    global _emulated_sms
    previous, _emulated_sms = _emulated_sms, int(sm_count)
    try:
        yield sm_count
    finally:
        _emulated_sms = previous


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tile_config(M: int, C: int, elem_size: int, sm_count: Optional[int]) -> TileConfig:
    """The launch configuration for an (M, C) problem with `elem_size`-byte elements.

    GPU (`sm_count` given): a tile of 16 KB of input (4096 fp32 / 8192 bf16 elements), at
    most 256 bytes of channels per row (a warp reads whole 128-byte lines), widened along C
    when M is small; 8 warps for a full tile; reductions over ~2 programs per SM, each
    walking its slab with a 3-stage software pipeline. Interpreter (`sm_count` None): each
    program costs milliseconds of Python, so few large tiles.
    """
    if sm_count is None:
        tile, max_c, target = 16384, 1024, 2
    else:
        tile, max_c, target = 16384 // elem_size, 256 // elem_size, 2 * sm_count
    block_c = max(8, min(_pow2(C), max_c))
    block_m = max(1, min(_pow2(M), tile // block_c))
    if block_m * block_c < tile:  # few rows: spend the tile on channels instead
        block_c = max(8, min(_pow2(C), max(block_c, tile // block_m)))
    ncb = _cdiv(C, block_c)
    slabs = max(1, target // ncb)
    rows_per_prog = _cdiv(_cdiv(M, slabs), block_m) * block_m
    partials = _cdiv(M, rows_per_prog)
    gpu = sm_count is not None
    return TileConfig(block_m=block_m, block_c=block_c, rows_per_prog=rows_per_prog,
                      num_warps=max(1, min(8, block_m * block_c // 512)) if gpu else 1,
                      block_p=min(_pow2(partials), 64),
                      num_stages=3 if gpu and rows_per_prog >= 3 * block_m else 1)


def _config(M: int, C: int, elem_size: int, device: torch.device) -> TileConfig:
    if _override is not None:
        return _override
    if _emulated_sms is not None:
        return tile_config(M, C, elem_size, _emulated_sms)
    if device.type == "cuda" and not _env.interpreting():
        return tile_config(M, C, elem_size, _sm_count(
            device.index if device.index is not None else torch.cuda.current_device()))
    return tile_config(M, C, elem_size, None)


def candidate_configs(M: int, C: int, elem_size: int, sm_count: int) -> list[TileConfig]:
    """A modest sweep around the GPU heuristic (tile sizes, warps, pipeline depth) for
    `bench-kernels --sweep`: the heuristic is revised from measurements, not autotuned at
    run time (autotuning would compile and time every variant inside the training run)."""
    base = tile_config(M, C, elem_size, sm_count)
    out = [base]
    for scale, warps, stages in ((0.5, 4, 3), (2.0, 8, 3), (1.0, 4, 3), (1.0, 8, 1),
                                 (1.0, 8, 4)):
        bm = max(1, int(base.block_m * scale))
        if bm > _pow2(M):
            continue
        rpp = max(bm, _cdiv(base.rows_per_prog, bm) * bm)
        cfg = dataclasses.replace(base, block_m=bm, rows_per_prog=rpp, num_warps=warps,
                                  num_stages=stages, block_p=min(_pow2(_cdiv(M, rpp)), 64))
        if cfg not in out:
            out.append(cfg)
    return out


# ================================================================================ plans

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Plan:
    """Everything about a launch that depends only on (shape, dtypes, flags): built once.
    Python values only: the device scratch lives in `_scratch`, so dropping a plan frees
    nothing a queued kernel or a captured CUDA graph may still use."""

    __slots__ = ("M", "C", "CB", "ncb", "P", "rpp", "grid_red", "grid_ew", "acc",
                 "meta_red", "meta_ew", "dz_stored", "scratch", "stream")


PLAN_CACHE_SIZE = 256  # distinct (shape, dtypes, flags); past it the oldest plan goes
_plans: dict = {}


def _cache_plan(key: tuple, plan: _Plan) -> _Plan:
    if len(_plans) >= PLAN_CACHE_SIZE:
        del _plans[next(iter(_plans))]  # first in, first out: a plan is cheap to rebuild
    _plans[key] = plan
    return plan


class _Scratch:
    """Scratch memory of the reduction launches on one (device, stream, accumulation
    dtype): per-slab partials (2, P, C), the ticket counters (one per channel block), and
    the backward's channel sums S1, S2 (2, C), which its dx launch reads after its reduce
    launch. Shared by every plan on that stream (stream order serialises their launches)
    and never by two streams, whose launches could interleave. It only grows; a replaced
    buffer is kept (`retired`), since a captured CUDA graph may still address it."""

    __slots__ = ("part", "counter", "sums", "retired")


_scratch: dict = {}


def _current_stream(device: torch.device):
    """The stream launches on `device` go to (Triton's own query, the one its launcher
    makes per launch); None on the CPU, whose interpreted launches run in call order."""
    if device.type != "cuda" or _env.interpreting():
        return None
    import triton

    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.get_current_stream(index)


def _plan_scratch(plan: _Plan, device: torch.device) -> _Scratch:
    """The scratch of a reduction launch of `plan` on the current stream (remembered by the
    plan for the stream it last ran on: one compare per call), its ticket counters set to
    0 on that stream just before the launch. The last program of each channel block resets
    its counter too, so this memset of a few bytes is normally redundant; it is what keeps
    a counter left non-zero (an interrupted launch, a stray write) from corrupting this or
    any later launch: a non-zero start would make the wrong program combine."""
    stream = _current_stream(device)
    s = plan.scratch
    if s is None or plan.stream != stream:
        s = plan.scratch = _get_scratch(device, stream, plan.acc, plan.P, plan.C, plan.ncb)
        plan.stream = stream
    s.counter.zero_()
    return s


def _get_scratch(device: torch.device, stream, acc: torch.dtype, P: int, C: int,
                 ncb: int) -> _Scratch:
    key = (device, stream, acc)
    s = _scratch.get(key)
    if s is None or s.part.numel() < 2 * P * C or s.counter.numel() < ncb \
            or s.sums.numel() < 2 * C:
        s = _scratch[key] = _grow_scratch(s, device, acc, 2 * P * C, ncb, 2 * C)
    return s


def _grow_scratch(old: Optional[_Scratch], device: torch.device, acc: torch.dtype,
                  part: int, ncb: int, sums: int) -> _Scratch:
    s = _Scratch()
    s.retired = []
    if old is not None:  # grow geometrically: a few reallocations over a whole run
        s.retired = old.retired + [old.part, old.counter, old.sums]
        part = max(part, 2 * old.part.numel())
        ncb = max(ncb, old.counter.numel())
        sums = max(sums, 2 * old.sums.numel())
    s.part = torch.empty(part, device=device, dtype=acc)
    s.counter = torch.zeros(ncb, device=device, dtype=torch.int32)
    s.sums = torch.empty(sums, device=device, dtype=acc)
    return s


def clear_plans() -> None:
    """Drop every cached launch plan and the scratch memory (not while a captured CUDA
    graph that ran the fused op may still be replayed: it addresses that scratch)."""
    _plans.clear()
    _scratch.clear()


def _base_plan(M: int, C: int, elem_size: int, acc: torch.dtype, device: torch.device
               ) -> tuple[_Plan, TileConfig]:
    cfg = _config(M, C, elem_size, device)
    p = _Plan()
    p.M, p.C, p.CB = M, C, _cdiv(C, 8)
    p.ncb = _cdiv(C, cfg.block_c)
    p.rpp = cfg.rows_per_prog
    p.P = _cdiv(M, cfg.rows_per_prog)
    p.grid_red = (p.P * p.ncb,)
    p.grid_ew = (_cdiv(M, cfg.block_m) * p.ncb,)
    p.acc = acc
    p.scratch = p.stream = None
    return p, cfg


def _fwd_plan(key: tuple) -> _Plan:
    (M, C, dtype, _, _, device, training, update, cma, has_res, has_w, has_b, act,
     store_mask, store_stats, inc_nbt) = key[:16]
    acc = _acc_dtype(dtype)
    p, cfg = _base_plan(M, C, dtype.itemsize, acc, device)
    p.meta_red = dict(UPDATE_RUNNING=update, CMA=cma, ACC=_TL[acc], BLOCK_M=cfg.block_m,
                      BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p, NUM_STAGES=cfg.num_stages,
                      num_warps=cfg.num_warps)
    p.meta_ew = dict(HAS_RES=has_res, HAS_W=has_w, HAS_B=has_b, EVAL=not training,
                     STORE_STATS=store_stats, STORE_MASK=store_mask, INC_NBT=inc_nbt,
                     ACT=_ACT_IDS[act], ACC=_TL[acc], BLOCK_M=cfg.block_m,
                     BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    p.dz_stored = None
    return p


def _bwd_plan(key: tuple) -> _Plan:
    (M, C, dtype, acc, device, training, act, has_res, has_w, has_b, store_dres, store_dx,
     need_sums, store_dw, store_db, dres_dtype) = key[:16]
    p, cfg = _base_plan(M, C, dtype.itemsize, acc, device)
    p.meta_red = dict(HAS_RES=has_res, HAS_W=has_w, HAS_B=has_b, STORE_DRES=store_dres,
                      STORE_DX=store_dx, COMPUTE_SUMS=need_sums, STORE_DW=store_dw,
                      STORE_DB=store_db, ACT=_ACT_IDS[act], ACC=_TL[acc],
                      BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_P=cfg.block_p,
                      NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps)
    # dz read back from dres only where that is exact (dres in the accumulation dtype);
    # otherwise rebuilt from dy (+ mask or residual): dx never sees a rounded dz.
    dz_stored = store_dres and dres_dtype == acc and act != "identity"
    if cfg.dz_stored is not None:
        dz_stored = cfg.dz_stored and store_dres
    p.dz_stored = dz_stored
    p.meta_ew = dict(DZ_STORED=dz_stored, HAS_RES=has_res, HAS_W=has_w, HAS_B=has_b,
                     ACT=_ACT_IDS[act], ACC=_TL[acc], BLOCK_M=cfg.block_m,
                     BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return p


stub_launches = _env.stub_launches  # re-exported: `bench-kernels --host`


# ============================================================================== launchers

def _forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor],
             nbt: Optional[Tensor], residual: Optional[Tensor], training: bool,
             momentum: Optional[float], eps: float, act: str, store_mask: bool,
             store_stats: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(y, mask or None, stats (2, C) or None). Training: 2 launches (stats, apply), running
    statistics and num_batches_tracked updated on the device; eval: 1 launch. No sync."""
    C = x.shape[1]
    M = x.numel() // C
    device = x.device
    update = training and running_mean is not None
    inc_nbt = training and nbt is not None
    out_dtype = x.dtype
    if residual is not None and residual.dtype != out_dtype:
        out_dtype = torch.promote_types(out_dtype, residual.dtype)
    store_mask = store_mask and act == "relu"
    store_stats = store_stats and not training
    key = (M, C, x.dtype, residual.dtype if residual is not None else None, out_dtype, device,
           training, update, update and momentum is None, residual is not None,
           weight is not None, bias is not None, act, store_mask, store_stats, inc_nbt,
           _override, _emulated_sms)
    y = torch.empty_like(x, dtype=out_dtype)
    if M == 0:  # an empty batch (eval only: training needs > 1 value per channel)
        acc = _acc_dtype(x.dtype)
        stats = torch.stack([running_mean.to(acc), torch.rsqrt(running_var.to(acc) + eps)])
        return y, (torch.empty((0, _cdiv(C, 8)), device=device, dtype=torch.uint8)
                   if store_mask else None), stats
    stats = (torch.empty((2, C), device=device, dtype=_acc_dtype(x.dtype))
             if training or store_stats else None)
    plan = _plans.get(key)
    if plan is None:
        plan = _cache_plan(key, _fwd_plan(key))
    mask = torch.empty((M, plan.CB), device=device, dtype=torch.uint8) if store_mask else None
    dummy = y
    if training:
        scratch = _plan_scratch(plan, device)
        _env.launch(_k.bn_fwd_stats_kernel, plan.grid_red, x, scratch.part, scratch.counter,
                    stats,
                    running_mean if update else dummy, running_var if update else dummy,
                    nbt if nbt is not None else dummy, M, C, plan.ncb, plan.P, plan.rpp,
                    0.0 if momentum is None else float(momentum), float(eps), **plan.meta_red)
    _env.launch(_k.bn_fwd_apply_kernel, plan.grid_ew, x,
                residual if residual is not None else dummy, y,
                mask if mask is not None else dummy, stats if training else dummy,
                running_mean if not training else dummy, running_var if not training else dummy,
                stats if store_stats else dummy, weight if weight is not None else dummy,
                bias if bias is not None else dummy, nbt if inc_nbt else dummy,
                M, C, plan.CB, plan.ncb, float(eps), **plan.meta_ew)
    return y, mask, stats


def _as_rows_layout(t: Tensor) -> Tensor:
    """`t` in the dense row layout the kernels read; a copy only for a gradient that
    arrives in another layout (an expanded `.sum()` gradient, an NCHW one)."""
    if t.dim() == 4:
        if not t.is_contiguous(memory_format=_CL):
            return t.contiguous(memory_format=_CL)
    elif not t.is_contiguous():
        return t.contiguous()
    return t


def _backward(dy: Tensor, x: Tensor, mask: Optional[Tensor], residual: Optional[Tensor],
              weight: Optional[Tensor], bias: Optional[Tensor], stats: Tensor,
              training: bool, act: str, needs_dx: bool, needs_dres: bool, needs_dw: bool,
              needs_db: bool, res_dtype: Optional[torch.dtype]):
    """(dx, dres, dw, db), None where not needed. Training: reduce (+ combine) then dx;
    eval: one launch."""
    dy = _as_rows_layout(dy)
    C = x.shape[1]
    M = x.numel() // C
    acc = stats.dtype
    dres_dtype = (res_dtype if res_dtype is not None else dy.dtype) if needs_dres else None
    dx = torch.empty_like(x) if needs_dx else None
    dres = torch.empty_like(x, dtype=dres_dtype) if needs_dres else None
    dw = torch.empty_like(weight) if needs_dw else None
    db = torch.empty_like(bias) if needs_db else None
    need_sums = needs_dw or needs_db or (training and needs_dx)
    store_dx = needs_dx and not training
    if M == 0:
        if dw is not None:
            dw.zero_()
        if db is not None:
            db.zero_()
        return dx, dres, dw, db
    if not (need_sums or store_dx or needs_dres):
        return dx, dres, dw, db
    key = (M, C, x.dtype, acc, x.device, training, act, residual is not None,
           weight is not None, bias is not None, needs_dres, store_dx, need_sums, needs_dw,
           needs_db, dres_dtype, _override, _emulated_sms)
    plan = _plans.get(key)
    if plan is None:
        plan = _cache_plan(key, _bwd_plan(key))
    dummy = stats
    scratch = _plan_scratch(plan, x.device) if need_sums else None
    mask_ = mask if mask is not None else dummy
    res_ = residual if residual is not None else dummy
    w_ = weight if weight is not None else dummy
    b_ = bias if bias is not None else dummy
    _env.launch(_k.bn_bwd_reduce_kernel, plan.grid_red, dy, x, mask_, res_, stats, w_, b_,
                dres if dres is not None else dummy, dx if store_dx else dummy,
                scratch.part if need_sums else dummy, scratch.counter if need_sums else dummy,
                scratch.sums if need_sums else dummy, dw if dw is not None else dummy,
                db if db is not None else dummy, M, C, plan.CB, plan.ncb, plan.P, plan.rpp,
                **plan.meta_red)
    if training and needs_dx:
        _env.launch(_k.bn_bwd_dx_kernel, plan.grid_ew, dy, x, mask_, res_,
                    dres if plan.dz_stored else dummy, stats, w_, b_, scratch.sums, dx,
                    M, C, plan.CB, plan.ncb, **plan.meta_ew)
    return dx, dres, dw, db


# ============================================================================= custom ops

def _empty_mask(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=torch.uint8)


@torch.library.custom_op("fastres::bn_act_fwd",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _bn_act_fwd_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], residual: Optional[Tensor],
                   training: bool, momentum: Optional[float], eps: float, act: str,
                   save_mask: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mask, stats): the 1-bit ReLU mask (empty unless relu and save_mask) and
    the (2, C) mean/rstd. Training updates the running statistics and increments
    num_batches_tracked in place."""
    y, mask, stats = _forward(x, weight, bias, running_mean, running_var,
                              num_batches_tracked, residual, training, momentum, eps, act,
                              save_mask, True)
    if mask is None:
        mask = _empty_mask(x)
    return y, mask, stats


def _out_dtype(x: Tensor, residual: Optional[Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


@_bn_act_fwd_op.register_fake
def _(x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training,
      momentum, eps, act, save_mask):
    C = x.shape[1]
    M = x.numel() // C if C else 0
    y = torch.empty_like(x, dtype=_out_dtype(x, residual))
    mask = (x.new_empty((M, (C + 7) // 8), dtype=torch.uint8)
            if act == "relu" and save_mask else _empty_mask(x))
    return y, mask, x.new_empty((2, C), dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("fastres::bn_act_bwd", mutates_args=())
def _bn_act_bwd_op(dy: Tensor, x: Tensor, mask: Tensor, residual: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], stats: Tensor,
                   training: bool, act: str, needs_dx: bool, needs_dres: bool,
                   needs_dweight: bool, needs_dbias: bool,
                   res_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dres, dweight, dbias); a gradient that is not needed comes back empty (custom
    ops cannot return None)."""
    dx, dres, dw, db = _backward(dy, x, mask if mask.numel() else None, residual, weight,
                                 bias, stats, training, act, needs_dx, needs_dres,
                                 needs_dweight, needs_dbias, res_dtype)
    empty = x.new_empty(0)
    return (dx if dx is not None else empty, dres if dres is not None else empty,
            dw if dw is not None else empty, db if db is not None else empty)


@_bn_act_bwd_op.register_fake
def _(dy, x, mask, residual, weight, bias, stats, training, act, needs_dx, needs_dres,
      needs_dweight, needs_dbias, res_dtype):
    dx = torch.empty_like(x) if needs_dx else x.new_empty(0)
    dres = (torch.empty_like(x, dtype=res_dtype if res_dtype is not None else dy.dtype)
            if needs_dres else x.new_empty(0))
    dw = torch.empty_like(weight) if needs_dweight else x.new_empty(0)
    db = torch.empty_like(bias) if needs_dbias else x.new_empty(0)
    return dx, dres, dw, db


# ============================================================================== autograd

_is_compiling = torch.compiler.is_compiling


class BNActFunction(torch.autograd.Function):
    """Autograd for the fused op. Saves x, the 1-bit mask (relu), the residual (gelu, silu:
    their derivative needs z, rebuilt from x + residual), the (2, C) mean/rstd and the
    affine parameters (see the derivation in _bn_act_kernels).
    Eager mode calls the launchers; under Dynamo the registered custom ops."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_batches_tracked,
                residual, training, momentum, eps, act):
        if _is_compiling():
            y, mask, stats = torch.ops.fastres.bn_act_fwd(
                x, weight, bias, running_mean, running_var, num_batches_tracked, residual,
                training, momentum, eps, act, True)
        else:
            y, mask, stats = _forward(x, weight, bias, running_mean, running_var,
                                      num_batches_tracked, residual, training, momentum,
                                      eps, act, True, True)
            if mask is None:
                mask = _EMPTY_MASK
        ctx.training = training
        ctx.act = act
        ctx.res_dtype = residual.dtype if residual is not None else None
        ctx.save_for_backward(x, mask, residual if _needs_z(act) else None, weight, bias,
                              stats)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, mask, residual, weight, bias, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad
        needs_dx, needs_dw, needs_db = needs[0], needs[1], needs[2]
        needs_dres = ctx.res_dtype is not None and needs[6]
        if _is_compiling():
            dx, dres, dw, db = torch.ops.fastres.bn_act_bwd(
                dy, x, mask, residual, weight, bias, stats, ctx.training, ctx.act,
                needs_dx, needs_dres, needs_dw, needs_db, ctx.res_dtype)
        else:
            dx, dres, dw, db = _backward(
                dy, x, mask if mask.numel() else None, residual, weight, bias, stats,
                ctx.training, ctx.act, needs_dx, needs_dres, needs_dw, needs_db,
                ctx.res_dtype)
        return (dx if needs_dx else None, dw if needs_dw else None, db if needs_db else None,
                None, None, None, dres if needs_dres else None, None, None, None, None)


_EMPTY_MASK = torch.empty((0,), dtype=torch.uint8)


# ============================================================================ functional

def _layout_error(t: Tensor, what: str) -> ConfigError:
    if t.dim() == 4:
        return ConfigError(
            f"fused BN-act needs channels-last tensors, but {what} has shape "
            f"{tuple(t.shape)} and strides {t.stride()}; convert the model and its input "
            f"with `.to(memory_format=torch.channels_last)`")
    if t.dim() == 2:
        return ConfigError(f"fused BN-act needs a contiguous (N, C) {what}, got strides "
                           f"{t.stride()}; call `.contiguous()` first")
    return ConfigError(f"fused BN-act takes 4-D (N, C, H, W) or 2-D (N, C) input, got "
                       f"{what} of shape {tuple(t.shape)}")


def check_layout(t: Tensor, what: str = "the input") -> None:
    """The channels-last contract (module docstring): ConfigError unless `t` is a
    channels-last 4-D or a contiguous 2-D tensor. Every path checks it, reference too."""
    if t.dim() == 4:
        if t.is_contiguous(memory_format=_CL):
            return
    elif t.dim() == 2:
        if t.is_contiguous():
            return
    raise _layout_error(t, what)


def _check_input(x, residual, training) -> None:
    """What the module cannot guarantee: the input's and residual's layout, dtype, shape."""
    check_layout(x, "the input")
    if x.dtype not in _FLOAT_DTYPES:
        raise ConfigError(f"fused BN-act takes float32/bfloat16/float16/float64 input, got "
                          f"{x.dtype}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ConfigError(f"residual shape {tuple(residual.shape)} must equal the input "
                              f"shape {tuple(x.shape)} (no broadcasting in the fused kernel)")
        check_layout(residual, "the residual")
    if training:
        C = x.shape[1]
        if (x.numel() // C if C else 0) <= 1:
            raise ConfigError(f"expected more than 1 value per channel when training, got "
                              f"input of shape {tuple(x.shape)}")


def _check_args(x, weight, bias, running_mean, running_var, training, momentum, residual,
                act, num_batches_tracked) -> None:
    if act not in _ACT_IDS:
        check_act(act)
    _check_input(x, residual, training)
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and t.shape != (C,):
            raise ConfigError(f"{name} must have shape ({C},), got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ConfigError("pass both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ConfigError("eval mode (training=False) needs running_mean and running_var")
    if training and running_mean is not None and momentum is None \
            and num_batches_tracked is None:
        raise ConfigError("momentum=None (cumulative average) needs num_batches_tracked")


def _dispatch(x, weight, bias, running_mean, running_var, training, momentum, eps, residual,
              act, nbt) -> Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None
                                                        and residual.requires_grad)
                                    or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return BNActFunction.apply(x, weight, bias, running_mean, running_var, nbt, residual,
                                   training, momentum, eps, act)
    if _is_compiling():
        return torch.ops.fastres.bn_act_fwd(x, weight, bias, running_mean, running_var, nbt,
                                            residual, training, momentum, eps, act, False)[0]
    return _forward(x, weight, bias, running_mean, running_var, nbt, residual, training,
                    momentum, eps, act, False, False)[0]


def fused_bn_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 training: bool, momentum: Optional[float], eps: float,
                 residual: Optional[Tensor] = None, act: str = "relu", *,
                 num_batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``act(batch_norm(x) + residual)`` with `F.batch_norm`'s meaning of the arguments.

    x: channels-last (N, C, H, W) or contiguous (N, C), fp32/bf16/fp16/fp64 (ConfigError
    otherwise, on every path). residual: same shape and layout; the output dtype is
    promote(x.dtype, residual.dtype). `num_batches_tracked`, when given in training, is
    incremented on the device as nn.BatchNorm2d's forward does (so pass the module's
    *un-incremented* counter); momentum=None then means the cumulative average
    1 / num_batches_tracked (after the increment), read on the device (no sync).
    Runs the Triton kernels where `fastres.kernels.use_triton` allows, else
    `bn_act_reference`.
    """
    _check_args(x, weight, bias, running_mean, running_var, training, momentum, residual,
                act, num_batches_tracked)
    if not (_env.stubbed() or _env.use_triton(x.device)):
        return bn_act_reference(x, weight, bias, running_mean, running_var, training,
                                momentum, eps, residual, act,
                                num_batches_tracked=num_batches_tracked)
    return _dispatch(x, weight, bias, running_mean, running_var, bool(training), momentum,
                     float(eps), residual, act,
                     num_batches_tracked if training else None)


# ================================================================================ module

class FusedBatchNormAct2d(BatchNormAct2d):
    """``act(bn(x) + residual)`` through the fused Triton kernels.

    Same constructor, parameters, buffers and state dict as `nn.BatchNorm2d`, plus `act`,
    which defaults to "identity" (as `BatchNormAct2d`'s): `FusedBatchNormAct2d(C)` computes
    exactly what `nn.BatchNorm2d(C)` computes, a drop-in replacement for channels-last
    models; pass act="relu" (or "gelu", "silu") for the fused activation, and
    `forward(x, residual)` for the fused residual add. Running statistics,
    num_batches_tracked and momentum=None behave as nn.BatchNorm2d's.

    Where it runs: CUDA tensors through the compiled kernels; CPU tensors through the
    interpreted kernels when TRITON_INTERPRET was on at import (CI), else the PyTorch
    reference (the parent's forward); ``FASTRES_KERNELS=0`` selects the reference
    everywhere. Input must be channels-last on every path (ConfigError otherwise).
    """

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        if not (_env.stubbed() or _env.use_triton(x.device)):
            check_layout(x, "the input")
            if residual is not None:
                check_layout(residual, "the residual")
            return super().forward(x, residual)
        params, buffers = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        training = self.training
        track = self.track_running_stats
        rm, rv = buffers["running_mean"], buffers["running_var"]
        bn_training = training or (rm is None and rv is None)
        if training or track:
            rm_, rv_ = rm, rv
        else:
            rm_ = rv_ = None
        nbt = buffers["num_batches_tracked"] if training and track else None
        # The module guarantees the parameters' and buffers' shapes, act and momentum.
        _check_input(x, residual, bn_training)
        return _dispatch(x, weight, bias, rm_, rv_, bn_training, self.momentum, self.eps,
                         residual, self.act, nbt)
