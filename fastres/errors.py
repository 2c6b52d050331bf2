"""Errors a user can act on.

Everything the user can get wrong (a path, a name, a value) raises a subclass of
`FastresError` with a message that names the problem and the fix. The command line prints
that message and exits with status 2 instead of showing a traceback.
"""


__all__ = ["FastresError", "ConfigError", "DataError", "CheckpointError", "TrainingDiverged",
           "OutputError", "RunDirError", "PeerLost", "warn", "did_you_mean", "unknown_choice"]


class FastresError(Exception):
    """Base class for errors caused by input (config, data, files), not by a bug."""

    exit_code = 2


class ConfigError(FastresError, ValueError):
    """An unknown key, a value of the wrong type, or an impossible combination."""


class DataError(FastresError):
    """A data set that is missing, truncated, corrupt or of the wrong shape."""


class CheckpointError(FastresError):
    """A checkpoint that is missing, corrupt, or does not match the run resuming it."""


class TrainingDiverged(FastresError):
    """The loss, a parameter or a buffer became NaN or infinite (no checkpoint holds it)."""


class OutputError(FastresError):
    """An output location that cannot be used: a file where a folder is needed (or the
    reverse), a read-only or pseudo file system, a folder without write permission, one in
    use by another fastres process, one that holds data the caller did not ask to replace
    (every writer refuses to replace data without an explicit `overwrite`), or a write that
    failed (a full disk)."""


class RunDirError(OutputError):
    """An `OutputError` about a run directory (`--out` of `fastres train`) or a tool's
    output folder or file, all under the same contract (`fastres.engine.rundir`)."""


class PeerLost(FastresError):
    """Another process of a distributed job died; this one cannot go on alone. Not an
    input error, so the exit status is 1 (torchrun reports the dead rank as the cause)."""

    exit_code = 1


def warn(message: str) -> None:
    """One 'fastres: warning: ...' line on stderr: something the user should know that does
    not stop the run."""
    import sys

    print(f"fastres: warning: {message}", file=sys.stderr, flush=True)


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def did_you_mean(name: str, choices) -> str:
    """' (did you mean X?)' when a close match exists (case aside), else ''. Among
    difflib's close matches the fewest edits win (ties to difflib's order): 'resnet2O' is
    one letter off 'resnet20' and two off 'resnet32', which difflib scores alike."""
    import difflib

    by_lower = {}
    for c in choices:
        by_lower.setdefault(str(c).lower(), c)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=5)
    if not close:
        return ""
    best = min(close, key=lambda c: (_edits(name.lower(), c), close.index(c)))
    return f" (did you mean {by_lower[best]!r}?)"


def unknown_choice(kind: str, name: str, choices) -> ConfigError:
    choices = sorted(choices)
    return ConfigError(
        f"unknown {kind} {name!r}{did_you_mean(name, choices)}; choose from: {', '.join(choices)}"
    )
