"""Training CT volumes synthesised from real organ masks (``liver-fcn synth``).

3D-IRCADb-01 publishes the organ masks of every patient; where a patient's CT cannot be had, its
masks still carry real anatomy in millimetres: the body outline (``skin``), the liver with its
tumours and vessels, the skeleton, often the kidneys, sometimes spleen, lungs and stomach. This
module paints a CT from such a label map with randomised but physical values, in the spirit of
SynthSeg's domain randomisation (Billot et al., MedIA 2023): each rendering draws new tissue
densities (contrast phases from unenhanced to portal venous), a new fat / soft-tissue mixture and
subcutaneous fat layer inside the body, distractor blobs of liver-like density, gas, a cortical
rim and trabecular core for bone, partial-volume blur, and correlated noise of a random dose. The
network then learns the liver from its shape and its neighbours as much as from its density.

Output: a folder with one sub-folder per rendering (``ct.nii.gz`` int16 HU and one binary
``<class>.nii.gz`` per annotated class, on the masks' own grid) and a ``datalist.json`` whose
``training`` split lists them in the format of ``liver-fcn prepare`` (``masks``, ``annotated``),
with a ``sampling_weight`` per volume for :class:`~liver_fcn.data.SliceDataset`. Everything is
checked before anything is written; each rendering is written through a staging folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from liver_fcn.data.archive import check_zip, safe_extract
from liver_fcn.data.ct import load_ct
from liver_fcn.data.ircadb import PATIENT_RE, _organ_folders, _resolve_classes, load_class_mapping
from liver_fcn.errors import InputError
from liver_fcn.outputs import write_json_atomic

__all__ = ["find_mask_patients", "render_ct", "synthesize"]

#: organ folder name (lower case, prefix) -> tissue kind painted for it; the first matching prefix wins
TISSUES: list[tuple[str, str]] = [
    ("livertumor", "lesion"),
    ("metasta", "lesion"),
    ("liverkyst", "cyst"),
    ("livercyst", "cyst"),
    ("liver", "liver"),
    ("portalvein", "vein"),
    ("venacava", "vein"),
    ("venoussystem", "vein"),
    ("artery", "artery"),
    ("bone", "bone"),
    ("kidney", "kidney"),
    ("leftkidney", "kidney"),
    ("rightkidney", "kidney"),
    ("spleen", "spleen"),
    ("lung", "lung"),
    ("leftlung", "lung"),
    ("rightlung", "lung"),
    ("stomach", "stomach"),
    ("gallbladder", "fluid"),
    ("biliary", "fluid"),
    ("pancreas", "soft"),
    ("surrenal", "soft"),
    ("stone", "calcium"),
    ("metal", "metal"),
]
#: contrast phases a rendering draws from (kidney and vessel densities follow them)
PHASES = ("unenhanced", "arterial", "portal", "excretory")
#: painting order: later kinds win where masks overlap (vessels and lesions inside the liver)
ORDER = [
    "soft",
    "lung",
    "stomach",
    "spleen",
    "kidney",
    "liver",
    "vein",
    "artery",
    "fluid",
    "cyst",
    "lesion",
    "bone",
    "calcium",
    "metal",
]


def _tissue(name: str) -> str | None:
    n = name.lower()
    if n == "skin":
        return None
    for prefix, kind in TISSUES:
        if n.startswith(prefix) or prefix in n:
            return kind
    return None


def find_mask_patients(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """``[(patient, MASKS_DICOM zip or folder)]`` under ``root`` (3Dircadb1.N folders)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: masks folder does not exist")
    out = []
    for p in sorted(root.iterdir(), key=lambda q: (len(q.name), q.name)):
        if not (p.is_dir() and PATIENT_RE.match(p.name)):
            continue
        if (p / "MASKS_DICOM").is_dir():
            out.append((p.name, p / "MASKS_DICOM"))
        elif (p / "MASKS_DICOM.zip").is_file():
            out.append((p.name, p / "MASKS_DICOM.zip"))
        else:
            raise InputError(f"{p}: no MASKS_DICOM.zip or MASKS_DICOM folder")
    if not out:
        raise InputError(f"{root}: no 3Dircadb1.N folders with MASKS_DICOM found")
    return out


