"""`fastres eval`: evaluate a checkpoint on the test set.

    fastres eval --checkpoint runs/speedrun/checkpoints/last.pt --data-dir data [--tta flip]

Uses the config stored in the checkpoint to rebuild the model; evaluates the weights the
run evaluated (EMA when the run kept one) unless --weights says otherwise.
"""
from __future__ import annotations

import argparse
import sys

from fastres import config as C


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("fastres eval", add_help=add_help, description=__doc__)
    p.add_argument("--checkpoint", required=True, help="a fastres checkpoint (last.pt)")
    p.add_argument("--data-dir", required=True, help="folder with the data set")
    p.add_argument("--tta", choices=("none", "flip", "flip_translate"),
                   help="test-time augmentation (default: the run's)")
    p.add_argument("--weights", choices=("auto", "raw", "ema"), default="auto",
                   help="which weights to evaluate (default: the run's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, help="evaluation batch size")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                   help="progress on stderr: a bar on a terminal, else a line every few "
                        "seconds with images done and ETA (default: auto)")
    return p


def main(argv=None) -> int:
    import torch

    from fastres.engine import EMA, build, evaluate, load_checkpoint, resolve_for
    from fastres.engine.records import load_state_dict_checked, strict_dumps
    from fastres.errors import CheckpointError, ConfigError

    args = get_args_parser().parse_args(argv)
    state = load_checkpoint(args.checkpoint)
    for key, what in (("config", "run config"), ("model", "model weights")):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{args.checkpoint} holds no {what} ({key!r} entry missing); "
                                  "is it a fastres run checkpoint (checkpoints/last.pt)?")
    try:
        cfg = C.from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{args.checkpoint}: its config cannot be read ({e})") from None
    run = {"device": args.device, "out_dir": "", "precision": "auto", "compile": "off"}
    data = {"data_dir": args.data_dir, "download": False}
    if args.batch_size:
        data["eval_batch_size"] = args.batch_size
    cfg = C.replace(cfg, run=run, data=data, optim={"impl": "auto", "eval_weights": "auto"})
    cfg = resolve_for(cfg)
    built = build(cfg)
    model = built.model.to(cfg.run.device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    load_state_dict_checked(model, state["model"],
                            f"{args.checkpoint} (for model {cfg.model.name!r})")
    weights = args.weights
    if weights == "auto":
        weights = "ema" if state.get("ema") is not None else "raw"
    if weights == "ema":
        if state.get("ema") is None:
            raise CheckpointError(f"{args.checkpoint} holds no EMA weights (the run had "
                                  "optim.ema_decay=0); use --weights raw")
        ema = EMA(model, cfg.optim.ema_decay or 0.999)
        try:
            ema.load_state_dict(state["ema"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{args.checkpoint}: its EMA weights do not fit the model "
                                  f"({str(e).splitlines()[0][:200]}); use --weights raw") from None
        ema.copy_to(model)
    tta = args.tta or cfg.run.tta
    res = evaluate(model, built.loaders[1], tta, precision=cfg.run.precision,
                   progress=args.progress, label=f"fastres eval (tta {tta})")
    res.update(checkpoint=str(args.checkpoint), weights=weights, tta=tta,
               step=state.get("step"), data=built.data_info)
    if args.json:
        print(strict_dumps(res, indent=2))
    else:
        print(f"{args.checkpoint}: top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}  loss "
              f"{res['loss']:.4f}  ({res['n']} images, weights {weights}, tta {tta}, step "
              f"{state.get('step')})")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("eval", main))
