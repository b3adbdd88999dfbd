"""Small helpers shared by the transforms: tensors like another, arrays, voxel sizes, bounding boxes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["as_numpy", "bounding_box", "like", "voxel_spacing"]


def like(reference, data: torch.Tensor) -> torch.Tensor:
    """``data`` with the metadata and transform record of ``reference`` when that is a MetaTensor
    (a transform that changes values but no geometry keeps the image invertible)."""
    if isinstance(reference, MetaTensor):
        return MetaTensor(data, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))
    return data


def as_numpy(x, dtype=None) -> np.ndarray:
    """A tensor (on any device) or an array as a NumPy array, without a copy where none is needed."""
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=dtype)


def voxel_spacing(img) -> np.ndarray:
    """Voxel spacing in mm along each spatial axis, from a MetaTensor's affine (ones without one)."""
    affine = getattr(img, "affine", None)
    n = img.ndim - 1
    if affine is None:
        return np.ones(n)
    a = as_numpy(affine, np.float64)
    return np.sqrt((a[:n, :n] ** 2).sum(axis=0))


def bounding_box(mask: np.ndarray, margin: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel of ``mask``, grown by ``margin`` voxels
    (one for all axes or one per axis) and clipped to the array, or None when ``mask`` is empty."""
    margins = [int(margin)] * mask.ndim if np.ndim(margin) == 0 else [int(m) for m in margin]
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        m = margins[axis]
        box.append(slice(max(int(hit[0]) - m, 0), min(int(hit[-1]) + 1 + m, mask.shape[axis])))
    return tuple(box)
