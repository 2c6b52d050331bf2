"""Run records and checkpoints.

A run directory holds:

    config.json       the resolved config
    env.json          git sha, library versions, device, data fingerprint, world size
    metrics.jsonl     one JSON object per epoch (and per `log_every` steps)
    result.json       the final result; its presence is what "finished" means
    checkpoints/      last.pt (every `checkpoint_every` epochs, on SIGTERM/Ctrl-C, before the
                      final evaluation) and last.json (its step and stage, readable without
                      torch)
    .fastres.lock     held (flock) by the run using the directory; see `rundir`

Every file is written atomically (a temporary file in the same folder, fsync, rename), so a
crash, a kill or a full disk never leaves a half-written file in place of a good one; a
failed write is one `RunDirError` line naming the file and the cause. JSON is strict: a NaN
or an infinity is written as null and its key listed under "nonfinite". No checkpoint holds
a non-finite tensor: `RunRecorder.checkpoint` checks the state first (one reduction, one
sync) and keeps the last good checkpoint instead.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from fastres.errors import CheckpointError, RunDirError, TrainingDiverged

CHECKPOINT_FORMAT = "fastres-checkpoint-v1"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# --------------------------------------------------------------------------- strict JSON

def strict(obj, _path: str = "", _bad: list | None = None):
    """`obj` made JSON-safe: tensors and numpy values become lists and numbers, and every
    NaN or infinity becomes None, its dotted path appended to `_bad`."""
    bad = _bad if _bad is not None else []
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        bad.append(_path or "value")
        return None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, Mapping):
        return {k: strict(v, f"{_path}.{k}" if _path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [strict(v, f"{_path}[{i}]", bad) for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return strict(obj.tolist(), _path, bad)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar
        return strict(obj.item(), _path, bad)
    if hasattr(obj, "tolist"):  # numpy array
        return strict(obj.tolist(), _path, bad)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__} at {_path or 'top level'}")


def strict_dumps(obj, **kw) -> str:
    """json.dumps that never writes NaN/Infinity (which strict parsers reject): they become
    null, and a top-level object gains "nonfinite": [the keys that held them]."""
    bad: list[str] = []
    clean = strict(obj, "", bad)
    if bad and isinstance(clean, dict):
        clean["nonfinite"] = bad
    return json.dumps(clean, allow_nan=False, **kw)


# --------------------------------------------------------------------------- atomic writes

def _write_error(path: Path, e: OSError) -> RunDirError:
    why = e.strerror or str(e)
    if e.errno in _DISK_FULL:
        why += " (the disk or the file-size limit is full)"
    return RunDirError(f"cannot write {path}: {why}; the previous {path.name}, if any, is "
                       "unchanged")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        try:  # mkstemp makes 0600 files; a record is a normal file (or keeps its mode)
            os.fchmod(fd, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        except OSError:
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (strict_dumps(obj, indent=2) + "\n").encode())


def append_line(path: Path, obj) -> None:
    """One strict-JSON line appended (metrics.jsonl); a failed write is one RunDirError."""
    try:
        with open(path, "a") as f:
            f.write(strict_dumps(obj) + "\n")
    except OSError as e:
        raise _write_error(Path(path), e) from None


# --------------------------------------------------------------------------- finiteness

def named_tensors(obj, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every floating tensor in a module (parameters and buffers), an
    object with `state_dict()` (EMA, optimizers), or nested dicts and lists of those."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield prefix or "tensor", obj.detach()
    elif isinstance(obj, nn.Module):
        for name, t in [*obj.named_parameters(), *obj.named_buffers()]:
            yield from named_tensors(t, f"{prefix}.{name}" if prefix else name)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from named_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from named_tensors(v, f"{prefix}.{i}" if prefix else str(i))
    elif hasattr(obj, "state_dict") and callable(obj.state_dict):
        yield from named_tensors(obj.state_dict(), prefix)


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, list[str]]:
    """(tensors checked, names of those holding a NaN or an infinity).

    Costs one fused reduction (the inf-norm over all tensors: NaN and inf propagate, huge
    finite values do not overflow) and one host sync; the per-tensor names are looked up
    only when something is wrong.
    """
    items = list(named)
    if not items:
        return 0, []
    total = torch.nn.utils.get_total_norm([t for _, t in items], norm_type=math.inf)
    if bool(torch.isfinite(total)):  # host sync: the one per check
        return len(items), []
    return len(items), [n for n, t in items if not bool(torch.isfinite(t).all())]


def _names(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


class FiniteGuard:
    """Checks a model's parameters and buffers (and an EMA's) at the run's check points:
    epoch ends, log points and before each checkpoint. Every rank calls `check` (weights
    are equal under DDP), so all stop together.

        guard = FiniteGuard(model, ema=ema, recorder=recorder)
        guard.check(step)    # one reduction, one sync; TrainingDiverged when not finite
    """

    def __init__(self, model: nn.Module, ema=None, recorder: "RunRecorder | None" = None,
                 start_step: int = 0):
        self.model, self.ema, self.recorder = model, ema, recorder
        self.last_good = start_step

    def check(self, step: int) -> None:
        named = list(named_tensors(self.model))
        if self.ema is not None and hasattr(self.ema, "shadow"):  # no state_dict() clones
            named += [(f"ema.{n}", t) for n, t in zip(self.ema.names, self.ema.shadow)]
        elif self.ema is not None:
            named += named_tensors(self.ema, "ema")
        n, bad = nonfinite(named)
        if not bad:
            self.last_good = step
            return
        kept = self.recorder.kept_note() if self.recorder is not None else ""
        raise TrainingDiverged(
            f"parameters or buffers became NaN or infinite between step {self.last_good} "
            f"and step {step} ({len(bad)} of {n} tensors: {_names(bad)})"
            + (f"; {kept}" if kept else "") +
            "; lower optim.lr, use run.precision=fp32, or set optim.grad_clip")


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Serialise `state` with torch.save, atomically."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, unpickling error
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastres checkpoint "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fastres checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else None!r})")
    return state


def state_dict_mismatch(expected: Mapping, got, what: str) -> str | None:
    """None when `got` has exactly `expected`'s keys and shapes; else one line with the
    counts of missing, unexpected and mis-shaped keys and the first three names of each."""
    if not isinstance(got, Mapping):
        return f"{what} holds no model weights (found {type(got).__name__})"
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shaped = [k for k in expected if k in got and hasattr(got[k], "shape")
              and tuple(got[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shaped):
        return None
    parts = [f"{len(keys)} {label} ({_names(keys)})" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if keys]
    return (f"{what} does not fit the model ({len(expected)} tensors): " + "; ".join(parts))


def load_state_dict_checked(module: nn.Module, state, what: str) -> None:
    """`module.load_state_dict(state)`, or a one-line CheckpointError summarising the
    mismatch (instead of torch's message, which lists every key)."""
    msg = state_dict_mismatch(module.state_dict(), state, what)
    if msg is not None:
        raise CheckpointError(msg + "; was it written for another model or settings?")
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError) as e:  # dtype or other surprises: keep it one line
        raise CheckpointError(f"{what} does not fit the model: "
                              f"{str(e).splitlines()[0][:200]}") from None


