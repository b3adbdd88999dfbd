"""Real CT warped onto the anatomy of mask-only patients (``liver-fcn warp``).

3D-IRCADb-01 publishes organ masks for patients whose CT cannot be had here. The painted CTs of
:mod:`liver_fcn.data.synth` give those anatomies invented tissue; this module gives them real
tissue: a real patient's organ label map (body outline, liver, bone, kidneys, spleen, lungs, as far
as both patients have them) is registered onto the mask-only patient's, affine and then deformable,
driven by the labels alone, and the real CT - nothing else - is warped with the result. The warped
volume is annotated with the *target's own* masks, for every class both patients have, so the
network sees real tissue under real outlines of another anatomy (or, for the classes asked for, with
the source's own masks carried by the same warp, which lie exactly on the warped tissue). How far
the warped tissue agrees with those outlines is measured per pair (Dice of the warped source labels
against the target's); pairs whose liver falls below a bar are dropped (or kept at a lower weight).

Registration is SimpleITK's (ITK): a label-coded, smoothed image at a few millimetres, an affine
transform fitted by mean squares (liver centroids aligned first, multi-resolution), then
diffeomorphic demons, whose displacement field is composed with the affine and applied to the
full-resolution CT (linear, HU) on the target's grid.

Output: ``<out>/warp-<source>-to-<target>/`` with ``ct.nii.gz`` (int16 HU) and one
``<class>.nii.gz`` per annotated class, ``<out>/overlays/<case>.png`` (warped CT with the target's
contours), ``<out>/warp_report.csv`` (per pair: Dice per label, time, kept or not) and a
``datalist.json`` whose ``training`` split lists the kept volumes, each with ``source_patients`` -
the real patient whose tissue it carries - so that a training or a cross-validation fold that holds
that patient out for validation or testing leaves its warps out too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from liver_fcn.data.archive import check_zip, safe_extract
from liver_fcn.data.ct import load_ct
from liver_fcn.data.datasets import load_datalist
from liver_fcn.data.ircadb import _resolve_classes, load_class_mapping
from liver_fcn.data.synth import _read_masks, find_mask_patients
from liver_fcn.errors import InputError
from liver_fcn.outputs import write_json_atomic, write_text_atomic

__all__ = [
    "RegistrationLabels",
    "WarpResult",
    "dice",
    "label_map",
    "register_labels",
    "warp_image",
    "warp_patient",
    "warp_patients",
]

#: registration label -> (organ folder name prefixes, code in the label-coded image); later rows win
#: where masks overlap. Codes step so that neighbours differ (liver against kidney, bone, spleen).
REGISTRATION_LABELS: list[tuple[str, tuple[str, ...], float]] = [
    ("body", ("skin",), 1.0),
    ("lung", ("lung", "leftlung", "rightlung", "lungs"), 0.2),
    ("spleen", ("spleen",), 2.6),
    ("kidney", ("kidney", "kidneys", "leftkidney", "rightkidney"), 3.3),
    ("liver", ("liver",), 2.0),
    ("bone", ("bone",), 4.2),
]


def _label_of(organ: str) -> str | None:
    n = organ.lower()
    if n.startswith(("livertumor", "liverkyst", "livercyst")):
        return "liver"  # lesions are part of the liver's outline
    for name, prefixes, _ in REGISTRATION_LABELS:
        if n in prefixes or (name == "kidney" and "kidney" in n):
            return name
    return None


@dataclass
class RegistrationLabels:
    """The registration labels of one patient: name -> bool array, with the grid's affine."""

    masks: dict[str, np.ndarray]
    affine: np.ndarray

    @classmethod
    def from_organs(cls, organs: dict[str, np.ndarray], affine: np.ndarray) -> RegistrationLabels:
        masks: dict[str, np.ndarray] = {}
        for organ, m in organs.items():
            name = _label_of(organ)
            if name is not None:
                masks[name] = masks[name] | m if name in masks else m.copy()
        if "body" in masks:  # the body outline holds every organ
            masks["body"] |= np.any([m for k, m in masks.items() if k != "body"], axis=0)
        return cls(masks, np.asarray(affine, dtype=np.float64))


