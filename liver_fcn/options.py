"""Bundle options as typed on the command line."""

from __future__ import annotations

import sys

from liver_fcn.errors import InputError, reported

__all__ = ["flag", "show_progress"]


@reported
def flag(value, name: str = "option") -> bool:
    """A boolean bundle option as typed on the command line: ``True``/``False`` or the words
    true/false, yes/no, on/off, 1/0 in any case (``--overlay false`` reaches the config as the
    string ``"false"``, which Python would take as true). Anything else is refused with one line."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
    raise InputError(f"--{name} must be true or false, got {value!r}")


def show_progress(value="auto") -> bool:
    """Whether to draw progress bars: ``"auto"`` draws them only when stderr is a terminal (a log
    file or a pipe gets plain log lines instead); otherwise a boolean option as :func:`flag` reads it."""
    if str(value).strip().lower() == "auto":
        return sys.stderr.isatty()
    return flag(value, "progress")
