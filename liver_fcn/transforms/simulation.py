"""The same patient as another scanner or another contrast phase would show it: for evaluation, and
(contrast phase) as a training augmentation."""

from __future__ import annotations

import math
import zlib
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandGaussianNoise, RandGaussianNoised, RandomizableTransform
from scipy import ndimage

from liver_fcn import CLASS_NAMES
from liver_fcn.transforms.utils import as_numpy, bounding_box, like, voxel_spacing

__all__ = [
    "RandContrastPhased",
    "RandGaussianNoiseTorchd",
    "SimulateContrastPhased",
    "SimulateScannerd",
    "TorchGaussianNoise",
    "UNENHANCED_HU",
    "class_map_by_majority",
    "coarser_grid",
    "reimage",
    "scale_enhancement",
    "scale_tissue_enhancement",
]


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

    def __str__(self) -> str:
        slabs, pixels = f"{self.slab_mm:g} mm slabs", f"{self.pixel_mm:g} mm pixels"
        return f"{slabs}, {pixels}, noise {self.noise_hu:g} HU, {self.offset_hu:+g} HU"

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(self.condition_key) != self.apply_to:
            return d
        keys = [k for k in self.key_iterator(d)]
        image_key, label_keys = keys[0], keys[1:]
        img = d[image_key]
        new, new_affine = coarser_grid(img.shape[1:], voxel_spacing(img), img.affine, self.pixel_mm, self.slab_mm)
        rng = np.random.default_rng([self.seed, zlib.crc32(str(d.get("patient", "")).encode())])
        out = reimage(as_numpy(img[0], np.float32), new, self.noise_hu, self.offset_hu, rng)
        d[image_key] = MetaTensor(out[None], affine=new_affine, meta=_grid_meta(img, new))
        for key in label_keys:
            merged = class_map_by_majority(as_numpy(d[key])[0], new, self.num_classes)
            d[key] = MetaTensor(merged[None], affine=new_affine.clone(), meta=_grid_meta(d[key], new))
        return d


def coarser_grid(
    shape: Sequence[int], spacing: Sequence[float], affine, pixel_mm: float, slab_mm: float
) -> tuple[tuple[int, ...], torch.Tensor]:
    """The shape and affine of a volume of ``shape`` and ``spacing`` (mm; axes 0 and 1 in-plane,
    axis 2 across slices) re-imaged with ``pixel_mm`` pixels and ``slab_mm`` slabs: an axis already
    as coarse is kept; the new voxels cover the same body, their centres at the centres of the boxes
    they average."""
    target = (pixel_mm, pixel_mm, slab_mm)
    new = tuple(
        max(1, int(round(int(n) * float(s) / t))) if t > float(s) else int(n) for n, s, t in zip(shape, spacing, target)
    )
    factors = np.array([int(n) for n in shape], dtype=np.float64) / np.array(new, dtype=np.float64)
    scale = np.diag([*factors, 1.0])
    scale[:3, 3] = (factors - 1.0) / 2.0
    return new, torch.as_tensor(as_numpy(affine, np.float64) @ scale)


def reimage(hu: np.ndarray, shape: Sequence[int], noise_hu: float, offset_hu: float, rng: np.random.Generator):
    """``hu`` (X, Y, Z) box-averaged onto ``shape`` (thicker slabs, coarser pixels), with Gaussian
    noise of ``noise_hu`` HU drawn from ``rng`` and ``offset_hu`` added: a float32 tensor."""
    out = torch.nn.functional.interpolate(torch.as_tensor(hu)[None, None], size=tuple(shape), mode="area")[0, 0]
    if noise_hu > 0:
        out = out + torch.as_tensor(rng.normal(0.0, noise_hu, size=out.shape), dtype=out.dtype)
    return out + offset_hu