def label_map(labels: RegistrationLabels, names: Sequence[str]) -> np.ndarray:
    """The label-coded float image of ``names`` (0 outside every label)."""
    shape = next(iter(labels.masks.values())).shape
    out = np.zeros(shape, dtype=np.float32)
    for name, _, code in REGISTRATION_LABELS:
        if name in names and name in labels.masks:
            out[labels.masks[name]] = code
    return out


def _to_sitk(arr: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of an (X, Y, Z) array with an axis-aligned voxel-to-world affine."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in affine[:3, 3]])
    img.SetDirection([float(d) for d in (affine[:3, :3] / spacing).ravel()])
    return img


def _from_sitk(img) -> np.ndarray:
    import SimpleITK as sitk

    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))


def _coarse(img, spacing_mm: float, sigma_mm: float):
    """``img`` on an isotropic grid of ``spacing_mm`` (area-averaged by a Gaussian first)."""
    import SimpleITK as sitk

    img = sitk.SmoothingRecursiveGaussian(sitk.Cast(img, sitk.sitkFloat32), sigma_mm)
    size = [max(2, int(round(n * s / spacing_mm))) for n, s in zip(img.GetSize(), img.GetSpacing())]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


def register_labels(
    source: RegistrationLabels,
    target: RegistrationLabels,
    spacing_mm: float = 3.0,
    demons_iterations: int = 60,
    field_sigma: float = 1.5,
):
    """A SimpleITK transform mapping target points to source points, fitted on the labels both have.

    Affine (mean squares on the label-coded images at ``2 * spacing_mm`` and ``spacing_mm``, the
    liver centroids aligned first), then diffeomorphic demons at ``spacing_mm`` with a field smoothed
    by ``field_sigma`` voxels. Returns ``(transform, names)``: the composite transform and the labels
    it was driven by.
    """
    import SimpleITK as sitk

    names = [n for n, _, _ in REGISTRATION_LABELS if n in source.masks and n in target.masks]
    if "liver" not in names or "body" not in names:
        raise InputError("registration needs the liver and the body outline (skin) in both patients")
    fixed = _coarse(_to_sitk(label_map(target, names), target.affine), spacing_mm, spacing_mm / 2)
    moving = _coarse(_to_sitk(label_map(source, names), source.affine), spacing_mm, spacing_mm / 2)

    affine = sitk.AffineTransform(3)
    c_fixed = _centroid(target.masks["liver"], target.affine)
    affine.SetCenter([float(c) for c in c_fixed])
    affine.SetTranslation([float(t) for t in _centroid(source.masks["liver"], source.affine) - c_fixed])
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0, minStep=0.01, numberOfIterations=150, relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(fixed, moving)

    moved = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(int(demons_iterations))
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(float(field_sigma))
    demons.SetMaximumUpdateStepLength(2.0)
    displacement = demons.Execute(fixed, moved)
    deform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    transform = sitk.CompositeTransform([affine, deform])  # the field first, then the affine
    return transform, names


def warp_image(
    arr: np.ndarray,
    affine: np.ndarray,
    transform,
    target_shape: Sequence[int],
    target_affine: np.ndarray,
    linear: bool = True,
    default: float = -1024.0,
) -> np.ndarray:
    """``arr`` (on ``affine``) resampled onto the target grid through ``transform`` (target -> source)."""
    import SimpleITK as sitk

    ref = _to_sitk(np.zeros(tuple(target_shape)[::-1], dtype=np.uint8).transpose(2, 1, 0), target_affine)
    src = _to_sitk(arr.astype(np.float32) if linear else arr.astype(np.uint8), affine)
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    out = sitk.Resample(src, ref, transform, interp, float(default), src.GetPixelID())
    return _from_sitk(out)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / s) if s else float("nan")


@dataclass
class WarpResult:
    """One warped pair: the CT on the target grid, the agreement of the labels, the time it took."""

    ct: np.ndarray
    dice: dict[str, float]
    names: list[str]
    seconds: float
    warped_labels: dict[str, np.ndarray] = field(repr=False, default_factory=dict)


