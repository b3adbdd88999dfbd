"""Output files written whole or not at all.

Every file liver-fcn writes (datalists, masks, reports, DICOM SEG, CSV tables, figures, exported
configs) goes to a temporary name beside its destination and is renamed into place only once it is
complete, so an interrupted or failed write never leaves a half-written file under the real name.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "naming_the_file", "write_csv_atomic", "write_json_atomic", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` on success, removed on failure
    (an OSError of the write names ``path``: :func:`naming_the_file`).

    The destination folder is created if needed. ``suffix`` ends the temporary name, for writers that
    choose the file format by it (``.nii.gz``, ``.png``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        with naming_the_file(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def naming_the_file(path: str | os.PathLike, staged_as: str | os.PathLike | None = None) -> Iterator[None]:
    """An OSError while writing an output (a full disk, a file size limit) says which file it was:
    ``path``, also where the error names ``staged_as``, the copy actually written (a staging folder's)."""
    try:
        yield
    except OSError as e:
        if e.filename and (staged_as is None or str(e.filename) != str(staged_as)):
            raise
        reason = e.strerror if e.filename else f"{e.strerror or e} while writing"
        raise OSError(e.errno, reason, str(path)) from None


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_csv_atomic(path: str | os.PathLike, rows: Sequence[Mapping], fields: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as CSV with a header to ``path`` atomically; the columns are ``fields`` or every
    key of the rows in the order they first appear (a missing value is an empty cell)."""
    fields = list(fields) if fields is not None else list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buf.getvalue())