def class_map_by_majority(classes: np.ndarray, shape: Sequence[int], num_classes: int | None = None) -> torch.Tensor:
    """The class map ``classes`` (X, Y, Z) on the coarser grid ``shape``: each new voxel takes the
    class that covers most of it (uint8 tensor)."""
    labels = torch.as_tensor(np.asarray(classes)).long()
    onehot = torch.nn.functional.one_hot(labels, num_classes or int(labels.max()) + 1).permute(3, 0, 1, 2).float()
    share = torch.nn.functional.interpolate(onehot[None], size=tuple(shape), mode="area")[0]
    return share.argmax(0).to(torch.uint8)


def _grid_meta(img, shape: Sequence[int]) -> dict:
    """``img``'s metadata (if any) for the same image on a grid of ``shape`` (the affine set apart)."""
    meta = {k: v for k, v in (dict(img.meta) if isinstance(img, MetaTensor) else {}).items() if k != "affine"}
    meta["spatial_shape"] = np.asarray(shape)
    return meta


#: unenhanced density (HU) of the organs whose enhancement the contrast-phase shift scales
UNENHANCED_HU = {"liver": 55.0, "kidney": 32.0, "spleen": 45.0}


def scale_enhancement(
    hu: np.ndarray,
    classes: np.ndarray,
    class_names: Sequence[str],
    keep: float | Mapping[str, float],
    spacing: Sequence[float],
    unenhanced: Mapping[str, float] = UNENHANCED_HU,
    edge_mm: float = 2.0,
) -> np.ndarray:
    """``hu`` with each organ's enhancement above its unenhanced density scaled by ``keep``.

    Inside an organ of ``class_names`` found in :data:`UNENHANCED_HU`, every voxel moves by
    ``(keep - 1) * (median - unenhanced)``: texture and noise stay, the organ's mean density moves
    toward an unenhanced scan (``keep`` 0: unenhanced, 1: unchanged, above 1: more enhanced).
    ``keep`` is one factor for all organs or one per organ name (organs not named are unchanged).
    The move fades over ``edge_mm`` at the organ's border so no artificial edge is drawn. Organs
    already below their unenhanced density are left as they are. ``classes`` is 2D or 3D with
    ``spacing`` (mm) per axis; ``hu`` has its shape, or leading channels before it (adjacent slices,
    each scaled by its own median, the organ located and its border measured once).
    """
    out = np.asarray(hu, dtype=np.float32).copy()
    channels = out.shape[: out.ndim - classes.ndim]  # leading axes (adjacent slices) share the class map
    sp = [float(s) for s in spacing]
    margin = [int(math.ceil(edge_mm / max(s, 1e-3))) + 1 for s in sp]
    for c, name in enumerate(class_names):
        factor = keep.get(name, 1.0) if isinstance(keep, Mapping) else keep
        if name not in unenhanced or factor == 1.0:
            continue
        mask = classes == c
        box = bounding_box(mask, margin)
        if box is None:
            continue
        # per channel: the organ's median above its unenhanced density (none where it is below)
        excess = np.maximum(np.median(out[..., mask], axis=-1) - float(unenhanced[name]), 0.0)
        if not np.any(excess > 0):
            continue
        distance = ndimage.distance_transform_edt(~mask[box], sampling=sp)  # mm outside the organ, 0 inside
        fade = np.clip(1.0 - distance / edge_mm, 0.0, 1.0)
        out[(..., *box)] += (factor - 1.0) * np.reshape(excess, channels + (1,) * classes.ndim) * fade
    return out


