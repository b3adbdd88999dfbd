"""MONAI dictionary transforms the bundle needs and MONAI does not have.

* :class:`LoadCTd` - ``LoadImaged`` restricted to the one reader that fits the input (a DICOM
  series folder through :class:`~liver_fcn.data.CTSeriesReader`, a NIfTI file through nibabel),
  so that a bad series is reported instead of being read by a fallback reader.
* :class:`LoadOrganMasksd` - loads a patient's organ mask series (one DICOM series per organ, as in
  3D-IRCADb-01) and merges them into one class map on the CT's grid, recording which classes are
  annotated for the patient.
* :class:`EncodePartialLabeld` - packs "this background pixel may also be any class that is not
  annotated for this patient" into the label, for
  :class:`~liver_fcn.losses.PartialLabelCrossEntropyLoss`.
* :class:`AdjacentSlicesd` - stacks the neighbouring axial slices as channels (2.5D input).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage, MapTransform

from liver_fcn.data.dicom import CTSeriesReader
from liver_fcn.errors import InputError

__all__ = ["AdjacentSlicesd", "EncodePartialLabeld", "LoadCTd", "LoadOrganMasksd", "decode_partial_label", "load_ct"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _loader() -> LoadImage:
    return LoadImage(image_only=True, ensure_channel_first=True)


def load_ct(path, loader: LoadImage | None = None, series_uid: str | None = None, modality: str | None = "CT"):
    """Load a CT (DICOM series folder or NIfTI file) with exactly one reader; channel-first MetaTensor.

    MONAI's LoadImage falls back to its other readers when the chosen one fails, which would read a
    folder of two series or with a missing slice after all. Passing the reader at call time
    disables the fallback; any failure becomes an :class:`InputError` naming the file.
    """
    loader = loader or _loader()
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: input does not exist")
    if p.is_dir():
        reader = CTSeriesReader(series_uid=series_uid, modality=modality)
    elif p.name.lower().endswith(NIFTI_SUFFIXES):
        reader = NibabelReader()
    elif p.suffix.lower() == ".dcm":
        raise InputError(f"{p}: a single DICOM file; pass the folder holding the whole series")
    else:
        raise InputError(f"{p}: not a DICOM series folder or a NIfTI file (.nii, .nii.gz)")
    try:
        return loader(p, reader=reader)
    except InputError:
        raise
    except Exception as e:  # a corrupt NIfTI, an undecodable slice ...
        raise InputError(f"{p}: cannot be read ({type(e).__name__}: {e})".replace("\n", " ")) from None


class LoadCTd(MapTransform):
    """Load the CT of ``keys`` (a DICOM series folder or a NIfTI file) as a channel-first MetaTensor.

    Args:
        keys: keys holding the input paths.
        series_uid: SeriesInstanceUID to pick when a folder holds several series.
        modality: required DICOM Modality (``"CT"``; None accepts any, e.g. for masks).
    """

    def __init__(
        self, keys: KeysCollection = "image", series_uid: str | None = None, modality: str | None = "CT",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid, self.modality = series_uid, modality
        self.loader = _loader()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_ct(d[key], self.loader, self.series_uid, self.modality)
        return d


class LoadOrganMasksd(MapTransform):
    """Merge per-organ mask series into one class map (``label``) aligned with ``image``.

    Each datalist entry has ``masks``: ``{class name: [mask folders]}`` and ``annotated``: one bool
    per class (background first). Voxels > 0 in any folder of class ``c`` get value ``c``; classes
    are painted in the order of ``class_names``, so a later class wins where masks overlap. Every
    mask must have the CT's shape and affine, else an :class:`InputError` names the folder.

    Args:
        keys: the key holding the mask dict (``"masks"``).
        class_names: class names, background first (``["background", "liver", "bone", "kidney"]``).
        image_key: the already loaded, channel-first CT.
        label_key: where the class map is written (uint8, channel-first, the CT's metadata).
        annotated_key: where the per-class annotation flags are written (bool tensor).
    """

    def __init__(
        self,
        keys: KeysCollection = "masks",
        class_names: Sequence[str] = ("background", "liver", "bone", "kidney"),
        image_key: str = "image",
        label_key: str = "label",
        annotated_key: str = "annotated",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.class_names = list(class_names)
        self.image_key, self.label_key, self.annotated_key = image_key, label_key, annotated_key
        self.loader = _loader()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        for key in self.key_iterator(d):
            masks = d[key] or {}
            unknown = set(masks) - set(self.class_names[1:])
            if unknown:
                raise InputError(f"{d.get('patient', key)}: masks given for unknown classes {sorted(unknown)}")
            label = torch.zeros(image.shape[1:], dtype=torch.uint8)
            for c, name in enumerate(self.class_names[1:], 1):
                for folder in masks.get(name, []):
                    m = load_ct(folder, self.loader, modality=None)
                    if tuple(m.shape[1:]) != tuple(image.shape[1:]):
                        raise InputError(
                            f"{folder}: mask shape {tuple(m.shape[1:])} differs from the CT's {tuple(image.shape[1:])}"
                        )
                    if isinstance(image, MetaTensor) and not np.allclose(m.affine, image.affine, atol=1e-3):
                        raise InputError(f"{folder}: mask geometry (affine) differs from the CT's")
                    label[m[0] > 0] = c
            if isinstance(image, MetaTensor):
                d[self.label_key] = MetaTensor(label[None], meta=dict(image.meta))
            else:
                d[self.label_key] = label[None]
            annotated = d.get("annotated")
            if annotated is None:  # derive: a class is annotated when it has mask folders
                annotated = [True] + [bool(masks.get(n)) for n in self.class_names[1:]]
            if len(annotated) != len(self.class_names):
                raise InputError(f"{d.get('patient', key)}: 'annotated' has {len(annotated)} flags for {len(self.class_names)} classes")
            d[self.annotated_key] = torch.as_tensor([bool(a) for a in annotated])
        return d


def decode_partial_label(target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :class:`EncodePartialLabeld`: (class map, bitmask of unannotated classes)."""
    return target % num_classes, target // num_classes


class EncodePartialLabeld(MapTransform):
    """Pack the classes a background pixel may belong to into the label.

    A patient without, say, kidney masks still has kidneys: its background pixels are "background
    or kidney". The encoded label is ``c + num_classes * m`` where ``c`` is the class and ``m`` the
    bitmask of classes not annotated for this patient, set on background pixels only (annotated
    pixels are certain). Fully annotated patients are left unchanged, so with complete labels the
    loss is plain cross-entropy.
    """

    def __init__(self, keys: KeysCollection = "label", annotated_key: str = "annotated", num_classes: int = 4) -> None:
        super().__init__(keys)
        self.annotated_key = annotated_key
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        annotated = torch.as_tensor(d[self.annotated_key]).bool()
        missing = sum(1 << c for c in range(1, self.num_classes) if not annotated[c])
        for key in self.key_iterator(d):
            lab = torch.as_tensor(d[key]).long()
            if missing:
                lab = torch.where(lab == 0, lab + self.num_classes * missing, lab)
            d[key] = lab
        return d


class AdjacentSlicesd(MapTransform):
    """Give each axial slice its neighbours as channels (2.5D input for a network of ``channels`` inputs).

    A channel-first 3D image ``(1, X, Y, Z)`` becomes ``(channels, X, Y, Z)``: channel ``i`` holds the
    volume shifted by ``i - channels // 2`` slices along ``axis``, the ends repeated, so slice ``k``
    of the result carries slices ``k - c .. k + c``. ``channels=1`` returns the data unchanged.
    """

    def __init__(self, keys: KeysCollection = "image", channels: int = 1, axis: int = -1) -> None:
        super().__init__(keys)
        if channels < 1 or channels % 2 == 0:
            raise ValueError(f"adjacent-slice input needs an odd number of channels (1, 3, 5 ...), got {channels}")
        self.context, self.axis = channels // 2, axis

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.context == 0:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != 1:
                raise ValueError(f"{key}: AdjacentSlicesd expects one channel, got {img.shape[0]}")
            n = img.shape[self.axis]
            chans = []
            for off in range(-self.context, self.context + 1):
                idx = torch.clamp(torch.arange(n) + off, 0, n - 1)
                chans.append(torch.index_select(torch.as_tensor(img[0]), self.axis, idx.to(img.device)))
            out = torch.stack(chans)
            if isinstance(img, MetaTensor):  # keep the metadata and the record of applied transforms
                out = MetaTensor(out, meta=dict(img.meta), applied_operations=list(img.applied_operations))
            d[key] = out
        return d
