"""What a case's mask says: volumes, liver extent, slice range, spacing, and the quality flags."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from liver_fcn.transforms.utils import bounding_box

__all__ = ["case_report", "hu_statistics", "quality_flags", "summary_line", "summary_rows"]


def case_report(seg: np.ndarray, affine: np.ndarray, class_names: Sequence[str], case: str = "") -> dict:
    """Volumes of each class (mL) and the liver's extent and slice range, from a mask and its affine.

    Extent is measured along the patient axes in mm (width: right-left, depth: anterior-posterior,
    height: head-feet) between the outer faces of the outermost liver voxels; the slice range is in
    the input's own slice order (third voxel axis).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    report: dict = {
        "case": case,
        "shape": [int(s) for s in seg.shape],
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "volumes_ml": {},
        "voxels": {},
    }
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        n = int(np.count_nonzero(seg == c))
        report["voxels"][name] = n
        report["volumes_ml"][name] = n * voxel_ml
    box = bounding_box(seg == 1)
    if box is not None:
        # the corners of the voxels at both ends of each voxel axis, in world (RAS) mm
        lo, hi = [b.start for b in box], [b.stop - 1 for b in box]
        corners = np.array(
            [
                [a, b, c, 1.0]
                for a in (lo[0] - 0.5, hi[0] + 0.5)
                for b in (lo[1] - 0.5, hi[1] + 0.5)
                for c in (lo[2] - 0.5, hi[2] + 0.5)
            ]
        )
        world = corners @ affine.T
        ext = world[:, :3].max(axis=0) - world[:, :3].min(axis=0)
        report["liver_extent_mm"] = {
            "width": round(float(ext[0]), 1),
            "depth": round(float(ext[1]), 1),
            "height": round(float(ext[2]), 1),
        }
        report["liver_slices"] = [int(lo[2]), int(hi[2])]
    else:
        report["liver_extent_mm"] = None
        report["liver_slices"] = None
    return report


def hu_statistics(ct: np.ndarray, seg: np.ndarray, class_names: Sequence[str]) -> dict:
    """Mean and median HU of the CT inside each class of the mask (``None`` for an empty class)."""
    if ct.shape != seg.shape:
        raise ValueError(f"CT of shape {ct.shape} and mask of shape {seg.shape} differ")
    out = {}
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        values = ct[seg == c]
        out[name] = (
            {"mean": round(float(values.mean()), 1), "median": round(float(np.median(values)), 1)}
            if values.size
            else None
        )
    return out


def quality_flags(
    seg: np.ndarray,
    affine: np.ndarray,
    class_names: Sequence[str],
    volumes_ml: Mapping[str, float],
    entropy: Mapping | None = None,
    components: Mapping | None = None,
    liver_range_ml: Sequence[float] = (800.0, 3000.0),
    max_entropy: float = 0.35,
) -> dict:
    """Quality-control flags of one case's mask, for a human to look at before using it.

    - the liver volume outside ``liver_range_ml`` (an adult liver is 1.2-2.1 L in the 16
      3D-IRCADb-01 livers measured; the default flags only the implausible);
    - the liver in several components of at least the counter's size before post-processing
      (``components``, from :class:`~liver_fcn.transforms.CountComponentsd`);
    - the liver or a kidney touching the first or last slice along the head-feet axis: the scan may
      cut the organ off, and its volume is then too small;
    - a mean normalised entropy of the class probabilities above ``max_entropy`` inside a segmented
      organ (``entropy``, from :class:`~liver_fcn.transforms.ResampleToInputd`): the network was unsure.
    """
    flags: list[str] = []
    liver_ml = float(volumes_ml.get("liver", 0.0))
    lo, hi = (float(v) for v in liver_range_ml)
    if not lo <= liver_ml <= hi:
        flags.append(f"liver volume {liver_ml:.0f} mL outside {lo:.0f}-{hi:.0f} mL")
    pieces = list((components or {}).get("1", []))
    if len(pieces) > 1:
        flags.append(
            f"liver in {len(pieces)} large pieces before post-processing ({', '.join(f'{v:.0f}' for v in pieces)} mL)"
        )
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    axis = int(np.argmax(np.abs(a[2]) / np.maximum(np.sqrt((a**2).sum(axis=0)), 1e-12)))  # the head-feet voxel axis
    ends = np.concatenate(
        [np.take(seg, [0], axis=axis).ravel(), np.take(seg, [seg.shape[axis] - 1], axis=axis).ravel()]
    )
    for c, name in enumerate(class_names):
        if name in ("liver", "kidney") and np.any(ends == c):
            flags.append(f"{name} touches the first or last slice: the scan may cut it off")
    mean_entropy = {
        class_names[int(c)]: round(float(h), 4) for c, h in (entropy or {}).items() if int(c) < len(class_names)
    }
    for name, h in mean_entropy.items():
        if name in ("liver", "kidney") and h > max_entropy:
            flags.append(f"low confidence in the {name} (mean entropy {h:.2f} > {max_entropy:.2f})")
    return {"flags": flags, "mean_entropy": mean_entropy, "liver_components_ml": [round(v, 1) for v in pieces]}


def summary_line(report: dict, mask_path: str | os.PathLike) -> str:
    vols = report["volumes_ml"]
    parts = [f"{report['case']}:"]
    if report.get("liver_extent_mm"):
        e, s = report["liver_extent_mm"], report["liver_slices"]
        parts.append(
            f"liver {vols.get('liver', 0):.0f} mL ({e['width']:.0f} x {e['depth']:.0f} x {e['height']:.0f} mm, "
            f"slices {s[0]}-{s[1]})"
        )
    else:
        parts.append("no liver found")
    parts += [f"{k} {v:.0f} mL" for k, v in vols.items() if k != "liver"]
    flags = (report.get("qc") or {}).get("flags") or []
    qc = f" [QC: {'; '.join(flags)}]" if flags else ""
    return " ".join(parts[:2]) + (", " + ", ".join(parts[2:]) if len(parts) > 2 else "") + qc + f" -> {mask_path}"


def summary_rows(reports: Sequence[Mapping]) -> list[dict]:
    """One row per case for ``summary.csv``: input and series, volumes (mL) and mean and median HU of each class, the
    liver's extent and slices, the QC flags (joined by ``; ``) and the model (checkpoint and SHA-256; an
    ensemble's members joined by ``; ``)."""

    def joined(value) -> str:
        return "; ".join(map(str, value)) if isinstance(value, list) else value

    rows = []
    for r in reports:
        extent, slices = r.get("liver_extent_mm") or {}, r.get("liver_slices") or [None, None]
        row = {
            "case": r.get("case", ""),
            "input": r.get("input", ""),
            "series_uid": (r.get("series") or {}).get("series_uid", ""),
            "liver_width_mm": extent.get("width"),
            "liver_depth_mm": extent.get("depth"),
            "liver_height_mm": extent.get("height"),
            "liver_first_slice": slices[0],
            "liver_last_slice": slices[1],
        }
        for name, ml in r.get("volumes_ml", {}).items():
            hu = (r.get("hu") or {}).get(name) or {}
            row[f"{name}_ml"] = round(float(ml), 2)
            row[f"{name}_mean_hu"], row[f"{name}_median_hu"] = hu.get("mean"), hu.get("median")
        model = r.get("model") or {}
        row |= {
            "qc_flags": "; ".join((r.get("qc") or {}).get("flags") or []),
            "checkpoint": joined(model.get("checkpoint", "")),
            "checkpoint_sha256": joined(model.get("sha256", "")),
            "liver_fcn_version": model.get("liver_fcn_version", ""),
        }
        rows.append(row)
    return rows