def scale_tissue_enhancement(
    hu: np.ndarray,
    keep: float,
    spacing: Sequence[float],
    exclude: np.ndarray | None = None,
    unenhanced: float = 45.0,
    soft_hu: Sequence[float] = (-30.0, 30.0, 250.0, 400.0),
    sigma_mm: float = 2.0,
    edge_mm: float = 2.0,
) -> np.ndarray:
    """``hu`` with the enhancement of unlabelled soft tissue (vessels, spleen, bowel wall, pancreas)
    scaled by ``keep``: what a contrast phase does to every tissue at once, not to the labelled
    organs alone.

    A voxel is soft tissue by its density: fully between the middle two ``soft_hu`` values, not at
    all below the first (fat, air) or above the last (cortical bone), linearly in between. The local
    mean density of the soft tissue around it (Gaussian of ``sigma_mm``, fat and bone left out of the
    average) above ``unenhanced`` HU is its enhancement; the voxel moves by ``keep - 1`` times that,
    weighted by how much soft tissue it is. So noise and texture stay, fat and bone stay, and no rim
    is drawn where tissue meets fat or bone. Voxels of ``exclude`` (a boolean map of ``hu``'s spatial
    shape: bone and the organs :func:`scale_enhancement` moves) are left alone, the move fading in
    over ``edge_mm`` beyond ``edge_mm`` from them. ``hu`` may have leading channels (adjacent
    slices), each on its own.
    """
    out = np.asarray(hu, dtype=np.float32).copy()
    sigma = [0.0] * (out.ndim - len(spacing)) + [sigma_mm / max(float(s), 1e-3) for s in spacing]
    a, b, c, d = (float(v) for v in soft_hu)
    soft = np.clip((out - a) / (b - a), 0.0, 1.0) * np.clip((d - out) / (d - c), 0.0, 1.0)
    weight = ndimage.gaussian_filter(soft, sigma, mode="nearest")
    mean = ndimage.gaussian_filter(out * soft, sigma, mode="nearest") / np.maximum(weight, 1e-3)
    move = np.clip(mean - unenhanced, 0.0, None) * soft
    if exclude is not None and np.any(exclude):
        distance = ndimage.distance_transform_edt(
            ~np.asarray(exclude, dtype=bool), sampling=[float(s) for s in spacing]
        )
        move *= np.clip(distance / edge_mm - 1.0, 0.0, 1.0)
    out += (float(keep) - 1.0) * move
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

    def __str__(self) -> str:
        return f"liver and kidney enhancement x {self.keep:g}"

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


