"""A case's outputs as named post-processing steps, staged and moved into place as one set."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from liver_fcn.dicom_seg import write_dicom_seg
from liver_fcn.inference.report import case_report, hu_statistics, quality_flags, summary_line
from liver_fcn.options import flag
from liver_fcn.outputs import atomic_path, naming_the_file, write_json_atomic
from liver_fcn.rtstruct import write_rtstruct
from liver_fcn.transforms import as_numpy, class_map_array
from liver_fcn.transforms.utils import transposed_copy
from liver_fcn.visualize import overlay_montage

logger = logging.getLogger("liver_fcn.inference")

__all__ = [
    "CaseOutput",
    "CaseReportd",
    "CommitCased",
    "STAGE_SUFFIX",
    "StageCased",
    "WriteDicomSegd",
    "WriteRTStructd",
    "WriteMaskd",
    "WriteOverlayd",
    "leftover_stages",
    "write_nifti_atomic",
]


def fortran_ordered(array: np.ndarray) -> np.ndarray:
    """``array`` in Fortran order, a NIfTI file's order on disk, so nibabel writes it as it is (its own
    transpose of a C-ordered 512 x 512 x 129 class map takes 0.23 s; :func:`transposed_copy` 0.05 s).
    An array already in that order is returned as it is."""
    array = np.asarray(array)
    return array if array.flags.f_contiguous else transposed_copy(array, range(array.ndim)[::-1]).T


def write_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a NIfTI file through a temporary name and an atomic rename."""
    img = nib.Nifti1Image(fortran_ordered(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path, ".tmp.nii.gz") as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def _class_map_and_affine(pred, key, who: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 class map (X, Y, Z) and the float64 affine of ``pred``, as NumPy views where they can
    be: each output step of a case reads them, and none needs a copy of the volume."""
    return class_map_array(pred, key, who).astype(np.uint8, copy=False), as_numpy(pred.affine, np.float64)


class StageCased(Transform):
    """Open the case's staging folder in ``output_dir`` (``d["stage"]``): the output steps after it
    (:class:`WriteMaskd`, :class:`CaseReportd`, :class:`WriteOverlayd`, :class:`WriteDicomSegd`, or a
    user's own :class:`CaseOutput`) write into it, and :class:`CommitCased` moves the set into place.
    A case that fails in between leaves only its staging folder, which :func:`finish` removes."""

    def __init__(self, output_dir: str | os.PathLike = "inference") -> None:
        self.output_dir = Path(output_dir)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        d["stage"] = tempfile.mkdtemp(
            prefix=f".{d.get('case', 'case')}@{writer_id()}@", suffix=STAGE_SUFFIX, dir=self.output_dir
        )
        d["outputs"] = {}
        return d


#: the staging folders' name ending; their names are ``.<case>@<host>:<pid>@<random>.stage``
STAGE_SUFFIX = ".stage"


def leftover_stages(output_dir: str | os.PathLike) -> list[Path]:
    """The staging folders in ``output_dir`` that no running process will commit: this process's
    own (cases that failed) and those of processes of this host that are gone (a killed run). Those
    of another run still at work in the folder are left to it."""
    me, host = writer_id(), socket.gethostname()
    out = []
    for stage in Path(output_dir).glob(f".*{STAGE_SUFFIX}"):
        parts = stage.name[: -len(STAGE_SUFFIX)].rsplit("@", 2)
        owner = parts[1] if len(parts) == 3 else ""  # an older run's name: no owner, left over
        owner_host, _, pid = owner.rpartition(":")
        if owner == me or not pid.isdigit() or (owner_host == host and not _alive(int(pid))):
            out.append(stage)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class CaseOutput(MapTransform):
    """One file of a case, written into its staging folder (:class:`StageCased`) and named in
    ``d["outputs"]``. ``enabled=False`` (a bundle option such as ``--overlay false``) writes nothing.

    Expects ``pred``: the class map (1, X, Y, Z) on the input's grid (a MetaTensor with the input's
    affine) and ``case``. Subclasses set :attr:`name` and :attr:`suffix` and implement :meth:`write`.
    """

    #: the output's name in the report's ``files``, and the end of its file name
    name, suffix = "output", ""

    def __init__(self, keys: KeysCollection = "pred", enabled: bool = True) -> None:
        super().__init__(keys)
        self.enabled = flag(enabled, self.name)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        if "stage" not in d:
            raise RuntimeError(f"{type(self).__name__} runs after StageCased, which opens the case's staging folder")
        for key in self.key_iterator(d):
            seg, affine = _class_map_and_affine(d[key], key, type(self).__name__)
            path = Path(d["stage"]) / f"{d.get('case', 'case')}{self.suffix}"
            with naming_the_file(Path(self.output_dir_of(d)) / path.name, staged_as=path):
                self.write(d, seg, affine, path)
            d["outputs"][self.name] = path.name
        return d

    def write(self, d: dict, seg: np.ndarray, affine: np.ndarray, path: Path) -> None:
        raise NotImplementedError

    @staticmethod
    def output_dir_of(d: dict) -> Path:
        return Path(d["stage"]).parent


class WriteMaskd(CaseOutput):
    """``<case>_seg.nii.gz``: the uint8 class map on the input's own grid."""

    name, suffix = "mask", "_seg.nii.gz"

    def write(self, d, seg, affine, path) -> None:
        write_nifti_atomic(seg, affine, path)


class CaseReportd(MapTransform):
    """The case report (``d["report"]``: volumes, mean and median HU of each organ in the CT ``ct_key``,
    liver extent, slice range, spacing, QC flags, and the ``model`` that made the mask), written as
    ``<case>_report.json`` by :class:`CommitCased` once every file of the case is there."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        *,
        class_names: Sequence[str],
        qc_liver_ml: Sequence[float] = (800.0, 3000.0),
        qc_max_entropy: float = 0.35,
        model: Mapping | None = None,
        ct_key: str = "ct",
    ) -> None:
        super().__init__(keys)
        self.class_names = list(class_names)
        self.qc_liver_ml, self.qc_max_entropy = tuple(qc_liver_ml), float(qc_max_entropy)
        self.model, self.ct_key = dict(model or {}), ct_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            seg, affine = _class_map_and_affine(d[key], key, type(self).__name__)
            report = case_report(seg, affine, self.class_names, str(d.get("case", "case")))
            report["input"] = d.get("source_path", "")
            if d.get("series_info"):
                report["series"] = json.loads(d["series_info"])
            if self.ct_key in d:
                report["hu"] = hu_statistics(np.asarray(d[self.ct_key].detach().cpu())[0], seg, self.class_names)
            report["qc"] = quality_flags(
                seg,
                affine,
                self.class_names,
                report["volumes_ml"],
                d.get("entropy"),
                d.get("components"),
                self.qc_liver_ml,
                self.qc_max_entropy,
            )
            if self.model:
                report["model"] = self.model
            d["report"] = report
        return d


class WriteOverlayd(CaseOutput):
    """``<case>_overlay.png``: predicted contours on the CT (``ct_key``, HU), in RAS voxel order
    whatever the input's orientation."""

    name, suffix = "overlay", "_overlay.png"

    def __init__(
        self,
        keys: KeysCollection = "pred",
        enabled: bool = True,
        *,
        class_names: Sequence[str],
        ct_key: str = "ct",
        window: Sequence[float] = (-250, 450),
    ) -> None:
        super().__init__(keys, enabled)
        self.class_names, self.ct_key, self.window = list(class_names), ct_key, tuple(window)

    def write(self, d, seg, affine, path) -> None:
        ct = np.asarray(d[self.ct_key].detach().cpu())[0] if self.ct_key in d else np.zeros(seg.shape)
        transform = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(("R", "A", "S"))
        )
        overlay_montage(
            nib.orientations.apply_orientation(ct, transform),
            path,
            pred=nib.orientations.apply_orientation(seg, transform),
            class_names=self.class_names,
            window=self.window,
            title=f"{d.get('case', 'case')}: predicted contours",
        )


class WriteDicomSegd(CaseOutput):
    """``<case>_seg.dcm``: a DICOM Segmentation object referencing the CT series (DICOM input only;
    :func:`collect_cases` refuses ``--dicom_seg`` for a NIfTI before anything runs)."""

    name, suffix = "dicom_seg", "_seg.dcm"

    def __init__(self, keys: KeysCollection = "pred", enabled: bool = False, *, class_names: Sequence[str]) -> None:
        super().__init__(keys, enabled)
        self.class_names = list(class_names)

    def write(self, d, seg, affine, path) -> None:
        generated: list[str] = []
        write_dicom_seg(d["source_path"], seg, self.class_names, path, d.get("series_uid"), generated_uids=generated)
        if generated and "report" in d:
            d["report"]["dicom_seg_note"] = (
                f"the CT series has no {', '.join(generated)}: the SEG references generated UIDs, "
                "so a PACS cannot match it to the series by UID"
            )


class WriteRTStructd(CaseOutput):
    """``<case>_rtstruct.dcm``: a DICOM RT Structure Set of the mask's contours referencing the CT
    series (DICOM input only; :func:`collect_cases` refuses ``--rtstruct`` for a NIfTI, or without
    rt-utils, before anything runs)."""

    name, suffix = "rtstruct", "_rtstruct.dcm"

    def __init__(self, keys: KeysCollection = "pred", enabled: bool = False, *, class_names: Sequence[str]) -> None:
        super().__init__(keys, enabled)
        self.class_names = list(class_names)

    def write(self, d, seg, affine, path) -> None:
        write_rtstruct(d["source_path"], seg, self.class_names, path, d.get("series_uid"))


def writer_id() -> str:
    """Who commits a case set: ``host:pid``, in each report and in the summary's ``written``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` itself (``flock`` on its descriptor, no lock file), held while a
    case set is moved into place, so that two runs writing into one folder never interleave a set.
    Where ``fcntl`` is missing (Windows) the sets are moved unlocked."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class CommitCased(Transform):
    """Move the case's staged files into ``output_dir`` as one set, the report last (its presence
    means the set is complete), remove files of an earlier run that this one did not make (by the
    known ``suffixes``: by default those of the shipped output steps), log the case's one-line
    summary and keep the report for :func:`finish`."""

    def __init__(
        self, output_dir: str | os.PathLike = "inference", suffixes: Sequence[str] | None = None, log=None
    ) -> None:
        if suffixes is None:  # the files the shipped output steps write
            suffixes = [step.suffix for step in (WriteMaskd, WriteOverlayd, WriteDicomSegd, WriteRTStructd)]
        self.output_dir, self.suffixes = Path(output_dir), tuple(suffixes)
        self.log = log or logger.info
        self.written: list[dict] = []

    def earlier_outputs(self, case: str) -> list[str]:
        """The names of the files of ``case`` that an earlier run left in ``output_dir`` (the known
        ``suffixes`` and the report): a whole set, since sets are committed report last."""
        names = [f"{case}{sfx}" for sfx in self.suffixes] + [f"{case}_report.json"]
        return [n for n in names if (self.output_dir / n).is_file()]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        case, stage = str(d.get("case", "case")), Path(d["stage"])
        report = dict(d.get("report") or {"case": case})
        made = {name: self.output_dir / filename for name, filename in d.get("outputs", {}).items()}
        report["files"] = {name: str(path) for name, path in made.items()}
        if "mask" in made:
            report["mask"] = str(made["mask"])
        report["written_by"] = writer_id()
        report["written_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        report_path = self.output_dir / f"{case}_report.json"
        with naming_the_file(report_path, staged_as=stage / report_path.name):
            write_json_atomic(stage / report_path.name, report)
        try:
            with folder_lock(self.output_dir):  # another run into this folder commits its sets whole too
                for sfx in self.suffixes:  # files of an earlier run that this one does not make
                    old = self.output_dir / f"{case}{sfx}"
                    if old not in made.values():
                        old.unlink(missing_ok=True)
                for path in [*made.values(), report_path]:
                    os.replace(stage / path.name, path)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self.log(summary_line(report, made.get("mask", "")))
        self.written.append(report)
        return d
