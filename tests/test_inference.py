"""Bundle inference: geometry round trips (NIfTI and DICOM), reports, DICOM SEG, and bad inputs."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import run as bundle_run
from PIL import Image

import liver_fcn
from liver_fcn.data.dicom_write import SeriesGeometry, SeriesTags, write_series
from liver_fcn.errors import InputError
from liver_fcn.inference import case_report
from liver_fcn.networks import FCN
from liver_fcn.rtstruct import read_rtstruct
from liver_fcn.transforms import grid_size
from liver_fcn.visualize import class_rgb

from .commands import new_process, sharing_cores, warm_module
from .conftest import REPO
from .test_dicom import zipped

CONFIG = str(REPO / "bundle" / "configs" / "inference.json")
THRESHOLD_NET = {"_target_": "tests.helpers.ThresholdNet"}
CLASSES = ["background", "liver", "bone", "kidney"]
#: what a trained checkpoint records: the network and its physical-space preprocessing
SETTINGS = {
    "variant": "8s",
    "width": 0.0625,
    "in_channels": 1,
    "class_names": CLASSES,
    "pixel_spacing": 1.0,
    "image_size": 160,
    "hu_window": [-250, 450],
    "intensity_mean": 0.19,
}


def block_volume(shape=(20, 97, 131)) -> tuple[np.ndarray, np.ndarray]:
    """HU volume (slices, rows, cols) of air with an asymmetric L-shaped 100 HU block, and the block."""
    ct = np.full(shape, -1000, dtype=np.int16)
    block = np.zeros(shape, dtype=bool)
    block[4:15, 20:70, 30:60] = True  # the upright of the L
    block[4:9, 55:70, 60:110] = True  # its foot, towards larger column indices and rows
    ct[block] = 100
    return ct, block


@pytest.fixture(scope="module")
def threshold_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "threshold.pt"
    torch.save({"model": {"threshold": torch.tensor(0.05)}, "settings": SETTINGS}, path)
    return path


def infer(ckpt: Path, input_path, out: Path, **overrides):
    kw = {"network_def": THRESHOLD_NET, **overrides}
    bundle_run(
        "inference",
        config_file=CONFIG,
        input=str(input_path),
        output_dir=str(out),
        checkpoint=str(ckpt),
        logging_file=False,
        **kw,
    )


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def checkpoint_with(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "threshold.pt"
    torch.save({"model": {"threshold": torch.tensor(0.05)}, "settings": {**SETTINGS, **changes}}, path)
    return path


@pytest.mark.parametrize(
    "orientation, pixel_spacing",
    [("RAS", 1.0), ("LPS", 1.0), ("RAS", 0.5), ("LPS", 2.4)],
    ids=["RAS-downsampled", "LPS-downsampled", "RAS-upsampled", "LPS-coarse"],
)
def test_nifti_round_trip_keeps_affine_shape_and_position(orientation, pixel_spacing, tmp_path):
    ct, block = block_volume()
    vol = np.transpose(ct, (2, 1, 0)).astype(np.float32)  # (x, y, z) voxel order for NIfTI
    truth = np.transpose(block, (2, 1, 0))
    sign = 1.0 if orientation == "RAS" else -1.0
    affine = np.array([[sign * 0.8, 0, 0, -52.0], [0, sign * 0.7, 0, 31.5], [0, 0, 3.0, -400.0], [0, 0, 0, 1]])
    src = tmp_path / "patient 12.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(src))
    ckpt = checkpoint_with(tmp_path, pixel_spacing=pixel_spacing, image_size=grid_size(128.0, pixel_spacing))
    infer(ckpt, src, tmp_path / "out")
    out = nib.load(str(tmp_path / "out" / "patient_12_seg.nii.gz"))
    assert out.shape == vol.shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    seg = np.asarray(out.dataobj)
    assert set(np.unique(seg)) <= {0, 1}
    assert dice(seg == 1, truth) > (0.95 if pixel_spacing <= 1.0 else 0.9)
    report = json.loads((tmp_path / "out" / "patient_12_report.json").read_text())
    voxel_ml = 0.8 * 0.7 * 3.0 / 1000
    assert report["volumes_ml"]["liver"] == pytest.approx(report["voxels"]["liver"] * voxel_ml, rel=1e-6)
    assert report["voxels"]["liver"] == int((seg == 1).sum())
    assert report["liver_slices"] == [4, 14]  # slices stay native: no resampling across them
    assert report["liver_extent_mm"]["height"] == pytest.approx(11 * 3.0)
    assert report["liver_extent_mm"]["width"] == pytest.approx(80 * 0.8, abs=1.7 * max(1.0, pixel_spacing))
    overlay = np.asarray(Image.open(tmp_path / "out" / "patient_12_overlay.png").convert("RGB"))
    assert (overlay == class_rgb(1)).all(axis=2).sum() > 200  # the liver's contours are drawn on it
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary files left
    # the CT inside each organ, and the model that made the mask
    assert report["hu"]["liver"]["median"] == 100.0 and report["hu"]["bone"] is None
    assert report["model"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert report["model"]["liver_fcn_version"] == liver_fcn.__version__ and report["model"]["settings"]["width"]
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["case"] == "patient_12" and row["checkpoint_sha256"] == report["model"]["sha256"]
    assert float(row["liver_ml"]) == pytest.approx(report["volumes_ml"]["liver"], abs=0.01)
    assert float(row["liver_median_hu"]) == 100.0 and row["bone_mean_hu"] == "" and row["qc_flags"]


def dicom_affine(folder: Path) -> np.ndarray:
    """The affine ITK and MONAI derive for (column, row, slice) voxel order, written out from the tags."""
    dss = sorted(
        (pydicom.dcmread(f) for f in folder.iterdir()),
        key=lambda d: float(
            np.dot(d.ImagePositionPatient, np.cross(d.ImageOrientationPatient[:3], d.ImageOrientationPatient[3:]))
        ),
    )
    iop = np.array(dss[0].ImageOrientationPatient, float)
    row_cos, col_cos = iop[:3], iop[3:]
    dr, dc = (float(v) for v in dss[0].PixelSpacing)
    p0, p1 = np.array(dss[0].ImagePositionPatient, float), np.array(dss[1].ImagePositionPatient, float)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dc, col_cos * dr, p1 - p0, p0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS


def test_dicom_round_trip_with_shuffled_names_intercept_and_real_positions(threshold_ckpt, tmp_path):
    ct, block = block_volume()
    geo = SeriesGeometry(pixel_spacing=(0.7, 0.8), slice_spacing=3.0, origin=(-180.25, -205.5, 1180.0))
    raw = write_series(tmp_path / "raw", ct, geo, SeriesTags(), rescale_intercept=-1024)
    assert float(pydicom.dcmread(raw / "image_0").RescaleIntercept) == -1024
    series = tmp_path / "abdomen_ct"
    series.mkdir()
    names = list(range(ct.shape[0]))
    random.Random(4).shuffle(names)
    for k, n in enumerate(names):
        shutil.copy(raw / f"image_{k}", series / f"IM{n:04d}")
    infer(threshold_ckpt, series, tmp_path / "out", overlay=False)
    out = nib.load(str(tmp_path / "out" / "abdomen_ct_seg.nii.gz"))
    assert out.shape == (131, 97, 20)  # columns, rows, slices
    np.testing.assert_allclose(out.affine, dicom_affine(series), atol=1e-4)
    np.testing.assert_allclose(out.affine[:3, 3], [180.25, 205.5, 1180.0])
    seg = np.asarray(out.dataobj)
    assert dice(seg == 1, np.transpose(block, (2, 1, 0))) > 0.95
    assert not (tmp_path / "out" / "abdomen_ct_overlay.png").exists()


def box_series(folder: Path) -> tuple[Path, np.ndarray]:
    """A 64 x 96 x 8 series at 0.9 mm pixels and 2.5 mm slices: a 100 HU box in air, and the box's
    mask (slices, rows, columns). At the checkpoint's 0.9 mm the chain resamples nothing."""
    ct, block = block_volume(shape=(8, 64, 96))
    block[:] = False
    block[2:6, 10:40, 20:50] = True
    ct[:] = -1000
    ct[block] = 100
    return write_series(folder, ct, SeriesGeometry(pixel_spacing=(0.9, 0.9), slice_spacing=2.5), SeriesTags()), block


