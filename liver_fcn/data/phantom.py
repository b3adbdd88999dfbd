"""Synthetic abdominal CT phantoms written in the 3D-IRCADb-01 download layout.

Each patient is ``3Dircadb1.N/`` with ``PATIENT_DICOM.zip`` (``PATIENT_DICOM/image_K``, int16 HU,
rescale tags) and ``MASKS_DICOM.zip`` (``MASKS_DICOM/<organ>/image_K``, uint8 0/255), exactly as the
real database is downloaded, so that the whole pipeline - ``liver-fcn prepare``, the bundle's
DICOM loading, training and evaluation - runs on them unchanged.

The anatomy is simple but not trivial: a body of fat and muscle; a liver (right lobe and a left
lobe crossing the midline, sometimes with hypodense tumours); a spleen whose density overlaps the
liver's; kidneys whose density overlaps the contrast-filled aorta and trabecular bone; a spine
with cortical rim, ribs in the upper slices and iliac wings in the lowest; stomach and bowel gas;
Gaussian noise. Shapes, sizes, positions and densities vary with the seed. The body outline is
written as the ``skin`` mask, as in the real database. As in the real
database some patients have no kidney masks (every third patient), and the kidney folders are
named ``leftkidney`` + ``rightkidney`` in some patients and ``kidneys`` in others.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from liver_fcn.data.dicom_write import SeriesGeometry, SeriesTags, write_series_to_zip

__all__ = ["PhantomCase", "make_phantom", "write_phantom_patient", "write_phantoms"]

FOV_MM = 380.0  # in-plane field of view
Z_EXTENT_MM = 240.0  # from the iliac crest to the diaphragm


@dataclass
class PhantomCase:
    """One synthetic patient: HU volume and organ masks, arrays of shape (slices, rows, columns)."""

    ct: np.ndarray  # int16 HU
    masks: dict[str, np.ndarray]  # organ folder name -> bool
    geometry: SeriesGeometry


def _wobble(rng: np.random.Generator, u, v, z, amp: float, n: int = 4) -> np.ndarray:
    """Smooth random field: a sum of a few low-frequency plane waves."""
    out = 0.0
    for _ in range(n):
        fu, fv, fz = rng.uniform(-3, 3, size=3) * np.pi / 2
        out = out + rng.uniform(0.3, 1.0) * amp / n * np.cos(fu * u + fv * v + fz * z + rng.uniform(0, 2 * np.pi))
    return out


def _ellipsoid(u, v, z, c, r, wobble=0.0) -> np.ndarray:
    q = ((u - c[0]) / r[0]) ** 2 + ((v - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
    return q + wobble < 1.0


def make_phantom(seed: int, size: int = 256, slices: int = 48, kidney_masks: bool = True) -> PhantomCase:
    """Build one phantom patient (no files written)."""
    rng = np.random.default_rng(seed)
    j = lambda s: rng.uniform(-s, s)  # noqa: E731 - jitter
    # voxel centres: u left(-)/right(+) of the image = patient right/left, v anterior(-)/posterior(+),
    # z feet (0) to head (1)
    zz = (np.arange(slices) + 0.5) / slices
    yy = (np.arange(size) + 0.5) / size * 2 - 1
    z, v, u = np.meshgrid(zz, yy, yy, indexing="ij")
    z = z.astype(np.float32)
    v = v.astype(np.float32)
    u = u.astype(np.float32)

    hu = np.full(u.shape, -1000.0, dtype=np.float32)
    # body: fat envelope and muscle wall around a soft-tissue core
    bu, bv = 0.82 + j(0.08), 0.62 + j(0.06)
    bc = 0.04 + j(0.03)
    body_q = (u / bu) ** 2 + ((v - bc) / bv) ** 2 + _wobble(rng, u, v, z, 0.05)
    body = body_q < 1
    fat_t = 0.14 + j(0.05)
    muscle_t = 0.06 + j(0.02)
    hu[body] = -100 + rng.normal(0, 10)
    wall = body & (body_q < (1 - fat_t) ** 2)
    muscle_hu = 50 + j(10)
    hu[wall] = muscle_hu
    core = body & (body_q < (1 - fat_t - muscle_t) ** 2)
    hu[core] = (-40 + 40 * _wobble(rng, u * 3, v * 3, z * 3, 1.0, n=6))[core]  # mesenteric fat and bowel

    # bowel loops and gas (lower and anterior abdomen), stomach with a gas cap (upper left)
    for _ in range(rng.integers(6, 12)):
        c = (j(0.5), rng.uniform(-0.45, 0.2), rng.uniform(0.05, 0.55))
        r = (rng.uniform(0.05, 0.12), rng.uniform(0.05, 0.1), rng.uniform(0.05, 0.15))
        loop = core & _ellipsoid(u, v, z, c, r)
        hu[loop] = 30 + j(10)
        gas = loop & _ellipsoid(u, v, z, c, [0.6 * x for x in r])
        if rng.random() < 0.6:
            hu[gas] = -850 + j(100)
    stomach_c = (0.3 + j(0.05), -0.25 + j(0.05), 0.72 + j(0.05))
    stomach = core & _ellipsoid(u, v, z, stomach_c, (0.18, 0.14, 0.12), _wobble(rng, u, v, z, 0.2))
    hu[stomach] = 20 + j(10)
    hu[stomach & (v < stomach_c[1] - 0.05)] = -900

    liver_hu = rng.uniform(70, 110)
    # spleen density overlaps the liver's; kidneys overlap the aorta and trabecular bone
    spleen_hu = liver_hu + j(15)
    kidney_hu = rng.uniform(110, 170)

    # liver: right lobe plus a left lobe crossing the midline, clipped by the body wall
    w = _wobble(rng, u, v, z, 0.35)
    right = _ellipsoid(
        u, v, z, (-0.38 + j(0.05), 0.02 + j(0.05), 0.74 + j(0.04)), (0.33 + j(0.04), 0.42 + j(0.04), 0.24 + j(0.03)), w
    )
    left = _ellipsoid(
        u, v, z, (0.02 + j(0.06), -0.3 + j(0.05), 0.8 + j(0.03)), (0.3 + j(0.06), 0.16 + j(0.03), 0.12 + j(0.02)), w
    )
    liver = core & (right | left)
    hu[liver] = (liver_hu + 8 * _wobble(rng, u * 4, v * 4, z * 4, 1.0))[liver]
    tumours = []
    for _ in range(rng.integers(0, 3)):
        pts = np.argwhere(liver)
        if len(pts) == 0:
            break
        cz, cy, cx = pts[rng.integers(len(pts))]
        c = (u[0, 0, cx], v[0, cy, 0], z[cz, 0, 0])
        rad = rng.uniform(0.04, 0.09)
        t = liver & _ellipsoid(u, v, z, c, (rad, rad, rad * 1.4))
        hu[t] = liver_hu - rng.uniform(30, 60)
        tumours.append(t)

    spleen = (
        core
        & ~liver
        & _ellipsoid(
            u,
            v,
            z,
            (0.55 + j(0.05), 0.25 + j(0.05), 0.7 + j(0.05)),
            (0.14 + j(0.03), 0.2 + j(0.03), 0.14 + j(0.03)),
            _wobble(rng, u, v, z, 0.3),
        )
    )
    hu[spleen] = (spleen_hu + 8 * _wobble(rng, u * 4, v * 4, z * 4, 1.0))[spleen]

    kz = 0.36 + j(0.04)
    rk = (
        core
        & ~liver
        & _ellipsoid(
            u,
            v,
            z,
            (-0.3 + j(0.03), 0.42 + j(0.03), kz - 0.04),
            (0.1, 0.13, 0.17 + j(0.02)),
            _wobble(rng, u, v, z, 0.2),
        )
    )
    lk = (
        core
        & ~spleen
        & _ellipsoid(
            u, v, z, (0.3 + j(0.03), 0.42 + j(0.03), kz + 0.03), (0.1, 0.13, 0.17 + j(0.02)), _wobble(rng, u, v, z, 0.2)
        )
    )
    for k in (rk, lk):
        hu[k] = (kidney_hu + 10 * _wobble(rng, u * 5, v * 5, z * 5, 1.0))[k]
        sinus = k & _ellipsoid(u, v, z, (0.0, 0.42, kz), (1.0, 0.05, 0.08))
        hu[sinus] = -20  # renal sinus fat

    # great vessels: contrast-filled aorta (kidney-like density) and vena cava
    aorta = core & _ellipsoid(u, v, z, (0.07, 0.36, 0.5), (0.055, 0.055, 10.0))
    hu[aorta] = rng.uniform(140, 200)
    ivc = core & ~liver & _ellipsoid(u, v, z, (-0.12, 0.33, 0.5), (0.06, 0.05, 10.0))
    hu[ivc] = liver_hu + j(20)

    # bone: vertebral body (cortical rim, trabecular core), posterior arch, ribs, iliac wings
    sc = (0.0, 0.58 + j(0.03))
    vb_q = ((u - sc[0]) / 0.12) ** 2 + ((v - sc[1]) / 0.11) ** 2
    level = (z * Z_EXTENT_MM / 30.0 + rng.uniform()) % 1.0  # vertebral levels 30 mm apart
    disc = level > 0.85  # intervertebral discs
    vbody = vb_q < 1
    bone = vbody & ~disc
    hu[vbody] = np.where(disc[vbody], 80.0, 230 + j(40))
    hu[bone & (vb_q > 0.7)] = 650 + j(100)
    arch = (((u - sc[0]) / 0.05) ** 2 + ((v - sc[1] - 0.2) / 0.12) ** 2 < 1) & ~disc
    arch |= (((u - sc[0]) / 0.16) ** 2 + ((v - sc[1] - 0.14) / 0.03) ** 2 < 1) & ~disc
    hu[arch] = 500 + j(80)
    bone |= arch
    n_ribs = int(rng.integers(6, 9))
    for i in range(n_ribs):
        side = -1 if i % 2 == 0 else 1
        theta0 = np.deg2rad(rng.uniform(-50, 60) + 8 * (i // 2))
        z_top = rng.uniform(0.45, 0.6)
        for kz_i in range(slices):
            if zz[kz_i] < z_top:
                continue
            th = theta0 + 1.2 * (zz[kz_i] - z_top)
            cu = side * 0.93 * (1 - fat_t * 0.6) * bu * np.cos(th)
            cv = bc + 0.93 * (1 - fat_t * 0.6) * bv * np.sin(th)
            rib = ((u[kz_i] - cu) / 0.028) ** 2 + ((v[kz_i] - cv) / 0.022) ** 2 < 1
            hu[kz_i][rib] = 550 + j(100)
            bone[kz_i] |= rib
    for side in (-1, 1):
        ilium = (((u - side * 0.45) / 0.22) ** 2 + ((v - 0.35) / 0.05) ** 2 < 1) & (z < 0.12 + j(0.03))
        hu[ilium] = 450 + j(100)
        bone |= ilium

    hu += rng.normal(0, rng.uniform(8, 18), size=hu.shape).astype(np.float32)
    hu = np.clip(hu, -1024, 3071)

    px = FOV_MM / size
    sz = Z_EXTENT_MM / slices
    geometry = SeriesGeometry(pixel_spacing=(px, px), slice_spacing=sz, origin=(0.0, 0.0, 0.0))
    masks: dict[str, np.ndarray] = {"liver": liver, "bone": bone, "spleen": spleen, "skin": body}
    if kidney_masks:
        masks["rightkidney"] = rk
        masks["leftkidney"] = lk
    for i, t in enumerate(tumours, 1):
        masks[f"livertumor{i:02d}"] = t
    return PhantomCase(ct=np.round(hu).astype(np.int16), masks=masks, geometry=geometry)


def write_phantom_patient(
    out_dir: str | os.PathLike,
    number: int,
    seed: int,
    size: int = 256,
    slices: int = 48,
    rescale_intercept: float = 0.0,
) -> Path:
    """Write patient ``3Dircadb1.<number>`` under ``out_dir`` (atomically: staged, then renamed)."""
    out_dir = Path(out_dir)
    kidney_masks = number % 3 != 0  # every third patient has no kidney annotation
    case = make_phantom(seed, size=size, slices=slices, kidney_masks=kidney_masks)
    if kidney_masks and number % 2 == 0:  # some patients name the kidneys together
        case.masks["kidneys"] = case.masks.pop("rightkidney") | case.masks.pop("leftkidney")
    name = f"3Dircadb1.{number}"
    final = out_dir / name
    if final.exists():
        raise FileExistsError(f"{final}: already exists; choose an empty output folder")
    stage = out_dir / f".{name}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        study = generate_uid()
        frame = generate_uid()
        common = dict(study_uid=study, frame_of_reference_uid=frame, patient_id=f"phantom{number:02d}")
        with zipfile.ZipFile(stage / "PATIENT_DICOM.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            tags = SeriesTags(patient_name=f"phantom_{number:02d}^patient", series_description="phantom CT", **common)
            write_series_to_zip(zf, "PATIENT_DICOM", case.ct, case.geometry, tags, rescale_intercept=rescale_intercept)
        with zipfile.ZipFile(stage / "MASKS_DICOM.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for i, (organ, mask) in enumerate(sorted(case.masks.items()), 2):
                tags = SeriesTags(
                    patient_name=f"phantom_{number:02d}^{organ}", series_description=organ, series_number=i, **common
                )
                write_series_to_zip(zf, f"MASKS_DICOM/{organ}", mask.astype(np.uint8) * 255, case.geometry, tags)
        (stage / "README.txt").write_text(
            f"Synthetic abdominal CT phantom written by liver-fcn (seed {seed}); not patient data.\n"
            f"Organs annotated: {', '.join(sorted(case.masks))}.\n"
        )
        stage.rename(final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return final


def write_phantoms(
    out_dir: str | os.PathLike, patients: int, seed: int = 0, size: int = 256, slices: int = 48, **kw
) -> list[Path]:
    """Write ``patients`` phantom patients numbered 1..N; patient N uses seed ``seed * 1000 + N``."""
    if patients < 1:
        raise ValueError("patients must be at least 1")
    if size < 32 or slices < 2:
        raise ValueError("phantoms need size >= 32 and slices >= 2")
    return [write_phantom_patient(out_dir, n, seed * 1000 + n, size, slices, **kw) for n in range(1, patients + 1)]
