"""Dictionary transforms that read a patient: the CT, and the organ masks merged into one class map;
and a typed copy of what was read, kept beside the image the pipeline goes on to change."""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import get_equivalent_dtype

from liver_fcn import CLASS_NAMES
from liver_fcn.data.ct import ct_loader, load_ct
from liver_fcn.errors import InputError

__all__ = ["CopyAsTyped", "LoadCTd", "LoadOrganMasksd"]


class LoadCTd(MapTransform):
    """Load the CT of ``keys`` (a DICOM series folder or a NIfTI file) as a channel-first MetaTensor.

    Args:
        keys: keys holding the input paths.
        series_uid: series to pick when a folder holds several: a SeriesInstanceUID or ``"auto"``. An
            item's own ``series_uid`` (what the inference cases resolved) takes precedence.
        modality: required DICOM Modality (``"CT"``; None accepts any, e.g. for masks).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        series_uid: str | None = None,
        modality: str | None = "CT",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid, self.modality = series_uid, modality
        self.loader = ct_loader()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = load_ct(d[key], self.loader, d.get("series_uid") or self.series_uid, self.modality)
        return d


class CopyAsTyped(MapTransform):
    """Copy each of ``keys`` to the matching key of ``names`` as ``dtype``, in one conversion; the
    copy has its own metadata and transform record.

    What MONAI's ``CopyItemsd`` followed by ``CastToTyped`` on the copy makes, with one pass over
    the volume instead of two (a 512 x 512 x 129 float CT kept as int16 HU: 0.02 s against 0.06 s).
    """

    def __init__(
        self, keys: KeysCollection, names: KeysCollection, dtype=torch.int16, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.names = [names] if isinstance(names, str) else list(names)
        if len(self.names) != len(self.keys):
            raise ValueError(f"CopyAsTyped needs one name a key, got keys {self.keys} and names {self.names}")
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, name in self.key_iterator(d, self.names):
            value = d[key]
            if isinstance(value, MetaTensor):
                d[name] = MetaTensor(
                    value.as_tensor().to(self.dtype),
                    meta=copy.deepcopy(value.meta),
                    applied_operations=copy.deepcopy(value.applied_operations),
                )
            elif isinstance(value, torch.Tensor):
                d[name] = value.to(self.dtype)
            else:
                d[name] = np.array(value, dtype=get_equivalent_dtype(self.dtype, np.ndarray))
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
        class_names: Sequence[str] = CLASS_NAMES,
        image_key: str = "image",
        label_key: str = "label",
        annotated_key: str = "annotated",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.class_names = list(class_names)
        self.image_key, self.label_key, self.annotated_key = image_key, label_key, annotated_key
        self.loader = ct_loader()

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
                raise InputError(
                    f"{d.get('patient', key)}: 'annotated' has {len(annotated)} flags "
                    f"for {len(self.class_names)} classes"
                )
            d[self.annotated_key] = torch.as_tensor([bool(a) for a in annotated])
        return d
