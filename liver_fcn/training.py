"""Training helpers the bundle calls: staged initialisation, the schedule and its checks.

* :func:`prepare_network` initialises a network from another checkpoint before training - the
  staged FCN training (FCN-32s -> 16s -> 8s -> 4s): every tensor the two variants share is loaded,
  the new skip scores keep their zero initialisation and the new upsamplers their bilinear kernels.
* :func:`warmup_decay_schedule` is the learning-rate schedule of an iteration budget (linear
  warm-up, then cosine or polynomial decay), stepped by MONAI's ``LrScheduleHandler`` every
  iteration; :func:`check_schedule` and :func:`check_world_size` refuse budgets and process counts
  that cannot work, before any run starts.
* :class:`AugmentedBatch` is the trainer's ``prepare_batch``: the collated batch goes to the device
  and the batch augmentations (:mod:`liver_fcn.transforms.batch`) run there.
* :func:`describe_augmentation` reads the augmentation summary logged to MLflow from the transforms.

The handlers the trainer attaches (atomic checkpoints, the final model, clean termination on
SIGTERM, MLflow) are :mod:`liver_fcn.handlers`.

The trainer's "epoch" is a period of ``epoch_length`` iterations; validation runs every ``val_interval``
periods (1 by default) and the periodic checkpoint every ``checkpoint_interval``, so
validation, checkpoints and per-period MLflow metrics all happen on the same beat whatever the size
of the data set.
"""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.distributed as dist
from monai.engines import PrepareBatch
from monai.transforms import Randomizable, RandSpatialCropd

from liver_fcn.checkpoint import load_model_state
from liver_fcn.errors import InputError, reported
from liver_fcn.options import flag
from liver_fcn.transforms.batch import BatchRandSpatialCropd

__all__ = [
    "AugmentedBatch",
    "check_schedule",
    "choose_cudnn",
    "describe_augmentation",
    "augmentation_summary",
    "warmup_decay_schedule",
    "check_world_size",
    "prepare_network",
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


@reported
def check_world_size(validation_files: list) -> int:
    """Distributed validation splits the patients over the processes: each needs at least one
    (a run without validation patients, such as a cross-validation fold, needs none)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if 0 < len(validation_files) < world:
        raise InputError(
            f"validation split has {len(validation_files)} patient(s) for {world} processes; "
            "give it at least one per process (liver-fcn prepare --val_fraction / --val_patients)"
        )
    return world


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
    "RandContrastPhased": (
        "phase",
        lambda t: f"{list(t.keep_range)}, coherent {t.coherent_prob:g}" if t.coherent_prob else list(t.keep_range),
    ),
    "RandShiftIntensityd": ("hu_offset", lambda t: t.shifter.offsets[1]),
    "RandScaleIntensityd": ("contrast", lambda t: t.scaler.factors[1]),
    "RandGaussianSmoothd": ("blur", lambda t: list(t.rand_smooth.sigma_x)),
    "RandSimulateLowResolutiond": ("lowres", lambda t: list(t.zoom_range)),
    "RandGaussianNoised": ("noise", lambda t: t.rand_gaussian_noise.std),
    "RandGaussianNoiseTorchd": ("noise", lambda t: t.rand_gaussian_noise.std),
    "RandRotated": ("rotate", lambda t: round(math.degrees(t.rand_rotate.range_x[1]), 6)),
    "RandZoomd": ("zoom", lambda t: [t.rand_zoom.min_zoom[0], t.rand_zoom.max_zoom[0]]),
    "RandAffined": ("translate", lambda t: f"{t.rand_affine.rand_affine_grid.translate_range[0]:g} px"),
    "Rand2DElasticd": ("elastic", lambda t: None),
    "RandFlipd": ("flip", lambda t: None),
    "BatchRandFlipd": ("flip", lambda t: None),
    "RandAdjustContrastd": ("gamma", lambda t: list(t.adjuster.gamma)),
    "BatchRandAdjustContrastd": ("gamma", lambda t: list(t.gamma)),
}


def describe_augmentation(*transforms) -> str:
    """:func:`augmentation_summary` of the random transforms in ``transforms`` (``Compose``, nested or
    not, in the order they run), read from the transforms themselves; others count by class name and
    probability."""
    found = {}
    pending = list(transforms)
    while pending:
        t = pending.pop(0)
        if hasattr(t, "transforms") and not hasattr(t, "prob"):
            pending[:0] = list(t.transforms)
            continue
        if hasattr(t, "transform") and not hasattr(t, "prob"):  # PerSampled
            pending.insert(0, t.transform)
            continue
        if hasattr(t, "augmentation_parts"):  # one transform, several augmentations
            found.update(t.augmentation_parts())
            continue
        if isinstance(t, (RandSpatialCropd, BatchRandSpatialCropd)):  # a window of every sample, not drawn
            roi = t.roi_size if isinstance(t, BatchRandSpatialCropd) else t.cropper.roi_size
            found["crop"] = (1.0, " x ".join(map(str, roi)) + " px")
            continue
        if not hasattr(t, "prob"):
            continue
        name, magnitude = _AUGMENTATIONS.get(type(t).__name__, (type(t).__name__, lambda t: None))
        found[name] = (t.prob, magnitude(t))
    return augmentation_summary(found)


class AugmentedBatch(PrepareBatch):
    """The trainer's ``prepare_batch``: the collated batch to the device, then ``augmentation`` (the
    batch transforms of :mod:`liver_fcn.transforms.batch`, each sample drawn on its own, and any
    deterministic ones) applied there; returns ``(image, label)``.

    On a GPU the augmentation runs where the batch already is, so the loader's workers only cut and
    collate slices; on a CPU one call a batch replaces one a slice. Its random transforms are seeded
    from torch's generator when it is built (as MONAI's ``DataLoader`` seeds a data set's), so
    ``set_determinism`` before building it makes a training repeatable.
    """

    def __init__(self, augmentation=None, image_key: str = "image", label_key: str = "label") -> None:
        self.augmentation, self.image_key, self.label_key = augmentation, image_key, label_key
        if isinstance(augmentation, Randomizable):
            seed = int(torch.empty((), dtype=torch.int64).random_().item()) % (2**32)
            augmentation.set_random_state(seed)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        batch = {
            k: v.to(device=device, non_blocking=non_blocking, **kwargs) if isinstance(v, torch.Tensor) else v
            for k, v in batchdata.items()
        }
        if self.augmentation is not None:
            batch = self.augmentation(batch)
        return batch[self.image_key], batch[self.label_key]


@reported
def choose_cudnn(benchmark: bool) -> None:
    """cuDNN's choice of convolution algorithms for a training on a GPU. MONAI's ``set_determinism``
    asks for deterministic algorithms and no benchmarking (repeatable runs, at some cost in speed);
    with ``benchmark`` true cuDNN times the candidates for the training's fixed slice size and keeps
    the fastest, deterministic or not, so a run is no longer repeatable bit for bit. No effect on a CPU."""
    if flag(benchmark, "cudnn_benchmark"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False


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
