"""DICOM Segmentation objects (highdicom) for a predicted class map on a CT series.

The SEG references the input CT series; each class present becomes a segment coded with its
SNOMED CT anatomy (liver 10200004, bone structure 272673000, kidney 64033007), given the class's
display colour (the overlay's, as CIELab) and marked as an automatic result of this software.
Frames follow the CT slices, so a viewer overlays them on the original images.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from liver_fcn import __version__
from liver_fcn.data.dicom import dicom_folder, inspect_series
from liver_fcn.outputs import atomic_path
from liver_fcn.visualize import class_rgb

__all__ = ["prepare_sources", "write_dicom_seg"]


def _codes() -> dict:
    from pydicom.sr.codedict import codes

    return {
        "liver": codes.SCT.Liver,
        "bone": codes.SCT.BoneStructure,
        "kidney": codes.SCT.Kidney,
        "spleen": codes.SCT.Spleen,
    }


TYPE2_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "AccessionNumber",
)


def prepare_sources(sources: list) -> list[str]:
    """Make the CT's headers usable as a SEG's sources, in memory (the files are not touched); returns
    the UIDs generated, by keyword.

    Type 2 patient and study attributes may be empty but must be present. An empty
    SpecificCharacterSet (as some vendors write it) means the default repertoire: it is removed
    rather than passed on as an invalid value. A de-identified series without Study, Series or SOP
    Instance UIDs gets generated ones - one Study and Series UID for all slices, one SOP UID each - so
    the SEG can be built; it then references those generated UIDs, not the archive's images.
    """
    generated: list[str] = []
    shared: dict[str, str] = {}
    for ds in sources:
        for keyword in TYPE2_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if "SpecificCharacterSet" in ds and not str(ds.SpecificCharacterSet or "").strip():
            del ds.SpecificCharacterSet
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if not str(ds.get(keyword, "") or "").strip():
                if keyword not in shared:
                    shared[keyword] = generate_uid()
                    generated.append(keyword)
                setattr(ds, keyword, shared[keyword])
        if not str(ds.get("SOPInstanceUID", "") or "").strip():
            ds.SOPInstanceUID = generate_uid()
            if "SOPInstanceUID" not in generated:
                generated.append("SOPInstanceUID")
        if not str(ds.get("SOPClassUID", "") or "").strip():
            ds.SOPClassUID = pydicom.uid.CTImageStorage
    return generated


def write_dicom_seg(
    series_folder: str | os.PathLike,
    seg: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    series_uid: str | None = None,
    generated_uids: list | None = None,
) -> Path:
    """Write a DICOM SEG for ``seg`` (the class map on the series' grid, MONAI axis order (col, row, slice))
    on the series ``series_uid`` (a UID, ``"auto"`` or None for a folder's only series) of ``series_folder``
    (a folder or a zip).

    The slices are matched to the CT by position (the order CTSeriesReader stacks them in).
    ``generated_uids`` receives the keywords of the source UIDs that had to be generated
    (:func:`prepare_sources`).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    with dicom_folder(series_folder) as folder:
        info = inspect_series(folder, series_uid=series_uid or None, modality="CT")
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in info.files]
    generated = prepare_sources(sources)
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
                display_color=hd.color.CIELabColor.from_rgb(*class_rgb(c)),
            )
        )
    if not descriptions:  # an empty result is still a result: one empty liver segment
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label=class_names[1],
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=coded.get(class_names[1].lower(), codes.SCT.Tissue),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*class_rgb(1)),
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
    if generated_uids is not None:
        generated_uids.extend(generated)
    return Path(path)