def test_dicom_seg_references_the_ct_and_matches_the_mask(tmp_path):
    import highdicom as hd

    series, block = box_series(tmp_path / "p7" / "PATIENT_DICOM")
    # at the series' own pixel spacing the chain resamples nothing: the mask must be exact
    infer(
        checkpoint_with(tmp_path, pixel_spacing=0.9, image_size=128),
        series,
        tmp_path / "out",
        dicom_seg=True,
        overlay=False,
    )
    seg = hd.seg.segread(tmp_path / "out" / "p7_seg.dcm")  # a PATIENT_DICOM folder is named after its parent
    ref = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f) for f in series.iterdir()}
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == next(iter(ref.values())).SeriesInstanceUID
    (desc,) = seg.SegmentSequence
    assert desc.SegmentLabel == "liver" and desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    lab = hd.color.CIELabColor.from_dicom_value(desc.RecommendedDisplayCIELabValue)
    assert lab.to_rgb() == class_rgb(1)  # the overlay's liver colour
    assert seg.NumberOfFrames == 8
    frames = seg.pixel_array
    for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = int(ref[uid].InstanceNumber)
        assert np.array_equal(frames[f].astype(bool), block[k]), k


def test_rtstruct_contours_read_back_as_the_mask_in_the_class_colours(tmp_path):
    series, block = box_series(tmp_path / "abdomen")
    # shuffled file names: the contours must follow the slices' positions, not the names
    for f in sorted(series.iterdir()):
        f.rename(series / f"x{hash(f.name) % 1000:03d}_{f.name}")
    ckpt = checkpoint_with(tmp_path, pixel_spacing=0.9, image_size=128)
    infer(ckpt, series, tmp_path / "out", rtstruct=True, overlay=False)
    mask = np.asarray(nib.load(str(tmp_path / "out" / "abdomen_seg.nii.gz")).dataobj)
    rois = read_rtstruct(series, tmp_path / "out" / "abdomen_rtstruct.dcm")
    assert list(rois) == ["liver"] and rois["liver"].shape == mask.shape
    assert dice(rois["liver"], mask == 1) > 0.95 and dice(np.transpose(rois["liver"], (2, 1, 0)), block) > 0.95
    rt = pydicom.dcmread(tmp_path / "out" / "abdomen_rtstruct.dcm")
    assert rt.Modality == "RTSTRUCT" and [int(v) for v in rt.ROIContourSequence[0].ROIDisplayColor] == list(
        class_rgb(1)
    )
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in series.iterdir()}
    refs = {c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in rt.ROIContourSequence[0].ContourSequence}
    assert refs <= uids and len(refs) == 4  # the four slices the block covers
    if shutil.which("dciodvfy"):  # the standard's conformance checker, where installed
        assert dciodvfy_errors(tmp_path / "out" / "abdomen_rtstruct.dcm") == []
    report = json.loads((tmp_path / "out" / "abdomen_report.json").read_text())
    assert report["files"]["rtstruct"] == str(tmp_path / "out" / "abdomen_rtstruct.dcm")


def deidentify(series: Path, **blank) -> None:
    """Blank the UIDs (and, by keyword, other attributes) of every file of a series, as de-identifying
    exports do: present but empty."""
    for f in series.iterdir():
        ds = pydicom.dcmread(f)
        for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID"):
            setattr(ds, keyword, "")
        for keyword, value in blank.items():
            setattr(ds, keyword, value)
        ds.save_as(f)


def test_deidentified_series_with_blank_uids_is_read_and_gets_a_seg(tmp_path):
    import highdicom as hd

    ct, block = block_volume(shape=(8, 64, 96))
    series = write_series(
        tmp_path / "anon", ct, SeriesGeometry(pixel_spacing=(0.9, 0.9), slice_spacing=2.5), SeriesTags()
    )
    deidentify(series, SpecificCharacterSet="")  # an empty character set, as one vendor writes it
    infer(
        checkpoint_with(tmp_path, pixel_spacing=0.9, image_size=128),
        series,
        tmp_path / "out",
        dicom_seg=True,
        overlay=False,
    )
    mask = np.transpose(np.asarray(nib.load(str(tmp_path / "out" / "anon_seg.nii.gz")).dataobj), (2, 1, 0))
    assert dice(mask == 1, block) > 0.99
    report = json.loads((tmp_path / "out" / "anon_report.json").read_text())
    assert "SeriesInstanceUID" in report["dicom_seg_note"] and "SOPInstanceUID" in report["dicom_seg_note"]
    seg = hd.seg.segread(tmp_path / "out" / "anon_seg.dcm")
    assert seg.NumberOfFrames == 8 and seg.ReferencedSeriesSequence[0].SeriesInstanceUID


def test_two_phases_on_one_grid_without_uids_are_refused_naming_both_files(threshold_ckpt, tmp_path):
    from pydicom.uid import generate_uid

    ct, _ = block_volume(shape=(4, 40, 40))
    frame = generate_uid()  # one scan session: one frame of reference
    for other_frame, expected in (
        (frame, r"venous_image_\d: same slice position as image_\d .*duplicate slice"),
        (generate_uid(), r"folder holds 2 series: \(no SeriesInstanceUID.*put each series in its own folder"),
    ):
        folder = write_series(
            tmp_path / "phases",
            ct,
            SeriesGeometry(),
            SeriesTags(series_description="arterial", frame_of_reference_uid=frame),
        )
        write_series(
            tmp_path / "venous",
            ct + 50,
            SeriesGeometry(),
            SeriesTags(series_description="venous", frame_of_reference_uid=other_frame),
        )
        for f in (tmp_path / "venous").iterdir():
            shutil.copy(f, folder / f"venous_{f.name}")
        deidentify(folder)
        with pytest.raises(Exception) as e:
            infer(threshold_ckpt, folder, tmp_path / "out")
        import re

        err = str(input_error(e.value))
        assert re.search(expected, err), err
        assert not (tmp_path / "out").exists()
        shutil.rmtree(tmp_path / "phases")
        shutil.rmtree(tmp_path / "venous")


