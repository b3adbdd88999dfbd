"""Class maps and the partial-label encoding of the training targets."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from liver_fcn import CLASS_NAMES
from liver_fcn.transforms.utils import as_numpy, like

__all__ = ["BoneByDensityd", "EncodePartialLabeld", "bone_by_density", "class_map_array"]


class EncodePartialLabeld(MapTransform):
    """Pack the classes a background pixel may belong to into the label.

    A patient without, say, kidney masks still has kidneys: its background pixels are "background
    or kidney". The encoded label is ``c + num_classes * m`` where ``c`` is the class and ``m`` the
    bitmask of classes not annotated for this patient, set on background pixels only (annotated
    pixels are certain). Fully annotated patients are left unchanged, so with complete labels the
    loss is plain cross-entropy. A collated batch (``annotated`` of shape ``(B, num_classes)``) is
    encoded sample by sample.
    """

    def __init__(self, keys: KeysCollection = "label", annotated_key: str = "annotated", num_classes: int = 4) -> None:
        super().__init__(keys)
        self.annotated_key = annotated_key
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        annotated = torch.as_tensor(d[self.annotated_key]).bool()
        batched = annotated.ndim == 2  # a collated batch: one vector a sample
        annotated = annotated if batched else annotated[None]
        bits = torch.tensor([0] + [1 << c for c in range(1, self.num_classes)], device=annotated.device)
        missing = ((~annotated[:, : self.num_classes]).long() * bits).sum(dim=1)
        for key in self.key_iterator(d):
            lab = torch.as_tensor(d[key]).long()
            code = self.num_classes * missing.to(lab.device)
            code = code.view(-1, *([1] * (lab.ndim - 1))) if batched else code[0]
            d[key] = torch.where(lab == 0, code, lab)
        return d


def class_map_array(img, key, who: str) -> np.ndarray:
    """The 3D array of a one-channel class map ``(1, X, Y, Z)``; anything else is refused."""
    if img.shape[0] != 1:
        raise ValueError(f"{key}: {who} expects a class map with one channel, got {img.shape[0]}")
    return as_numpy(img)[0]


def _like_class_map(img, arr: np.ndarray):
    """``arr`` (X, Y, Z) back in the form of the class map ``img``: a tensor with its metadata and
    device, or an array."""
    if isinstance(img, torch.Tensor):
        return like(img, torch.as_tensor(arr[None], device=img.device))
    return arr[None]


def bone_by_density(classes: np.ndarray, hu: np.ndarray, min_hu: float, bone_class: int) -> np.ndarray:
    """``classes`` with the ``bone_class`` voxels whose density in ``hu`` (same shape) is below
    ``min_hu`` set to background (0); every other voxel unchanged."""
    classes = np.asarray(classes)
    return np.where((classes == bone_class) & (np.asarray(hu) < min_hu), np.zeros_like(classes), classes)


class BoneByDensityd(MapTransform):
    """One definition of bone for training: annotated bone below ``min_hu`` HU becomes background.

    Bone masks are drawn by different conventions: some follow the dense bone alone (hollow bones,
    about CT > 200 HU), others a filled outline with a margin of soft tissue around it (a quarter of
    the mask below 150 HU on one 3D-IRCADb-01 patient; ``benchmarks/label_conventions.py`` prints
    each patient's). Trained on the second and scored on the first, a network over-segments bone.
    With ``min_hu`` set, every training volume teaches the same bone: its mask where the CT is at
    least ``min_hu``; the margin is taught as background (it is fat, muscle or marrow below that
    density). ``None`` leaves the class map as it is. Runs on HU (``keys[0]``) and the class map
    (``keys[1]``) on the same grid, before any resampling; a patient without bone masks has no bone
    voxels and is unchanged. Evaluation scores the masks as drawn.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        min_hu: float | None = None,
        class_names: Sequence[str] = CLASS_NAMES,
        bone: str = "bone",
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"BoneByDensityd needs two keys (the CT, its class map), got {list(self.keys)}")
        self.min_hu = None if min_hu is None else float(min_hu)
        if self.min_hu is not None and bone not in class_names:
            raise ValueError(f"BoneByDensityd: min_hu is set but there is no class {bone!r} in {list(class_names)}")
        self.bone_class = list(class_names).index(bone) if bone in class_names else None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.min_hu is None:
            return d
        image_key, label_key = self.keys
        img, lab = d[image_key], d[label_key]
        if tuple(img.shape[-3:]) != tuple(lab.shape[-3:]):
            raise ValueError(
                f"BoneByDensityd: {image_key} {tuple(img.shape)} and {label_key} {tuple(lab.shape)} are not on one grid"
            )
        classes = class_map_array(lab, label_key, "BoneByDensityd")
        new = bone_by_density(classes, as_numpy(img)[0], self.min_hu, self.bone_class)
        d[label_key] = _like_class_map(lab, new)
        return d
