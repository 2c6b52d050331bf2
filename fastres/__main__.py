"""`python -m fastres ...` (and `torchrun -m fastres ...`): the one place the library
reaches into tools/ (the CLI).

Run from a folder that holds a checkout named `fastres` (e.g. ~/src with ~/src/fastres), the
checkout's top folder has no __init__.py, so Python's path finder makes it a *namespace*
package named `fastres` ahead of an editable install (whose finder comes after the path
finder); only this file then comes from the install, and the first `from fastres import
__version__` fails. A regular (non-editable) install is not affected: a regular package
anywhere on sys.path wins over a namespace portion. So when `fastres` is a namespace
package here, drop the folders that shadow the install from sys.path, forget the
shadowing modules and import the installed package; if that still fails, say so in one
line (exit 2).
"""
import os
import sys


def _unshadow() -> str | None:
    """None when `fastres` is (now) the real package, else a one-line error."""
    pkg = sys.modules.get("fastres")
    if pkg is None or getattr(pkg, "__file__", None):
        return None
    shadows = [os.path.realpath(p) for p in getattr(pkg, "__path__", [])]
    sys.path[:] = [p for p in sys.path
                   if os.path.realpath(os.path.join(p or os.curdir, "fastres")) not in shadows]
    for name in [m for m in sys.modules if m == "fastres" or m.startswith("fastres.")]:
        del sys.modules[name]
    import importlib

    importlib.invalidate_caches()
    try:
        real = importlib.import_module("fastres")
    except ImportError:
        real = None
    if real is not None and getattr(real, "__file__", None):
        return None
    return (f"fastres: the folder {shadows[0] if shadows else '?'} hides the installed fastres "
            "package (it is imported as an empty namespace package); run from another "
            "folder, or use the `fastres` command")


_error = _unshadow()
if _error:
    print(_error, file=sys.stderr)
    sys.exit(2)

from fastres.tools.cli import main  # noqa: E402

sys.exit(main())
