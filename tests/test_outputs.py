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
