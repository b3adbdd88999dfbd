"""Outputs are written whole under their name, or not at all."""

from __future__ import annotations

import json

import pytest

from liver_fcn.outputs import atomic_path, write_json_atomic


def test_a_complete_write_lands_under_its_name_in_a_new_folder(tmp_path):
    path = write_json_atomic(tmp_path / "new" / "report.json", {"liver_ml": 1359.0})
    assert json.loads(path.read_text()) == {"liver_ml": 1359.0}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    (tmp_path / "mask.nii.gz").write_bytes(b"previous")
    with pytest.raises(ValueError, match="half-way"):
        with atomic_path(tmp_path / "mask.nii.gz", ".tmp.nii.gz") as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".tmp.nii.gz")
            tmp.write_bytes(b"partial")
            raise ValueError("failed half-way")
    assert [p.name for p in tmp_path.iterdir()] == ["mask.nii.gz"]
    assert (tmp_path / "mask.nii.gz").read_bytes() == b"previous"


def test_the_overlay_draws_contours_and_tints_in_the_class_colours_in_radiological_view(tmp_path):
    """A liver block at the patient's right front shows at the picture's top left (radiological view),
    as a ring of the liver's colour around an untouched inside; a reference kidney is tinted; the
    picture is written whole under its name."""
    import numpy as np
    from PIL import Image

    from liver_fcn.visualize import GAP, PANEL, SLICE_ROW, TITLE_ROW, class_rgb, overlay_montage

    image = np.zeros((64, 64, 5), np.float32)  # RAS: x to the patient's right, y to the front
    image[:, :, :] = 100.0
    pred = np.zeros(image.shape, np.uint8)
    pred[40:60, 40:60, :] = 1  # right, front
    truth = np.zeros(image.shape, np.uint8)
    truth[5:20, 5:20, :] = 3  # left, back
    out = overlay_montage(image, tmp_path / "o.png", pred=pred, truth=truth, slices=[2], window=(-100, 300), title="t")
    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    panel = picture[TITLE_ROW + SLICE_ROW :, GAP:][:PANEL, :PANEL]
    assert (panel[0] != 255).all() and (picture[TITLE_ROW + SLICE_ROW - 1, GAP : GAP + PANEL] == 255).all()
    liver = (panel == class_rgb(1)).all(axis=2)
    rows, cols = np.nonzero(liver)
    assert liver.sum() > 100 and rows.mean() < PANEL / 2 and cols.mean() < PANEL / 2  # top left
    inside = panel[int(rows.mean()), int(cols.mean())]
    assert (inside == inside[0]).all()  # the ring's inside keeps the CT's grey
    grey = (100 - -100) / 400 * 255  # 100 HU in the window [-100, 300]
    tint = np.round(0.65 * grey + 0.35 * np.array(class_rgb(3))).astype(int)
    kidney = (np.abs(panel - tint) <= 1).all(axis=2)
    k_rows, k_cols = np.nonzero(kidney)
    assert kidney.sum() > 1000 and k_rows.mean() > PANEL / 2 and k_cols.mean() > PANEL / 2  # bottom right
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_tiled_transposed_copies_equal_numpys_for_every_order_and_ragged_tiles(tmp_path):
    """The copies behind the mask's NIfTI and the hole filling: every axis order, shapes that are no
    multiple of the tile, and a mask written from C order reads back voxel for voxel."""
    import itertools

    import nibabel as nib
    import numpy as np

    from liver_fcn.inference.outputs import fortran_ordered, write_nifti_atomic
    from liver_fcn.transforms.utils import transposed_copy

    rng = np.random.default_rng(0)
    for shape in ((70, 130, 5), (3, 200, 9), (65, 64, 1)):
        a = rng.integers(0, 4, shape).astype(np.uint8)
        for axes in itertools.permutations(range(3)):
            for tile in (1, 7, 64):
                copied = transposed_copy(a, axes, tile)
                assert copied.flags.c_contiguous and np.array_equal(copied, a.transpose(axes))
        f = fortran_ordered(a)
        assert f.flags.f_contiguous and np.array_equal(f, a)
        assert fortran_ordered(f) is f  # already in order: no copy
    assert np.array_equal(
        transposed_copy(np.arange(24).reshape(2, 3, 4, 1), (3, 0, 1, 2)), np.arange(24).reshape(1, 2, 3, 4)
    )
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    path = write_nifti_atomic(a, affine, tmp_path / "mask.nii.gz")
    back = nib.load(path)
    assert np.array_equal(np.asanyarray(back.dataobj), a) and np.allclose(back.affine, affine)
