"""DICOM RT Structure Sets (rt-utils) for a predicted class map on a CT series.

For planning systems that read contours rather than label images: each class present becomes a ROI
of closed planar contours on the CT slices, in the class's display colour, referencing the series'
images by UID. rt-utils is an optional dependency (``pip install "liver-fcn[rtstruct]"``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.valuerep import format_number_as_ds
from skimage.draw import polygon

from liver_fcn import __version__
from liver_fcn.data.dicom import DropMessages, dicom_folder, inspect_series
from liver_fcn.errors import InputError
from liver_fcn.outputs import atomic_path
from liver_fcn.visualize import class_rgb

__all__ = ["check_rtstruct_support", "read_rtstruct", "write_rtstruct"]


def check_rtstruct_support() -> None:
    """Refuse, before any work, an RTSTRUCT request where rt-utils (or OpenCV, which it draws with)
    cannot be imported."""
    try:
        import rt_utils  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not installed, or OpenCV without its system libraries
        raise InputError(
            f"--rtstruct needs rt-utils ({type(e).__name__}: {e}); install it with pip install 'liver-fcn[rtstruct]'"
        ) from None


@contextlib.contextmanager
def _series_only(files: Sequence[Path]):
    """A folder holding links to exactly ``files``: rt-utils reads every image of the folder it is given."""
    with tempfile.TemporaryDirectory(prefix="liver-fcn-rtstruct-") as tmp:
        for i, f in enumerate(files):
            os.symlink(Path(f).absolute(), Path(tmp) / f"{i:05d}.dcm")
        yield tmp


def write_rtstruct(
    series_folder: str | os.PathLike,
    seg: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    series_uid: str | None = None,
) -> Path:
    """Write an RTSTRUCT for ``seg`` (the class map on the series' grid, MONAI axis order (column, row,
    slice), slices in CTSeriesReader's order) on the series ``series_uid`` of ``series_folder`` (a
    folder or a zip). One ROI per class present, named after it; an empty result writes no ROI."""
    from rt_utils import RTStructBuilder

    with dicom_folder(series_folder) as folder:
        info = inspect_series(folder, series_uid=series_uid or None, modality="CT")
        if seg.shape != (info.shape[1], info.shape[0], info.shape[2]):
            raise ValueError(f"mask shape {seg.shape} does not match the series {info.shape}")
        # rt-utils prints, and sets FileDataset attributes pydicom 3 logs as deprecated: neither is for the user
        quiet = DropMessages("'FileDataset.is_")
        logging.getLogger("pydicom").addFilter(quiet)
        with _series_only(info.files) as linked, contextlib.redirect_stdout(io.StringIO()):
            try:
                rt = RTStructBuilder.create_new(dicom_series_path=linked)
            finally:
                logging.getLogger("pydicom").removeFilter(quiet)
            ours = {str(_uid(f)): k for k, f in enumerate(info.files)}
            order = [ours[str(ds.SOPInstanceUID)] for ds in rt.series_data]  # rt-utils' slice order
            frames = np.transpose(seg, (1, 0, 2))[:, :, order]  # (row, column, slice)
            rt.set_series_description("liver-fcn segmentation")
            for c, name in enumerate(class_names):
                if c == 0 or not (frames == c).any():
                    continue
                rt.add_roi(mask=frames == c, color=list(class_rgb(c)), name=name, description=f"liver-fcn {name}")
    _complete(rt.ds, rt.series_data[0])
    for roi in rt.ds.ROIContourSequence:  # DS values of at most 16 characters, as DICOM's DS VR requires
        for contour in getattr(roi, "ContourSequence", []):
            contour.ContourData = [format_number_as_ds(float(v)) for v in contour.ContourData]
    with atomic_path(path) as tmp:
        rt.ds.save_as(tmp)
    return Path(path)


def _complete(ds: pydicom.Dataset, ct: pydicom.Dataset) -> None:
    """Attributes rt-utils leaves out that the RT Structure Set IOD requires (Type 1 from the CT,
    Type 2 present, empty where the CT has none), and this software as the manufacturer."""
    if str(ct.get("FrameOfReferenceUID", "") or ""):
        ds.FrameOfReferenceUID = ct.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ct.get("PositionReferenceIndicator", "") or ""
    for keyword in ("AccessionNumber", "ReferringPhysicianName"):
        setattr(ds, keyword, ct.get(keyword, "") or "")
    ds.OperatorsName = ""
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "liver-fcn", "FCN on VGG16", __version__
    ds.StructureSetLabel = "liver-fcn"


def _uid(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID


def read_rtstruct(series_folder: str | os.PathLike, path: str | os.PathLike, series_uid: str | None = None) -> dict:
    """The ROIs of an RTSTRUCT as masks on the series' grid (MONAI axis order: column, row, slice), by
    ROI name: each contour's points mapped to pixels through the slice's own position, orientation and
    spacing, and filled (even-odd, so that inner contours are holes). Read with pydicom and
    scikit-image, independently of the library that wrote it."""
    with dicom_folder(series_folder) as folder:
        info = inspect_series(folder, series_uid=series_uid or None, modality="CT")
        slices = {str(_uid(f)): k for k, f in enumerate(info.files)}
    rt = pydicom.dcmread(path)
    names = {int(r.ROINumber): str(r.ROIName) for r in rt.StructureSetROISequence}
    orient = np.asarray(info.orientation, dtype=float)
    row_dir, col_dir = orient[:3], orient[3:]  # along a row (column index), along a column (row index)
    row_spacing, col_spacing = info.pixel_spacing
    rows, cols, n = info.shape
    out = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros((n, rows, cols), dtype=bool)
        for contour in getattr(roi, "ContourSequence", []):
            k = slices[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3) - info.positions[k]
            rr, cc = polygon(points @ col_dir / row_spacing, points @ row_dir / col_spacing, (rows, cols))
            fill = np.zeros((rows, cols), dtype=bool)
            fill[rr, cc] = True
            mask[k] ^= fill
        out[names[int(roi.ReferencedROINumber)]] = np.transpose(mask, (2, 1, 0))
    return out
