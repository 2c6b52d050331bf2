"""`fastres train`: train a model from a preset, with overrides; the project's main job.

    fastres train --preset speedrun --data-dir data --out runs/speedrun
    fastres train --preset resnet-paper --model resnet56 --data-dir data --out runs/r56
    fastres train --preset seed --set optim.ema_decay=0.9999 --data-dir data --out runs/seed
    fastres train --preset smoke --data-dir data --out runs/smoke --resume
    fastres train --preset smoke --data-dir data --out runs/smoke --overwrite  # old run aside
    torchrun --standalone --nproc_per_node=4 -m fastres train --preset speedrun --data-dir data --out runs/ddp
    fastres train --nproc 4 --preset speedrun ...     # launches the torchrun line above

Flags override the preset; `--set section.key=value` reaches every config field
(`--help-config` lists them). The resolved config, the run directory (`--out`: location,
lock, what it holds) and a resume's compatibility are all checked before any data is read
and before anything in the directory changes (fastres.engine.rundir).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from fastres import config as C


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastres train", add_help=add_help,
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="speedrun", choices=C.list_presets(),
                   help="named recipe to start from (default: speedrun)")
    p.add_argument("--data-dir", help="folder with cifar-10-batches-py/ or the .tar.gz")
    p.add_argument("--download", action="store_true",
                   help="download the official archive into --data-dir if missing")
    p.add_argument("--out", help="run directory: config, metrics, checkpoints, result")
    p.add_argument("--model", help="model name (`fastres models` lists them)")
    p.add_argument("--epochs", type=float, help="training length in epochs")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--loader", choices=("tensor", "dali", "torch"), help="training pipeline")
    p.add_argument("--fused-kernels", action="store_true", default=None,
                   help="use the fused Triton BN(+add)+act kernels in the model")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--compile", choices=("auto", "on", "step", "off"),
                   help="torch.compile the model (on), the whole training step (step), or "
                        "nothing (off); auto: on for GPU, off for CPU")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="SyncBatchNorm across processes (GPUs only)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override any config field (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (a finished run "
                        "is reported and left as it is)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a --out that holds one: the old files move to "
                        "OUT.old-<time> first (nothing is deleted)")
    p.add_argument("--nproc", type=int, default=0,
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
    from fastres.engine import rundir

    argv = list(sys.argv[1:] if argv is None else argv)
    args = get_args_parser().parse_args(argv)
    if args.help_config:
        rows = C.describe()
        width = max(len(r[0]) for r in rows)
        for key, typ, default, help_line in rows:
            print(f"{key:<{width}}  {default:<14} {help_line}")
        return 0
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(argv, args.nproc)

    dist = D.from_env(os.environ)
    # Resume and restart detection (a torchrun --max-restarts restart of this job resumes
    # from the last checkpoint by itself): the engine decides, reading only.
    plan = rundir.plan_run(args.out or None, resume=args.resume, overwrite=args.overwrite,
                           restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                                             or 0),
                           job_id=os.environ.get("TORCHELASTIC_RUN_ID"),
                           check_lock=dist.is_main)
    cfg = config_from_args(args, C.from_dict(plan.config) if plan.config else None)

    from fastres.engine import build, resolve_for, train
    from fastres.models import list_models

    if cfg.model.name not in list_models():
        from fastres.errors import unknown_choice

        raise unknown_choice("model", cfg.model.name, list_models())
    cfg = resolve_for(cfg, dist)
    if args.print_config:
        import json

        print(json.dumps(C.to_dict(cfg), indent=2))
        return 0
    # Everything checkable without the data, before the data are read and before anything
    # in --out changes.
    rundir.check_data_fits(cfg, dist.world_size)
    rundir.check_resume(plan, cfg, dist.world_size)
    if plan.note and dist.is_main:
        print(plan.note, flush=True)
    if plan.finished:
        if dist.is_main:
            r = plan.result
            top1 = f"top-1 {r['top1']:.4f}, " if isinstance(r.get("top1"), float) else ""
            timed = f"timed {r['timed_s']:.2f} s" if isinstance(r.get("timed_s"), float) else ""
            print(f"fastres train: {args.out} is already finished ({top1}{timed}); nothing to "
                  "do, nothing changed (--overwrite starts it again, the old run moved aside)",
                  flush=True)
        return 0
    if not cfg.run.out_dir and dist.is_main:
        print("note: no --out given; nothing will be recorded", file=sys.stderr)

    claimed = None
    if cfg.run.out_dir and dist.is_main:
        claimed = rundir.claim(cfg.run.out_dir, plan.claim_mode,
                               job=os.environ.get("TORCHELASTIC_RUN_ID"))
        if claimed.moved_to is not None:
            print(f"--overwrite: the previous run in {args.out} is now in {claimed.moved_to}",
                  flush=True)
    try:
        D.init_process_group(dist, cfg.run.device)
        built = build(cfg, dist)
        if dist.is_main:
            d = built.data_info
            print(f"fastres train: preset {args.preset}, model {cfg.model.name}, "
                  f"device {cfg.run.device} x{dist.world_size}, precision {cfg.run.precision}, "
                  f"compile {cfg.run.compile}, loader {cfg.data.loader}, data "
                  f"{d.get('name', '?')} ({'official' if d.get('official') else 'NOT official'})",
                  flush=True)
        result = train(cfg, built.model, built.loaders, dist=dist, data_info=built.data_info,
                       resume=plan.state, handle_signals=True)
    except RuntimeError as e:
        if dist.enabled:
            # torchrun's agent sends SIGTERM to the survivors of a dead rank; outlive it long
            # enough to say which rank died (instead of dying mid-message).
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        lost = D.peer_failure(e, dist)
        if lost is None:
            raise
        raise lost from None
    finally:
        D.destroy_process_group()
        if claimed is not None:
            claimed.release()
    if dist.is_main:
        f = result.final
        tta = f" | TTA ({f['tta']}) top-1 {f['tta_top1']:.4f}" if f["tta_top1"] is not None \
            else ""
        print(f"done: top-1 {f['top1']:.4f}, top-5 {f['top5']:.4f}{tta} | timed "
              f"{f['timed_s']:.2f} s, {f['img_per_s'] or 0:,.0f} img/s, {f['epochs']:.2f} epochs"
              + (f" | records in {cfg.run.out_dir}" if cfg.run.out_dir else ""))
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("train", main))
