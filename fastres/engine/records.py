"""Run records and checkpoints: what a run writes, and how.

A run directory holds:

    config.json       the resolved config of the run's first start (kept across resumes)
    env.json          git sha, library versions, device, data fingerprint, world size, of
                      the first start (kept across resumes)
    history.jsonl     one line per start, restart and resume: when, where, the provenance
                      (data fingerprint and folder, host, device, versions) and what changed
                      since the start before
    metrics.jsonl     one JSON object per epoch (and per `log_every` steps)
    result.json       the final result; its presence is what "finished" means
    checkpoints/      last.pt (every `checkpoint_every` epochs, on SIGTERM/Ctrl-C, before the
                      final evaluation) and last.json (its step and stage, readable without
                      torch, stamped with last.pt's size and mtime: `checkpoint_info` trusts
                      it only when the stamp matches, else reads last.pt itself)
    .fastres.lock     held (flock) by the run using the directory; see `rundir`

Every file is written atomically (a temporary `.NAME.XXXXXXXX.tmp` in the same folder,
fsync, rename), so a crash, a kill or a full disk never leaves a half-written file in place
of a good one; `remove_stale_temps` clears what a kill left, at the next start. A failed
write is one `RunDirError` line naming the file and the cause. JSON is strict: a NaN or an
infinity is written as null and its key listed under "nonfinite". No checkpoint holds a
non-finite tensor: `RunRecorder.checkpoint` checks the state first (one reduction, one
sync) and keeps the last good checkpoint instead, and `load_checkpoint` checks again, so a
checkpoint damaged on disk is refused instead of resumed or evaluated.

This module writes and reads files; it does not decide who may use a directory. That is
`fastres.engine.rundir` (location, lock, refusal, resume planning), which imports this
module; a `RunRecorder` is given a directory `rundir.claim` has already taken.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import pickle
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from fastres.errors import CheckpointError, RunDirError, TrainingDiverged, warn

CHECKPOINT_FORMAT = "fastres-checkpoint-v1"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# The layout of a run directory (this module writes it; rundir and the tools read it).
CONFIG, ENV, HISTORY, METRICS, RESULT = ("config.json", "env.json", "history.jsonl",
                                         "metrics.jsonl", "result.json")
CHECKPOINTS, LAST_PT, LAST_JSON = "checkpoints", "last.pt", "last.json"
RECORD_FILES = (CONFIG, ENV, HISTORY, METRICS, RESULT)
# Config fields a resume may change (where the data are, how progress shows, workers).
RESUME_EXEMPT = frozenset({("run", "out_dir"), ("run", "progress"), ("data", "data_dir"),
                           ("data", "download"), ("data", "workers")})


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


# --------------------------------------------------------------------------- stale temps

# What `atomic_write_bytes` names its temporary files: mkstemp's 8 random characters.
_TEMP = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def stale_temps(folder, names: Iterable[str] | None = None) -> list[Path]:
    """Temporary files an atomic write left in `folder` (a kill between the write and the
    rename), for the target file names in `names` (None: any). Call it only while holding
    the folder's lock: a live writer's temporary file looks the same."""
    keep = None if names is None else set(names)
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        if m and (keep is None or m.group("name") in keep) and p.is_file():
            out.append(p)
    return sorted(out)


def remove_stale_temps(folder, names: Iterable[str] | None = None) -> list[Path]:
    """Remove `stale_temps(folder, names)`; return what was removed."""
    gone = []
    for p in stale_temps(folder, names):
        with contextlib.suppress(OSError):
            p.unlink()
            gone.append(p)
    return gone


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict, *, overwrite: bool = False) -> None:
    """Serialise `state` with torch.save, atomically. An existing file is replaced only
    with `overwrite=True` (a `RunDirError` otherwise: a library writer never replaces data
    it was not told to)."""
    path = Path(path)
    if not overwrite and path.exists():
        raise RunDirError(f"{path} already exists; save_checkpoint replaces a file only with "
                          "overwrite=True")
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def state_tensors(state: Mapping) -> Iterator[tuple[str, torch.Tensor]]:
    """The floating tensors of a checkpoint's state: model, EMA, optimizer and scaler
    (the RNG states, the config and the epoch log are not weights)."""
    return named_tensors({k: v for k, v in state.items() if k not in ("rng", "config",
                                                                      "epochs")})


def _load(path: Path, **kwargs):
    """torch.load restricted to tensors and plain Python values (`weights_only=True`): a
    fastres checkpoint holds nothing else, and a file that does could run code when
    unpickled."""
    return torch.load(path, weights_only=True, **kwargs)


def _unsupported(e: BaseException) -> str:
    """': GLOBAL name' for what torch's restricted unpickler refused, if it says."""
    m = re.search(r"[Uu]nsupported (?:global: )?(GLOBAL [\w.]+)", str(e))
    return f": {m.group(1)}" if m else ""