class RandContrastPhased(RandomizableTransform, MapTransform):
    """Training augmentation: the slice as another contrast phase would show it.

    With probability ``prob``, each organ with an unenhanced density in :data:`UNENHANCED_HU`
    (liver, kidney) gets its own factor drawn from ``keep_range`` and its enhancement is scaled by it
    (:func:`scale_enhancement`, located by the class map ``keys[1]``): below 1 toward an unenhanced
    scan, above 1 toward a stronger (arterial or late) enhancement. The organs move independently,
    as they do between phases, so a model cannot learn an organ from its one-phase density. Every
    channel of ``keys[0]`` (adjacent slices) moves with the one class map; it runs on HU, before any
    windowing. Pixels whose class is not annotated are background in the class map and unchanged.

    With ``coherent_prob`` > 0, that share of the drawn slices changes phase as a whole, as a real
    scan of another phase does: one factor from ``keep_range`` for the slice, each organ's factor
    within ``coherent_jitter`` (relative) of it, and the unlabelled soft tissue's enhancement
    (vessels, spleen, bowel wall) scaled by the slice's factor too (:func:`scale_tissue_enhancement`;
    bone, labelled or not, unchanged). The other drawn slices move the organs alone, each by its own
    factor. ``coherent_prob`` 0 draws exactly what it drew before the option existed.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        prob: float = 0.3,
        keep_range: Sequence[float] = (0.2, 1.3),
        spacing: float | Sequence[float] = 1.0,
        class_names: Sequence[str] = CLASS_NAMES,
        unenhanced: Mapping[str, float] = UNENHANCED_HU,
        edge_mm: float = 2.0,
        coherent_prob: float = 0.0,
        coherent_jitter: float = 0.2,
        allow_missing_keys: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys, allow_missing_keys)
        low, high = (float(v) for v in keep_range)
        if not 0.0 <= low <= high:
            raise ValueError(f"keep_range must be two factors 0 <= low <= high, got {list(keep_range)}")
        self.keep_range = (low, high)
        self.spacing = spacing
        self.class_names, self.unenhanced, self.edge_mm = list(class_names), dict(unenhanced), float(edge_mm)
        self.organs = [name for name in self.class_names if name in self.unenhanced]  # those it moves
        # the classes a whole-slice draw leaves to scale_enhancement (the organs) or unchanged (bone)
        self.held = [c for c, name in enumerate(self.class_names) if name in self.organs or name == "bone"]
        if not 0.0 <= float(coherent_prob) <= 1.0 or not 0.0 <= float(coherent_jitter) < 1.0:
            raise ValueError(
                f"coherent_prob must be in [0, 1] and coherent_jitter in [0, 1), got {coherent_prob}, {coherent_jitter}"
            )
        self.coherent_prob, self.coherent_jitter = float(coherent_prob), float(coherent_jitter)
        self.keep: dict[str, float] = {}
        self.tissue_keep: float | None = None  # the slice's factor when the whole slice moves

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        self.tissue_keep = None
        if self.coherent_prob > 0 and self.R.rand() < self.coherent_prob:
            self.tissue_keep = float(self.R.uniform(*self.keep_range))
            j = self.coherent_jitter
            self.keep = {name: self.tissue_keep * float(self.R.uniform(1.0 - j, 1.0 + j)) for name in self.organs}
            return
        self.keep = {name: float(self.R.uniform(*self.keep_range)) for name in self.organs}

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        image_key, label_key = list(self.key_iterator(d))[:2]
        img, lab = d[image_key], d[label_key]
        hu, classes = as_numpy(img, np.float32), as_numpy(lab)[0]
        spacing = [float(s) for s in np.broadcast_to(np.asarray(self.spacing, dtype=float), (classes.ndim,))]
        new = scale_enhancement(hu, classes, self.class_names, self.keep, spacing, self.unenhanced, self.edge_mm)
        if self.tissue_keep is not None:
            new = scale_tissue_enhancement(
                new, self.tissue_keep, spacing, np.isin(classes, self.held), edge_mm=self.edge_mm
            )
        d[image_key] = like(img, torch.as_tensor(new, device=img.device)) if isinstance(img, torch.Tensor) else new
        return d


class TorchGaussianNoise(RandGaussianNoise):
    """MONAI's ``RandGaussianNoise``, its noise drawn by torch in float32 rather than by NumPy in
    float64 (a 3 x 256 x 256 slice: about 0.2 ms against 1.2 ms, a training batch's largest
    augmentation cost on the CPU). The draw is seeded from the transform's own random state, so
    ``set_random_state`` makes it reproducible as before; the values differ from MONAI's."""

    def randomize(self, img, mean: float | None = None) -> None:
        RandomizableTransform.randomize(self, None)
        if not self._do_transform:
            return None
        std = self.R.uniform(0, self.std) if self.sample_std else self.std
        generator = torch.Generator().manual_seed(int(self.R.randint(2**31)))
        noise = torch.randn(tuple(img.shape), generator=generator, dtype=torch.float32)
        self.noise = noise.mul_(float(std)).add_(float(self.mean if mean is None else mean))


class RandGaussianNoiseTorchd(RandGaussianNoised):
    """``RandGaussianNoised`` (same arguments, same draw per item) with :class:`TorchGaussianNoise`."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, mean: float = 0.0, std: float = 0.1, **kwargs) -> None:
        super().__init__(keys, prob=prob, mean=mean, std=std, **kwargs)
        noise = self.rand_gaussian_noise
        self.rand_gaussian_noise = TorchGaussianNoise(
            mean=noise.mean, std=noise.std, prob=1.0, dtype=noise.dtype, sample_std=noise.sample_std
        )
