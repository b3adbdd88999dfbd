"""A CT in, organs out, from Python or from ``liver-fcn segment``.

Both run the bundle's ``inference.json`` through MONAI's bundle API (``monai.bundle.run``): the code
path of ``python -m monai.bundle run inference``, with the bundle's configs found wherever the package
is (a source checkout's ``bundle/`` or the copy that ``pip install .`` puts under
``<prefix>/share/liver-fcn/bundle``), so they work from any working folder.

>>> import liver_fcn
>>> result = liver_fcn.segment("ct.nii.gz", checkpoint="bundle/models/model.pt")  # doctest: +SKIP
>>> result.mask.shape, result.report["volumes_ml"]["liver"]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import run as bundle_run
from nibabel.spatialimages import SpatialImage

from liver_fcn import bundle_folder
from liver_fcn.errors import InputError, root_cause

__all__ = ["Segmentation", "device_override", "run_inference", "segment"]

#: MONAI loggers that a segmenting user need not read
_HUSHED = ("monai.bundle.scripts", "monai.bundle.workflows", "monai.data.nvimgcodec_pydicom_plugin")
#: what ``device`` accepts: the best device found (``auto``), or a torch device name
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device_override(device: str) -> str | None:
    """The bundle override of ``device`` (``None`` for ``auto``: the bundle's own choice, a GPU where
    there is one); an unknown or absent device is an :class:`InputError`."""
    if not _DEVICE.fullmatch(device):
        raise InputError(f"--device {device}: not one of auto, cpu, cuda, cuda:N, mps")
    if device == "auto":
        return None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device on this machine")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps: no Apple MPS device on this machine")
    return f"$torch.device('{device}')"


def run_inference(
    input: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    quiet: bool = False,
    **options,
) -> dict:
    """The bundle's inference of ``input`` (a DICOM folder or zip, a NIfTI file or folder, a datalist)
    into ``output_dir``; returns its ``summary.json``. ``checkpoint`` is a file, a TorchScript export or
    ``models:/NAME@ALIAS`` (default: the bundle's ``models/model.pt``); further ``options`` are
    inference.json's settings (``precision``, ``dicom_seg``, ``overlay``, ``series_uid``...). Bad input
    raises :class:`InputError` before anything is written; a case that fails later ends in
    ``SystemExit(1)``, as the command does."""
    configs = bundle_folder() / "configs"
    overrides = {"input": os.fspath(input), "output_dir": os.fspath(output_dir), **options}
    if checkpoint is not None:
        overrides["checkpoint"] = os.fspath(checkpoint)
    if (device_value := device_override(device)) is not None:
        overrides["device"] = device_value
    logging_file = configs / "logging.conf"
    # MONAI's dump of the run's arguments, and its note that the optional GPU DICOM decoder is absent
    hushed = {name: logging.getLogger(name) for name in _HUSHED}
    levels = {name: log.level for name, log in hushed.items()}
    for log in hushed.values():
        log.setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="liver-fcn-log-") as tmp, warnings.catch_warnings():
        # the shipped configs are the package's own: MONAI's warning about untrusted configs is not for them
        warnings.filterwarnings("ignore", message="parsing config_file")
        if quiet:  # the bundle's logging, at WARNING
            logging_file = Path(tmp) / "logging.conf"
            logging_file.write_text(re.sub(r"level=INFO", "level=WARNING", (configs / "logging.conf").read_text()))
        try:
            bundle_run(
                "inference",
                config_file=os.fspath(configs / "inference.json"),
                logging_file=str(logging_file),
                **overrides,
            )
        except Exception as e:
            cause = root_cause(e)
            if isinstance(cause, InputError):
                raise cause from None
            raise
        finally:
            for name, log in hushed.items():
                log.setLevel(levels[name])
    return json.loads((Path(output_dir) / "summary.json").read_text())


@dataclass
class Segmentation:
    """One CT's segmentation: the class map on the CT's own grid (``mask``, uint8, 0 background and
    then ``class_names``), the case report (volumes in mL, HU statistics, QC flags, the model) and,
    where the files were kept, their paths."""

    mask: nib.Nifti1Image
    report: dict
    files: dict[str, str] = field(default_factory=dict)


def segment(
    ct: str | os.PathLike | nib.Nifti1Image,
    checkpoint: str | os.PathLike | None = None,
    device: str = "auto",
    *,
    output_dir: str | os.PathLike | None = None,
    quiet: bool = True,
    **options,
) -> Segmentation:
    """Segment one CT: a DICOM folder or zip, a NIfTI file or a ``nibabel`` image (HU, any orientation).

    Returns the mask on the CT's grid and the case report. With ``output_dir`` the bundle's files stay
    there (``<case>_seg.nii.gz``, ``<case>_report.json``, the overlay); without it they are written to
    a temporary folder and only the returned objects remain. ``options`` as for :func:`run_inference`.
    """
    with tempfile.TemporaryDirectory(prefix="liver-fcn-segment-") as tmp:
        if isinstance(ct, SpatialImage):
            path = Path(tmp) / "ct.nii.gz"
            nib.save(nib.Nifti1Image(np.asanyarray(ct.dataobj), ct.affine), str(path))
        else:
            path = Path(ct)
            if not path.exists():
                raise InputError(f"{path}: input does not exist")
        out = Path(output_dir) if output_dir is not None else Path(tmp) / "out"
        options.setdefault("overlay", output_dir is not None)
        summary = run_inference(path, out, checkpoint=checkpoint, device=device, quiet=quiet, **options)
        if len(summary["written"]) != 1:
            raise InputError(f"{ct}: {len(summary['written'])} cases found; segment() takes one CT")
        case = summary["written"][0]
        files = {**case["files"], "report": str(out / f"{case['case']}_report.json")}
        written = nib.load(files["mask"])
        mask = nib.Nifti1Image(np.asarray(written.dataobj), written.affine, written.header)
        report = json.loads(Path(files["report"]).read_text())
        return Segmentation(mask=mask, report=report, files=files if output_dir is not None else {})
