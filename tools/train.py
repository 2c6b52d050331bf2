"""`fastres train`: train a model from a preset, with overrides; the project's main job.

    fastres train --preset speedrun --data-dir data --out runs/speedrun
    fastres train --preset resnet-paper --model resnet56 --data-dir data --out runs/r56
    fastres train --preset seed --set optim.ema_decay=0.9999 --data-dir data --out runs/seed
    fastres train --preset smoke --data-dir data --out runs/smoke --resume
    fastres train --preset smoke --data-dir data --out runs/smoke --overwrite  # old run aside
    torchrun --standalone --nproc_per_node=4 -m fastres train --preset speedrun --data-dir data --out runs/ddp
    fastres train --nproc 4 --preset speedrun ...     # launches the torchrun line above

Flags override the preset; `--set section.key=value` reaches every config field
(`--help-config` lists them). The run itself is `fastres.engine.run_training`: the resolved
config, the run directory (`--out`: location, lock, what it holds) and a resume's
compatibility (config, world size, weights that fit and are finite) are all checked before
any data is read and before anything in the directory changes (fastres.engine.rundir).
This tool parses the arguments, reads torchrun's environment and prints.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from fastres import config as C
from fastres.tools._common import add_config_args, check_preset, int_at_least


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastres train", add_help=add_help,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="run directory: config, metrics, checkpoints, result")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (a finished run "
                        "is reported and left as it is)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --out that holds one: the old files move to "
                        "OUT.old-<time> first (nothing is deleted)")
    add_config_args(p, preset="speedrun", title="config: a preset, then these flags, then "
                                                "--set (`--help-config` lists every field)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="SyncBatchNorm across processes (GPUs only)")
    p.add_argument("--nproc", type=int_at_least(1), metavar="N",
                   help="launch N processes on this machine through torchrun")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as JSON and exit")
    p.add_argument("--help-config", action="store_true", help="list every config field")
    return p


def config_from_args(args, base: C.Config | None = None) -> C.Config:
    """Preset (or `base`, e.g. a checkpoint's config), then flags, then --set."""
    # --epochs rescales the preset's run, phase 2 kept at its fraction (config.with_epochs)
    cfg = base if base is not None else C.preset(args.preset, epochs=args.epochs)
    flags = {
        "data": {"data_dir": args.data_dir, "download": args.download or None,
                 "batch_size": args.batch_size, "loader": args.loader},
        "model": {"name": args.model, "fused_kernels": args.fused_kernels},
        "schedule": {"epochs": args.epochs, "steps": 0 if args.epochs is not None else None},
        "run": {"seed": args.seed, "device": args.device, "precision": args.precision,
                "compile": args.compile, "out_dir": args.out, "sync_bn": args.sync_bn},
    }
    cfg = C.replace(cfg, **{sec: {k: v for k, v in vals.items() if v is not None}
                            for sec, vals in flags.items()})
    cfg = C.override(cfg, args.overrides)
    return C.validate(cfg)


def check_same_preset(name: str, recorded: dict, named: C.Config) -> None:
    """CheckpointError when `--preset name` (with the flags) describes another training
    than the one recorded: a resume continues the recorded run, never another recipe."""
    from fastres.engine.build import resolve_for
    from fastres.engine.records import config_diffs
    from fastres.errors import CheckpointError

    diffs = config_diffs(recorded, C.to_dict(resolve_for(named)))
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise CheckpointError(f"cannot resume with --preset {name}: the run was trained "
                              f"with another config ({shown}); resume without --preset, or "
                              "start a new run")


def out_from_args(out: str | None, overrides: list[str]) -> str | None:
    """The run directory: --out, or `--set run.out_dir=DIR` when that is how it was given
    (both naming different folders is refused)."""
    from fastres.errors import ConfigError

    given = [item.split("=", 1)[1] for item in overrides
             if item.split("=", 1)[0].strip() == "run.out_dir" and "=" in item]
    if not given:
        return out
    if len(set(given)) > 1 or (out is not None and given[-1] != out):
        raise ConfigError(f"--out {out} and --set run.out_dir={given[-1]} name two run "
                          "directories; give one (--out)")
    return given[-1] or None


def _launch_torchrun(argv: list[str], nproc: int) -> int:
    rest = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}",
           "-m", "fastres", "train", *rest]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def main(argv=None) -> int:
    from fastres import distributed as D
    from fastres.engine.run import prepare_training

    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    if args.help_config:
        rows = C.describe()
        width = max(len(r[0]) for r in rows)
        for key, typ, default, help_line in rows:
            print(f"{key:<{width}}  {default:<14} {help_line}")
        return 0
    check_preset(args.preset)  # one line with "did you mean", also when resuming
    args.out = out_from_args(args.out, args.overrides)

    # `--preset` named on a resume must be the run's: the recorded config is the base.
    preset_named = any(len(k) >= 6 and "--preset".startswith(k)
                       for k in (a.split("=", 1)[0] for a in argv))

    def config_for(recorded: dict | None) -> C.Config:
        if recorded is None:
            return config_from_args(args)
        cfg = config_from_args(args, C.from_dict(recorded))
        if preset_named:
            preset = C.preset(args.preset, epochs=args.epochs)
            named = config_from_args(args, C.replace(
                preset, data={"data_dir": cfg.data.data_dir}, run={"device": cfg.run.device}))
            check_same_preset(args.preset, recorded, named)
        return cfg

    def prepare(dist):
        # The library plans, checks and runs; the tool reads argv and the environment
        # (torchrun's rank, restart count and job id: a --max-restarts restart of this job
        # resumes by itself) and prints. A resume starts from the recorded config, then
        # the flags.
        return prepare_training(
            config_for, args.out or None, resume=args.resume, overwrite=args.overwrite, dist=dist,
            restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            job_id=os.environ.get("TORCHELASTIC_RUN_ID"), check=not args.print_config)

    # --nproc N: everything that needs no data is checked here, as rank 0 of N would, so an
    # error is one line before torchrun starts (this changes nothing; the processes check
    # again and claim the run directory).
    launch = (args.nproc or 1) > 1 and "WORLD_SIZE" not in os.environ
    dist = D.Dist(rank=0, world_size=args.nproc) if launch else D.from_env(os.environ)
    prepared = prepare(dist)
    cfg = prepared.cfg
    if args.print_config:
        if dist.is_main:
            import json

            print(json.dumps(C.to_dict(cfg), indent=2))
        return 0
    if launch:
        return _launch_torchrun(argv, args.nproc)
    if dist.is_main:
        if not cfg.run.out_dir:
            print("note: no --out given; nothing will be recorded", file=sys.stderr)
        if not prepared.plan.finished:
            what = f"preset {args.preset}" if prepared.plan.config is None \
                else "the recorded config"
            print(f"fastres train: {what}, model {cfg.model.name}, device {cfg.run.device} "
                  f"x{dist.world_size}, precision {cfg.run.precision}, compile "
                  f"{cfg.run.compile}, loader {cfg.data.loader}", flush=True)
    outcome = prepared.run(handle_signals=True,
                           say=(lambda line: print(line, flush=True)) if dist.is_main else None)
    if not dist.is_main:
        return 0
    f = outcome.final
    if outcome.finished_before:
        top1 = f"top-1 {f['top1']:.4f}, " if isinstance(f.get("top1"), float) else ""
        timed = f"timed {f['timed_s']:.2f} s" if isinstance(f.get("timed_s"), float) else ""
        print(f"fastres train: {args.out} is already finished ({top1}{timed}); nothing to "
              "do, nothing changed (--overwrite starts it again, the old run moved aside)",
              flush=True)
        return 0
    tta = f" | TTA ({f['tta']}) top-1 {f['tta_top1']:.4f}" if f["tta_top1"] is not None \
        else ""
    print(f"done: top-1 {f['top1']:.4f}, top-5 {f['top5']:.4f}{tta} | timed "
          f"{f['timed_s']:.2f} s, {f['img_per_s'] or 0:,.0f} img/s, {f['epochs']:.2f} epochs"
          + (f" | records in {cfg.run.out_dir}" if cfg.run.out_dir else ""))
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("train", main))
