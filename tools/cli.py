"""The `fastres` command: one subcommand per tool (installed as `fastres.tools.cli`; the
library never imports it, except the `python -m fastres` shim in fastres/__main__.py).

Each subcommand lives in a module with `main(argv) -> int` (the same module runs as a
script from `tools/`). Errors caused by input (`FastresError`) print one line and exit 2.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line description)
COMMANDS = {
    "train": ("fastres.tools.train", "train a model from a preset (the main job)"),
    "eval": ("fastres.tools.eval", "evaluate a checkpoint on the test set"),
    "models": ("fastres.tools.models", "list registered models with params and FLOPs"),
    "data": ("fastres.tools.data", "inspect (or download) a CIFAR data folder"),
    "speedrun": ("fastres.tools.speedrun", "time a preset over several seeds"),
    "profile": ("fastres.tools.profile", "throughput and step-time breakdown"),
    "table": ("fastres.tools.table", "the reference article's results table"),
    "bench-kernels": ("fastres.tools.bench_kernels", "fused BN-act and optimizer benchmarks"),
    "bench-loaders": ("fastres.tools.bench_loaders", "data loader throughput"),
    "scaling": ("fastres.tools.scaling", "training img/s at 1, 2, ... processes (DDP)"),
    "device-check": ("fastres.tools.gpu_kit.device_check", "every GPU path in one timed run (--dry-run: "
                     "the CPU rehearsal)"),
    "pack-dali": ("fastres.tools.gpu_kit.pack_dali", "offline install kit for DALI, in parts"),
    "loader-parity": ("fastres.tools.gpu_kit.loader_parity", "DALI vs tensor loader: same batches, "
                      "same augmentation statistics"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: fastres COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`fastres COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from fastres import __version__

        print(f"fastres {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from fastres.errors import did_you_mean

        print(f"fastres: unknown command {name!r}{did_you_mean(name, COMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return run_tool(name, module.main, rest)


def _rank_tag() -> str:
    """' [rank N/W]' under torchrun, so a failing rank's message says which it was."""
    import os

    world = os.environ.get("WORLD_SIZE")
    if world and world != "1":
        return f" [rank {os.environ.get('RANK', '?')}/{world}]"
    return ""


def _one_line_usage_errors():
    """While a tool runs, argparse's errors (an unknown option value, a missing required
    option) raise a one-line ConfigError, with a "did you mean" for a mistyped choice,
    instead of printing the whole usage block: every mistake reads the same."""
    import argparse
    import contextlib
    import re

    from fastres.errors import ConfigError, did_you_mean

    def error(parser, message):
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            message = message[:m.start()] + (f"invalid choice: {m.group(1)!r}"
                                             f"{did_you_mean(m.group(1), choices)}; choose "
                                             f"from {', '.join(choices)}")
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:  # a mistyped flag: name the flag it is closest to
            flags = [o for action in parser._actions for o in action.option_strings]
            for word in m.group(1).split():
                if word.startswith("--") and did_you_mean(word.split("=")[0], flags):
                    message += did_you_mean(word.split("=")[0], flags)
                    break
        raise ConfigError(f"{message} (`{parser.prog} --help` lists the options)")

    @contextlib.contextmanager
    def patched():
        old = argparse.ArgumentParser.error
        argparse.ArgumentParser.error = error
        try:
            yield
        finally:
            argparse.ArgumentParser.error = old

    return patched()


def run_tool(name: str, tool_main, argv=None) -> int:
    """Run a tool's `main(argv)`, turning input errors (argparse's included) into one line
    and exit status 2.

    Tools call this from their `if __name__ == "__main__":` block too, so a script run as
    `python tools/x.py` behaves like `fastres x`.
    """
    from fastres.errors import FastresError

    try:
        with _one_line_usage_errors():
            return int(tool_main(argv) or 0)
    except FastresError as e:
        print(f"fastres {name}:{_rank_tag()} error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"fastres {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastres models | head`: the reader left; not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