def _linear_weights(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) weights of linear interpolation from n_in to n_out samples, end points aligned."""
    w = torch.zeros(n_out, n_in)
    if n_in == 1:
        return w + 1.0
    pos = torch.linspace(0, n_in - 1, n_out, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=n_in - 2)
    frac = (pos - lo).float()
    rows = torch.arange(n_out)
    w[rows, lo] = 1 - frac
    w[rows, lo + 1] = frac
    return w


def _upsample(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Trilinear interpolation (end points aligned) of a small array onto ``shape``, one axis at a time
    as three matrix products: the last one writes the full volume once (about 4 times faster than
    ``torch.nn.functional.interpolate`` at 512 x 512 x 139)."""
    t = torch.as_tensor(np.ascontiguousarray(arr, dtype=np.float32))
    (nx, ny, nz), (cx, cy, _) = (int(n) for n in shape), t.shape
    t = t @ _linear_weights(nz, t.shape[2]).T  # (cx, cy, nz)
    t = torch.einsum("yj,ijz->iyz", _linear_weights(ny, cy), t)  # (cx, ny, nz)
    return (_linear_weights(nx, cx) @ t.reshape(cx, ny * nz)).reshape(nx, ny, nz).numpy()


def _smooth_field(
    rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float], scale_mm: float
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with a correlation length of about ``scale_mm``,
    drawn on a coarse grid and interpolated (cheap at 512 x 512 x N)."""
    step = [max(1, int(scale_mm / (2 * s))) for s in spacing]
    coarse_shape = [max(2, int(np.ceil(n / k)) + 1) for n, k in zip(shape, step)]
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 1.0, mode="wrap")
    coarse -= coarse.mean()  # normalised on the coarse grid: interpolation keeps the mean and about the std
    coarse /= coarse.std() + 1e-6
    return _upsample(coarse, shape)


def _union(masks, shape: Sequence[int]) -> np.ndarray:
    """The voxel-wise OR of boolean masks of ``shape`` (in place, without stacking them)."""
    out = np.zeros(tuple(shape), dtype=bool)
    for m in masks:
        out |= m
    return out


def _depth_below_skin(body: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """In-plane distance (mm) from each body voxel to the skin, slice by slice, computed on a grid
    of about 2 mm and interpolated (the fat and muscle layers it places are smooth)."""
    k = max(1, int(2.0 / max(float(spacing[0]), 1e-3)))
    small = body[::k, ::k]
    depth = np.empty(small.shape, dtype=np.float32)
    for z in range(small.shape[2]):
        depth[..., z] = ndimage.distance_transform_edt(small[..., z], sampling=(k * spacing[0], k * spacing[1]))
    return _upsample(depth, body.shape)


def render_ct(
    organs: dict[str, np.ndarray],
    body: np.ndarray,
    spacing: Sequence[float],
    rng: np.random.Generator,
    phase: str | None = None,
    abutting_masses: bool = False,
) -> np.ndarray:
    """Paint a CT (float32 HU, the masks' shape) from organ masks and the body outline.

    ``organs``: organ folder name -> bool array; ``body``: bool array of the body (``skin``);
    ``spacing``: voxel size in mm along the three axes (axes 0, 1 in-plane, 2 across slices);
    ``phase``: one of :data:`PHASES` (default: drawn at random); ``abutting_masses``: also paint 0-2
    masses against the liver's surface but outside it, labelled background (off by default: in the
    cross-validation it did not keep patient 7's adrenal mass out of the liver and cost liver IoU).
    """
    shape = body.shape
    sp = [float(s) for s in spacing]
    # inside the body: subcutaneous fat, a muscle wall, then a visceral mixture of fat and soft tissue
    # (painted in place, innermost first: each volume-sized temporary costs as much as the arithmetic)
    fat_hu, muscle_hu = rng.uniform(-120, -80), rng.uniform(30, 65)
    depth = _depth_below_skin(body, sp)
    fat_mm = rng.uniform(4, 35)
    sub_fat = _smooth_field(rng, shape, sp, 60)
    sub_fat *= 0.3 * fat_mm
    sub_fat += fat_mm
    wall = sub_fat + rng.uniform(6, 20)
    visceral = _smooth_field(rng, shape, sp, rng.uniform(8, 25))
    soft = rng.uniform(15, 60)
    hu = _smooth_field(rng, shape, sp, 30)
    hu *= 15
    hu += soft
    fat_share = rng.uniform(0.25, 0.6)
    hu[visceral > (np.quantile(visceral[body], 1 - fat_share) if body.any() else 0)] = fat_hu
    del visceral
    deep = depth >= wall  # below the muscle wall: where the visceral distractors go
    hu[~deep] = muscle_hu
    hu[depth < sub_fat] = fat_hu
    del sub_fat, wall, depth
    deep &= body
    hu[~body] = -1000.0

    # contrast phase: unenhanced, arterial (kidney cortex bright against its medulla), portal venous,
    # excretory (contrast in the collecting system); the enhancement varies within each phase
    drawn = PHASES[int(rng.integers(len(PHASES)))]
    phase = drawn if phase is None else phase
    if phase not in PHASES:
        raise ValueError(f"{phase!r}: not a contrast phase ({', '.join(PHASES)})")
    enhancement = {
        "unenhanced": 0.0,
        "arterial": rng.uniform(0.15, 0.45),
        "portal": rng.uniform(0.6, 1.0),
        "excretory": rng.uniform(0.35, 0.6),
    }[phase]
    liver_hu = 55 + 75 * enhancement + rng.uniform(-10, 10)
    values = {
        "liver": liver_hu,
        "spleen": liver_hu + rng.uniform(-15, 30),
        "kidney": 35 + 170 * enhancement + rng.uniform(-10, 30),
        "vein": liver_hu + 80 * enhancement * rng.uniform(0.2, 1.2) + rng.uniform(-15, 15),
        "artery": 45 + (rng.uniform(200, 350) if phase == "arterial" else 250 * enhancement * rng.uniform(0.4, 1.0)),
        "lesion": liver_hu - rng.uniform(15, 70),
        "cyst": rng.uniform(0, 25),
        "fluid": rng.uniform(-5, 30),
        "soft": rng.uniform(30, 110),
        "stomach": rng.uniform(10, 45),
        "lung": rng.uniform(-900, -780),
        "calcium": rng.uniform(300, 900),
        "metal": rng.uniform(1500, 3000),
    }
    # distractors: blobs of liver-like density in the visceral soft tissue (bowel, stomach, heart)
    blobs = _smooth_field(rng, shape, sp, rng.uniform(20, 40)) > rng.uniform(1.2, 2.0)
    hu[blobs & deep] = liver_hu + rng.uniform(-40, 20)
    gas = _smooth_field(rng, shape, sp, rng.uniform(8, 15)) > rng.uniform(2.2, 3.0)
    hu[gas & deep] = rng.uniform(-950, -700)
    # organ-sized distractors (where a heart, spleen or stomach would be): smooth ellipsoids of
    # liver-like or blood-pool density, some with a rim, placed inside the body away from the organs
    # that are painted next; real CT puts such neighbours against the liver
    labelled = _union(organs.values(), shape)
    free = deep & ~labelled
    for _ in range(int(rng.integers(1, 4))):
        _ellipsoid_distractor(hu, free, sp, rng, liver_hu)
    # masses against the liver but outside it (an adrenal or renal mass, the gallbladder, bowel):
    # lesion-like or liver-like density, labelled background, so that liver means the organ inside
    # its capsule and not whatever hypodense tissue touches it
    liver = _union([m for n, m in organs.items() if n.lower().startswith("liver")], shape)
    if abutting_masses and np.any(liver):
        for _ in range(int(rng.integers(0, 3))):
            _abutting_mass(hu, liver, free, sp, rng, liver_hu)

    texture = _smooth_field(rng, shape, sp, rng.uniform(3, 10))
    kinds = {}
    for name, mask in organs.items():
        kind = _tissue(name)
        if kind is not None:
            kinds.setdefault(kind, np.zeros(shape, dtype=bool))
            kinds[kind] |= mask
    for kind in ORDER:
        if kind not in kinds:
            continue
        mask = kinds[kind]
        if kind == "bone":
            # a cortical rim of 1 to 2.5 mm: the bone minus its in-plane erosion
            layers = max(1, int(round(rng.uniform(1.0, 2.5) / sp[0])))
            in_plane = np.zeros((3, 3, 3), dtype=bool)
            in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
            cortex = mask & ~ndimage.binary_erosion(mask, structure=in_plane, iterations=layers)
            trabecular = rng.uniform(120, 330) + 40 * texture
            hu[mask] = np.where(cortex[mask], rng.uniform(450, 1100), trabecular[mask])
        elif kind == "kidney":
            hu[mask] = _kidney(mask, phase, sp, rng, texture)
        elif kind == "stomach" and rng.random() < 0.5:
            hu[mask] = values[kind]
            top = mask & (_smooth_field(rng, shape, sp, 20) > 0.8)
            hu[top] = -900
        else:
            sigma = {"liver": rng.uniform(3, 12), "spleen": 8, "kidney": 15}.get(kind, 6)
            hu[mask] = values[kind] + sigma * texture[mask]

    # partial volume (in-plane resolution and slice profile), then correlated noise of a random dose
    blur = [rng.uniform(0.3, 1.0) / s for s in sp[:2]] + [rng.uniform(0.2, 0.6)]
    hu = ndimage.gaussian_filter(hu, blur, mode="nearest")
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, [rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0), 0.0])
    noise *= rng.uniform(6, 30) / (noise.std() + 1e-6)
    hu += noise
    return np.clip(hu, -1024, 3071, out=hu)


def _kidney(
    mask: np.ndarray, phase: str, sp: Sequence[float], rng: np.random.Generator, texture: np.ndarray
) -> np.ndarray:
    """Kidney densities (the values at ``mask``) in a contrast phase: a cortex of 4-8 mm over the
    medulla, bright against it in the arterial phase; one parenchyma in the portal venous phase; in the
    excretory phase contrast in the collecting system at the kidney's core. Unenhanced: 25-45 HU."""
    # depth below the kidney's surface in mm, in-plane (slices are too thick to measure across)
    idx = np.argwhere(mask)
    box = tuple(slice(max(0, lo - 1), hi + 2) for lo, hi in zip(idx.min(0), idx.max(0)))
    depth = np.zeros(mask.shape, dtype=np.float32)
    depth[box] = ndimage.distance_transform_edt(mask[box], sampling=(sp[0], sp[1], 1e3))
    cortex_mm = rng.uniform(4, 8)
    inner = depth > cortex_mm
    core = depth >= max(cortex_mm + 2, rng.uniform(0.55, 0.7) * float(depth.max()))
    noise = 10 * texture
    if phase == "unenhanced":
        out = rng.uniform(25, 45) + noise
    elif phase == "arterial":
        out = np.where(inner, rng.uniform(60, 110), rng.uniform(150, 260)) + noise
    elif phase == "portal":
        out = rng.uniform(140, 210) + noise
    else:  # excretory: parenchyma fading, urine contrast in the pelvis and calyces
        out = np.where(core, rng.uniform(300, 900), rng.uniform(110, 170)) + noise
    return np.broadcast_to(out, mask.shape)[mask]


def _ellipsoid(centre: np.ndarray, radii: np.ndarray, shape: Sequence[int]) -> tuple[tuple[slice, ...], np.ndarray]:
    """The bounding box (clipped to ``shape``) of an axis-aligned ellipsoid and, over that box, each
    voxel's normalised squared distance ``q`` from ``centre`` (``q < 1`` inside); lengths in voxels."""
    lo = np.maximum(centre - np.ceil(radii).astype(int), 0)
    hi = np.minimum(centre + np.ceil(radii).astype(int) + 1, shape)
    grid = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    q = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), q


