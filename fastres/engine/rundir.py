"""The run-directory contract, in one place.

A run directory (`--out`, `run.out_dir`) is the user's data. This module decides, before any
data is read and before anything in the directory changes, whether a run may use it:

- **Location**: a file, a path below a file, a read-only or pseudo file system (/proc,
  /sys) or a folder without write permission is refused (`check_location`).
- **Lock**: the run holds an exclusive `flock` on `.fastres.lock` in the directory for its
  whole life; the OS releases it when the process ends, however it ends. A second run
  into the same directory is refused, naming the holder's PID (`claim`).
- **Refusal**: a new run into a directory that holds files is refused unless `--resume`
  (continue it) or `--overwrite` (move its files to a timestamped sibling,
  `OUT.old-YYYYmmdd-HHMMSS`; nothing is deleted).
- **Resume**: `plan_run` reads what is there: a finished run (result.json) is reported and
  left alone; a checkpoint is resumed (checked against the config, world size and model
  first, `check_compatible`, `check_weights_fit`); a run stopped before its first
  checkpoint starts again from step 0 with its recorded config. A torchrun restart
  (TORCHELASTIC_RESTART_COUNT > 0, passed in by the tool) of the job that holds the
  directory resumes without a flag.

The library reads no environment: `fastres train` passes the restart count and job id.
Only the main rank claims the directory; every rank plans (they read the same files).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastres.errors import CheckpointError, ConfigError, RunDirError

from .records import load_checkpoint, state_dict_mismatch

LOCK_NAME = ".fastres.lock"
# File systems that cannot hold a run, whatever the permissions say.
_PSEUDO_FS = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs",
              "pstore", "bpf", "configfs", "efivarfs", "fusectl", "binfmt_misc"}
# Config fields a resume may change (where the data are, how progress shows, workers).
RESUME_EXEMPT = {("run", "out_dir"), ("run", "progress"), ("data", "data_dir"),
                 ("data", "download"), ("data", "workers")}
# Training-set sizes of the data sets the config names, known before any file is read.
TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


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


def check_location(out) -> Path:
    """The absolute run-directory path, or RunDirError when no run can live there.
    Reads only; changes nothing."""
    given = str(out)
    path = Path(os.path.abspath(os.path.expanduser(given)))
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--out {given} is a file, not a folder; choose a folder for the "
                          "run's records")
    base = path
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise RunDirError(f"--out {given} lies below {base}, which is a file; choose a folder")
    mount = _mount_of(Path(os.path.realpath(base)))
    if mount is not None and mount[1] in _PSEUDO_FS:
        raise RunDirError(f"--out {given} is on {mount[0]} ({mount[1]}), which cannot hold a "
                          "run's files; choose a folder on a disk")
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise RunDirError(f"--out {given}: {base} is on a read-only file system; choose a "
                          "writable folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise RunDirError(f"--out {given}: {base} is not writable (permission denied); choose "
                          "a writable folder")
    return path


# --------------------------------------------------------------------------- what is there

def contents(path: Path) -> list[str]:
    """Names in the directory other than the lock file (empty when it does not exist)."""
    try:
        return sorted(p.name for p in Path(path).iterdir() if p.name != LOCK_NAME)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_info(path) -> dict | None:
    """checkpoints/last.json (step, epoch, stage of last.pt), when present and readable."""
    return _read_json(Path(path) / "checkpoints" / "last.json")


def lock_info(path) -> dict:
    """Who holds (or last held) the directory: pid, host, job, since."""
    return _read_json(Path(path) / LOCK_NAME) or {}


def describe(path) -> str:
    """What a directory holds, in a few words, for refusal messages."""
    path = Path(path)
    if (path / "result.json").is_file():
        res = _read_json(path / "result.json") or {}
        top1 = res.get("top1")
        return "a finished run" + (f" (top-1 {top1:.4f})" if isinstance(top1, float) else "")
    if (path / "checkpoints" / "last.pt").is_file():
        info = checkpoint_info(path) or {}
        return "an unfinished run" + (f" (checkpoint at step {info['step']})"
                                      if "step" in info else " (with a checkpoint)")
    if (path / "config.json").is_file():
        return "a run stopped before its first checkpoint"
    names = contents(path)
    return f"{len(names)} other file(s) ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


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
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.old-{stamp}")
        i = 1
        while aside.exists():
            i += 1
            aside = self.path.with_name(f"{self.path.name}.old-{stamp}-{i}")
        moved = 0
        try:
            aside.mkdir()
            for name in names:
                shutil.move(str(self.path / name), str(aside / name))
                moved += 1
        except OSError as e:
            raise RunDirError(f"--overwrite: could not move the previous run in {self.path} to "
                              f"{aside} ({e.strerror or e}); {moved} of {len(names)} entries "
                              "were moved, none deleted") from None
        self.moved_to = aside
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
        raise RunDirError(f"{path} is in use by another fastres run ({who}{since}); wait for "
                          "it to end, stop it, or choose another --out") from None


def _open_lock(path: Path, create: bool) -> int:
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        return os.open(path / LOCK_NAME, flags, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot use {path} as a run directory: {e.strerror or e} "
                          f"({path / LOCK_NAME})") from None


def _refuse(path: Path) -> RunDirError:
    return RunDirError(
        f"{path} already holds {describe(path)}; continue it with --resume, move it aside "
        f"with --overwrite (to {path.name}.old-<time>, nothing is deleted), or choose another "
        "--out")


def claim(out, mode: str = "new", *, job: str | None = None) -> RunDir:
    """Take the run directory for a run: check the location, lock it, and apply `mode`:

    new        refuse a directory holding files (RunDirError); create it when missing
    resume     the run continues what is there (planned and checked by the caller)
    restart    a run that left no checkpoint starts again from step 0 in place
    overwrite  move what is there to OUT.old-<time>, then start fresh

    A directory already held by this process is reused. Raises RunDirError (one line) for
    an unusable location, a directory in use (naming the PID), or a refused one.
    """
    if mode not in ("new", "resume", "restart", "overwrite"):
        raise ValueError(f"unknown run-directory mode {mode!r}")
    path = check_location(out)
    rd = held(path)
    if rd is None:
        fd = None
        if (path / LOCK_NAME).exists():
            fd = _open_lock(path, create=False)
            _lock_or_raise(fd, path)
        if mode == "new" and contents(path):
            if fd is not None:
                os.close(fd)  # closing releases the lock; the file stays as it was
            raise _refuse(path)
        created_dir = created_lock = False
        if fd is None:
            if not path.exists():
                try:
                    path.mkdir(parents=True)
                    created_dir = True
                except FileExistsError:
                    pass
                except OSError as e:
                    raise RunDirError(f"cannot create the run directory {path}: "
                                      f"{e.strerror or e}") from None
            created_lock = not (path / LOCK_NAME).exists()
            fd = _open_lock(path, create=True)
            _lock_or_raise(fd, path)
            if mode == "new" and contents(path):  # another run got in first
                rd = RunDir(path, fd, created_dir, created_lock)
                rd.release()
                raise _refuse(path)
        rd = RunDir(path, fd, created_dir, created_lock)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the lock holds without its note; a refusal then says "another process"
        _HELD[rd.key] = rd
    elif mode == "new" and contents(path):
        raise _refuse(path)  # this process ran in it already (a library caller)
    if mode == "overwrite":
        rd.move_aside()
    rd.mode = mode
    return rd


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


def ensure_free(path) -> None:
    """RunDirError naming the holder when another process holds the directory's lock
    (probes the lock without taking it; changes nothing)."""
    path = Path(path)
    if not (path / LOCK_NAME).is_file() or held(path) is not None:
        return
    fd = _open_lock(path, create=False)
    _lock_or_raise(fd, path)  # closes fd and raises when held elsewhere
    os.close(fd)  # closing releases the probe's lock


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
        return RunPlan(path, "new")
    if not contents(path):
        if restarted:
            return RunPlan(path, "new", note=note)
        raise CheckpointError(f"nothing to resume: {out} "
                              f"{'does not exist' if not path.exists() else 'is empty'} "
                              "(start the run without --resume)")
    if (path / "result.json").is_file():
        result = _read_json(path / "result.json")
        config = _read_json(path / "config.json")
        if result is None or config is None:
            raise CheckpointError(f"{out} holds a result.json but its result.json or "
                                  "config.json cannot be read")
        return RunPlan(path, "finished", config=config, world_size=result.get("world_size"),
                       result=result, note=note)
    ckpt = path / "checkpoints" / "last.pt"
    if ckpt.is_file():
        state = load_checkpoint(ckpt)
        return RunPlan(path, "resume", state=state, config=state.get("config"),
                       world_size=state.get("world_size", 1), note=note)
    config = _read_json(path / "config.json")
    if config is not None:
        env = _read_json(path / "env.json") or {}
        return RunPlan(path, "restart", config=config, world_size=env.get("world_size"),
                       note=note or f"{out} holds no checkpoint yet (the run stopped before "
                                    "its first one): starting it again from step 0 with its "
                                    "recorded config")
    raise CheckpointError(f"nothing to resume: {out} holds {describe(path)} but no fastres "
                          f"run (no checkpoints/last.pt, no config.json); start a new run "
                          "with --overwrite or another --out")


def config_diffs(saved: dict, now: dict) -> list[str]:
    """'section.key: checkpoint A vs now B' for each field a resume may not change."""
    out = []
    for sec, vals in now.items():
        for k, v in vals.items():
            old = (saved or {}).get(sec, {}).get(k, v)
            if (sec, k) in RESUME_EXEMPT or old == v or (isinstance(v, tuple) and list(v) == old):
                continue
            out.append(f"{sec}.{k}: checkpoint {old!r} vs now {v!r}")
    return out


def check_compatible(saved_config: dict | None, saved_world_size: int | None, cfg,
                     world_size: int) -> None:
    """CheckpointError when a run cannot continue with `cfg` on `world_size` processes."""
    from fastres.config import to_dict

    diffs = config_diffs(saved_config or {}, to_dict(cfg))
    if diffs:
        raise CheckpointError("cannot resume: the config differs from the checkpoint's (" +
                              "; ".join(diffs) + "); resume with the same settings")
    if saved_world_size is not None and saved_world_size != world_size:
        raise CheckpointError(
            f"cannot resume: the checkpoint was written by {saved_world_size} process(es) and "
            f"this run has {world_size}; resume with the same world size (--nproc_per_node) so "
            "that shards and batches line up")


def num_classes_of(out, cfg) -> int:
    """The class count a run recorded (env.json), else the data set's."""
    env = _read_json(Path(out) / "env.json") or {}
    n = (env.get("data") or {}).get("num_classes")
    return int(n) if isinstance(n, int) and n > 0 else NUM_CLASSES.get(cfg.data.dataset, 10)