# --------------------------------------------------------------------------- run directory

class RunRecorder:
    """Writes the run directory. Only the main process (rank 0) writes; on other ranks the
    writing methods are no-ops, so callers need no `if rank == 0`. `checkpoint` checks the
    state for NaN/inf on every rank that has a run directory (so all ranks stop together).

    `start` takes the directory under the run-directory contract (`fastres.engine.rundir`):
    it reuses the claim `fastres train` made before loading data, or claims it itself (a
    library call): locked, and refused when it holds files and `resumed` is false. The lock
    is released by `finish` (or `close`, or when the process ends).
    """

    def __init__(self, out_dir: str | Path | None, enabled: bool = True):
        self.dir = Path(out_dir) if out_dir else None
        self.enabled = enabled and self.dir is not None
        self.run_dir = None
        self.kept_step: int | None = None

    @property
    def checkpoint_path(self) -> Path | None:
        return self.dir / "checkpoints" / "last.pt" if self.dir else None

    @property
    def checkpoint_info_path(self) -> Path | None:
        return self.dir / "checkpoints" / "last.json" if self.dir else None

    def start(self, config: dict, env: dict, resumed: bool = False) -> None:
        if not self.enabled:
            return
        from . import rundir

        held = rundir.held(self.dir)
        if held is not None and not held.started:
            self.run_dir = held  # claimed and validated by the tool before data were read
        else:
            self.run_dir = rundir.claim(self.dir, "resume" if resumed else "new")
        self.run_dir.started = True
        if resumed:
            info = rundir.checkpoint_info(self.dir)
            self.kept_step = info.get("step") if info else None
        atomic_write_json(self.dir / "config.json", config)
        atomic_write_json(self.dir / "env.json", env)
        if not resumed:
            atomic_write_bytes(self.dir / "metrics.jsonl", b"")

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        append_line(self.dir / "metrics.jsonl", metrics)

    def truncate_log(self, keep_steps_upto: int) -> None:
        """On resume: drop metrics lines written after the checkpoint being resumed."""
        if not self.enabled:
            return
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                continue
            if row.get("step", 0) <= keep_steps_upto:
                kept.append(strict_dumps(row))
        atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode())

    def kept_note(self) -> str:
        """What a failed or refused checkpoint leaves behind, for error messages."""
        path = self.checkpoint_path
        if path is None:
            return "no run directory, so no checkpoint"
        if self.kept_step is not None:
            return f"the last good checkpoint (step {self.kept_step}) is kept in {path}"
        if path.exists():
            return f"the previous checkpoint {path} is kept"
        return "no checkpoint had been written yet"

    def checkpoint(self, state: dict) -> None:
        """Write `state` as checkpoints/last.pt (and its step and stage as last.json) unless
        it holds a NaN or an infinity: then TrainingDiverged, and the last good checkpoint
        stays. A failed write (full disk) is one CheckpointError line; the previous
        checkpoint stays."""
        if self.dir is None:
            return
        step = state.get("step")
        n, bad = nonfinite(named_tensors({k: v for k, v in state.items()
                                          if k not in ("rng", "config", "epochs")}))
        if bad:
            raise TrainingDiverged(
                f"the state at step {step} holds NaN or infinite values ({len(bad)} of {n} "
                f"tensors: {_names(bad)}); not checkpointing it: {self.kept_note()}; lower "
                "optim.lr, use run.precision=fp32, or set optim.grad_clip")
        if not self.enabled:
            return
        try:
            save_checkpoint(self.checkpoint_path, state)
        except RunDirError as e:
            raise CheckpointError(f"could not write the checkpoint of step {step}: "
                                  f"{str(e).split('; the previous')[0]}; "
                                  f"{self.kept_note()}") from None
        self.kept_step = step
        atomic_write_json(self.checkpoint_info_path, {
            "step": step, "epoch": state.get("epoch"), "stage": state.get("stage", "train"),
            "timed_s": state.get("timed_s"), "world_size": state.get("world_size")})

    def finish(self, result: dict) -> None:
        """Write result.json (the run is finished) and release the directory."""
        if self.enabled:
            atomic_write_json(self.dir / "result.json", result)
        self.close()

    def close(self) -> None:
        if self.run_dir is not None:
            self.run_dir.release()
            self.run_dir = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
