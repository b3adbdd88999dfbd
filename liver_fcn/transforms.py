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
* :class:`InPlaneResampled` - in-plane resampling to a pixel spacing in mm, slices untouched, with
  PyTorch's 2D anti-aliasing when downsampling (MONAI's ``Spacingd`` has none, and ``Resized``'s is a
  3D Gaussian), slice chunk by slice chunk.
* :func:`class_map_on_input_grid` / :class:`ResampleToInputd` - network logits back onto the input's
  own grid as a uint8 class map, chunk by chunk, from the two affines; what ``Invertd`` would do with
  the full-resolution float probabilities of every class, without holding them.
* :class:`KeepLargestComponentsd` - MONAI's largest-connected-component step on each label's bounding
  box instead of the whole volume.
* :func:`body_mask` - the patient's body (largest air-separated region above a HU threshold), the
  ``select_fn`` of ``CropForegroundd`` for the body-centred field of view.
* :class:`FillHolesSlicewised` - hole filling on each axial slice, of background only: vessels inside
  the liver are open to the outside in 3D (no 3D hole) but enclosed in each slice.
* :class:`SimulateScannerd` - the same patient as another scanner would have imaged it (thicker
  slabs, coarser pixels, more noise, a HU offset), image and reference on the new grid, for the
  scanner-shift evaluation.
* :class:`SimulateContrastPhased` - the same patient in another contrast phase: the enhancement of
  the liver and kidneys scaled toward their unenhanced densities, for the contrast-phase evaluation.
* :func:`grid_size` - the pixel count of a field of view in mm at a pixel spacing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import math
import zlib

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage, MapTransform
from scipy import ndimage

from liver_fcn import CLASS_NAMES
from liver_fcn.data.dicom import CTSeriesReader
from liver_fcn.errors import InputError

