"""`fastres eval`: evaluate a checkpoint on the test set.

    fastres eval --checkpoint runs/speedrun/checkpoints/last.pt --data-dir data [--tta flip]
    fastres eval --checkpoint runs/speedrun --data-dir data        # a run directory's last.pt
    fastres eval --checkpoint runs/sr --data-dir data --tta flip_translate --tta-fraction 0.2 \\
                 --repeats 5                          # its time: median of 5 after a warm-up

Uses the config stored in the checkpoint to rebuild the model; evaluates the weights the
run evaluated (EMA when the run kept one) unless --weights says otherwise. The checkpoint is
read as a resume reads it (`fastres.engine.rundir.read_checkpoint`): one line and exit 2
when it is corrupt, not a run checkpoint, or holds NaN/inf (the tensors are named), before
any data is read.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from fastres import config as C
from fastres.tools._common import int_at_least


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastres eval", add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a fastres checkpoint (last.pt), or a run directory (its last.pt)")
    p.add_argument("--data-dir", required=True, help="folder with the data set")
    p.add_argument("--tta", choices=("none", "flip", "flip_translate"),
                   help="test-time augmentation (default: the run's)")
    p.add_argument("--tta-fraction", type=float, metavar="F",
                   help="give the TTA views to the least confident share F of each test "
                        "batch only, 0 < F <= 1 (default: the run's run.tta_fraction)")
    p.add_argument("--weights", choices=("auto", "raw", "ema"), default="auto",
                   help="which weights to evaluate (default: the run's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int_at_least(1), help="evaluation batch size")
    p.add_argument("--test-limit", type=int_at_least(0), metavar="N",
                   help="evaluate on N test images (the run's fixed subset when N is its "
                        "data.test_limit), 0 = the whole test set (default: the run's "
                        "data.test_limit)")
    p.add_argument("--repeats", type=int_at_least(0), default=0, metavar="N",
                   help="time N evaluations after an untimed one and report their median "
                        "(0, the default: the one evaluation, timed with its first-call "
                        "costs, such as cuDNN's autotuning on a GPU)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                   help="progress on stderr: a bar on a terminal, else a line every few "
                        "seconds with images done and ETA (default: auto)")
    return p


def main(argv=None) -> int:
    from fastres.bench import Timer
    from fastres.engine import Session, build, resolve_for, rundir
    from fastres.engine.evaluate import describe_tta
    from fastres.engine.records import strict_dumps
    from fastres.errors import CheckpointError, ConfigError

    args = get_args_parser().parse_args(argv)
    if args.tta_fraction is not None and not 0.0 < args.tta_fraction <= 1.0:
        raise ConfigError(f"--tta-fraction must be in (0, 1], got {args.tta_fraction:g}")
    path = Path(args.checkpoint)
    if path.is_dir():
        info = rundir.inspect(path)
        if info.checkpoint_path is None:
            raise CheckpointError(f"{path} holds no checkpoint (checkpoints/last.pt): it holds "
                                  f"{info.describe()}")
        path = info.checkpoint_path
    state = rundir.read_checkpoint(path)
    try:
        cfg = C.from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: its config cannot be read ({e})") from None
    tta = args.tta or cfg.run.tta
    if args.tta_fraction is not None and tta == "none":
        why = "--tta none" if args.tta else "the run's run.tta is none"
        raise ConfigError(f"--tta-fraction {args.tta_fraction:g} needs test-time augmentation"
                          f", and this evaluation has none ({why}); use --tta flip or --tta "
                          "flip_translate")
    weights = args.weights
    if weights == "auto":
        weights = "ema" if state.get("ema") is not None else "raw"
    if weights == "ema" and state.get("ema") is None:
        raise CheckpointError(f"{path} holds no EMA weights (the run had optim.ema_decay=0); "
                              "use --weights raw")
    run = {"device": args.device, "out_dir": "", "precision": "auto", "compile": "off",
           "cuda_graph": "auto"}
    data = {"data_dir": args.data_dir, "download": False}
    if args.batch_size:
        data["eval_batch_size"] = args.batch_size
    if args.test_limit is not None:
        data["test_limit"] = args.test_limit
    cfg = C.validate(C.replace(cfg, run=run, data=data,
                               optim={"impl": "auto", "eval_weights": weights}))
    cfg = resolve_for(cfg)
    built = build(cfg)
    # The run's own Session: its model, device, memory format and evaluation weights (the
    # EMA's where the run kept one); only the weights are loaded.
    session = Session(cfg, built.model, built.loaders[0], init=False)
    session.load_state_dict(state, what=f"{path} (for model {cfg.model.name!r})",
                            weights_only=True)
    fraction = cfg.run.tta_fraction if args.tta_fraction is None else args.tta_fraction
    times = []
    for i in range(1 + args.repeats):  # with --repeats, the first is the untimed warm-up
        timer = Timer(session.device)
        timer.start()
        res = session.evaluate(built.loaders[1], tta, tta_fraction=fraction,
                               progress=args.progress if i == 0 else "none",
                               label=f"fastres eval (tta {tta})")
        times.append(timer.stop())  # the evaluation's one host sync happened inside
    timed = times[1:] if args.repeats else times
    res["seconds"] = statistics.median(timed)
    res["timing"] = f"median of {args.repeats} after an untimed one" if args.repeats else \
        "one evaluation, first-call costs included"
    res.update(checkpoint=str(path), weights=weights, tta=tta,
               tta_fraction=fraction if tta != "none" else None,
               step=state.get("step"), data=built.data_info)
    if args.json:
        print(strict_dumps(res, indent=2))
    else:
        print(f"{path}: top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}  loss "
              f"{res['loss']:.4f}  ({res['n']} images in {res['seconds']:.3g} s"
              + (f" (median of {args.repeats})" if args.repeats else "") + ", weights "
              f"{weights}, tta {describe_tta(tta, fraction)}, step {state.get('step')})")
        if res["n"] < (built.data_info or {}).get("test_size", 0):
            whose = "the run's " if args.test_limit is None else ""
            print(f"  a fixed subset of the test set ({whose}data.test_limit "
                  f"{cfg.data.test_limit}); --test-limit 0 evaluates all of it")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("eval", main))
