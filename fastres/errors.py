"""Errors a user can act on.

Everything the user can get wrong (a path, a name, a value) raises a subclass of
`FastresError` with a message that names the problem and the fix. The command line prints
that message and exits with status 2 instead of showing a traceback.
"""


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


class RunDirError(FastresError):
    """A run directory that cannot be used: a file or read-only place, in use by another
    run, holding a run that was not asked to be resumed or replaced, or a write that
    failed (a full disk)."""


class PeerLost(FastresError):
    """Another process of a distributed job died; this one cannot go on alone. Not an
    input error, so the exit status is 1 (torchrun reports the dead rank as the cause)."""

    exit_code = 1


def did_you_mean(name: str, choices) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_choice(kind: str, name: str, choices) -> ConfigError:
    choices = sorted(choices)
    return ConfigError(
        f"unknown {kind} {name!r}{did_you_mean(name, choices)}; choose from: {', '.join(choices)}"
    )
