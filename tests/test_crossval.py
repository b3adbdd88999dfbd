"""Synthetic training volumes from organ masks, and leave-one-patient-out cross-validation in MLflow."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from liver_fcn.crossval import fold_datalists
from liver_fcn.data.ct import load_ct
from liver_fcn.data.ircadb import _organ_folders
from liver_fcn.data.synth import _read_masks, _series_fast, synthesize
from liver_fcn.errors import InputError

from .commands import warm_module
from .conftest import masks_without
from .test_bundle import CONFIGS, TINY


@pytest.fixture(scope="module")
def synthetic(phantom_root, tmp_path_factory) -> Path:
    """Two synthetic CTs painted from the organ masks of phantom patients 4 and 5 (their CT unused)."""
    masks_only = tmp_path_factory.mktemp("masks_only")
    for n in (4, 5):  # as the shared database gives them: the mask zip alone
        (masks_only / f"3Dircadb1.{n}").mkdir()
        (masks_only / f"3Dircadb1.{n}" / "MASKS_DICOM.zip").write_bytes(
            (phantom_root / f"3Dircadb1.{n}" / "MASKS_DICOM.zip").read_bytes()
        )
    out = tmp_path_factory.mktemp("synth") / "synth"
    synthesize(masks_only, out, copies=1, seed=1, sampling_weight=0.5, log=lambda s: None)
    return out


def test_synthetic_volumes_follow_the_masks_with_physical_densities(synthetic, phantom_root):
    data = json.loads((synthetic / "datalist.json").read_text())
    entries = data["training"]
    assert [e["patient"] for e in entries] == ["synth-3Dircadb1.4-0", "synth-3Dircadb1.5-0"]
    assert all(e["sampling_weight"] == 0.5 for e in entries)
    # phantom 4 has kidney masks, as do the real patients with kidneys; the class map follows prepare's
    assert entries[0]["annotated"] == [True, True, True, True] and set(entries[0]["masks"]) == {
        "liver",
        "bone",
        "kidney",
    }
    e = entries[0]
    ct = nib.load(str(synthetic / e["image"]))
    hu = np.asarray(ct.dataobj)
    liver = np.asarray(nib.load(str(synthetic / e["masks"]["liver"][0])).dataobj) > 0
    bone = np.asarray(nib.load(str(synthetic / e["masks"]["bone"][0])).dataobj) > 0
    assert hu.dtype == np.int16 and hu.shape == liver.shape == tuple(e["shape"])
    assert 30 < np.median(hu[liver]) < 180  # unenhanced to portal venous liver
    assert np.median(hu[bone]) > 150 and np.median(hu[hu < -900]) < -900  # bone, and air around the body
    assert ct.affine[2, 2] == pytest.approx(20.0)  # the masks' own grid: 240 mm over 12 slices
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        synthesize(data["source"], synthetic, log=lambda s: None)


def test_patients_painted_side_by_side_give_the_same_volumes(synthetic, tmp_path):
    source = json.loads((synthetic / "datalist.json").read_text())["source"]
    out = synthesize(source, tmp_path / "two", copies=1, seed=1, sampling_weight=0.5, workers=2, log=lambda s: None)
    entries = json.loads(out.read_text())["training"]
    assert entries == json.loads((synthetic / "datalist.json").read_text())["training"]
    for e in entries:
        for rel in [e["image"], *(m for ms in e["masks"].values() for m in ms)]:
            a, b = nib.load(str(synthetic / rel)), nib.load(str(tmp_path / "two" / rel))
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)


@pytest.fixture
def mask_folder(phantom_root, tmp_path) -> Path:
    """A phantom patient's extracted MASKS_DICOM folder (one series folder an organ)."""
    with zipfile.ZipFile(phantom_root / "3Dircadb1.4" / "MASKS_DICOM.zip") as z:
        z.extractall(tmp_path)
    return tmp_path / "MASKS_DICOM"


