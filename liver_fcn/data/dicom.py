"""Strict reading of one CT DICOM series from a folder (nested sub-folders included) or a zip of one.

MONAI's :class:`~monai.data.PydicomReader` stacks the files of a folder by InstanceNumber, warns
and skips files it cannot read or that lack InstanceNumber, and stacks several series together if
a folder holds them. For a clinical input that must be an error, so :class:`CTSeriesReader`
complements it: it checks the whole folder first (every file DICOM and complete, one series or
the one asked for, the expected modality, one geometry, slices evenly spaced with none missing),
orders the slices by ImagePositionPatient along the slice normal, reads them in threads, and hands
them to PydicomReader's own pixel, rescale and affine code (LPS -> RAS as in MONAI and ITK), its
slices decoded in threads too.

:func:`inspect_series` runs the same checks from the headers alone (pixel data is not decoded),
which is what ``liver-fcn prepare`` uses to vet a whole database quickly.

A folder holding several series (a PACS export, say) is refused with a listing of its series unless
one is asked for: by its SeriesInstanceUID, or ``"auto"``: of the axial CT image series (single-frame
slices with pixel data), the one with the most slices, then the thinnest slice spacing, then the
lowest UID (:data:`AUTO_RULE`). :func:`list_series` lists a folder's series, one line each.
A zip is read through :func:`dicom_folder`, which extracts it to a temporary folder for the time of
the read and names its files as ``archive.zip/member`` in every message.

Every problem raises :class:`~liver_fcn.errors.InputError` with one line naming the file or folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from monai.data import PydicomReader
from monai.utils import MetaKeys

from liver_fcn.errors import InputError

__all__ = [
    "AUTO_RULE",
    "CTSeriesReader",
    "SeriesEntry",
    "SeriesInfo",
    "dicom_folder",
    "inspect_series",
    "is_zip",
    "list_series",
    "series_files",
]

#: how ``series_uid="auto"`` picks one series of a folder
AUTO_RULE = "the axial CT series with the most slices, then the thinnest slice spacing"

#: relative tolerance on the spacing between consecutive slices
SPACING_TOLERANCE = 0.05
BLOCK = 16  # slices decoded and stored together (one cache line of float32 along the slice axis)
_UNCOMPRESSED = {
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
}


#: Enhanced CT and other multi-frame image classes: one file holds the whole series
_MULTIFRAME_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
}


@dataclass
class SeriesInfo:
    """What the headers of one ordered series say."""

    folder: Path
    files: list[Path]  # ordered from the first to the last position along the slice normal
    series_uid: str
    modality: str
    shape: tuple[int, int, int]  # rows, columns, slices
    pixel_spacing: tuple[float, float]  # row spacing, column spacing (mm)
    slice_spacing: float  # mm, along the normal
    orientation: tuple[float, ...]
    positions: np.ndarray  # (slices, 3) ImagePositionPatient in file order above
    description: str = ""
    selection: str = "the only series"  # how this series was chosen among those of its folder
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """What a case report says of the series it read."""
        return {
            "series_uid": self.series_uid,
            "description": self.description,
            "slices": self.shape[2],
            "rows_columns": [self.shape[0], self.shape[1]],
            "pixel_spacing_mm": [round(v, 4) for v in self.pixel_spacing],
            "slice_spacing_mm": round(self.slice_spacing, 4),
            "selection": self.selection,
        }


@dataclass
class SeriesEntry:
    """One series of a folder as a listing shows it (from the headers of its files)."""

    key: str  # SeriesInstanceUID, or a description of the geometry of a series without one
    description: str
    modality: str
    files: int
    orientation: str  # axial, coronal, sagittal, oblique or "-" (no ImageOrientationPatient)
    slice_spacing: float | None  # mm between consecutive positions along the normal, None where unknown
    rows_columns: tuple[int, int] | None
    images: bool  # every file a single-frame image with pixel data

    def brief(self) -> str:
        spacing = "-" if self.slice_spacing is None else f"{self.slice_spacing:.2f} mm"
        kind = self.modality or "no modality"
        what = f"{kind} {self.orientation}" if self.images else f"{kind}, not image slices"
        return f"{self.description or 'no description'}, {self.files} files, {what}, {spacing}"

    def line(self) -> str:
        size = "-" if self.rows_columns is None else f"{self.rows_columns[0]}x{self.rows_columns[1]}"
        spacing = "-" if self.slice_spacing is None else f"{self.slice_spacing:.2f} mm"
        kind = self.modality or "-"
        return (
            f"{self.key}  {kind:<5} {self.orientation:<8} {self.files:>5} file{'s' if self.files != 1 else ' '}  "
            f"{size:>9}  slice spacing {spacing:>8}  {'images' if self.images else 'no image slices'}  "
            f"{self.description or '(no description)'}"
        )


def is_zip(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".zip"


@contextmanager
def dicom_folder(path: str | os.PathLike) -> Iterator[Path]:
    """The folder of a DICOM input: the folder itself, or a zip's content extracted into a temporary
    folder that is removed on exit. Errors raised inside name the zip's files as ``archive.zip/member``."""
    path = Path(path)
    if not is_zip(path):
        yield path
        return
    if not path.is_file():
        raise InputError(f"{path}: zip archive does not exist")
    tmp = tempfile.mkdtemp(prefix="liver-fcn-zip-")
    try:
        try:
            with zipfile.ZipFile(path) as zf:
                if not any(not m.is_dir() for m in zf.infolist()):
                    raise InputError(f"{path}: zip archive holds no files, expected the files of a DICOM series")
                zf.extractall(tmp)
        except InputError:
            raise
        except Exception as e:  # not a zip, a bad CRC, an encrypted member, no room to extract ...
            raise InputError(f"{path}: unreadable zip archive ({type(e).__name__}: {e})") from None
        try:
            yield Path(tmp)
        except InputError as e:
            raise InputError(str(e).replace(tmp, str(path))) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def series_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a DICOM folder and its sub-folders, in path order. Left out: hidden files and
    folders (``.DS_Store`` ...) and ``DICOMDIR`` index files (media directories, not images)."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: DICOM folder does not exist")
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a folder holding a DICOM series, found a file")
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in names if not n.startswith(".") and n.upper() != "DICOMDIR"]
    if not files:
        raise InputError(f"{folder}: folder is empty, expected the files of a DICOM series")
    return sorted(files)


