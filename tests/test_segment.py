"""A CT in, organs out: `liver-fcn segment` from any folder, `liver_fcn.segment()`, `--version`, and the
bundle travelling inside the package's wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import liver_fcn
from liver_fcn.errors import InputError

from .commands import warm_module
from .conftest import REPO
from .test_bundle import OUTSIDE
from .test_inference import bundle_cli, nifti_case, small_fcn  # noqa: F401  (small_fcn is a fixture)


def segment_cli(*args: str) -> subprocess.CompletedProcess:
    """``liver-fcn segment ...`` (as ``python -m liver_fcn.cli``) from a folder outside the repository."""
    return warm_module("liver_fcn.cli", "segment", *args, cwd=OUTSIDE, timeout=300)


def test_segment_from_another_folder_writes_what_the_bundle_command_writes(small_fcn, tmp_path):  # noqa: F811
    ct = nifti_case(tmp_path / "case.nii.gz")
    r = segment_cli("-i", str(ct), "-o", str(tmp_path / "seg"), "--checkpoint", str(small_fcn), "--overlay", "no")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith(f"1 case segmented into {tmp_path / 'seg'} in ")
    b = bundle_cli("--input", str(ct), "--output_dir", str(tmp_path / "bundle"), "--checkpoint", str(small_fcn))
    assert b.returncode == 0, b.stderr[-2000:]
    ours, theirs = nib.load(tmp_path / "seg" / "case_seg.nii.gz"), nib.load(tmp_path / "bundle" / "case_seg.nii.gz")
    assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    assert np.allclose(ours.affine, nib.load(ct).affine)
    report = json.loads((tmp_path / "seg" / "case_report.json").read_text())
    assert set(report["volumes_ml"]) == {"liver", "bone", "kidney"}
    written = sorted(p.name for p in (tmp_path / "seg").iterdir())
    assert written == ["case_report.json", "case_seg.nii.gz", "summary.csv", "summary.json"]  # --overlay no
    quiet = segment_cli("-i", str(ct), "-o", str(tmp_path / "q"), "--checkpoint", str(small_fcn), "--quiet")
    assert quiet.returncode == 0 and quiet.stdout.strip() == "", quiet.stdout[-2000:]
    assert "cases" not in quiet.stderr  # no progress bar either
    assert (tmp_path / "q" / "case_overlay.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["-i", "{tmp}/none.nii.gz"], "none.nii.gz: input does not exist"),
        (["-i", "{ct}", "--device", "gpu"], "--device gpu: not one of auto, cpu, cuda, cuda:N, mps"),
        (["-i", "{ct}", "--checkpoint", "{tmp}/no.pt"], "no.pt"),
    ],
    ids=["missing input", "unknown device", "missing checkpoint"],
)
def test_segment_refuses_bad_input_in_one_line_and_writes_nothing(args, message, small_fcn, tmp_path):  # noqa: F811
    ct = nifti_case(tmp_path / "case.nii.gz")
    args = [a.format(tmp=tmp_path, ct=ct) for a in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(small_fcn)]
    r = segment_cli(*args, "-o", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("liver-fcn segment: error: ") and message in last, last
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_python_api_takes_a_path_or_a_nibabel_image(small_fcn, tmp_path):  # noqa: F811
    ct = nifti_case(tmp_path / "case.nii.gz")
    from_path = liver_fcn.segment(ct, checkpoint=small_fcn, device="cpu")
    image = nib.load(ct)
    from_image = liver_fcn.segment(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), checkpoint=small_fcn)
    for result in (from_path, from_image):
        assert result.mask.shape == image.shape and np.allclose(result.mask.affine, image.affine)
        assert result.mask.get_data_dtype() == np.uint8 and result.files == {}
        assert set(result.report["volumes_ml"]) == {"liver", "bone", "kidney"}
    assert np.array_equal(np.asarray(from_path.mask.dataobj), np.asarray(from_image.mask.dataobj))
    kept = liver_fcn.segment(ct, checkpoint=small_fcn, output_dir=tmp_path / "kept")
    assert Path(kept.files["mask"]).is_file() and Path(kept.files["report"]).is_file()
    assert (tmp_path / "kept" / "case_overlay.png").is_file()
    with pytest.raises(InputError, match="input does not exist"):
        liver_fcn.segment(tmp_path / "none.nii.gz", checkpoint=small_fcn)


def test_progress_bar_over_the_cases_on_request_and_none_in_a_log(small_fcn, tmp_path):  # noqa: F811
    """A terminal gets a bar over the cases (``progress`` auto); forced here, since a test's stderr is not one."""
    cases = [nifti_case(tmp_path / f"{name}.nii.gz").name for name in ("a", "b")]
    (tmp_path / "list.json").write_text(json.dumps(cases))
    args = ["--input", str(tmp_path / "list.json"), "--checkpoint", str(small_fcn), "--overlay", "false"]
    # a new interpreter: nothing imported before the run (the warm one may have defined MLflow's pyfunc class)
    shown = bundle_cli(*args, "--output_dir", str(tmp_path / "shown"), "--progress", "true", new=True)
    assert shown.returncode == 0 and "cases: [2/2] 100%" in shown.stderr, shown.stderr[-1500:]
    assert "slices:" in shown.stderr  # and within each case, a transient bar over its slices
    assert "type hints" not in shown.stderr  # inference does not define the registry's pyfunc class
    logged = bundle_cli(*args, "--output_dir", str(tmp_path / "logged"))
    assert logged.returncode == 0 and "cases:" not in logged.stderr and "slices:" not in logged.stderr
    assert "a: " in logged.stdout and "b: " in logged.stdout  # the per-case log lines tell the progress