def test_axes_in_another_order_come_back_in_that_order(threshold_ckpt, tmp_path):
    """A NIfTI stored with its voxel axes as (x, z, y), e.g. a coronal reconstruction."""
    ct, block = block_volume(shape=(24, 60, 70))
    vol = np.transpose(ct, (2, 0, 1)).astype(np.float32)  # voxel axes: columns (x), slices (z), rows (y)
    truth = np.transpose(block, (2, 0, 1))
    affine = np.array([[-0.9, 0, 0, 40.0], [0, 0, 1.1, -20.0], [0, 2.0, 0, 100.0], [0, 0, 0, 1]])
    src = tmp_path / "coronal.nii.gz"
    nib.save(nib.Nifti1Image(vol, affine), str(src))
    infer(threshold_ckpt, src, tmp_path / "out", overlay=False)
    out = nib.load(str(tmp_path / "out" / "coronal_seg.nii.gz"))
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert dice(np.asarray(out.dataobj) == 1, truth) > 0.95


def test_checkpoint_without_preprocessing_settings_is_refused(tmp_path):
    old = tmp_path / "old.pt"  # written before the pixel spacing was recorded
    torch.save({"model": {"threshold": torch.tensor(0.05)}, "settings": {"variant": "8s", "image_size": 256}}, old)
    bare = tmp_path / "bare.pt"
    torch.save({"threshold": torch.tensor(0.05)}, bare)
    ct, _ = block_volume(shape=(6, 40, 40))
    src = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ct, (2, 1, 0)).astype(np.float32), np.eye(4)), str(src))
    for ckpt, why in (
        (old, "lacks the settings width, in_channels, class_names, pixel_spacing"),
        (bare, "holds no settings"),
    ):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "inference",
                "--config_file",
                CONFIG,
                "--input",
                str(src),
                "--output_dir",
                str(tmp_path / "out"),
                "--checkpoint",
                str(ckpt),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 2, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {ckpt}: checkpoint {why}") and "train it again" in last, last
        assert not (tmp_path / "out").exists()


def test_real_fcn_checkpoint_rebuilds_from_its_settings(tmp_path):
    net = FCN("4s", in_channels=1, out_channels=4, width=1 / 16)
    settings = {**SETTINGS, "variant": "4s", "width": 1 / 16, "pixel_spacing": 1.5, "image_size": 64}
    torch.save({"model": net.state_dict(), "settings": settings}, tmp_path / "model.pt")
    ct, _ = block_volume(shape=(6, 48, 40))
    src = tmp_path / "small.nii"
    nib.save(nib.Nifti1Image(np.transpose(ct, (2, 1, 0)).astype(np.int16), np.diag([1.5, 1.5, 5.0, 1.0])), str(src))
    bundle_run(
        "inference",
        config_file=CONFIG,
        input=str(src),
        output_dir=str(tmp_path / "out"),
        checkpoint=str(tmp_path / "model.pt"),
        logging_file=False,
    )
    out = nib.load(str(tmp_path / "out" / "small_seg.nii.gz"))
    assert out.shape == (40, 48, 6)


def test_datalist_input_runs_every_case(threshold_ckpt, tmp_path):
    ct, _ = block_volume(shape=(6, 40, 48))
    for name in ("a", "b"):
        nib.save(
            nib.Nifti1Image(np.transpose(ct, (2, 1, 0)).astype(np.float32), np.eye(4)), str(tmp_path / f"{name}.nii.gz")
        )
    (tmp_path / "list.json").write_text(json.dumps([{"image": "a.nii.gz"}, "b.nii.gz"]))
    infer(threshold_ckpt, tmp_path / "list.json", tmp_path / "out", overlay=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a_report.json",
        "a_seg.nii.gz",
        "b_report.json",
        "b_seg.nii.gz",
        "summary.csv",
        "summary.json",
    ]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [w["case"] for w in summary["written"]] == ["a", "b"] and summary["failed"] == []


