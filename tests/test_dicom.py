"""Strict CT series reading: slice order, rescale, and one clear error per kind of bad series."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

from liver_fcn.data.ct import load_ct
from liver_fcn.data.dicom import inspect_series
from liver_fcn.data.dicom_write import SeriesGeometry, SeriesTags, write_series
from liver_fcn.errors import InputError


def volume(n=6, rows=40, cols=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1500, size=(n, rows, cols)).astype(np.int16)


def load(folder, **kw):
    """Through the bundle's loading path (no fallback reader); drop the channel axis."""
    return load_ct(folder, **kw)[0]


@pytest.fixture
def series(tmp_path):
    vol = volume()
    geo = SeriesGeometry(pixel_spacing=(0.7, 0.8), slice_spacing=2.5, origin=(-100.0, -120.0, 300.0))
    folder = write_series(tmp_path / "ct", vol, geo, SeriesTags(series_description="abdomen"), rescale_intercept=-1024)
    return folder, vol, geo


def test_reads_values_after_rescale_and_orders_by_position(series, tmp_path):
    folder, vol, geo = series
    # rename the files in shuffled order and scramble InstanceNumber: only positions tell the order
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for i, k in enumerate([3, 0, 5, 1, 4, 2]):
        ds = pydicom.dcmread(folder / f"image_{k}")
        ds.InstanceNumber = 7 * i + 1
        ds.save_as(shuffled / f"slice{i:02d}.dcm")
    for f in (folder, shuffled):
        img = load(f)
        assert img.shape == (48, 40, 6)
        np.testing.assert_array_equal(img.numpy(), np.transpose(vol, (2, 1, 0)).astype(np.float32))
        # LPS -> RAS: x and y flip sign; origin is the first slice's position
        np.testing.assert_allclose(img.affine.numpy()[:3, 3], [100.0, 120.0, 300.0])
        np.testing.assert_allclose(np.diag(img.affine.numpy())[:3], [-0.8, -0.7, 2.5])


def test_descending_positions_keep_the_geometry(tmp_path):
    vol = volume()
    geo = SeriesGeometry(slice_spacing=3.0, row_cosine=(1, 0, 0), col_cosine=(0, 0, -1))  # coronal slices
    folder = write_series(tmp_path / "cor", vol, geo, SeriesTags())
    info = inspect_series(folder)
    assert info.slice_spacing == pytest.approx(3.0)
    img = load(folder)
    first = np.array([*pydicom.dcmread(info.files[0]).ImagePositionPatient])
    np.testing.assert_allclose(img.affine.numpy()[:3, 3], first * [-1, -1, 1])


def expect_error(folder, match, **kw):
    with pytest.raises(InputError, match=match) as e:
        load(folder, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match=match):
        inspect_series(folder, **kw)


def test_missing_slice(series):
    folder, *_ = series
    (folder / "image_3").unlink()
    expect_error(folder, r"image_4: missing slice")


def test_uneven_spacing(series):
    folder, *_ = series
    ds = pydicom.dcmread(folder / "image_5")
    ds.ImagePositionPatient = [-100.0, -120.0, 300.0 + 2.5 * 4 + 1.2]
    ds.save_as(folder / "image_5")
    expect_error(folder, r"image_5: uneven slice spacing")


def test_two_series_are_listed(series, tmp_path):
    folder, vol, geo = series
    write_series(tmp_path / "other", vol[:3], geo, SeriesTags(series_description="bone kernel"))
    for k in range(3):
        shutil.copy(tmp_path / "other" / f"image_{k}", folder / f"other_{k}")
    expect_error(folder, r"holds 2 series: .*abdomen, 6 files.*bone kernel, 3 files")
    uid = pydicom.dcmread(folder / "image_0").SeriesInstanceUID
    assert load(folder, series_uid=uid).shape == (48, 40, 6)


def test_mr_scan_is_refused(tmp_path):
    folder = write_series(tmp_path / "mr", volume(), SeriesGeometry(), SeriesTags(modality="MR"))
    expect_error(folder, r"image_\d: modality is MR, expected CT")


def test_truncated_file(series):
    folder, *_ = series
    data = (folder / "image_2").read_bytes()
    (folder / "image_2").write_bytes(data[: len(data) - 500])
    expect_error(folder, r"image_2: truncated DICOM file")


def test_not_dicom_and_empty_and_missing(series, tmp_path):
    folder, *_ = series
    (folder / "notes.txt").write_text("hello")
    expect_error(folder, r"notes.txt: not a DICOM file")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", r"empty: folder is empty")
    with pytest.raises(InputError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_hidden_files_are_ignored(series):
    folder, *_ = series
    (folder / ".DS_Store").write_bytes(b"\0\1")
    assert inspect_series(folder).shape == (40, 48, 6)


def test_mixed_sizes_and_duplicates(series, tmp_path):
    folder, vol, geo = series
    write_series(tmp_path / "small", volume(rows=20), geo, SeriesTags())
    ds = pydicom.dcmread(tmp_path / "small" / "image_0")
    ref = pydicom.dcmread(folder / "image_0")
    ds.SeriesInstanceUID = ref.SeriesInstanceUID
    ds.save_as(folder / "intruder")
    expect_error(folder, r"(intruder|image_0): slice is")
    (folder / "intruder").unlink()
    shutil.copy(folder / "image_1", folder / "copy_of_1")
    expect_error(folder, r"same slice position")


# ---- compressed transfer syntaxes, through pydicom's pixel plugins ----


def ct_like(shape=(5, 48, 56)) -> np.ndarray:
    """int16 HU with air, soft tissue, bone and noise: every bit of the range in use."""
    rng = np.random.default_rng(3)
    ct = np.full(shape, -1000, np.int16)
    ct[:, 8:40, 8:48] = 40
    ct[:, 20:28, 24:32] = 1200
    return np.clip(ct + rng.normal(0, 30, shape), -1024, 3071).astype(np.int16)


@pytest.mark.parametrize(
    "syntax, options, max_error",
    [
        (pydicom.uid.RLELossless, {}, 0),
        (pydicom.uid.JPEGLSLossless, {}, 0),
        (pydicom.uid.JPEG2000Lossless, {}, 0),
        (pydicom.uid.DeflatedExplicitVRLittleEndian, {}, 0),
        (pydicom.uid.JPEGLSNearLossless, {"jls_error": 3}, 3),  # near-lossless: at most the stated error
        (pydicom.uid.JPEG2000, {"j2k_psnr": [80]}, None),  # lossy: the RMS error is bounded below
    ],
    ids=["RLE", "JPEG-LS", "JPEG2000-lossless", "Deflate", "JPEG-LS-near-lossless", "JPEG2000-lossy"],
)
def test_compressed_series_read_as_the_uncompressed_one(tmp_path, syntax, options, max_error):
    ct = ct_like()
    raw = write_series(tmp_path / "raw", ct, SeriesGeometry(), SeriesTags())
    packed = tmp_path / "packed"
    shutil.copytree(raw, packed)
    for f in packed.iterdir():
        ds = pydicom.dcmread(f)
        if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax  # the whole data set deflated, pixels as they are
        else:
            ds.compress(syntax, **options)
        ds.save_as(f, enforce_file_format=True)
    assert pydicom.dcmread(next(packed.iterdir())).file_meta.TransferSyntaxUID == syntax
    want, got = np.asarray(load_ct(raw)), np.asarray(load_ct(packed))
    assert got.shape == want.shape
    if max_error is None:
        assert float(np.sqrt(np.mean((got - want) ** 2))) < 10.0  # HU
    else:
        assert float(np.abs(got - want).max()) <= max_error
