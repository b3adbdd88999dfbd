"""DICOM Segmentation objects (highdicom) for a predicted class map on a CT series.

The SEG references the input CT series; each class present becomes a segment coded with its
SNOMED CT anatomy (liver 10200004, bone structure 272673000, kidney 64033007) and marked as an
automatic result of this software. Frames follow the CT slices, so a viewer overlays them on the
original images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from liver_fcn.data.dicom import inspect_series
from liver_fcn.outputs import atomic_path

__all__ = ["SEGMENT_CODES", "write_dicom_seg"]


def _codes() -> dict:
    from pydicom.sr.codedict import codes

    return {
        "liver": codes.SCT.Liver,
        "bone": codes.SCT.BoneStructure,
        "kidney": codes.SCT.Kidney,
        "spleen": codes.SCT.Spleen,
    }


SEGMENT_CODES = ("liver", "bone", "kidney", "spleen")
TYPE2_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "AccessionNumber",
)


def write_dicom_seg(
    series_folder: str | os.PathLike,
    seg: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    series_uid: str | None = None,
) -> Path:
    """Write a DICOM SEG for ``seg`` (the class map on the series' grid, MONAI axis order (col, row, slice)).

    The slices are matched to the CT by position (the order CTSeriesReader stacks them in).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from liver_fcn import __version__

    info = inspect_series(series_folder, series_uid=series_uid or None, modality="CT")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in info.files]
    for ds in sources:  # type 2 patient/study attributes may be empty but must be present
        for keyword in TYPE2_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")
    frames = np.ascontiguousarray(np.transpose(seg, (2, 1, 0)))  # (slice, row, column)
    if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(f"mask shape {seg.shape} does not match the series {info.shape}")
    coded = _codes()
    algorithm = hd.AlgorithmIdentificationSequence(
        name="liver-fcn", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions, labelmap = [], np.zeros(frames.shape, dtype=np.uint8)
    number = 0
    for c, name in enumerate(class_names):
        if c == 0 or not (frames == c).any():
            continue
        number += 1
        labelmap[frames == c] = number
        prop = coded.get(name.lower())
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=codes.SCT.AnatomicalStructure if prop else codes.SCT.Tissue,
                segmented_property_type=prop or codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    if not descriptions:  # an empty result is still a result: one empty liver segment
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=1, segment_label=class_names[1], segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=coded.get(class_names[1].lower(), codes.SCT.Tissue),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            )
        )
    segmentation = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labelmap,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="liver-fcn",
        manufacturer_model_name="FCN on VGG16",
        software_versions=__version__,
        device_serial_number="0",
        series_description="liver-fcn segmentation",
        omit_empty_frames=False,
    )
    with atomic_path(path) as tmp:
        segmentation.save_as(tmp)
    return Path(path)