__all__ = [
    "AdjacentSlicesd",
    "CountComponentsd",
    "EncodePartialLabeld",
    "FillHolesSlicewised",
    "InPlaneResampled",
    "KeepLargestComponentsd",
    "LoadCTd",
    "LoadOrganMasksd",
    "ResampleToInputd",
    "SimulateContrastPhased",
    "SimulateScannerd",
    "as_numpy",
    "body_mask",
    "class_map_array",
    "class_map_on_input_grid",
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
        img = loader(p, reader=reader)
    except InputError:
        raise
    except Exception as e:  # a corrupt NIfTI, an undecodable slice ...
        raise InputError(f"{p}: cannot be read ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if img.is_floating_point() and not bool(torch.isfinite(img).all()):
        bad = int((~torch.isfinite(img)).sum())
        raise InputError(f"{p}: {bad} voxel{'s' if bad != 1 else ''} not finite (NaN or infinity); a CT holds numbers of HU")
    return img


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
        class_names: Sequence[str] = CLASS_NAMES,
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


def as_numpy(x, dtype=None) -> np.ndarray:
    """A tensor (on any device) or an array as a NumPy array, without a copy where none is needed."""
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=dtype)


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


def voxel_spacing(img) -> np.ndarray:
    """Voxel spacing in mm along each spatial axis, from a MetaTensor's affine (ones without one)."""
    affine = getattr(img, "affine", None)
    n = img.ndim - 1
    if affine is None:
        return np.ones(n)
    a = as_numpy(affine, np.float64)
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
    arr = as_numpy(image)
    above = (arr > threshold).any(axis=0)  # over channels
    labels, n = ndimage.label(above)
    if n == 0:
        return torch.zeros(arr.shape, dtype=torch.bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    return torch.as_tensor(np.broadcast_to(body, arr.shape).copy())


class InPlaneResampled(MapTransform):
    """Resample the axial plane to ``pixel_spacing`` mm, the slices untouched.

    The first two spatial axes (in-plane after RAS orientation) are resampled slice by slice with
    PyTorch's 2D interpolation: anti-aliased bilinear when downsampling (a triangle filter as wide as
    the output pixel, so nothing aliases and nothing is spent on 3D), plain bilinear when upsampling,
    ``nearest-exact`` for the keys whose mode is ``"nearest"`` (class maps). The output pixel ``j``
    is centred on input pixel ``(j + 0.5) * pixel_spacing / spacing - 0.5``; the affine is updated to
    match, so :class:`ResampleToInputd` can bring predictions back from the affines alone. Slices
    are processed ``chunk`` at a time on the image's own device, so the float copy never exceeds a
    chunk. An axis already within 0.1 % of the target spacing is left as it is.
    """

    def __init__(
        self, keys: KeysCollection, pixel_spacing: float, mode: Sequence[str] | str = "bilinear", chunk: int = 32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pixel_spacing = float(pixel_spacing)
        modes = [mode] * len(self.keys) if isinstance(mode, str) else list(mode)
        if len(modes) != len(self.keys) or any(m not in ("bilinear", "nearest") for m in modes):
            raise ValueError(f"mode must be 'bilinear' or 'nearest' per key, got {mode!r}")
        self.modes = dict(zip(self.keys, modes))
        self.chunk = int(chunk)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resample(d[key], self.modes[key])
        return d

    def resample(self, img: torch.Tensor, mode: str) -> torch.Tensor:
        if img.ndim != 4:
            raise ValueError(f"InPlaneResampled expects a channel-first 3D image (C, X, Y, Z), got shape {tuple(img.shape)}")
        spacing = voxel_spacing(img)[:2]
        # output pixels per input pixel, a hair above the exact ratio so that a whole number of output
        # pixels (60 x 0.6 / 1.5 = 24) is not lost to rounding (PyTorch floors n * scale in double)
        scale = [float(s) / self.pixel_spacing * (1.0 + 1e-9) for s in spacing]
        if all(abs(f - 1.0) < 1e-3 for f in scale):
            return img
        c, nx, ny, nz = img.shape
        size = [int(math.floor(n * f)) for n, f in zip((nx, ny), scale)]
        data = torch.as_tensor(img)
        out = torch.empty((c, size[0], size[1], nz), dtype=data.dtype, device=data.device)
        downsampling = min(scale) < 1.0
        for z0 in range(0, nz, self.chunk):
            part = data[..., z0 : z0 + self.chunk].permute(3, 0, 1, 2).float()  # (z, C, X, Y)
            if mode == "nearest":
                res = F.interpolate(part, scale_factor=scale, mode="nearest-exact", recompute_scale_factor=False)
            else:
                res = F.interpolate(
                    part, scale_factor=scale, mode="bilinear", align_corners=False, antialias=downsampling,
                    recompute_scale_factor=False,
                )
            out[..., z0 : z0 + self.chunk] = res.permute(1, 2, 3, 0).to(out.dtype)
        # output voxel j sits at input voxel (j + 0.5) / f - 0.5 along each in-plane axis
        to_input = torch.eye(4, dtype=torch.float64)
        for a, f in enumerate(scale):
            to_input[a, a] = 1.0 / f
            to_input[a, 3] = 0.5 / f - 0.5
        if not isinstance(img, MetaTensor):
            return out
        affine = img.affine.to(torch.float64) @ to_input
        meta = {k: v for k, v in img.meta.items() if k != "affine"}
        meta["spatial_shape"] = np.asarray(out.shape[1:])
        return MetaTensor(out, affine=affine, meta=meta, applied_operations=list(img.applied_operations))


def _axis_map(pre_affine, in_affine, tol: float = 1e-3):
    """For each axis of the network's grid: the input axis it runs along, and the scale and offset
    mapping input voxel indices onto it (``pre = scale * input + offset``), from the two affines."""
    pre, inp = as_numpy(pre_affine, np.float64), as_numpy(in_affine, np.float64)
    m = np.linalg.solve(pre, inp)  # input voxel -> network-grid voxel
    axes, scales, offsets = [], [], []
    for a in range(3):
        row = m[a, :3]
        i = int(np.argmax(np.abs(row)))
        if abs(row[i]) < 1e-9 or np.any(np.abs(np.delete(row, i)) > tol * abs(row[i])):
            raise ValueError("the network's grid is not an axis-aligned resampling of the input grid")
        axes.append(i)
        scales.append(float(row[i]))
        offsets.append(float(m[a, 3]))
    if sorted(axes) != [0, 1, 2]:
        raise ValueError("the network's grid is not an axis-aligned resampling of the input grid")
    return axes, scales, offsets


def _lerp_along(t: torch.Tensor, coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of ``t`` along ``dim`` at fractional indices ``coords``; zero outside."""
    size = t.shape[dim]
    valid = (coords > -0.5) & (coords < size - 0.5)  # half a voxel beyond the end voxels: edge value
    c = coords.clamp(0, size - 1)
    lo = torch.floor(c).long()
    hi = (lo + 1).clamp(max=size - 1)
    w = (c - lo).to(t.dtype)
    shape = [1] * t.ndim
    shape[dim] = -1
    a, b = t.index_select(dim, lo.to(t.device)), t.index_select(dim, hi.to(t.device))
    out = torch.lerp(a, b, w.view(shape).to(t.device))
    if bool(valid.all()):
        return out
    return out * valid.view(shape).to(device=t.device, dtype=t.dtype)


def _argmax_with_background(prob: torch.Tensor) -> torch.Tensor:
    """uint8 argmax over [1 - sum(prob), *prob] along dim 0, by running comparisons (an argmax over
    the leading dimension of a large tensor is many times slower on the CPU)."""
    best = 1.0 - prob.sum(dim=0)
    labels = torch.zeros(prob.shape[1:], dtype=torch.uint8, device=prob.device)
    for c in range(prob.shape[0]):
        better = prob[c] > best
        labels.masked_fill_(better, c + 1)
        best = torch.maximum(best, prob[c])
    return labels


def class_map_on_input_grid(
    logits: torch.Tensor, pre_affine, in_affine, in_shape: Sequence[int], chunk: int = 16, entropy: dict | None = None,
) -> torch.Tensor:
    """The class map (uint8, ``in_shape``) of network logits ``(C, X', Y', Z')``, brought back onto
    the input's grid from the two affines, without ever holding the full-resolution probabilities.

    Chunk by chunk along the slice axis: softmax, the foreground probabilities linearly
    interpolated onto the input voxels (background is one minus their sum, so whatever lies outside
    the network's grid is background), argmax. The network's grid must be an axis-aligned
    resampling of the input grid (orientation, in-plane spacing, crops and pads), as the pipeline's
    geometry makes it; in-plane work is confined to the part of the input that the grid covers.
    Runs on the logits' device.

    ``entropy``: a dict that receives, for each class c >= 1 found, the mean normalised entropy of the
    class probabilities (0: certain, 1: uniform over the classes) over the voxels labelled c - how
    sure the network was inside what it segmented.
    """
    axes, scales, offsets = _axis_map(pre_affine, in_affine)
    n_classes = logits.shape[0]
    h_sum = torch.zeros(n_classes, dtype=torch.float64, device=logits.device)
    h_count = torch.zeros(n_classes, dtype=torch.float64, device=logits.device)
    out_shape = [int(in_shape[i]) for i in axes]  # the input grid, in the network grid's axis order
    dev = logits.device
    coords = [torch.arange(n, dtype=torch.float64) * s + o for n, s, o in zip(out_shape, scales, offsets)]
    out = torch.zeros(out_shape, dtype=torch.uint8, device=dev)
    spans = []
    for a in range(2):  # in-plane: the input rows and columns the network's grid covers
        inside = torch.nonzero((coords[a] > -0.5) & (coords[a] < logits.shape[a + 1] - 0.5)).flatten()
        spans.append((int(inside.min()), int(inside.max()) + 1) if inside.numel() else (0, 0))
    (x0, x1), (y0, y1) = spans
    zc = coords[2]
    if x1 > x0 and y1 > y0:
        # in-plane sampling grid for grid_sample (align_corners: -1 and 1 are the end voxels' centres;
        # "border": the half voxel beyond them takes the end value), the same for every slice
        gx = (coords[0][x0:x1] / max(logits.shape[1] - 1, 1) * 2 - 1).float()
        gy = (coords[1][y0:y1] / max(logits.shape[2] - 1, 1) * 2 - 1).float()
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="xy"), dim=-1)[None].to(dev)  # (1, x, y, 2): (W=y, H=x)
        for k0 in range(0, out_shape[2], chunk):
            zs = zc[k0 : k0 + chunk]
            if not bool(((zs > -0.5) & (zs < logits.shape[3] - 0.5)).any()):
                continue
            lo = int(torch.floor(zs.clamp(0, logits.shape[3] - 1)).min())
            hi = min(int(torch.ceil(zs.clamp(0, logits.shape[3] - 1)).max()) + 1, logits.shape[3])
            prob = torch.softmax(logits[..., lo:hi].float(), dim=0)[1:]  # foreground, (C-1, X', Y', z)
            prob = _lerp_along(prob, zs - lo, 3)  # (C-1, X', Y', k) on the input's slices
            prob = prob.permute(3, 0, 1, 2).contiguous()  # slices as the batch of a 2D resampling
            prob = F.grid_sample(prob, grid.expand(prob.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True)
            labels = _argmax_with_background(prob.transpose(0, 1))  # (k, x, y)
            out[x0:x1, y0:y1, k0 : k0 + chunk] = labels.permute(1, 2, 0)
            if entropy is not None:
                fg = prob.transpose(0, 1).clamp_min(0)  # (C-1, k, x, y)
                full = torch.cat([(1.0 - fg.sum(0, keepdim=True)).clamp_min(0), fg])
                h = -(full * torch.log(full.clamp_min(1e-12))).sum(0) / math.log(n_classes)
                lab = labels.long().flatten()
                h_sum.index_add_(0, lab, h.flatten().double())
                h_count.index_add_(0, lab, torch.ones_like(lab, dtype=torch.float64))
    if entropy is not None:
        for c in range(1, n_classes):
            if h_count[c] > 0:
                entropy[c] = float(h_sum[c] / h_count[c])
    inverse = [axes.index(i) for i in range(3)]
    return out.permute(*inverse).contiguous()


class ResampleToInputd(MapTransform):
    """Network logits on the network's grid -> the uint8 class map on the input's own grid.

    ``keys`` hold the logits ``(C, X', Y', Z')``; ``image_key`` the network's input (its affine is the
    network grid's); ``ref_key`` the image as loaded (its affine and shape are the input grid's).
    The result is a ``(1, X, Y, Z)`` uint8 MetaTensor on the CPU with the input's affine, made chunk by
    chunk by :func:`class_map_on_input_grid` on the logits' device (the GPU's, on a GPU). It replaces softmax + ``Invertd`` +
    argmax, which hold the full-resolution float probabilities of every class.
    """

    def __init__(
        self, keys: KeysCollection = "pred", image_key: str = "image", ref_key: str = "ct", chunk: int = 16,
        entropy_key: str | None = "entropy", allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.ref_key, self.chunk, self.entropy_key = image_key, ref_key, int(chunk), entropy_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        ref, img = d[self.ref_key], d[self.image_key]
        for key in self.key_iterator(d):
            entropy: dict | None = {} if self.entropy_key else None
            labels = class_map_on_input_grid(d[key], img.affine, ref.affine, ref.shape[1:], self.chunk, entropy)
            if self.entropy_key:
                d[self.entropy_key] = entropy  # {class index: mean normalised entropy inside it}
            meta = {k: v for k, v in ref.meta.items() if k != "affine"}
            # the uint8 map goes to the CPU for the post-processing (connected components, holes)
            d[key] = MetaTensor(labels[None].cpu(), affine=ref.affine.clone(), meta=meta)
        return d


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
        self, keys: KeysCollection, applied_labels: Sequence[int] = (1,), num_components: int = 1,
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

    def __init__(self, keys: KeysCollection = "pred", label: int = 1, min_ml: float = 20.0, out_key: str = "components") -> None:
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
        self, keys: KeysCollection, applied_labels: Sequence[int] = (1,), axis: int = -1, allow_missing_keys: bool = False
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


#: unenhanced density (HU) of the organs whose enhancement the contrast-phase shift scales
UNENHANCED_HU = {"liver": 55.0, "kidney": 32.0, "spleen": 45.0}


def scale_enhancement(
    hu: np.ndarray, classes: np.ndarray, class_names: Sequence[str], keep: float, spacing: Sequence[float],
    unenhanced: Mapping[str, float] = UNENHANCED_HU, edge_mm: float = 2.0,
) -> np.ndarray:
    """``hu`` with each organ's enhancement above its unenhanced density scaled by ``keep``.

    Inside an organ of ``class_names`` found in :data:`UNENHANCED_HU`, every voxel moves by
    ``(keep - 1) * (median - unenhanced)``: texture and noise stay, the organ's mean density moves
    toward an unenhanced scan (``keep`` 0: unenhanced, 1: unchanged). The move fades over ``edge_mm``
    at the organ's border so no artificial edge is drawn. Organs already below their unenhanced
    density are left as they are.
    """
    out = np.asarray(hu, dtype=np.float32).copy()
    sp = [float(s) for s in spacing]
    margin = [int(math.ceil(edge_mm / max(s, 1e-3))) + 1 for s in sp]
    for c, name in enumerate(class_names):
        if name not in unenhanced:
            continue
        mask = classes == c
        if not mask.any():
            continue
        excess = float(np.median(out[mask])) - float(unenhanced[name])
        if excess <= 0:
            continue
        idx = np.argwhere(mask)
        box = tuple(slice(max(0, lo - m), hi + m + 1) for lo, hi, m in zip(idx.min(0), idx.max(0), margin))
        distance = ndimage.distance_transform_edt(~mask[box], sampling=sp)  # mm outside the organ, 0 inside
        out[box] += (keep - 1.0) * excess * np.clip(1.0 - distance / edge_mm, 0.0, 1.0)
    return out


class SimulateContrastPhased(MapTransform):
    """Re-image a loaded CT in another contrast phase: the contrast-phase evaluation.

    Applied to the items whose ``condition_key`` equals ``apply_to`` (others pass unchanged): the
    liver's and kidneys' enhancement is scaled by ``keep`` toward their unenhanced densities
    (:func:`scale_enhancement`, located by the reference class map ``keys[1]``, which is not
    changed). What it measures is a model's dependence on one contrast phase; vessels, spleen
    without masks and the rest of the scan keep their contrast.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        class_names: Sequence[str] = CLASS_NAMES,
        keep: float = 0.3,
        condition_key: str = "condition",
        apply_to: str = "phase",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.class_names, self.keep = list(class_names), float(keep)
        self.condition_key, self.apply_to = condition_key, apply_to

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(self.condition_key) != self.apply_to:
            return d
        image_key, label_key = list(self.key_iterator(d))[:2]
        img, lab = d[image_key], d[label_key]
        hu = np.asarray(img.detach().cpu(), dtype=np.float32)[0]
        classes = np.asarray(lab.detach().cpu())[0]
        new = scale_enhancement(hu, classes, self.class_names, self.keep, voxel_spacing(img))
        d[image_key] = MetaTensor(torch.as_tensor(new)[None], affine=img.affine.clone(), meta=dict(img.meta))
        return d
