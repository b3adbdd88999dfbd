"""`liver-fcn prepare`: discovery, safe extraction, class mapping, split, and bad inputs that write nothing."""

from __future__ import annotations

import io
import json
import logging
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from liver_fcn.data.ircadb import prepare, split_patients
from liver_fcn.errors import InputError

from .conftest import real_sample_or_skip, tree_snapshot


def quiet(*a, **k):
    pass


def test_datalist_of_the_phantoms(prepared):
    data = json.loads((prepared / "datalist.json").read_text())
    assert data["classes"] == ["background", "liver", "bone", "kidney"]
    entries = data["training"] + data["validation"] + data["test"]
    assert sorted(e["patient"] for e in entries) == [f"3Dircadb1.{i}" for i in range(1, 6)]
    assert (len(data["training"]), len(data["validation"]), len(data["test"])) == (3, 1, 1)
    by_name = {e["patient"]: e for e in entries}
    p1, p2, p3 = by_name["3Dircadb1.1"], by_name["3Dircadb1.2"], by_name["3Dircadb1.3"]
    assert p1["annotated"] == [True, True, True, True]
    assert p1["masks"]["kidney"] == ["3Dircadb1.1/MASKS_DICOM/leftkidney", "3Dircadb1.1/MASKS_DICOM/rightkidney"]
    assert p2["masks"]["kidney"] == ["3Dircadb1.2/MASKS_DICOM/kidneys"]
    assert p3["annotated"] == [True, True, True, False] and "kidney" not in p3["masks"]
    assert "spleen" in p1["unmapped_masks"]
    for e in entries:
        assert e["shape"] == [64, 64, 12]
        assert (prepared / e["image"] / "image_0").is_file()
        assert e["volumes_ml"]["liver"] > 50
        voxel_ml = np.prod(e["spacing"]) / 1000
        assert e["volumes_ml"]["liver"] / voxel_ml == pytest.approx(
            round(e["volumes_ml"]["liver"] / voxel_ml), abs=0.05
        )
    # validation and test patients are fully annotated when the strata allow it
    assert all(e["annotated"][3] for e in data["validation"] + data["test"])


def test_liver_volume_matches_the_mask_voxels(prepared):
    data = json.loads((prepared / "datalist.json").read_text())
    e = data["training"][0]
    folder = prepared / e["masks"]["liver"][0]
    voxels = sum(int(np.count_nonzero(pydicom.dcmread(f).pixel_array)) for f in folder.iterdir())
    assert e["volumes_ml"]["liver"] == pytest.approx(voxels * np.prod(e["spacing"]) / 1000, abs=0.01)


def test_unzipped_tree_is_used_in_place(phantom_copy, tmp_path):
    p = phantom_copy / "3Dircadb1.1"
    for name in ("PATIENT_DICOM", "MASKS_DICOM"):
        with zipfile.ZipFile(p / f"{name}.zip") as zf:
            zf.extractall(p)
        (p / f"{name}.zip").unlink()
    out = tmp_path / "out"
    prepare(phantom_copy, out, val_patients=["1"], log=quiet)
    data = json.loads((out / "datalist.json").read_text())
    (entry,) = data["validation"]
    assert Path(entry["image"]) == (p / "PATIENT_DICOM").resolve()
    assert not (out / "3Dircadb1.1").exists() and (out / "3Dircadb1.2").is_dir()


def test_fully_unzipped_tree_needs_no_extraction(phantom_copy, tmp_path):
    for p in phantom_copy.glob("3Dircadb1.*"):
        for name in ("PATIENT_DICOM", "MASKS_DICOM"):
            with zipfile.ZipFile(p / f"{name}.zip") as zf:
                zf.extractall(p)
            (p / f"{name}.zip").unlink()
    out = tmp_path / "new" / "out"  # does not exist yet
    prepare(phantom_copy, out, val_patients=["1"], log=quiet)
    assert sorted(x.name for x in out.iterdir()) == ["datalist.json"]
    data = json.loads((out / "datalist.json").read_text())
    assert all(Path(e["image"]).is_dir() for k in ("training", "validation", "test") for e in data[k])


