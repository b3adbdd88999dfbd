"""Clean-up of the class map: largest components, slice-wise hole filling, component counts.

Each is a function on a class map array (:func:`keep_largest_components`, :func:`fill_holes_slicewise`,
:func:`component_sizes_ml`) under a thin dictionary transform for the bundle's chains."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import cc3d
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from liver_fcn.transforms.labels import _like_class_map, class_map_array
from liver_fcn.transforms.utils import bounding_box, transposed_copy, voxel_spacing

__all__ = [
    "CountComponentsd",
    "FillHolesSlicewised",
    "KeepLargestComponentsd",
    "component_sizes_ml",
    "fill_holes_slicewise",
    "keep_largest_components",
]


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The connected components (full connectivity) of a boolean ``mask`` numbered from 1, and the
    voxel count of each number (index 0, the rest of the array, counted as 0).

    2D and 3D masks are labelled by ``connected-components-3d``, several times faster than scipy's
    ``ndimage.label``; on a C-ordered array it numbers the components as scipy does (in raster
    order of their first voxel), so the ranking of equal sizes is scipy's too. The voxels are
    counted over the mask's own voxels only (a liver fills a fifth of its box)."""
    if mask.ndim in (2, 3):
        components, n = cc3d.connected_components(
            np.ascontiguousarray(mask), connectivity=3**mask.ndim - 1, return_N=True
        )
        counts = np.bincount(components[mask.astype(bool, copy=False)], minlength=n + 1)
    else:
        components, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
        counts = np.bincount(components.ravel())
    counts[0] = 0
    return components, counts


def _keep_largest(classes: np.ndarray, label: int, num_components: int) -> np.ndarray:
    """Keep the ``num_components`` largest components of ``label`` in ``classes`` (changed in place),
    labelled on the label's bounding box; return the voxel counts of all of its components as found."""
    mask = classes == label
    box = bounding_box(mask)
    if box is None:
        return np.zeros(0, np.int64)
    sub = mask[box]
    components, counts = _components(sub)
    if counts.size - 1 > num_components:
        kept = np.argsort(counts)[::-1][:num_components]  # MONAI's ranking
        if num_components <= 4:  # a comparison a kept component is cheaper than a look-up a voxel
            drop = sub.copy()
            for number in kept:
                drop &= components != number
        else:
            keep = np.zeros(counts.size, bool)
            keep[kept] = True
            drop = sub & ~keep[components]
        region = classes[box]
        region[drop] = 0
    return counts[1:]


def _sizes_ml(counts: np.ndarray, spacing: Sequence[float], min_ml: float) -> list[float]:
    """Component voxel ``counts`` as volumes (mL) for voxels of ``spacing`` (mm), those of at least
    ``min_ml``, largest first."""
    sizes = counts * (float(np.prod(spacing)) / 1000.0)
    return sorted((float(c) for c in sizes if c >= min_ml), reverse=True)


def keep_largest_components(classes: np.ndarray, labels: Sequence[int] = (1,), num_components: int = 1) -> np.ndarray:
    """A copy of the class map ``classes`` (any dimensions) keeping only the ``num_components``
    largest connected components (full connectivity) of each of ``labels``; the voxels of smaller
    ones become background. Computed on each label's bounding box."""
    out = np.array(classes)  # a copy, changed in place
    for label in labels:
        _keep_largest(out, label, num_components)
    return out


def component_sizes_ml(classes: np.ndarray, label: int, spacing: Sequence[float], min_ml: float = 0.0) -> list[float]:
    """Sizes (mL) of the connected components (full connectivity) of ``label`` in the class map
    ``classes`` of voxel ``spacing`` (mm), those of at least ``min_ml``, largest first."""
    mask = classes == label
    box = bounding_box(mask)
    if box is None:
        return []
    return _sizes_ml(_components(mask[box])[1][1:], spacing, min_ml)