def _ellipsoid_distractor(
    hu: np.ndarray, free: np.ndarray, sp: Sequence[float], rng: np.random.Generator, liver_hu: float
) -> None:
    """Paint one ellipsoid of 40-120 mm radii (clipped to ``free``) around a random free voxel."""
    candidates = np.flatnonzero(free[::4, ::4, ::2])
    if candidates.size == 0:
        return
    ci = np.array(np.unravel_index(rng.choice(candidates), free[::4, ::4, ::2].shape)) * [4, 4, 2]
    radii = rng.uniform(20, 60, size=3) / np.asarray(sp)  # semi-axes in voxels
    box, q = _ellipsoid(ci, radii, free.shape)
    inside = (q < 1.0) & free[box]
    core = rng.uniform(liver_hu - 40, liver_hu + 30) if rng.random() < 0.6 else rng.uniform(120, 260)
    region = hu[box]
    region[inside] = core
    if rng.random() < 0.5:  # a wall of another density (myocardium, stomach wall)
        region[inside & (q > rng.uniform(0.5, 0.8))] = rng.uniform(liver_hu - 30, liver_hu + 30)
    hu[box] = region


def _abutting_mass(
    hu: np.ndarray,
    liver: np.ndarray,
    free: np.ndarray,
    sp: Sequence[float],
    rng: np.random.Generator,
    liver_hu: float,
) -> None:
    """Paint one mass of 15-45 mm radii centred just outside the liver's surface, clipped to
    ``free`` (unlabelled tissue): against the liver, or behind a fat plane of up to 3 mm."""
    step = (4, 4, 2)
    small = liver[:: step[0], :: step[1], :: step[2]]
    shell = ndimage.binary_dilation(small, iterations=2) & ~small & free[:: step[0], :: step[1], :: step[2]]
    candidates = np.flatnonzero(shell)
    if candidates.size == 0:
        return
    ci = np.array(np.unravel_index(rng.choice(candidates), shell.shape)) * step
    radii = rng.uniform(15, 45, size=3) / np.asarray(sp)  # semi-axes in voxels
    box, q = _ellipsoid(ci, radii, free.shape)
    inside = (q < 1.0) & free[box]
    if rng.random() < 0.5:  # a fat plane between the mass and the liver
        gap_mm = rng.uniform(1.0, 3.0)
        inside &= ndimage.distance_transform_edt(~liver[box], sampling=[float(s) for s in sp]) > gap_mm
    draw = rng.random()
    if draw < 0.5:
        core = liver_hu - rng.uniform(15, 70)  # hypodense, like a liver lesion
    elif draw < 0.8:
        core = liver_hu + rng.uniform(-25, 15)  # as dense as the liver
    else:
        core = rng.uniform(0, 25)  # cystic, or fluid
    region = hu[box]
    region[inside] = core
    if rng.random() < 0.4:  # an enhancing rim
        region[inside & (q > rng.uniform(0.6, 0.85))] = liver_hu + rng.uniform(0, 60)
    hu[box] = region