def test_split_is_seeded_stratified_and_pinnable():
    entries = [
        {"patient": f"3Dircadb1.{i}", "annotated": [True, True, True, i in (1, 3, 5, 6, 7, 11)]} for i in range(1, 21)
    ]
    a = split_patients(entries, seed=1)
    b = split_patients(entries, seed=1)
    c = split_patients(entries, seed=2)
    names = lambda s: {k: [e["patient"] for e in v] for k, v in s.items()}  # noqa: E731
    assert names(a) == names(b) and names(a) != names(c)
    assert [len(a[k]) for k in ("training", "validation", "test")] == [12, 4, 4]
    kidneys = {k: sum(e["annotated"][3] for e in v) for k, v in a.items()}
    assert kidneys["training"] >= 2 and kidneys["validation"] >= 1 and kidneys["test"] >= 1
    pinned = split_patients(entries[:2], val_patients=["2"], test_fraction=0)
    assert [e["patient"] for e in pinned["validation"]] == ["3Dircadb1.2"]
    assert [e["patient"] for e in pinned["training"]] == ["3Dircadb1.1"]
    with pytest.raises(InputError, match="no such patient"):
        split_patients(entries, val_patients=["42"])
    every = split_patients(list(reversed(entries)), test_patients=["all"])  # new patients, for evaluation only
    assert names(every) == {"training": [], "validation": [], "test": [e["patient"] for e in entries]}
    with pytest.raises(InputError, match="all leaves no patient for --val_patients"):
        split_patients(entries, test_patients=["all"], val_patients=["2"])