def _first(e: BaseException) -> str:
    """The first sentence of an error's message (torch's go on for lines of advice)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    first = re.split(r"(?<=[.!?])\s", text.splitlines()[0], maxsplit=1)[0].rstrip(".")
    return first if len(first) <= 200 else first[:197] + "..."


def load_checkpoint(path: Path, map_location="cpu", *, check_finite: bool = True) -> dict:
    """A fastres checkpoint's state, or one CheckpointError line: missing, corrupt, not a
    fastres checkpoint, or (with `check_finite`) holding NaN or infinite values, naming the
    tensors. fastres never writes a non-finite state, so such a file was changed after it
    was written; resuming it would train on, and evaluating it would report chance."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} " + (
            "is not a regular file" if path.exists() else "does not exist"))
    try:
        state = _load(path, map_location=map_location)
    except pickle.UnpicklingError as e:
        refused = _unsupported(e)
        if refused:  # an object other than tensors and plain values
            raise CheckpointError(f"checkpoint {path} holds objects other than tensors and "
                                  f"plain values, which fastres never writes and will not "
                                  f"unpickle (unpickling can run code){refused}") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastres checkpoint "
                              f"(not a readable pickle)") from None
    except Exception as e:  # truncated zip, not a torch file
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fastres checkpoint "
                              f"({type(e).__name__}: {_first(e)})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a fastres checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else None!r})")
    if check_finite:
        n, bad = nonfinite(state_tensors(state))
        if bad:
            raise CheckpointError(
                f"checkpoint {path} holds NaN or infinite values ({len(bad)} of {n} tensors: "
                f"{_names(bad)}); fastres never writes such a state, so the file was changed "
                "after it was written: it cannot be resumed or evaluated; restore a good copy "
                "or start the run again (--overwrite)")
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


# --------------------------------------------------------------------------- last.json

