"""Bundle inference on new CTs: input checks, self-describing checkpoints, per-case outputs.

MONAI gives the engine (SupervisedEvaluator, SliceInferer, DataLoader workers) and the transforms;
:mod:`liver_fcn.transforms` brings the logits back onto the input's grid; this module adds what a
clinical input and an archive of thousands need around them:

* :func:`collect_cases` resolves ``--input`` (a DICOM series folder, a NIfTI file, or a datalist
  JSON of many) and checks every case *before* anything is written, so a bad input never leaves
  half of the outputs behind; :func:`shard` gives each ``torchrun`` process its share;
* the checkpoint (:mod:`liver_fcn.checkpoint`) carries the settings of its network and
  preprocessing, so inference rebuilds both as training had them without being told;
* :class:`Precision` runs the network in bf16 where the device has it natively (``precision: auto``)
  and counts the network's own time;
* the case's outputs are named steps of inference.json's post-processing, each switchable or
  replaceable: :class:`WriteMaskd` (the uint8 NIfTI mask on the input's own grid),
  :class:`CaseReportd` (volumes, liver extent, slice range, spacing, QC flags), :class:`WriteOverlayd`
  (a PNG) and :class:`WriteDicomSegd` (a DICOM Segmentation object), between :class:`StageCased` and
  :class:`CommitCased`, which moves the case's files into place as one set;
* :class:`CaseDataset` and :class:`CaseRunner` make a case that fails after the checks a line in
  the summary instead of the end of the run; :func:`finish` writes the one ``summary.json`` of
  all processes and sets the exit status.
"""

from __future__ import annotations

import logging
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import Dataset
from monai.transforms import MapTransform, Transform

from liver_fcn.data.dicom import inspect_series
from liver_fcn.errors import InputError, reported, root_cause
from liver_fcn.outputs import atomic_path, write_json_atomic
from liver_fcn.transforms import as_numpy, class_map_array

__all__ = [
    "Precision",
    "flag",
    "native_bf16",
    "quality_flags",
    "resolve_precision",
    "CaseDataset",
    "CaseRunner",
    "CaseOutput",
    "CaseReportd",
    "CommitCased",
    "StageCased",
    "WriteDicomSegd",
    "WriteMaskd",
    "WriteOverlayd",
    "finish",
    "shard",
    "case_report",
    "check_output_dir",
    "collect_cases",
    "write_nifti_atomic",
]

logger = logging.getLogger(__name__)

