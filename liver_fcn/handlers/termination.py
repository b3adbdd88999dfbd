"""A killed training that ends cleanly: SIGTERM as an exception in the training loop, held while an
epoch's end or a checkpoint write must not be cut short.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from ignite.engine import Events

__all__ = ["TrainingTerminated", "finish_epoch_before_terminating", "terminate_on_signal", "termination_held"]


class TrainingTerminated(Exception):
    """Raised in the training loop when the process receives SIGTERM."""


# a SIGTERM that arrives while termination is held is remembered and raised when the hold ends
_termination: dict = {"held": False, "pending": None}


def terminate_on_signal(signals=(signal.SIGTERM,)) -> None:
    """Make SIGTERM raise :class:`TrainingTerminated` (main thread only; other threads ignore it).

    While termination is held (:func:`termination_held`), the signal takes effect when the hold ends.
    """
    _termination.update(held=False, pending=None)

    def handler(signum, frame):
        reason = f"terminated by signal {signal.Signals(signum).name}"
        if _termination["held"]:
            _termination["pending"] = reason
            return
        raise TrainingTerminated(reason)

    try:
        for s in signals:
            signal.signal(s, handler)
    except ValueError:  # not the main thread
        pass


def _release_termination() -> None:
    _termination["held"] = False
    reason, _termination["pending"] = _termination["pending"], None
    if reason:
        raise TrainingTerminated(reason)


@contextmanager
def termination_held(raise_after: bool = True):
    """Hold SIGTERM (see :func:`terminate_on_signal`) over a block that must not be cut short.

    ``raise_after``: raise a SIGTERM that came during the block when it ends; False drops it (for a
    block that already ends the run, such as marking it FAILED, whose own error must go on).
    """
    if _termination["held"]:  # nested in a longer hold, which releases it
        yield
        return
    _termination["held"] = True
    try:
        yield
    except BaseException:
        _termination["held"] = False
        raise
    if not raise_after:
        _termination["pending"] = None
    _release_termination()


def finish_epoch_before_terminating(trainer) -> None:
    """Hold SIGTERM from the last iteration of each epoch until every epoch-end handler has run.

    Attach after the handlers of the epoch's end (validation, MLflow, the per-epoch checkpoint): a
    SIGTERM during the iterations stops at once and the epoch is redone on resume; one during the
    epoch's end waits until its metrics are logged and its checkpoint written. Either way no epoch
    is lost or logged twice. (A SIGKILL cannot be held; the checkpoint is still never truncated.)
    """

    def hold(engine) -> None:
        _termination["held"] = True

    def release(engine) -> None:
        _release_termination()

    last_iteration = Events.ITERATION_COMPLETED(event_filter=lambda e, it: it % e.state.epoch_length == 0)
    trainer.add_event_handler(last_iteration, hold)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, release)
