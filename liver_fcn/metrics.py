"""Per-class IoU and Dice handlers for the evaluator, built from MONAI's metrics.

MONAI's :class:`~monai.metrics.MeanIoU` and :class:`~monai.metrics.DiceMetric` already skip cases
whose ground truth is empty (``ignore_empty=True`` gives NaN, and the reduction averages the
rest), which is how a patient without kidney masks drops out of the kidney score. Two things are
added here: when *no* case had the class, the aggregate is NaN instead of MONAI's 0 (a kidney IoU
of 0 would read as a failure, not as "not measured"); and one handler per class, so that every
class is its own scalar metric in Ignite, the logs and MLflow (``val_iou_liver``, ``val_dice_bone``...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric, MeanIoU
from monai.metrics.utils import do_metric_reduction

__all__ = ["ClassDice", "ClassIoU", "ClassOutput", "segmentation_metrics"]


class _NanWhenUnmeasured:
    def aggregate(self, reduction=None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return torch.where(not_nans > 0, f, torch.full_like(f, float("nan")))


class ClassIoU(_NanWhenUnmeasured, MeanIoU):
    """MONAI MeanIoU whose aggregate is NaN when no case had the class."""


class ClassDice(_NanWhenUnmeasured, DiceMetric):
    """MONAI DiceMetric whose aggregate is NaN when no case had the class."""


class ClassOutput:
    """Output transform: the one-hot ``pred`` and ``label`` of one class (or several) of each item."""

    def __init__(self, index: int | Sequence[int]) -> None:
        self.index = [index] if isinstance(index, int) else list(index)
        self._get = from_engine(["pred", "label"])

    def __call__(self, output):
        y_pred, y = self._get(output)
        return [p[self.index] for p in y_pred], [t[self.index] for t in y]


def segmentation_metrics(class_names: Sequence[str], prefix: str = "val_") -> dict[str, IgniteMetricHandler]:
    """IoU and Dice handlers: one per foreground class and their means over classes.

    Names: ``{prefix}iou_<class>``, ``{prefix}dice_<class>``, ``{prefix}mean_iou``, ``{prefix}mean_dice``.
    The evaluator's post-processing must give one-hot ``pred`` and ``label`` with ``len(class_names)`` channels.
    """
    handlers: dict[str, IgniteMetricHandler] = {}
    foreground = list(range(1, len(class_names)))
    for kind, metric in (("iou", ClassIoU), ("dice", ClassDice)):
        for c in foreground:
            handlers[f"{prefix}{kind}_{class_names[c]}"] = IgniteMetricHandler(
                metric_fn=metric(include_background=True, reduction="mean", ignore_empty=True),
                output_transform=ClassOutput(c),
            )
        handlers[f"{prefix}mean_{kind}"] = IgniteMetricHandler(
            metric_fn=metric(include_background=True, reduction="mean", ignore_empty=True),
            output_transform=ClassOutput(foreground),
        )
    return handlers
