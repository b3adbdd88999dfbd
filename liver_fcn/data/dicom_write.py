"""Writing CT and mask series as real DICOM files with pydicom.

Used by the phantom generator (the project's built-in data) and by the tests that need DICOM with
particular properties. The files follow the 3D-IRCADb-01 conventions by default: CT Image Storage,
Explicit VR Little Endian, files named ``image_K`` without extension, InstanceNumber ``K`` from 0,
slices written from the feet to the head.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["SeriesGeometry", "SeriesTags", "dicom_slices", "write_series", "write_series_to_zip"]


@dataclass
class SeriesGeometry:
    """Where the voxels of a ``(slices, rows, columns)`` array lie in patient (LPS) space."""

    pixel_spacing: tuple[float, float] = (1.0, 1.0)  # row spacing (mm), column spacing (mm)
    slice_spacing: float = 1.0
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # ImagePositionPatient of slice 0
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)  # direction of increasing column index
    col_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)  # direction of increasing row index

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosine, self.col_cosine)

    def position(self, k: int) -> list[float]:
        return [float(v) for v in np.asarray(self.origin) + k * self.slice_spacing * self.normal]


@dataclass
class SeriesTags:
    """Identity of a series: patient, study and series attributes shared by its slices."""

    patient_name: str = "phantom^patient"
    patient_id: str = "PHANTOM"
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    series_description: str = ""
    series_number: int = 1
    modality: str = "CT"
    study_date: str = "20260101"


def dicom_slices(
    volume: np.ndarray,
    geometry: SeriesGeometry,
    tags: SeriesTags,
    rescale_intercept: float = 0.0,
    rescale_slope: float = 1.0,
) -> Iterator[tuple[int, FileDataset]]:
    """Yield ``(k, dataset)`` for each slice of a ``(slices, rows, columns)`` array.

    int16 arrays are CT values in HU (stored as ``(HU - intercept) / slope``); uint8 arrays are
    masks (0/255), written with 8 bits and no rescale.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a (slices, rows, columns) array, got shape {volume.shape}")
    is_mask = volume.dtype == np.uint8
    if is_mask:
        stored = volume
    else:
        stored_f = (volume.astype(np.float64) - rescale_intercept) / rescale_slope
        info = np.iinfo(np.int16)
        if stored_f.min() < info.min or stored_f.max() > info.max:
            raise ValueError("CT values do not fit int16 with this rescale")
        stored = np.round(stored_f).astype(np.int16)
    for k in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Modality = tags.modality
        ds.PatientName = tags.patient_name
        ds.PatientID = tags.patient_id
        ds.StudyInstanceUID = tags.study_uid
        ds.SeriesInstanceUID = tags.series_uid
        ds.FrameOfReferenceUID = tags.frame_of_reference_uid
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Manufacturer = "liver-fcn"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = tags.study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.SeriesDescription = tags.series_description
        ds.SeriesNumber = tags.series_number
        ds.InstanceNumber = k
        ds.ImagePositionPatient = geometry.position(k)
        ds.ImageOrientationPatient = [float(v) for v in (*geometry.row_cosine, *geometry.col_cosine)]
        ds.PixelSpacing = [float(geometry.pixel_spacing[0]), float(geometry.pixel_spacing[1])]
        ds.SliceThickness = float(geometry.slice_spacing)
        ds.SpacingBetweenSlices = float(geometry.slice_spacing)
        ds.SliceLocation = float(np.dot(geometry.position(k), geometry.normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(volume.shape[1]), int(volume.shape[2])
        bits = 8 if is_mask else 16
        ds.BitsAllocated = ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = 0 if is_mask else 1
        ds.RescaleIntercept = 0 if is_mask else rescale_intercept
        ds.RescaleSlope = 1 if is_mask else rescale_slope
        ds.RescaleType = "US" if is_mask else "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        yield k, ds


def write_series(folder: str | Path, volume: np.ndarray, geometry: SeriesGeometry, tags: SeriesTags, **kw) -> Path:
    """Write a series into ``folder`` as ``image_0 .. image_{n-1}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in dicom_slices(volume, geometry, tags, **kw):
        ds.save_as(folder / f"image_{k}", enforce_file_format=True)
    return folder


def write_series_to_zip(
    zf: zipfile.ZipFile, prefix: str, volume: np.ndarray, geometry: SeriesGeometry, tags: SeriesTags, **kw
) -> None:
    """Write a series into an open zip under ``prefix/image_K``."""
    for k, ds in dicom_slices(volume, geometry, tags, **kw):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        zf.writestr(f"{prefix}/image_{k}", buf.getvalue())
