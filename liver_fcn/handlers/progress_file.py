"""A training's progress as a small JSON file that another process can follow."""

from __future__ import annotations

import json
import math
import os
import time

from ignite.engine import Engine, Events

from liver_fcn.outputs import write_json_atomic

__all__ = ["ProgressFile", "read_progress"]


class ProgressFile:
    """Writes ``{"iteration", "max_iterations", "epoch", "max_epochs", "loss", "elapsed_s", "done"}``
    to ``path`` (atomically: a reader never sees half a file) every ``every`` iterations, at each
    epoch's end and when the run completes. ``liver-fcn crossval`` passes a path to each fold's
    training and draws its progress from it; a training that is given no path writes nothing.
    """

    def __init__(self, path: str | os.PathLike | None = None, every: int = 10) -> None:
        self.path = str(path) if path else ""
        self.every = max(1, int(every))
        self.t0 = time.time()

    def attach(self, engine: Engine) -> None:
        if not self.path:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.write)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)
        engine.add_event_handler(Events.COMPLETED, self.write, True)

    def _started(self, engine: Engine) -> None:
        self.t0 = time.time()
        self.write(engine)

    def write(self, engine: Engine, done: bool = False) -> None:
        s = engine.state
        output = s.output[0] if isinstance(s.output, list) and s.output else s.output
        loss = output.get("loss") if isinstance(output, dict) else None
        loss = float(loss) if loss is not None else math.nan
        write_json_atomic(
            self.path,
            {
                "iteration": int(s.iteration),
                "max_iterations": int((s.epoch_length or 0) * (s.max_epochs or 0)),
                "epoch": int(s.epoch),
                "max_epochs": int(s.max_epochs or 0),
                "loss": None if math.isnan(loss) else round(loss, 5),
                "elapsed_s": round(time.time() - self.t0, 1),
                "done": bool(done),
            },
        )


def read_progress(path: str | os.PathLike) -> dict | None:
    """The last progress a :class:`ProgressFile` wrote at ``path``, or None (not yet written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
