"""Clean-up of the class map: largest components, slice-wise hole filling, component counts."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from liver_fcn.transforms.labels import _like_class_map, class_map_array
from liver_fcn.transforms.utils import voxel_spacing

__all__ = ["CountComponentsd", "FillHolesSlicewised", "KeepLargestComponentsd"]


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel of ``mask`` (grown by ``margin``), or None."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


class KeepLargestComponentsd(MapTransform):
    """Keep the ``num_components`` largest 3D connected components of each of ``applied_labels`` in a
    class map (1, X, Y, Z); the voxels of smaller components become background.

    MONAI's ``KeepLargestConnectedComponentd`` (independent labels) with the same result, computed by
    MONAI's ``get_largest_connected_component_mask`` on the label's bounding box instead of the whole
    volume: on a 512 x 512 CT the organs fill a small part of it. Full (26-) connectivity.
    """

    def __init__(
        self,
        keys: KeysCollection,
        applied_labels: Sequence[int] = (1,),
        num_components: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.applied_labels = [int(v) for v in applied_labels]
        self.num_components = int(num_components)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        from monai.transforms.utils import get_largest_connected_component_mask

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = np.array(class_map_array(img, key, "KeepLargestComponentsd"))  # a copy, changed in place
            for label in self.applied_labels:
                mask = arr == label
                box = _bounding_box(mask)
                if box is None:
                    continue
                sub = mask[box]
                keep = np.asarray(get_largest_connected_component_mask(sub, num_components=self.num_components))
                region = arr[box]
                region[sub & ~keep] = 0
            d[key] = _like_class_map(img, arr)
        return d


class CountComponentsd(MapTransform):
    """Record, before the post-processing keeps the largest, the sizes (mL) of the 3D connected
    components of one label of a class map (1, X, Y, Z) that are at least ``min_ml``: ``out_key``
    receives ``{"<label>": [sizes, largest first]}`` (merged into an existing dict). A liver that comes
    out in several large pieces is worth a look."""

    def __init__(
        self, keys: KeysCollection = "pred", label: int = 1, min_ml: float = 20.0, out_key: str = "components"
    ) -> None:
        super().__init__(keys)
        self.label, self.min_ml, self.out_key = int(label), float(min_ml), out_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            mask = class_map_array(img, key, "CountComponentsd") == self.label
            sizes: list[float] = []
            box = _bounding_box(mask)
            if box is not None:
                labels, n = ndimage.label(mask[box], structure=np.ones((3, 3, 3), bool))
                voxel_ml = float(np.prod(voxel_spacing(img))) / 1000.0
                counts = np.bincount(labels.ravel())[1:] * voxel_ml
                sizes = sorted((float(c) for c in counts if c >= self.min_ml), reverse=True)
            d[self.out_key] = {**dict(d.get(self.out_key) or {}), str(self.label): sizes}
        return d


class FillHolesSlicewised(MapTransform):
    """Fill the background holes of some classes of a class map, slice by slice along ``axis``.

    A class map (1, X, Y, Z): background voxels that a class encloses within an axial slice take
    that class, for the ``applied_labels`` only. Voxels of other classes are never changed (MONAI's
    ``FillHoles`` would turn a bone voxel enclosed by liver into liver), and slices without those
    labels are skipped. Slice by slice because the liver's vessels enter it at the hilum: they are
    open in 3D but enclosed in each slice.
    """

    def __init__(
        self,
        keys: KeysCollection,
        applied_labels: Sequence[int] = (1,),
        axis: int = -1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.applied_labels = [int(v) for v in applied_labels]
        self.axis = axis

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = class_map_array(img, key, "FillHolesSlicewised")
            out = np.array(arr, copy=True)
            axis = self.axis % arr.ndim if self.axis < 0 else self.axis - 1
            moved, result = np.moveaxis(arr, axis, 0), np.moveaxis(out, axis, 0)
            for label in self.applied_labels:
                present = (moved == label).reshape(moved.shape[0], -1).any(axis=1)
                for k in np.flatnonzero(present):
                    box = _bounding_box(moved[k] == label, margin=1)  # a hole lies inside its label's box
                    sl, res = moved[k][box], result[k][box]
                    filled = ndimage.binary_fill_holes(sl == label)
                    res[filled & (sl == 0)] = label
            d[key] = _like_class_map(img, out)
        return d