def warp_patient(
    ct: np.ndarray,
    source: RegistrationLabels,
    target: RegistrationLabels,
    spacing_mm: float = 3.0,
    carry: Sequence[str] = (),
    **kw,
) -> WarpResult:
    """Register ``source``'s labels onto ``target``'s and warp the source ``ct`` (on ``source.affine``).

    ``warped_labels`` holds the source's labels the registration used, carried by the warp, and
    those of ``carry`` the source has though the target does not (they are not registered, but lie
    on the warped tissue all the same)."""
    t0 = time.time()
    transform, names = register_labels(source, target, spacing_mm=spacing_mm, **kw)
    shape = next(iter(target.masks.values())).shape
    warped_ct = warp_image(ct, source.affine, transform, shape, target.affine, linear=True, default=-1024.0)
    codes = np.zeros(source.masks["body"].shape, dtype=np.uint8)
    for i, name in enumerate(names, 1):
        codes[source.masks[name]] = i
    warped_codes = warp_image(codes, source.affine, transform, shape, target.affine, linear=False, default=0)
    warped = {name: warped_codes == i for i, name in enumerate(names, 1)}
    if "body" in warped:
        warped["body"] = warped_codes > 0
    for name in carry:
        if name not in warped and name in source.masks:
            mask = source.masks[name].astype(np.uint8)
            warped[name] = warp_image(mask, source.affine, transform, shape, target.affine, linear=False, default=0) > 0
    scores = {name: round(dice(warped[name], target.masks[name]), 4) for name in names}
    return WarpResult(warped_ct, scores, names, time.time() - t0, warped)


