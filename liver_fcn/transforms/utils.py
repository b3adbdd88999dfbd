"""Small helpers shared by the transforms: tensors like another, arrays, voxel sizes, bounding boxes,
transposed copies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor

__all__ = ["as_numpy", "bounding_box", "like", "transposed_copy", "voxel_spacing"]


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


def transposed_copy(array: np.ndarray, axes: Sequence[int], tile: int = 64) -> np.ndarray:
    """``np.ascontiguousarray(array.transpose(axes))``: the same values, several times faster for a
    3D array whose last axis moves.

    The copy goes in tiles of ``tile`` x ``tile`` voxels across ``array``'s first two axes, each with
    the whole of its third, so each tile's reads and writes stay within the caches; one pass over
    the whole volume (NumPy's copy) touches a new cache line for almost every voxel. A 512 x 512 x 129
    uint8 volume into Fortran order: 0.05 s against 0.23 s. Other ranks: NumPy's copy."""
    array = np.asarray(array)
    axes = [int(a) for a in axes]
    if array.ndim != 3:
        return np.ascontiguousarray(array.transpose(axes))
    out = np.empty([array.shape[a] for a in axes], array.dtype)
    view = out.transpose(np.argsort(axes))  # the output seen in the input's axis order
    for i in range(0, array.shape[0], tile):
        for j in range(0, array.shape[1], tile):
            view[i : i + tile, j : j + tile] = array[i : i + tile, j : j + tile]
    return out
