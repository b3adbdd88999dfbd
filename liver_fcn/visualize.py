"""Overlay montages: axial CT slices with label contours, to check a segmentation at a glance; saving a
matplotlib figure (the comparison plots)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from liver_fcn import CLASS_NAMES
from liver_fcn.outputs import atomic_path

__all__ = [
    "CLASS_COLOURS",
    "GAP",
    "PANEL",
    "SLICE_ROW",
    "TITLE_ROW",
    "class_rgb",
    "overlay_montage",
    "pick_slices",
    "save_figure",
]

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


#: the montage's layout in pixels: each slice's panel, the space around it, the rows of the title, of
#: each slice's name and of the legend
PANEL, GAP, TITLE_ROW, SLICE_ROW, LEGEND_ROW = 320, 16, 34, 22, 30


def _font(size: int):
    return ImageFont.load_default(size=size)


def _screen(a: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a RAS volume as seen on screen: rows from anterior (top) to posterior,
    columns from the patient's right to left."""
    return np.ascontiguousarray(np.asarray(a)[:, :, k].T[::-1, ::-1])


def _classes_on_screen(label: np.ndarray, k: int, size: tuple[int, int]) -> np.ndarray:
    """Slice ``k`` of a class map on screen, scaled to ``size`` (width, height) by nearest neighbour."""
    return np.asarray(Image.fromarray(_screen(label, k).astype(np.uint8)).resize(size, Image.NEAREST))


def _edges(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The inner band, ``width`` pixels wide, along the border of a boolean mask: its contour as drawn."""
    return mask & ~binary_erosion(mask, iterations=width, border_value=0)


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
    front at the top, seen from the feet. Each slice is scaled to fit a panel of :data:`PANEL`
    pixels (bilinear; the class maps nearest), the contours drawn two pixels wide inside each
    predicted region, in :data:`CLASS_COLOURS`. Drawn with Pillow straight into the picture's pixels.
    """
    ref = pred if pred is not None else truth
    slices = list(slices) if slices is not None else pick_slices(ref if ref is not None else np.zeros(image.shape), 1)
    lo, hi = window if window is not None else np.percentile(np.asarray(image)[:, :, slices], [1, 99])
    top = (TITLE_ROW if title else GAP) + SLICE_ROW  # the panels' top edge
    canvas = Image.new("RGB", (len(slices) * (PANEL + GAP) + GAP, top + PANEL + LEGEND_ROW + GAP), "white")
    draw = ImageDraw.Draw(canvas)
    colours = {c: np.array(class_rgb(c), dtype=np.float32) for c in range(1, len(class_names))}
    font = _font(13)
    for i, k in enumerate(slices):
        grey = np.clip((_screen(image, k).astype(np.float32) - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0) * 255.0
        scale = PANEL / max(grey.shape)
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR), dtype=np.float32)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if truth is not None:
            sl = _classes_on_screen(truth, k, size)
            for c, colour in colours.items():
                inside = sl == c
                rgb[inside] = 0.65 * rgb[inside] + 0.35 * colour
        if pred is not None:
            sl = _classes_on_screen(pred, k, size)
            for c, colour in colours.items():
                rgb[_edges(sl == c)] = colour
        left = GAP + i * (PANEL + GAP)
        canvas.paste(
            Image.fromarray(rgb.round().astype(np.uint8)), (left + (PANEL - size[0]) // 2, top + (PANEL - size[1]) // 2)
        )
        draw.text((left + PANEL // 2, top - 4), f"slice {k}", fill="black", font=font, anchor="md")
    if title:
        draw.text((canvas.width // 2, 8), title, fill="black", font=_font(15), anchor="mt")
    entries = [(class_names[c], class_rgb(c), "line") for c in colours]
    if pred is not None and truth is not None:
        entries += [("prediction (line)", (0, 0, 0), "line"), ("reference (tint)", (166, 166, 166), "area")]
    widths = [34 + draw.textlength(name, font=font) + 18 for name, _, _ in entries]
    x, y = (canvas.width - sum(widths)) / 2, top + PANEL + GAP + 8
    for (name, colour, kind), width in zip(entries, widths):
        draw.rectangle((x, y - (5 if kind == "area" else 1), x + 26, y + (5 if kind == "area" else 1)), fill=colour)
        draw.text((x + 32, y), name, fill="black", font=font, anchor="lm")
        x += width
    with atomic_path(out_png, ".tmp.png") as tmp:
        canvas.save(tmp, format="PNG")
    return Path(out_png)