def _series_fast(folder: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """A DICOM series folder read by SimpleITK (GDCM; about 7 times faster than the checked reader on
    a 512 x 512 x 139 mask series): ``(array (X, Y, Z) as load_ct lays it out, RAS affine)``, or None
    where GDCM does not see exactly one series of all the folder's files or cannot read it, or where
    SimpleITK is not installed (the checked reader then reads every series)."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None

    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(folder))
        if len(names) != len(files):
            return None
        reader.SetFileNames(names)
        img = reader.Execute()
    except RuntimeError:
        return None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        return None
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3) * spacing
    affine[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # DICOM's LPS -> RAS, as MONAI's readers give it
    return np.ascontiguousarray(np.transpose(sitk.GetArrayViewFromImage(img), (2, 1, 0))), affine


def _read_masks(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All organ mask series of an extracted MASKS_DICOM folder, and their common affine.

    The first series is read with every check of :func:`load_ct`, and also by SimpleITK: where both
    give the same voxels and affine, the other series are read by SimpleITK (the slow part of
    ``liver-fcn synth`` and ``warp`` was reading 10-20 mask series a patient) and must match the
    first one's grid. Otherwise, or where SimpleITK cannot read a series, :func:`load_ct` reads it
    and names what is wrong with it.
    """
    folders = _organ_folders(folder)
    if not folders:
        raise InputError(f"{folder}: no organ mask series")
    (first, path), rest = next(iter(folders.items())), list(folders.items())[1:]
    img = load_ct(path, modality=None)
    organs, affine = {first: np.asarray(img[0]) > 0}, np.asarray(img.affine, dtype=np.float64)
    ref = _series_fast(path)
    fast = ref is not None and np.allclose(ref[1], affine, atol=1e-3) and np.array_equal(ref[0] > 0, organs[first])
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # GDCM reads without the GIL
        read = pool.map(_series_fast, [p for _, p in rest]) if fast else [None] * len(rest)
        for (name, path), got in zip(rest, read):
            if got is None:
                img = load_ct(path, modality=None)
                got = np.asarray(img[0]), np.asarray(img.affine, dtype=np.float64)
            if got[0].shape != organs[first].shape or not np.allclose(got[1], affine, atol=1e-3):
                raise InputError(f"{path}: mask geometry differs from the patient's other masks")
            organs[name] = got[0] > 0
    return organs, affine


def _patient_masks(name: str, src: Path, tmp: Path) -> tuple[Path, dict[str, np.ndarray], np.ndarray]:
    """One patient's mask series (extracted under ``tmp`` from a zip): ``(folder, organs, affine)``."""
    folder = src
    if src.suffix == ".zip":
        safe_extract(src, tmp / name, top="MASKS_DICOM")
        folder = tmp / name / "MASKS_DICOM"
    organs, affine = _read_masks(folder)
    if src.suffix == ".zip":
        shutil.rmtree(tmp / name)  # read; the next patients' files take its place
    return folder, organs, affine


def _write_case(stage: Path, final: Path, ct: np.ndarray, label_masks: dict[str, np.ndarray], affine) -> None:
    """A synthetic volume and its masks as NIfTI, staged and then moved to ``final`` whole."""
    stage.mkdir()
    img = nib.Nifti1Image(np.round(ct).astype(np.int16), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(stage / "ct.nii.gz"))
    for cls, m in label_masks.items():
        nib.save(nib.Nifti1Image(m.astype(np.uint8), affine), str(stage / f"{cls}.nii.gz"))
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)


