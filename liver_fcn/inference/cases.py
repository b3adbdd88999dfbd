"""The cases of an inference run: ``--input`` resolved and every case checked before anything is written.

An input is a DICOM folder (sub-folders included), a zip of DICOM files, a NIfTI file, a folder of
NIfTI files (a case each) or a datalist of any of these. A DICOM input holding several series needs
``series_uid``: a SeriesInstanceUID or ``"auto"`` (:data:`~liver_fcn.data.dicom.AUTO_RULE`); the case
report names the series taken and why."""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from liver_fcn.data.dicom import dicom_folder, inspect_series, is_zip
from liver_fcn.errors import InputError, reported
from liver_fcn.rtstruct import check_rtstruct_support

__all__ = ["case_name", "check_nifti_affine", "check_output_dir", "collect_cases", "nifti_folder", "shard"]


def case_name(path: Path) -> str:
    """A case's name: a NIfTI's or zip's file name without its suffix, a DICOM folder's name (its parent's
    for a generic name such as ``DICOM``), with characters other than letters, digits and ``._-`` replaced."""
    if path.is_dir():
        name = path.name
        if name.upper() in ("PATIENT_DICOM", "DICOM", "CT", "IMAGES", "SERIES") and path.parent.name:
            name = path.parent.name
    else:
        name = re.sub(r"\.(nii(\.gz)?|zip)$", "", path.name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "case"


def check_nifti_affine(img, path) -> None:
    """Refuse a NIfTI whose voxel-to-world affine cannot place it: not finite, or singular (a zero
    or degenerate matrix, zero voxel volume), or whose qform and sform (both set) disagree by more
    than 1 mm over the volume. nibabel and MONAI would otherwise fall back to another matrix - an
    identity, say - and volumes in mL would silently be wrong."""
    header = img.header
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: NIfTI affine is not finite")
    lin = affine[:3, :3]
    size = np.sqrt((lin**2).sum(axis=0))
    if np.any(size < 1e-6) or abs(np.linalg.det(lin)) < 1e-9 * max(float(np.prod(size)), 1e-30):
        raise InputError(
            f"{path}: NIfTI affine is singular (voxel sizes {np.round(size, 4).tolist()} mm): "
            "the voxels cannot be placed"
        )
    if hasattr(header, "get_qform") and int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0:
        q, s = header.get_qform(), header.get_sform()
        shape = np.asarray(img.shape[:3], dtype=np.float64)
        corners = np.array(
            [[a, b, c, 1.0] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)]
        )
        gap = float(np.abs(corners @ q.T - corners @ s.T)[:, :3].max())
        if gap > 1.0:
            raise InputError(
                f"{path}: NIfTI qform and sform disagree by {gap:.1f} mm; fix the header or drop one of them"
            )


def _check_complete(path: Path, img) -> None:
    """The file holds all its voxels: a ``.nii.gz`` is decompressed through, a chunk at a time and
    nothing kept (a truncated or corrupt stream fails here, before any output, not halfway through the
    run); a ``.nii`` is long enough."""
    needed = int(img.header.get_data_offset()) + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    if path.name.lower().endswith(".gz"):
        size = 0
        try:
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as e:
            raise InputError(f"{path}: truncated or corrupt compressed NIfTI ({type(e).__name__}: {e})") from None
    else:
        size = path.stat().st_size
    if size < needed:
        raise InputError(f"{path}: NIfTI file is truncated ({size} bytes of data and header, {needed} expected)")


def _check_nifti(path: Path) -> tuple:
    try:
        img = nib.load(str(path))
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise InputError(f"{path}: NIfTI image has shape {img.shape}; a 3D CT volume is expected")
        np.asanyarray(img.dataobj[..., :1])  # reads (and so checks) the start of the data
        check_nifti_affine(img, path)
        if not np.issubdtype(img.get_data_dtype(), np.floating):
            _check_complete(path, img)
        if np.issubdtype(img.get_data_dtype(), np.floating):  # only floats can hold NaN: read them all
            data = np.asanyarray(img.dataobj)
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if bad:
                raise InputError(
                    f"{path}: {bad} voxel{'s' if bad != 1 else ''} not finite (NaN or infinity); "
                    "a CT holds numbers of HU"
                )
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    return shape


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def nifti_folder(path: Path) -> list[Path] | None:
    """The NIfTI files of a folder (sub-folders included, hidden files left out) when it holds any,
    else None (a DICOM folder). A folder mixing NIfTI with other files is refused, naming one."""
    files = sorted(
        Path(root) / n
        for root, dirs, names in os.walk(path)
        if not any(part.startswith(".") for part in Path(root).relative_to(path).parts)
        for n in names
        if not n.startswith(".")
    )
    nifti = [f for f in files if _is_nifti(f)]
    if not nifti:
        return None
    other = next((f for f in files if not _is_nifti(f)), None)
    if other is not None:
        raise InputError(
            f"{other}: not a NIfTI file, in a folder of {len(nifti)} NIfTI files; "
            "a folder holds either NIfTI files (a case each) or one DICOM series"
        )
    return nifti


