"""The run-directory contract, in one place.

A run directory (`--out`, `run.out_dir`) is the user's data. This module decides, before any
data is read and before anything in the directory changes, whether a run may use it, and
reads what a directory holds (`inspect`) for every tool that reports on runs:

- **Location**: a file, a path below a file, a read-only or pseudo file system (/proc,
  /sys) or a folder without write permission is refused (`check_location`; a tool's output
  file: `check_file_location`).
- **Lock**: the run holds an exclusive `flock` on `.fastres.lock` in the directory for its
  whole life; the OS releases it when the process ends, however it ends. A second run
  into the same directory is refused, naming the holder's PID (`claim`).
- **Refusal**: a new run into a directory that holds files is refused unless `--resume`
  (continue it) or `--overwrite` (move its files to a timestamped sibling,
  `OUT.old-YYYYmmdd-HHMMSS`; nothing is deleted). Tools that write a folder (speedrun,
  table, profile --trace, device-check) take it under the same rules (`claim` with their
  own flag name, and no --resume where they have none).
- **Clean start**: what a kill left half-written (`.NAME.XXXXXXXX.tmp` of an atomic write)
  is removed when the directory is next claimed, under the lock.
- **Resume**: `plan_run` reads what is there: a finished run (result.json) is reported and
  left alone; a checkpoint is resumed (checked for NaN/inf, against the config, world size
  and model first: `read_checkpoint`, `check_compatible`, `check_weights_fit`); a run
  stopped before its first checkpoint starts again from step 0 with its recorded config. A
  torchrun restart (TORCHELASTIC_RESTART_COUNT > 0, passed in by the tool) of the job that
  holds the directory resumes without a flag.

The library reads no environment: `fastres train` passes the restart count and job id.
Only the main rank claims the directory; every rank plans (they read the same files).
Writing is `fastres.engine.records` (this module imports it; it does not import this one).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastres.config import TRAIN_SIZES, num_classes_for
from fastres.errors import CheckpointError, ConfigError, RunDirError

from . import records
from .records import (CHECKPOINTS, CONFIG, ENV, LAST_JSON, LAST_PT, METRICS, RECORD_FILES,
                      RESULT, RESUME_EXEMPT, RunRecorder, checkpoint_info, config_diffs,
                      load_checkpoint, read_history, read_jsonl, remove_stale_temps,
                      state_dict_mismatch)

__all__ = ["LOCK_NAME", "RESUME_EXEMPT", "RunDir", "RunInfo", "RunPlan", "check_apart",
           "check_compatible", "check_data_fits", "check_file_location", "check_location",
           "check_resume", "check_step", "check_weights_fit", "claim", "config_diffs",
           "contents", "describe", "ensure_free", "held", "inspect", "lock_info",
           "open_recorder", "plan_run", "read_checkpoint", "running"]

LOCK_NAME = ".fastres.lock"
# File systems that cannot hold a run, whatever the permissions say.
_PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
              "pstore", "bpf", "configfs", "efivarfs", "fusectl", "binfmt_misc"}
# Training-set sizes of the data sets the config names, known before any file is read.
# Files whose half-written temporaries a claim removes: the run's records, its checkpoint,
# and what the tools write into their folders.
TEMP_TARGETS = (*RECORD_FILES, LAST_PT, LAST_JSON, "speedrun.json", "speedrun.png",
                "table.md", "table.csv", "table.png", "summary.json", "summary.md")


# --------------------------------------------------------------------------- location

def _mount_of(path: Path) -> tuple[str, str] | None:
    """(mount point, file-system type) holding `path` (Linux; None elsewhere)."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best = None
    p = str(path)
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and \
                (best is None or len(mnt) > len(best[0])):
            best = (mnt, parts[2])
    return best


def _abs(given) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(given))))


