"""`fastres speedrun`: time a preset over several seeds, the way speed-run records are kept.

    fastres speedrun --data-dir data --runs 10                      # the speedrun preset
    fastres speedrun --data-dir data --runs 5 --curve --out runs/sr  # + accuracy-vs-time curves
    fastres speedrun --preset smoke --data-dir data --runs 3 --set schedule.epochs=1

One warm-up run first (on a GPU, or whenever torch.compile is on): the first epoch and a step
of the same config (its full schedule, stopped early), so that compilation, autotuning and the loader's first epoch boundary are paid
before any timed run; then N runs with seeds seed, seed+1, ... The data set is read once and
the same model object is trained in every run, reset to that run's freshly seeded initial
weights: torch.compile's cache is keyed on the module, so later runs reuse the compiled code
instead of adding a new cache entry per run (dynamo falls back to eager after 8).

Each run is timed by the trainer: CUDA events on a GPU, a synchronised clock on a CPU, from
the first training step (the speed-run net's whitening init included) to the final test
accuracy with TTA; compilation, warm-up and per-epoch logging evaluations are outside it.
`--curve` evaluates after every epoch (outside the timed region) for the accuracy-vs-time
plot and the first epoch that meets the target; without it, time to target is the end of
the run when the final accuracy meets the target.

Writes speedrun.json (device, versions, git sha, data fingerprint, resolved config, per-run
results, summary) and speedrun.png (accuracy against timed seconds) into --out. --out is
taken under the run-directory contract before any data is read: a file, /proc, a read-only
or unwritable place is one line and exit 2; a folder another process uses is refused
naming it; a folder that holds anything (an earlier speed run) is refused unless
--overwrite, which moves it to OUT.old-<time> first (nothing is deleted). A stop (SIGTERM,
Ctrl-C) keeps what finished: the runs done, or, in the warm-up, how long it had run.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from pathlib import Path

from fastres.tools._common import (Stopped, add_config_args, add_overwrite_arg,
                                   claim_output_dir, config_from, env_line, fmt, fmt_pm,
                                   int_at_least, pct, save_figure, signals_raise, summarize,
                                   write_json)

SCHEMA = "fastres-speedrun-v1"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastres speedrun",
        description="Time a preset over several seeds after one warm-up run: per-run time, "
                    "epochs, accuracy, time to target; mean ± std; JSON and a plot.",
        epilog="Outputs: speedrun.json and speedrun.png in --out. Timings exclude compilation "
               "and warm-up; see the module docstring for exactly what is timed.")
    p.add_argument("--runs", type=int, default=5, metavar="N",
                   help="timed runs, seeds seed..seed+N-1 (default 5)")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="target test accuracy as a fraction, e.g. 0.94 (default: the preset's "
                        "run.target_acc)")
    p.add_argument("--curve", action="store_true",
                   help="evaluate after every epoch (untimed) for the accuracy-vs-time plot "
                        "and the first epoch reaching the target")
    p.add_argument("--warmup-steps", type=int_at_least(-1), default=-1, metavar="N",
                   help="steps of the untimed warm-up run (-1 = auto: one epoch + 1 step on a "
                        "GPU or with compile on, none on a CPU in eager mode; 0 = none)")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: runs/speedrun-PRESET-YYYYmmdd-HHMMSS)")
    add_overwrite_arg(p, "--out")
    p.add_argument("--records", action="store_true",
                   help="also keep each run's own record directory under OUT/runs/seed_S "
                        "(config, metrics, result, final checkpoint)")
    p.add_argument("--progress", choices=("none", "plain", "bar"), default="none",
                   help="per-epoch progress inside each run (default: none, one line per run)")
    p.add_argument("--no-plot", action="store_true", help="skip speedrun.png")
    add_config_args(p, preset="speedrun")
    return p


# --------------------------------------------------------------------------- one run

def run_record(seed: int, final: dict, epochs: list[dict], wall_s: float) -> dict:
    """The per-run entry of speedrun.json: the trainer's final figures plus the curve."""
    headline = final["tta_top1"] if final.get("tta_top1") is not None else final["top1"]
    curve = [{"epoch": m["epoch"], "timed_s": m["timed_s"], "test_top1": m["test_top1"]}
             for m in epochs if "test_top1" in m]
    curve.append({"epoch": final["epochs"], "timed_s": final["timed_s"], "test_top1": headline,
                  "final": True})
    return {
        "seed": seed, "timed_s": final["timed_s"], "train_s": final["train_s"],
        "data_init_s": final["data_init_s"], "final_eval_s": final["final_eval_s"],
        "epochs": final["epochs"], "steps": final["steps"], "top1": final["top1"],
        "top5": final["top5"], "tta": final["tta"], "tta_fraction": final.get("tta_fraction"),
        "tta_top1": final["tta_top1"],
        "tta_top5": final["tta_top5"], "accuracy": headline,
        "reached_target": bool(final["reached_target"]),
        "time_to_target_s": final["time_to_target_s"],
        "epoch_to_target": next((c["epoch"] for c in curve if c["test_top1"] >=
                                 final["target_acc"]), None),
        "img_per_s": final["img_per_s"], "wall_s": wall_s,
        "gc_pauses": final.get("gc_pauses"), "curve": curve,
    }


