"""`fastres eval`: evaluate a checkpoint on the test set.

    fastres eval --checkpoint runs/speedrun/checkpoints/last.pt --data-dir data [--tta flip]

Uses the config stored in the checkpoint to rebuild the model; evaluates the weights the
run evaluated (EMA when the run kept one) unless --weights says otherwise.
"""
from __future__ import annotations

import argparse
import json
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
    return p


def main(argv=None) -> int:
    import torch

    from fastres.engine import EMA, build, evaluate, load_checkpoint, resolve_for
    from fastres.errors import CheckpointError

    args = get_args_parser().parse_args(argv)
    state = load_checkpoint(args.checkpoint)
    cfg = C.from_dict(state["config"])
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
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{args.checkpoint} does not fit model {cfg.model.name!r}: {e}")
    weights = args.weights
    if weights == "auto":
        weights = "ema" if state.get("ema") is not None else "raw"
    if weights == "ema":
        if state.get("ema") is None:
            raise CheckpointError(f"{args.checkpoint} holds no EMA weights (the run had "
                                  "optim.ema_decay=0); use --weights raw")
        ema = EMA(model, cfg.optim.ema_decay or 0.999)
        ema.load_state_dict(state["ema"])
        ema.copy_to(model)
    tta = args.tta or cfg.run.tta
    res = evaluate(model, built.loaders[1], tta, precision=cfg.run.precision)
    res.update(checkpoint=str(args.checkpoint), weights=weights, tta=tta, step=state["step"],
               data=built.data_info)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.checkpoint}: top-1 {res['top1']:.4f}  top-5 {res['top5']:.4f}  loss "
              f"{res['loss']:.4f}  ({res['n']} images, weights {weights}, tta {tta}, step "
              f"{state['step']})")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("eval", main))