def test_inputs_as_they_arrive_a_folder_of_nifti_a_zip_and_a_pacs_export_with_series_auto(threshold_ckpt, tmp_path):
    ct, block = block_volume(shape=(6, 40, 48))
    niftis = tmp_path / "niftis"
    (niftis / "more").mkdir(parents=True)
    for path in (niftis / "a.nii.gz", niftis / "more" / "b.nii"):
        nib.save(nib.Nifti1Image(np.transpose(ct, (2, 1, 0)).astype(np.float32), np.eye(4)), str(path))
    infer(threshold_ckpt, niftis, tmp_path / "out1", overlay=False)
    summary = json.loads((tmp_path / "out1" / "summary.json").read_text())
    assert [w["case"] for w in summary["written"]] == ["a", "b"] and summary["failed"] == []

    export = tmp_path / "export"
    main = write_series(
        export / "S1" / "abdomen", ct, SeriesGeometry(slice_spacing=2.0), SeriesTags(series_description="abdomen")
    )
    write_series(export / "S2", ct[:2], SeriesGeometry(), SeriesTags(series_description="scout"))
    archive = zipped(export, tmp_path / "pacs.zip", prefix="export/")
    infer(threshold_ckpt, archive, tmp_path / "out2", overlay=False, series_uid="auto", dicom_seg=True)
    report = json.loads((tmp_path / "out2" / "pacs_report.json").read_text())
    uid = pydicom.dcmread(main / "image_0").SeriesInstanceUID
    assert report["input"] == str(archive)
    assert report["series"]["series_uid"] == uid and report["series"]["slices"] == 6
    assert report["series"]["selection"].startswith("auto: the axial CT series with the most slices")
    seg = pydicom.dcmread(tmp_path / "out2" / "pacs_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    mask = np.asarray(nib.load(str(tmp_path / "out2" / "pacs_seg.nii.gz")).dataobj)
    assert dice(np.transpose(mask, (2, 1, 0)) == 1, block) > 0.95
    with open(tmp_path / "out2" / "summary.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert row["series_uid"] == uid
    # the same export as a folder, the series named by its UID: the same mask
    infer(threshold_ckpt, export, tmp_path / "out3", overlay=False, series_uid=uid)
    again = np.asarray(nib.load(str(tmp_path / "out3" / "export_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(again, mask)


def test_report_volume_is_voxel_count_times_voxel_volume():
    seg = np.zeros((10, 12, 7), np.uint8)
    seg[2:5, 3:9, 1:4] = 1  # 3 x 6 x 3 = 54 voxels
    seg[0, 0, 0] = 2
    affine = np.array([[0, 0.9, 0, 0], [-0.6, 0, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1]])  # rotated axes
    r = case_report(seg, affine, ["background", "liver", "bone", "kidney"], "x")
    assert r["voxels"]["liver"] == 54 and r["volumes_ml"]["liver"] == pytest.approx(
        54 * 0.9 * 0.6 * 2.5 / 1000, rel=1e-9
    )
    assert r["volumes_ml"]["kidney"] == 0 and r["voxels"]["bone"] == 1
    # voxel axis 0 (3 voxels) runs along y, axis 1 (6 voxels) along x
    assert r["liver_extent_mm"] == {
        "width": pytest.approx(6 * 0.9),
        "depth": pytest.approx(3 * 0.6),
        "height": pytest.approx(3 * 2.5),
    }
    assert r["liver_slices"] == [1, 3] and r["spacing_mm"] == [0.6, 0.9, 2.5]


# ---- bad inputs: each stops with its own message, and nothing is written ----


def two_series(tmp: Path) -> Path:
    ct, _ = block_volume(shape=(4, 40, 40))
    folder = write_series(tmp / "two", ct, SeriesGeometry(), SeriesTags(series_description="soft tissue"))
    write_series(tmp / "other", ct, SeriesGeometry(), SeriesTags(series_description="lung kernel"))
    for f in (tmp / "other").iterdir():
        shutil.copy(f, folder / f"lung_{f.name}")
    return folder


def good_series(tmp: Path, name="ok", **tags) -> Path:
    ct, _ = block_volume(shape=(6, 40, 40))
    return write_series(tmp / name, ct, SeriesGeometry(slice_spacing=2.0), SeriesTags(**tags))


def bad_inputs(tmp: Path) -> dict:
    cases = {}
    tmp.mkdir(parents=True, exist_ok=True)
    cases["missing path"] = (tmp / "nowhere", {}, r"nowhere: input does not exist")
    (tmp / "empty").mkdir()
    cases["empty folder"] = (tmp / "empty", {}, r"empty: folder is empty")
    cases["two series"] = (two_series(tmp), {}, r"holds 2 series: .*soft tissue, 4 files.*lung kernel, 4 files")
    s = good_series(tmp, "gap")
    (s / "image_3").unlink()
    cases["missing slice"] = (s, {}, r"image_4: missing slice")
    s = good_series(tmp, "uneven")
    ds = pydicom.dcmread(s / "image_5")
    ds.ImagePositionPatient = [0.0, 0.0, 11.0]
    ds.save_as(s / "image_5")
    cases["uneven spacing"] = (s, {}, r"image_5: uneven slice spacing")
    cases["MR scan"] = (good_series(tmp, "mr", modality="MR"), {}, r"image_0: modality is MR, expected CT")
    s = good_series(tmp, "trunc")
    data = (s / "image_2").read_bytes()
    (s / "image_2").write_bytes(data[:-300])
    cases["truncated file"] = (s, {}, r"image_2: truncated DICOM file")
    s = good_series(tmp, "junk")
    (s / "README.txt").write_text("not an image")
    cases["non-DICOM file"] = (s, {}, r"README.txt: not a DICOM file")
    s = good_series(tmp, "single")
    cases["single slice file"] = (s / "image_0", {}, r"image_0: not a DICOM series folder")
    nii4 = tmp / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), str(nii4))
    cases["4D NIfTI"] = (nii4, {}, r"fmri.nii.gz: NIfTI image has shape \(8, 8, 4, 3\)")
    bad_nii = tmp / "broken.nii.gz"
    bad_nii.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    cases["corrupt NIfTI"] = (bad_nii, {}, r"broken.nii.gz: not a readable NIfTI file")
    whole = tmp / "whole.nii.gz"  # its header and first slice read well: only reading it through finds the cut
    noise = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 16)).astype(np.int16)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), str(whole))
    (tmp / "cut.nii.gz").write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    cases["truncated .nii.gz"] = (tmp / "cut.nii.gz", {}, r"cut.nii.gz: truncated or corrupt compressed NIfTI")
    nib.save(nib.Nifti1Image(noise, np.eye(4)), str(tmp / "whole.nii"))
    (tmp / "cut.nii").write_bytes((tmp / "whole.nii").read_bytes()[:40000])
    cases["truncated .nii"] = (tmp / "cut.nii", {}, r"cut.nii: NIfTI file is truncated \(40000 bytes")
    png = tmp / "slice.png"
    png.write_bytes(b"\x89PNG")
    cases["unsupported file"] = (png, {}, r"slice.png: not a DICOM series folder or zip, a NIfTI file")
    (tmp / "bad.json").write_text("{not json")
    cases["invalid datalist"] = (tmp / "bad.json", {}, r"bad.json: datalist is not valid JSON")
    (tmp / "nosplit.json").write_text(json.dumps({"training": []}))
    cases["datalist without split"] = (tmp / "nosplit.json", {}, r"nosplit.json: datalist has no 'test' split")
    nii = tmp / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 4), np.float32), np.eye(4)), str(nii))
    (tmp / "dupes.json").write_text(json.dumps([str(nii), str(nii)]))
    cases["duplicate case names"] = (tmp / "dupes.json", {}, r"case name 'ok' is also that of")
    cases["DICOM SEG of a NIfTI"] = (
        nii,
        {"dicom_seg": True},
        r"ok.nii.gz: a DICOM Segmentation needs a DICOM series input",
    )
    s = good_series(tmp, "tilted")  # a 15 degree gantry tilt: each slice shifted along y as it steps in z
    for f in s.iterdir():
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + z * float(np.tan(np.radians(15))), z]
        ds.save_as(f)
    cases["gantry tilt"] = (s, {}, r"tilted: gantry-tilted series: the slices step 15.0 degrees off their normal")
    s = good_series(tmp, "enhanced")  # one multi-frame file standing for the series
    first = sorted(s.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.NumberOfFrames = 6
    ds.PixelData = ds.PixelData * 6
    for f in s.iterdir():
        f.unlink()
    ds.save_as(s / "enhanced.dcm")
    cases["Enhanced CT"] = (s, {}, r"enhanced.dcm: an Enhanced \(multi-frame\) CT image of 6 frames")
    s = good_series(tmp, "rgb")  # a screenshot series labelled CT
    for f in s.iterdir():
        ds = pydicom.dcmread(f)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.PixelData = ds.PixelData * 3
        ds.save_as(f)
    cases["RGB labelled CT"] = (s, {}, r"image_0: a RGB image of 3 samples per pixel")
    s = good_series(tmp, "sizes")
    ds = pydicom.dcmread(s / "image_3")
    ds.Rows = 20
    ds.save_as(s / "image_3")
    cases["mixed slice sizes"] = (s, {}, r"image_3: slice is 20x40, image_0 is 40x40")
    s = good_series(tmp, "spacings")
    ds = pydicom.dcmread(s / "image_2")
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(s / "image_2")
    cases["mixed pixel spacing"] = (s, {}, r"image_2: PixelSpacing differs from image_0's")
    s = good_series(tmp, "noposition")
    ds = pydicom.dcmread(s / "image_4")
    del ds.ImagePositionPatient
    ds.save_as(s / "image_4")
    cases["no slice position"] = (s, {}, r"image_4: DICOM slice lacks ImagePositionPatient")
    s = good_series(tmp, "oneslice")
    for f in s.iterdir():
        if f.name != "image_0":
            f.unlink()
    cases["one-slice series"] = (s, {}, r"oneslice: series has 1 slice; a volume needs at least 2")
    cases["unknown series UID"] = (
        good_series(tmp, "pick"),
        {"series_uid": "1.2.3.4"},
        r"pick: no series with SeriesInstanceUID 1.2.3.4",
    )
    nib.save(nib.Nifti1Image(np.zeros((40, 40), np.float32), np.eye(4)), str(tmp / "flat2d.nii.gz"))
    cases["2D NIfTI"] = (tmp / "flat2d.nii.gz", {}, r"flat2d.nii.gz: NIfTI image has shape \(40, 40\)")
    (tmp / "empty.json").write_text("[]")
    cases["empty datalist"] = (tmp / "empty.json", {}, r"empty.json: datalist holds no cases")
    (tmp / "noimage.json").write_text(json.dumps([{"patient": "x"}]))
    cases["datalist entry without image"] = (tmp / "noimage.json", {}, r"noimage.json: datalist entry without 'image'")
    (tmp / "nested.json").write_text(json.dumps(["empty.json"]))
    cases["datalist inside a datalist"] = (
        tmp / "nested.json",
        {},
        r"empty.json: a datalist must be the --input itself",
    )
    cases["unknown precision"] = (nii, {"precision": "fp16"}, r"precision must be 'auto', 'fp32' or 'bf16', got 'fp16'")
    cases["not a boolean"] = (nii, {"postprocess": "perhaps"}, r"--postprocess must be true or false, got 'perhaps'")
    cases["checkpoint missing"] = (nii, {"checkpoint": str(tmp / "none.pt")}, r"none.pt: checkpoint not found")
    flat = nib.Nifti1Image(
        np.zeros((40, 40, 4), np.int16), np.eye(4)
    )  # nibabel and MONAI would fall back to another matrix
    flat.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)  # a singular sform (slices of no thickness), no qform
    flat.set_qform(None, code=0)
    nib.save(flat, str(tmp / "flat.nii.gz"))
    cases["singular affine"] = (tmp / "flat.nii.gz", {}, r"flat.nii.gz: NIfTI affine is singular")
    zero = nib.Nifti1Image(np.zeros((40, 40, 4), np.int16), np.eye(4))
    zero.set_sform(np.zeros((4, 4)), code=1)
    zero.set_qform(None, code=0)
    nib.save(zero, str(tmp / "zero.nii.gz"))
    cases["zero affine"] = (tmp / "zero.nii.gz", {}, r"zero.nii.gz: NIfTI affine is singular")
    two = nib.Nifti1Image(np.zeros((40, 40, 4), np.int16), np.eye(4))
    moved = np.eye(4)
    moved[:3, 3] = [0.0, 0.0, 72.0]  # a tilted-gantry conversion that fixed one matrix only
    two.set_qform(np.eye(4), code=1)
    two.set_sform(moved, code=1)
    nib.save(two, str(tmp / "two_forms.nii.gz"))
    cases["qform and sform disagree"] = (
        tmp / "two_forms.nii.gz",
        {},
        r"two_forms.nii.gz: NIfTI qform and sform disagree by 72.0 mm",
    )
    vals = np.zeros((40, 40, 4), np.float32)
    vals[3, 4, 1] = np.nan
    vals[5, 5, 2] = np.inf
    nib.save(nib.Nifti1Image(vals, np.eye(4)), str(tmp / "nan.nii.gz"))
    cases["NaN voxels"] = (tmp / "nan.nii.gz", {}, r"nan.nii.gz: 2 voxels not finite")
    s = good_series(tmp, "rle")  # RLE compressed; one slice's segment table points past its data
    for f in s.iterdir():
        ds = pydicom.dcmread(f)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(f)
    raw = bytearray((s / "image_4").read_bytes())
    frame = next(pydicom.encaps.generate_frames(pydicom.dcmread(s / "image_4").PixelData, number_of_frames=1))
    at = bytes(raw).find(frame[:64])
    raw[at + 8 : at + 12] = (1 << 20).to_bytes(4, "little")
    (s / "image_4").write_bytes(bytes(raw))
    cases["corrupt RLE pixel data"] = (s, {}, r"image_4: cannot decode pixel data \(RuntimeError: .*RLE segment")
    cases["zip with two series"] = (
        zipped(two_series(tmp / "zip2"), tmp / "two.zip", prefix="export/"),
        {},
        r"two.zip: folder holds 2 series: .*soft tissue, 4 files, CT axial.*lung kernel.*--series auto",
    )
    nested = tmp / "nested"
    good_series(nested, "CT")
    good_series(nested / "more", "MR", modality="MR", series_description="t2")
    cases["nested folder with an MR series"] = (nested, {}, r"nested: folder holds 2 series: .*t2, 6 files, MR axial")
    cases["nested MR series, auto"] = (
        nested / "more",
        {"series_uid": "auto"},
        r"more: no axial CT image series to pick among 1: .*\(t2, 6 files, MR axial",
    )
    with zipfile.ZipFile(tmp / "empty.zip", "w") as zf:
        zf.writestr("DICOM/", "")
    cases["empty zip"] = (tmp / "empty.zip", {}, r"empty.zip: zip archive holds no files")
    cases["RTSTRUCT of a NIfTI"] = (nii, {"rtstruct": True}, r"ok.nii.gz: an RTSTRUCT needs a DICOM series input")
    s = tmp / "niftis"
    s.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 4), np.float32), np.eye(4)), str(s / "a.nii.gz"))
    (s / "notes.txt").write_text("not an image")
    cases["folder of NIfTI and another file"] = (s, {}, r"notes.txt: not a NIfTI file, in a folder of 1 NIfTI files")
    return cases