def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX-BF16 (read from /proc/cpuinfo; False where it cannot be read)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@reported
def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` where the device has native bf16, else ``"fp32"``; others unchanged."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in ("fp32", "bf16"):
        raise InputError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return precision


@reported
def flag(value, name: str = "option") -> bool:
    """A boolean bundle option as typed on the command line: ``True``/``False`` or the words
    true/false, yes/no, on/off, 1/0 in any case (``--overlay false`` reaches the config as the
    string ``"false"``, which Python would take as true). Anything else is refused with one line."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("true", "yes", "on", "1"):
            return True
        if word in ("false", "no", "off", "0"):
            return False
    raise InputError(f"--{name} must be true or false, got {value!r}")


class Precision(torch.nn.Module):
    """Run a network in fp32 or under bf16 autocast, optionally in channels-last memory layout.

    MONAI's engines take ``amp`` for CUDA only; this wrapper works on CPUs and GPUs alike, for
    inference and for training (autocast's backward runs in the same precision; the weights, the
    optimizer and the loss stay float32). The output is always float32. Load weights into ``net``
    itself (the wrapper adds no parameters). ``precision="auto"`` picks bf16 where the device has
    it natively (:func:`native_bf16`).
    """

    def __init__(self, net: torch.nn.Module, precision: str = "fp32", channels_last: bool = False) -> None:
        super().__init__()
        device = next(iter(net.parameters()), torch.empty(0)).device
        self.net, self.precision = net, resolve_precision(precision, device)
        self.channels_last = flag(channels_last, "channels_last")
        self.seconds = 0.0  # time spent in the network under no_grad (inference), for the run's summary
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        timed = not torch.is_grad_enabled()  # inference: count the network's own time
        if timed:
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            y = self.net(x)
        y = y.float()
        if timed:
            if y.device.type == "cuda":
                torch.cuda.synchronize(y.device)
            self.seconds += time.perf_counter() - t0
        return y


def _case_name(path: Path) -> str:
    if path.is_dir():
        name = path.name
        if name.upper() in ("PATIENT_DICOM", "DICOM", "CT", "IMAGES", "SERIES") and path.parent.name:
            name = path.parent.name
    else:
        name = re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)
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
        raise InputError(f"{path}: NIfTI affine is singular (voxel sizes {np.round(size, 4).tolist()} mm): the voxels cannot be placed")
    if hasattr(header, "get_qform") and int(header["qform_code"]) > 0 and int(header["sform_code"]) > 0:
        q, s = header.get_qform(), header.get_sform()
        shape = np.asarray(img.shape[:3], dtype=np.float64)
        corners = np.array([[a, b, c, 1.0] for a in (0, shape[0] - 1) for b in (0, shape[1] - 1) for c in (0, shape[2] - 1)])
        gap = float(np.abs(corners @ q.T - corners @ s.T)[:, :3].max())
        if gap > 1.0:
            raise InputError(f"{path}: NIfTI qform and sform disagree by {gap:.1f} mm; fix the header or drop one of them")


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
        if np.issubdtype(img.get_data_dtype(), np.floating):  # only floats can hold NaN: read them all
            data = np.asanyarray(img.dataobj)
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if bad:
                raise InputError(f"{path}: {bad} voxel{'s' if bad != 1 else ''} not finite (NaN or infinity); a CT holds numbers of HU")
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    return shape


def _check_one(path: Path, series_uid: str | None) -> dict:
    if not path.exists():
        raise InputError(f"{path}: input does not exist")
    if path.is_dir():
        info = inspect_series(path, series_uid=series_uid, modality="CT")
        return {"image": str(path), "kind": "dicom", "series_uid": info.series_uid}
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti(path)
        return {"image": str(path), "kind": "nifti", "series_uid": ""}
    if path.name.lower().endswith(".json"):
        raise InputError(f"{path}: a datalist must be the --input itself, not an entry of one")
    raise InputError(f"{path}: not a DICOM series folder, a NIfTI file (.nii, .nii.gz) or a datalist (.json)")


@reported
def collect_cases(
    input: str | os.PathLike | None, split: str = "test", series_uid: str | None = None, dicom_seg: bool = False
) -> list[dict]:
    """Resolve and check ``--input``; returns ``[{"case", "image", "kind", ...}]``.

    A datalist may be a JSON list (of paths or of ``{"image": path}``) or a ``liver-fcn prepare``
    datalist, whose ``split`` is used. Paths in a datalist are relative to its folder.
    """
    if input is None or str(input) in ("", "None"):
        raise InputError("no input: pass --input with a DICOM series folder, a NIfTI file or a datalist JSON")
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
    else:
        entries = [{"image": str(path)}]
    cases, seen = [], {}
    for e in entries:
        case = _check_one(Path(e["image"]), series_uid)
        name = _case_name(Path(e["image"])) if "patient" not in e else str(e["patient"])
        if name in seen:
            raise InputError(f"{e['image']}: case name {name!r} is also that of {seen[name]}; outputs would collide")
        seen[name] = e["image"]
        if dicom_seg and case["kind"] != "dicom":
            raise InputError(f"{e['image']}: a DICOM Segmentation needs a DICOM series input, not {case['kind']}")
        cases.append({"case": name, **case})
    return cases


def write_nifti_atomic(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Save a NIfTI file through a temporary name and an atomic rename."""
    img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path, ".tmp.nii.gz") as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def case_report(seg: np.ndarray, affine: np.ndarray, class_names: Sequence[str], case: str = "") -> dict:
    """Volumes of each class (mL) and the liver's extent and slice range, from a mask and its affine.

    Extent is measured along the patient axes in mm (width: right-left, depth: anterior-posterior,
    height: head-feet) between the outer faces of the outermost liver voxels; the slice range is in
    the input's own slice order (third voxel axis).
    """
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    report: dict = {
        "case": case,
        "shape": [int(s) for s in seg.shape],
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "volumes_ml": {},
        "voxels": {},
    }
    for c, name in enumerate(class_names):
        if c == 0:
            continue
        n = int(np.count_nonzero(seg == c))
        report["voxels"][name] = n
        report["volumes_ml"][name] = n * voxel_ml
    liver = np.argwhere(seg == 1)
    if liver.size:
        # the corners of the voxels at both ends of each voxel axis, in world (RAS) mm
        lo, hi = liver.min(axis=0), liver.max(axis=0)
        corners = np.array([[a, b, c, 1.0] for a in (lo[0] - 0.5, hi[0] + 0.5) for b in (lo[1] - 0.5, hi[1] + 0.5) for c in (lo[2] - 0.5, hi[2] + 0.5)])
        world = corners @ affine.T
        ext = world[:, :3].max(axis=0) - world[:, :3].min(axis=0)
        report["liver_extent_mm"] = {"width": round(float(ext[0]), 1), "depth": round(float(ext[1]), 1), "height": round(float(ext[2]), 1)}
        report["liver_slices"] = [int(lo[2]), int(hi[2])]
    else:
        report["liver_extent_mm"] = None
        report["liver_slices"] = None
    return report


def quality_flags(
    seg: np.ndarray, affine: np.ndarray, class_names: Sequence[str], volumes_ml: Mapping[str, float],
    entropy: Mapping | None = None, components: Mapping | None = None,
    liver_range_ml: Sequence[float] = (800.0, 3000.0), max_entropy: float = 0.35,
) -> dict:
    """Quality-control flags of one case's mask, for a human to look at before using it.

    - the liver volume outside ``liver_range_ml`` (an adult liver is 1.2-2.1 L in the 16
      3D-IRCADb-01 livers measured; the default flags only the implausible);
    - the liver in several components of at least the counter's size before post-processing
      (``components``, from :class:`~liver_fcn.transforms.CountComponentsd`);
    - the liver or a kidney touching the first or last slice along the head-feet axis: the scan may
      cut the organ off, and its volume is then too small;
    - a mean normalised entropy of the class probabilities above ``max_entropy`` inside a segmented
      organ (``entropy``, from :class:`~liver_fcn.transforms.ResampleToInputd`): the network was unsure.
    """
    flags: list[str] = []
    liver_ml = float(volumes_ml.get("liver", 0.0))
    lo, hi = (float(v) for v in liver_range_ml)
    if not lo <= liver_ml <= hi:
        flags.append(f"liver volume {liver_ml:.0f} mL outside {lo:.0f}-{hi:.0f} mL")
    pieces = list((components or {}).get("1", []))
    if len(pieces) > 1:
        flags.append(f"liver in {len(pieces)} large pieces before post-processing ({', '.join(f'{v:.0f}' for v in pieces)} mL)")
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    axis = int(np.argmax(np.abs(a[2]) / np.maximum(np.sqrt((a**2).sum(axis=0)), 1e-12)))  # the head-feet voxel axis
    ends = np.concatenate([np.take(seg, [0], axis=axis).ravel(), np.take(seg, [seg.shape[axis] - 1], axis=axis).ravel()])
    for c, name in enumerate(class_names):
        if name in ("liver", "kidney") and np.any(ends == c):
            flags.append(f"{name} touches the first or last slice: the scan may cut it off")
    mean_entropy = {class_names[int(c)]: round(float(h), 4) for c, h in (entropy or {}).items() if int(c) < len(class_names)}
    for name, h in mean_entropy.items():
        if name in ("liver", "kidney") and h > max_entropy:
            flags.append(f"low confidence in the {name} (mean entropy {h:.2f} > {max_entropy:.2f})")
    return {"flags": flags, "mean_entropy": mean_entropy, "liver_components_ml": [round(v, 1) for v in pieces]}


def summary_line(report: dict, mask_path: str | os.PathLike) -> str:
    vols = report["volumes_ml"]
    parts = [f"{report['case']}:"]
    if report.get("liver_extent_mm"):
        e, s = report["liver_extent_mm"], report["liver_slices"]
        parts.append(
            f"liver {vols.get('liver', 0):.0f} mL ({e['width']:.0f} x {e['depth']:.0f} x {e['height']:.0f} mm, "
            f"slices {s[0]}-{s[1]})"
        )
    else:
        parts.append("no liver found")
    parts += [f"{k} {v:.0f} mL" for k, v in vols.items() if k != "liver"]
    flags = (report.get("qc") or {}).get("flags") or []
    qc = f" [QC: {'; '.join(flags)}]" if flags else ""
    return " ".join(parts[:2]) + (", " + ", ".join(parts[2:]) if len(parts) > 2 else "") + qc + f" -> {mask_path}"


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
        d["stage"] = tempfile.mkdtemp(prefix=f".{d.get('case', 'case')}.", suffix=STAGE_SUFFIX, dir=self.output_dir)
        d["outputs"] = {}
        return d


#: the staging folders' name ending
STAGE_SUFFIX = ".stage"


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
            self.write(d, seg, affine, path)
            d["outputs"][self.name] = path.name
        return d

    def write(self, d: dict, seg: np.ndarray, affine: np.ndarray, path: Path) -> None:
        raise NotImplementedError


class WriteMaskd(CaseOutput):
    """``<case>_seg.nii.gz``: the uint8 class map on the input's own grid."""

    name, suffix = "mask", "_seg.nii.gz"

    def write(self, d, seg, affine, path) -> None:
        write_nifti_atomic(seg, affine, path)


class CaseReportd(MapTransform):
    """The case report (``d["report"]``: volumes, liver extent, slice range, spacing, QC flags), written
    as ``<case>_report.json`` by :class:`CommitCased` once every file of the case is there."""

    def __init__(
        self,
        keys: KeysCollection = "pred",
        *,
        class_names: Sequence[str],
        qc_liver_ml: Sequence[float] = (800.0, 3000.0),
        qc_max_entropy: float = 0.35,
    ) -> None:
        super().__init__(keys)
        self.class_names = list(class_names)
        self.qc_liver_ml, self.qc_max_entropy = tuple(qc_liver_ml), float(qc_max_entropy)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            seg, affine = _class_map_and_affine(d[key], key, type(self).__name__)
            report = case_report(seg, affine, self.class_names, str(d.get("case", "case")))
            report["input"] = d.get("source_path", "")
            report["qc"] = quality_flags(
                seg, affine, self.class_names, report["volumes_ml"], d.get("entropy"), d.get("components"),
                self.qc_liver_ml, self.qc_max_entropy,
            )
            d["report"] = report
        return d


class WriteOverlayd(CaseOutput):
    """``<case>_overlay.png``: predicted contours on the CT (``ct_key``, HU), in RAS voxel order
    whatever the input's orientation."""

    name, suffix = "overlay", "_overlay.png"

    def __init__(self, keys: KeysCollection = "pred", enabled: bool = True, *, class_names: Sequence[str],
                 ct_key: str = "ct", window: Sequence[float] = (-250, 450)) -> None:
        super().__init__(keys, enabled)
        self.class_names, self.ct_key, self.window = list(class_names), ct_key, tuple(window)

    def write(self, d, seg, affine, path) -> None:
        from liver_fcn.visualize import overlay_montage

        ct = np.asarray(d[self.ct_key].detach().cpu())[0] if self.ct_key in d else np.zeros(seg.shape)
        transform = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(("R", "A", "S"))
        )
        overlay_montage(
            nib.orientations.apply_orientation(ct, transform), path,
            pred=nib.orientations.apply_orientation(seg, transform), class_names=self.class_names,
            window=self.window, title=f"{d.get('case', 'case')}: predicted contours",
        )


class WriteDicomSegd(CaseOutput):
    """``<case>_seg.dcm``: a DICOM Segmentation object referencing the CT series (DICOM input only;
    :func:`collect_cases` refuses ``--dicom_seg`` for a NIfTI before anything runs)."""

    name, suffix = "dicom_seg", "_seg.dcm"

    def __init__(self, keys: KeysCollection = "pred", enabled: bool = False, *, class_names: Sequence[str]) -> None:
        super().__init__(keys, enabled)
        self.class_names = list(class_names)

    def write(self, d, seg, affine, path) -> None:
        from liver_fcn.dicom_seg import write_dicom_seg

        generated: list[str] = []
        write_dicom_seg(d["source_path"], seg, self.class_names, path, d.get("series_uid"), generated_uids=generated)
        if generated and "report" in d:
            d["report"]["dicom_seg_note"] = (
                f"the CT series has no {', '.join(generated)}: the SEG references generated UIDs, "
                "so a PACS cannot match it to the series by UID"
            )


class CommitCased(Transform):
    """Move the case's staged files into ``output_dir`` as one set, the report last (its presence
    means the set is complete), remove files of an earlier run that this one did not make (by the
    known ``suffixes``: by default those of the shipped output steps), log the case's one-line
    summary and keep the report for :func:`finish`."""

    def __init__(self, output_dir: str | os.PathLike = "inference",
                 suffixes: Sequence[str] | None = None, log=None) -> None:
        if suffixes is None:  # the files the shipped output steps write
            suffixes = [step.suffix for step in (WriteMaskd, WriteOverlayd, WriteDicomSegd)]
        self.output_dir, self.suffixes = Path(output_dir), tuple(suffixes)
        self.log = log or logger.info
        self.written: list[dict] = []

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        case, stage = str(d.get("case", "case")), Path(d["stage"])
        report = dict(d.get("report") or {"case": case})
        made = {name: self.output_dir / filename for name, filename in d.get("outputs", {}).items()}
        report["files"] = {name: str(path) for name, path in made.items()}
        if "mask" in made:
            report["mask"] = str(made["mask"])
        report_path = self.output_dir / f"{case}_report.json"
        write_json_atomic(stage / report_path.name, report)
        try:
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


def _one_line(e: BaseException) -> str:
    """The root cause of ``e`` in one line (MONAI wraps a transform's error in 'applying transform ...')."""
    e = root_cause(e)
    text = " ".join(str(e).split())
    return text if isinstance(e, InputError) else f"{type(e).__name__}: {text}"


class CaseDataset(Dataset):
    """MONAI ``Dataset`` of inference cases whose failures are data, not crashes.

    A case whose preprocessing raises (a slice that cannot be decoded after the up-front checks
    passed, say) comes out as ``{"case", "source_path", "error"}`` with a one-line message, so the
    engine goes on with the other cases and :class:`CaseRunner` names it in the summary.
    """

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:  # noqa: BLE001 - every failure becomes the case's error line
            item = self.data[index]
            return {"case": item.get("case", str(index)), "source_path": str(item.get("image", "")), "error": _one_line(e)}


class CaseRunner:
    """The evaluator's iteration for inference: network and post-processing (which writes the case's
    files) per case, a failing case recorded in :attr:`failed` instead of ending the run.

    Use as ``SupervisedEvaluator(iteration_update=CaseRunner(postprocessing), postprocessing=None)``:
    the post-processing runs inside the iteration so that its failure is caught with the case's name.
    """

    def __init__(self, postprocessing) -> None:
        self.postprocessing = postprocessing
        self.failed: list[dict] = []

    def __call__(self, engine, batch: dict):
        from monai.data import decollate_batch
        from monai.transforms import apply_transform

        cases = [str(c) for c in batch.get("case", ["?"])]
        sources = [str(c) for c in batch.get("source_path", [""] * len(cases))]
        if "error" in batch:
            for case, source, error in zip(cases, sources, batch["error"]):
                self._fail(case, source, error)
            return []
        try:
            engine.state.batch = batch
            output = type(engine)._iteration(engine, engine, batch)  # the evaluator's own iteration
            # a decollating evaluator (MONAI's default) has split batch and output into items already
            batches = engine.state.batch if isinstance(engine.state.batch, list) else decollate_batch(batch, detach=True)
            outputs = output if isinstance(output, list) else decollate_batch(output, detach=True)
            return [apply_transform(self.postprocessing, {**b, **o}) for b, o in zip(batches, outputs)]
        except Exception as e:  # noqa: BLE001
            for case, source in zip(cases, sources):
                self._fail(case, source, _one_line(e))
            return []

    def _fail(self, case: str, source: str, error: str) -> None:
        logger.error(f"{case}: FAILED, nothing written: {error}")
        self.failed.append({"case": case, "input": source, "error": error})


def shard(cases: list[dict], rank: int | None = None, world_size: int | None = None) -> list[dict]:
    """This process's share of ``cases`` under ``torchrun`` (every ``world_size``-th case from
    ``rank``; ``RANK`` and ``WORLD_SIZE`` from the environment by default). All of them without it."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    return list(cases[rank::world_size])


def finish(
    writer: "CommitCased", output_dir: str | os.PathLike, runner: CaseRunner | None = None,
    network: torch.nn.Module | None = None, engine=None,
) -> int:
    """End of an inference run: one summary for all processes (gathered under torchrun), written by
    the first as ``summary.json`` and printed; exit status 1 when a case failed. Returns the number
    of cases written by all processes."""
    import torch.distributed as dist

    mine = {
        "written": [{"case": r["case"], "input": r.get("input", ""), "files": r.get("files", {})} for r in writer.written],
        "failed": list(runner.failed) if runner is not None else [],
        "seconds": float(engine.state.times.get("COMPLETED") or 0.0) if engine is not None and getattr(engine.state, "times", None) else 0.0,
        "network_seconds": float(network.seconds) if isinstance(network, Precision) else 0.0,
        "precision": network.precision if isinstance(network, Precision) else "",
        "device": str(next(iter(network.parameters())).device) if network is not None else "",
    }
    parts = [mine]
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
    written = [w for p in parts for w in p["written"]]
    failed = [f for p in parts for f in p["failed"]]
    rank0 = not distributed or dist.get_rank() == 0
    if rank0:
        summary = {
            "cases": len(written) + len(failed),
            "written": sorted(written, key=lambda w: w["case"]),
            "failed": sorted(failed, key=lambda f: f["case"]),
            "processes": [{k: p[k] for k in ("seconds", "network_seconds", "precision", "device")} | {"cases": len(p["written"])} for p in parts],
        }
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for stage in Path(output_dir).glob(f".*{STAGE_SUFFIX}"):  # what failed cases had staged
            shutil.rmtree(stage, ignore_errors=True)
        write_json_atomic(Path(output_dir) / "summary.json", summary)
        timing = f"{max(p['seconds'] for p in parts):.1f} s, network {sum(p['network_seconds'] for p in parts):.1f} s, {mine['precision']}"
        n = len(written)
        logger.info(f"{n} case{'s' if n != 1 else ''} written to {output_dir} ({timing}" + (f", {len(parts)} processes" if distributed else "") + ")")
        if failed:
            logger.error(f"{len(failed)} case{'s' if len(failed) != 1 else ''} FAILED (see {Path(output_dir) / 'summary.json'}): "
                  + "; ".join(f"{f['case']}: {f['error']}" for f in failed))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if failed:
        raise SystemExit(1)
    return len(written)


def init_distributed() -> bool:
    """Join the process group when started by ``torchrun`` with more than one process (gloo: the
    processes only exchange their summaries; each rank runs its network on its own device).
    Returns whether this run is distributed."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return True


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` where a GPU is present (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")