def test_slice_bar_counts_the_slices_and_leaves_the_prediction_as_monai_makes_it(capsys):
    import torch
    from monai.data import MetaTensor
    from monai.inferers import SliceInferer

    from liver_fcn.inference import SliceProgressInferer

    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        # whole slices batched: the same numbers, bit for bit, for every slice axis, several items
        # (their slices share batches, as in MONAI's order), a last batch that is not full, and
        # a MetaTensor keeps its affine
        for items, spatial_dim in ((1, 2), (2, 0), (3, 1), (2, 2)):
            x = MetaTensor(torch.randn(items, 2, 12, 10, 7), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
            expected = SliceInferer(roi_size=(-1, -1), sw_batch_size=3, spatial_dim=spatial_dim)(x, net)
            got = SliceProgressInferer(roi_size=(-1, -1), sw_batch_size=3, spatial_dim=spatial_dim, progress=False)(
                x, net
            )
            assert isinstance(got, MetaTensor) and torch.equal(got.affine, expected.affine)
            assert got.shape == expected.shape and torch.equal(got.as_tensor(), expected.as_tensor())
        x = torch.randn(1, 2, 16, 16, 7)
        for progress in (False, True):
            got = SliceProgressInferer(roi_size=(-1, -1), sw_batch_size=3, spatial_dim=2, progress=progress)(x, net)
            assert torch.equal(got, SliceInferer(roi_size=(-1, -1), sw_batch_size=3, spatial_dim=2)(x, net))
            err = capsys.readouterr().err
            assert ("slices:" in err and "/7 [" in err) if progress else err == ""
        # MONAI's own path where a window is not a whole slice, or the output is not the slice's size
        halves = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1)
        for roi, network in (((8, 8), net), ((-1, -1), halves)):
            expected = SliceInferer(roi_size=roi, sw_batch_size=3, spatial_dim=2)(x, network)
            got = SliceProgressInferer(roi_size=roi, sw_batch_size=3, spatial_dim=2, progress=False)(x, network)
            assert got.shape == expected.shape and torch.allclose(got, expected)


def test_version_names_the_package_and_the_bundle():
    r = subprocess.run(
        [sys.executable, "-m", "liver_fcn.cli", "--version"], capture_output=True, text=True, cwd=OUTSIDE
    )
    meta = json.loads((REPO / "bundle" / "configs" / "metadata.json").read_text())
    assert r.returncode == 0 and r.stdout.strip() == f"liver-fcn {liver_fcn.__version__} (bundle {meta['version']})"


def test_the_wheel_carries_the_bundle_and_an_installed_package_finds_it(tmp_path, monkeypatch):
    source = tmp_path / "source"  # the tracked files: the build leaves its build/ folder there, not in the repository
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("liver_fcn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = f"liver_fcn-{liver_fcn.__version__}.data/data/share/liver-fcn/bundle/"
    shipped = {n.removeprefix(data) for n in names if n.startswith(data)}
    configs = {f"configs/{p.name}" for p in (REPO / "bundle" / "configs").iterdir()}
    assert configs | {"LICENSE", "docs/data_license.txt"} <= shipped
    # outside a source checkout the package runs the installed copy
    monkeypatch.setattr(liver_fcn, "SOURCE_BUNDLE", tmp_path / "no-checkout" / "bundle")
    monkeypatch.setattr(liver_fcn, "INSTALLED_BUNDLE", REPO / "bundle")
    assert liver_fcn.bundle_folder() == REPO / "bundle"
    monkeypatch.setattr(liver_fcn, "INSTALLED_BUNDLE", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="no bundle"):
        liver_fcn.bundle_folder()


def test_series_lists_a_pacs_export_and_segment_takes_the_one_auto_marks(small_fcn, tmp_path, capsys):  # noqa: F811
    from liver_fcn.cli import main
    from liver_fcn.data.dicom_write import SeriesGeometry

    from .test_dicom import pacs_export, volume

    export = pacs_export(tmp_path / "export", volume(rows=64, cols=64), SeriesGeometry(slice_spacing=2.5))
    assert main(["series", str(export)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and lines[-1].startswith("5 series; * marks what --series auto takes")
    (marked,) = [line for line in lines if line.startswith("* ")]
    assert marked.endswith("abdomen 2.5") and " CT    axial " in marked and "2.50 mm" in marked
    refused = segment_cli("-i", str(export), "-o", str(tmp_path / "no"), "--checkpoint", str(small_fcn))
    assert refused.returncode == 2 and "folder holds 5 series" in refused.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "no").exists()
    r = segment_cli(
        "-i", str(export), "-o", str(tmp_path / "seg"), "--checkpoint", str(small_fcn), "--series", "auto", "--quiet"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "seg" / "export_report.json").read_text())
    uid = marked.split()[1]
    assert report["series"]["series_uid"] == uid and report["series"]["selection"].startswith("auto: ")
