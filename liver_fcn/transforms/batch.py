"""Random transforms of a collated training batch, on the batch's device, each sample drawn on its own.

A training batch is a dictionary of ``(B, C, H, W)`` tensors (``image``, ``label``) and the
per-sample ``annotated`` vectors ``(B, num_classes)``. The transforms here draw their random
parameters for every sample exactly as the slice transforms they stand for draw them for one slice
(:class:`~liver_fcn.transforms.RandInPlaneAffined`, MONAI's ``RandFlipd``, ``RandAdjustContrastd``
and ``RandSpatialCropd``), and apply them to the whole batch at once: one ``grid_sample`` for the
slices that move, one gamma curve over the batch, one gather of windows. On a GPU that is where the
batch already is; on a CPU it saves the per-slice calls. :class:`PerSampled` runs any slice
transform sample by sample, for those without a batch form (an elastic deformation, drawn rarely).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data.utils import get_random_patch, get_valid_patch_size
from monai.transforms import MapTransform, Randomizable, RandomizableTransform
from monai.utils import convert_to_tensor, fall_back_tuple

from liver_fcn.transforms.geometry import RandInPlaneAffined, inplane_affine

__all__ = [
    "BatchRandAdjustContrastd",
    "BatchRandFlipd",
    "BatchRandInPlaneAffined",
    "BatchRandSpatialCropd",
    "PerSampled",
]


def _batch_size(d: Mapping, keys: Sequence[Hashable]) -> int:
    return int(next(d[k] for k in keys if k in d).shape[0])


class BatchRandInPlaneAffined(RandInPlaneAffined):
    """:class:`~liver_fcn.transforms.RandInPlaneAffined` for a batch ``(B, C, H, W)``: every sample draws
    its own rotation, zoom and shift (each part with its own probability), and the samples that draw
    any are resampled together, once; the others are left as they are."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        matrices = []
        for _ in range(_batch_size(d, self.keys)):
            self.randomize()
            matrices.append(self.matrix)
        drawn = [i for i, m in enumerate(matrices) if m is not None]
        if not drawn:
            return d
        stacked = np.stack([matrices[i] for i in drawn])
        for key, mode in self.key_iterator(d, self.mode):
            x = d[key]
            index = torch.as_tensor(drawn, device=x.device)
            moved = inplane_affine(x.index_select(0, index), stacked, mode)
            d[key] = x.index_copy(0, index, moved)
        return d


class BatchRandFlipd(RandomizableTransform, MapTransform):
    """MONAI's ``RandFlipd`` for a batch: each sample flipped along ``spatial_axis`` (of its own
    spatial axes) with probability ``prob``."""

    def __init__(
        self, keys: KeysCollection, prob: float = 0.1, spatial_axis: int = 0, allow_missing_keys: bool = False
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.spatial_axis = int(spatial_axis)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        flips = [self.R.rand() < self.prob for _ in range(_batch_size(d, self.keys))]
        if not any(flips):
            return d
        for key in self.key_iterator(d):
            x = d[key]
            which = torch.as_tensor(flips, device=x.device).view(-1, *([1] * (x.ndim - 1)))
            d[key] = torch.where(which, x.flip(2 + self.spatial_axis), x)
        return d


class BatchRandSpatialCropd(Randomizable, MapTransform):
    """MONAI's ``RandSpatialCropd`` (fixed size, random place) for a batch: each sample keeps a window
    of ``roi_size`` at its own place, sized and drawn by the functions MONAI's crop uses for one image
    (``fall_back_tuple``, ``get_valid_patch_size``, ``get_random_patch``: the same places from the
    same seed), and the windows are cut by indexing, without MONAI's per-image metadata. An entry of
    ``roi_size`` that is not positive, or larger than the slice, keeps that axis whole."""

    def __init__(self, keys: KeysCollection, roi_size: Sequence[int], allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.roi_size = tuple(int(v) for v in roi_size)
        self.windows: list[tuple[slice, ...]] = []  # each sample's window, as drawn by the last call

    @property
    def corners(self) -> list[tuple[int, ...]]:
        """Each sample's window corner, as drawn by the last call."""
        return [tuple(s.start for s in w) for w in self.windows]

    def randomize(self, data: object = None) -> None:  # drawn per sample in __call__
        pass

    def window(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """The window's size on slices of ``spatial`` size."""
        if len(self.roi_size) != len(spatial):
            raise ValueError(f"roi_size {list(self.roi_size)} does not match slices of size {list(spatial)}")
        return get_valid_patch_size(spatial, fall_back_tuple(self.roi_size, spatial))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        spatial = tuple(d[keys[0]].shape[2:])
        size = self.window(spatial)
        self.windows = [get_random_patch(spatial, size, self.R) for _ in range(_batch_size(d, keys))]
        for key in keys:
            x = d[key]
            if tuple(x.shape[2:]) != spatial:
                raise ValueError(f"{key!r} has slices of size {list(x.shape[2:])}, {keys[0]!r} {list(spatial)}")
            d[key] = torch.stack([x[i][(slice(None), *w)] for i, w in enumerate(self.windows)])
        return d


class BatchRandAdjustContrastd(RandomizableTransform, MapTransform):
    """MONAI's ``RandAdjustContrastd`` (gamma) for a batch: with probability ``prob`` a sample gets its
    own gamma, uniform in ``gamma``, applied between its own minimum and maximum as MONAI's
    ``AdjustContrast`` does: ``((x - min) / (range + 1e-7)) ** gamma * range + min``."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        gamma: Sequence[float] = (0.5, 4.5),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        low, high = (float(v) for v in gamma)
        self.gamma = (min(low, high), max(low, high))
        self.gammas: list[float | None] = []

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        gammas = []
        for _ in range(_batch_size(d, self.keys)):
            gammas.append(float(self.R.uniform(*self.gamma)) if self.R.rand() < self.prob else None)
        self.gammas = gammas  # each sample's gamma, None where not drawn
        drawn = [i for i, g in enumerate(gammas) if g is not None]
        if not drawn:
            return d
        for key in self.key_iterator(d):
            x = d[key]
            index = torch.as_tensor(drawn, device=x.device)
            part = x.index_select(0, index)
            flat = part.flatten(1)
            low = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
            span = flat.max(dim=1).values.view_as(low) - low
            g = torch.tensor([gammas[i] for i in drawn], dtype=x.dtype, device=x.device).view_as(low)
            d[key] = x.index_copy(0, index, ((part - low) / (span + 1e-7)) ** g * span + low)
        return d


class PerSampled(Randomizable, MapTransform):
    """A slice transform run on each sample of a batch in turn: ``keys`` are split along the batch
    axis, each sample's dictionary (with the other keys' per-sample values where they are batched
    alike) goes through ``transform``, and the results are stacked again."""

    def __init__(self, transform: Callable, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> PerSampled:
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: object = None) -> None:  # the wrapped transform draws its own
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        outputs = [self.transform({k: d[k][i] for k in keys}) for i in range(_batch_size(d, keys))]
        for k in keys:  # each sample back in the batch's dtype (a resampled class map comes back float)
            samples = [convert_to_tensor(o[k], track_meta=False) for o in outputs]
            d[k] = torch.stack([x.to(device=d[k].device, dtype=d[k].dtype) for x in samples])
        return d
