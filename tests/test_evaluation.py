"""SLIVER07-style metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from liver_fcn.evaluation import class_metrics, slice_iou


def test_extra_layer_gives_known_overlap_and_volume_error():
    truth = np.zeros((6, 6, 6), bool)
    truth[1:3, 1:3, 1:3] = True  # 8 voxels
    pred = np.zeros_like(truth)
    pred[1:4, 1:3, 1:3] = True  # 12 voxels, the 8 plus one layer of 4
    m = class_metrics(pred, truth, spacing=(1.0, 1.0, 1.0))
    assert m["iou"] == pytest.approx(8 / 12)
    assert m["dice"] == pytest.approx(2 * 8 / 20)
    assert m["voe"] == pytest.approx(100 * (1 - 8 / 12))
    assert m["rvd"] == pytest.approx(100 * (12 - 8) / 8)
    assert m["slice_iou"] == pytest.approx(4 / 6)  # each axial slice: 4 of 6 pixels shared
    assert m["mssd"] == pytest.approx(1.0)  # the extra layer is one voxel from the reference


def test_parallel_planes_give_exact_surface_distances_in_mm():
    truth = np.zeros((10, 5, 5), bool)
    truth[2] = True
    pred = np.zeros_like(truth)
    pred[5] = True  # three voxels away along the first axis
    m = class_metrics(pred, truth, spacing=(0.5, 0.8, 2.0))
    assert m["assd"] == pytest.approx(1.5) and m["mssd"] == pytest.approx(1.5)
    assert m["dice"] == 0 and m["iou"] == 0 and m["voe"] == pytest.approx(100) and m["rvd"] == pytest.approx(0)
    assert m["slice_iou"] == 0


def test_perfect_and_empty_cases():
    truth = np.zeros((4, 4, 4), bool)
    truth[1:3, 1:3, 1:3] = True
    m = class_metrics(truth, truth, (1, 1, 1))
    assert (m["dice"], m["iou"], m["voe"], m["rvd"], m["assd"], m["mssd"], m["slice_iou"]) == (1, 1, 0, 0, 0, 0, 1)
    empty = class_metrics(np.zeros_like(truth), np.zeros_like(truth), (1, 1, 1))
    assert all(math.isnan(v) for v in empty.values())
    missed = class_metrics(np.zeros_like(truth), truth, (1, 1, 1))
    assert missed["dice"] == 0 and missed["rvd"] == pytest.approx(-100) and math.isnan(missed["assd"])


def test_slice_iou_ignores_slices_without_the_class():
    t = np.zeros((3, 3, 4), bool)
    p = np.zeros_like(t)
    t[0, 0, 0] = p[0, 0, 0] = True  # slice 0: IoU 1
    t[0, 0, 1] = True
    t[0, 1, 1] = p[0, 1, 1] = True  # slice 1: IoU 1/2; slices 2 and 3 empty
    assert slice_iou(p, t) == pytest.approx(0.75)


def evaluate(tmp_path, run_name: str | None, eval_name: str, **overrides) -> None:
    """The bundle's evaluation of ``tmp_path/data`` into ``tmp_path/eval``, with the threshold network's
    checkpoint written to ``tmp_path/models`` first under ``run_name`` (None: the one already there)."""
    from monai.bundle import run as bundle_run

    from .conftest import REPO
    from .test_inference import SETTINGS

    if run_name is not None:
        (tmp_path / "models").mkdir()
        torch.save(
            {"model": {"threshold": torch.tensor(0.05)}, "settings": {**SETTINGS, "run_name": run_name}},
            tmp_path / "models" / "model.pt",
        )
    bundle_run(
        "evaluating",
        config_file=[str(REPO / "bundle" / "configs" / f) for f in ("train.json", "evaluate.json")],
        dataset_dir=str(tmp_path / "data"),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"),
        eval_name=eval_name,
        logging_file=False,
        **overrides,
    )


def test_bundle_evaluation_scores_each_patient_clean_and_shifted_on_its_own_grid(tmp_path):
    """evaluate.json end to end with a network whose output is known: a block of 100 HU is the liver."""
    import csv
    import json

    import mlflow
    import nibabel as nib

    from .test_inference import THRESHOLD_NET, block_volume

    entries = []
    for name, spacing in (("p1", (0.8, 0.7, 3.0)), ("p2", (0.6, 0.6, 1.25))):
        ct, block = block_volume()
        affine = np.diag([*spacing, 1.0])
        folder = tmp_path / "data" / name
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.transpose(ct, (2, 1, 0)).astype(np.int16), affine), str(folder / "ct.nii.gz"))
        nib.save(nib.Nifti1Image(np.transpose(block, (2, 1, 0)).astype(np.uint8), affine), str(folder / "liver.nii.gz"))
        entries.append(
            {
                "patient": name,
                "image": f"{name}/ct.nii.gz",
                "masks": {"liver": [f"{name}/liver.nii.gz"]},
                "annotated": [True, True, False, False],
            }
        )
    (tmp_path / "data" / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "test": entries}))
    evaluate(tmp_path, "threshold", "eval-threshold", network_def=THRESHOLD_NET)
    folder = tmp_path / "eval" / "evaluation" / "eval-threshold"
    with open(folder / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["patient"], r["condition"], r["class"]) for r in rows] == [
        (p, c, k) for p in ("p1", "p2") for c in ("clean", "shifted", "phase") for k in ("liver", "bone", "kidney")
    ]
    for r in rows:
        if r["class"] == "liver" and r["condition"] == "phase":  # 100 HU -> 68.5 HU: still above the threshold
            assert float(r["dice"]) > 0.97 and float(r["volume_ref_ml"]) > 0, r
        elif r["class"] == "liver":
            assert float(r["dice"]) > (0.97 if r["condition"] == "clean" else 0.85), r
            # shifted: edge voxels are part block, part air; the reference takes the majority, the
            # threshold network (at -82 HU) needs 80 % block
            assert (-3 < float(r["rvd"]) < 3) if r["condition"] == "clean" else (-25 < float(r["rvd"]) < 0), r
            # the reference volume is the block's, in mL, whatever the grid it is scored on
            assert float(r["volume_ref_ml"]) == pytest.approx(
                20250 * (0.8 * 0.7 * 3.0 if r["patient"] == "p1" else 0.6 * 0.6 * 1.25) / 1000,
                rel=1e-4 if r["condition"] == "clean" else 0.12,
            )
        else:  # no masks for bone and kidney: not scored, not zero
            assert r["annotated"] == "False" and r["dice"] == "nan" and r["volume_ref_ml"] == "nan"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'eval' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("liver-fcn").experiment_id])
    m = run.data.metrics
    assert m["test_dice_liver"] > 0.97 and m["test_shifted_dice_liver"] > 0.85
    assert m["test_shift_change_dice_liver"] == pytest.approx(m["test_shifted_dice_liver"] - m["test_dice_liver"])
    assert math.isnan(m["test_dice_kidney"]) and run.data.params["scanner_shift"].startswith(
        "3 mm slabs, 1.5 mm pixels"
    )
    assert run.data.params["phase_shift"] == "liver and kidney enhancement x 0.3"
    assert m["test_phase_change_dice_liver"] == pytest.approx(m["test_phase_dice_liver"] - m["test_dice_liver"])

    # a network that paints the block as kidney, a class these patients have no masks for: the kidney is
    # still not scored (its painted volume is reported), and the liver it misses scores 0
    evaluate(
        tmp_path,
        None,
        "eval-kidney-painter",
        network_def={**THRESHOLD_NET, "painted": 3},
        scanner_shift=False,
        phase_shift=False,
    )
    folder = tmp_path / "eval" / "evaluation" / "eval-kidney-painter"
    with open(folder / "metrics.csv", newline="") as f:
        rows = {(r["patient"], r["class"]): r for r in csv.DictReader(f)}
    for p in ("p1", "p2"):
        kidney, liver = rows[p, "kidney"], rows[p, "liver"]
        assert kidney["annotated"] == "False" and kidney["dice"] == "nan" and kidney["iou"] == "nan"
        assert float(kidney["volume_pred_ml"]) > 0  # painted, and left out
        assert liver["annotated"] == "True" and float(liver["dice"]) == 0.0
    summary = json.loads((folder / "summary.json").read_text())
    kidney = next(s for s in summary if s["class"] == "kidney" and s["metric"] == "dice")
    assert kidney["n"] == 0 and math.isnan(kidney["mean"])
    (run,) = client.search_runs(
        [client.get_experiment_by_name("liver-fcn").experiment_id], "attributes.run_name = 'eval-kidney-painter'"
    )
    assert math.isnan(run.data.metrics["test_dice_kidney"]) and run.data.metrics["test_dice_liver"] == 0.0


def test_contrast_phase_shift_scales_each_organs_enhancement_toward_unenhanced():
    from liver_fcn.transforms import SimulateContrastPhased, scale_enhancement

    rng = np.random.default_rng(0)
    hu = rng.normal(0, 10, size=(60, 60, 20)).astype(np.float32) - 100  # fat
    classes = np.zeros(hu.shape, dtype=np.uint8)
    classes[5:25, 5:25, 2:18], classes[35:50, 35:50, 2:18], classes[5:20, 40:55, 2:18] = 1, 3, 2
    hu[classes == 1] += 220  # liver at 120 HU (portal venous)
    hu[classes == 3] += 300  # kidney at 200 HU
    hu[classes == 2] += 500  # bone
    names = ["background", "liver", "bone", "kidney"]
    out = scale_enhancement(hu, classes, names, keep=0.3, spacing=(1.0, 1.0, 2.0))
    assert np.median(out[classes == 1]) == pytest.approx(55 + 0.3 * (np.median(hu[classes == 1]) - 55), abs=0.01)
    assert np.median(out[classes == 3]) == pytest.approx(32 + 0.3 * (np.median(hu[classes == 3]) - 32), abs=0.01)
    assert np.array_equal(out[classes == 2], hu[classes == 2])  # bone is not an enhancing organ
    assert np.std(out[classes == 1]) == pytest.approx(np.std(hu[classes == 1]), rel=1e-3)  # texture and noise kept
    far = np.zeros(hu.shape, dtype=bool)
    far[:, 28:33] = True
    assert np.array_equal(out[far & (classes == 0)], hu[far & (classes == 0)])  # fades out within a few mm
    unenhanced = scale_enhancement(hu - 100, classes, names, keep=0.3, spacing=(1.0, 1.0, 2.0))
    assert np.array_equal(unenhanced[classes == 1], hu[classes == 1] - 100)  # already below 55 HU: as it is
    # the dictionary transform: only the items of its condition, the class map untouched
    from monai.data import MetaTensor

    item = {
        "image": MetaTensor(torch.as_tensor(hu)[None], affine=torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0]))),
        "label": MetaTensor(torch.as_tensor(classes)[None]),
        "condition": "phase",
    }
    shifted = SimulateContrastPhased(class_names=names, keep=0.3)(item)
    assert np.allclose(np.asarray(shifted["image"][0]), out) and shifted["label"] is item["label"]
    clean = SimulateContrastPhased(class_names=names)({**item, "condition": "clean"})
    assert clean["image"] is item["image"]


def test_contrast_phase_augmentation_moves_each_organ_by_its_own_factor():
    """The training augmentation on a 2.5D slice: liver and kidney each scaled by their own drawn
    factor (all channels alike), bone and the class map untouched, nothing when not drawn."""
    from liver_fcn.transforms import RandContrastPhased

    rng = np.random.default_rng(1)
    classes = np.zeros((80, 80), dtype=np.int64)
    classes[5:35, 5:35], classes[50:70, 50:70], classes[5:25, 50:70] = 1, 3, 2
    base = rng.normal(0, 10, size=(80, 80)).astype(np.float32) - 100
    base += np.select([classes == 1, classes == 3, classes == 2], [220.0, 300.0, 500.0])
    item = {"image": torch.as_tensor(np.stack([base, base + 5, base - 5])), "label": torch.as_tensor(classes)[None]}
    aug = RandContrastPhased(
        prob=1.0, keep_range=(0.0, 1.3), spacing=1.6, class_names=["background", "liver", "bone", "kidney"]
    )
    factors = set()
    for seed in range(6):
        aug.set_random_state(seed)
        out = aug(item)
        img = np.asarray(out["image"])
        keep = aug.keep
        assert set(keep) == {"liver", "kidney"} and all(0.0 <= k <= 1.3 for k in keep.values())
        for c, name, unenhanced in ((1, "liver", 55.0), (3, "kidney", 32.0)):
            for channel, src in zip(img, np.asarray(item["image"])):
                expected = unenhanced + keep[name] * (np.median(src[classes == c]) - unenhanced)
                assert np.median(channel[classes == c]) == pytest.approx(expected, abs=0.05)
        assert np.array_equal(img[:, classes == 2], np.asarray(item["image"])[:, classes == 2])
        assert out["label"] is item["label"]
        factors.add(round(keep["liver"] - keep["kidney"], 3))
    assert len(factors) > 1  # the organs move independently
    never = RandContrastPhased(prob=0.0)(item)
    assert never["image"] is item["image"]
    with pytest.raises(ValueError, match="keep_range"):
        RandContrastPhased(keep_range=(1.2, 0.5))


def test_contrast_phase_augmentation_can_move_the_whole_slice_together():
    """A coherent draw scales every soft tissue's enhancement by the slice's factor: the labelled
    organs by factors near it, unlabelled enhanced tissue (a spleen) by it, with its noise kept;
    fat, muscle-like water density, cortical bone (labelled or not) and the class map stay."""
    from liver_fcn.transforms import RandContrastPhased

    rng = np.random.default_rng(2)
    classes = np.zeros((120, 120), dtype=np.int64)
    classes[5:35, 5:35], classes[50:70, 50:70], classes[5:25, 50:70] = 1, 3, 2
    base = np.full((120, 120), -100.0, dtype=np.float32)
    base += np.select([classes == 1, classes == 3, classes == 2], [220.0, 300.0, 800.0])
    base[80:115, 5:40] = 150.0  # spleen, not labelled
    base[80:115, 60:80] = 45.0  # water-like tissue at the unenhanced density
    base[80:100, 90:110] = 800.0  # bone without a label
    noise = rng.normal(0, 10, size=base.shape).astype(np.float32)
    item = {
        "image": torch.as_tensor(np.stack([base + noise, base + noise + 5])),
        "label": torch.as_tensor(classes)[None],
    }
    names = ["background", "liver", "bone", "kidney"]
    aug = RandContrastPhased(prob=1.0, keep_range=(0.3, 0.3), spacing=1.0, class_names=names, coherent_prob=1.0)
    aug.set_random_state(0)
    img = np.asarray(aug(item)["image"])
    src = np.asarray(item["image"])
    assert aug.tissue_keep == pytest.approx(0.3) and all(0.24 <= k <= 0.36 for k in aug.keep.values())
    for c, name, unenhanced in ((1, "liver", 55.0), (3, "kidney", 32.0)):
        expected = unenhanced + aug.keep[name] * (np.median(src[0][classes == c]) - unenhanced)
        assert np.median(img[0][classes == c]) == pytest.approx(expected, abs=0.05)
    spleen = (slice(None), slice(88, 107), slice(13, 32))  # away from its border
    assert img[spleen].mean() == pytest.approx(45 + 0.3 * (src[spleen].mean() - 45), abs=2.0)
    assert img[spleen].std() == pytest.approx(src[spleen].std(), rel=0.15)  # the mean moves, the noise stays
    fat = np.zeros(base.shape, dtype=bool)
    fat[40:48, :], fat[:, 42:48] = True, True  # fat a few mm from every organ
    for unchanged in (classes == 2, base == 800.0, fat):
        assert np.array_equal(img[:, unchanged], src[:, unchanged])
    water = (slice(None), slice(88, 107), slice(64, 76))
    assert abs(img[water].mean() - src[water].mean()) < 3.0
    # a share of coherent draws: some slices move as a whole, the others organ by organ
    mixed = RandContrastPhased(prob=1.0, class_names=names, coherent_prob=0.5)
    kinds = set()
    for seed in range(12):
        mixed.set_random_state(seed)
        mixed(item)
        kinds.add(mixed.tissue_keep is None)
    assert kinds == {True, False}
    # without coherent draws, the random stream is the organs-only one: one draw to apply, one factor an organ
    plain = RandContrastPhased(prob=1.0, class_names=names)
    plain.set_random_state(3)
    plain(item)
    stream = np.random.RandomState(3)
    stream.rand()
    assert plain.tissue_keep is None and plain.keep == {n: stream.uniform(0.2, 1.3) for n in ("liver", "kidney")}
    with pytest.raises(ValueError, match="coherent_prob"):
        RandContrastPhased(coherent_prob=1.5)


def test_bundle_evaluation_values_equal_metrics_computed_directly(tmp_path):
    """A network of known output (it marks the 100 HU block as liver) scored through the real
    ``run evaluating`` against a reference that is the block minus its top two slices and minus a
    one-pixel rim on one side: the report must give what plain NumPy/SciPy compute on the input
    grid - Dice, IoU, RVD with its sign (prediction larger than reference: positive), volumes in mL
    and surface distances in mm from the 2.5 mm slices, not in voxels."""
    import csv
    import json

    import nibabel as nib
    from scipy import ndimage

    from .test_inference import THRESHOLD_NET, block_volume

    spacing = (1.0, 1.0, 2.5)  # the checkpoint's 1 mm pixels: the in-plane grid is kept as it is
    ct, block = block_volume()
    pred = block.copy()  # (slices, rows, cols)
    ref = block.copy()
    ref[13:15] = False  # the reference stops two slices (5 mm) below the block's top
    ref[:, 20:70, 30] = False  # and one column (1 mm) inside its left face
    folder = tmp_path / "data" / "p1"
    folder.mkdir(parents=True)
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(np.transpose(ct, (2, 1, 0)), affine), str(folder / "ct.nii.gz"))
    nib.save(nib.Nifti1Image(np.transpose(ref, (2, 1, 0)).astype(np.uint8), affine), str(folder / "liver.nii.gz"))
    entry = {
        "patient": "p1",
        "image": "p1/ct.nii.gz",
        "masks": {"liver": ["p1/liver.nii.gz"]},
        "annotated": [True, True, False, False],
    }
    (tmp_path / "data" / "datalist.json").write_text(json.dumps({"training": [], "validation": [], "test": [entry]}))
    evaluate(tmp_path, "known", "known", network_def=THRESHOLD_NET, scanner_shift=False, phase_shift=False)
    with open(tmp_path / "eval" / "evaluation" / "known" / "metrics.csv", newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r["class"] == "liver"]

    # directly, on the input grid
    sp = spacing[::-1]  # numpy axes are (slices, rows, cols): 2.5, 1, 1 mm
    n_pred, n_ref, n_both = int(pred.sum()), int(ref.sum()), int((pred & ref).sum())
    dice = 2 * n_both / (n_pred + n_ref)
    iou = n_both / (n_pred + n_ref - n_both)

    def surface_distances(a, b):
        """Distances (mm) from the border voxels of a to the nearest border voxel of b."""
        border_a = a & ~ndimage.binary_erosion(a)
        border_b = b & ~ndimage.binary_erosion(b)
        return ndimage.distance_transform_edt(~border_b, sampling=sp)[border_a]

    d_pr, d_rp = surface_distances(pred, ref), surface_distances(ref, pred)
    want = {
        "dice": dice,
        "iou": iou,
        "voe": 100 * (1 - iou),
        "rvd": 100 * (n_pred - n_ref) / n_ref,
        "mssd": max(d_pr.max(), d_rp.max()),
        "assd": (d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size),
        "volume_pred_ml": n_pred * 2.5 / 1000,
        "volume_ref_ml": n_ref * 2.5 / 1000,
    }
    # the block's top corner on the trimmed face is two slices (5 mm) and one pixel (1 mm) from the reference
    assert want["rvd"] > 0 and want["mssd"] == pytest.approx(math.hypot(5.0, 1.0))
    for k, v in want.items():
        assert float(row[k]) == pytest.approx(v, rel=1e-4), (k, row[k], v)
    # the paper's slice IoU: the mean over the slices where either mask has liver
    per_slice = [
        (pred[z] & ref[z]).sum() / (pred[z] | ref[z]).sum() for z in range(pred.shape[0]) if (pred[z] | ref[z]).any()
    ]
    assert float(row["slice_iou"]) == pytest.approx(float(np.mean(per_slice)), rel=1e-4)
