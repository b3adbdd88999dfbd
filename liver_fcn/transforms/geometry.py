"""The network's grid: field of view in pixels, the body's region, in-plane resampling, 2.5D context."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Rand2DElasticd, RandomizableTransform
from monai.utils import convert_to_tensor, ensure_tuple_rep
from scipy import ndimage

from liver_fcn.transforms.utils import as_numpy, like, voxel_spacing

__all__ = [
    "AdjacentSlicesd",
    "ElasticWhenDrawnd",
    "InPlaneResampled",
    "RandInPlaneAffined",
    "adjacent_slices",
    "body_mask",
    "grid_size",
    "inplane_affine",
    "inplane_affine_matrix",
]


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
        self,
        keys: KeysCollection,
        pixel_spacing: float,
        mode: Sequence[str] | str = "bilinear",
        chunk: int = 32,
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
            raise ValueError(
                f"InPlaneResampled expects a channel-first 3D image (C, X, Y, Z), got shape {tuple(img.shape)}"
            )
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
            # (z, C, X, Y), copied contiguous: PyTorch's 2D interpolation reads it a quarter faster
            part = data[..., z0 : z0 + self.chunk].permute(3, 0, 1, 2).float().contiguous()
            if mode == "nearest":
                res = F.interpolate(part, scale_factor=scale, mode="nearest-exact", recompute_scale_factor=False)
            else:
                res = F.interpolate(
                    part,
                    scale_factor=scale,
                    mode="bilinear",
                    align_corners=False,
                    antialias=downsampling,
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


def adjacent_slices(vol: torch.Tensor, context: int, step: float = 1.0, axis: int = -1) -> torch.Tensor:
    """``(2 * context + 1, *vol.shape)``: channel ``i`` holds, for every slice of ``vol`` along ``axis``,
    the volume ``(i - context) * step`` slices away, linearly interpolated, the ends repeated."""
    axis = axis % vol.ndim
    n = vol.shape[axis]
    chans = []
    for off in range(-context, context + 1):
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
    return torch.stack(chans)


class AdjacentSlicesd(MapTransform):
    """Give each axial slice its neighbours at fixed distances in mm as channels (2.5D input).

    A channel-first 3D image ``(1, X, Y, Z)`` becomes ``(channels, X, Y, Z)``: channel ``i`` holds, for
    every slice, the image ``(i - channels // 2) * distance`` mm away along ``axis``, linearly
    interpolated between the native slices (the slice spacing is read from the affine), the ends
    repeated. So a 1.25 mm and a 5 mm series give the network the same anatomy in its side channels.
    ``distance=None`` takes the direct neighbours whatever their spacing. ``channels=1`` returns the
    data unchanged.
    """

    def __init__(
        self, keys: KeysCollection = "image", channels: int = 1, distance: float | None = None, axis: int = -1
    ) -> None:
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
            step = 1.0 if self.distance is None else self.distance / float(voxel_spacing(img)[axis])
            d[key] = like(img, adjacent_slices(torch.as_tensor(img[0]), self.context, step, axis))
        return d


class ElasticWhenDrawnd(Rand2DElasticd):
    """MONAI's ``Rand2DElasticd`` that leaves a slice alone when the deformation is not drawn.

    MONAI's draws a full-size random offset field and resamples every slice, on an identity grid
    when the deformation is not drawn (at ``prob=0`` too): on the CPU recipe that was 0.11 s of the
    0.26 s of augmentation a batch of 16 slices costs. The slices it deforms are deformed as MONAI's
    are (same parameters, same code); its random stream draws the field only for those.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._drawn = False

    def randomize(self, data=None) -> None:
        if not self._drawn:  # drawn once a call, before MONAI's __call__ would draw again
            super().randomize(data)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.first_key(d) == ():
            return super().__call__(d)
        self.randomize(None)
        if not self._do_transform:
            return d
        self._drawn = True
        try:
            return super().__call__(d)
        finally:
            self._drawn = False


def inplane_affine_matrix(angle: float = 0.0, zoom: float = 1.0, shift: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """The 3 x 3 map, in pixels about the slice's centre (row, column), from an output pixel to the
    input position it shows, for MONAI's ``Rotate(angle)`` (radians), then ``Zoom(zoom)`` (above 1
    enlarges; ``keep_size``), then ``Affine(translate_params=shift)`` (pixels), composed:
    ``x = R(angle) (y + shift) / zoom``."""
    if zoom <= 0:
        raise ValueError(f"zoom must be positive, got {zoom}")
    c, s = math.cos(angle), math.sin(angle)
    m = np.eye(3)
    m[:2, :2] = np.array([[c, -s], [s, c]]) / zoom
    m[:2, 2] = m[:2, :2] @ np.asarray(shift, dtype=float)
    return m


def inplane_affine(img: torch.Tensor, matrix: np.ndarray, mode: str = "bilinear") -> torch.Tensor:
    """``img`` (channels, rows, columns) resampled once through ``matrix`` (from
    :func:`inplane_affine_matrix`): each output pixel takes the input at the mapped position, by
    ``mode`` (``bilinear`` or ``nearest``), zero outside the input. A batch ``(B, channels, rows,
    columns)`` takes one matrix a sample, ``(B, 3, 3)``. Returns a plain tensor of the input's dtype
    (a class map sampled ``nearest`` keeps its values)."""
    data = convert_to_tensor(img, track_meta=False)
    matrices = np.asarray(matrix, dtype=float)
    batched = matrices.ndim == 3
    if batched != (data.ndim == 4):
        raise ValueError(f"a {data.ndim}D input takes {'one matrix a sample' if data.ndim == 4 else 'one matrix'}")
    work = data if batched else data[None]
    matrices = matrices if batched else matrices[None]
    rows, cols = data.shape[-2:]
    # grid_sample's normalised coordinates (x = column, y = row; align_corners=False): u pixels from
    # the centre is 2 u / n, so theta = D P A P D^-1 with P swapping rows and columns
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    scale = np.diag([2.0 / cols, 2.0 / rows])
    theta = np.empty((len(matrices), 2, 3))
    theta[:, :, :2] = scale @ swap @ matrices[:, :2, :2] @ swap @ np.linalg.inv(scale)
    theta[:, :, 2] = (scale @ swap @ matrices[:, :2, 2:])[..., 0]
    work = work.float() if work.dtype != torch.float32 else work
    theta_t = torch.as_tensor(theta, dtype=torch.float32, device=data.device)
    grid = F.affine_grid(theta_t, list(work.shape), align_corners=False)
    out = F.grid_sample(work, grid, mode=mode, padding_mode="zeros", align_corners=False)
    out = out if batched else out[0]
    return out.to(data.dtype) if out.dtype != data.dtype else out


class RandInPlaneAffined(RandomizableTransform, MapTransform):
    """In-plane rotation, zoom and shift of a 2D slice in one resampling.

    Each part is drawn with its own probability, as MONAI's ``RandRotated`` (``range_x``),
    ``RandZoomd`` (one factor for both axes, ``keep_size``) and ``RandAffined`` (``translate_range``)
    draw them one after the other - an angle uniform in +-``rotate_range`` radians, a zoom factor
    uniform in ``zoom_range``, a shift uniform in +-``translate_range`` pixels along each axis - but
    the slice is resampled once through the composed map (:func:`inplane_affine_matrix`) instead of
    once a part: a third of the time for a slice that draws all three, and one interpolation's blur
    instead of up to three. A slice that draws none is returned as it is. ``mode`` is per key
    (``bilinear`` for the image, ``nearest`` for the class map); outside the slice is zero.
    """

    def __init__(
        self,
        keys: KeysCollection,
        rotate_prob: float = 0.0,
        rotate_range: float = 0.0,
        zoom_prob: float = 0.0,
        zoom_range: Sequence[float] = (1.0, 1.0),
        translate_prob: float = 0.0,
        translate_range: float = 0.0,
        mode: str | Sequence[str] = ("bilinear", "nearest"),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        for name, p in (("rotate_prob", rotate_prob), ("zoom_prob", zoom_prob), ("translate_prob", translate_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        low, high = (float(v) for v in zoom_range)
        if not 0.0 < low <= high:
            raise ValueError(f"zoom_range must be two factors 0 < low <= high, got {list(zoom_range)}")
        self.rotate_prob, self.rotate_range = float(rotate_prob), abs(float(rotate_range))
        self.zoom_prob, self.zoom_range = float(zoom_prob), (low, high)
        self.translate_prob, self.translate_range = float(translate_prob), abs(float(translate_range))
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.matrix: np.ndarray | None = None

    def randomize(self, data: object = None) -> None:
        angle, zoom, shift = 0.0, 1.0, (0.0, 0.0)
        drawn = False
        if self.R.rand() < self.rotate_prob:
            angle, drawn = float(self.R.uniform(-self.rotate_range, self.rotate_range)), True
        if self.R.rand() < self.zoom_prob:
            zoom, drawn = float(self.R.uniform(*self.zoom_range)), True
        if self.R.rand() < self.translate_prob:
            shift, drawn = tuple(float(v) for v in self.R.uniform(-self.translate_range, self.translate_range, 2)), True
        self.matrix = inplane_affine_matrix(angle, zoom, shift) if drawn else None

    def augmentation_parts(self) -> dict[str, tuple[float, object]]:
        """The parts as the run's augmentation summary names them: probability and magnitude."""
        return {
            "rotate": (self.rotate_prob, round(math.degrees(self.rotate_range), 6)),
            "zoom": (self.zoom_prob, list(self.zoom_range)),
            "translate": (self.translate_prob, f"{self.translate_range:g} px"),
        }

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if self.matrix is None:
            return d
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = like(d[key], inplane_affine(d[key], self.matrix, mode))
        return d