def input_error(exc: BaseException) -> InputError | None:
    while exc is not None:
        if isinstance(exc, InputError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


#: the bad inputs' names, known when the tests are collected (the files are made once per session)
with tempfile.TemporaryDirectory(prefix="liver-fcn-bad-names-") as _tmp:
    BAD_INPUTS = list(bad_inputs(Path(_tmp)))


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory) -> dict:
    return bad_inputs(tmp_path_factory.mktemp("bad"))


def test_there_are_at_least_30_bad_inputs():
    assert len(BAD_INPUTS) >= 30, len(BAD_INPUTS)


def bad_input_args(case: tuple, checkpoint: Path, out: Path) -> list[str]:
    """The command line of one bad input: its path, the output folder, its options."""
    path, extra, _ = case
    args = ["--input", str(path), "--output_dir", str(out)]
    for key, value in {"checkpoint": str(checkpoint), **extra}.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return args


@pytest.fixture(scope="module")
def bad_runs(bad_cases, small_fcn, tmp_path_factory) -> dict:
    """Every bad input through the command a user types, forked from a warm interpreter, two at a time:
    ``{what: (completed process, its output folder)}``."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("bad_runs")

    def run(what):
        out = root / f"out{BAD_INPUTS.index(what)}"
        return what, (bundle_cli(*bad_input_args(bad_cases[what], small_fcn, out), env=sharing_cores(2)), out)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, bad_cases))


@pytest.mark.parametrize("what", BAD_INPUTS)
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(what, bad_cases, bad_runs):
    """Each bad input: one line naming the cause, exit 2, no output folder."""
    import re

    pattern = bad_cases[what][2]
    r, out = bad_runs[what]
    lines = [line for line in r.stderr.strip().splitlines() if not re.search(r"Warning|warn\(|nvImageCodec|^\s", line)]
    assert r.returncode == 2, (what, r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, what  # no decoder's log either
    assert " - ERROR - " not in r.stdout + r.stderr, what
    assert lines and lines[-1].startswith("error: ") and re.search(pattern, lines[-1]), (what, lines[-3:])
    assert not out.exists(), what


@pytest.mark.parametrize("what", ["missing path", BAD_INPUTS[len(BAD_INPUTS) // 2]])
def test_a_new_interpreter_gives_what_the_warm_runs_give(what, bad_cases, bad_runs, small_fcn, tmp_path):
    """The bad inputs above run forked from a warm interpreter; a new one exits and prints the same."""
    import re

    new = bundle_cli(*bad_input_args(bad_cases[what], small_fcn, tmp_path / "out"), new=True)
    warm, warm_out = bad_runs[what]

    def lines(text: str, out: Path) -> list[str]:  # without the log's time stamps and the output folder's name
        return [re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ - ", "", x) for x in text.replace(str(out), "OUT").splitlines()]

    assert new.returncode == warm.returncode == 2, what
    assert lines(new.stderr, tmp_path / "out") == lines(warm.stderr, warm_out), what
    assert lines(new.stdout, tmp_path / "out") == lines(warm.stdout, warm_out), what
    assert not (tmp_path / "out").exists()


def test_no_input_given(threshold_ckpt, tmp_path):
    with pytest.raises(Exception) as e:
        bundle_run(
            "inference",
            config_file=CONFIG,
            output_dir=str(tmp_path / "o"),
            checkpoint=str(threshold_ckpt),
            network_def=THRESHOLD_NET,
            logging_file=False,
        )
    assert "no input: pass --input" in str(input_error(e.value))


# ---- a failing case, case file sets, boolean options, through the command a user types ----


@pytest.fixture(scope="module")
def small_fcn(tmp_path_factory) -> Path:
    """A small real FCN checkpoint (random weights) for runs through `python -m monai.bundle`."""
    torch.manual_seed(0)
    net = FCN("8s", in_channels=1, out_channels=4, width=1 / 16)
    path = tmp_path_factory.mktemp("fcn") / "model.pt"
    torch.save(
        {"model": net.state_dict(), "settings": {**SETTINGS, "width": 1 / 16, "pixel_spacing": 2.0, "image_size": 96}},
        path,
    )
    return path


def bundle_cli(
    *args: str, timeout: int = 300, new: bool = False, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run inference ...`` from the repository root (which holds ``tests.helpers``),
    forked from the warm interpreter of ``commands.py`` (``new=True``: in a new interpreter)."""
    command = new_process if new else warm_module
    return command(
        "monai.bundle", "run", "inference", "--config_file", CONFIG, *args, cwd=REPO, timeout=timeout, env=env
    )


