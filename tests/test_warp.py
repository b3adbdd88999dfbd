"""Real CT warped onto mask-only anatomies: registration recovers a known deformation, `liver-fcn warp`
writes volumes annotated with the target's own masks, and training leaves out what a held-out patient gave."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from liver_fcn.data import TrainingSets, load_datalist
from liver_fcn.data.phantom import make_phantom
from liver_fcn.data.warp import RegistrationLabels, dice, warp_image, warp_patient
from liver_fcn.errors import InputError

from .commands import warm_module
from .conftest import REPO, masks_without

sitk = pytest.importorskip("SimpleITK")


def _deformation(shape, affine):
    """A known target -> source transform: scaled by up to 8 %, shifted 11 mm, plus a smooth 4-5 mm wave."""
    from liver_fcn.data.warp import _to_sitk

    sp = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    scale = sitk.ScaleTransform(3, (1.05, 1.08, 0.94))
    scale.SetCenter([float(c) for c in sp * np.asarray(shape) / 2.0])
    shift = sitk.TranslationTransform(3, (4.0, 6.0, -9.0))
    a0, a1, a2 = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij")
    # SimpleITK's axes are the arrays' axes here (see _to_sitk); components in mm along them
    field = np.stack([np.zeros_like(a0), 5.0 * np.sin(a2 / 60.0), 4.0 * np.cos(a1 / 70.0)], axis=-1)
    disp = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(field, (2, 1, 0, 3))), isVector=True)
    disp.CopyInformation(_to_sitk(np.zeros(shape, dtype=np.uint8), affine))
    wave = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([scale, shift, wave])


def test_registration_recovers_a_deformed_copy_of_its_own_masks():
    case = make_phantom(seed=11, size=96, slices=40)
    g = case.geometry
    affine = np.diag([g.slice_spacing, g.pixel_spacing[0], g.pixel_spacing[1], 1.0])  # arrays are (Z, Y, X)
    shape = case.ct.shape
    source = RegistrationLabels.from_organs(case.masks, affine)
    known = _deformation(shape, affine)
    deformed = {
        k: warp_image(m.astype(np.uint8), affine, known, shape, affine, linear=False, default=0) > 0
        for k, m in case.masks.items()
    }
    target = RegistrationLabels.from_organs(deformed, affine)
    before = {k: dice(source.masks[k], target.masks[k]) for k in ("liver", "kidney", "body")}
    assert before["liver"] < 0.85 and before["kidney"] < 0.6  # the deformation is no small one

    result = warp_patient(case.ct.astype(np.float32), source, target, spacing_mm=4.0)
    assert set(result.names) >= {"body", "liver", "bone", "kidney", "spleen"}
    # measured: 0.98-0.99 for every label (before: liver 0.82, kidney 0.41, spleen 0.16, bone 0.43)
    for name in ("liver", "body", "kidney", "spleen", "bone"):
        assert result.dice[name] >= 0.95, (name, before.get(name), result.dice)
    # the CT moved with the labels: the warped tissue under the target's liver is the phantom's liver
    liver_hu = np.median(case.ct[case.masks["liver"]])
    assert abs(np.median(result.ct[target.masks["liver"]]) - liver_hu) < 15
    assert result.ct.shape == shape and np.median(result.ct[~target.masks["body"]]) < -900


def _masks_only(phantom_root: Path, root: Path, numbers=(4, 5)) -> Path:
    for n in numbers:  # as the shared database gives them: the mask zip alone
        (root / f"3Dircadb1.{n}").mkdir(parents=True)
        (root / f"3Dircadb1.{n}" / "MASKS_DICOM.zip").write_bytes(
            (phantom_root / f"3Dircadb1.{n}" / "MASKS_DICOM.zip").read_bytes()
        )
    return root


def warp_cli(*args: str, timeout: int = 300):
    """``liver-fcn warp ...`` (as ``python -m liver_fcn.cli``)."""
    return warm_module("liver_fcn.cli", "warp", *args, cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def warped(phantom_root, prepared, tmp_path_factory) -> Path:
    data = json.loads((prepared / "datalist.json").read_text())
    sources = [data["training"][0]["patient"], data["validation"][0]["patient"]]
    out = tmp_path_factory.mktemp("warped") / "warped"
    masks = _masks_only(phantom_root, tmp_path_factory.mktemp("masks_only"))
    r = warp_cli(
        "--dataset_dir",
        str(prepared),
        "--masks",
        str(masks),
        "--out",
        str(out),
        "--sources",
        *sources,
        "--weight",
        "0.3",
        "--min_liver_dice",
        "0.5",
        "--spacing",
        "6",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def test_warp_writes_real_tissue_under_the_targets_own_masks(warped, phantom_root, prepared, tmp_path):
    data = json.loads((warped / "datalist.json").read_text())
    rows = list(csv.DictReader(open(warped / "warp_report.csv")))
    assert len(rows) == 4 and {r["target"] for r in rows} == {"3Dircadb1.4", "3Dircadb1.5"}
    assert all(float(r["dice_liver"]) > 0.5 and float(r["seconds"]) > 0 for r in rows)
    kept = [r["case"] for r in rows if r["kept"] == "True"]
    assert [e["patient"] for e in data["training"]] == kept and kept
    for e in load_datalist(warped / "datalist.json"):
        source, target = e["source_patients"][0], e["anatomy_from"]
        assert e["patient"] == f"warp-{source}-to-{target}" and e["sampling_weight"] == 0.3
        ct = nib.load(e["image"])
        liver = np.asarray(nib.load(e["masks"]["liver"][0]).dataobj) > 0
        assert ct.get_data_dtype() == np.int16 and ct.shape == liver.shape == tuple(e["shape"])
        # the label is the target's own liver mask, not the warped source's
        from liver_fcn.data.archive import safe_extract
        from liver_fcn.data.synth import _read_masks

        own = phantom_root / target / "MASKS_DICOM.zip"
        folder = tmp_path / target
        if not folder.exists():
            safe_extract(own, folder, top="MASKS_DICOM")
        organs, affine = _read_masks(folder / "MASKS_DICOM")
        assert np.array_equal(liver, organs["liver"]) and np.allclose(ct.affine, affine)
        # real tissue: the source phantom's liver density under the target's liver
        assert 40 < np.median(np.asarray(ct.dataobj)[liver]) < 200
        assert e["annotated"][1] and (warped / "overlays" / f"{e['patient']}.png").stat().st_size > 5000
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        from liver_fcn.data.warp import warp_patients

        warp_patients(prepared, phantom_root, warped, log=lambda s: None)


def test_training_leaves_out_volumes_derived_from_held_out_patients(warped, prepared, tmp_path):
    data = json.loads((prepared / "datalist.json").read_text())
    val = data["validation"][0]["patient"]
    logs = []
    sets = TrainingSets(prepared / "datalist.json", [{"datalist": str(warped), "weight": 0.2}], log=logs.append)
    extra = [e for e in sets.files if e["patient"].startswith("warp-")]
    assert extra and all(e["source_patients"] != [val] for e in extra)
    assert all(e["sampling_weight"] == 0.2 for e in extra)
    assert len(sets.files) == len(data["training"]) + len(extra) and "left out of training" in logs[0]
    assert "1 left out" not in sets.summary() and "left out (held-out source)" in sets.summary()
    names = [n for n, _ in sets.records()]
    assert len(names) == 2 and names[1] == "real CT warped onto 3D-IRCADb-01 mask-only anatomies"
    # a fold that holds out the training source too has nothing left of the set: said, not ignored
    fold = tmp_path / "datalist.json"
    splits = {k: load_datalist(prepared / "datalist.json", k, required=False) for k in ("training", "validation")}
    fold.write_text(
        json.dumps(
            {"training": splits["training"][1:], "validation": splits["validation"], "test": splits["training"][:1]}
        )
    )
    with pytest.raises(InputError, match="no training volume left"):
        TrainingSets(fold, [str(warped)], log=lambda s: None)
    with pytest.raises(InputError, match="an extra training set is a path or"):
        TrainingSets(prepared / "datalist.json", [{"path": str(warped)}])
    with pytest.raises(InputError, match="sampling weight must be a positive number"):
        TrainingSets(prepared / "datalist.json", [{"datalist": str(warped), "weight": 0}])
    with pytest.raises(InputError, match="datalist not found"):
        TrainingSets(prepared / "datalist.json", [str(tmp_path / "nowhere")])


def test_warp_refuses_a_target_without_body_outline(prepared, phantom_root, tmp_path):
    masks_without(phantom_root, "3Dircadb1.4", tmp_path / "in", "skin")
    r = warp_cli(
        "--dataset_dir",
        str(prepared),
        "--masks",
        str(tmp_path / "in"),
        "--out",
        str(tmp_path / "out"),
        "--sources",
        "1",
    )
    assert r.returncode == 2 and "needs 'skin' and 'liver' masks" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "datalist.json").exists()
    r = warp_cli(
        "--dataset_dir",
        str(tmp_path / "none"),
        "--masks",
        str(phantom_root),
        "--out",
        str(tmp_path / "out2"),
    )
    assert r.returncode == 2 and "datalist not found" in r.stderr and not (tmp_path / "out2").exists()


def test_warp_can_label_classes_with_the_sources_own_masks_warped_with_its_ct(warped, phantom_root, prepared, tmp_path):
    """``--source_labels liver bone``: those classes' labels are the source's masks carried by the same
    warp as the CT, so their Dice against the target's is the pair's warped-label Dice; the others
    stay the target's own."""
    from liver_fcn.data.warp import warp_patients

    data = json.loads((prepared / "datalist.json").read_text())
    source = data["training"][0]["patient"]
    masks = _masks_only(phantom_root, tmp_path / "masks_only", numbers=(4,))
    with pytest.raises(InputError, match="--source_labels spleen: not a class that is registered"):
        warp_patients(prepared, masks, tmp_path / "bad", sources=[source], source_labels=["spleen"])
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    out = warp_patients(
        prepared,
        masks,
        tmp_path / "out",
        sources=[source],
        spacing_mm=6.0,
        min_liver_dice=0.5,
        source_labels=["liver", "bone"],
        log=lambda s: None,
    ).parent
    (e,) = load_datalist(out / "datalist.json")
    assert e["labels_from"] == {"liver": "source", "bone": "source", "kidney": "target"}
    row = next(csv.DictReader(open(out / "warp_report.csv")))
    # the same pair under the target's masks (the module's warp): the CT is the same, the labels differ
    (theirs,) = [t for t in load_datalist(warped / "datalist.json") if t["patient"] == e["patient"]]
    hu = [np.asarray(nib.load(x["image"]).dataobj, dtype=np.float32) for x in (e, theirs)]
    assert np.abs(hu[0] - hu[1]).mean() < 1.0
    for c in ("liver", "bone", "kidney"):
        ours = np.asarray(nib.load(e["masks"][c][0]).dataobj) > 0
        target = np.asarray(nib.load(theirs["masks"][c][0]).dataobj) > 0
        if c == "kidney":
            assert np.array_equal(ours, target)
        else:
            assert dice(ours, target) == pytest.approx(float(row[f"dice_{c}"]), abs=1e-3) and dice(ours, target) < 1