def _check_one(path: Path, series_uid: str | None) -> dict:
    if not path.exists():
        raise InputError(f"{path}: input does not exist")
    if path.is_dir() or is_zip(path):
        with dicom_folder(path) as folder:  # the reader takes a folder's checked headers
            info = inspect_series(folder, series_uid=series_uid, modality="CT", keep=folder == path)
        return {
            "image": str(path),
            "kind": "dicom",
            # what the reader takes again: the UID, or the rule for a picked series without one
            "series_uid": info.series_uid or series_uid or "",
            "series_info": json.dumps(info.summary()),
        }
    if _is_nifti(path):
        _check_nifti(path)
        return {"image": str(path), "kind": "nifti", "series_uid": ""}
    if path.name.lower().endswith(".json"):
        raise InputError(f"{path}: a datalist must be the --input itself, not an entry of one")
    raise InputError(
        f"{path}: not a DICOM series folder or zip, a NIfTI file (.nii, .nii.gz), a folder of NIfTI files "
        "or a datalist (.json)"
    )


@reported
def collect_cases(
    input: str | os.PathLike | None,
    split: str = "test",
    series_uid: str | None = None,
    dicom_seg: bool = False,
    rtstruct: bool = False,
) -> list[dict]:
    """Resolve and check ``--input``; returns ``[{"case", "image", "kind", "series_uid", ...}]`` (DICOM
    cases also ``series_info``: the series taken, as JSON).

    A datalist may be a JSON list (of paths or of ``{"image": path}``) or a ``liver-fcn prepare``
    datalist, whose ``split`` is used. Paths in a datalist are relative to its folder.
    """
    if input is None or str(input) in ("", "None"):
        raise InputError(
            "no input: pass --input with a DICOM series folder or zip, a NIfTI file or folder, or a datalist JSON "
            "(or --dataset_dir, a folder holding datalist.json)"
        )
    path = Path(input)
    if path.is_file() and path.name.lower().endswith(".json"):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: datalist is not valid JSON ({e})") from None
        if isinstance(data, dict):
            if split not in data:
                raise InputError(f"{path}: datalist has no {split!r} split; pass --split")
            data = data[split]
        if not isinstance(data, list) or not data:
            raise InputError(f"{path}: datalist holds no cases")
        entries = []
        for e in data:
            e = {"image": e} if isinstance(e, str) else dict(e)
            if "image" not in e:
                raise InputError(f"{path}: datalist entry without 'image': {e}")
            img = Path(e["image"])
            e["image"] = str(img if img.is_absolute() else path.parent / img)
            entries.append(e)
    elif path.is_dir() and (nifti := nifti_folder(path)) is not None:
        entries = [{"image": str(f)} for f in nifti]
    else:
        entries = [{"image": str(path)}]
    if rtstruct:
        check_rtstruct_support()
    cases, seen = [], {}
    for e in entries:
        case = _check_one(Path(e["image"]), series_uid)
        name = case_name(Path(e["image"])) if "patient" not in e else str(e["patient"])
        if name in seen:
            raise InputError(f"{e['image']}: case name {name!r} is also that of {seen[name]}; outputs would collide")
        seen[name] = e["image"]
        if dicom_seg and case["kind"] != "dicom":
            raise InputError(f"{e['image']}: a DICOM Segmentation needs a DICOM series input, not {case['kind']}")
        if rtstruct and case["kind"] != "dicom":
            raise InputError(f"{e['image']}: an RTSTRUCT needs a DICOM series input, not {case['kind']}")
        if rtstruct and not json.loads(case["series_info"])["series_uid"]:
            raise InputError(
                f"{e['image']}: the series has no SeriesInstanceUID; an RTSTRUCT references its images by UID"
            )
        cases.append({"case": name, **case})
    return cases


@reported
def check_output_dir(path: str | os.PathLike) -> bool:
    """Refuse, before any work, an output folder that cannot be written: a file in its place or on its
    path, or no write permission where it would be created. Creates nothing."""
    p = Path(path).absolute()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{path}: output folder cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{path}: output folder is not writable ({probe}: permission denied)")
    return True


def shard(cases: list[dict], rank: int | None = None, world_size: int | None = None) -> list[dict]:
    """This process's share of ``cases`` under ``torchrun`` (every ``world_size``-th case from
    ``rank``; ``RANK`` and ``WORLD_SIZE`` from the environment by default). All of them without it."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    return list(cases[rank::world_size])
