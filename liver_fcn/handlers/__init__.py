"""Ignite handlers the bundle attaches to its trainer and evaluators, one concern a module.

* :mod:`~liver_fcn.handlers.mlflow_run` - :class:`MLflowRunHandler`: MONAI's ``MLFlowHandler`` that
  marks a crashed run FAILED, tags it, logs the training's parameters from the engine and the
  parsed config, its data sets, curves, plots, the config as run and the registered model.
* :mod:`~liver_fcn.handlers.checkpoint_saver` - :class:`AtomicCheckpointSaver` (checkpoints written
  through a temporary file and a rename, never torn) and :class:`FinalModelSaver` (``model.pt``
  only when the run completes).
* :mod:`~liver_fcn.handlers.best_model` - :class:`BestModelTracking`: the best-model saver's
  scores, saved in the training checkpoint so that a resumed run keeps its best model.
* :mod:`~liver_fcn.handlers.termination` - :func:`terminate_on_signal`,
  :func:`finish_epoch_before_terminating`, :func:`termination_held`: SIGTERM as
  :class:`TrainingTerminated` in the loop, held over an epoch's end and a checkpoint write.
* :mod:`~liver_fcn.handlers.validation_overlay` - :class:`ValidationOverlay`: the best checkpoint's
  prediction on a validation patient, drawn when training ends.
* :mod:`~liver_fcn.handlers.progress` - :class:`TerminalProgress`: a progress bar over the cases
  of an inference run, on a terminal only.
* :mod:`~liver_fcn.handlers.progress_file` - :class:`ProgressFile`: a training's iteration, epoch and
  loss as a small JSON file that ``liver-fcn crossval`` follows.
* :mod:`~liver_fcn.handlers.evaluation_report` - :class:`EvaluationReport`: the evaluation's
  per-patient CSV and summary, and the summary means as engine metrics for MLflow.
"""

from liver_fcn.handlers.best_model import BestModelTracking
from liver_fcn.handlers.checkpoint_saver import AtomicCheckpointSaver, FinalModelSaver
from liver_fcn.handlers.evaluation_report import EvaluationReport
from liver_fcn.handlers.mlflow_run import MLflowRunHandler
from liver_fcn.handlers.progress import TerminalProgress
from liver_fcn.handlers.progress_file import ProgressFile, read_progress
from liver_fcn.handlers.termination import (
    TrainingTerminated,
    finish_epoch_before_terminating,
    terminate_on_signal,
    termination_held,
)
from liver_fcn.handlers.validation_overlay import ValidationOverlay

__all__ = [
    "AtomicCheckpointSaver",
    "BestModelTracking",
    "EvaluationReport",
    "FinalModelSaver",
    "MLflowRunHandler",
    "ProgressFile",
    "TerminalProgress",
    "TrainingTerminated",
    "ValidationOverlay",
    "finish_epoch_before_terminating",
    "read_progress",
    "terminate_on_signal",
    "termination_held",
]