def _overlay_png(path: Path, ct: np.ndarray, masks: dict[str, np.ndarray], spacing: np.ndarray, title: str) -> None:
    """Axial and coronal slices through the liver's centre: the warped CT, the target's contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"liver": "tab:red", "bone": "gold", "kidney": "tab:cyan"}
    cx, cy, cz = (int(round(c)) for c in np.argwhere(masks["liver"]).mean(axis=0))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5), gridspec_kw={"width_ratios": [1, 1]})
    views = [
        (ct[:, :, cz], {k: m[:, :, cz] for k, m in masks.items()}, spacing[1] / spacing[0], "upper", f"axial {cz}"),
        (ct[:, cy, :], {k: m[:, cy, :] for k, m in masks.items()}, spacing[2] / spacing[0], "lower", f"coronal {cy}"),
    ]
    for ax, (img, cut, aspect, origin, label) in zip(axes, views):
        ax.imshow(img.T, cmap="gray", vmin=-250, vmax=300, aspect=aspect, origin=origin)
        for name, m in cut.items():
            if m.any():
                # in data coordinates, row i at y = i whatever way imshow turned the axis
                ax.contour(m.T.astype(np.float32), levels=[0.5], colors=colours.get(name, "white"), linewidths=1)
        ax.set_title(label)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=n) for n, c in colours.items() if n in masks]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    tmp = path.with_name(f".{path.name}")
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _source_patients(dataset_dir: Path, wanted: Sequence[str]) -> list[dict]:
    datalist = dataset_dir / "datalist.json"
    entries, seen = [], set()
    for split in ("training", "validation", "test"):
        for e in load_datalist(datalist, split, required=False):
            if e["patient"] not in seen:
                seen.add(e["patient"])
                entries.append(e)
    if wanted:
        names = {p if p.startswith("3Dircadb1.") else f"3Dircadb1.{p}" for p in wanted}
        unknown = names - seen
        if unknown:
            raise InputError(f"{sorted(unknown)[0]}: no such patient in {datalist}")
        entries = [e for e in entries if e["patient"] in names]
    for e in entries:
        if "liver" not in e.get("masks", {}):
            raise InputError(f"{e['image']}: patient {e['patient']} has no liver mask; it cannot be warped")
    return entries


def warp_patients(
    dataset_dir: str | os.PathLike,
    masks_root: str | os.PathLike,
    out: str | os.PathLike,
    sources: Sequence[str] = (),
    targets: Sequence[str] = (),
    sampling_weight: float = 1.0,
    min_liver_dice: float = 0.85,
    low_weight: float = 0.0,
    spacing_mm: float = 3.0,
    mapping: str | os.PathLike | None = None,
    overwrite: bool = False,
    source_labels: Sequence[str] = (),
    carry_missing: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Warp every real patient of a prepared data set onto every mask-only patient; returns the datalist.

    ``min_liver_dice``: a pair whose warped liver agrees less with the target's is dropped, or kept
    at ``low_weight`` when that is positive. ``sampling_weight``: the weight of each kept volume.
    ``source_labels``: classes annotated with the source's own masks, warped with the CT (nearest
    neighbour), instead of the target's: they lie exactly on the warped tissue, where the target's
    outline of a thin or variable organ (bone) may not. ``carry_missing``: a target without a mask of
    one of those classes is labelled with the source's too (else that class stays unannotated there).
    """
    classes, organ_map = load_class_mapping(mapping)
    registration_names = {name for name, _, _ in REGISTRATION_LABELS}
    for c in source_labels:
        if c not in classes[1:] or c not in registration_names:
            raise InputError(
                f"--source_labels {c}: not a class that is registered (those are "
                f"{', '.join(c for c in classes[1:] if c in registration_names)})"
            )
    if sampling_weight <= 0:
        raise InputError(f"sampling weight must be positive, got {sampling_weight}")
    if not 0 <= min_liver_dice <= 1:
        raise InputError(f"--min_liver_dice must lie in [0, 1], got {min_liver_dice}")
    dataset_dir, out = Path(dataset_dir), Path(out)
    real = _source_patients(dataset_dir, sources)
    found = find_mask_patients(masks_root)
    if targets:
        wanted = {p if p.startswith("3Dircadb1.") else f"3Dircadb1.{p}" for p in targets}
        unknown = wanted - {n for n, _ in found}
        if unknown:
            raise InputError(f"{sorted(unknown)[0]}: no such patient under {masks_root}")
        found = [(n, p) for n, p in found if n in wanted]
    datalist = out / "datalist.json"
    if datalist.exists() and not overwrite:
        raise InputError(f"{datalist}: already exists; pass --overwrite to warp again")
    for _, src in found:  # every target can be registered: checked before anything is written
        if src.suffix == ".zip":
            members = check_zip(src, top="MASKS_DICOM")
            organs = {m.filename.split("/")[1].lower() for m in members if m.filename.count("/") >= 2}
        else:
            organs = {p.name.lower() for p in src.iterdir() if p.is_dir()}
        if "skin" not in organs or "liver" not in organs:
            raise InputError(f"{src}: needs 'skin' and 'liver' masks to be a registration target")

    # the real patients: CT and registration labels (their full MASKS_DICOM folder, as prepared)
    sources_loaded = []
    for e in real:
        masks_dir = Path(e["masks"]["liver"][0]).parent
        organs, affine = _read_masks(masks_dir)
        img = load_ct(e["image"])
        same_grid = np.allclose(np.asarray(img.affine), affine, atol=1e-3)
        if tuple(img.shape[1:]) != next(iter(organs.values())).shape or not same_grid:
            raise InputError(f"{masks_dir}: the masks' grid differs from the CT {e['image']}")
        labels = RegistrationLabels.from_organs(organs, affine)
        if "body" not in labels.masks:
            raise InputError(f"{masks_dir}: no 'skin' (body outline) mask; cannot register {e['patient']}")
        annotated = {c for c, a in zip(classes, e.get("annotated", [])) if a}
        sources_loaded.append((e["patient"], np.asarray(img[0], dtype=np.float32), labels, annotated))

    out.mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    entries, rows = [], []
    with tempfile.TemporaryDirectory(dir=out, prefix=".warp-") as tmp:
        for target_name, src in found:
            folder = src
            if src.suffix == ".zip":
                safe_extract(src, Path(tmp) / target_name, top="MASKS_DICOM")
                folder = Path(tmp) / target_name / "MASKS_DICOM"
            organs, t_affine = _read_masks(folder)
            target = RegistrationLabels.from_organs(organs, t_affine)
            chosen, _, _ = _resolve_classes(organ_map, {n: Path(n) for n in organs})
            class_masks = {c: np.any([organs[p.name] for p in paths], axis=0) for c, paths in chosen.items()}
            spacing = np.sqrt((t_affine[:3, :3] ** 2).sum(axis=0))
            for source_name, ct, labels, source_classes in sources_loaded:
                case = f"warp-{source_name}-to-{target_name}"
                result = warp_patient(
                    ct, labels, target, spacing_mm=spacing_mm, carry=source_labels if carry_missing else ()
                )
                liver = result.dice["liver"]
                weight = sampling_weight if liver >= min_liver_dice else low_weight
                found_labels = {
                    c: result.warped_labels.get(c) if c in source_labels else class_masks.get(c)
                    for c in classes[1:]
                    if c in source_classes
                }
                class_labels = {c: m for c, m in found_labels.items() if m is not None}
                annotate = list(class_labels)
                row = {
                    "case": case,
                    "source": source_name,
                    "target": target_name,
                    **{f"dice_{n}": result.dice.get(n, "") for n, _, _ in REGISTRATION_LABELS},
                    "seconds": round(result.seconds, 1),
                    "kept": weight > 0,
                    "sampling_weight": weight,
                }
                rows.append(row)
                log(
                    f"{case}: Dice "
                    + ", ".join(f"{n} {d:.3f}" for n, d in result.dice.items())
                    + f" ({result.seconds:.0f} s)"
                    + ("" if weight > 0 else f"; dropped (liver below {min_liver_dice})")
                )
                if weight <= 0:
                    continue
                stage, final = Path(tmp) / f"stage-{case}", out / case
                stage.mkdir()
                img = nib.Nifti1Image(np.round(np.clip(result.ct, -1024, 3071)).astype(np.int16), t_affine)
                img.set_qform(t_affine, code=1)
                img.set_sform(t_affine, code=1)
                nib.save(img, str(stage / "ct.nii.gz"))
                for c in annotate:
                    nib.save(nib.Nifti1Image(class_labels[c].astype(np.uint8), t_affine), str(stage / f"{c}.nii.gz"))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(stage, final)
                _overlay_png(
                    out / "overlays" / f"{case}.png",
                    result.ct,
                    class_labels,
                    spacing,
                    f"{source_name} CT warped onto {target_name}: the labels' contours (warped liver Dice {liver:.2f})",
                )
                entries.append(
                    {
                        "patient": case,
                        "image": f"{case}/ct.nii.gz",
                        "masks": {c: [f"{case}/{c}.nii.gz"] for c in annotate},
                        "annotated": [True] + [c in annotate for c in classes[1:]],
                        "shape": list(result.ct.shape),
                        "spacing": [round(float(s), 6) for s in spacing],
                        "source_patients": [source_name],
                        "anatomy_from": target_name,
                        "labels_from": {c: "source" if c in source_labels else "target" for c in annotate},
                        "warp_dice": result.dice,
                        "sampling_weight": weight,
                    }
                )
    buf = [",".join(rows[0])] if rows else []
    buf += [",".join(str(v) for v in r.values()) for r in rows]
    write_text_atomic(out / "warp_report.csv", "\n".join(buf) + "\n")
    write_json_atomic(
        datalist,
        {
            "name": "real CT warped onto 3D-IRCADb-01 mask-only anatomies",
            "source": str(dataset_dir.resolve()),
            "masks": str(Path(masks_root).resolve()),
            "classes": classes,
            "min_liver_dice": min_liver_dice,
            "training": entries,
            "validation": [],
            "test": [],
        },
    )
    kept = sum(r["kept"] for r in rows)
    log(f"wrote {datalist}: {kept} of {len(rows)} warped volumes kept")
    return datalist