def nifti_case(path: Path) -> Path:
    ct, _ = block_volume(shape=(6, 40, 48))
    nib.save(nib.Nifti1Image(np.transpose(ct, (2, 1, 0)).astype(np.int16), np.diag([2.0, 2.0, 5.0, 1.0])), str(path))
    return path


def test_a_case_failing_after_the_checks_is_named_and_the_others_are_kept(small_fcn, tmp_path):
    for name in "abc":
        nifti_case(tmp_path / f"{name}.nii.gz")
    (tmp_path / "list.json").write_text(json.dumps(["a.nii.gz", "b.nii.gz", "c.nii.gz"]))
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "list.json"), "--checkpoint", str(small_fcn), "--output_dir", str(out)]
    assert bundle_cli(*args).returncode == 0
    assert (out / "b_seg.nii.gz").is_file() and (out / "b_report.json").is_file()
    # again, with case b failing while its files are written (its mask staged, its overlay not)
    fault = ["--write_overlay#_target_", "tests.helpers.OverlayFailingFor", "--write_overlay#case", "b"]
    r = bundle_cli(*args, *fault)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert " - INFO - 2 cases written to " in lines[-2] and " - ERROR - 1 case FAILED: b (the errors are" in lines[-1]
    assert (r.stdout + r.stderr).count("No space left on device (injected)") == 1  # the error, once
    failed_line = next(line for line in lines if "b: FAILED" in line)
    assert "nothing new written for it (an earlier run's outputs of it stay: b_seg.nii.gz, b_overlay.png, " in (
        failed_line
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [w["case"] for w in summary["written"]] == ["a", "c"]
    (failed,) = summary["failed"]
    assert failed["case"] == "b" and "No space left on device" in failed["error"]
    assert failed["earlier_outputs_kept"] == ["b_seg.nii.gz", "b_overlay.png", "b_report.json"]
    # the earlier set of b stays whole, and its report says when it was made: before this run's a and c
    first = json.loads((out / "b_report.json").read_text())
    assert all(Path(f).is_file() for f in first["files"].values())
    assert first["written_at"] <= json.loads((out / "a_report.json").read_text())["written_at"]
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")], names  # no staging left behind
    assert {"a_seg.nii.gz", "a_report.json", "a_overlay.png", "c_seg.nii.gz"} <= set(names)
    assert [row["case"] for row in csv.DictReader(open(out / "summary.csv"))] == ["a", "c"]


def test_two_runs_into_one_folder_write_each_case_set_whole(small_fcn, tmp_path):
    """Two runs at once into one folder, one with overlays and one without: every case's files on disk
    are exactly the set its report names, made by the one process the report names."""
    from concurrent.futures import ThreadPoolExecutor

    names = "abcd"
    (tmp_path / "list.json").write_text(json.dumps([nifti_case(tmp_path / f"{n}.nii.gz").name for n in names]))
    out = tmp_path / "out"
    base = ["--input", str(tmp_path / "list.json"), "--checkpoint", str(small_fcn), "--output_dir", str(out)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(
            pool.map(lambda overlay: bundle_cli(*base, "--overlay", overlay, env=sharing_cores(2)), ["false", "true"])
        )
    assert [r.returncode for r in runs] == [0, 0], [r.stdout[-2500:] + r.stderr[-800:] for r in runs]
    for n in names:
        report = json.loads((out / f"{n}_report.json").read_text())
        on_disk = sorted(p.name for p in out.iterdir() if p.name.startswith(f"{n}_") and not p.name.endswith(".json"))
        assert on_disk == sorted(Path(f).name for f in report["files"].values()), (n, on_disk, report["files"])
        assert re.fullmatch(r".+:\d+", report["written_by"])
    summary = json.loads((out / "summary.json").read_text())  # the run that finished last
    assert len({w["written_by"] for w in summary["written"]}) == 1 and len(summary["written"]) == len(names)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_run_killed_mid_write_leaves_whole_sets_and_the_next_run_cleans_up(small_fcn, tmp_path):
    import signal

    names = [f"k{i}" for i in range(8)]
    (tmp_path / "list.json").write_text(json.dumps([nifti_case(tmp_path / f"{n}.nii.gz").name for n in names]))
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "list.json"), "--checkpoint", str(small_fcn), "--output_dir", str(out)]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", CONFIG, *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out.is_dir() and list(out.glob(".*.stage")) and list(out.glob("*_report.json"))):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    reports = {p.name[: -len("_report.json")] for p in out.glob("*_report.json")}
    assert reports and len(reports) < len(names)
    for case in reports:  # a case with a report has its whole set
        files = json.loads((out / f"{case}_report.json").read_text())["files"].values()
        assert all(Path(f).is_file() for f in files), case
    r = bundle_cli(*args)
    assert r.returncode == 0, r.stderr[-1500:]
    assert {p.name[: -len("_report.json")] for p in out.glob("*_report.json")} == set(names)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed run's staging is gone