def check_weights_fit(cfg, weights, num_classes: int, what: str) -> None:
    """CheckpointError (one line: counts and first names) when `weights` do not fit the
    model `cfg` names. Builds the model on the meta device: no memory, no data."""
    from .build import build_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(cfg, num_classes)
    msg = state_dict_mismatch(model.state_dict(), weights, what)
    if msg is not None:
        raise CheckpointError(msg + f"; the config names {cfg.model.name!r}")


def check_resume(plan: RunPlan, cfg, world_size: int) -> None:
    """Everything a resume needs, checked before any data is read: the same config (but
    for RESUME_EXEMPT), the same world size, and weights that fit the model."""
    if plan.config is None:
        return
    check_compatible(plan.config, plan.world_size, cfg, world_size)
    if plan.state is not None:
        if "model" not in plan.state:
            raise CheckpointError(f"{plan.out / 'checkpoints' / 'last.pt'} holds no model "
                                  "weights ('model' entry missing)")
        check_weights_fit(cfg, plan.state["model"], num_classes_of(plan.out, cfg),
                          f"checkpoint {plan.out / 'checkpoints' / 'last.pt'}")


# --------------------------------------------------------------------------- data size

def check_data_fits(cfg, world_size: int = 1) -> None:
    """ConfigError when not one full batch fits in the training set, from the data set's
    known size and data.train_limit (before the data are read)."""
    from fastres.distributed import Dist, split_batch

    d = cfg.data
    full = TRAIN_SIZES.get(d.dataset)
    if full is None:
        return
    limited = 0 < d.train_limit < full
    n = d.train_limit if limited else full
    per_rank_batch = split_batch(d.batch_size, d.batch_scope, Dist(0, world_size))
    per_rank = n // world_size
    if per_rank_batch <= per_rank:
        return
    where = f"{n} images" + (" (data.train_limit)" if limited else f" in {d.dataset}")
    if world_size > 1:
        where += f", {per_rank} per process over {world_size} processes"
    most = per_rank * world_size if d.batch_scope == "global" else per_rank
    raise ConfigError(f"data.batch_size={d.batch_size} is larger than the training set "
                      f"({where}), so there is not one full batch to train on; lower "
                      f"data.batch_size to at most {most}")
