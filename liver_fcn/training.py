"""Training helpers the bundle calls: staged initialisation, resuming, and clean termination.

* :func:`prepare_network` initialises a network from another checkpoint before training - the
  staged FCN training (FCN-32s -> 16s -> 8s -> 4s): every tensor the two variants share is loaded,
  the new skip scores keep their zero initialisation and the new upsamplers their bilinear kernels.
* :class:`AtomicCheckpointSaver` makes each checkpoint write atomic, so a process killed while
  saving never leaves a truncated checkpoint behind (what a checkpoint holds, and how a killed
  training finds the one to resume from: :mod:`liver_fcn.checkpoint`).
* :func:`terminate_on_signal` turns SIGTERM into an exception inside the training loop, so that a
  killed training ends its MLflow run as FAILED (Ctrl-C already does) instead of leaving it RUNNING;
  :func:`finish_epoch_before_terminating` lets an epoch that has finished its iterations also finish
  its validation, logging and checkpoint first, so an epoch is either fully recorded or not at all.
* :func:`warmup_decay_schedule` is the learning-rate schedule of an iteration budget (linear
  warm-up, then cosine or polynomial decay), stepped by MONAI's ``LrScheduleHandler`` every
  iteration; :class:`FinalModelSaver` writes ``model.pt`` at the end of a run that has no
  validation patient to choose a best checkpoint (cross-validation folds).

The trainer's "epoch" is a period of ``epoch_length`` iterations; validation runs every ``val_interval``
periods (1 by default) and the periodic checkpoint every ``checkpoint_interval``, so
validation, checkpoints and per-period MLflow metrics all happen on the same beat whatever the size
of the data set.
"""

from __future__ import annotations

import logging
import math
import os
import signal
from contextlib import contextmanager

import torch
from ignite.engine import Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from liver_fcn.checkpoint import load_model_state
from liver_fcn.errors import InputError, reported

__all__ = [
    "check_schedule",
    "describe_augmentation",
    "AtomicCheckpointSaver",
    "FinalModelSaver",
    "augmentation_summary",
    "warmup_decay_schedule",
    "check_world_size",
    "finish_epoch_before_terminating",
    "TrainingTerminated",
    "prepare_network",
    "terminate_on_signal",
    "termination_held",
]

logger = logging.getLogger(__name__)


@reported
def prepare_network(network: torch.nn.Module, device, init_checkpoint: str | os.PathLike | None = None, log=None):
    """Move ``network`` to ``device``, first initialising it from ``init_checkpoint`` if given."""
    log = log or logger.info
    if init_checkpoint and str(init_checkpoint).strip().lower() not in ("none", "null", "false"):
        state, _ = load_model_state(init_checkpoint)
        own = network.state_dict()
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise InputError(
                    f"{init_checkpoint}: {k} has shape {tuple(v.shape)}, the network has {tuple(own[k].shape)} "
                    "(different width, channels or classes)"
                )
        shared = {k: v for k, v in state.items() if k in own}
        if not shared:
            raise InputError(f"{init_checkpoint}: shares no parameter with this network")
        network.load_state_dict(shared, strict=False)
        new = sorted({k.split(".")[0] for k in own if k not in state})
        dropped = sorted({k.split(".")[0] for k in state if k not in own})
        log(
            f"initialised {len(shared)} of {len(own)} tensors from {init_checkpoint}"
            + (f"; kept their initialisation: {', '.join(new)}" if new else "")
            + (f"; not used: {', '.join(dropped)}" if dropped else "")
        )
    return network.to(device)


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
def termination_held():
    """Hold SIGTERM (see :func:`terminate_on_signal`) over a block that must not be cut short."""
    if _termination["held"]:  # nested in a longer hold, which releases it
        yield
        return
    _termination["held"] = True
    try:
        yield
    except BaseException:
        _termination["held"] = False
        raise
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