def fill_holes_slicewise(classes: np.ndarray, labels: Sequence[int] = (1,), axis: int = -1) -> np.ndarray:
    """A copy of the class map ``classes`` whose background voxels enclosed by one of ``labels``
    within a slice along ``axis`` take that label; voxels of other classes never change.

    Worked on the label's 3D bounding box (grown by one voxel, so that every slice's holes are
    told from its outside as on the whole slice), copied once with its slices contiguous, all its
    slices in one labelling: scipy's ``binary_fill_holes`` slice by slice gives the same map."""
    out = np.array(classes, copy=True)
    axis = axis % classes.ndim
    for label in labels:
        box = bounding_box(classes == label, margin=1)  # a hole lies inside its label's box
        if box is None:
            continue
        sub = transposed_copy(classes[box], [axis] + [a for a in range(classes.ndim) if a != axis])
        # scipy's binary_fill_holes of each slice at once: the 4-connected pieces of each slice's
        # outside that do not reach the box's edge are holes. The slices are labelled stacked as one
        # 2D image: a piece that runs from one slice's last row into the next one's first row
        # touches the edge in both, where it is outside anyway, so no hole is joined to anything.
        n, rows, cols = sub.shape
        pieces, count = cc3d.connected_components((sub != label).reshape(n * rows, cols), connectivity=4, return_N=True)
        pieces = pieces.reshape(n, rows, cols)
        outside = np.zeros(count + 1, bool)
        outside[0] = True  # the label itself
        for edge in (pieces[:, [0, -1], :], pieces[:, :, [0, -1]]):
            outside[np.unique(edge)] = True
        fill = ~outside[pieces] & (sub == 0)
        if fill.any():
            region = np.moveaxis(out[box], axis, 0)  # a view of the output
            region[fill] = label
    return out


class KeepLargestComponentsd(MapTransform):
    """Keep the ``num_components`` largest 3D connected components of each of ``applied_labels`` in a
    class map (1, X, Y, Z); the voxels of smaller components become background.

    MONAI's ``KeepLargestConnectedComponentd`` (independent labels) with the same result, labelled on
    the label's bounding box instead of the whole volume: on a 512 x 512 CT the organs fill a small
    part of it. Full (26-) connectivity.

    With ``sizes_key``, the sizes (mL) of each applied label's components before the clean-up, those
    of at least ``min_ml``, are recorded as :class:`CountComponentsd` records them (``{"<label>":
    [sizes, largest first]}``, merged into an existing dict), from the same labelling.
    """

    def __init__(
        self,
        keys: KeysCollection,
        applied_labels: Sequence[int] = (1,),
        num_components: int = 1,
        sizes_key: str | None = None,
        min_ml: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.applied_labels = [int(v) for v in applied_labels]
        self.num_components = int(num_components)
        self.sizes_key, self.min_ml = sizes_key, float(min_ml)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            out = np.array(class_map_array(d[key], key, "KeepLargestComponentsd"))  # a copy, changed in place
            counts = {label: _keep_largest(out, label, self.num_components) for label in self.applied_labels}
            d[key] = _like_class_map(d[key], out)
            if self.sizes_key is not None:
                spacing = voxel_spacing(d[key])
                sizes = {str(label): _sizes_ml(c, spacing, self.min_ml) for label, c in counts.items()}
                d[self.sizes_key] = {**dict(d.get(self.sizes_key) or {}), **sizes}
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
            arr = class_map_array(d[key], key, "CountComponentsd")
            sizes = component_sizes_ml(arr, self.label, voxel_spacing(d[key]), self.min_ml)
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
            arr = class_map_array(d[key], key, "FillHolesSlicewised")
            axis = self.axis % arr.ndim if self.axis < 0 else self.axis - 1  # the channel is not in arr
            d[key] = _like_class_map(d[key], fill_holes_slicewise(arr, self.applied_labels, axis))
        return d