def summary_of(runs: list[dict], target: float) -> dict:
    from fastres.bench import GCPauses

    reached = [r for r in runs if r["reached_target"]]
    acc = summarize(r["accuracy"] for r in runs)
    return {
        "runs": len(runs), "target_acc": target,
        "timed_s": summarize(r["timed_s"] for r in runs),
        "data_init_s": summarize(r["data_init_s"] for r in runs),
        "train_s": summarize(r["train_s"] for r in runs),
        "final_eval_s": summarize(r["final_eval_s"] for r in runs),
        "epochs": summarize(r["epochs"] for r in runs),
        "top1": summarize(r["top1"] for r in runs),
        "tta_top1": summarize(r["tta_top1"] for r in runs),
        "accuracy": acc,
        "reached": len(reached), "reached_fraction": len(reached) / max(len(runs), 1),
        "mean_reaches_target": acc["n"] > 0 and acc["mean"] >= target,
        "time_to_target_s": summarize(r["time_to_target_s"] for r in reached),
        "img_per_s": summarize(r["img_per_s"] for r in runs),
        "gc_pauses": GCPauses.total(r.get("gc_pauses") for r in runs).as_dict(),
    }


# --------------------------------------------------------------------------- output

# Column widths of the per-run table, which is printed one row per finished run.
_COLS = (("run", 3), ("seed", 4), ("time (s)", 9), ("epochs", 6), ("top-1 %", 7),
         ("TTA top-1 %", 11), ("target", 6), ("to target (s)", 13), ("img/s", 9))


def _row(cells) -> str:
    return "| " + " | ".join(str(c).rjust(w) for c, (_, w) in zip(cells, _COLS)) + " |"


def table_header() -> str:
    return _row([name for name, _ in _COLS]) + "\n" + \
        "|" + "|".join("-" * (w + 1) + ":" for _, w in _COLS) + "|"


def table_row(i: int, r: dict) -> str:
    return _row([i + 1, r["seed"], f"{r['timed_s']:.3f}", f"{r['epochs']:.2f}",
                 f"{100 * r['top1']:.2f}", fmt(pct(r["tta_top1"])),
                 "yes" if r["reached_target"] else "no", fmt(r["time_to_target_s"], ".3f"),
                 fmt(r["img_per_s"], ",.0f")])