def _synthesize_patient(task: dict) -> tuple[list[dict], str]:
    """One mask patient's ``copies`` synthetic volumes, written whole under ``task['out']``: their
    datalist entries and the log line (a thread of ``synthesize(..., workers=N)`` runs this)."""
    t0, name, classes = time.time(), task["name"], task["classes"]
    folder, organs, affine = _patient_masks(name, task["src"], task["tmp"])
    if "skin" not in organs:
        raise InputError(f"{folder}: no 'skin' (body outline) mask; cannot synthesise a CT")
    chosen, _, _ = _resolve_classes(task["organ_map"], {n: Path(n) for n in organs})
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    shape = organs["skin"].shape
    label_masks = {c: _union([organs[p.name] for p in ps], shape) for c, ps in chosen.items() if c in task["annotate"]}
    body = _union(organs.values(), shape)
    organs.pop("skin")
    entries = []
    for copy in range(task["copies"]):
        rng = np.random.default_rng([task["seed"], task["index"], copy])
        ct = render_ct(organs, body, spacing, rng, abutting_masses=task["abutting_masses"])
        case = f"synth-{name}-{copy}"
        _write_case(task["tmp"] / f"stage-{case}", task["out"] / case, ct, label_masks, affine)
        entries.append(
            {
                "patient": case,
                "image": f"{case}/ct.nii.gz",
                "masks": {c: [f"{case}/{c}.nii.gz"] for c in classes[1:] if c in label_masks},
                "annotated": [True] + [c in label_masks for c in classes[1:]],
                "shape": list(ct.shape),
                "spacing": [round(float(s), 6) for s in spacing],
                "synthetic_from": name,
                "sampling_weight": task["sampling_weight"],
            }
        )
    missing = [c for c in classes[1:] if c not in label_masks]  # absent, or left to real CT
    copies = task["copies"]
    line = (
        f"{name}: {copies} synthetic CT{'s' if copies > 1 else ''} {shape[0]}x{shape[1]}x{shape[2]}"
        + (f"; not annotated: {', '.join(missing)}" if missing else "")
        + f" ({time.time() - t0:.1f} s)"
    )
    return entries, line


