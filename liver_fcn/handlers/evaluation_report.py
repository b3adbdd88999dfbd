"""The evaluation's per-patient table and summary, written as the evaluator runs."""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from liver_fcn.evaluation import CONDITIONS, METRICS, class_metrics
from liver_fcn.outputs import write_json_atomic, write_text_atomic

__all__ = ["EvaluationReport"]

logger = logging.getLogger(__name__)


def _spacing(t) -> list[float]:
    aff = np.asarray(t.affine.detach().cpu(), dtype=np.float64) if hasattr(t, "affine") else np.eye(4)
    return [float(v) for v in np.sqrt((aff[:3, :3] ** 2).sum(axis=0))]


class EvaluationReport:
    """Per-patient, per-class metrics of an evaluator's run, written as CSV and summarised.

    Reads each decollated item of the engine's batch and output together (MONAI's evaluator keeps
    the keys it did not compute - ``patient``, ``annotated``, the reference - in ``engine.state.batch``
    and the prediction in ``engine.state.output``): ``pred`` (class map, 1 x X x Y x Z, on the
    reference's grid, with its affine), ``label_key`` (reference class map), ``annotated`` (one flag
    per class; classes without masks are left out, not scored as 0), ``patient`` and ``condition``
    (``clean`` or ``shifted``, see :func:`with_conditions`). On completion writes ``metrics.csv``
    (one row per patient, condition and class), ``summary.csv`` and ``summary.json`` (mean, std, n
    over patients, per condition) into ``output_dir`` and sets ``engine.state.metrics`` to the means:
    ``test_<metric>_<class>`` for the clean scans, ``test_shifted_<metric>_<class>`` for the shifted
    ones and ``test_shift_change_dice_<class>`` (shifted minus clean Dice).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        output_dir: str | os.PathLike,
        prefix: str = "test_",
        label_key: str = "label",
        log=None,
    ) -> None:
        self.class_names = list(class_names)
        self.output_dir = Path(output_dir)
        self.prefix = prefix
        self.label_key = label_key
        self.log = log or logger.info
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    @staticmethod
    def _items(engine: Engine) -> list[dict]:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, dict):
            output, batch = [output], [batch]
        if not isinstance(batch, (list, tuple)) or len(batch) != len(output):
            batch = [{}] * len(output)
        return [{**(b if isinstance(b, dict) else {}), **o} for b, o in zip(batch, output)]

    def add(
        self, pred, truth, spacing: Sequence[float], annotated: Sequence[bool], patient: str, condition: str = "clean"
    ) -> None:
        """Score one patient: class maps ``pred`` and ``truth`` (3D, one grid) with voxel ``spacing`` in mm."""
        pred, truth = np.asarray(pred), np.asarray(truth)
        if pred.shape != truth.shape:
            raise ValueError(f"{patient}: prediction {pred.shape} and reference {truth.shape} are not on one grid")
        voxel_ml = float(np.prod(spacing)) / 1000
        for c, name in enumerate(self.class_names):
            if c == 0:
                continue
            row = {"patient": patient, "condition": condition, "class": name, "annotated": bool(annotated[c])}
            if annotated[c]:
                row.update(class_metrics(pred == c, truth == c, spacing))
            else:
                row.update({k: float("nan") for k in METRICS})
            row["volume_pred_ml"] = float((pred == c).sum()) * voxel_ml
            row["volume_ref_ml"] = float((truth == c).sum()) * voxel_ml if annotated[c] else float("nan")
            self.rows.append(row)

    def iteration_completed(self, engine: Engine) -> None:
        for item in self._items(engine):
            if "patient" not in item:
                raise KeyError("EvaluationReport needs 'patient' in each item (keep it through the preprocessing)")
            pred = np.asarray(item["pred"].detach().cpu())[0]
            truth = np.asarray(item[self.label_key].detach().cpu())[0]
            annotated = [bool(a) for a in torch.as_tensor(item.get("annotated", [True] * len(self.class_names)))]
            self.add(
                pred,
                truth,
                _spacing(item[self.label_key]),
                annotated,
                str(item["patient"]),
                str(item.get("condition", "clean")),
            )

    def summary(self) -> list[dict]:
        out = []
        conditions = [c for c in CONDITIONS if any(r["condition"] == c for r in self.rows)]
        for condition in conditions:
            for name in self.class_names[1:]:
                rows = [r for r in self.rows if r["class"] == name and r["condition"] == condition]
                for metric, unit in METRICS.items():
                    vals = np.array([r[metric] for r in rows if not math.isnan(r[metric])], dtype=float)
                    out.append(
                        {
                            "condition": condition,
                            "class": name,
                            "metric": metric,
                            "unit": unit,
                            "n": int(vals.size),
                            "mean": float(vals.mean()) if vals.size else float("nan"),
                            "std": float(vals.std()) if vals.size else float("nan"),
                        }
                    )
        return out

    def metrics(self, summary: list[dict] | None = None) -> dict[str, float]:
        """The summary means as flat metric names (see the class docstring)."""
        summary = self.summary() if summary is None else summary
        out = {}
        for r in summary:
            tag = "" if r["condition"] == "clean" else f"{r['condition']}_"
            out[f"{self.prefix}{tag}{r['metric']}_{r['class']}"] = r["mean"]
        for name in self.class_names[1:]:
            clean = out.get(f"{self.prefix}dice_{name}")
            for condition, change in (("shifted", "shift"), ("phase", "phase")):
                other = out.get(f"{self.prefix}{condition}_dice_{name}")
                if clean is not None and other is not None:
                    out[f"{self.prefix}{change}_change_dice_{name}"] = other - clean
        return out

    def epoch_completed(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fields = ["patient", "condition", "class", "annotated", *METRICS, "volume_pred_ml", "volume_ref_ml"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        for r in self.rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        write_text_atomic(self.output_dir / "metrics.csv", buf.getvalue())
        summary = self.summary()
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["condition", "class", "metric", "unit", "n", "mean", "std"])
        w.writeheader()
        for r in summary:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        write_text_atomic(self.output_dir / "summary.csv", buf.getvalue())
        write_json_atomic(self.output_dir / "summary.json", summary)
        patients = len({r["patient"] for r in self.rows})
        self.log(f"evaluation of {patients} patient(s), mean over patients (n = patients with that class annotated):")
        self.log(f"  {'class':<16} " + " ".join(f"{m + ('(' + u + ')' if u else ''):>11}" for m, u in METRICS.items()))
        for condition in CONDITIONS:
            for name in self.class_names[1:]:
                vals = {r["metric"]: r for r in summary if r["class"] == name and r["condition"] == condition}
                if vals:
                    label = name if condition == "clean" else f"{name} ({condition})"
                    self.log(f"  {label:<16} " + " ".join(f"{vals[m]['mean']:>11.4g}" for m in METRICS))
        self.log(f"  per patient: {self.output_dir / 'metrics.csv'}")
        engine.state.metrics.update(self.metrics(summary))
