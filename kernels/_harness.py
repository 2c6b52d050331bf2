"""A harness around Triton's CPU interpreter that makes GPU-only faults visible on the CPU.

Triton's interpreter (``TRITON_INTERPRET=1``) runs a launch's programs one after another, in
grid order, with numpy. Three things a GPU does differently are emulated or checked here:

- **Rounding.** Compiled kernels round fp32 -> bf16 to nearest even; Triton 3.8's interpreter
  truncates (and its "rtne" mode rounds half up without carrying into the exponent).
  ``rounding="rtne"`` (the default) replaces the interpreter's float down-casts to bf16 and
  fp16 with torch's round-to-nearest-even conversion, so the CPU sees the GPU's values.
  An explicit ``fp_downcast_rounding="rtz"`` keeps truncating, as it does on a GPU.
  ``rounding="triton"`` restores the interpreter's own behaviour (to show the difference).
- **Grid order.** A GPU runs programs concurrently, in no promised order. ``grid_order``
  ``"reverse"`` or ``"shuffle"`` (seeded, a new permutation per launch) runs each launch's
  programs in that order, so a kernel whose result depends on program order changes.
- **Reductions.** ``exact_sums`` (default on) sums floats in fp64 and rounds once, instead
  of numpy's row-after-row summation in the element type (see `install`).
- **Races.** With ``race_check=True`` every masked load and store is recorded per program,
  as byte addresses, and at the end of each launch any byte that one program writes and
  another program reads or writes raises `RaceError`. Atomics are excepted, and so are
  accesses ordered through an atomic: when program A touches a byte before an atomic
  (acq_rel, Triton's default) on location T, and program B touches it after an atomic on
  the same T that came later, A's access happens before B's (release/acquire through T's
  modification order). That is the "last program to finish combines the partials" pattern
  (an atomic ticket): the partial buffer is written by every program and read by the last,
  legally. Any other cross-program conflict is reported with the address and the programs.

Installed only on request, `fastres.kernels.install_harness(...)` (tests/conftest.py does it
for the kernel tests, with its test switches); importing fastres.kernels patches nothing.
Tests change the settings with `configured(...)`. Once installed it applies to every
interpreted launch in the process, fastres's kernels or not. Costs: the race check records
every accessed byte (use small shapes); the rest is negligible.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import numpy as np

__all__ = ["GRID_ORDERS", "ROUNDINGS", "RaceError", "Settings", "configured", "install",
           "installed", "settings", "launches"]

GRID_ORDERS = ("natural", "reverse", "shuffle")
ROUNDINGS = ("rtne", "triton")


class RaceError(RuntimeError):
    """Two programs of one launch touched the same byte, at least one writing, unordered."""


@dataclasses.dataclass
class Settings:
    grid_order: str = "natural"   # natural | reverse | shuffle
    race_check: bool = False
    rounding: str = "rtne"        # rtne (as compiled kernels) | triton (the interpreter's own)
    seed: int = 0                 # shuffle seed; launch k uses seed + k
    exact_sums: bool = True       # tl.sum of floats in fp64, rounded once (see install)


_settings = Settings()
_installed = False
_launches = 0  # interpreted launches seen since install (the shuffle seed's offset)


def settings() -> Settings:
    """The settings in force (a copy)."""
    return dataclasses.replace(_settings)


def installed() -> bool:
    return _installed


def launches() -> int:
    """Interpreted launches run since the harness was installed."""
    return _launches


def _validate(s: Settings) -> Settings:
    if s.grid_order not in GRID_ORDERS:
        raise ValueError(f"grid order must be one of {GRID_ORDERS}, got {s.grid_order!r}")
    if s.rounding not in ROUNDINGS:
        raise ValueError(f"interpreter rounding must be one of {ROUNDINGS}, got {s.rounding!r}")
    return s


@contextlib.contextmanager
def configured(**changes):
    """Change the harness settings inside a block (installs the harness if needed)."""
    global _settings
    install()
    previous = _settings
    _settings = _validate(dataclasses.replace(previous, **changes))
    try:
        yield settings()
    finally:
        _settings = previous


# ------------------------------------------------------------------------------ recording

class _Program:
    __slots__ = ("pid", "rank", "seq", "bytes", "seqs", "writes", "atomics", "barriers")

    def __init__(self, pid: int, rank: int):
        self.pid = pid        # linear program id (x-major over the grid)
        self.rank = rank      # position in execution order
        self.seq = 0          # memory operations (and barriers) issued so far
        self.bytes: list = []
        self.seqs: list = []
        self.writes: list = []
        self.atomics: dict = {}  # location -> [(seq, releases, acquires)], in issue order
        self.barriers: list = []  # seqs of tl.debug_barrier() calls


class _Launch:
    def __init__(self, name: str):
        self.name = name
        self.grid = (1, 1, 1)
        self.order: Optional[np.ndarray] = None
        self.next = 0
        self.programs: list[_Program] = []
        self.current: Optional[_Program] = None
        self.record = False
        self.globals = None


_launch: Optional[_Launch] = None


def _byte_addresses(ptrs, mask, elem_bytes: int) -> np.ndarray:
    addr = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs)).reshape(-1)
        addr = addr[m]
    if elem_bytes == 1:
        return addr
    return (addr[:, None] + np.arange(elem_bytes, dtype=np.uint64)[None, :]).reshape(-1)


def _elem_bytes(ptrs_handle) -> int:
    return max(1, ptrs_handle.get_element_ty().primitive_bitwidth // 8)


def _note_access(ptrs_handle, mask_handle, write: bool) -> None:
    launch = _launch
    if launch is None or not launch.record or launch.current is None:
        return
    prog = launch.current
    b = _byte_addresses(ptrs_handle.data, None if mask_handle is None else mask_handle.data,
                        _elem_bytes(ptrs_handle))
    prog.seq += 1
    if b.size:
        prog.bytes.append(b)
        prog.seqs.append(np.full(b.size, prog.seq, dtype=np.int64))
        prog.writes.append(np.full(b.size, write, dtype=bool))


def _memory_order(sem, scope) -> tuple[bool, bool]:
    """(releases, acquires) across programs for an atomic of Triton IR semantics `sem`
    and scope `scope`: relaxed orders nothing, release only what came before it, acquire
    only what comes after; a CTA-scoped atomic orders nothing between programs (CTAs)."""
    from triton._C.libtriton import ir

    S = ir.MEM_SEMANTIC
    if scope == ir.MEM_SYNC_SCOPE.CTA:
        return False, False
    return (sem in (S.RELEASE, S.ACQUIRE_RELEASE), sem in (S.ACQUIRE, S.ACQUIRE_RELEASE))


def _note_atomic(ptrs_handle, mask_handle, sem, scope) -> None:
    launch = _launch
    if launch is None or not launch.record or launch.current is None:
        return
    prog = launch.current
    prog.seq += 1
    releases, acquires = _memory_order(sem, scope)
    addr = np.asarray(ptrs_handle.data, dtype=np.uint64).reshape(-1)
    if mask_handle is not None:
        addr = addr[np.broadcast_to(np.asarray(mask_handle.data, dtype=bool),
                                    np.shape(ptrs_handle.data)).reshape(-1)]
    for a in np.unique(addr).tolist():
        prog.atomics.setdefault(a, []).append((prog.seq, releases, acquires))


def _note_barrier() -> None:
    launch = _launch
    if launch is None or not launch.record or launch.current is None:
        return
    prog = launch.current
    prog.seq += 1
    prog.barriers.append(prog.seq)


# ---------------------------------------------------------------------------- race check

def _ordered(a: _Program, a_last_seq: int, b: _Program, b_first_seq: int) -> bool:
    """Whether every access of `a` (rank earlier) at seq <= a_last_seq happens before every
    access of `b` at seq >= b_first_seq, through an atomic location T both used:

    - `a` releases: after its accesses, an atomic on T with release semantics (release or
      acq_rel) at GPU or system scope, and a `tl.debug_barrier()` between the accesses and
      that atomic -- the atomic is one thread's, and its release covers only what that
      thread has seen: the barrier makes the rest of the CTA's stores part of it;
    - `b` acquires: before its accesses, an atomic on T with acquire semantics (acquire or
      acq_rel) at GPU or system scope. `b` runs after `a` here, so its atomic comes later
      in T's modification order (an atomic read-modify-write continues `a`'s release
      sequence).
    A relaxed ticket, a release-only or acquire-only pair, a CTA-scoped atomic or a missing
    barrier orders nothing, and the conflict is reported."""
    for loc, a_ops in a.atomics.items():
        b_ops = b.atomics.get(loc)
        if not b_ops:
            continue
        released = any(
            releases and seq > a_last_seq
            and any(a_last_seq < bar < seq for bar in a.barriers)
            for seq, releases, _ in a_ops)
        if released and any(acquires and seq < b_first_seq for seq, _, acquires in b_ops):
            return True
    return False


def _check(launch: _Launch) -> None:
    progs = [p for p in launch.programs if p.bytes]
    if len(progs) < 2:
        return
    B = np.concatenate([np.concatenate(p.bytes) for p in progs])
    R = np.concatenate([np.full(sum(b.size for b in p.bytes), p.rank, dtype=np.int64)
                        for p in progs])
    S = np.concatenate([np.concatenate(p.seqs) for p in progs])
    W = np.concatenate([np.concatenate(p.writes) for p in progs])
    order = np.lexsort((R, B))
    B, R, S, W = B[order], R[order], S[order], W[order]
    starts = np.flatnonzero(np.r_[True, B[1:] != B[:-1]])
    ends = np.r_[starts[1:], B.size]
    multi = R[starts] != R[ends - 1]
    any_write = np.maximum.reduceat(W.astype(np.int8), starts).astype(bool)
    cand = multi & any_write
    if not cand.any():
        return
    by_rank = {p.rank: p for p in launch.programs}
    grid = launch.grid

    def where(rank):
        pid = by_rank[rank].pid
        return (pid // (grid[1] * grid[2]), (pid // grid[2]) % grid[1], pid % grid[2])

    problems = []
    checked: dict = {}
    for gs, ge in zip(starts[cand].tolist(), ends[cand].tolist()):
        # Per program in this byte's group: any write, first and last seq.
        ranks = R[gs:ge]
        cuts = np.flatnonzero(np.r_[True, ranks[1:] != ranks[:-1]]) + gs
        cut_end = np.r_[cuts[1:], ge]
        entries = [(int(R[s]), bool(W[s:e].any()), int(S[s:e].min()), int(S[s:e].max()))
                   for s, e in zip(cuts.tolist(), cut_end.tolist())]
        for i in range(len(entries)):
            for j in range(i + 1, len(entries)):
                ra, wa, _, amax = entries[i]
                rb, wb, bmin, _ = entries[j]
                if not (wa or wb):
                    continue
                key = (ra, amax, rb, bmin)
                ok = checked.get(key)
                if ok is None:
                    ok = checked[key] = _ordered(by_rank[ra], amax, by_rank[rb], bmin)
                if not ok:
                    kind = ("write/write" if wa and wb else "write/read" if wa else "read/write")
                    problems.append(f"byte {hex(int(B[gs]))}: {kind} between programs "
                                    f"{where(ra)} and {where(rb)}")
                    break
            if len(problems) >= 5:
                break
        if len(problems) >= 5:
            break
    if problems:
        n = int(cand.sum())
        raise RaceError(f"race in {launch.name} (grid {grid}): {n} byte(s) written by one "
                        f"program and read or written by another, unordered; first: "
                        + "; ".join(problems))


# ------------------------------------------------------------------------------- install

def _round_rtne(data, src_ty, dst_ty):
    import torch
    import triton.language as tl

    arr = np.ascontiguousarray(np.asarray(data))
    t = torch.from_numpy(arr)
    if dst_ty == tl.bfloat16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16).copy()
    return t.to(torch.float16).numpy().copy()


def install() -> None:
    """Patch Triton's interpreter (idempotent). Needs Triton; does nothing to compiled
    kernels."""
    global _installed
    if _installed:
        return
    import triton.language as tl
    from triton._C.libtriton import ir as _ir
    from triton.runtime import interpreter as I

    builder = I.interpreter_builder
    low = (tl.bfloat16, tl.float16)

    def wants_rtne(src_ty, dst_ty) -> bool:
        return (_settings.rounding == "rtne" and dst_ty in low and src_ty.is_floating()
                and src_ty.primitive_bitwidth > dst_ty.primitive_bitwidth)

    orig_cast = builder.cast_impl
    orig_fp_to_fp = builder.create_fp_to_fp

    def cast_impl(src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if wants_rtne(s, d):
            return I.TensorHandle(_round_rtne(src.data, s, d), d)
        return orig_cast(src, dst_type)

    def create_fp_to_fp(src, dst_type, rounding_mode):
        s, d = src.dtype.scalar, dst_type.scalar
        if rounding_mode != _ir.ROUNDING_MODE.RTZ and wants_rtne(s, d):
            return I.TensorHandle(_round_rtne(src.data, s, d), d)
        return orig_fp_to_fp(src, dst_type, rounding_mode)

    orig_load = builder.create_masked_load
    orig_store = builder.create_masked_store
    orig_rmw = builder.create_atomic_rmw
    orig_cas = builder.create_atomic_cas
    orig_dim = builder.set_grid_dim
    orig_idx = builder.set_grid_idx
    orig_barrier = builder.create_barrier

    def create_masked_load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        _note_access(ptrs, mask, write=False)
        return orig_load(ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def create_masked_store(ptrs, value, mask, cache_modifier, eviction_policy):
        _note_access(ptrs, mask, write=True)
        return orig_store(ptrs, value, mask, cache_modifier, eviction_policy)

    def create_atomic_rmw(rmwOp, ptr, val, mask, sem, scope):
        _note_atomic(ptr, mask, sem, scope)
        return orig_rmw(rmwOp, ptr, val, mask, sem, scope)

    def create_atomic_cas(ptr, cmp, val, sem, scope):
        _note_atomic(ptr, None, sem, scope)
        return orig_cas(ptr, cmp, val, sem, scope)

    def create_barrier():
        _note_barrier()
        return orig_barrier()

    def set_grid_dim(nx, ny, nz):
        launch = _launch
        if launch is not None:
            launch.grid = (nx, ny, nz)
            n = nx * ny * nz
            if _settings.grid_order == "reverse":
                launch.order = np.arange(n - 1, -1, -1)
            elif _settings.grid_order == "shuffle":
                launch.order = np.random.default_rng(_settings.seed + _launches).permutation(n)
            else:
                launch.order = None
        return orig_dim(nx, ny, nz)

    def set_grid_idx(x, y, z):
        launch = _launch
        if launch is None:
            return orig_idx(x, y, z)
        nx, ny, nz = launch.grid
        rank = launch.next
        launch.next += 1
        pid = int(launch.order[rank]) if launch.order is not None else (x * ny + y) * nz + z
        x, y, z = pid // (ny * nz), (pid // nz) % ny, pid % nz
        if launch.record:
            prog = _Program(pid, rank)
            launch.programs.append(prog)
            launch.current = prog
        return orig_idx(x, y, z)

    orig_call = I.GridExecutor.__call__

    def __call__(self, *args, **kwargs):
        global _launch, _launches
        if _launch is not None:  # a launch inside a launch: not ours to order
            return orig_call(self, *args, **kwargs)
        launch = _Launch(getattr(self.fn, "__name__", "kernel"))
        launch.record = _settings.race_check
        launch.globals = getattr(self.fn, "__globals__", None)
        _launch = launch
        try:
            orig_call(self, *args, **kwargs)
        finally:
            _launch = None
            _launches += 1
        if launch.record:
            _check(launch)

    # A @triton.jit helper called from a kernel re-patches triton.language on every call
    # (~2 ms each); inside a launch of a kernel from the same module the launch's patches
    # are already in place, so the helper runs directly: same semantics, ~25% less time.
    orig_fn_call = I.InterpretedFunction.__call__

    def fn_call(self, *args, **kwargs):
        launch = _launch
        if launch is not None and launch.globals is self.fn.__globals__:
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise I.InterpreterError(repr(e)) from e
        return orig_fn_call(self, *args, **kwargs)

    # tl.sum: the interpreter's numpy sum along a tile's row axis adds the rows one after
    # another in the element type (error ~ n u for n rows, and it sums bf16 bit patterns as
    # integers); a GPU reduces a tile as a tree (~ log2(n) u). Summing in fp64 and rounding
    # once is at least as accurate as the tree, so the interpreter's own reduction noise
    # neither hides nor imitates a kernel's numerical fault.
    orig_sum = I.ReduceOps.sum

    def reduce_sum(self, input):
        data = input.handle.data
        ty = input.dtype.scalar
        if not (_settings.exact_sums and ty.is_floating()):
            return orig_sum(self, input)
        if ty == tl.bfloat16:
            wide = (data.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            wide = data.astype(np.float64)
        total = np.sum(wide, axis=self.axis, keepdims=self.keep_dims)
        if ty == tl.bfloat16:
            total = _round_rtne(np.asarray(total, dtype=np.float32), tl.float32, tl.bfloat16)
            if not self.keep_dims and self.axis is None:
                total = total.reshape(())
        return self.to_tensor(total, input.dtype)

    builder.cast_impl = cast_impl
    builder.create_fp_to_fp = create_fp_to_fp
    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    builder.create_atomic_rmw = create_atomic_rmw
    builder.create_atomic_cas = create_atomic_cas
    builder.create_barrier = create_barrier
    builder.set_grid_dim = set_grid_dim
    builder.set_grid_idx = set_grid_idx
    I.GridExecutor.__call__ = __call__
    I.InterpretedFunction.__call__ = fn_call
    I.ReduceOps.sum = reduce_sum
    _installed = True


def install_from(grid_order: str = "natural", race_check: bool = False,
                 rounding: str = "rtne", seed: int = 0) -> None:
    """Install with these settings (`fastres.kernels.install_harness`)."""
    global _settings
    _settings = _validate(Settings(grid_order, bool(race_check), rounding, int(seed)))
    install()