def _threads() -> int:
    return min(4, os.cpu_count() or 1)


def _read_all(files: list[Path], pixels: bool) -> list[pydicom.Dataset]:
    """Every file read in threads (file reads release the GIL); the first unreadable file in path
    order raises."""
    if len(files) < 2 * BLOCK:
        return [_read(f, pixels) for f in files]
    with ThreadPoolExecutor(_threads()) as pool:
        return list(pool.map(lambda f: _read(f, pixels), files))


@dataclass
class _Checked:
    """A series :func:`inspect_series` checked with ``keep``: the UID it was asked for, the stamp of
    the folder's files, and the ordered headers, files and info of the series it picked."""

    asked: str | None
    stamp: tuple
    datasets: list
    files: list[Path]
    info: SeriesInfo


#: the series last checked with ``keep``, by (folder, modality), for the reader to take in place of
#: reading and checking them again
_CHECKED: dict[tuple[str, str | None], _Checked] = {}
#: at most this many slices' headers are kept (a long datalist is checked whole before any is read)
KEEP_SLICES = 4096


def _stamp(files: list[Path]) -> tuple:
    """What tells a folder's files apart from a later state of them: path, size, modification time."""
    return tuple((str(f), st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])


def _keep_checked(folder: Path, modality: str | None, asked: str | None, all_files: list[Path], datasets, files, info):
    key = (str(folder.resolve()), modality)
    _CHECKED.pop(key, None)
    if sum(len(entry.files) for entry in _CHECKED.values()) + len(files) <= KEEP_SLICES:
        _CHECKED[key] = _Checked(asked, _stamp(all_files), datasets, files, info)