def summary_text(s: dict) -> str:
    from fastres.bench import GCPauses

    t = s["timed_s"]
    lines = [f"summary over {s['runs']} run{'s' if s['runs'] != 1 else ''}:",
             f"  time        {fmt_pm(t, '.3f')} s   (min {t['min']:.3f}, max {t['max']:.3f})",
             f"  of which    data-dependent init {fmt(s['data_init_s']['mean'], '.3f')} s + "
             f"training {fmt(s['train_s']['mean'], '.3f')} s + final evaluation "
             f"{fmt(s['final_eval_s']['mean'], '.3f')} s (means)",
             f"  epochs      {fmt_pm(s['epochs'], '.2f')}",
             f"  top-1       {fmt_pm(s['top1'], '.2f', 100)} %   (min "
             f"{100 * s['top1']['min']:.2f}, max {100 * s['top1']['max']:.2f})"]
    if s["tta_top1"]["n"]:
        lines.append(f"  TTA top-1   {fmt_pm(s['tta_top1'], '.2f', 100)} %   (min "
                     f"{100 * s['tta_top1']['min']:.2f}, max {100 * s['tta_top1']['max']:.2f})")
    tt = s["time_to_target_s"]
    lines.append(f"  target {100 * s['target_acc']:.2f}%: reached in {s['reached']}/{s['runs']} "
                 f"runs ({100 * s['reached_fraction']:.0f}%), mean accuracy "
                 f"{'meets' if s['mean_reaches_target'] else 'misses'} it"
                 + (f"; time to target {fmt_pm(tt, '.3f')} s" if tt["n"] else ""))
    g = GCPauses.total([s["gc_pauses"]])
    lines.append(f"  GC pauses   {g.describe('in the timed regions')}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    """Accuracy against timed seconds, one line per run (per-epoch evaluations when run
    with --curve) ending in a star at the final (TTA) accuracy; the target as a dashed line
    and mean ± std as a cross. None when matplotlib is missing (`pip install fastres[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs, s = result["runs"], result["summary"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=130)
    colors = plt.get_cmap("viridis")
    for i, r in enumerate(runs):
        c = colors(i / max(len(runs) - 1, 1) * 0.85)
        xs = [p["timed_s"] for p in r["curve"]]
        ys = [100 * p["test_top1"] for p in r["curve"]]
        if len(xs) > 1:
            ax.plot(xs, ys, "-o", color=c, lw=1.2, ms=3, alpha=0.8)
        ax.plot(xs[-1:], ys[-1:], "*", color=c, ms=11, mec="black", mew=0.5,
                label=f"seed {r['seed']}" if len(runs) <= 10 else None, zorder=3)
    t, a = s["timed_s"], s["accuracy"]
    ax.errorbar([t["mean"]], [100 * a["mean"]], xerr=[t["std"]], yerr=[100 * a["std"]],
                fmt="+", color="crimson", ms=14, mew=2, capsize=4, zorder=4,
                label=f"mean {100 * a['mean']:.2f}% in {t['mean']:.2f} s")
    ax.axhline(100 * s["target_acc"], ls="--", color="gray", lw=1,
               label=f"target {100 * s['target_acc']:.2f}%")
    cfg = result["config"]
    ax.set_title(f"fastres speedrun: {result['preset']} ({cfg['model']['name']}, "
                 f"{cfg['run']['precision']}, compile {cfg['run']['compile']})\n"
                 f"{result['env']['device']}, {s['runs']} runs, reached target "
                 f"{s['reached']}/{s['runs']}", fontsize=9)
    ax.set_xlabel("timed seconds (compilation and warm-up excluded)")
    ax.set_ylabel("test accuracy (%)" + (" — final with TTA" if runs and runs[0]["tta_top1"]
                                         is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.85, ncol=2 if len(runs) > 5 else 1)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)

    from fastres.engine import rundir
    from fastres.errors import ConfigError

    if args.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {args.runs}")
    if args.target is not None and not 0.0 < args.target <= 1.0:
        raise ConfigError(f"--target is a fraction in (0, 1] (e.g. 0.94), got {args.target}")
    run = {"progress": args.progress, "out_dir": ""}
    if args.target is not None:
        run["target_acc"] = args.target
    if args.curve:
        run["eval_every"] = 1.0
    cfg = config_from(args, run=run)
    # The output folder, before any data is read: location, lock, refusal (--overwrite).
    out = args.out or f"runs/speedrun-{args.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    rundir.check_apart(out, cfg.data.data_dir)
    claimed = claim_output_dir(out, overwrite=args.overwrite)
    try:
        return _speedrun(args, argv, cfg, claimed)
    finally:
        claimed.release()


def _speedrun(args, argv, cfg, claimed) -> int:
    import torch

    from fastres import config as C
    from fastres.bench import environment
    from fastres.data import describe
    from fastres.engine import build, load_data, resolve_for, rundir, train
    from fastres.engine.evaluate import describe_tta
    from fastres.engine.records import RunRecorder

    if claimed.moved_to is not None:
        print(f"--overwrite: the previous contents of {claimed.path} are now in "
              f"{claimed.moved_to}")
    cfg = resolve_for(cfg)
    rundir.check_data_fits(cfg)  # a batch larger than the data: refused before reading it
    r = cfg.run
    seed0 = r.seed
    out = claimed.path
    env = environment(r.device)

    data = load_data(cfg)  # read once; every run builds its loaders from these arrays
    info = data.info()
    print(f"fastres speedrun: preset {args.preset}, model {cfg.model.name}, {args.runs} run"
          f"{'s' if args.runs > 1 else ''} (seeds {seed0}..{seed0 + args.runs - 1}), target "
          f"{100 * r.target_acc:.2f}%")
    print(f"  {env_line(env)}")
    print(f"  {describe(info, cfg.data.train_limit, cfg.data.test_limit)}")
    print(f"  {r.precision}, compile {r.compile}, loader {cfg.data.loader}, batch "
          f"{cfg.data.batch_size}, {cfg.schedule.steps or cfg.schedule.epochs} "
          f"{'steps' if cfg.schedule.steps else 'epochs'}, TTA {describe_tta(r.tta, r.tta_fraction)}, eval every "
          f"{r.eval_every:g} epochs", flush=True)

    # The model object every run trains (see the module docstring); run i loads the initial
    # weights a fresh build with seed i would have.
    model = None
    warmup = {"steps": 0, "wall_s": 0.0}
    on_gpu = r.device.startswith("cuda")

    warm_t0 = None  # when the warm-up started, while it runs

    def warm_up() -> None:
        nonlocal model, warm_t0
        warm_t0 = time.perf_counter()
        built = build(C.replace(cfg, run={"seed": seed0}), data=data)
        steps = args.warmup_steps if args.warmup_steps > 0 else len(built.loaders[0]) + 1
        warmup["steps"] = steps
        # The timed runs' schedule, stopped early: its length is part of the compiled step,
        # so a shorter warm-up schedule would compile the step a second time in run 1.
        wcfg = C.replace(cfg, run={"progress": "none", "eval_every": 0.0})
        done = train(wcfg, built.model, built.loaders, data_info=info, stop_at_step=steps)
        model = built.model
        # the steps it trained: at most the schedule's length
        warmup.update(steps=done.final["steps"], wall_s=time.perf_counter() - warm_t0)
        warm_t0 = None
        print(f"  warm-up: {warmup['steps']} steps in {warmup['wall_s']:.1f} s wall, not timed"
              + (" (compilation included)" if r.compile != "off" else ""), flush=True)

    def one_run(i: int) -> dict:
        nonlocal model
        seed = seed0 + i
        run_dir = out / "runs" / f"seed_{seed}"
        rcfg = C.replace(cfg, run={"seed": seed, "out_dir": str(run_dir) if args.records
                                   else ""})
        t0 = time.perf_counter()
        built = build(rcfg, data=data)
        if model is None:
            model = built.model
        else:
            model.load_state_dict(built.model.state_dict())
        # Inside a folder claimed new (or moved aside) a seed's directory is new too.
        recorder = RunRecorder(rundir.claim(run_dir, "new") if args.records else None)
        try:
            result = train(rcfg, model, built.loaders, data_info=info, recorder=recorder)
        finally:
            recorder.close()
        if on_gpu:
            torch.cuda.synchronize()
        return run_record(seed, result.final, result.epochs, time.perf_counter() - t0)

    runs = []
    stopped = None
    with signals_raise():  # a stop (a time limit, Ctrl-C) keeps what finished
        try:
            if args.warmup_steps != 0 and (args.warmup_steps > 0 or on_gpu
                                           or r.compile != "off"):
                warm_up()
            print()
            print(table_header(), flush=True)
            for i in range(args.runs):
                runs.append(one_run(i))
                print(table_row(i, runs[-1]), flush=True)
        except Stopped as e:
            stopped = e.signum
            if warm_t0 is not None:  # stopped in the warm-up: how long it had run
                warmup["stopped_after_s"] = time.perf_counter() - warm_t0
                print(f"\nstopped by signal {e.signum} in the warm-up after "
                      f"{warmup['stopped_after_s']:.1f} s", flush=True)
            else:
                print(f"\nstopped by signal {e.signum} after {len(runs)} of {args.runs} runs",
                      flush=True)
    record = {
        "schema": SCHEMA, "tool": "fastres speedrun", "created": datetime.now().isoformat(
            timespec="seconds"), "preset": args.preset, "argv": list(sys.argv[1:] if argv is
                                                                    None else argv),
        "device": env["device"], "env": env, "data": info, "config": C.to_dict(cfg),
        "seeds": [seed0 + i for i in range(args.runs)], "warmup": warmup,
        "timing": "trainer's timed region: first training step (data-dependent init included) "
                  "to the final TTA evaluation; CUDA events on GPU, synchronised wall clock on "
                  "CPU; compilation, warm-up and per-epoch evaluations excluded",
        "runs": runs,
    }
    if stopped is not None:
        record["stopped"] = {"signal": stopped, "runs_finished": len(runs),
                             "runs_planned": args.runs}
    if not runs:  # stopped before a run finished: what the warm-up took is still a result
        if stopped is not None:
            print(f"\nwrote {write_json(out / 'speedrun.json', record)}")
        return 128 + stopped if stopped is not None else 0

    summary = summary_of(runs, r.target_acc)
    print()
    print(summary_text(summary))
    result = {**record, "summary": summary}
    json_path = write_json(out / "speedrun.json", result)
    png = None if args.no_plot else plot(result, out / "speedrun.png")
    wrote = f"{json_path}" + (f", {png}" if png else "")
    if png is None and not args.no_plot:
        wrote += " (no plot: matplotlib is not installed; pip install 'fastres[plot]')"
    print(f"\nwrote {wrote}")
    return 128 + stopped if stopped is not None else 0


if __name__ == "__main__":
    from fastres.tools.cli import run_tool

    sys.exit(run_tool("speedrun", main))