def _check_writable_below(given: str, path: Path, flag: str, what: str) -> None:
    """RunDirError unless something can be created at `path`: its nearest existing
    ancestor is a writable folder on a real, writable file system."""
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise RunDirError(f"{flag} {given} lies below {base}, which is a file; choose a "
                          f"{what}")
    mount = _mount_of(Path(os.path.realpath(base)))
    if mount is not None and mount[1] in _PSEUDO_FS:
        raise RunDirError(f"{flag} {given} is on {mount[0]} ({mount[1]}), which cannot hold "
                          f"files; choose a {what} on a disk")
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise RunDirError(f"{flag} {given}: {base} is on a read-only file system; choose a "
                          f"writable {what}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag} {given}: {base} is not writable (permission denied); "
                          f"choose a writable {what}")


def check_location(out, *, flag: str = "--out") -> Path:
    """The absolute folder path, or RunDirError when no run (or tool output) can live
    there. `flag` names the option in the message. Reads only; changes nothing."""
    given = str(out)
    path = _abs(given)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{flag} {given} is a file, not a folder; choose a folder")
    for above in path.parents:  # a run's files must not mix with another run's
        if (above / LOCK_NAME).is_file() and ((above / CONFIG).is_file()
                                              or (above / CHECKPOINTS).is_dir()):
            raise RunDirError(f"{flag} {given} is inside the run directory {above}; choose a "
                              "folder outside it")
    _check_writable_below(given, path, flag, "folder")
    return path


def check_apart(out, data_dir, *, flag: str = "--out") -> None:
    """RunDirError when the output folder `out` is the data folder `data_dir` or holds it:
    the run's files would mix with the data set, and an --overwrite would move the data
    set aside. Reads only."""
    if not out or not data_dir:
        return
    path, data = _abs(str(out)), _abs(str(data_dir))
    if path == data or path in data.parents:
        raise RunDirError(f"{flag} {out} {'is' if path == data else 'holds'} the data folder "
                          f"{data_dir}; choose an output folder outside it")


def _live_runs_below(path: Path, depth: int = 3) -> list[Path]:
    """Run directories below `path` (down to `depth` levels) whose run is in progress."""
    found = []
    for level in range(1, depth + 1):
        for lock in path.glob("/".join(["*"] * level) + "/" + LOCK_NAME):
            if running(lock.parent) is not None:
                found.append(lock.parent)
    return found


def check_file_location(target, *, flag: str = "--json") -> Path:
    """The absolute path of an output file, or RunDirError when it cannot be written
    there: a folder, a path below a file, a pseudo or read-only file system, a folder
    without write permission. Whether an existing file may be replaced is the caller's
    rule (the tools': only with --overwrite). Reads only; changes nothing."""
    given = str(target)
    path = _abs(given)
    if path.is_dir():
        raise RunDirError(f"{flag} {given} is a folder; give a file name (e.g. "
                          f"{Path(given) / 'result.json'})")
    if path.exists() and not path.is_file():
        raise RunDirError(f"{flag} {given} is not a regular file; give a file name")
    _check_writable_below(given, path.parent, flag, "file location")
    return path


# --------------------------------------------------------------------------- what is there

def contents(path: Path) -> list[str]:
    """Names in the directory other than the lock file (empty when it does not exist)."""
    try:
        return sorted(p.name for p in Path(path).iterdir() if p.name != LOCK_NAME)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def lock_info(path) -> dict:
    """Who holds (or last held) the directory: pid, host, job, since."""
    info = _read_json(Path(path) / LOCK_NAME)
    return info if isinstance(info, dict) else {}


def running(path) -> dict | None:
    """`lock_info(path)` when the process it names is alive on this machine (the
    directory's run is in progress), else None. Reads only: it never takes the lock."""
    info = lock_info(path)
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") not in (None, socket.gethostname()):
        return None
    if pid == os.getpid():  # this process: does it still hold the lock?
        return info if held(path) is not None else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        return info
    return info


