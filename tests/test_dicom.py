"""Strict CT series reading: slice order, rescale, and one clear error per kind of bad series."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import pydicom
import pytest
import torch

from liver_fcn.data.ct import load_ct
from liver_fcn.data.dicom import BLOCK as BLOCK_SIZE
from liver_fcn.data.dicom import dicom_folder, inspect_series, list_series
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


def test_a_long_series_read_in_blocks_matches_monai_pydicom_reader(tmp_path):
    """Slices are decoded in threads, in blocks along the slice axis (the last one partial): the
    volume, its float32 rescale and its affine are MONAI's own reader's, bit for bit."""
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    n = 2 * BLOCK_SIZE + 5
    vol = volume(n=n, rows=24, cols=20, seed=4)
    geo = SeriesGeometry(pixel_spacing=(0.7, 0.8), slice_spacing=1.25)
    folder = write_series(tmp_path / "long", vol, geo, SeriesTags(), rescale_slope=0.5, rescale_intercept=-1024.3)
    ours = load_ct(folder)
    theirs = LoadImage(image_only=True, ensure_channel_first=True)(folder, reader=PydicomReader())
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == (1, 20, 24, n)
    assert torch.equal(ours.as_tensor(), theirs.as_tensor())
    np.testing.assert_allclose(ours.affine.numpy(), theirs.affine.numpy())


def test_the_reader_takes_the_headers_a_kept_check_read_unless_the_files_changed(tmp_path, monkeypatch):
    """Inference checks every input before it reads one; the reader then takes the checked headers
    (the same volume and metadata, no second ordering pass) - but only while the folder's files are
    those checked, and only for the series the check picked."""
    from liver_fcn.data import dicom

    orderings = []
    order = dicom._order
    monkeypatch.setattr(dicom, "_order", lambda *a: orderings.append(1) or order(*a))
    n = 2 * BLOCK_SIZE + 3
    folder = write_series(tmp_path / "kept", volume(n=n, rows=24, cols=20, seed=2), SeriesGeometry(), SeriesTags())
    fresh = load_ct(folder)
    info = inspect_series(folder, keep=True)
    assert len(orderings) == 2
    for uid in (info.series_uid, None):  # the UID the check found, or none as it was asked
        kept = load_ct(folder, series_uid=uid)
        assert len(orderings) == 2 and not dicom._CHECKED  # taken, once
        assert torch.equal(kept.as_tensor(), fresh.as_tensor()) and torch.equal(kept.affine, fresh.affine)
        assert {k: str(v) for k, v in kept.meta.items()} == {k: str(v) for k, v in fresh.meta.items()}
        inspect_series(folder, keep=True)
        orderings.clear()
        orderings += [1, 1]
    with pytest.raises(InputError, match="no series with SeriesInstanceUID 1.2.3"):
        load_ct(folder, series_uid="1.2.3")  # another series asked for: not taken, the folder read anew
    assert len(orderings) == 3 and not dicom._CHECKED
    with pytest.raises(InputError, match="image_3: missing slice"):
        inspect_series(folder, keep=True)
        (folder / "image_2").unlink()  # the folder changed after the check
        load_ct(folder)
    write_series(folder, volume(n=n, rows=24, cols=20, seed=3), SeriesGeometry(), SeriesTags())
    inspect_series(folder, keep=True)
    ds = pydicom.dcmread(folder / "image_5")
    ds.RescaleIntercept = -1000
    ds.save_as(folder / "image_5")  # a header changed after the check: read anew, the new intercept applies
    expected = ds.pixel_array.T * float(ds.RescaleSlope) - 1000.0
    np.testing.assert_array_equal(load_ct(folder)[0, ..., 5].numpy(), expected.astype(np.float32))


def test_the_first_undecodable_slice_in_order_is_named(tmp_path):
    """Blocks decode side by side; of two broken slices the error names the one nearer the start."""
    n = 3 * BLOCK_SIZE
    folder = write_series(tmp_path / "rle", ct_like((n, 16, 16)), SeriesGeometry(), SeriesTags())
    for k in range(n):
        ds = pydicom.dcmread(folder / f"image_{k}")
        ds.compress(pydicom.uid.RLELossless)
        if k in (BLOCK_SIZE + 3, 2 * BLOCK_SIZE + 1):
            ds.PixelData = ds.PixelData[:40]  # a cut RLE stream: the header is read, the decoder fails
        ds.save_as(folder / f"image_{k}", enforce_file_format=True)
    with pytest.raises(InputError, match=rf"image_{BLOCK_SIZE + 3}: cannot decode pixel data"):
        load_ct(folder)


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
    with pytest.raises(InputError, match=match), dicom_folder(folder) as f:
        inspect_series(f, **kw)


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


def pacs_export(root, vol, geo):
    """A PACS-like export: nested folders, a DICOMDIR, the abdomen CT, a thinner CT of fewer slices,
    a coronal reformat, a one-slice scout and an MR series."""
    write_series(root / "STUDY1" / "SER1", vol, geo, SeriesTags(series_description="abdomen 2.5"))
    thin = SeriesGeometry(pixel_spacing=geo.pixel_spacing, slice_spacing=1.0, origin=geo.origin)
    write_series(root / "STUDY1" / "SER2", vol[:4], thin, SeriesTags(series_description="thin, 4 slices"))
    coronal = SeriesGeometry(row_cosine=(1.0, 0.0, 0.0), col_cosine=(0.0, 0.0, -1.0))
    write_series(root / "STUDY1" / "SER3" / "deeper", vol[:8], coronal, SeriesTags(series_description="coronal"))
    write_series(root / "STUDY1" / "SER4", vol[:1], geo, SeriesTags(series_description="scout"))
    write_series(root / "STUDY2" / "SER1", vol, geo, SeriesTags(series_description="mr", modality="MR"))
    (root / "DICOMDIR").write_bytes(b"an index of the media, not an image")
    return root


def test_nested_folders_list_their_series_and_auto_takes_the_axial_ct_with_most_slices(series, tmp_path):
    _, vol, geo = series
    root = pacs_export(tmp_path / "export", vol, geo)
    entries, auto = list_series(root)
    assert sorted(e.description for e in entries) == ["abdomen 2.5", "coronal", "mr", "scout", "thin, 4 slices"]
    assert auto.description == "abdomen 2.5" and auto.files == 6 and auto.slice_spacing == pytest.approx(2.5)
    assert {e.description: e.orientation for e in entries}["coronal"] == "coronal"
    expect_error(root, r"export: folder holds 5 series: .*abdomen 2.5, 6 files, CT axial, 2.50 mm.*--series auto")
    info = inspect_series(root, series_uid="auto")
    assert info.description == "abdomen 2.5" and info.selection.startswith("auto: ") and "5 series" in info.selection
    assert all("SER1" in str(f) for f in info.files)
    np.testing.assert_array_equal(load(root, series_uid="auto").numpy(), load(series[0]).numpy())
    # among equally long axial CT series the thinner spacing wins
    shutil.rmtree(root / "STUDY1" / "SER1")
    write_series(root / "STUDY1" / "SER5", vol[:4], geo, SeriesTags(series_description="thick, 4 slices"))
    assert inspect_series(root, series_uid="auto").description == "thin, 4 slices"
    # a nested folder holding only a non-CT series: auto has nothing to take
    expect_error(
        root / "STUDY2",
        r"STUDY2: no axial CT image series to pick among 1: .*\(mr, 6 files, MR axial",
        series_uid="auto",
    )


def zipped(folder, path, prefix=""):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            zf.write(f, prefix + str(f.relative_to(folder)))
    return path


def test_a_zip_reads_as_its_folder_and_errors_name_its_members(series, tmp_path):
    folder, vol, geo = series
    archive = zipped(folder, tmp_path / "ct.zip", prefix="CT/")
    np.testing.assert_array_equal(load(archive).numpy(), load(folder).numpy())
    with dicom_folder(archive) as extracted:
        assert inspect_series(extracted).shape == (40, 48, 6)
    assert not extracted.exists()  # the extraction is gone with the context
    (folder / "image_3").unlink()
    expect_error(zipped(folder, tmp_path / "gap.zip"), r"gap.zip/image_4: missing slice")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as zf:
        zf.writestr("nothing/", "")
    expect_error(tmp_path / "empty.zip", r"empty.zip: zip archive holds no files")
    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    expect_error(tmp_path / "fake.zip", r"fake.zip: unreadable zip archive \(BadZipFile")


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
