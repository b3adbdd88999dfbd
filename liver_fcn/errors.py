"""The one exception type the project raises for bad input."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input: the message is one line that names the offending file or folder and the cause.

    It is raised before any output is written. The command-line tools print it without a traceback.
    """