def synthesize(
    masks_root: str | os.PathLike,
    out: str | os.PathLike,
    copies: int = 1,
    seed: int = 0,
    patients: Sequence[str] = (),
    sampling_weight: float = 1.0,
    mapping: str | os.PathLike | None = None,
    annotate: Sequence[str] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    abutting_masses: bool = False,
    workers: int = 1,
) -> Path:
    """Render ``copies`` CTs per mask patient under ``out``; returns the datalist path.

    ``workers``: patients synthesised side by side in that many threads (each holds one patient's
    masks and volume, 1-4 GB). The volumes do not depend on it.

    ``annotate``: the classes whose masks the datalist gives (default: all the mapping's); the others
    are recorded as not annotated, so training learns them from real CT only (the partial-label loss
    lets a synthetic background pixel be any of them).
    """
    classes, organ_map = load_class_mapping(mapping)
    annotate = list(classes[1:]) if annotate is None else list(annotate)
    unknown = [c for c in annotate if c not in classes[1:]]
    if unknown:
        raise InputError(f"{unknown[0]}: not a class of the mapping ({', '.join(classes[1:])})")
    found = find_mask_patients(masks_root)
    if patients:
        wanted = {p if p.startswith("3Dircadb1.") else f"3Dircadb1.{p}" for p in patients}
        unknown = wanted - {n for n, _ in found}
        if unknown:
            raise InputError(f"{sorted(unknown)[0]}: no such patient under {masks_root}")
        found = [(n, p) for n, p in found if n in wanted]
    if copies < 1:
        raise InputError(f"copies must be at least 1, got {copies}")
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if sampling_weight <= 0:
        raise InputError(f"sampling weight must be positive, got {sampling_weight}")
    out = Path(out)
    datalist = out / "datalist.json"
    if datalist.exists() and not overwrite:
        raise InputError(f"{datalist}: already exists; pass --overwrite to synthesise again")
    for _, src in found:
        if src.suffix == ".zip":
            check_zip(src, top="MASKS_DICOM")
    entries = []
    out.mkdir(parents=True, exist_ok=True)
    job = dict(copies=copies, seed=seed, annotate=annotate, classes=classes, organ_map=organ_map)
    job |= dict(sampling_weight=sampling_weight, abutting_masses=abutting_masses, out=out)
    with tempfile.TemporaryDirectory(dir=out, prefix=".synth-") as tmp:
        tasks = [dict(job, index=i, name=name, src=src, tmp=Path(tmp)) for i, (name, src) in enumerate(found)]
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                done, line = _synthesize_patient(task)
                entries += done
                log(line)
        else:
            # patients side by side in threads: the volume-sized numpy, scipy, torch and GDCM work
            # that takes the time releases the GIL, and the threads share one process's memory
            with ThreadPoolExecutor(workers) as pool:
                try:
                    for done, line in pool.map(_synthesize_patient, tasks):
                        entries += done
                        log(line)
                except BaseException:
                    pool.shutdown(cancel_futures=True)
                    raise
    write_json_atomic(
        datalist,
        {
            "name": "synthetic CT from 3D-IRCADb-01 organ masks",
            "source": str(Path(masks_root).resolve()),
            "classes": classes,
            "organs": organ_map,
            "abutting_masses": bool(abutting_masses),
            "training": entries,
            "validation": [],
            "test": [],
        },
    )
    log(f"wrote {datalist}: {len(entries)} synthetic training volumes")
    return datalist
