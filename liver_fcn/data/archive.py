"""Safe extraction of zip archives (3D-IRCADb-01 ships each patient as zips).

``zipfile.extractall`` sanitises names but still follows the archive's word on sizes and writes
whatever it finds. Here every entry is checked before anything is written: no absolute paths,
no ``..`` components, no drive letters or backslashes, no symbolic links, no duplicates, an
optional required top-level folder, and bounded sizes (per file and in total, counted on the bytes
actually written, so a lying header cannot inflate past the bound).
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from liver_fcn.errors import InputError

__all__ = ["MAX_MEMBER_BYTES", "MAX_TOTAL_BYTES", "check_zip", "safe_extract"]

MAX_MEMBER_BYTES = 256 * 2**20  # a DICOM slice is < 1 MiB; this leaves room for any real file
MAX_TOTAL_BYTES = 16 * 2**30


def _bad_name(name: str) -> str | None:
    if "\\" in name or "\0" in name:
        return "backslash or NUL in the name"
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/"):
        return "absolute path"
    if p.parts and ":" in p.parts[0]:
        return "drive letter"
    if any(part == ".." for part in p.parts):
        return "'..' component escapes the target folder"
    return None


def check_zip(
    path: str | os.PathLike,
    top: str | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> list[zipfile.ZipInfo]:
    """Validate every entry of a zip; return the file entries (directories excluded)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: archive does not exist")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path}: not a readable zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
    files, seen, total = [], set(), 0
    for info in infos:
        why = _bad_name(info.filename)
        if why:
            raise InputError(f"{path}: unsafe entry {info.filename!r} ({why})")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InputError(f"{path}: entry {info.filename!r} is a symbolic link")
        norm = str(PurePosixPath(info.filename))
        if top is not None and PurePosixPath(norm).parts[0] != top:
            raise InputError(f"{path}: entry {info.filename!r} is not under {top}/ as in the 3D-IRCADb-01 layout")
        if info.is_dir():
            continue
        if norm in seen:
            raise InputError(f"{path}: entry {info.filename!r} appears twice")
        seen.add(norm)
        if info.file_size > max_member_bytes:
            raise InputError(
                f"{path}: entry {info.filename!r} would extract to {info.file_size} bytes (limit {max_member_bytes})"
            )
        total += info.file_size
        if total > max_total_bytes:
            raise InputError(f"{path}: archive would extract to more than {max_total_bytes} bytes")
        files.append(info)
    if not files:
        raise InputError(f"{path}: archive holds no files")
    return files


def safe_extract(
    path: str | os.PathLike,
    dest: str | os.PathLike,
    top: str | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> list[Path]:
    """Extract a zip into ``dest`` after :func:`check_zip`; returns the extracted file paths."""
    path, dest = Path(path), Path(dest)
    infos = check_zip(path, top, max_member_bytes, max_total_bytes)
    root = dest.resolve()
    out, total = [], 0
    with zipfile.ZipFile(path) as zf:
        for info in infos:
            target = (dest / PurePosixPath(info.filename)).resolve()
            if root != target and root not in target.parents:
                raise InputError(f"{path}: entry {info.filename!r} resolves outside {dest}")
            target.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            try:
                with zf.open(info) as src, open(target, "xb") as dst:
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        total += len(chunk)
                        if written > min(info.file_size, max_member_bytes) or total > max_total_bytes:
                            raise InputError(f"{path}: entry {info.filename!r} extracts to more bytes than declared")
                        dst.write(chunk)
            except FileExistsError:
                raise InputError(f"{path}: entry {info.filename!r} collides with an existing file") from None
            except (
                zipfile.BadZipFile,
                zlib.error,
                EOFError,
            ) as e:  # a bad CRC, a broken deflate stream, a cut-off entry
                raise InputError(f"{path}: corrupt entry {info.filename!r} ({type(e).__name__}: {e})") from None
            out.append(target)
    return out
