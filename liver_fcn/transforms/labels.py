"""Class maps and the partial-label encoding of the training targets."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from liver_fcn.transforms.utils import as_numpy, like

__all__ = ["EncodePartialLabeld", "class_map_array"]


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