def _take_checked(folder: Path, modality: str | None, series_uid: str | None, all_files: list[Path]):
    """The series checked in ``folder`` for ``modality`` (taken once) when ``series_uid`` picks it as
    the check did (the UID it was asked for, or the one it found) and the folder's files are those
    checked: (datasets, files, info); else None."""
    entry = _CHECKED.pop((str(folder.resolve()), modality), None)
    if entry is None:
        return None
    if series_uid != entry.asked and not (series_uid and series_uid == entry.info.series_uid):
        return None
    try:
        if _stamp(all_files) != entry.stamp:
            return None
    except OSError:
        return None
    return entry.datasets, entry.files, entry.info


def _read(path: Path, pixels: bool) -> pydicom.Dataset:
    try:
        if pixels:
            return pydicom.dcmread(path)
        return pydicom.dcmread(path, defer_size=256)
    except pydicom.errors.InvalidDicomError:
        raise InputError(f"{path}: not a DICOM file (no DICM preamble or recognisable header)") from None
    except Exception as e:  # truncated header, bad element lengths ...
        raise InputError(f"{path}: unreadable DICOM file ({type(e).__name__}: {e})") from None


def _check_pixel_data(ds: pydicom.Dataset, path: Path) -> None:
    if "PixelData" not in ds:
        raise InputError(f"{path}: DICOM file has no pixel data (truncated, or not an image slice)")
    tsyntax = _transfer_syntax(ds)
    if tsyntax not in _UNCOMPRESSED or tsyntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return  # encapsulated data: decoded by inspect_series
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
    expected *= int(ds.get("NumberOfFrames", 1) or 1)
    raw = ds.get_item("PixelData")
    if getattr(raw, "value", None) is not None:
        have = len(raw.value)
    elif hasattr(raw, "value_tell"):  # deferred read: the value starts at value_tell
        have = os.path.getsize(path) - int(raw.value_tell)
    else:
        have = len(ds.PixelData)
    if have < expected:
        raise InputError(f"{path}: truncated DICOM file ({have} of {expected} bytes of pixel data)")


def _release_pixels(ds: pydicom.Dataset) -> None:
    """Free a dataset's pixel data, encoded and decoded (pydicom caches the decoded array)."""
    if "PixelData" in ds:
        del ds.PixelData
    for cache in ("_pixel_array", "_pixel_id"):
        if hasattr(ds, cache):
            setattr(ds, cache, None if cache == "_pixel_array" else {})


def _require(ds: pydicom.Dataset, path: Path, *tags: str) -> None:
    missing = [t for t in tags if t not in ds or ds[t].value in (None, "")]
    if missing:
        raise InputError(f"{path}: DICOM slice lacks {', '.join(missing)}")