@pytest.fixture(scope="module")
def full_set(tmp_path_factory) -> tuple[list[str], Path]:
    """A DICOM series and the whole output set of one run on it (mask, report, overlay, DICOM SEG)."""
    root = tmp_path_factory.mktemp("full_set")
    series, _ = box_series(root / "x")
    args = [
        "--input", str(series), "--checkpoint", str(checkpoint_with(root, pixel_spacing=0.9, image_size=128)),
        "--network_def", json.dumps(THRESHOLD_NET), "--dicom_seg", "true", "--output_dir", str(root / "out"),
    ]  # fmt: skip
    r = bundle_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    return args, root / "out"


@pytest.mark.parametrize(
    "written, options, fits",
    [
        ("x_seg.nii.gz", [], None),
        ("x_overlay.png", [], None),
        ("x_seg.dcm", ["--overlay", "false"], None),
        # the report of a run without overlay and SEG lists fewer files than the earlier one: a limit the mask fits
        ("x_report.json", ["--overlay", "false", "--dicom_seg", "false"], "x_seg.nii.gz"),
    ],
)
def test_a_full_disk_while_writing_names_the_file_and_keeps_the_earlier_set(full_set, tmp_path, written, options, fits):
    """The file size limit of the process (RLIMIT_FSIZE: writes beyond it fail with EFBIG, as on a full
    disk), just under the size of the mask, the overlay, the DICOM SEG or the report (each the first file of
    the run that big): the case fails naming that file, nothing torn stays, and the set an earlier run
    wrote is left as it was."""
    import resource
    import signal

    args, earlier = full_set
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before = {p.name: p.read_bytes() for p in out.glob("x_*")}
    limit = len(before[fits]) if fits else len(before[written]) - 1

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", CONFIG, *args, *options]
    cmd[cmd.index(str(earlier))] = str(out)
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert r.returncode == 1, r.stderr[-1500:]
    line = next(x for x in r.stdout.splitlines() if "x: FAILED" in x)
    assert f"[Errno 27] File too large while writing: '{out / written}'" in line
    assert "Traceback" not in r.stdout + r.stderr
    assert {p.name: p.read_bytes() for p in out.glob("x_*")} == before  # the earlier set, untouched
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staged file left