class _AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver in its atomic mode (a temporary file renamed into place, readable by the
    group as MONAI's saver is), with MONAI's optional fixed file name, holding SIGTERM while it writes."""

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        with termination_held():
            super().__call__(checkpoint, self.filename or filename, metadata)

    def remove(self, filename: str) -> None:
        super().remove(self.filename or filename)


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


@reported
def check_world_size(validation_files: list) -> int:
    """Distributed validation splits the patients over the processes: each needs at least one
    (a run without validation patients, such as a cross-validation fold, needs none)."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    if 0 < len(validation_files) < world:
        raise InputError(
            f"validation split has {len(validation_files)} patient(s) for {world} processes; "
            "give it at least one per process (liver-fcn prepare --val_fraction / --val_patients)"
        )
    return world


class FinalModelSaver(AtomicCheckpointSaver):
    """Writes the final weights (``save_final=True``) when the run completes, and only then.

    MONAI's CheckpointSaver also writes its final checkpoint when the run raises; a crashed run must
    not leave a ``model.pt`` that looks like a finished model.
    """

    def exception_raised(self, engine, e: Exception) -> None:
        raise e


SCHEDULES = ("cosine", "poly", "constant")


def warmup_decay_schedule(
    optimizer: torch.optim.Optimizer,
    total_iterations: int,
    warmup_iterations: int = 0,
    kind: str = "cosine",
    power: float = 0.9,
    floor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration learning-rate factor: linear warm-up from ~0 to 1 over ``warmup_iterations``, then
    ``cosine`` (half a cosine down to ``floor``), ``poly`` ((1 - t) ** power, down to ``floor``) or
    ``constant``. ``t`` runs from 0 to 1 over the iterations after the warm-up."""
    if kind not in SCHEDULES:
        raise InputError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    total, warm = max(1, int(total_iterations)), max(0, int(warmup_iterations))
    warm = min(warm, total - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if kind == "constant":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total - warm))
        decay = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else (1 - t) ** power
        return floor + (1 - floor) * decay

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def augmentation_summary(settings: dict) -> str:
    """One readable line of the augmentations that are on: ``rotate p=0.3 (12), zoom p=0.5 ([0.85, 1.15])``."""
    parts = []
    for name, (prob, value) in settings.items():
        if prob and float(prob) > 0:
            parts.append(f"{name} p={prob:g}" + (f" ({value})" if value is not None else ""))
    return ", ".join(parts) or "none"


#: MONAI's random transforms the recipe uses: the name in the run's summary and the magnitude as set
_AUGMENTATIONS = {
    "RandContrastPhased": ("phase", lambda t: list(t.keep_range)),
    "RandShiftIntensityd": ("hu_offset", lambda t: t.shifter.offsets[1]),
    "RandScaleIntensityd": ("contrast", lambda t: t.scaler.factors[1]),
    "RandGaussianSmoothd": ("blur", lambda t: list(t.rand_smooth.sigma_x)),
    "RandSimulateLowResolutiond": ("lowres", lambda t: list(t.zoom_range)),
    "RandGaussianNoised": ("noise", lambda t: t.rand_gaussian_noise.std),
    "RandRotated": ("rotate", lambda t: round(math.degrees(t.rand_rotate.range_x[1]), 6)),
    "RandZoomd": ("zoom", lambda t: [t.rand_zoom.min_zoom[0], t.rand_zoom.max_zoom[0]]),
    "RandAffined": ("translate", lambda t: f"{t.rand_affine.rand_affine_grid.translate_range[0]:g} px"),
    "Rand2DElasticd": ("elastic", lambda t: None),
    "RandFlipd": ("flip", lambda t: None),
    "RandAdjustContrastd": ("gamma", lambda t: list(t.adjuster.gamma)),
}


def describe_augmentation(transform) -> str:
    """:func:`augmentation_summary` of the random transforms in ``transform`` (a ``Compose``, nested or
    not), read from the transforms themselves; others count by class name and probability."""
    found = {}
    pending = [transform]
    while pending:
        t = pending.pop(0)
        if hasattr(t, "transforms") and not hasattr(t, "prob"):
            pending[:0] = list(t.transforms)
            continue
        if not hasattr(t, "prob"):
            continue
        name, magnitude = _AUGMENTATIONS.get(type(t).__name__, (type(t).__name__, lambda t: None))
        found[name] = (t.prob, magnitude(t))
    return augmentation_summary(found)


@reported
def check_schedule(iterations: int, epoch_length: int, val_interval: int) -> int:
    """The training's periods: ``iterations`` rounded up to whole periods of ``epoch_length``
    iterations. ``val_interval`` counts periods between validations (MONAI's meaning); a value larger
    than the number of periods would never validate, which is what an ``--val_interval`` typed with
    its meaning before bundle 0.5.0 (iterations per period, now ``epoch_length``) would do."""
    for name, value in (("iterations", iterations), ("epoch_length", epoch_length), ("val_interval", val_interval)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"--{name} must be a positive whole number, got {value!r}")
    periods = math.ceil(iterations / epoch_length)
    if val_interval > periods:
        raise InputError(
            f"--val_interval {val_interval} is more periods than the training has ({periods} of "
            f"--epoch_length {epoch_length} iterations): it counts periods between validations; "
            "the iterations of a period are --epoch_length"
        )
    return periods
