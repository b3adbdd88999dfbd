"""Overlay montages: axial CT slices with label contours, to check a segmentation at a glance."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from liver_fcn import CLASS_NAMES
from liver_fcn.outputs import atomic_path

__all__ = ["CLASS_COLOURS", "class_rgb", "overlay_montage", "pick_slices", "save_figure"]

#: display colour of each class index: overlay contours, DICOM SEG segments and RTSTRUCT ROIs
CLASS_COLOURS = {1: "#e4572e", 2: "#f3d34a", 3: "#29c7ac", 4: "#7b9e3f", 5: "#a06cd5"}


def class_rgb(c: int) -> tuple[int, int, int]:
    """The display colour of class index ``c`` as 8-bit RGB (white for a class beyond the table)."""
    hex_colour = CLASS_COLOURS.get(c, "#ffffff").lstrip("#")
    return tuple(int(hex_colour[i : i + 2], 16) for i in (0, 2, 4))


def save_figure(fig, out_png: str | os.PathLike, dpi: int = 100) -> Path:
    """Save a matplotlib figure as PNG through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(out_png, ".tmp.png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(out_png)


def pick_slices(label: np.ndarray, cls: int = 1, n: int = 4) -> list[int]:
    """``n`` axial slices spread over the extent of class ``cls`` (the whole volume if absent)."""
    depth = label.shape[-1]
    present = np.flatnonzero((label == cls).reshape(-1, depth).any(axis=0))
    lo, hi = (present[0], present[-1]) if present.size else (0, depth - 1)
    return sorted({int(round(v)) for v in np.linspace(lo + 0.15 * (hi - lo), hi - 0.15 * (hi - lo), n)})


def overlay_montage(
    image: np.ndarray,
    out_png: str | os.PathLike,
    pred: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    slices: Sequence[int] | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    window: tuple[float, float] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG of axial slices of ``image`` (X, Y, Z) with ``pred`` as contours and ``truth`` as tinted areas.

    Arrays are in RAS voxel order (x towards the patient's right, y to the front, z to the head);
    they are shown in the radiological convention: patient's right on the left of the picture,
    front at the top, seen from the feet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ref = pred if pred is not None else truth
    slices = list(slices) if slices is not None else pick_slices(ref if ref is not None else np.zeros(image.shape), 1)
    lo, hi = window if window is not None else np.percentile(image, [1, 99])
    fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.6), squeeze=False)
    for ax, k in zip(axes[0], slices):
        # RAS -> screen: rows from anterior (top) to posterior, columns from the patient's right to left
        view = lambda a, k=k: np.asarray(a)[:, :, k].T[::-1, ::-1]  # noqa: E731
        ax.imshow(view(image), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        if truth is not None:
            sl = view(truth)
            tint = np.zeros((*sl.shape, 4))
            for c in range(1, len(class_names)):
                tint[sl == c] = matplotlib.colors.to_rgba(CLASS_COLOURS.get(c, "w"), 0.35)
            ax.imshow(tint, interpolation="nearest")
        if pred is not None:
            sl = view(pred)
            for c in range(1, len(class_names)):
                if (sl == c).any():
                    ax.contour(sl == c, levels=[0.5], colors=CLASS_COLOURS.get(c, "w"), linewidths=1.1)
        ax.set_title(f"slice {k}", fontsize=9)
        ax.axis("off")
    handles = [
        Line2D([], [], color=CLASS_COLOURS.get(c, "w"), label=class_names[c]) for c in range(1, len(class_names))
    ]
    if pred is not None and truth is not None:
        handles += [
            Line2D([], [], color="k", ls="-", label="prediction (line)"),
            Line2D([], [], color="k", lw=6, alpha=0.35, label="reference (tint)"),
        ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95 if title else 1))
    return save_figure(fig, out_png, dpi=110)