def test_rerun_replaces_a_case_as_one_set_and_lowercase_false_means_false(small_fcn, tmp_path):
    src = nifti_case(tmp_path / "x.nii.gz")
    out = tmp_path / "out"
    r = bundle_cli("--input", str(src), "--checkpoint", str(small_fcn), "--output_dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "x_overlay.png").exists()
    r = bundle_cli(
        "--input",
        str(src),
        "--checkpoint",
        str(small_fcn),
        "--output_dir",
        str(out),
        "--overlay",
        "false",
        "--postprocess",
        "FALSE",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "x_overlay.png").exists()  # the earlier run's overlay is not left beside the new mask
    report = json.loads((out / "x_report.json").read_text())
    assert set(report["files"]) == {"mask"}
    r = bundle_cli(
        "--input", str(src), "--checkpoint", str(small_fcn), "--output_dir", str(tmp_path / "o2"), "--overlay", "maybe"
    )
    assert (
        r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: --overlay must be true or false, got 'maybe'"
    )
    assert not (tmp_path / "o2").exists()
    (tmp_path / "afile").write_text("x")  # an output folder under a file: refused before any work
    r = bundle_cli("--input", str(src), "--checkpoint", str(small_fcn), "--output_dir", str(tmp_path / "afile" / "out"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "output folder cannot be created: " + str(tmp_path / "afile") + " is a file"
    )
    assert "written to" not in r.stdout


def test_precision_auto_is_the_default_and_bf16_masks_agree_with_fp32(small_fcn, tmp_path):
    from liver_fcn.inference import native_bf16

    cfg = json.loads(Path(CONFIG).read_text())
    assert cfg["precision"] == "auto" and cfg["body_only"] is True
    if not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16 (avx512_bf16 / amx_bf16): auto runs fp32")
    src = nifti_case(tmp_path / "x.nii.gz")
    masks = {}
    for precision in ("fp32", "auto"):
        bundle_run(
            "inference",
            config_file=CONFIG,
            input=str(src),
            output_dir=str(tmp_path / precision),
            checkpoint=str(small_fcn),
            precision=precision,
            overlay=False,
            postprocess=False,
            logging_file=False,
        )
        masks[precision] = np.asarray(nib.load(str(tmp_path / precision / "x_seg.nii.gz")).dataobj)
    assert (masks["fp32"] == masks["auto"]).mean() > 0.99  # random weights: many near-ties, still nearly all equal


def test_quality_flags_each_fire_on_their_own_case():
    from liver_fcn.inference import quality_flags

    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    seg = np.zeros((60, 60, 30), np.uint8)
    seg[10:50, 10:50, 5:25] = 1  # 40 x 40 x 20 voxels of 1.28 mm^3: 41 mL
    vols = {"liver": 41.0, "bone": 0.0, "kidney": 0.0}
    flags = quality_flags(seg, affine, CLASSES, vols)["flags"]
    assert flags == ["liver volume 41 mL outside 800-3000 mL"]
    assert quality_flags(seg, affine, CLASSES, {"liver": 1500.0})["flags"] == []
    assert (
        "liver in 2 large pieces"
        in quality_flags(seg, affine, CLASSES, {"liver": 1500.0}, components={"1": [1400.0, 90.0]})["flags"][0]
    )
    touching = seg.copy()
    touching[20:30, 20:30, 29] = 3  # a kidney on the last slice
    assert quality_flags(touching, affine, CLASSES, {"liver": 1500.0})["flags"] == [
        "kidney touches the first or last slice: the scan may cut it off"
    ]
    # the head-feet axis is found from the affine, whatever the voxel order
    sideways = np.transpose(touching, (2, 0, 1))
    assert (
        quality_flags(sideways, affine[:, [2, 0, 1, 3]], CLASSES, {"liver": 1500.0})["flags"]
        == quality_flags(touching, affine, CLASSES, {"liver": 1500.0})["flags"]
    )
    unsure = quality_flags(seg, affine, CLASSES, {"liver": 1500.0}, entropy={1: 0.6, 2: 0.9})
    assert (
        unsure["flags"] == ["low confidence in the liver (mean entropy 0.60 > 0.35)"]
        and unsure["mean_entropy"]["bone"] == 0.9
    )


def test_entropy_and_liver_pieces_are_measured_where_the_mask_is():
    from monai.data import MetaTensor

    from liver_fcn.transforms import CountComponentsd, class_map_on_input_grid

    logits = torch.zeros(4, 20, 20, 6)
    logits[1, :10] = 12.0  # a confident liver in one half, a tie of all four classes elsewhere
    entropy: dict = {}
    affine = torch.eye(4, dtype=torch.float64)
    labels = class_map_on_input_grid(logits, affine, affine, (20, 20, 6), chunk=4, entropy=entropy)
    assert (labels[:10] == 1).all() and entropy[1] < 0.01
    # the network's grid padded by 2 rows each side: an unsure "liver" in the padding is not the input's
    padded = torch.zeros(4, 24, 20, 6)
    padded[1, 2:12] = 12.0
    padded[1, :2] = 0.1
    pre = torch.eye(4, dtype=torch.float64)
    pre[0, 3] = -2.0  # network voxel 2 is input voxel 0
    entropy = {}
    labels = class_map_on_input_grid(padded, pre, affine, (20, 20, 6), chunk=4, entropy=entropy)
    assert (labels[:10] == 1).all() and entropy[1] < 0.01
    seg = torch.zeros(1, 30, 30, 10, dtype=torch.uint8)
    seg[0, 2:12, 2:12, 2:8] = 1  # 600 voxels of 8 mm^3 = 4.8 mL
    seg[0, 20:25, 20:25, 2:4] = 1  # 50 voxels = 0.4 mL
    out = CountComponentsd("pred", label=1, min_ml=0.3)(
        {"pred": MetaTensor(seg, affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))}
    )
    assert out["components"]["1"] == pytest.approx([4.8, 0.4])


def test_largest_liver_component_kept_by_default_and_both_without_postprocessing(threshold_ckpt, tmp_path):
    ct = np.full((12, 60, 80), -1000, dtype=np.int16)
    ct[:, 5:58, 5:78] = -150  # a body of fat (below the threshold network's liver), holding both blocks
    ct[2:10, 10:40, 10:40] = 100  # the liver
    ct[2:10, 45:55, 60:70] = 100  # a separate, smaller blob the threshold network also calls liver
    src = tmp_path / "two.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(ct, (2, 1, 0)), np.eye(4)), str(src))
    sizes, pieces = {}, {}
    for post in (True, False):
        infer(threshold_ckpt, src, tmp_path / f"out{post}", overlay=False, postprocess=post, qc_component_ml=0.5)
        seg = np.asarray(nib.load(str(tmp_path / f"out{post}" / "two_seg.nii.gz")).dataobj)
        sizes[post] = int((seg == 1).sum())
        pieces[post] = json.loads((tmp_path / f"out{post}" / "two_report.json").read_text())["qc"][
            "liver_components_ml"
        ]
    assert sizes[True] == pytest.approx(8 * 30 * 30, rel=0.05)  # the blob is gone
    assert sizes[False] == pytest.approx(8 * 30 * 30 + 8 * 10 * 10, rel=0.05)  # kept when switched off
    # the report counts the liver's pieces before the clean-up either way (1 mm voxels: 7.2 and 0.8 mL)
    assert pieces[True] == pieces[False] and pieces[True] == pytest.approx([7.2, 0.8], rel=0.1)


def dciodvfy_errors(path: Path) -> list[str]:
    """The Error lines of dciodvfy (dicom3tools), the DICOM standard's conformance checker, on a file."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("variant", ["phantom writer", "vendor header variants"])
def test_dicom_seg_passes_the_standards_checker(tmp_path, variant):
    ct, _ = block_volume(shape=(6, 48, 64))
    series = write_series(
        tmp_path / "ct", ct, SeriesGeometry(pixel_spacing=(0.9, 0.9), slice_spacing=2.5), SeriesTags()
    )
    if variant == "vendor header variants":  # an empty character set, a retired PN form, blank IDs and UIDs
        deidentify(
            series, SpecificCharacterSet="", PatientName="DOE^JOHN^^^", PatientID="", AccessionNumber="", StudyID=""
        )
    infer(
        checkpoint_with(tmp_path, pixel_spacing=0.9, image_size=128),
        series,
        tmp_path / "out",
        dicom_seg=True,
        overlay=False,
    )
    assert dciodvfy_errors(tmp_path / "out" / "ct_seg.dcm") == []


# ---- an ensemble of checkpoints ----


def test_an_ensemble_averages_its_members_probabilities_and_refuses_members_of_other_input(small_fcn, tmp_path):
    from liver_fcn.checkpoint import checkpoint_settings, load_model, model_identity, network_from_settings
    from liver_fcn.networks import Ensemble

    settings = checkpoint_settings(small_fcn)
    torch.manual_seed(1)
    members = []
    for variant, width in (("8s", 1 / 16), ("4s", 1 / 8)):  # another variant and width may join
        net = FCN(variant, in_channels=1, out_channels=4, width=width)
        for p in net.parameters():  # the score layers start at zero: give every member an output of its own
            p.data.normal_(0.0, 0.2)
        members.append(tmp_path / f"{variant}.pt")
        torch.save(
            {"model": net.state_dict(), "settings": {**settings, "variant": variant, "width": width}}, members[-1]
        )
    both = checkpoint_settings(members)
    assert both["variant"] == "8s" and [s["variant"] for s in both["ensemble"]] == ["8s", "4s"]
    ens = load_model(members, network_from_settings(both))
    assert isinstance(ens, Ensemble) and len(ens.members) == 2
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        first, second = (torch.softmax(m(x), 1) for m in ens.members)
        assert not torch.equal(first.argmax(1), second.argmax(1))
        torch.testing.assert_close(torch.softmax(ens(x), 1), (first + second) / 2, atol=1e-6, rtol=1e-5)
    identity = model_identity([str(m) for m in members], members, both)
    assert identity["checkpoint"] == [str(m) for m in members] and len(set(identity["sha256"])) == 2

    torch.save({"model": {}, "settings": {**settings, "pixel_spacing": 1.0}}, tmp_path / "other.pt")
    with pytest.raises(
        InputError, match=r"other\.pt: cannot join an ensemble with .*8s\.pt: they differ in pixel_spacing"
    ):
        checkpoint_settings([members[0], tmp_path / "other.pt"])
    with pytest.raises(InputError, match="at least one checkpoint"):
        checkpoint_settings([])


def test_an_ensemble_runs_through_the_bundle_and_one_model_twice_gives_that_model_s_mask(small_fcn, tmp_path):
    src = nifti_case(tmp_path / "x.nii.gz")
    ensemble = f"['{small_fcn}','{small_fcn}']"
    masks = {}
    for name, ckpt in (("single", str(small_fcn)), ("twice", ensemble)):
        r = bundle_cli(
            "--input", str(src), "--checkpoint", ckpt, "--output_dir", str(tmp_path / name), "--overlay", "false"
        )
        assert r.returncode == 0, r.stderr[-2000:]
        masks[name] = np.asarray(nib.load(str(tmp_path / name / "x_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(masks["single"], masks["twice"])
    model = json.loads((tmp_path / "twice" / "x_report.json").read_text())["model"]
    assert model["checkpoint"] == [str(small_fcn)] * 2 and len(model["sha256"]) == 2
    row = next(csv.DictReader((tmp_path / "twice" / "summary.csv").open()))
    assert row["checkpoint"] == f"{small_fcn}; {small_fcn}"
