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
* :class:`AdjacentSlicesd` - stacks the axial slices at fixed distances in mm above and below as
  channels (2.5D input), interpolated between native slices.
* :class:`InPlaneAntiAliasd` - the Gaussian pre-filter that MONAI's ``Spacingd`` lacks: it smooths
  in-plane only, and only when the target pixel spacing is coarser than the image's.
* :func:`body_mask` - the patient's body (largest air-separated region above a HU threshold), the
  ``select_fn`` of ``CropForegroundd`` for the body-centred field of view.
* :class:`FillHolesSlicewised` - hole filling on each axial slice, of background only: vessels inside
  the liver are open to the outside in 3D (no 3D hole) but enclosed in each slice.
* :class:`SimulateScannerd` - the same patient as another scanner would have imaged it (thicker
  slabs, coarser pixels, more noise, a HU offset), image and reference on the new grid, for the
  scanner-shift evaluation.
* :class:`ForegroundProbabilitiesd` - drops the background channel of class probabilities before
  ``Invertd`` and restores it after. MONAI's inverse of a crop pads with zeros; with the background
  channel left out, a zero means "background" there, where an all-zero probability vector would let
  the smallest interpolation leak decide the argmax.
* :func:`grid_size` - the pixel count of a field of view in mm at a pixel spacing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import math
import zlib

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage, MapTransform
from scipy import ndimage

from liver_fcn.data.dicom import CTSeriesReader
from liver_fcn.errors import InputError

__all__ = [
    "AdjacentSlicesd",
    "EncodePartialLabeld",
    "FillHolesSlicewised",
    "ForegroundProbabilitiesd",
    "InPlaneAntiAliasd",
    "LoadCTd",
    "LoadOrganMasksd",
    "SimulateScannerd",
    "body_mask",
    "grid_size",
    "load_ct",
    "voxel_spacing",
]

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


def like(reference, data: torch.Tensor) -> torch.Tensor:
    """``data`` with the metadata and transform record of ``reference`` when that is a MetaTensor
    (a transform that changes values but no geometry keeps the image invertible)."""
    if isinstance(reference, MetaTensor):
        return MetaTensor(data, meta=dict(reference.meta), applied_operations=list(reference.applied_operations))
    return data


def voxel_spacing(img) -> np.ndarray:
    """Voxel spacing in mm along each spatial axis, from a MetaTensor's affine (ones without one)."""
    affine = getattr(img, "affine", None)
    n = img.ndim - 1
    if affine is None:
        return np.ones(n)
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    return np.sqrt((a[:n, :n] ** 2).sum(axis=0))


def grid_size(field_of_view: float, pixel_spacing: float, multiple: int = 32) -> int:
    """Pixels across a field of view of ``field_of_view`` mm at ``pixel_spacing`` mm, rounded up to a
    ``multiple`` (the network's stride): 409.6 mm at 1.6 mm is 256, at 0.8 mm 512."""
    if field_of_view <= 0 or pixel_spacing <= 0:
        raise ValueError(f"field of view and pixel spacing must be positive, got {field_of_view}, {pixel_spacing}")
    n = field_of_view / pixel_spacing
    return int(math.ceil(round(n, 6) / multiple) * multiple)


