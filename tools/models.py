"""`fastres models`: every registered model with its parameters and forward FLOPs.

    fastres models                         # table, 10 classes
    fastres models --filter resnet1        # names containing "resnet1"
    fastres models --num-classes 100 --json

FLOPs are counted by torch.utils.flop_counter on one 3x32x32 image; one multiply-add is two
FLOPs, so GMACs = GFLOPs / 2. The counts at the registry's defaults are kept in
`KNOWN_COUNTS` (each one checked against a fresh count by tests/test_tools.py), so the
listing builds no model: counting them all takes 7-17 s on a 2-core CPU (resnet1202 alone
~2.5 s on the meta device, its 1,200 BatchNorms each through FlopCounterMode's Python
decomposition); the listing takes ~2 s, most of it importing torch. Other class counts
(--num-classes) and a model registered later are counted on the meta device. The notes
column flags where the reference article's printed figures disagree with the true counts
(see shared/REFERENCE.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap

IMAGE_SIZE = 32
UNITS = ("GFLOPs: forward pass, batch 1, 3x{s}x{s} input, counted by torch.utils.flop_counter "
         "(convolutions and matrix products; BatchNorm, activations, pooling and adds are not "
         "counted). FLOPs = 2 x MACs: one multiply-add is two FLOPs.")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres models",
        description="List registered models: parameters, forward GFLOPs and GMACs at 32x32, "
                    "and the reference figures they are checked against.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--filter", default="", metavar="SUBSTR",
                   help="only models whose name contains SUBSTR")
    p.add_argument("--num-classes", type=int, default=10, metavar="N",
                   help="classifier outputs the models are built with (default 10)")
    return p


# name: ({num_classes: parameters}, {(num_classes, image side): forward FLOPs}), counted by
# fastres.models.flops on the meta device with the entry point's defaults. A model whose
# blocks change must update its figures here: test_known_counts_match_the_models fails
# otherwise, naming the figure.
KNOWN_COUNTS = {
    "resnet8": ({10: 75290}, {(10, 32): 24478976}),
    "resnet20": ({10: 269722}, {(10, 32): 81102080}),
    "resnet32": ({10: 464154}, {(10, 32): 137725184}),
    "resnet44": ({10: 658586}, {(10, 32): 194348288}),
    "resnet56": ({10: 853018}, {(10, 32): 250971392}),
    "resnet110": ({10: 1727962}, {(10, 32): 505775360}),
    "resnet1202": ({10: 19421274}, {(10, 32): 5658477824}),
    "preact_resnet18": ({10: 11172170}, {(10, 32): 1110845440}),
    "resnet18_cifar": ({10: 11173962}, {(10, 32): 1110845440}),
    "resnet34_cifar": ({10: 21282122}, {(10, 32): 2318804992}),
    "resnet50_cifar": ({10: 23520842}, {(10, 32): 2595659776}),
    "resnet101_cifar": ({10: 42512970}, {(10, 32): 5019967488}),
    "resnet152_cifar": ({10: 58156618}, {(10, 32): 7444275200}),
    "resnet18": ({10: 11181642, 1000: 11689512}, {(10, 32): 74033152, (10, 224): 3627132928}),
    "resnet34": ({10: 21289802, 1000: 21797672}, {(10, 32): 149530624, (10, 224): 7326509056}),
    "resnet50": ({10: 23528522, 1000: 25557032}, {(10, 32): 166862848, (10, 224): 8174313472}),
    "resnet101": ({10: 42520650, 1000: 44549160}, {(10, 32): 318382080, (10, 224): 15598755840}),
    "resnet152": ({10: 58164298, 1000: 60192808}, {(10, 32): 469901312, (10, 224): 23023198208}),
    "vgg16": ({10: 134301514, 1000: 138357544}, {(10, 32): 865550336, (10, 224): 30932418560}),
    "vgg16_cifar": ({10: 14724042}, {(10, 32): 626403328}),
    "googlenet_cifar": ({10: 6158346}, {(10, 32): 3043512320}),
    "airbench94": ({10: 1972792}, {(10, 32): 236294720}),
    "airbench_tiny": ({10: 38968}, {(10, 32): 12279232}),
}


def counts(name: str, num_classes: int = 10, image_size: int = 32) -> dict:
    """{"params", "flops"} of a registered model at its defaults: `KNOWN_COUNTS` where it
    holds the figure, else counted (built on the meta device)."""
    params, flops = KNOWN_COUNTS.get(name, ({}, {}))
    p, f = params.get(num_classes), flops.get((num_classes, image_size))
    if p is None or f is None:
        from fastres.models import flops_row

        row = flops_row(name, num_classes=num_classes, image_size=image_size, device="meta")
        p, f = row["params"], row["flops"]
    return {"params": p, "flops": f}


def model_row(name: str, num_classes: int = 10, image_size: int = 32) -> dict:
    """One row of the listing (the keys of `fastres.models.flops_row`)."""
    from fastres.models import model_info

    c = counts(name, num_classes, image_size)
    info = model_info(name)
    return dict(name=name, family=info["family"], params=c["params"],
                params_m=c["params"] / 1e6, flops=c["flops"], gflops=c["flops"] / 1e9,
                gmacs=c["flops"] / 2e9, image_size=image_size, num_classes=num_classes,
                info=info)


def _unit(printed: str) -> float:
    """One unit in the last printed digit: '0.26' -> 0.01, '733.8' -> 0.1."""
    return 10.0 ** -(len(printed.split(".")[1]) if "." in printed else 0)


def _params_at(name: str, num_classes: int) -> int:
    params = KNOWN_COUNTS.get(name, ({}, {}))[0].get(num_classes)
    if params is not None:
        return params
    import torch

    from fastres.models import count_params, create_model

    with torch.device("meta"):
        return count_params(create_model(name, num_classes=num_classes))


def _gflops_at(name: str, image_size: int) -> float:
    return counts(name, 10, image_size)["flops"] / 1e9


def reference_notes(row: dict) -> list[str]:
    """Where the reference article's printed params/FLOPs disagree with the true counts.

    A printed figure agrees when it is within one unit of its last digit of the true value
    (the article and He et al. truncate: 0.8558 M prints as 0.85). Article parameters are
    compared at the class count they were printed for (VGG-16: ImageNet's 1000).
    """
    info = row["info"]
    notes = [info["note"]] if info["note"] else []
    article = info["article"]
    if "params_m" in article:
        printed = article["params_m"]
        classes = info["paper_num_classes"]
        params = row["params"] if classes == row["num_classes"] else _params_at(row["name"],
                                                                               classes)
        if abs(params / 1e6 - float(printed)) > _unit(printed):
            notes.append(f"article prints {printed} M params, true {params / 1e6:.2f} M")
    if "gflops" in article:
        printed = article["gflops"]
        sizes = {row["image_size"]: row["gflops"]}
        if info["input_size"] != row["image_size"]:
            sizes[info["input_size"]] = _gflops_at(row["name"], info["input_size"])
        candidates = [g for g in sizes.values()] + [g / 2 for g in sizes.values()]
        if all(abs(g - float(printed)) > _unit(printed) for g in candidates):
            at = " or ".join(f"{s}x{s}" for s in sizes)
            notes.append(f"article's {printed} GFLOPs: not forward FLOPs/MACs at {at}")
    return notes


def _paper_column(row: dict) -> str:
    info = row["info"]
    if info["paper_params_m"] is None:
        return "-"
    text = f"{info['paper_params_m']:.2f}"
    if info["paper_num_classes"] != row["num_classes"]:
        text += f" ({info['paper_num_classes']} cl.)"
    return text


def _json_row(row: dict, notes: list[str]) -> dict:
    info = row["info"]
    return dict(name=row["name"], family=row["family"], design_input_size=info["input_size"],
                num_classes=row["num_classes"], params=row["params"],
                params_m=round(row["params_m"], 6), flops=row["flops"],
                gflops=round(row["gflops"], 6), gmacs=round(row["gmacs"], 6),
                paper_params_m=info["paper_params_m"],
                paper_num_classes=info["paper_num_classes"], paper_source=info["paper_source"],
                article=info["article"], description=info["description"],
                kwargs={k: list(v) if isinstance(v, tuple) else v
                        for k, v in info["kwargs"].items()},
                notes=notes)


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    from fastres.errors import ConfigError
    from fastres.models import list_models

    names = list_models(args.filter)
    if not names:
        raise ConfigError(f"no model name contains {args.filter!r}; models: "
                          f"{', '.join(list_models())}")
    if args.num_classes < 1:
        raise ConfigError(f"--num-classes must be at least 1, got {args.num_classes}")

    header = (f"{'model':<16} {'family':<18} {'input':>5} {'params(M)':>10} {'GFLOPs':>8} "
              f"{'GMACs':>8} {'paper(M)':>16}  notes")
    if not args.json:
        plural = "" if len(names) == 1 else "s"
        print(f"{len(names)} model{plural}, {args.num_classes} classes; GFLOPs and GMACs of "
              f"one forward pass at {IMAGE_SIZE}x{IMAGE_SIZE}")
        print(header)
        print("-" * len(header))
    out = []
    for name in names:
        # Rows print as they come: a figure not in KNOWN_COUNTS is counted (seconds).
        row = model_row(name, args.num_classes, IMAGE_SIZE)
        notes = reference_notes(row)
        if args.json:
            out.append(_json_row(row, notes))
            continue
        print(f"{name:<16} {row['family']:<18} {row['info']['input_size']:>5} "
              f"{row['params_m']:>10.2f} {row['gflops']:>8.3f} {row['gmacs']:>8.3f} "
              f"{_paper_column(row):>16}  {'; '.join(notes)}", flush=True)
    if args.json:
        print(json.dumps(dict(image_size=IMAGE_SIZE, num_classes=args.num_classes,
                              units=UNITS.format(s=IMAGE_SIZE), models=out), indent=2))
        return 0
    print()
    print(textwrap.fill(UNITS.format(s=IMAGE_SIZE), width=100))
    print("input: the image side each design targets (all run at 32x32). paper(M): the count "
          "given by the\npaper or reference implementation defining the model, at the class "
          "count shown if not the table's.\nThe reference article's FLOPs column is not the "
          "forward cost at 32x32 (neither FLOPs nor MACs),\nand its PreAct-ResNet-18 count "
          "(1.17 M) is a slip for ~11.17 M.")
    return 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("models", main))