@dataclass
class RunInfo:
    """What a run directory holds, read without changing anything (`inspect`).

    state: missing (no such folder) | empty | finished (result.json) | checkpoint (an
    unfinished run with checkpoints/last.pt) | started (config.json, stopped before its
    first checkpoint) | other (files, but no fastres run).
    config, env, result: the JSON records (None when absent; `problems` names the files
    that exist but cannot be read). checkpoint: `records.checkpoint_info` (step, epoch,
    stage, timed_s, world_size; last.json when it matches last.pt, else read from last.pt).
    history: history.jsonl's lines (one per start, restart and resume). epochs_logged:
    metrics.jsonl lines that close an epoch.
    """

    path: Path
    state: str
    names: list[str] = field(default_factory=list)
    config: dict | None = None
    env: dict | None = None
    result: dict | None = None
    checkpoint: dict | None = None
    history: list[dict] = field(default_factory=list)
    epochs_logged: int = 0
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def checkpoint_path(self) -> Path | None:
        ckpt = self.path / CHECKPOINTS / LAST_PT
        return ckpt if self.checkpoint is not None else None

    @property
    def step(self) -> int | None:
        return (self.checkpoint or {}).get("step")

    @property
    def stage(self) -> str | None:
        """'finished', or the checkpoint's stage ('train', 'final_eval'), or None."""
        if self.finished:
            return "finished"
        return (self.checkpoint or {}).get("stage")

    @property
    def data_fingerprints(self) -> list[str]:
        """Every data fingerprint the run trained on, in order (more than one: it was
        resumed on another copy of the data)."""
        seen = [((self.env or {}).get("data") or {}).get("fingerprint")]
        seen += [(h.get("provenance") or {}).get("data.fingerprint") for h in self.history]
        out = []
        for fp in seen:
            if fp and fp not in out:
                out.append(fp)
        return out

    def require(self, *names: str) -> None:
        """RunDirError naming the first of the record files `names` (config, env, result)
        that is missing or unreadable."""
        for name in names:
            file = {"config": CONFIG, "env": ENV, "result": RESULT}[name]
            if getattr(self, name) is None:
                why = self.problems.get(file, "missing")
                raise RunDirError(f"{self.path / file}: {why}; the run record is incomplete "
                                  "(re-run that training or leave its directory out)")

    def describe(self) -> str:
        """What the directory holds, in a few words, for messages."""
        if self.state == "finished":
            top1 = (self.result or {}).get("top1")
            return "a finished run" + (f" (top-1 {top1:.4f})" if isinstance(top1, float)
                                       else "")
        if self.state == "checkpoint":
            info = self.checkpoint or {}
            return "an unfinished run" + (f" (checkpoint at step {info['step']})"
                                          if info.get("step") is not None
                                          else " (with a checkpoint)")
        if self.state == "started":
            holder = running(self.path)
            if holder is not None:
                return f"a run in progress (pid {holder['pid']}) that has not written its " \
                       "first checkpoint yet"
            return "a run stopped before its first checkpoint"
        n = len(self.names)
        return (f"{n} file{'s' if n != 1 else ''} ({', '.join(self.names[:3])}"
                f"{', ...' if n > 3 else ''})")


def inspect(path) -> RunInfo:
    """What the run directory `path` holds (`RunInfo`). Reads only; never raises for a
    missing or damaged record (see `RunInfo.problems` and `RunInfo.require`)."""
    path = Path(path)
    if not path.is_dir():
        return RunInfo(path, "missing")
    names = contents(path)
    info = RunInfo(path, "empty" if not names else "other", names)
    for attr, file in (("config", CONFIG), ("env", ENV), ("result", RESULT)):
        f = path / file
        if not f.exists():
            continue
        value = _read_json(f)
        if isinstance(value, dict):
            setattr(info, attr, value)
        else:
            info.problems[file] = "unreadable (not a JSON object)"
    info.checkpoint = checkpoint_info(path)
    if info.checkpoint is not None and "error" in info.checkpoint:
        info.problems[f"{CHECKPOINTS}/{LAST_PT}"] = info.checkpoint["error"]
    info.history = read_history(path)
    info.epochs_logged = sum("epoch_s" in row for row in read_jsonl(path / METRICS))
    if (path / RESULT).is_file():
        info.state = "finished"
    elif info.checkpoint is not None:
        info.state = "checkpoint"
    elif (path / CONFIG).is_file():
        info.state = "started"
    return info


def describe(path) -> str:
    """What a directory holds, in a few words, for refusal messages."""
    return inspect(path).describe()


# --------------------------------------------------------------------------- lock

_HELD: dict[str, "RunDir"] = {}