def body_mask(image, threshold: float = -500.0) -> torch.Tensor:
    """The body: the largest connected region above ``threshold`` HU (air-separated table, clothes and
    noise left out), as a boolean tensor of the image's shape. All False for an image of air only.

    Meant as ``CropForegroundd(select_fn=body_mask)`` on a CT in HU.
    """
    arr = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    above = (arr > threshold).any(axis=0)  # over channels
    labels, n = ndimage.label(above)
    if n == 0:
        return torch.zeros(arr.shape, dtype=torch.bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    return torch.as_tensor(np.broadcast_to(body, arr.shape).copy())


class InPlaneAntiAliasd(MapTransform):
    """Gaussian anti-aliasing before an in-plane resampling to ``pixel_spacing`` mm.

    For each of the first two spatial axes (in-plane after RAS orientation) whose spacing is finer
    than ``pixel_spacing``, smooths with sigma ``(pixel_spacing / spacing - 1) / 2`` pixels (the rule
    of scikit-image's ``resize``); the slice axis is never smoothed, and an image already at or
    coarser than the target spacing is returned unchanged. Not invertible (it changes no geometry).
    """

    def __init__(self, keys: KeysCollection, pixel_spacing: float, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pixel_spacing = float(pixel_spacing)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spacing = voxel_spacing(img)
            sigma = [max(0.0, (self.pixel_spacing / float(s) - 1.0) / 2.0) for s in spacing[:2]]
            if max(sigma) < 0.05:
                continue
            sigma += [0.0] * (img.ndim - 3)
            arr = np.asarray(img.detach().cpu(), dtype=np.float32)
            out = np.stack([ndimage.gaussian_filter(ch, sigma, mode="nearest", truncate=3.0) for ch in arr])
            t = torch.as_tensor(out, device=img.device)
            d[key] = like(img, t)
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
        self, keys: KeysCollection, applied_labels: Sequence[int] = (1,), axis: int = -1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.applied_labels = [int(v) for v in applied_labels]
        self.axis = axis

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != 1:
                raise ValueError(f"{key}: FillHolesSlicewised expects a class map with one channel, got {img.shape[0]}")
            arr = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img)[0]
            out = np.array(arr, copy=True)
            axis = self.axis % arr.ndim if self.axis < 0 else self.axis - 1
            moved, result = np.moveaxis(arr, axis, 0), np.moveaxis(out, axis, 0)
            for label in self.applied_labels:
                present = (moved == label).reshape(moved.shape[0], -1).any(axis=1)
                for k in np.flatnonzero(present):
                    filled = ndimage.binary_fill_holes(moved[k] == label)
                    result[k][filled & (moved[k] == 0)] = label
            if isinstance(img, torch.Tensor):
                d[key] = like(img, torch.as_tensor(out[None], device=img.device))
            else:
                d[key] = out[None]
        return d


class AdjacentSlicesd(MapTransform):
    """Give each axial slice its neighbours at fixed distances in mm as channels (2.5D input).

    A channel-first 3D image ``(1, X, Y, Z)`` becomes ``(channels, X, Y, Z)``: channel ``i`` holds, for
    every slice, the image ``(i - channels // 2) * distance`` mm away along ``axis``, linearly
    interpolated between the native slices (the slice spacing is read from the affine), the ends
    repeated. So a 1.25 mm and a 5 mm series give the network the same anatomy in its side channels.
    ``distance=None`` takes the direct neighbours whatever their spacing. ``channels=1`` returns the
    data unchanged.
    """

    def __init__(self, keys: KeysCollection = "image", channels: int = 1, distance: float | None = None, axis: int = -1) -> None:
        super().__init__(keys)
        if channels < 1 or channels % 2 == 0:
            raise ValueError(f"adjacent-slice input needs an odd number of channels (1, 3, 5 ...), got {channels}")
        if distance is not None and distance <= 0:
            raise ValueError(f"adjacent-slice distance must be positive (mm), got {distance}")
        self.context, self.distance, self.axis = channels // 2, distance, axis

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.context == 0:
            return d
        for key in self.key_iterator(d):
            img = d[key]
            if img.shape[0] != 1:
                raise ValueError(f"{key}: AdjacentSlicesd expects one channel, got {img.shape[0]}")
            axis = self.axis % (img.ndim - 1)  # spatial axis
            n = img.shape[axis + 1]
            step = 1.0 if self.distance is None else self.distance / float(voxel_spacing(img)[axis])
            vol = torch.as_tensor(img[0])
            chans = []
            for off in range(-self.context, self.context + 1):
                pos = torch.clamp(torch.arange(n, dtype=torch.float64) + off * step, 0, n - 1)
                lo = torch.floor(pos).long()
                hi = torch.clamp(lo + 1, max=n - 1)
                w = (pos - lo).to(vol.dtype if vol.is_floating_point() else torch.float32)
                a = torch.index_select(vol, axis, lo.to(vol.device))
                if torch.all(w == 0):
                    chans.append(a)
                    continue
                b = torch.index_select(vol, axis, hi.to(vol.device))
                shape = [1] * vol.ndim
                shape[axis] = n
                w = w.view(shape).to(vol.device)
                chans.append(a * (1 - w) + b * w)
            d[key] = like(img, torch.stack(chans))  # keeps the metadata and the record of applied transforms
        return d


class SimulateScannerd(MapTransform):
    """Re-image a loaded CT and its class map as another scanner would: the scanner-shift evaluation.

    Applied to the items whose ``condition_key`` equals ``apply_to`` (others pass unchanged), on
    the volume as loaded (voxel axes 0 and 1 in-plane, axis 2 across slices, as for a DICOM series):

    * slices averaged into slabs of ``slab_mm`` and pixels into ``pixel_mm`` squares (box averaging,
      what a thicker reconstruction and a coarser matrix do); an axis already as coarse is kept;
    * Gaussian noise of ``noise_hu`` HU (a lower dose), seeded by the patient for repeatable scores;
    * ``offset_hu`` added (another calibration or contrast timing).

    The class map (``keys[1]``) goes to the same grid by majority over each new voxel, so the scan is
    scored on its own grid. The affine is updated so that the new voxels cover the same body.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        slab_mm: float = 3.0,
        pixel_mm: float = 1.5,
        noise_hu: float = 20.0,
        offset_hu: float = 40.0,
        condition_key: str = "condition",
        apply_to: str = "shifted",
        num_classes: int | None = None,
        seed: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slab_mm, self.pixel_mm = float(slab_mm), float(pixel_mm)
        self.noise_hu, self.offset_hu = float(noise_hu), float(offset_hu)
        self.condition_key, self.apply_to = condition_key, apply_to
        self.num_classes, self.seed = num_classes, int(seed)

    def new_shape(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[int, int, int]:
        target = (self.pixel_mm, self.pixel_mm, self.slab_mm)
        return tuple(
            max(1, int(round(n * float(s) / t))) if t > float(s) else int(n) for n, s, t in zip(shape, spacing, target)
        )

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(self.condition_key) != self.apply_to:
            return d
        keys = [k for k in self.key_iterator(d)]
        image_key, label_keys = keys[0], keys[1:]
        img = d[image_key]
        spacing = voxel_spacing(img)
        shape = tuple(int(n) for n in img.shape[1:])
        new = self.new_shape(shape, spacing)
        factors = np.array(shape, dtype=np.float64) / np.array(new, dtype=np.float64)
        affine = np.asarray(img.affine.detach().cpu(), dtype=np.float64)
        scale = np.diag([*factors, 1.0])
        scale[:3, 3] = (factors - 1.0) / 2.0  # new voxel centres at the centres of the boxes they average
        new_affine = torch.as_tensor(affine @ scale)

        vol = torch.as_tensor(np.asarray(img.detach().cpu(), dtype=np.float32))
        out = torch.nn.functional.interpolate(vol[None], size=new, mode="area")[0]
        patient = str(d.get("patient", ""))
        rng = np.random.default_rng([self.seed, zlib.crc32(patient.encode())])
        if self.noise_hu > 0:
            out = out + torch.as_tensor(rng.normal(0.0, self.noise_hu, size=out.shape), dtype=out.dtype)
        out = out + self.offset_hu
        meta = {k: v for k, v in dict(img.meta).items() if k != "affine"}
        meta["spatial_shape"] = np.asarray(new)
        d[image_key] = MetaTensor(out, affine=new_affine, meta=meta)
        for key in label_keys:
            lab = d[key]
            classes = torch.as_tensor(np.asarray(lab.detach().cpu())[0]).long()
            n_cls = self.num_classes or int(classes.max()) + 1
            onehot = torch.nn.functional.one_hot(classes, n_cls).permute(3, 0, 1, 2).float()
            share = torch.nn.functional.interpolate(onehot[None], size=new, mode="area")[0]
            merged = share.argmax(0, keepdim=True).to(torch.uint8)
            lmeta = {k: v for k, v in (dict(lab.meta) if isinstance(lab, MetaTensor) else {}).items() if k != "affine"}
            lmeta["spatial_shape"] = np.asarray(new)
            d[key] = MetaTensor(merged, affine=new_affine.clone(), meta=lmeta)
        return d


class ForegroundProbabilitiesd(MapTransform):
    """Class probabilities without their background channel (``restore=False``), or back with it
    (``restore=True``: background = 1 - the sum of the others, clipped at 0).

    Use around ``Invertd``: after the inverse of a crop, the padded voxels are zero in every channel
    inverted; without the background channel that reads as "certainly background".
    """

    def __init__(self, keys: KeysCollection = "pred", restore: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.restore = restore

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            p = d[key]
            if self.restore:
                background = torch.clamp(1.0 - p.sum(dim=0, keepdim=True), min=0.0)
                out = torch.cat([torch.as_tensor(background), torch.as_tensor(p)], dim=0)
            else:
                out = torch.as_tensor(p)[1:]
            d[key] = like(p, out)
        return d
