"""Phantom patients: the 3D-IRCADb-01 download layout, real DICOM, plausible and varied anatomy."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage

from liver_fcn.data import CTSeriesReader, make_phantom
from liver_fcn.data.phantom import write_phantoms


def read_zip_series(zpath, prefix):
    with zipfile.ZipFile(zpath) as zf:
        names = [n for n in zf.namelist() if n.startswith(prefix + "/") and not n.endswith("/")]
        return {n: pydicom.dcmread(io.BytesIO(zf.read(n))) for n in names}


def test_layout_and_tags(phantom_root):
    patients = sorted(p.name for p in phantom_root.iterdir())
    assert patients == [f"3Dircadb1.{i}" for i in range(1, 6)]
    p1 = phantom_root / "3Dircadb1.1"
    assert (p1 / "PATIENT_DICOM.zip").is_file() and (p1 / "MASKS_DICOM.zip").is_file()
    ct = read_zip_series(p1 / "PATIENT_DICOM.zip", "PATIENT_DICOM")
    assert sorted(ct, key=lambda n: int(n.rsplit("_", 1)[1]))[0] == "PATIENT_DICOM/image_0"
    assert len(ct) == 12
    for name, ds in ct.items():
        k = int(name.rsplit("_", 1)[1])
        assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.InstanceNumber == k
        assert ds.pixel_array.dtype == np.int16 and ds.PixelRepresentation == 1
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(k * float(ds.SliceThickness))
        assert len(ds.PixelSpacing) == 2 and ds.Rows == ds.Columns == 64
    masks = read_zip_series(p1 / "MASKS_DICOM.zip", "MASKS_DICOM")
    organs = {n.split("/")[1] for n in masks}
    assert {"liver", "bone", "spleen", "leftkidney", "rightkidney"} <= organs
    for ds in masks.values():
        assert ds.pixel_array.dtype == np.uint8 and set(np.unique(ds.pixel_array)) <= {0, 255}


def test_kidney_annotation_varies_as_in_the_real_database(phantom_root):
    organs = {}
    for p in sorted(phantom_root.iterdir()):
        with zipfile.ZipFile(p / "MASKS_DICOM.zip") as zf:
            organs[p.name] = {n.split("/")[1] for n in zf.namelist() if n.count("/") >= 2}
    assert "kidneys" not in organs["3Dircadb1.1"] and "leftkidney" in organs["3Dircadb1.1"]
    assert "kidneys" in organs["3Dircadb1.2"]  # both kidneys in one mask
    assert not ({"kidneys", "leftkidney", "rightkidney"} & organs["3Dircadb1.3"])  # not annotated


def test_monai_reads_the_phantom_with_rescale_and_geometry(tmp_path):
    root = write_phantoms(tmp_path, 1, seed=5, size=64, slices=10, rescale_intercept=-1024)[0]
    with zipfile.ZipFile(root / "PATIENT_DICOM.zip") as zf:
        zf.extractall(tmp_path / "x")
    ds = pydicom.dcmread(tmp_path / "x" / "PATIENT_DICOM" / "image_3")
    assert float(ds.RescaleIntercept) == -1024
    img = LoadImage(reader=CTSeriesReader(), image_only=True)(tmp_path / "x" / "PATIENT_DICOM")
    case = make_phantom(5 * 1000 + 1, size=64, slices=10)  # the same patient (seed * 1000 + number)
    expected = np.transpose(case.ct, (2, 1, 0)).astype(np.float32)  # (z, row, col) -> (col, row, z)
    assert img.shape == (64, 64, 10)
    np.testing.assert_array_equal(img.numpy(), expected)
    px, sz = case.geometry.pixel_spacing[0], case.geometry.slice_spacing
    np.testing.assert_allclose(np.diag(img.affine.numpy())[:3], [-px, -px, sz], rtol=1e-6)


def test_same_seed_same_phantom_other_seed_other_shapes():
    a, b, c = make_phantom(1, 64, 12), make_phantom(1, 64, 12), make_phantom(2, 64, 12)
    np.testing.assert_array_equal(a.ct, b.ct)
    assert a.masks["liver"].sum() != c.masks["liver"].sum()
    overlap = (a.masks["liver"] & c.masks["liver"]).sum() / (a.masks["liver"] | c.masks["liver"]).sum()
    assert overlap < 0.95


def test_organ_intensities_overlap_so_thresholds_do_not_segment_the_liver():
    case = make_phantom(7, 96, 24)
    ct, liver = case.ct, case.masks["liver"]
    assert 400 < liver.sum() and case.masks["spleen"].sum() > 0 and case.masks["bone"].sum() > 0
    spleen_hu = np.median(ct[case.masks["spleen"]])
    assert abs(np.median(ct[liver]) - spleen_hu) < 25
    best = 0.0
    for lo in range(-50, 200, 5):
        for hi in range(lo + 5, 260, 5):
            pred = (ct >= lo) & (ct < hi)
            best = max(best, (pred & liver).sum() / (pred | liver).sum())
    assert best < 0.8, best


def test_phantom_refuses_to_overwrite(tmp_path):
    write_phantoms(tmp_path, 1, size=32, slices=4)
    with pytest.raises(FileExistsError, match="3Dircadb1.1"):
        write_phantoms(tmp_path, 1, size=32, slices=4)