def _key(path: Path) -> str:
    return os.path.realpath(path)


class RunDir:
    """A claimed run directory: the lock is held until `release()` (or the process ends).
    `started` is set by the recorder once it has written into the directory."""

    def __init__(self, path: Path, fd: int, created_dir: bool, created_lock: bool):
        self.path, self.fd = path, fd
        self.created_dir, self.created_lock = created_dir, created_lock
        self.started = False
        self.mode = "new"
        self.moved_to: Path | None = None
        self.removed: list[Path] = []
        self.key = _key(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, mode={self.mode!r}, held={self.fd is not None})"

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Unlock. A directory this process created and never wrote into is removed again
        (so a run refused later, e.g. for missing data, leaves nothing behind)."""
        if self.fd is None:
            return
        if not self.started and not contents(self.path):
            try:
                if self.created_lock:
                    os.unlink(self.path / LOCK_NAME)
                if self.created_dir:
                    os.rmdir(self.path)
            except OSError:
                pass
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None
            if _HELD.get(self.key) is self:
                del _HELD[self.key]

    def move_aside(self) -> Path | None:
        """Move every file but the lock to a new sibling OUT.old-<time>; return it."""
        names = contents(self.path)
        if not names:
            return None
        aside = aside_path(self.path)
        moved = 0
        try:
            aside.mkdir()
            for name in names:
                shutil.move(str(self.path / name), str(aside / name))
                moved += 1
        except OSError as e:
            raise RunDirError(f"--overwrite: could not move the previous contents of "
                              f"{self.path} to {aside} ({e.strerror or e}); {moved} of "
                              f"{len(names)} entries were moved, none deleted") from None
        self.moved_to = aside
        return aside


def aside_path(path: Path) -> Path:
    """A new sibling name for what `--overwrite` moves aside: NAME.old-<time>[-i], before
    the suffix for a file (report.old-<time>.json)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem, suffix = (path.stem, path.suffix) if path.is_file() else (path.name, "")
    i = 1
    aside = path.with_name(f"{stem}.old-{stamp}{suffix}")
    while aside.exists():
        i += 1
        aside = path.with_name(f"{stem}.old-{stamp}-{i}{suffix}")
    return aside


def held(path) -> RunDir | None:
    """The RunDir this process holds for `path`, if any."""
    return _HELD.get(_key(Path(path)))


