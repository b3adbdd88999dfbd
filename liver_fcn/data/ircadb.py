"""3D-IRCADb-01 discovery, safe extraction and datalist writing (``liver-fcn prepare``).

A 3D-IRCADb-01 tree has one folder per patient, ``3Dircadb1.N``, holding ``PATIENT_DICOM.zip``
(``PATIENT_DICOM/image_K``) and ``MASKS_DICOM.zip`` (``MASKS_DICOM/<organ>/image_K``), or the same
folders already unzipped. :func:`prepare` finds the patients, extracts what is zipped into the
output folder (safely, see :mod:`liver_fcn.data.archive`), checks every CT and every mask series it
uses, maps the organ folders to classes, and writes ``datalist.json``: one entry per patient with
the CT folder, the mask folders of each class, which classes are annotated, the geometry and the
volume of each class, in a seeded patient-wise training / validation / test split.

Nothing is written until everything has been checked: archives are extracted into a staging folder
inside the output folder and moved into place only once every patient is valid; the datalist is
written last, through a temporary file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom

from liver_fcn import CLASS_NAMES, __version__
from liver_fcn.data.archive import check_zip, safe_extract
from liver_fcn.data.dicom import inspect_series
from liver_fcn.errors import InputError
from liver_fcn.outputs import write_json_atomic

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_ORGANS",
    "find_patients",
    "load_class_mapping",
    "prepare",
    "split_patients",
]

DEFAULT_CLASSES: list[str] = list(CLASS_NAMES)
#: class -> alternatives; an alternative is one organ folder or a list of folders that together
#: make the class. The class is annotated for a patient when one alternative is complete.
DEFAULT_ORGANS: dict[str, list] = {
    "liver": ["liver"],
    "bone": ["bone"],
    "kidney": ["kidneys", ["leftkidney", "rightkidney"]],
}
PATIENT_RE = re.compile(r"^3Dircadb1\.(\d+)$")


def load_class_mapping(path: str | os.PathLike | None = None) -> tuple[list[str], dict[str, list]]:
    """Classes and organ alternatives, the defaults or from a JSON file ``{"classes": [...], "organs": {...}}``."""
    if path is None:
        return list(DEFAULT_CLASSES), {k: list(v) for k, v in DEFAULT_ORGANS.items()}
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: class mapping file does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: class mapping is not valid JSON ({e})") from None
    classes, organs = cfg.get("classes"), cfg.get("organs")
    if not isinstance(classes, list) or not classes or classes[0] != "background" or not isinstance(organs, dict):
        raise InputError(f'{path}: expected {{"classes": ["background", ...], "organs": {{class: [folders]}}}}')
    for name in classes[1:]:
        if name not in organs:
            raise InputError(f"{path}: class {name!r} has no organ folders")
    extra = set(organs) - set(classes)
    if extra:
        raise InputError(f"{path}: organs given for unknown classes {sorted(extra)}")
    return classes, organs


def _patient_number(p: Path) -> int:
    m = PATIENT_RE.match(p.name)
    return int(m.group(1)) if m else -1


def _part(patient: Path, name: str) -> Path:
    """The zip or folder of ``name`` (PATIENT_DICOM / MASKS_DICOM) in a patient folder."""
    folder, archive = patient / name, patient / f"{name}.zip"
    if folder.is_dir():
        return folder
    if archive.is_file():
        return archive
    raise InputError(f"{patient}: no {name}.zip or {name} folder (3D-IRCADb-01 layout expected)")


def find_patients(root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Patient folders under ``root`` (or ``root`` itself if it is one), and the entries left aside."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: 3D-IRCADb-01 folder does not exist")
    if not root.is_dir():
        raise InputError(f"{root}: expected the folder holding the 3Dircadb1.N patient folders, found a file")
    if PATIENT_RE.match(root.name) or (root / "PATIENT_DICOM.zip").exists() or (root / "PATIENT_DICOM").is_dir():
        return [root], []
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    patients = sorted((p for p in entries if p.is_dir() and PATIENT_RE.match(p.name)), key=_patient_number)
    others = [p for p in entries if p not in patients]
    if not patients:
        zips = [p.name for p in others if p.suffix == ".zip"]
        hint = f"; unzip {zips[0]} first" if zips else ""
        raise InputError(f"{root}: no 3D-IRCADb-01 patient folders (3Dircadb1.N) found{hint}")
    return patients, others


def _organ_folders(masks_root: Path) -> dict[str, Path]:
    if not masks_root.is_dir():
        raise InputError(f"{masks_root}: MASKS_DICOM folder missing after extraction")
    folders = {}
    for p in sorted(masks_root.iterdir()):
        if p.name.startswith("."):
            continue
        if not p.is_dir():
            raise InputError(f"{p}: expected one folder per organ in MASKS_DICOM, found a file")
        folders[p.name.lower()] = p
    return folders


def _resolve_classes(organs: dict[str, list], available: dict[str, Path]) -> tuple[dict, list[str], set[str]]:
    """Pick for each class the first complete alternative; return (class -> folders, notes, used names)."""
    chosen, notes, used = {}, [], set()
    for cls, alternatives in organs.items():
        for alt in alternatives:
            names = [alt] if isinstance(alt, str) else list(alt)
            present = [n for n in names if n.lower() in available]
            if len(present) == len(names):
                chosen[cls] = [available[n.lower()] for n in names]
                used.update(n.lower() for n in names)
                break
            if present:
                notes.append(
                    f"{cls}: only {', '.join(present)} of {' + '.join(names)} present; {cls} counted as not annotated"
                )
                used.update(n.lower() for n in present)
    return chosen, notes, used


def _mask_volume_ml(folder: Path, info) -> float:
    voxels = 0
    for f in info.files:
        ds = pydicom.dcmread(f)
        try:
            voxels += int(np.count_nonzero(ds.pixel_array))
        except Exception as e:
            raise InputError(f"{f}: cannot decode mask pixel data ({type(e).__name__}: {e})") from None
    return voxels * info.pixel_spacing[0] * info.pixel_spacing[1] * info.slice_spacing / 1000.0


def _check_patient(name: str, ct_dir: Path, masks_dir: Path, classes: list[str], organs: dict) -> dict:
    """Check one extracted patient and describe it (paths absolute here, made relative later)."""
    ct = inspect_series(ct_dir, modality="CT")
    available = _organ_folders(masks_dir)
    chosen, notes, used = _resolve_classes(organs, available)
    volumes = {}
    for cls, folders in chosen.items():
        vol = 0.0
        for folder in folders:
            m = inspect_series(folder, modality=None)
            if m.shape != ct.shape:
                raise InputError(
                    f"{folder}: mask series is {m.shape[0]}x{m.shape[1]}x{m.shape[2]}, "
                    f"the CT is {ct.shape[0]}x{ct.shape[1]}x{ct.shape[2]}"
                )
            if not np.allclose(m.positions, ct.positions, atol=1e-2):
                k = int(np.flatnonzero(~np.isclose(m.positions, ct.positions, atol=1e-2).all(axis=1))[0])
                raise InputError(f"{m.files[k]}: mask slice position differs from the CT's {ct.files[k].name}")
            vol += _mask_volume_ml(folder, m)
        volumes[cls] = round(vol, 2)
    annotated = [True] + [c in chosen for c in classes[1:]]
    return {
        "patient": name,
        "image": str(ct_dir),
        "masks": {c: [str(f) for f in chosen[c]] for c in classes[1:] if c in chosen},
        "annotated": annotated,
        "series_uid": ct.series_uid,  # identifies the scan in the data set's digest (MLflow's dataset input)
        "shape": list(ct.shape),
        "spacing": [ct.pixel_spacing[1], ct.pixel_spacing[0], round(ct.slice_spacing, 6)],
        "volumes_ml": volumes,
        "unmapped_masks": sorted(n for n in available if n not in used),
        "notes": notes,
    }


def _apportion(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` over groups proportionally to ``sizes`` (largest remainder)."""
    n = sum(sizes)
    if n == 0 or total == 0:
        return [0] * len(sizes)
    exact = [total * s / n for s in sizes]
    out = [int(e) for e in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


def patient_ids(wanted: Sequence[str], names, where: str) -> list[str]:
    """The datalist ids of ``wanted`` patients, given as ids (``3Dircadb1.7``) or numbers (``7``);
    one line naming the first that ``names`` lacks."""
    out = []
    for it in wanted:
        key = it if it in names else f"3Dircadb1.{it}"
        if key not in names:
            raise InputError(f"{it}: no such patient {where} (have {', '.join(names)})")
        out.append(key)
    return out


def split_patients(
    entries: list[dict],
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    val_patients: Sequence[str] = (),
    test_patients: Sequence[str] = (),
) -> dict[str, list[dict]]:
    """Seeded patient-wise split, stratified by which classes are annotated.

    Patients named in ``val_patients`` / ``test_patients`` (``3Dircadb1.7`` or ``7``) are pinned;
    the others are split by the fractions. ``test_patients=["all"]`` puts every patient in the test
    split (new patients to evaluate a trained model on). With two patients or more the validation split is never
    empty, with three or more neither is the test split (when its fraction is above zero).
    """
    if [str(p).lower() for p in test_patients] == ["all"]:  # a set to evaluate a trained model on
        if val_patients:
            raise InputError("--test_patients all leaves no patient for --val_patients")
        tests = sorted(entries, key=lambda e: _patient_number(Path(e["patient"])))
        return {"training": [], "validation": [], "test": tests}
    names = {e["patient"]: e for e in entries}
    pinned_val = patient_ids(val_patients, names, "for the validation split")
    pinned_test = patient_ids(test_patients, names, "for the test split")
    if set(pinned_val) & set(pinned_test):
        raise InputError(f"{sorted(set(pinned_val) & set(pinned_test))[0]}: pinned to both validation and test")
    free = [e for e in entries if e["patient"] not in pinned_val + pinned_test]
    n = len(entries)
    n_val = max(round(val_fraction * n), 1 if n >= 2 and val_fraction > 0 else 0) - len(pinned_val)
    n_test = max(round(test_fraction * n), 1 if n >= 3 and test_fraction > 0 else 0) - len(pinned_test)
    n_val, n_test = max(n_val, 0), max(n_test, 0)
    if pinned_val or pinned_test:
        n_val, n_test = (0 if pinned_val else n_val), (0 if pinned_test else n_test)
    while n_val + n_test >= len(free) and (n_val + n_test) > 0 and len(free) > 0:
        if n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for e in free:
        groups[tuple(e["annotated"])].append(e)
    keys = sorted(groups, key=lambda k: (-sum(k), k))
    rng = np.random.default_rng(seed)
    for k in keys:
        groups[k] = [groups[k][i] for i in rng.permutation(len(groups[k]))]
    sizes = [len(groups[k]) for k in keys]
    vals = _apportion(n_val, sizes)
    tests = _apportion(n_test, [s - v for s, v in zip(sizes, vals)])
    split = {"training": [], "validation": [names[p] for p in pinned_val], "test": [names[p] for p in pinned_test]}
    for k, nv, nt in zip(keys, vals, tests):
        g = groups[k]
        split["validation"] += g[:nv]
        split["test"] += g[nv : nv + nt]
        split["training"] += g[nv + nt :]
    for part in split.values():
        part.sort(key=lambda e: _patient_number(Path(e["patient"])))
    if not split["training"]:
        raise InputError("no patient left for training; lower the validation/test fractions or pin fewer patients")
    return split


def prepare(
    ircadb: str | os.PathLike,
    out: str | os.PathLike,
    mapping: str | os.PathLike | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    val_patients: Sequence[str] = (),
    test_patients: Sequence[str] = (),
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Find, extract, check and split a 3D-IRCADb-01 tree; return the path of ``datalist.json``."""
    classes, organs = load_class_mapping(mapping)
    patients, others = find_patients(ircadb)
    out = Path(out)
    datalist_path = out / "datalist.json"
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: output path exists and is not a folder")
    if datalist_path.exists() and not overwrite:
        raise InputError(f"{datalist_path}: already exists; pass --overwrite to prepare again")
    for p in others:
        log(f"note: {p} is not a 3Dircadb1.N patient folder; left aside")

    # check every archive before anything is written
    plan = []
    for patient in patients:
        ct_src, masks_src = _part(patient, "PATIENT_DICOM"), _part(patient, "MASKS_DICOM")
        if ct_src.suffix == ".zip":
            check_zip(ct_src, top="PATIENT_DICOM")
        if masks_src.suffix == ".zip":
            check_zip(masks_src, top="MASKS_DICOM")
        zipped = ct_src.suffix == ".zip" or masks_src.suffix == ".zip"
        if zipped and (out / patient.name).exists() and not overwrite:
            raise InputError(f"{out / patient.name}: already exists; pass --overwrite to replace it")
        plan.append((patient, ct_src, masks_src))

    created_out = not out.exists()
    stage = out / f".prepare-{os.getpid()}"
    entries = []
    try:
        for patient, ct_src, masks_src in plan:
            t0 = time.time()
            dest = stage / patient.name
            ct_dir = ct_src
            if ct_src.suffix == ".zip":
                safe_extract(ct_src, dest, top="PATIENT_DICOM")
                ct_dir = dest / "PATIENT_DICOM"
            masks_dir = masks_src
            if masks_src.suffix == ".zip":
                safe_extract(masks_src, dest, top="MASKS_DICOM")
                masks_dir = dest / "MASKS_DICOM"
            try:
                entry = _check_patient(patient.name, ct_dir, masks_dir, classes, organs)
            except InputError as e:  # name the archive member, not the staging copy
                msg = str(e)
                for src, top in ((ct_src, "PATIENT_DICOM"), (masks_src, "MASKS_DICOM")):
                    if src.suffix == ".zip":
                        msg = msg.replace(str(dest / top), f"{src}:{top}")
                raise InputError(msg) from None
            entry["_staged"] = dest.exists()
            entries.append(entry)
            vols = ", ".join(f"{c} {v:.0f} mL" for c, v in entry["volumes_ml"].items())
            missing = [c for c, a in zip(classes, entry["annotated"]) if not a]
            log(
                f"{patient.name}: {entry['shape'][0]}x{entry['shape'][1]}x{entry['shape'][2]} CT, {vols}"
                + (f"; not annotated: {', '.join(missing)}" if missing else "")
                + f" ({time.time() - t0:.1f} s)"
            )
            for note in entry["notes"]:
                log(f"note: {patient.name}: {note}")

        split = split_patients(entries, seed, val_fraction, test_fraction, val_patients, test_patients)
        # everything checked: move extracted patients into place, then write the datalist
        for entry in entries:
            staged = entry.pop("_staged")
            if not staged:
                continue
            final, src = out / entry["patient"], stage / entry["patient"]
            if final.exists():
                shutil.rmtree(final)
            os.replace(src, final)
            for key in ("image",):
                entry[key] = entry[key].replace(str(src), str(final), 1)
            entry["masks"] = {c: [f.replace(str(src), str(final), 1) for f in fs] for c, fs in entry["masks"].items()}
        base = out.resolve()

        def rel(p: str) -> str:
            p_abs = Path(p).resolve()
            return os.path.relpath(p_abs, base) if base in p_abs.parents else str(p_abs)

        for entry in entries:
            entry["image"] = rel(entry["image"])
            entry["masks"] = {c: [rel(f) for f in fs] for c, fs in entry["masks"].items()}

        datalist = {
            "name": "3D-IRCADb-01",
            "source": str(Path(ircadb).resolve()),
            "created_by": f"liver-fcn prepare {__version__}",
            "classes": classes,
            "organs": organs,
            "split": {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction},
            **split,
        }
        write_json_atomic(datalist_path, datalist)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created_out and out.exists() and not any(out.iterdir()):
            out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    log(
        f"wrote {datalist_path}: {len(split['training'])} training, {len(split['validation'])} validation, "
        f"{len(split['test'])} test patients"
    )
    return datalist_path
