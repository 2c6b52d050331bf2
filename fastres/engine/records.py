"""Run records and checkpoints.

A run directory holds:

    config.json       the resolved config
    env.json          git sha, library versions, device, data fingerprint, world size
    metrics.jsonl     one JSON object per epoch (and per `log_every` steps)
    result.json       the final result
    checkpoints/      last.pt (every `checkpoint_every` epochs, on SIGTERM/Ctrl-C, at the end)

Every file is written atomically (a temporary file in the same folder, fsync, rename), so a
crash or a kill never leaves a half-written checkpoint in place of a good one.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

from fastres.errors import CheckpointError

CHECKPOINT_FORMAT = "fastres-checkpoint-v1"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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


# --------------------------------------------------------------------------- run directory

class RunRecorder:
    """Writes the run directory. Only the main process (rank 0) records; on other ranks
    every method is a no-op, so callers need no `if rank == 0`."""

    def __init__(self, out_dir: str | Path | None, enabled: bool = True):
        self.dir = Path(out_dir) if out_dir else None
        self.enabled = enabled and self.dir is not None
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.dir / "checkpoints" / "last.pt" if self.dir else None

    def start(self, config: dict, env: dict, resumed: bool = False) -> None:
        if not self.enabled:
            return
        atomic_write_json(self.dir / "config.json", config)
        atomic_write_json(self.dir / "env.json", env)
        if not resumed:
            (self.dir / "metrics.jsonl").write_text("")

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics, default=_json_default) + "\n")

    def truncate_log(self, keep_steps_upto: int) -> None:
        """On resume: drop metrics lines written after the checkpoint being resumed."""
        if not self.enabled:
            return
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_steps_upto]
        atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode())

    def checkpoint(self, state: dict) -> None:
        if self.enabled:
            save_checkpoint(self.checkpoint_path, state)

    def finish(self, result: dict) -> None:
        if self.enabled:
            atomic_write_json(self.dir / "result.json", result)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