def _lock_or_raise(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirError(f"cannot lock {path / LOCK_NAME}: {e.strerror or e}") from None
        info = lock_info(path)
        who = f"pid {info['pid']}" if "pid" in info else "another process"
        if info.get("host") and info["host"] != socket.gethostname():
            who += f" on {info['host']}"
        since = f", since {info['since']}" if info.get("since") else ""
        raise RunDirError(f"{path} is in use by another fastres process ({who}{since}); wait "
                          "for it to end, stop it, or choose another folder") from None


def _open_lock(path: Path, create: bool) -> int:
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        return os.open(path / LOCK_NAME, flags, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot use {path} as an output folder: {e.strerror or e} "
                          f"({path / LOCK_NAME})") from None


def _refuse(path: Path, flag: str, resumable: bool) -> RunDirError:
    what = describe(path)
    hint = "continue it with --resume, " if resumable and what.startswith(("a ", "an ")) \
        else ""
    return RunDirError(
        f"{path} already holds {what}; {hint}move it aside with --overwrite (to "
        f"{path.name}.old-<time>, nothing is deleted), or choose another {flag}")


def check_new(path: Path, *, flag: str = "--out", resumable: bool = True) -> None:
    """RunDirError unless `path` may start a new run: missing, empty, or holding only what
    a kill left half-written (a folder holding anything else is refused untouched)."""
    leftovers = {p.name for p in records.stale_temps(path, TEMP_TARGETS)}
    if [n for n in contents(path) if n not in leftovers]:
        raise _refuse(path, flag, resumable)


def claim(out, mode: str = "new", *, job: str | None = None, flag: str = "--out",
          resumable: bool = True) -> RunDir:
    """Take a run directory (or a tool's output folder): check the location, lock it,
    remove what a kill left half-written, and apply `mode`:

    new        refuse a directory holding files (RunDirError); create it when missing
    resume     use what is there (a run continues; a tool updates its own folder)
    restart    a run that left no checkpoint starts again from step 0 in place
    overwrite  move what is there to OUT.old-<time>, then start fresh

    A directory already held by this process is reused. Raises RunDirError (one line) for
    an unusable location, a directory in use (naming the PID), or a refused one; a refused
    claim changes nothing. `flag` and `resumable` shape the messages of tools that call
    their folder something else, or have no --resume.
    """
    if mode not in ("new", "resume", "restart", "overwrite"):
        raise ValueError(f"unknown run-directory mode {mode!r}")
    path = check_location(out, flag=flag)
    rd = held(path)
    if rd is None:
        if mode == "new" and not (path / LOCK_NAME).exists():
            check_new(path, flag=flag, resumable=resumable)
        created_dir = False
        if not path.exists():
            try:
                path.mkdir(parents=True)
                created_dir = True
            except FileExistsError:
                pass
            except OSError as e:
                raise RunDirError(f"cannot create {path}: {e.strerror or e}") from None
        created_lock = not (path / LOCK_NAME).exists()
        fd = _open_lock(path, create=True)
        _lock_or_raise(fd, path)
        rd = RunDir(path, fd, created_dir, created_lock)
        leftovers = {p.name for p in records.stale_temps(path, TEMP_TARGETS)}
        if mode == "new" and [n for n in contents(path) if n not in leftovers]:
            rd.release()  # refused: nothing changed, not even the leftovers
            raise _refuse(path, flag, resumable)
        # Under the lock no other fastres process writes here: a temporary file is what a
        # kill left between an atomic write and its rename.
        rd.removed = _remove_temps(path)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without its note; a refusal then says "another process"
        _HELD[rd.key] = rd
    elif mode == "new" and contents(path):
        raise _refuse(path, flag, resumable)  # this process ran in it already (a library caller)
    if mode == "overwrite":
        live = _live_runs_below(path)
        if live:
            rd.release()
            raise RunDirError(f"--overwrite would move {live[0]}, a run in progress "
                              f"({len(live)} in all below {path}); wait for it to end or stop "
                              "it first")
        rd.move_aside()
    rd.mode = mode
    return rd


def _remove_temps(path: Path) -> list[Path]:
    return (remove_stale_temps(path, TEMP_TARGETS)
            + remove_stale_temps(path / CHECKPOINTS, TEMP_TARGETS))


def claim_for_recorder(path: Path, resumed: bool) -> RunDir:
    """The directory a `RunRecorder(path)` writes into: the claim `fastres train` (or
    `run_training`) made before loading data when this process holds one not yet written
    into, else a claim of its own (a library call of train(): locked, and refused when it
    holds files and `resumed` is false)."""
    rd = held(path)
    if rd is not None and not rd.started:
        return rd
    return claim(path, "resume" if resumed else "new")


records.claim_path = claim_for_recorder


def open_recorder(out, *, enabled: bool = True, resumed: bool = False,
                  say=None) -> RunRecorder:
    """A RunRecorder for `out` (None: no records), claimed now when `enabled`: what
    train()'s default recorder should be (it claims at its start instead)."""
    if not out:
        return RunRecorder(None, enabled=enabled, say=say)
    if not enabled:
        return RunRecorder(Path(out), enabled=False, say=say)
    return RunRecorder(claim_for_recorder(check_location(out), resumed), say=say)


# --------------------------------------------------------------------------- resume

@dataclass
class RunPlan:
    """What `fastres train --out OUT [--resume|--overwrite]` will do, decided before any
    data is read. action: new | overwrite | resume (state holds the checkpoint) | restart
    (no checkpoint: from step 0 with `config`) | finished (nothing to do)."""

    out: Path | None
    action: str
    state: dict | None = None
    config: dict | None = None
    world_size: int | None = None
    result: dict | None = None
    note: str = ""

    @property
    def finished(self) -> bool:
        return self.action == "finished"

    @property
    def claim_mode(self) -> str:
        return {"finished": "resume"}.get(self.action, self.action)

    def where(self) -> str:
        """Where a resume continues, for the user: step, epoch, stage, checkpoint."""
        if self.state is None:
            return ""
        s = self.state
        epoch = s.get("epoch")
        into = f", {s['epoch_step']} steps into epoch {epoch + 1}" \
            if s.get("epoch_step") and isinstance(epoch, int) else ""
        return (f"resuming {self.out} from step {s.get('step')} (epoch {epoch}{into}, stage "
                f"{s.get('stage', 'train')}): {self.out / CHECKPOINTS / LAST_PT}")


def ensure_free(path) -> None:
    """RunDirError naming the holder when another process holds the directory's lock
    (probes the lock without taking it; changes nothing)."""
    path = Path(path)
    if not (path / LOCK_NAME).is_file() or held(path) is not None:
        return
    fd = _open_lock(path, create=False)
    _lock_or_raise(fd, path)  # closes fd and raises when held elsewhere
    os.close(fd)  # closing releases the probe's lock


def read_checkpoint(path, *, what: str = "checkpoint") -> dict:
    """A run checkpoint's state, checked: readable, a fastres checkpoint, finite (NaN/inf
    named), with the run config and model weights the resume and the evaluation need."""
    state = load_checkpoint(path)
    for key, holds in (("config", "run config"), ("model", "model weights")):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path} holds no {holds} ({key!r} entry missing); is it "
                                  f"a fastres run {what} (checkpoints/last.pt)?")
    return state


