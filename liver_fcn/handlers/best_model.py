"""The best-model checkpoint's record of scores, saved with a training checkpoint so a resumed run
keeps its best model.
"""

from __future__ import annotations

__all__ = ["BestModelTracking"]


class BestModelTracking:
    """Saves and restores which score the best-model CheckpointSaver has kept so far.

    MONAI's CheckpointSaver can reload that list (``load_state_dict``) but does not expose it for
    saving; without it a resumed run would overwrite the best checkpoint with its next, possibly
    worse, validation.
    """

    def __init__(self, saver) -> None:
        self.saver = saver

    def state_dict(self) -> dict:
        inner = getattr(self.saver, "_key_metric_checkpoint", None)
        return inner.state_dict() if inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.saver.load_state_dict(state)