def assert_nothing_written(out: Path):
    assert tree_snapshot(out) == [], tree_snapshot(out)


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match=r"nowhere: 3D-IRCADb-01 folder does not exist"):
        prepare(tmp_path / "nowhere", tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_zip_with_parent_entry(phantom_copy, tmp_path):
    z = phantom_copy / "3Dircadb1.2" / "MASKS_DICOM.zip"
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("MASKS_DICOM/../../evil.txt", "x")
    with pytest.raises(InputError, match=r"3Dircadb1.2/MASKS_DICOM.zip: unsafe entry .*escapes"):
        prepare(phantom_copy, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")
    assert not (phantom_copy / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_zip_with_a_broken_deflate_stream(phantom_copy, tmp_path):
    """Not a bad CRC but compressed data zlib cannot inflate: still one line naming the entry."""
    z = phantom_copy / "3Dircadb1.2" / "PATIENT_DICOM.zip"
    with zipfile.ZipFile(z, "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("PATIENT_DICOM/image_99", bytes(range(256)) * 64)
    with zipfile.ZipFile(z) as zf:
        info = zf.getinfo("PATIENT_DICOM/image_99")
    data = bytearray(z.read_bytes())
    start = (
        info.header_offset
        + 30
        + len(info.filename.encode())
        + int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    )
    data[start : start + 8] = b"\xff" * 8  # an invalid deflate block type
    z.write_bytes(bytes(data))
    with pytest.raises(
        InputError, match=r"3Dircadb1.2/PATIENT_DICOM.zip: corrupt entry 'PATIENT_DICOM/image_99' \(error: "
    ):
        prepare(phantom_copy, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_zip_with_symlink_or_absolute_entry(phantom_copy, tmp_path):
    z = phantom_copy / "3Dircadb1.3" / "PATIENT_DICOM.zip"
    info = zipfile.ZipInfo("PATIENT_DICOM/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(InputError, match=r"PATIENT_DICOM.zip: entry 'PATIENT_DICOM/link' is a symbolic link"):
        prepare(phantom_copy, tmp_path / "out", log=quiet)
    z2 = phantom_copy / "3Dircadb1.4" / "PATIENT_DICOM.zip"
    shutil.copy(phantom_copy / "3Dircadb1.1" / "PATIENT_DICOM.zip", z)
    with zipfile.ZipFile(z2, "a") as zf:
        zf.writestr("/abs/file", "x")
    with pytest.raises(InputError, match=r"3Dircadb1.4/PATIENT_DICOM.zip: unsafe entry '/abs/file'"):
        prepare(phantom_copy, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_patient_without_patient_dicom(phantom_copy, tmp_path):
    (phantom_copy / "3Dircadb1.4" / "PATIENT_DICOM.zip").unlink()
    with pytest.raises(InputError, match=r"3Dircadb1.4: no PATIENT_DICOM.zip or PATIENT_DICOM folder"):
        prepare(phantom_copy, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def rewrite_zip(path: Path, edit):
    """Rewrite a zip, passing each (name, bytes) through ``edit`` (which returns bytes or None to drop)."""
    with zipfile.ZipFile(path) as zf:
        items = [(i.filename, zf.read(i)) for i in zf.infolist() if not i.is_dir()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in items:
            new = edit(name, data)
            if new is not None:
                zf.writestr(name, new)


def test_mask_of_the_wrong_shape(phantom_copy, tmp_path):
    def crop(name, data):
        if "/liver/" not in name:
            return data
        ds = pydicom.dcmread(io.BytesIO(data))
        arr = ds.pixel_array[:60]
        ds.Rows = arr.shape[0]
        ds.PixelData = arr.tobytes()
        buf = io.BytesIO()
        ds.save_as(buf)
        return buf.getvalue()

    rewrite_zip(phantom_copy / "3Dircadb1.5" / "MASKS_DICOM.zip", crop)
    with pytest.raises(
        InputError, match=r"3Dircadb1.5/MASKS_DICOM.zip:MASKS_DICOM/liver: mask series is 60x64x12, the CT is 64x64x12"
    ):
        prepare(phantom_copy, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_mask_with_a_missing_slice_and_ct_with_a_broken_file(phantom_copy, tmp_path):
    rewrite_zip(
        phantom_copy / "3Dircadb1.2" / "MASKS_DICOM.zip", lambda n, d: None if n.endswith("bone/image_11") else d
    )
    with pytest.raises(InputError, match=r"3Dircadb1.2/MASKS_DICOM.zip:MASKS_DICOM/bone: mask series is 64x64x11"):
        prepare(phantom_copy, tmp_path / "out", log=quiet)
    shutil.copy(phantom_copy / "3Dircadb1.1" / "MASKS_DICOM.zip", phantom_copy / "3Dircadb1.2" / "MASKS_DICOM.zip")
    rewrite_zip(
        phantom_copy / "3Dircadb1.1" / "PATIENT_DICOM.zip", lambda n, d: d[:400] if n.endswith("image_4") else d
    )
    with pytest.raises(InputError, match=r"3Dircadb1.1/PATIENT_DICOM.zip:PATIENT_DICOM/image_4: .*truncated"):
        prepare(phantom_copy, tmp_path / "out", log=quiet)
    assert_nothing_written(tmp_path / "out")


def test_existing_datalist_needs_overwrite(prepared, phantom_root, tmp_path):
    out = tmp_path / "out"
    prepare(phantom_root, out, log=quiet)
    before = (out / "datalist.json").read_text()
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        prepare(phantom_root, out, seed=5, log=quiet)
    assert (out / "datalist.json").read_text() == before
    prepare(phantom_root, out, seed=5, overwrite=True, log=quiet)
    assert not any(p.name.startswith(".prepare") for p in out.iterdir())


def test_incomplete_kidney_pair_is_reported_not_hidden(phantom_copy, tmp_path):
    rewrite_zip(phantom_copy / "3Dircadb1.1" / "MASKS_DICOM.zip", lambda n, d: None if "/rightkidney/" in n else d)
    lines = []
    prepare(phantom_copy, tmp_path / "out", log=lines.append)
    assert any("3Dircadb1.1: kidney: only leftkidney of leftkidney + rightkidney present" in s for s in lines)
    data = json.loads((tmp_path / "out" / "datalist.json").read_text())
    e = next(e for k in ("training", "validation", "test") for e in data[k] if e["patient"] == "3Dircadb1.1")
    assert e["annotated"][3] is False and e["notes"]


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "liver_fcn.cli",
            "prepare",
            "--ircadb",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "none: 3D-IRCADb-01 folder does not exist" in r.stderr
    assert not (tmp_path / "o").exists()


def test_real_sample(tmp_path):
    ircadb = real_sample_or_skip()
    out = tmp_path / "real"
    prepare(ircadb, out, val_patients=["7"], log=quiet)
    data = json.loads((out / "datalist.json").read_text())
    (p1,), (p7,) = data["training"], data["validation"]
    assert (p1["patient"], p7["patient"]) == ("3Dircadb1.1", "3Dircadb1.7")
    assert p1["shape"] == [512, 512, 129] and p7["shape"][2] == 151
    assert p1["spacing"][:2] == pytest.approx([0.57, 0.57]) and p1["spacing"][2] == pytest.approx(1.6)
    for p in (p1, p7):
        assert p["annotated"] == [True, True, True, True]
        assert p["masks"]["kidney"][0].endswith("leftkidney") and p["masks"]["kidney"][1].endswith("rightkidney")
        assert 800 < p["volumes_ml"]["liver"] < 3500  # an adult liver
        assert 30 < p["volumes_ml"]["kidney"] < 800 and p["volumes_ml"]["bone"] > 100
    # 2865131 liver voxels of 0.57 x 0.57 x 1.6 mm in patient 1
    assert p1["volumes_ml"]["liver"] == pytest.approx(2865131 * 0.57 * 0.57 * 1.6 / 1000, rel=1e-3)


def test_real_ct_loads_without_header_noise(tmp_path, caplog):
    """The real files hold decimal strings over 16 characters; loading them logs nothing about it."""
    from liver_fcn.data.ct import load_ct

    ircadb = real_sample_or_skip()
    with zipfile.ZipFile(ircadb / "3Dircadb1.1" / "PATIENT_DICOM.zip") as zf:
        zf.extractall(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pydicom"):
        img = load_ct(tmp_path / "PATIENT_DICOM")
    assert tuple(img.shape) == (1, 512, 512, 129)
    assert not [r for r in caplog.records if r.name.startswith("pydicom")], caplog.text[:500]