def plan_run(out, *, resume: bool = False, overwrite: bool = False, restart_count: int = 0,
             job_id: str | None = None, check_lock: bool = True) -> RunPlan:
    """Decide what a run into `out` does (reads files, changes nothing).

    `restart_count`/`job_id`: torchrun's TORCHELASTIC_RESTART_COUNT and TORCHELASTIC_RUN_ID
    (the tool passes them). A restart of the job that holds `out` resumes by itself.
    `check_lock`: first refuse a directory another run holds (the main rank only: under
    DDP the other ranks would find their own job's rank 0 holding it).
    """
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite moves it aside; "
                          "give one of them")
    if not out:
        if resume or overwrite:
            raise ConfigError(f"{'--resume' if resume else '--overwrite'} needs --out, the run "
                              "directory")
        return RunPlan(None, "new")
    path = check_location(out)
    if check_lock:
        ensure_free(path)
    note = ""
    restarted = False
    if restart_count > 0 and not resume and not overwrite and job_id \
            and lock_info(path).get("job") == job_id:
        resume = restarted = True
        note = f"torchrun restart {restart_count}: resuming from {out}"
    if overwrite:
        return RunPlan(path, "overwrite")
    if not resume:
        if check_lock:  # (other ranks: their rank 0 may have claimed it by now)
            check_new(path)
        return RunPlan(path, "new")
    info = inspect(path)
    if info.state in ("missing", "empty"):
        if restarted:
            return RunPlan(path, "new", note=note)
        raise CheckpointError(f"nothing to resume: {out} "
                              f"{'does not exist' if info.state == 'missing' else 'is empty'} "
                              "(start the run without --resume)")
    if info.finished:
        if info.result is None or info.config is None:
            raise CheckpointError(f"{out} holds a result.json but its result.json or "
                                  "config.json cannot be read")
        return RunPlan(path, "finished", config=info.config,
                       world_size=info.result.get("world_size"), result=info.result,
                       note=note)
    if info.state == "checkpoint":
        try:
            state = read_checkpoint(path / CHECKPOINTS / LAST_PT)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume: {e}; --overwrite moves the run aside and "
                                  "starts it again") from None
        return RunPlan(path, "resume", state=state, config=state.get("config"),
                       world_size=state.get("world_size", 1), note=note)
    if info.state == "started" and info.config is not None:
        return RunPlan(path, "restart", config=info.config,
                       world_size=(info.env or {}).get("world_size"),
                       note=note or f"{out} holds no checkpoint yet (the run stopped before "
                                    "its first one): starting it again from step 0 with its "
                                    "recorded config")
    raise CheckpointError(f"nothing to resume: {out} holds {info.describe()} but no fastres "
                          f"run (no checkpoints/last.pt, no readable config.json); start a new "
                          "run with --overwrite or another --out")


