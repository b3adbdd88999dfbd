"""Shared fixtures: small phantom patients written as real DICOM, their prepared datalist, the real sample."""

from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*nvImageCodec.*")

#: pytest-xdist workers running side by side (1 without ``-n``): each takes its share of the cores, for
#: its own tensors and for the commands it starts, so that their OpenMP threads do not spin against
#: each other's
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // WORKERS))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
REAL_IRCADB = Path(os.environ.get("LIVER_FCN_IRCADB", REPO.parent / "shared" / "data" / "ircadb"))

# small phantoms: fast to write, read and train on
PHANTOM_KW = dict(size=64, slices=12)


def real_sample_or_skip() -> Path:
    if not (REAL_IRCADB / "3Dircadb1.1").is_dir():
        pytest.skip(f"real 3D-IRCADb-01 sample not found at {REAL_IRCADB} (set LIVER_FCN_IRCADB to use it)")
    return REAL_IRCADB


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """Five phantom patients (64 x 64 x 12) in the 3D-IRCADb-01 download layout (zips)."""
    from liver_fcn.data.phantom import write_phantoms

    root = tmp_path_factory.mktemp("phantoms") / "ircadb"
    write_phantoms(root, 5, seed=3, **PHANTOM_KW)
    return root


@pytest.fixture(scope="session")
def prepared(phantom_root, tmp_path_factory) -> Path:
    """The phantoms prepared by `liver-fcn prepare`; returns the folder holding datalist.json."""
    from liver_fcn.data.ircadb import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(phantom_root, out, log=lambda s: None)
    return out


@pytest.fixture
def phantom_copy(phantom_root, tmp_path) -> Path:
    """A private copy of the phantom tree that a test may damage."""
    dst = tmp_path / "ircadb"
    shutil.copytree(phantom_root, dst)
    return dst


def tree_snapshot(path: Path) -> list[str]:
    """Every path under ``path`` (to check that nothing was written)."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def masks_without(phantom_root: Path, patient: str, dest_root: Path, organ: str) -> Path:
    """``dest_root/<patient>/MASKS_DICOM.zip``: a phantom patient's mask zip less every organ series
    whose folder name holds ``organ`` (a partial download); returns ``dest_root``."""
    folder = dest_root / patient
    folder.mkdir(parents=True)
    with (
        zipfile.ZipFile(phantom_root / patient / "MASKS_DICOM.zip") as zin,
        zipfile.ZipFile(folder / "MASKS_DICOM.zip", "w") as zout,
    ):
        for info in zin.infolist():
            parts = info.filename.split("/")
            if len(parts) < 3 or organ not in parts[1].lower():
                zout.writestr(info, zin.read(info))
    return dest_root
