"""Reading a CT: a DICOM series folder (or zip) or a NIfTI file, with exactly one reader."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from monai.data import NibabelReader
from monai.transforms import LoadImage

from liver_fcn.data.dicom import CTSeriesReader, is_zip
from liver_fcn.errors import InputError

__all__ = ["NIFTI_SUFFIXES", "ct_loader", "load_ct"]


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _quiet_gpu_decoder_notice() -> None:
    """MONAI's LoadImage builds its GPU DICOM decoder reader on every construction and, without
    nvImageCodec, logs and warns that it is unavailable; this project reads with its own reader, so
    the notice is noise unless the user asked for that decoder (``MONAI_DICOM_READER=nvimgcodec``)."""
    if os.environ.get("MONAI_DICOM_READER", "").lower() == "nvimgcodec":
        return
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader", category=UserWarning)


_quiet_gpu_decoder_notice()


def ct_loader() -> LoadImage:
    return LoadImage(image_only=True, ensure_channel_first=True)


def load_ct(path, loader: LoadImage | None = None, series_uid: str | None = None, modality: str | None = "CT"):
    """Load a CT (DICOM folder or zip, or NIfTI file) with exactly one reader; channel-first MetaTensor.

    MONAI's LoadImage falls back to its other readers when the chosen one fails, which would read a
    folder of two series or with a missing slice after all. Passing the reader at call time
    disables the fallback; any failure becomes an :class:`InputError` naming the file.
    """
    loader = loader or ct_loader()
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: input does not exist")
    if p.is_dir() or is_zip(p):
        reader = CTSeriesReader(series_uid=series_uid, modality=modality)
    elif p.name.lower().endswith(NIFTI_SUFFIXES):
        reader = NibabelReader()
    elif p.suffix.lower() == ".dcm":
        raise InputError(f"{p}: a single DICOM file; pass the folder holding the whole series")
    else:
        raise InputError(f"{p}: not a DICOM series folder or zip, or a NIfTI file (.nii, .nii.gz)")
    try:
        img = loader(p, reader=reader)
    except InputError:
        raise
    except Exception as e:  # a corrupt NIfTI, an undecodable slice ...
        raise InputError(f"{p}: cannot be read ({type(e).__name__}: {e})".replace("\n", " ")) from None
    # one sum is finite when every voxel is (a sum that overflows is counted voxel by voxel)
    if img.is_floating_point() and not bool(torch.isfinite(img.sum())):
        bad = int((~torch.isfinite(img)).sum())
        if bad:
            raise InputError(
                f"{p}: {bad} voxel{'s' if bad != 1 else ''} not finite (NaN or infinity); a CT holds numbers of HU"
            )
    return img