def check_compatible(saved_config: dict | None, saved_world_size: int | None, cfg,
                     world_size: int, *, saved: str = "the checkpoint was written") -> None:
    """CheckpointError when a run cannot continue with `cfg` on `world_size` processes.
    `saved`: what recorded `saved_world_size` (for the message)."""
    from fastres.config import to_dict

    diffs = config_diffs(saved_config or {}, to_dict(cfg))
    if diffs:
        raise CheckpointError("cannot resume: the config differs from the checkpoint's (" +
                              "; ".join(diffs) + "); resume with the same settings")
    if saved_world_size is not None and saved_world_size != world_size:
        raise CheckpointError(
            f"cannot resume: {saved} by {saved_world_size} process(es) and "
            f"this run has {world_size}; resume with the same world size (--nproc_per_node) so "
            "that shards and batches line up")


def num_classes_of(out, cfg) -> int:
    """The class count a run recorded (env.json), else the data set's."""
    env = _read_json(Path(out) / ENV) or {}
    n = (env.get("data") or {}).get("num_classes") if isinstance(env, dict) else None
    return int(n) if isinstance(n, int) and n > 0 else num_classes_for(cfg.data.dataset)


def check_weights_fit(cfg, weights, num_classes: int, what: str) -> None:
    """CheckpointError (one line: counts and first names) when `weights` do not fit the
    model `cfg` names. Builds the model on the meta device: no memory, no data."""
    from .build import build_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(cfg, num_classes)
    msg = state_dict_mismatch(model.state_dict(), weights, what)
    if msg is not None:
        raise CheckpointError(msg + f"; the config names {cfg.model.name!r}")


def check_step(state: dict, total: int, what: str) -> None:
    """CheckpointError unless the checkpoint's step is a step of a run of `total` steps."""
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total:
        raise CheckpointError(f"{what} is at step {step!r}, outside this run's 0..{total} "
                              "steps; it was not written by this run")


def check_resume(plan: RunPlan, cfg, world_size: int) -> None:
    """Everything a resume needs, checked before any data is read: the same config (but
    for RESUME_EXEMPT), the same world size, and weights that fit the model."""
    if plan.config is None:
        return
    saved = {"restart": "the run (stopped before its first checkpoint) was started",
             "finished": "the run was trained"}.get(plan.action, "the checkpoint was written")
    check_compatible(plan.config, plan.world_size, cfg, world_size, saved=saved)
    if plan.state is not None:
        check_weights_fit(cfg, plan.state["model"], num_classes_of(plan.out, cfg),
                          f"checkpoint {plan.out / CHECKPOINTS / LAST_PT}")


# --------------------------------------------------------------------------- data size

def check_data_fits(cfg, world_size: int = 1, n_train: int | None = None) -> None:
    """ConfigError naming the batch and the data size when not one full batch fits in the
    training set. `n_train`: the training set's size when the data are at hand (a
    library caller's own data); otherwise the size of the data set the config names, known
    before any file is read. data.train_limit applies either way."""
    from fastres.distributed import Dist, split_batch

    d = cfg.data
    full = n_train if n_train is not None else TRAIN_SIZES.get(d.dataset)
    if full is None:
        return
    limited = 0 < d.train_limit < full
    n = d.train_limit if limited else full
    per_rank_batch = split_batch(d.batch_size, d.batch_scope, Dist(0, world_size))
    per_rank = n // world_size
    if per_rank_batch <= per_rank:
        return
    where = f"{n} images" + (" (data.train_limit)" if limited else
                             " in the data given" if n_train is not None else
                             f" in {d.dataset}")
    if world_size > 1:
        where += f", {per_rank} per process over {world_size} processes"
    most = per_rank * world_size if d.batch_scope == "global" else per_rank
    raise ConfigError(f"data.batch_size={d.batch_size} is larger than the training set "
                      f"({where}), so there is not one full batch to train on; lower "
                      f"data.batch_size to at most {most}" + (
                          "" if most > 0 else " (the training set is empty)"))
