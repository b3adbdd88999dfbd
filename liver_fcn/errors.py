"""The one exception type the project raises for bad input, and its reporting under the bundle CLI."""

from __future__ import annotations

import functools
import sys

__all__ = ["InputError", "Terminated", "one_line_write_errors", "reported", "root_cause"]


class Terminated(Exception):
    """A command stopped by a signal (SIGTERM) after it had marked what it was doing; the command line
    prints it as one line and exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int = 15) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum


class InputError(ValueError):
    """Bad input: the message is one line that names the offending file or folder and the cause.

    It is raised before any output is written. The command-line tools print it without a traceback.
    """


def root_cause(e: BaseException) -> BaseException:
    """The innermost ``__cause__`` of ``e``: MONAI wraps what a transform or config expression raises
    ("applying transform ...", "Failed to evaluate ..."), and the user needs the original."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


def _bundle_cli() -> bool:
    """True when the process is ``python -m monai.bundle ...``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "monai.bundle.__main__"


def reported(func):
    """Decorate a function that bundle configs call on user input.

    Under ``python -m monai.bundle``, an :class:`InputError` ends the process with exit status 2
    and the one-line message on stderr, instead of MONAI's chained traceback of config
    expressions. Called from Python (a notebook, the tests), the InputError is raised as usual.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except InputError as e:
            if not _bundle_cli():
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


def one_line_write_errors() -> None:
    """Under ``python -m monai.bundle``, an uncaught OSError that names its file (a full disk or a file
    size limit while a checkpoint is written) ends the process with that one line on stderr (exit
    status 1) rather than a traceback through ignite and MONAI; anything else keeps its traceback."""
    if not _bundle_cli():
        return
    previous = sys.excepthook

    def hook(kind, value, tb) -> None:
        root = root_cause(value)
        if isinstance(root, OSError) and root.filename:
            print(f"error: {root}", file=sys.stderr, flush=True)
        else:
            previous(kind, value, tb)

    sys.excepthook = hook
