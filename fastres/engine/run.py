"""`run_training(cfg, out)`: a training run with its run directory, start to finish.

    from fastres import preset
    from fastres.engine import run_training

    outcome = run_training(preset("smoke"), "runs/smoke")                 # a new run
    outcome = run_training(preset("smoke"), "runs/smoke", resume=True)    # continue it
    outcome = run_training(preset("smoke"), "runs/smoke", overwrite=True) # old run aside

The sequence, in this order, so that nothing is read or changed before it is known to be
allowed (`fastres.engine.rundir` holds each rule):

1. plan: what `out` holds and what the call will do (new, resume, restart, finished,
   overwrite); a directory another process holds is refused here;
2. the config: `cfg`, or for a resume the recorded config through `cfg` when it is a
   function of it; the model name; resolved for the device;
3. checks that need no data: one full batch fits the training set, and a resume's config,
   world size and weights (finite, fitting the model) match;
4. claim the directory (main rank): lock, stale temporary files removed, `--overwrite`
   moves the old run aside;
5. build (data, loaders, model), check the batch against the data actually read, train
   (the recorder writes into the claimed directory), release.

`prepare_training` does 1-3 and returns a `PreparedRun` whose `run()` does 4-5, for a
caller that wants the resolved config before anything runs (`fastres train
--print-config`). The library reads no environment: a tool passes torchrun's rank
(`dist`), restart count and job id.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from fastres import config as C
from fastres.distributed import Dist
from fastres.errors import CheckpointError

from . import rundir
from .records import CHECKPOINTS, LAST_PT, RunRecorder, state_dict_mismatch
from .schedules import total_steps

__all__ = ["PreparedRun", "TrainingOutcome", "prepare_training", "run_training"]

# A config, or a function of the recorded config (None for a new run) returning one.
ConfigArg = Union[C.Config, Callable[[Union[dict, None]], C.Config]]


@dataclass
class TrainingOutcome:
    """What `run_training` did. action: new | overwrite | resume | restart | finished (the
    run was finished before: nothing ran, nothing changed). `final` is what result.json
    holds; `run` the trainer's RunResult (None when nothing ran)."""

    action: str
    out: Path | None
    cfg: C.Config
    final: dict
    run: object = None
    moved_to: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def finished_before(self) -> bool:
        return self.action == "finished"


@dataclass
class PreparedRun:
    """A training run checked and planned, nothing read or changed yet (`prepare_training`)."""

    cfg: C.Config
    plan: rundir.RunPlan
    dist: Dist
    job_id: str | None = None

    @property
    def out(self) -> Path | None:
        return self.plan.out

    def run(self, *, handle_signals: bool = False, say: Callable[[str], None] | None = None,
            on_epoch: Callable[[dict], None] | None = None) -> TrainingOutcome:
        """Claim the directory, build, train, release. `say` receives the lines a user
        should read (the plan's note, where a resume continues, the data, what was moved
        aside); only the main rank says anything. `handle_signals`: SIGTERM/Ctrl-C write a
        checkpoint and raise `Interrupted` (the trainer's), and under DDP a dead peer is
        reported by the survivor instead of being cut short by torchrun's SIGTERM."""
        from fastres import distributed as D

        from .build import build
        from .trainer import train

        cfg, plan, dist = self.cfg, self.plan, self.dist
        notes: list[str] = []

        def tell(message: str) -> None:
            if dist.is_main:
                notes.append(message)
                if say is not None:
                    say(message)

        if plan.note:
            tell(plan.note)
        if plan.finished:
            return TrainingOutcome("finished", plan.out, cfg, dict(plan.result or {}),
                                   notes=notes)
        claimed = None
        if plan.out is not None and dist.is_main:
            claimed = rundir.claim(plan.out, plan.claim_mode, job=self.job_id)
            if claimed.moved_to is not None:
                tell(f"--overwrite: the previous run in {plan.out} is now in "
                     f"{claimed.moved_to}")
        if plan.action == "resume":
            tell(plan.where())
        joined = False
        try:
            import torch.distributed

            joined = dist.enabled and not torch.distributed.is_initialized()
            D.init_process_group(dist, cfg.run.device)
            built = build(cfg, dist)
            info = built.data_info
            rundir.check_data_fits(cfg, dist.world_size, n_train=info.get("train_size"))
            if plan.state is not None:  # the model and the schedule these data make
                what = f"checkpoint {plan.out / CHECKPOINTS / LAST_PT}"
                rundir.check_step(plan.state, total_steps(cfg.schedule, len(built.loaders[0])),
                                  what)
                mismatch = state_dict_mismatch(built.model.state_dict(), plan.state["model"],
                                               what)
                if mismatch is not None:
                    raise CheckpointError(f"{mismatch}; the data read now have "
                                          f"{info.get('num_classes', '?')} classes")
            if info:
                from fastres.data import describe

                tell(describe(info, cfg.data.train_limit, cfg.data.test_limit))
            if claimed is not None:
                recorder = RunRecorder(claimed, say=tell)
            else:  # other ranks: no writes, but the same finiteness checks
                recorder = RunRecorder(plan.out, enabled=False)
            result = train(cfg, built.model, built.loaders, dist=dist, data_info=info,
                           resume=plan.state, handle_signals=handle_signals,
                           recorder=recorder, on_epoch=on_epoch)
        except RuntimeError as e:
            if handle_signals and dist.enabled:
                # torchrun's agent sends SIGTERM to the survivors of a dead rank; outlive it
                # long enough to say which rank died (instead of dying mid-message).
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            lost = D.peer_failure(e, dist)
            if lost is None:
                raise
            raise lost from None
        finally:
            if joined:
                D.destroy_process_group()
            if claimed is not None:
                claimed.release()
        return TrainingOutcome(plan.action, plan.out, cfg, result.final, run=result,
                               moved_to=claimed.moved_to if claimed is not None else None,
                               notes=notes)


