"""A progress bar over an engine's iterations (the cases of an inference run) on a terminal."""

from __future__ import annotations

import sys

from ignite.handlers import ProgressBar

from liver_fcn.options import show_progress

__all__ = ["TerminalProgress"]


class TerminalProgress:
    """Ignite's tqdm ``ProgressBar`` over the engine's iterations, with ``desc``; ``enabled`` is
    ``"auto"`` (only when stderr is a terminal: a log file or a pipe gets the plain per-case log lines
    and no bar), or true/false."""

    def __init__(self, desc: str = "cases", enabled: bool | str = "auto") -> None:
        self.desc = desc
        self.enabled = show_progress(enabled)

    def attach(self, engine) -> None:
        if self.enabled:
            ProgressBar(persist=True, desc=self.desc, file=sys.stderr).attach(engine)
