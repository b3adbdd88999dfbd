"""Small helpers shared by the transforms: tensors like another, arrays, voxel sizes."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["as_numpy", "like", "voxel_spacing"]


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