def test_source_labels_also_label_targets_without_that_organs_mask(phantom_root, prepared, tmp_path):
    """A target without kidney masks: with ``--source_labels kidney --carry_missing`` the warped volume
    still gets a kidney label - the source's kidney, carried by the warp with the source's tissue."""
    from liver_fcn.data.ct import load_ct
    from liver_fcn.data.synth import _read_masks
    from liver_fcn.data.warp import warp_patients

    masks_without(phantom_root, "3Dircadb1.4", tmp_path / "masks", "kidney")
    (e,) = load_datalist(prepared / "datalist.json")[:1]
    kw = dict(sources=[e["patient"]], spacing_mm=6.0, min_liver_dice=0.5, source_labels=["kidney"], log=lambda s: None)
    plain = warp_patients(prepared, tmp_path / "masks", tmp_path / "plain", **kw)
    carried = warp_patients(prepared, tmp_path / "masks", tmp_path / "carried", carry_missing=True, **kw)
    (without,), (with_,) = load_datalist(plain), load_datalist(carried)
    assert "kidney" not in without["masks"]  # unless asked, the class stays unannotated where the target lacks it
    assert with_["labels_from"] == {"liver": "target", "bone": "target", "kidney": "source"}
    (row,) = csv.DictReader(open(carried.parent / "warp_report.csv"))
    assert row["dice_kidney"] == ""  # the target has no kidney: not registered, labelled from the source
    kidney = np.asarray(nib.load(with_["masks"]["kidney"][0]).dataobj) > 0
    hu = np.asarray(nib.load(with_["image"]).dataobj)
    organs, _ = _read_masks(Path(e["masks"]["kidney"][0]).parent)
    source_kidney = np.any([m for k, m in organs.items() if "kidney" in k], axis=0)
    source = load_ct(e["image"])
    ml = kidney.sum() * np.prod(nib.load(with_["image"]).header.get_zooms())
    source_ml = source_kidney.sum() * np.prod(np.abs(np.diag(np.asarray(source.affine))[:3]))
    assert 0.5 < ml / source_ml < 2  # the warp moves and reshapes it, it does not lose it
    assert (hu[kidney] > -500).mean() > 0.9  # on the warped body's tissue, not in the air