def _stamp(path: Path) -> dict:
    """What identifies one write of a file: its size and modification time (ns). A rename
    keeps both, a new checkpoint changes the time, copies made with `cp -p`/copy2 keep it."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _info_of(state: Mapping) -> dict:
    return {"step": state.get("step"), "epoch": state.get("epoch"),
            "stage": state.get("stage", "train"), "timed_s": state.get("timed_s"),
            "world_size": state.get("world_size")}


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_info(run_dir) -> dict | None:
    """Step, epoch, stage, timed_s and world_size of `run_dir`/checkpoints/last.pt, or None
    when there is none.

    last.pt and last.json are two files, so a kill can fall between their writes: last.json
    is believed only when the stamp it carries (last.pt's size and mtime) matches last.pt.
    Otherwise (that kill, a copy that changed the mtime, a sidecar from before the stamp)
    the figures are read from last.pt itself. "source" says which ("last.json" or
    "last.pt"); a last.pt that cannot be read gives {"error": why}."""
    ckpt = Path(run_dir) / CHECKPOINTS / LAST_PT
    try:
        stamp = _stamp(ckpt)
    except (FileNotFoundError, NotADirectoryError):
        return None
    side = _read_json(ckpt.with_name(LAST_JSON))
    if isinstance(side, dict) and side.get("checkpoint") == stamp:
        return {**side, "source": LAST_JSON}
    try:  # mmap: the tensors stay on disk, only the small pickle is read
        state = _load(ckpt, map_location="cpu", mmap=True)
    except Exception as e:
        return {"error": f"{ckpt} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''})"}
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return {"error": f"{ckpt} is not a fastres checkpoint"}
    return {**_info_of(state), "checkpoint": stamp, "source": LAST_PT}


def write_checkpoint_info(run_dir, info: Mapping) -> None:
    """last.json for the last.pt now on disk, stamped with last.pt's size and mtime."""
    ckpt = Path(run_dir) / CHECKPOINTS / LAST_PT
    keys = ("step", "epoch", "stage", "timed_s", "world_size")
    atomic_write_json(ckpt.with_name(LAST_JSON),
                      {**{k: info.get(k) for k in keys}, "checkpoint": _stamp(ckpt)})


# --------------------------------------------------------------------------- provenance

def _plain(obj):
    """`obj` as its JSON form (tuples as lists), so a config compares with config.json."""
    return json.loads(strict_dumps(obj))


def dict_diffs(saved: Mapping, now: Mapping, skip=frozenset()) -> list[tuple[str, object,
                                                                              object]]:
    """(section.key, saved value, value now) for every field the two config dicts both
    hold with different values, but for the (section, key) pairs in `skip`. A field only
    one side holds (a field newer than a record) is not a difference."""
    saved, now = _plain(saved or {}), _plain(now or {})
    out = []
    for sec in now:
        a, b = saved.get(sec), now[sec]
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        out += [(f"{sec}.{k}", a[k], v) for k, v in b.items()
                if k in a and (sec, k) not in skip and a[k] != v]
    return out


def config_diffs(saved: dict, now: dict) -> list[str]:
    """'section.key: checkpoint A vs now B' for each field a resume may not change."""
    return [f"{key}: checkpoint {a!r} vs now {b!r}"
            for key, a, b in dict_diffs(saved, now, RESUME_EXEMPT)]


# What a resume on another machine, another copy of the data or other versions changes.
_ENV_KEYS = ("host", "device", "world_size", "fastres", "git_sha", "python", "torch",
             "triton", "cuda", "cudnn", "dali", "numpy")
_DATA_KEYS = ("fingerprint", "official", "source", "name")


def provenance(config: Mapping, env: Mapping) -> dict:
    """The facts a run's record must keep for every start: where the data were and which
    data they were, the machine and the versions."""
    data = (env or {}).get("data") or {}
    out = {"data.data_dir": ((config or {}).get("data") or {}).get("data_dir")}
    out.update({f"data.{k}": data.get(k) for k in _DATA_KEYS})
    out.update({k: (env or {}).get(k) for k in _ENV_KEYS})
    return _plain(out)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of a file; a line cut short by a kill is skipped. [] when missing."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def read_history(run_dir) -> list[dict]:
    return read_jsonl(Path(run_dir) / HISTORY)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- run directory

# How a recorder given a bare path claims it. Set by fastres.engine.rundir (which imports
# this module; this module does not import it) to its `claim_for_recorder`. Only train()'s
# default recorder (`RunRecorder(cfg.run.out_dir)`) takes this way in; run_training() and
# the tools hand the recorder a directory rundir has claimed.
claim_path: Callable[[Path, bool], object] | None = None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


class RunRecorder:
    """Writes a run directory. Only the main process (rank 0) writes; on other ranks the
    writing methods are no-ops, so callers need no `if rank == 0`. `checkpoint` checks the
    state for NaN/inf on every rank that has a run directory (so all ranks stop together).

        rd = rundir.claim(out, "new")             # location, lock, refusal: rundir's job
        rec = RunRecorder(rd)                     # writes into it; finish() releases it

    `run_dir`: the claimed directory (a `rundir.RunDir`, or anything with `.path`,
    `.started`, `.mode` and `.release()`), or None for no records. A path is also taken
    (train()'s default recorder): it is claimed at `start()` under the same contract.
    `say`: where one-line notes go (a hand-edited config.json, a resume on other data);
    default: stderr. They are kept in `notes` too.
    """

    def __init__(self, run_dir=None, enabled: bool = True, *,
                 say: Callable[[str], None] | None = None):
        if run_dir is None or isinstance(run_dir, (str, os.PathLike)):
            self.dir = Path(run_dir) if run_dir else None
            self.run_dir = None
        else:
            self.run_dir = run_dir
            self.dir = Path(run_dir.path)
        self.enabled = enabled and self.dir is not None
        self.kept_step: int | None = None
        self.notes: list[str] = []
        self._say = say or warn

    @property
    def checkpoint_path(self) -> Path | None:
        return self.dir / CHECKPOINTS / LAST_PT if self.dir else None

    @property
    def checkpoint_info_path(self) -> Path | None:
        return self.dir / CHECKPOINTS / LAST_JSON if self.dir else None

    def _note(self, message: str) -> None:
        self.notes.append(message)
        self._say(message)

    def _event(self, event: str, prov: dict, **extra) -> dict:
        return {"event": event, "time": _now(), "host": socket.gethostname(),
                "pid": os.getpid(), **extra, "provenance": prov}

    def start(self, config: dict, env: dict, resumed: bool = False) -> None:
        """Begin writing: a new run writes config.json, env.json, an empty metrics.jsonl and
        the first history line; a resume keeps config.json and env.json as they are and
        appends to history.jsonl what changed since the start before."""
        if not self.enabled:
            return
        if self.run_dir is None:
            if claim_path is None:
                raise RuntimeError("RunRecorder(path) needs fastres.engine.rundir imported "
                                   "(import fastres.engine)")
            self.run_dir = claim_path(self.dir, resumed)
        self.run_dir.started = True
        prov = provenance(config, env)
        if resumed:
            self._start_resumed(config, env, prov)
            return
        restart = getattr(self.run_dir, "mode", None) == "restart"
        earlier = read_history(self.dir) if restart else []
        changed = _changes(_last_provenance(earlier, self.dir), prov) if restart else {}
        atomic_write_json(self.dir / CONFIG, config)
        atomic_write_json(self.dir / ENV, env)
        atomic_write_bytes(self.dir / METRICS, b"")
        if not restart:
            atomic_write_bytes(self.dir / HISTORY, b"")
        append_line(self.dir / HISTORY, self._event("restart" if restart else "start", prov,
                                                    step=0, **({"changed": changed}
                                                               if restart else {})))

    def _start_resumed(self, config: dict, env: dict, prov: dict) -> None:
        info = checkpoint_info(self.dir)
        if info and "error" not in info:
            self.kept_step = info.get("step")
            if info.get("source") != LAST_JSON:  # last.json lagged (a kill between writes)
                write_checkpoint_info(self.dir, info)
        recorded = _read_json(self.dir / CONFIG)
        edited = []
        if not isinstance(recorded, dict):
            atomic_write_json(self.dir / CONFIG, config)
            self._note(f"{self.dir / CONFIG} was missing or unreadable: written again from "
                       "the checkpoint's config")
        else:
            edited = [f"{k}: {a!r} in the file, {b!r} in the run"
                      for k, a, b in dict_diffs(recorded, config, RESUME_EXEMPT)]
            if edited:
                self._note(f"{self.dir / CONFIG} was edited by hand ({'; '.join(edited[:3])}"
                           f"{'; ...' if len(edited) > 3 else ''}); the run continues with "
                           "its checkpoint's config, the file is left as it is, and "
                           "history.jsonl records the difference")
        if not isinstance(_read_json(self.dir / ENV), dict):
            atomic_write_json(self.dir / ENV, env)
        changed = _changes(_last_provenance(read_history(self.dir), self.dir), prov)
        data = {k: v for k, v in changed.items() if k.startswith("data.")
                and k != "data.data_dir"}
        if data:
            self._note("resuming on other data than the run's last start ("
                       + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in data.items())
                       + f"); {HISTORY} records both")
        append_line(self.dir / HISTORY, self._event(
            "resume", prov, step=info.get("step") if info else None,
            stage=info.get("stage") if info else None, changed=changed,
            **({"config_json_edited": edited} if edited else {})))

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        append_line(self.dir / METRICS, metrics)

    def truncate_log(self, keep_steps_upto: int) -> None:
        """On resume: drop metrics lines written after the checkpoint being resumed."""
        if not self.enabled:
            return
        path = self.dir / METRICS
        if not path.exists():
            return
        kept = [strict_dumps(row) for row in read_jsonl(path)
                if row.get("step", 0) <= keep_steps_upto]
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
        """Write `state` as checkpoints/last.pt, then last.json stamped with it, unless it
        holds a NaN or an infinity: then TrainingDiverged, and the last good checkpoint
        stays. A failed write (full disk) is one CheckpointError line; the previous
        checkpoint stays."""
        if self.dir is None:
            return
        step = state.get("step")
        n, bad = nonfinite(state_tensors(state))
        if bad:
            raise TrainingDiverged(
                f"the state at step {step} holds NaN or infinite values ({len(bad)} of {n} "
                f"tensors: {_names(bad)}); not checkpointing it: {self.kept_note()}; lower "
                "optim.lr, use run.precision=fp32, or set optim.grad_clip")
        if not self.enabled:
            return
        try:
            save_checkpoint(self.checkpoint_path, state, overwrite=True)
        except RunDirError as e:
            raise CheckpointError(f"could not write the checkpoint of step {step}: "
                                  f"{str(e).split('; the previous')[0]}; "
                                  f"{self.kept_note()}") from None
        self.kept_step = step
        write_checkpoint_info(self.dir, _info_of(state))

    def finish(self, result: dict) -> None:
        """Write result.json (the run is finished) and release the directory."""
        if self.enabled:
            atomic_write_json(self.dir / RESULT, result)
        self.close()

    def close(self) -> None:
        if self.run_dir is not None:
            self.run_dir.release()
            self.run_dir = None


def _last_provenance(history: list[dict], run_dir: Path) -> dict:
    """The provenance of the run's latest start: history's last, else env.json's."""
    for entry in reversed(history):
        if isinstance(entry.get("provenance"), dict):
            return entry["provenance"]
    return provenance(_read_json(run_dir / CONFIG) or {}, _read_json(run_dir / ENV) or {})


def _changes(before: Mapping, now: Mapping) -> dict:
    return {k: [before.get(k), v] for k, v in now.items() if before.get(k) != v}