def test_mask_series_read_fast_are_the_checked_reader_s_voxels_and_a_short_one_is_named(mask_folder):
    folder = mask_folder
    organs, affine = _read_masks(folder)
    assert len(organs) > 3
    for name, path in _organ_folders(folder).items():
        img = load_ct(path, modality=None)
        assert np.array_equal(np.asarray(img[0]) > 0, organs[name]), name
        assert np.allclose(np.asarray(img.affine), affine, atol=1e-4), name
        fast = _series_fast(path)  # the fast reader itself, not a fallback to the checked one
        assert np.array_equal(fast[0] > 0, organs[name]) and np.allclose(fast[1], affine, atol=1e-4), name
    last = list(_organ_folders(folder).values())[-1]
    files = sorted(last.iterdir())
    files[len(files) // 2].unlink()  # a slice missing from one series
    with pytest.raises(InputError, match=f"{last}: mask geometry differs"):
        _read_masks(folder)


def test_mask_series_without_simpleitk_are_read_by_the_checked_reader(mask_folder, monkeypatch):
    folder = mask_folder
    organs, affine = _read_masks(folder)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # as on a machine without it: import fails
    assert _series_fast(next(iter(_organ_folders(folder).values()))) is None
    slow, slow_affine = _read_masks(folder)
    assert slow.keys() == organs.keys() and np.allclose(slow_affine, affine)
    assert all(np.array_equal(slow[k], organs[k]) for k in organs)


@pytest.mark.parametrize("phase", ["unenhanced", "arterial", "portal", "excretory"])
def test_painted_kidneys_follow_the_contrast_phase(phase):
    from scipy import ndimage

    from liver_fcn.data.synth import render_ct

    x, y, z = np.meshgrid(np.arange(80), np.arange(80), np.arange(24), indexing="ij")
    body = (x - 40) ** 2 + (y - 40) ** 2 < 38**2
    kidney = ((x - 25) / 16.0) ** 2 + ((y - 40) / 11.0) ** 2 + ((z - 12) / 10.0) ** 2 < 1
    liver = ((x - 55) / 14.0) ** 2 + ((y - 35) / 14.0) ** 2 + ((z - 12) / 11.0) ** 2 < 1
    hu = render_ct(
        {"rightkidney": kidney, "liver": liver}, body, (1.0, 1.0, 1.0), np.random.default_rng(4), phase=phase
    )
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = True
    rim = kidney & ~ndimage.binary_erosion(kidney, in_plane, iterations=2)  # outer cortex
    centre = ndimage.binary_erosion(kidney, in_plane, iterations=9)  # medulla, or the collecting system
    cortex, middle, liver_hu = np.median(hu[rim]), np.median(hu[centre]), np.median(hu[liver])
    if phase == "unenhanced":
        assert cortex < 70 and middle < 60 and liver_hu < 80
    elif phase == "arterial":
        assert cortex > middle + 40  # corticomedullary contrast
    elif phase == "portal":
        assert middle > 120 and abs(cortex - middle) < 40 and liver_hu > 90
    else:
        assert middle > 250 and cortex < 200  # contrast in the collecting system
    with pytest.raises(ValueError, match="not a contrast phase"):
        render_ct({"liver": liver}, body, (1.0, 1.0, 1.0), np.random.default_rng(0), phase="delayed")


def test_masses_are_painted_against_the_liver_and_outside_it():
    from scipy import ndimage

    from liver_fcn.data.synth import _abutting_mass

    x, y, z = np.meshgrid(np.arange(96), np.arange(96), np.arange(32), indexing="ij")
    body = (x - 48) ** 2 + (y - 48) ** 2 < 46**2
    liver = ((x - 60) / 22.0) ** 2 + ((y - 45) / 20.0) ** 2 + ((z - 16) / 12.0) ** 2 < 1
    near = ndimage.distance_transform_edt(~liver) <= 4  # within 4 mm of the liver (1 mm voxels)
    painted = 0
    for seed in range(6):
        hu = np.full(body.shape, -100.0, dtype=np.float32)
        _abutting_mass(hu, liver, body & ~liver, (1.0, 1.0, 1.0), np.random.default_rng(seed), 110.0)
        mass = hu != -100.0
        assert not (mass & liver).any() and not (mass & ~body).any()
        if mass.any():
            painted += 1
            assert (mass & near).any() and mass.sum() > 1000  # against the liver, and mass-sized
    assert painted == 6


def test_synthetic_volumes_can_leave_classes_to_real_ct(phantom_root, tmp_path):
    out = synthesize(phantom_root, tmp_path / "liver_only", patients=["4"], annotate=["liver"], log=lambda s: None)
    (entry,) = json.loads(out.read_text())["training"]
    assert entry["annotated"] == [True, True, False, False] and list(entry["masks"]) == ["liver"]
    assert sorted(p.name for p in (tmp_path / "liver_only" / entry["patient"]).iterdir()) == [
        "ct.nii.gz",
        "liver.nii.gz",
    ]
    with pytest.raises(InputError, match="spleen: not a class of the mapping"):
        synthesize(phantom_root, tmp_path / "x", annotate=["spleen"], log=lambda s: None)


def test_mask_folder_without_body_outline_is_refused(phantom_root, tmp_path):
    masks_without(phantom_root, "3Dircadb1.1", tmp_path / "in", "skin")
    with pytest.raises(InputError, match=r"no 'skin' \(body outline\) mask"):
        synthesize(tmp_path / "in", tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_fold_progress_is_a_bar_on_a_terminal_and_a_line_an_epoch_in_a_log(tmp_path, capsys):
    from liver_fcn.crossval import FoldProgress
    from liver_fcn.outputs import write_json_atomic

    path, lines = tmp_path / "progress.json", []
    state = {"iteration": 0, "max_iterations": 3000, "epoch": 1, "max_epochs": 12, "loss": 0.9, "elapsed_s": 1.0}
    logged = FoldProgress(path, "[1/2] training without P", lines.append, progress=False)
    shown = FoldProgress(path, "[1/2] training without P", lines.append, progress=True)
    logged.update()  # nothing written yet: nothing to say
    for iteration, elapsed in ((10, 3.0), (250, 60.0), (260, 62.0), (760, 180.0)):
        write_json_atomic(path, {**state, "iteration": iteration, "elapsed_s": elapsed})
        logged.update()
        shown.update()
    shown.close()
    assert lines == [
        "[1/2] training without P: epoch 1/12, iteration 250/3000, loss 0.9000, 1.0 min",
        "[1/2] training without P: epoch 3/12, iteration 760/3000, loss 0.9000, 3.0 min",
    ]
    err = capsys.readouterr().err
    assert "[1/2] training without P:  25%" in err and "760/3000" in err and "loss=0.9000" in err


def test_fold_datalists_hold_each_patient_out_of_its_training(prepared, tmp_path):
    folds = fold_datalists(prepared, tmp_path, patients=["1", "3Dircadb1.2"])
    assert [p for p, _ in folds] == ["3Dircadb1.1", "3Dircadb1.2"]
    for patient, folder in folds:
        d = json.loads((folder / "datalist.json").read_text())
        train = [e["patient"] for e in d["training"]]
        assert patient not in train and len(train) == 4 and d["validation"] == []
        assert [e["patient"] for e in d["test"]] == [patient]
        assert all(Path(e["image"]).is_absolute() for e in d["training"] + d["test"])
    with pytest.raises(InputError, match="9: no such patient"):
        fold_datalists(prepared, tmp_path / "x", patients=["9"])


def crossval_args(prepared: Path, out: Path, uri: str, name: str, *extra: str, overrides=()) -> list[str]:
    overrides = [x for k, v in {**TINY, **dict(overrides)}.items() for x in (f"--{k}", v)]
    return [
        "crossval",
        "--dataset_dir",
        str(prepared),
        "--config",
        str([str(CONFIGS / "train.json")]),
        "--name",
        name,
        "--out",
        str(out),
        "--tracking_uri",
        uri,
        "--patients",
        "1",
        "2",
        *extra,
        "--",
        *overrides,
    ]


def crossval(prepared: Path, out: Path, uri: str, name: str, *extra: str, overrides=()) -> subprocess.CompletedProcess:
    args = crossval_args(prepared, out, uri, name, *extra, overrides=overrides)
    # MLflow puts a new SQLite experiment's artifacts under ./mlruns
    return warm_module("liver_fcn.cli", *args, cwd=out.parent, timeout=900)


def started_crossval(prepared: Path, out: Path, uri: str, name: str) -> subprocess.Popen:
    """A cross-validation in a new process, returned once its first fold's training has taken steps."""
    args = crossval_args(prepared, out, uri, name, overrides={"iterations": "5000", "epoch_length": "5"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "liver_fcn.cli", *args],
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress, deadline = out / name / "folds" / "3Dircadb1.1" / "progress.json", time.time() + 300
    while not (progress.is_file() and json.loads(progress.read_text())["iteration"] >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.5)
    return proc


def runs_of(client, name: str) -> tuple:
    """The parent run of cross-validation ``name`` (the newest) and its child runs."""
    exp = client.get_experiment_by_name("liver-fcn-crossval")
    (parent, *_) = client.search_runs([exp.experiment_id], f"tags.crossval = '{name}'", order_by=["start_time DESC"])
    return parent, client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def test_a_killed_crossval_marks_its_runs_and_starts_afresh_on_request(prepared, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "cv"
    client = mlflow.MlflowClient(tracking_uri=uri)
    # SIGTERM: the running fold is stopped (it saves and marks its run), the parent run is KILLED
    proc = started_crossval(prepared, out, uri, "killed")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        "liver-fcn crossval: cross-validation 'killed' terminated by signal SIGTERM; its runs are marked KILLED"
    )
    parent, (train,) = runs_of(client, "killed")
    assert parent.info.status == "KILLED" and train.info.status == "FAILED"
    assert "terminated by signal SIGTERM" in train.data.tags["error"]
    assert list((out / "killed" / "folds" / "3Dircadb1.1" / "models").glob("*checkpoint*.pt"))  # saved on the way out

    # SIGKILL: no handler runs here, but the fold's training gets SIGTERM as its parent dies
    again = crossval(prepared, out, uri, "killed")
    assert again.returncode == 2 and "already exists; choose another --name, or pass --overwrite" in again.stderr
    proc = started_crossval(prepared, out, uri, "killed-hard")
    proc.kill()
    proc.communicate(timeout=60)
    deadline = time.time() + 120
    while (train := runs_of(client, "killed-hard")[1][0]).info.status == "RUNNING":
        assert time.time() < deadline, "the orphaned fold training kept running"
        time.sleep(1)
    assert train.info.status == "FAILED"
    parent, _ = runs_of(client, "killed-hard")
    assert parent.info.status == "RUNNING"  # nobody could mark it: the re-run does
    r = crossval(prepared, out, uri, "killed-hard", "--overwrite")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "earlier cross-validation removed, 1 of its runs left RUNNING marked KILLED" in r.stdout
    assert client.get_run(parent.info.run_id).info.status == "KILLED"
    fresh, children = runs_of(client, "killed-hard")
    assert fresh.info.status == "FINISHED" and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)


def test_comparing_crossvals_keeps_every_evaluation_condition(tmp_path):
    """Clean, scanner-shift and contrast-phase scores are all compared fold by fold and on the mean;
    the fold's training time and other scores are left out."""
    from liver_fcn.crossval import compare_crossvals

    uri = f"sqlite:///{tmp_path / 'cmp.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("liver-fcn-crossval")
    for name, dice in (("a", 0.5), ("b", 0.75)):
        run = client.create_run(exp, tags={"crossval": name, "kind": "crossval"})
        for tag in ("", "shifted_", "phase_"):
            client.log_metric(run.info.run_id, f"fold.3Dircadb1.1.{tag}dice_kidney", dice)
            client.log_metric(run.info.run_id, f"fold.3Dircadb1.1.{tag}rvd_kidney", dice)
            client.log_metric(run.info.run_id, f"cv_mean_{tag}dice_kidney", dice)
        client.log_metric(run.info.run_id, "fold.3Dircadb1.1.train_minutes", 12.0)
        client.set_terminated(run.info.run_id)
    rows, table = compare_crossvals(uri, "liver-fcn-crossval", "a", "b")
    got = {(r["fold"], r["metric"], r["class"]): r["difference"] for r in rows}
    assert got == {
        (fold, f"{tag}dice", "kidney"): 0.25 for fold in ("3Dircadb1.1", "mean") for tag in ("", "shifted_", "phase_")
    }
    assert "| 3Dircadb1.1 | phase_dice | kidney | 0.5000 | 0.7500 | +0.2500 |" in table
    assert "| mean | phase_dice | kidney |" in table


@pytest.mark.slow
def test_crossval_is_one_parent_run_with_a_child_per_fold_and_compares_fold_by_fold(prepared, synthetic, tmp_path):
    uri = f"sqlite:///{tmp_path / 'cv.db'}"
    a = crossval(prepared, tmp_path / "cv", uri, "plain")
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    b = crossval(
        prepared,
        tmp_path / "cv",
        uri,
        "synthetic",
        "--extra_training",
        str(synthetic),
        "--extra_weight",
        "0.25",
        overrides={"network_def#variant": "4s"},
    )
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    assert "mean +- std over 2 folds" in a.stdout and "liver (shifted)" in a.stdout
    # not a terminal: a plain line an epoch, from the progress file each fold's training writes
    assert "[2/2] training without 3Dircadb1.2: epoch 2/2, iteration 4/4, loss " in a.stdout
    done = json.loads((tmp_path / "cv" / "plain" / "folds" / "3Dircadb1.2" / "progress.json").read_text())
    assert done["done"] and (done["iteration"], done["max_iterations"], done["max_epochs"]) == (4, 4, 2)

    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("liver-fcn-crossval")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # "Machine learning" in the UI
    assert f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in a.stdout
    runs = client.search_runs([exp.experiment_id])
    parents = {r.data.tags["crossval"]: r for r in runs if r.data.tags.get("kind") == "crossval"}
    assert set(parents) == {"plain", "synthetic"}
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(r.info.run_name for r in children) == sorted(
            f"cv-{name}-3Dircadb1.{n}-{kind}" for n in (1, 2) for kind in ("train", "eval")
        )
        assert all(r.info.status == "FINISHED" for r in children)
        m = parent.data.metrics
        folds = [m[f"fold.3Dircadb1.{n}.dice_liver"] for n in (1, 2)]
        assert m["cv_mean_dice_liver"] == pytest.approx(np.mean(folds))
        assert m["cv_std_dice_liver"] == pytest.approx(np.std(folds))
        assert "cv_mean_shifted_dice_liver" in m and "fold.3Dircadb1.1.train_minutes" in m
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"crossval.csv", "crossval.md"}
        note = parent.data.tags["mlflow.note.content"]
        assert note.startswith("Leave-one-patient-out cross-validation of train.json") and "over 2 patients" in note
        assert f"liver IoU {m['cv_mean_iou_liver']:.3f}" in note
        for child in children:  # the held-out patient chose nothing: no validation in the fold
            if child.info.run_name.endswith("-train"):
                assert child.data.params["val_patients"] == "0" and "val_iou_liver" not in child.data.metrics
    # the extra synthetic volumes joined the training of every fold, never its test
    train_b = [r for r in runs if r.info.run_name == "cv-synthetic-3Dircadb1.1-train"][0]
    assert train_b.data.params["train_patients"] == str(4 + 2) and train_b.data.params["variant"] == "4s"
    assert train_b.data.params["extra_training"] == "synth: 2 volumes, weight 0.25"  # not the 0.5 recorded
    assert train_b.data.params["sampling"] == "weighted"  # the extra volumes weigh 0.25 each
    inputs = train_b.inputs.dataset_inputs  # the fold's patients and the extra set, each with its digest
    assert [json.loads(i.dataset.profile)["patients"]["training"] for i in inputs] == [4, 2]
    assert (
        inputs[1].dataset.name == "synthetic CT from 3D-IRCADb-01 organ masks" and len(inputs[1].dataset.digest) == 16
    )
    assert (tmp_path / "cv" / "synthetic" / "folds" / "3Dircadb1.1" / "models" / "model.pt").is_file()

    c = warm_module(
        "liver_fcn.cli",
        "compare",
        "--crossval",
        "plain",
        "synthetic",
        "--tracking_uri",
        uri,
        "--out",
        str(tmp_path / "cmp"),
        cwd=tmp_path,
        timeout=300,
    )
    assert c.returncode == 0, c.stderr[-2000:]
    table = (tmp_path / "cmp" / "crossval_comparison.md").read_text()
    fa, fb = parents["plain"].data.metrics, parents["synthetic"].data.metrics
    a, b = fa["fold.3Dircadb1.2.dice_liver"], fb["fold.3Dircadb1.2.dice_liver"]
    row = f"| 3Dircadb1.2 | dice | liver | {a:.4f} | {b:.4f} |"
    assert row in table and "| mean | shifted_dice | liver |" in table and "| mean | phase_dice | kidney |" in table
    again = crossval(prepared, tmp_path / "cv", uri, "plain")
    assert again.returncode == 2 and "already exists; choose another --name" in again.stderr
    assert not math.isnan(fa["cv_mean_iou_liver"])