def _series_key(ds: pydicom.Dataset, f: Path) -> str:
    """What identifies a slice's series: its SeriesInstanceUID, or - for a series de-identified down to
    blank UIDs - its geometry (orientation, pixel grid and spacing, Frame of Reference where present).
    Two images at one position of one geometry (two contrast phases, say) are then caught as duplicate
    slices, naming both files."""
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    if "PixelData" not in ds:  # neither a UID nor an image: cut short, most likely
        raise InputError(f"{f}: DICOM file has no pixel data (truncated, or not an image slice)")
    _require(ds, f, "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
    orient = ",".join(f"{float(v):.4f}" for v in ds.ImageOrientationPatient)
    spacing = ",".join(f"{float(v):.4f}" for v in ds.PixelSpacing)
    frame = str(ds.get("FrameOfReferenceUID", "") or "").strip() or "-"
    return (
        f"(no SeriesInstanceUID: {int(ds.Rows)}x{int(ds.Columns)} at {spacing} mm, orientation {orient}, frame {frame})"
    )


def _orientation(ds: pydicom.Dataset) -> str:
    try:
        o = np.asarray(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(o[:3], o[3:])
        normal = normal / np.linalg.norm(normal)
    except Exception:  # noqa: BLE001 - absent or malformed: shown as unknown
        return "-"
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9:  # more than about 25 degrees off every patient axis
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _is_image(ds: pydicom.Dataset) -> bool:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return "PixelData" in ds and frames == 1 and str(ds.get("SOPClassUID", "")) not in _MULTIFRAME_CLASSES


def _entry(key: str, datasets: list[pydicom.Dataset]) -> SeriesEntry:
    ref = datasets[0]
    spacing = None
    try:
        o = np.asarray(ref.ImageOrientationPatient, dtype=float)
        normal = np.cross(o[:3], o[3:])
        dist = np.sort([float(np.asarray(ds.ImagePositionPatient, dtype=float) @ normal) for ds in datasets])
        gaps = np.diff(dist)
        spacing = float(np.median(gaps)) if gaps.size else None
    except Exception:  # noqa: BLE001 - positions or orientation absent: spacing unknown
        pass
    rows = (int(ref.Rows), int(ref.Columns)) if "Rows" in ref and "Columns" in ref else None
    return SeriesEntry(
        key=key,
        description=str(ref.get("SeriesDescription", "") or ""),
        modality=str(ref.get("Modality", "") or ""),
        files=len(datasets),
        orientation=_orientation(ref),
        slice_spacing=spacing,
        rows_columns=rows,
        images=all(_is_image(ds) for ds in datasets),
    )


def _auto_choice(entries: list[SeriesEntry]) -> SeriesEntry | None:
    """The series ``"auto"`` takes (:data:`AUTO_RULE`), None when no series qualifies."""
    fit = [
        e
        for e in entries
        if e.images and e.modality.upper() == "CT" and e.orientation == "axial" and e.files >= 2 and e.slice_spacing
    ]
    return min(fit, key=lambda e: (-e.files, e.slice_spacing, e.key), default=None)


def _group(datasets: list[pydicom.Dataset], files: list[Path]) -> dict[str, list[int]]:
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, ds in enumerate(datasets):
        by_key[_series_key(ds, f=files[i])].append(i)
    return by_key


def _select(datasets, files, folder: Path, series_uid: str | None) -> tuple[list, list, str]:
    """The datasets and files of the series asked for, and how it was chosen."""
    by_key = _group(datasets, files)
    if series_uid == "auto":
        entries = [_entry(k, [datasets[i] for i in idx]) for k, idx in by_key.items()]
        pick = _auto_choice(entries)
        if pick is None:
            listing = "; ".join(f"{e.key} ({e.brief()})" for e in entries)
            raise InputError(f"{folder}: no axial CT image series to pick among {len(entries)}: {listing}")
        keep, how = by_key[pick.key], f"auto: {AUTO_RULE} ({len(entries)} series in the input)"
    elif series_uid is not None:
        if series_uid not in by_key:
            raise InputError(f"{folder}: no series with SeriesInstanceUID {series_uid} (found {', '.join(by_key)})")
        keep, how = by_key[series_uid], f"asked for by SeriesInstanceUID ({len(by_key)} series in the input)"
    elif len(by_key) > 1:
        parts = [f"{k} ({_entry(k, [datasets[i] for i in idx]).brief()})" for k, idx in by_key.items()]
        advice = (
            "pick one with --series UID, or --series auto for " + AUTO_RULE
            if all(not k.startswith("(") for k in by_key)
            else "series without a UID cannot be picked by one: put each series in its own folder"
        )
        raise InputError(f"{folder}: folder holds {len(by_key)} series: {'; '.join(parts)}; {advice}")
    else:
        keep, how = next(iter(by_key.values())), "the only series"
    return [datasets[i] for i in keep], [files[i] for i in keep], how


def _order(datasets: list[pydicom.Dataset], files: list[Path], folder: Path, series_uid: str | None, modality):
    """Pick and check one series and return (datasets, files, info) ordered along the slice normal."""
    datasets, files, how = _select(datasets, files, folder, series_uid)
    for ds, f in zip(datasets, files):
        if "PixelData" not in ds:
            raise InputError(f"{f}: DICOM file has no pixel data (truncated, or not an image slice)")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or str(ds.get("SOPClassUID", "")) in _MULTIFRAME_CLASSES:
            raise InputError(
                f"{f}: an Enhanced (multi-frame) CT image of {frames} frames; export the series as single-frame "
                "CT images (one file per slice)"
            )
    uid = str(datasets[0].get("SeriesInstanceUID", "") or "").strip()  # "" for a de-identified series

    for ds, f in zip(datasets, files):
        _require(ds, f, "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
        if modality is not None and str(ds.get("Modality", "")).upper() != modality:
            raise InputError(f"{f}: modality is {ds.get('Modality', 'missing')!s}, expected {modality}")
        samples, photometric = (
            int(ds.get("SamplesPerPixel", 1) or 1),
            str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
        )
        if samples != 1 or not photometric.upper().startswith("MONOCHROME"):
            raise InputError(
                f"{f}: a {photometric} image of {samples} samples per pixel; a CT slice holds one grey value per pixel"
            )
        _check_pixel_data(ds, f)
    if len(datasets) < 2:
        raise InputError(f"{folder}: series has {len(datasets)} slice; a volume needs at least 2")

    ref, ref_file = datasets[0], files[0]
    orient = np.asarray(ref.ImageOrientationPatient, dtype=float)
    size = (int(ref.Rows), int(ref.Columns))
    spacing = np.asarray(ref.PixelSpacing, dtype=float)
    for ds, f in zip(datasets[1:], files[1:]):
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise InputError(f"{f}: slice is {ds.Rows}x{ds.Columns}, {ref_file.name} is {size[0]}x{size[1]}")
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, dtype=float), orient, atol=1e-4):
            raise InputError(f"{f}: ImageOrientationPatient differs from {ref_file.name}'s (tilted or mixed series)")
        if not np.allclose(np.asarray(ds.PixelSpacing, dtype=float), spacing, rtol=1e-4):
            raise InputError(f"{f}: PixelSpacing differs from {ref_file.name}'s")

    normal = np.cross(orient[:3], orient[3:])
    pos = np.asarray([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    datasets, files, pos, dist = [datasets[i] for i in order], [files[i] for i in order], pos[order], dist[order]
    span = pos[-1] - pos[0]
    if np.linalg.norm(span) > 1e-3:
        tilt = float(np.degrees(np.arccos(min(1.0, abs(float(span @ normal)) / float(np.linalg.norm(span))))))
        if tilt > 0.5:
            raise InputError(
                f"{folder}: gantry-tilted series: the slices step {tilt:.1f} degrees off their normal; "
                "resample it onto an untilted grid (or export it untilted) first"
            )
    gaps = np.diff(dist)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = dup[0]
        raise InputError(f"{files[i + 1]}: same slice position as {files[i].name} ({dist[i]:.3f} mm); duplicate slice")
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > SPACING_TOLERANCE * step)
    if bad.size:
        i = bad[0]
        ratio = gaps[i] / step
        missing = ratio > 1.5 and abs(ratio - round(ratio)) <= SPACING_TOLERANCE * round(ratio)
        what = f"missing slice{'s' if round(ratio) > 2 else ''}" if missing else "uneven slice spacing"
        raise InputError(
            f"{files[i + 1]}: {what} - {gaps[i]:.3f} mm from {files[i].name}, the series' spacing is {step:.3f} mm"
        )
    info = SeriesInfo(
        folder=folder,
        files=files,
        series_uid=uid,
        modality=str(ref.get("Modality", "")),
        shape=(size[0], size[1], len(files)),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_spacing=step,
        orientation=tuple(float(v) for v in orient),
        positions=pos,
        description=str(ref.get("SeriesDescription", "")),
        selection=how,
    )
    return datasets, files, info


def list_series(folder: str | os.PathLike) -> tuple[list[SeriesEntry], SeriesEntry | None]:
    """The series of a DICOM folder (or zip) from their headers, and the one ``"auto"`` would take."""
    with dicom_folder(folder) as root:
        files = series_files(root)
        datasets = _read_all(files, pixels=False)
        entries = [_entry(k, [datasets[i] for i in idx]) for k, idx in _group(datasets, files).items()]
    return entries, _auto_choice(entries)


def inspect_series(
    folder: str | os.PathLike, series_uid: str | None = None, modality: str | None = "CT", keep: bool = False
) -> SeriesInfo:
    """Check a series folder from its headers. Uncompressed pixel data is located and its length
    checked; compressed pixel data (JPEG, JPEG-LS, JPEG 2000, RLE) is decoded, so that a corrupt
    slice is found here, before any output, and not halfway through a run.

    ``folder`` is a folder on disk (sub-folders included); for a zip, call it inside
    :func:`dicom_folder` (the files of the returned info exist only there).

    ``keep``: the checked headers are kept (up to :data:`KEEP_SLICES` slices in all), and a
    :class:`CTSeriesReader` of this process reading the same folder with the same ``series_uid``
    and ``modality`` takes them instead of reading and checking every header again, if the folder
    still holds the same files, of the same sizes and modification times. Only for a folder that
    outlives the call (not a zip's temporary one)."""
    folder = Path(folder)
    all_files = series_files(folder)
    datasets = _read_all(all_files, pixels=False)
    datasets, files, info = _order(datasets, all_files, folder, series_uid, modality)
    for ds, f in zip(datasets, files):
        if _transfer_syntax(ds) not in _UNCOMPRESSED:
            _decode(f)
    if keep:
        _keep_checked(folder, modality, series_uid or None, all_files, datasets, files, info)
    return info


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID:
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)


def _undecodable(path, e: Exception) -> InputError:
    """One line for a slice that no pixel decoder could read (pydicom lists each plugin's reason on a line)."""
    return InputError(f"{path}: cannot decode pixel data ({type(e).__name__}: {' '.join(str(e).split())})")


@contextmanager
def quiet_decoders() -> Iterator[None]:
    """pydicom's pixel decoders log each plugin's failure with its traceback before raising; while
    this is active they do not (the raised error still says why, and becomes one line)."""
    log = logging.getLogger("pydicom.pixels")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _decode(path: Path) -> None:
    try:
        with quiet_decoders():
            pydicom.pixels.pixel_array(str(path))
    except Exception as e:
        raise _undecodable(path, e) from None


class DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


class CTSeriesReader(PydicomReader):
    """A :class:`monai.data.PydicomReader` for exactly one well-formed series per folder.

    Args:
        series_uid: SeriesInstanceUID to read when a folder holds several series (else an error).
        modality: required Modality tag (``"CT"``); None accepts any.
        kwargs: passed to PydicomReader (``affine_lps_to_ras``, ``swap_ij``, ``prune_metadata`` ...).

    A single file path (not a folder) is read as one 2D image by PydicomReader.
    """

    def __init__(self, series_uid: str | None = None, modality: str | None = "CT", **kwargs) -> None:
        if kwargs.get("to_gpu"):
            raise ValueError("CTSeriesReader decodes on the CPU (to_gpu is not supported)")
        super().__init__(**kwargs)
        self.series_uid = series_uid or None
        self.modality = modality
        self.series_info: SeriesInfo | None = None

    def verify_suffix(self, filename) -> bool:
        names = filename if isinstance(filename, (list, tuple)) else [filename]
        return all(Path(f).is_dir() or str(f).lower().endswith((".dcm", ".zip")) for f in names)

    def read(self, data, **kwargs):
        names = data if isinstance(data, (list, tuple)) else [data]
        if len(names) != 1 or not (Path(names[0]).is_dir() or is_zip(names[0])):
            if not all(Path(n).exists() for n in names):
                missing = next(n for n in names if not Path(n).exists())
                raise InputError(f"{missing}: DICOM input does not exist")
            return super().read(data, **kwargs)
        source = Path(names[0])
        with dicom_folder(source) as folder:  # a zip's files are read whole before its folder goes
            files = series_files(folder)
            checked = None
            if folder == source:  # headers that inspect_series(keep=True) has just read and checked
                checked = _take_checked(folder, self.modality, self.series_uid, files)
            if checked is not None:  # their pixel data is read from the files where it is decoded
                datasets, files, info = checked
            else:
                datasets = _read_all(files, pixels=True)
                datasets, files, info = _order(datasets, files, folder, self.series_uid, self.modality)
        if folder != source:  # name the files as the user knows them
            files = [Path(str(source) + str(f)[len(str(folder)) :]) for f in files]
            info.folder, info.files = source, files
        self.series_info = info
        self.filenames = [list(map(str, files))]
        self.has_series = True
        return datasets

    def _combine_dicom_series(self, data, filenames):
        """Stack slices already ordered along the normal (PydicomReader re-sorts by InstanceNumber).

        The volume is float32 from the start, stored in the layout MONAI's ``get_data`` hands on (so
        its ``ascontiguousarray`` copies nothing), and filled in blocks of :data:`BLOCK` slices in
        threads: each block is decoded and rescaled slice by slice by PydicomReader's own code, then
        written along the slice axis at once, where writing one slice at a time touches a cache line
        per voxel. Each slice's encoded and decoded pixels are dropped from its dataset once copied
        (pydicom keeps the decoded array): the peak is one volume and a block, not four volumes."""
        count = len(data)
        rows, columns = int(data[0].Rows), int(data[0].Columns)
        if self.swap_ij:  # get_data swaps i and j back into this buffer's own order
            volume = np.empty((columns, rows, count), dtype=np.float32).swapaxes(0, 1)
        else:
            volume = np.empty((rows, columns, count), dtype=np.float32)

        def fill(start: int) -> None:
            stop = min(start + BLOCK, count)
            block = np.empty((stop - start, rows, columns), dtype=np.float32)
            for k, i in enumerate(range(start, stop)):
                try:  # PydicomReader's own decoding and rescale
                    pixels = self._get_array_data(data[i], filenames[i])
                except Exception as e:
                    raise _undecodable(filenames[i], e) from None
                if pixels.shape != block.shape[1:]:
                    raise InputError(f"{filenames[i]}: slice of {pixels.shape} pixels in a series of {block.shape[1:]}")
                block[k] = pixels
                del pixels
                if i not in (0, count - 1):  # the first and last headers are read below
                    _release_pixels(data[i])
            volume[..., start:stop] = np.moveaxis(block, 0, -1)

        if count <= BLOCK:
            fill(0)
        else:
            with ThreadPoolExecutor(_threads()) as pool:
                for done in [pool.submit(fill, s) for s in range(0, count, BLOCK)]:
                    done.result()  # the first failing block in slice order raises
        first = data[0]
        # MONAI turns the header into metadata through pydicom's JSON conversion, which drops decimal
        # strings longer than DICOM's 16 characters (3D-IRCADb-01's SliceThickness, for one) and logs
        # "Error while processing tag" for each; the geometry comes from the positions, so say nothing
        log = logging.getLogger("pydicom")
        quiet = DropMessages("Error while processing tag")
        log.addFilter(quiet)
        try:
            metadata = self._get_meta_dict(first)
        finally:
            log.removeFilter(quiet)
        info = self.series_info
        step = info.slice_spacing if info is not None else 1.0
        metadata["spacing"] = np.asarray([*map(float, first.PixelSpacing), step])
        metadata["lastImagePositionPatient"] = np.asarray(data[-1].ImagePositionPatient, dtype=float)
        metadata[MetaKeys.SPATIAL_SHAPE] = volume.shape
        if info is not None:
            metadata["series_uid"] = info.series_uid
            metadata["modality"] = info.modality
        for ds in (data[0], data[-1]):
            _release_pixels(ds)
        return volume, metadata
