"""3D evaluation per patient and per class: Dice, IoU, VOE, RVD, ASSD, MSSD and the paper's slice IoU.

The overlap and surface-distance computations are MONAI's (``compute_dice``, ``compute_iou``,
``compute_average_surface_distance``, ``compute_hausdorff_distance`` with the voxel spacing, so
distances are in mm). Added here: the SLIVER07 conventions around them (VOE and RVD in percent,
MSSD as the maximum symmetric surface distance), the 2D slice IoU of the paper, the handling of
classes a patient has no masks for (left out, not scored as 0), the clean / scanner-shifted pair of
each patient (:func:`with_conditions`, scored each on its own grid). The Ignite handler that writes
the per-patient CSV and the summary is :class:`liver_fcn.handlers.EvaluationReport`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance, compute_iou

from liver_fcn.options import flag

__all__ = [
    "condition_param",
    "CONDITIONS",
    "METRICS",
    "class_metrics",
    "evaluation_name",
    "slice_iou",
    "with_conditions",
]

logger = logging.getLogger(__name__)

#: the scan as acquired, and the same scan after a simulated change of scanner (SimulateScannerd)
CONDITIONS = ("clean", "shifted", "phase")

#: metric -> unit, in the order of the CSV columns
METRICS = {
    "dice": "",
    "iou": "",
    "voe": "%",
    "rvd": "%",
    "assd": "mm",
    "mssd": "mm",
    "slice_iou": "",
}


def evaluation_name(settings: dict, split: str) -> str:
    """``eval-<training run name>-<split>-<time>``: the MLflow run name and output folder of an evaluation."""
    return f"eval-{settings.get('run_name') or 'model'}-{split}-{time.strftime('%Y%m%d-%H%M%S')}"


def with_conditions(files: Sequence[dict], scanner_shift: bool = True, phase_shift: bool = False) -> list[dict]:
    """Each datalist entry as ``condition="clean"``, with ``scanner_shift`` again as ``"shifted"`` (the
    evaluation chain simulates another scanner for those) and with ``phase_shift`` as ``"phase"``
    (organ enhancement scaled toward an unenhanced scan, :class:`~liver_fcn.transforms.SimulateContrastPhased`).
    The two switches may be typed on the command line (``--phase_shift false``)."""
    scanner_shift, phase_shift = flag(scanner_shift, "scanner_shift"), flag(phase_shift, "phase_shift")
    out = []
    for f in files:
        out.append({**f, "condition": "clean"})
        if scanner_shift:
            out.append({**f, "condition": "shifted"})
        if phase_shift:
            out.append({**f, "condition": "phase"})
    return out


def condition_param(simulation, enabled, name: str) -> str:
    """The MLflow parameter of a simulated condition: what the simulation does, or ``off`` where the
    option ``name`` turns it off."""
    return str(simulation) if flag(enabled, name) else "off"


def slice_iou(pred: np.ndarray, truth: np.ndarray, axis: int = -1) -> float:
    """Mean IoU over the slices (along ``axis``) where the prediction or the reference has the class."""
    p = np.moveaxis(pred.astype(bool), axis, 0).reshape(pred.shape[axis], -1)
    t = np.moveaxis(truth.astype(bool), axis, 0).reshape(truth.shape[axis], -1)
    union = (p | t).sum(axis=1)
    inter = (p & t).sum(axis=1)
    keep = union > 0
    return float(np.mean(inter[keep] / union[keep])) if keep.any() else float("nan")


def class_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """All metrics of one binary prediction against one binary reference (3D arrays, same grid).

    NaN where a metric is undefined: everything when both are empty; surface distances when
    either is empty.
    """
    pred, truth = np.asarray(pred).astype(bool), np.asarray(truth).astype(bool)
    out = {k: float("nan") for k in METRICS}
    n_pred, n_truth = int(pred.sum()), int(truth.sum())
    if n_pred == 0 and n_truth == 0:
        return out
    yp = torch.from_numpy(pred)[None, None].float()
    yt = torch.from_numpy(truth)[None, None].float()
    out["dice"] = float(compute_dice(yp, yt, include_background=True, ignore_empty=False))
    out["iou"] = float(compute_iou(yp, yt, include_background=True, ignore_empty=False))
    out["voe"] = 100.0 * (1.0 - out["iou"])
    out["rvd"] = 100.0 * (n_pred - n_truth) / n_truth if n_truth else float("nan")
    if n_pred and n_truth:
        sp = [float(s) for s in spacing]
        out["assd"] = float(
            compute_average_surface_distance(yp, yt, include_background=True, symmetric=True, spacing=sp)
        )
        out["mssd"] = float(compute_hausdorff_distance(yp, yt, include_background=True, percentile=None, spacing=sp))
    out["slice_iou"] = slice_iou(pred, truth)
    return out