def prepare_training(cfg: ConfigArg, out=None, *, resume: bool = False,
                     overwrite: bool = False, dist: Dist | None = None,
                     restart_count: int = 0, job_id: str | None = None,
                     check: bool = True) -> PreparedRun:
    """Plan a training run into `out` (None: `cfg.run.out_dir`; empty: no records) and
    check everything that needs no data; read the data and change nothing.

    `cfg`: the run's config, or a function of the recorded config (a dict, None for a new
    run) returning it, so that a resume can start from what the run recorded and apply
    only what the caller changes (that is what `fastres train --resume` does). `resume`
    continues the run in `out`; `overwrite` moves it aside first. `restart_count`,
    `job_id`: torchrun's restart count and job id (a restart of the job holding `out`
    resumes by itself). `check=False` skips step 3 (the data-size and resume checks).
    Raises one-line FastresErrors: ConfigError, CheckpointError, RunDirError.
    """
    from fastres.models import check_model

    from .build import resolve_for
    from .compile import check_step_compile

    dist = dist or Dist()
    if out is None and isinstance(cfg, C.Config):
        out = cfg.run.out_dir or None
    plan = rundir.plan_run(out or None, resume=resume, overwrite=overwrite,
                           restart_count=restart_count, job_id=job_id,
                           check_lock=dist.is_main)
    if callable(cfg) and not isinstance(cfg, C.Config):
        cfg = cfg(plan.config)
    if not isinstance(cfg, C.Config):
        raise TypeError(f"run_training needs a fastres Config (or a function returning one), "
                        f"got {type(cfg).__name__}")
    cfg = C.validate(C.replace(cfg, run={"out_dir": str(plan.out) if plan.out else ""}))
    rundir.check_apart(plan.out, cfg.data.data_dir)
    check_model(cfg.model.name)
    cfg = resolve_for(cfg, dist)
    if cfg.run.compile == "step":
        check_step_compile(cfg, dist)
    if check:
        rundir.check_data_fits(cfg, dist.world_size)
        rundir.check_resume(plan, cfg, dist.world_size)
    return PreparedRun(cfg, plan, dist, job_id)


def run_training(cfg: ConfigArg, out=None, *, resume: bool = False, overwrite: bool = False,
                 dist: Dist | None = None, restart_count: int = 0, job_id: str | None = None,
                 handle_signals: bool = False, say: Callable[[str], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None) -> TrainingOutcome:
    """Train `cfg` with its records in the run directory `out`, under the run-directory
    contract: `prepare_training(...)` then `.run(...)` (see both)."""
    prepared = prepare_training(cfg, out, resume=resume, overwrite=overwrite, dist=dist,
                                restart_count=restart_count, job_id=job_id)
    return prepared.run(handle_signals=handle_signals, say=say, on_epoch=on_epoch)
