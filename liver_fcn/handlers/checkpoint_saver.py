"""Checkpoint savers whose files are never torn: MONAI's CheckpointSaver writing through a temporary
file and a rename, and the final model written only when a run completes.
"""

from __future__ import annotations

import os
from pathlib import Path

from ignite.engine import Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from liver_fcn.handlers.termination import termination_held
from liver_fcn.outputs import naming_the_file

__all__ = ["AtomicCheckpointSaver", "FinalModelSaver"]


class _AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver in its atomic mode (a temporary file renamed into place, readable by the
    group as MONAI's saver is), with MONAI's optional fixed file name, holding SIGTERM while it writes."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        name = self.filename or filename
        with termination_held(), naming_the_file(Path(self.dirname) / name):
            super().__call__(checkpoint, name, metadata)

    def _save_func(self, checkpoint, path, func) -> None:
        """ignite's atomic write, flushed to disk before the rename, with the OSError behind a failed
        write raised (a full disk, a file size limit): torch reports it only as a mismatch of positions
        in its zip writer. Whatever fails, ignite removes the temporary file."""

        def save(obj, file, **kwargs) -> None:
            checked = _WriteErrors(file)
            try:
                func(obj, checked, **kwargs)
            except RuntimeError:
                if checked.error is not None:
                    raise checked.error from None
                raise
            file.flush()
            os.fsync(file.fileno())

        super()._save_func(checkpoint, path, save)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


class _WriteErrors:
    """A binary file that keeps the OSError its last failed write raised."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self.file, name)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's CheckpointSaver whose files are written atomically.

    MONAI's saver writes straight into the final file name; a process killed during that write
    leaves a truncated ``*.pt`` that ``--resume`` would pick as the newest checkpoint.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for ckpt in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if ckpt is not None:
                ckpt.save_handler = _AtomicDiskSaver(self.save_dir, getattr(ckpt.save_handler, "filename", None))


class FinalModelSaver(AtomicCheckpointSaver):
    """Writes the final weights (``save_final=True``) when the run completes, and only then.

    MONAI's CheckpointSaver also writes its final checkpoint when the run raises; a crashed run must
    not leave a ``model.pt`` that looks like a finished model.
    """

    def attach(self, engine) -> None:
        super().attach(engine)
        # MONAI's saver would write its final checkpoint on an exception and re-raise it at once; as the
        # first EXCEPTION_RAISED handler it would keep those after it (MLflow marking the run FAILED)
        # from running. Without it, the exception goes on through the other handlers as it came.
        if engine.has_event_handler(self.exception_raised, Events.EXCEPTION_RAISED):
            engine.remove_event_handler(self.exception_raised, Events.EXCEPTION_RAISED)

    def exception_raised(self, engine, e: Exception) -> None:
        raise e
