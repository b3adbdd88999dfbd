"""Transforms, partial-label loss, slice dataset and per-class metrics of the training chain."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.data import CacheDataset
from monai.transforms import Compose

from liver_fcn.data import SliceDataset, load_datalist
from liver_fcn.errors import InputError
from liver_fcn.losses import PartialLabelCrossEntropyLoss, admissible_mask
from liver_fcn.metrics import ClassIoU, segmentation_metrics
from liver_fcn.transforms import AdjacentSlicesd, BoneByDensityd, EncodePartialLabeld, LoadCTd, LoadOrganMasksd

CLASSES = ["background", "liver", "bone", "kidney"]


@pytest.fixture(scope="module")
def volumes(prepared):
    files = load_datalist(prepared / "datalist.json", "training")
    chain = Compose([LoadCTd(keys="image"), LoadOrganMasksd(keys="masks", class_names=CLASSES)])
    return files, CacheDataset(files, chain, cache_rate=1.0, num_workers=0, copy_cache=False, progress=False)


def test_organ_masks_merge_into_one_class_map(volumes):
    files, ds = volumes
    for entry, item in zip(files, ds):
        img, lab = item["image"], item["label"]
        assert lab.shape == img.shape and lab.dtype == torch.uint8
        assert torch.allclose(lab.affine, img.affine)
        present = set(torch.unique(lab).tolist())
        expected = {0} | {c for c, a in enumerate(entry["annotated"]) if a and c > 0}
        assert present == expected, entry["patient"]
        assert item["annotated"].tolist() == entry["annotated"]
        liver_ml = float((lab == 1).sum()) * float(np.prod(entry["spacing"])) / 1000
        assert liver_ml <= entry["volumes_ml"]["liver"] + 0.01  # bone/kidney painted later may win a few voxels


def test_each_class_holds_exactly_its_own_mask_voxels_later_classes_winning_overlaps(volumes):
    from liver_fcn.data.ct import load_ct

    files, ds = volumes
    for entry, item in zip(files, ds):
        expected = np.zeros(item["label"].shape[1:], np.uint8)
        for c, name in enumerate(CLASSES[1:], 1):  # painted in class order: bone over liver, kidney over both
            for folder in entry["masks"].get(name, []):
                expected[np.asarray(load_ct(folder, modality=None)[0]) > 0] = c
        lab = np.asarray(item["label"][0])
        for c in range(1, 4):
            assert int((lab == c).sum()) == int((expected == c).sum()), (entry["patient"], CLASSES[c])
        assert np.array_equal(lab, expected), entry["patient"]


def test_mask_of_another_shape_is_refused(volumes, prepared):
    files, _ = volumes
    entry = dict(files[0])
    other = next(e for e in load_datalist(prepared / "datalist.json", "validation"))
    load = Compose([LoadCTd(keys="image"), LoadOrganMasksd(keys="masks", class_names=CLASSES)], log_stats=False)
    entry["masks"] = {"liver": [str(prepared / "x")]}
    with pytest.raises(RuntimeError) as e:  # MONAI's Compose wraps what a transform raises
        load(entry)
    assert isinstance(e.value.__cause__, InputError) and "x: input does not exist" in str(e.value.__cause__)
    entry["masks"] = {"spleen": other["masks"]["liver"]}
    with pytest.raises(InputError, match=r"unknown classes \['spleen'\]"):
        LoadOrganMasksd(keys="masks", class_names=CLASSES)(LoadCTd(keys="image")(entry))
    small = dict(files[0], masks={"liver": [str(prepared / other["image"])]})
    img = LoadCTd(keys="image")(small)
    img["image"] = img["image"][:, :40]
    with pytest.raises(
        InputError, match=r"PATIENT_DICOM: mask shape \(64, 64, 12\) differs from the CT's \(40, 64, 12\)"
    ):
        LoadOrganMasksd(keys="masks", class_names=CLASSES)(img)


def test_encoded_partial_label_and_marginal_loss():
    label = torch.tensor([[[0, 1], [2, 3]]])
    full = EncodePartialLabeld(num_classes=4)({"label": label, "annotated": torch.tensor([1, 1, 1, 1])})["label"]
    assert torch.equal(full, label.long())
    part = EncodePartialLabeld(num_classes=4)({"label": label[:, :, :1], "annotated": torch.tensor([1, 1, 1, 0])})
    assert part["label"].tolist() == [[[0 + 4 * 8], [2]]]
    allowed = admissible_mask(part["label"][None], 4)[0, :, :, 0]
    assert allowed[:, 0].tolist() == [True, False, False, True]  # background or kidney
    assert allowed[:, 1].tolist() == [False, False, True, False]

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8)
    target = torch.randint(0, 4, (3, 1, 8, 8))
    loss = PartialLabelCrossEntropyLoss(4)
    assert torch.allclose(loss(logits, target), F.cross_entropy(logits, target[:, 0]), atol=1e-6)
    # a kidney-less patient: a background pixel predicted as kidney costs little, as liver a lot
    bg_missing_kidney = torch.full((1, 1, 1, 1), 0 + 4 * 8)
    kidney_logits = torch.tensor([-5.0, -5.0, -5.0, 5.0]).view(1, 4, 1, 1)
    liver_logits = torch.tensor([-5.0, 5.0, -5.0, -5.0]).view(1, 4, 1, 1)
    assert loss(kidney_logits, bg_missing_kidney) < 0.01
    assert loss(liver_logits, bg_missing_kidney) > 5
    expected = -math.log(torch.softmax(kidney_logits.flatten(), 0)[[0, 3]].sum().item())
    assert loss(kidney_logits, bg_missing_kidney).item() == pytest.approx(expected, rel=1e-3)


def test_slice_dataset_visits_every_slice_without_copying_the_cache(volumes):
    files, ds = volumes
    slices = SliceDataset(ds)
    assert len(slices) == sum(e["shape"][2] for e in files)
    v, k = slices.locate(len(slices) - 1)
    assert (v, k) == (len(files) - 1, files[-1]["shape"][2] - 1)
    item = slices[13]
    assert item["image"].shape == (1, 64, 64) and item["label"].shape == (1, 64, 64)
    assert (item["volume_index"], item["slice_index"]) == (1, 1)
    assert torch.equal(item["image"], ds[1]["image"][..., 1].as_tensor())
    item["image"] += 1  # the cache is not modified through an item
    assert not torch.equal(item["image"], ds[1]["image"][..., 1].as_tensor())
    # the cache holds each slice in one block (values unchanged, checked above), stored so once
    assert ds[1]["image"][..., 1].is_contiguous() and ds[1]["label"][..., 1].is_contiguous()
    pointer = ds[1]["image"].data_ptr()
    assert SliceDataset(ds)[13]["image"].shape == (1, 64, 64) and ds[1]["image"].data_ptr() == pointer
    with pytest.raises(ValueError, match="copy_cache=False"):
        SliceDataset(CacheDataset([], Compose([]), copy_cache=True))


def test_slices_holding_an_oversampled_class_are_drawn_that_much_more_often(volumes):
    _, ds = volumes
    plain = SliceDataset(ds)
    assert plain.weighted_sampler() is None  # equal volume weights, no class oversampled
    slices = SliceDataset(ds, class_weights={"kidney": 3.0, 2: 2.0}, class_names=CLASSES)
    held = [
        {c for c in (2, 3) if (slices[i]["label"] == c).any()} for i in range(len(slices))
    ]  # classes in each slice, read through the items
    expected = torch.tensor([3.0 if 3 in h else 2.0 if 2 in h else 1.0 for h in held], dtype=torch.float64)
    assert 0 < sum(3 in h for h in held) < len(held) and any(h == {2} for h in held)
    assert torch.equal(slices.slice_weights(), expected)
    sampler = slices.weighted_sampler()
    assert sampler is not None and torch.equal(sampler.weights, expected)
    assert SliceDataset(ds, class_weights={"kidney": 1.0}, class_names=CLASSES).weighted_sampler() is None
    with pytest.raises(InputError, match="'spleen'"):
        SliceDataset(ds, class_weights={"spleen": 2.0}, class_names=CLASSES)
    with pytest.raises(InputError, match="positive"):
        SliceDataset(ds, class_weights={"kidney": 0}, class_names=CLASSES)


def test_processes_of_a_distributed_training_draw_their_shares_by_the_same_weights(volumes):
    from torch.utils.data import DistributedSampler

    _, ds = volumes
    slices = SliceDataset(ds, class_weights={"kidney": 5.0}, class_names=CLASSES)
    weights = slices.slice_weights()
    heavy = weights > 1
    assert 0 < int(heavy.sum()) < len(slices)
    torch.manual_seed(0)
    drawn = torch.zeros(len(slices))
    for epoch in range(300):
        ranks = [slices.weighted_sampler(distributed=True, num_replicas=2, rank=r) for r in (0, 1)]
        for sampler in ranks:
            sampler.set_epoch(epoch)
        shares = [list(sampler) for sampler in ranks]
        assert [len(s) for s in shares] == [math.ceil(len(slices) / 2)] * 2
        assert not set(shares[0]) & set(shares[1])  # each process draws from its own share
        for share in shares:
            drawn += torch.bincount(torch.tensor(share), minlength=len(slices))
    # a kidney slice is drawn five times as often as another, as on one process
    ratio = (drawn[heavy].mean() / drawn[~heavy].mean()).item()
    assert ratio == pytest.approx(5.0, rel=0.1)
    plain = SliceDataset(ds).weighted_sampler(distributed=True, num_replicas=2, rank=1)
    assert isinstance(plain, DistributedSampler) and plain.shuffle
    assert not hasattr(plain, "weights") and len(plain) == math.ceil(len(slices) / 2)


def test_the_bundle_oversamples_the_classes_slice_class_weight_names(prepared):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json"))
    parser.update({"dataset_dir": str(prepared), "cache_workers": 0, "slice_class_weight": {"kidney": 4.0}})
    slices = parser.get_parsed_content("train#dataset", instantiate=True)
    weights = slices.slice_weights()
    kidney = torch.tensor([bool((slices[i]["label"] == 3).any()) for i in range(len(slices))])
    assert kidney.any() and torch.all(weights[kidney] == 4.0) and torch.all(weights[~kidney] == 1.0)
    assert parser.get_parsed_content("train#sampler") is not None


def test_bone_by_density_drops_only_the_bone_below_the_threshold(volumes):
    files, ds = volumes
    dropped = kept = 0
    for item in ds:
        hu, before = item["image"][0], item["label"][0].clone()
        out = BoneByDensityd(min_hu=400.0, class_names=CLASSES)(item)["label"]
        assert out.dtype == torch.uint8 and out.shape == item["label"].shape
        assert torch.allclose(out.affine, item["label"].affine)
        after, bone = out[0], before == 2
        assert torch.equal(after[~bone], before[~bone])  # every other class and the background as they were
        assert torch.all(after[bone & (hu >= 400)] == 2) and torch.all(after[bone & (hu < 400)] == 0)
        dropped, kept = dropped + int((bone & (hu < 400)).sum()), kept + int((after == 2).sum())
        assert torch.equal(item["label"][0], before)  # the cached item itself is not changed
    assert dropped > 0 and kept > 0  # the phantoms' trabecular cores (about 230 HU) go, their rims stay
    off = BoneByDensityd(min_hu=None, class_names=CLASSES)(ds[0])
    assert torch.equal(off["label"], ds[0]["label"])
    with pytest.raises(ValueError, match="no class 'bone'"):
        BoneByDensityd(min_hu=150.0, class_names=["background", "liver"])
    with pytest.raises(ValueError, match="not on one grid"):
        BoneByDensityd(min_hu=150.0)({"image": ds[0]["image"], "label": ds[0]["label"][..., :-1]})


def test_the_bundle_trains_on_bone_by_density_when_bone_min_hu_is_set(prepared):
    from monai.bundle import ConfigParser

    counts = {}
    for min_hu in (None, 400.0):
        parser = ConfigParser()
        parser.read_config(str(Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json"))
        parser.update({"dataset_dir": str(prepared), "cache_workers": 0, "bone_min_hu": min_hu})
        cache = parser.get_parsed_content("train#cache", instantiate=True)
        labels = torch.cat([cache[i]["label"].flatten() for i in range(len(cache))])
        counts[min_hu] = torch.bincount(labels.long(), minlength=4)
    assert 0 < counts[400.0][2] < counts[None][2]  # less bone, still bone
    assert torch.equal(counts[400.0][[1, 3]], counts[None][[1, 3]])  # liver and kidney untouched


def test_slice_transforms_run_on_plain_tensors_and_the_metadata_switch_is_restored(volumes):
    """MONAI's intensity transforms would wrap every slice in a MetaTensor (most of a CPU batch's
    cost); the slices carry no geometry, so they run without, and the global switch comes back."""
    from monai.data import MetaTensor, get_track_meta
    from monai.transforms import RandScaleIntensityd

    _, ds = volumes
    seen = []
    slices = SliceDataset(ds, transform=Compose([RandScaleIntensityd("image", factors=0.1, prob=1.0), seen.append]))
    slices[3]
    assert seen and type(seen[0]["image"]) is torch.Tensor and not isinstance(seen[0]["image"], MetaTensor)
    assert get_track_meta()

    def fail(_):
        raise RuntimeError("a failing transform")

    with pytest.raises(RuntimeError, match="failing"):
        SliceDataset(ds, transform=fail)[0]
    assert get_track_meta()


def test_torch_gaussian_noise_is_reproducible_and_has_the_spread_asked():
    from liver_fcn.transforms import RandGaussianNoiseTorchd

    img = torch.full((3, 128, 128), 40.0)
    draws = []
    for _ in range(2):
        t = RandGaussianNoiseTorchd("image", prob=1.0, std=25.0, sample_std=False).set_random_state(7)
        draws.append([t({"image": img})["image"] for _ in range(2)])
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])  # seeded
    assert not torch.equal(draws[0][0], draws[0][1])  # a new draw each item
    noise = draws[0][0] - 40.0
    assert draws[0][0].dtype == torch.float32 and abs(noise.mean().item()) < 0.5
    assert noise.std().item() == pytest.approx(25.0, rel=0.02)
    sampled = RandGaussianNoiseTorchd("image", prob=1.0, std=25.0).set_random_state(1)  # std drawn in [0, 25]
    spreads = [(sampled({"image": img})["image"] - 40.0).std().item() for _ in range(20)]
    assert 0 <= min(spreads) < 12 < max(spreads) <= 25.5
    never = RandGaussianNoiseTorchd("image", prob=0.0, std=25.0)
    assert torch.equal(never({"image": img})["image"], img)


def test_adjacent_slices_become_channels():
    vol = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 2, 2, 5).clone()
    out = AdjacentSlicesd(keys="image", channels=3)({"image": vol})["image"]
    assert out.shape == (3, 2, 2, 5)
    assert out[:, 0, 0].tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4], [1, 2, 3, 4, 4]]
    assert torch.equal(AdjacentSlicesd(keys="image", channels=1)({"image": vol})["image"], vol)
    with pytest.raises(ValueError, match="odd number of channels"):
        AdjacentSlicesd(keys="image", channels=2)


def test_class_metrics_against_hand_computed_values():
    # two cases, one-hot over 4 classes on a 4x4 grid; case 2 has no kidney
    def onehot(m):
        return F.one_hot(torch.as_tensor(m), 4).permute(2, 0, 1).float()

    gt1 = [[1, 1, 0, 0], [1, 1, 0, 2], [0, 0, 0, 2], [3, 3, 0, 0]]
    pr1 = [[1, 1, 1, 0], [1, 0, 0, 2], [0, 0, 0, 2], [3, 0, 0, 0]]
    gt2 = [[1, 1, 1, 1], [0, 0, 0, 0], [2, 2, 0, 0], [0, 0, 0, 0]]
    pr2 = [[1, 1, 1, 1], [1, 1, 0, 0], [2, 0, 0, 0], [0, 0, 0, 3]]
    engine = Engine(lambda e, batch: batch)  # an evaluator whose output is the decollated batch
    for name, h in segmentation_metrics(CLASSES).items():
        h.attach(engine, name)
    engine.run([[{"pred": onehot(pr1), "label": onehot(gt1)}, {"pred": onehot(pr2), "label": onehot(gt2)}]])
    got = {k: float(v) for k, v in engine.state.metrics.items()}
    liver = (3 / 5 + 4 / 6) / 2  # case 1: |A∩B|=3, |A∪B|=5; case 2: 4 and 6
    bone = (2 / 2 + 1 / 2) / 2
    kidney = 1 / 2  # case 2 has no kidney in the ground truth: left out, not counted as 0
    assert got["val_iou_liver"] == pytest.approx(liver)
    assert got["val_iou_bone"] == pytest.approx(bone)
    assert got["val_iou_kidney"] == pytest.approx(kidney)
    assert got["val_dice_liver"] == pytest.approx((2 * 3 / 8 + 2 * 4 / 10) / 2)
    # MONAI's "mean": the mean over cases of each case's mean over its measured classes
    assert got["val_mean_iou"] == pytest.approx(((3 / 5 + 1 + 1 / 2) / 3 + (4 / 6 + 1 / 2) / 2) / 2)
    # a class that no case has is NaN (not measured), where MONAI's own aggregate gives 0
    m = ClassIoU(include_background=True, ignore_empty=True)
    m(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert math.isnan(float(m.aggregate()))


def _terminated_engine(ckpt_dir, signal_at_iteration: int | None = None, signal_in_epoch_end: bool = False):
    """A 3-epoch engine with the bundle's termination handling and an atomic per-epoch saver."""
    import os
    import signal

    from ignite.engine import Events

    from liver_fcn.handlers import AtomicCheckpointSaver, finish_epoch_before_terminating, terminate_on_signal

    terminate_on_signal()
    engine = Engine(lambda e, b: None)
    logged = []
    if signal_at_iteration is not None:
        engine.add_event_handler(
            Events.ITERATION_COMPLETED(once=signal_at_iteration), lambda e: os.kill(os.getpid(), signal.SIGTERM)
        )

    def validate(e):  # stands for validation and MLflow logging at the epoch's end
        if signal_in_epoch_end and e.state.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        logged.append(e.state.epoch)

    engine.add_event_handler(Events.EPOCH_COMPLETED, validate)
    saver = AtomicCheckpointSaver(
        str(ckpt_dir),
        {"net": torch.nn.Linear(2, 2), "head": torch.nn.Linear(2, 1)},
        save_interval=1,
        epoch_level=True,
        n_saved=1,
        file_prefix="run",
    )
    saver.attach(engine)
    finish_epoch_before_terminating(engine)
    return engine, logged


def test_sigterm_at_an_epoch_end_waits_for_its_checkpoint(tmp_path):
    import signal

    from liver_fcn.handlers import TrainingTerminated

    engine, logged = _terminated_engine(tmp_path, signal_in_epoch_end=True)
    try:
        with pytest.raises(TrainingTerminated, match="SIGTERM"):
            engine.run([0] * 4, max_epochs=3)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert logged == [1, 2]  # epoch 2 logged and ...
    assert [p.name for p in tmp_path.iterdir()] == ["run_checkpoint_epoch=2.pt"]  # ... saved, nothing else
    assert torch.load(tmp_path / "run_checkpoint_epoch=2.pt", weights_only=True)["net"]["weight"].shape == (2, 2)


def test_sigterm_during_iterations_stops_at_once(tmp_path):
    import signal

    from liver_fcn.handlers import TrainingTerminated

    engine, logged = _terminated_engine(tmp_path, signal_at_iteration=6)  # in epoch 2
    try:
        with pytest.raises(TrainingTerminated):
            engine.run([0] * 4, max_epochs=3)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert engine.state.iteration == 6 and logged == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["run_checkpoint_epoch=1.pt"]


def test_sigterm_inside_an_mlflow_write_stops_the_training_after_it_and_marks_the_run_failed(tmp_path):
    """The signal is sent from inside the tracking store's SQL (SQLAlchemy's own event hook), as it
    is when a fold's training is stopped while it logs its loss."""
    import os
    import signal

    import mlflow
    import sqlalchemy
    from mlflow.tracking._tracking_service.utils import _get_store

    from liver_fcn.handlers import MLflowRunHandler, TrainingTerminated, terminate_on_signal

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    terminate_on_signal()
    engine = Engine(lambda e, b: {"loss": torch.tensor(0.5)})
    handler = MLflowRunHandler(
        tracking_uri=uri, experiment_name="stop", run_name="stopped", output_transform=lambda o: o["loss"]
    )
    handler.attach(engine)
    store = _get_store(uri).engine
    sent = []

    def signal_in_the_third_loss_write(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO METRICS") and engine.state.iteration == 3 and not sent:
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGTERM)

    sqlalchemy.event.listen(store, "before_cursor_execute", signal_in_the_third_loss_write)
    try:
        with pytest.raises(TrainingTerminated, match="SIGTERM"):
            engine.run([0] * 4, max_epochs=2)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sqlalchemy.event.remove(store, "before_cursor_execute", signal_in_the_third_loss_write)
    assert sent and engine.state.iteration == 3
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "TrainingTerminated: terminated by signal SIGTERM"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "Loss")] == [1, 2, 3]  # the write went in


def test_a_failed_checkpoint_write_leaves_no_file(tmp_path):
    from liver_fcn.handlers.checkpoint_saver import _AtomicDiskSaver

    saver = _AtomicDiskSaver(str(tmp_path))
    with pytest.raises((AttributeError, pickle.PicklingError)):  # a local lambda cannot be pickled
        # the tensor is written, then pickling the lambda fails half-way through the file
        saver({"weight": torch.zeros(1000), "broken": lambda: None}, "run_checkpoint_epoch=3.pt")
    assert list(tmp_path.iterdir()) == []
    saver({"weight": torch.zeros(3)}, "run_checkpoint_epoch=3.pt")
    assert torch.load(tmp_path / "run_checkpoint_epoch=3.pt", weights_only=True)["weight"].shape == (3,)


def test_elastic_when_drawn_deforms_as_monai_does_and_leaves_the_others_alone():
    """Drawn every time, the slices are MONAI's Rand2DElasticd's, draw for draw; not drawn, a slice is
    passed through rather than resampled on an identity grid."""
    from monai.transforms import Rand2DElasticd

    from liver_fcn.transforms import ElasticWhenDrawnd

    kw = dict(
        keys=["image", "label"],
        spacing=(16, 16),
        magnitude_range=(1.0, 3.0),
        mode=["bilinear", "nearest"],
        padding_mode="zeros",
    )
    gen = torch.Generator().manual_seed(0)
    slices = [torch.rand(1, 64, 64, generator=gen) for _ in range(8)]
    ours, monai = ElasticWhenDrawnd(prob=1.0, **kw), Rand2DElasticd(prob=1.0, **kw)
    ours.set_random_state(3)
    monai.set_random_state(3)
    for image in slices:
        label = (image > 0.5).float()
        a, b = ours({"image": image, "label": label}), monai({"image": image, "label": label})
        assert not torch.allclose(torch.as_tensor(a["image"]), image)  # deformed
        assert torch.allclose(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]), atol=1e-5)
        assert torch.equal(torch.as_tensor(a["label"]).float(), torch.as_tensor(b["label"]).float())
    kw["keys"], kw["mode"] = ["image"], ["bilinear"]
    never = ElasticWhenDrawnd(prob=0.0, **kw)
    assert all(never({"image": image})["image"] is image for image in slices)
    half = ElasticWhenDrawnd(prob=0.5, **kw)
    half.set_random_state(1)
    assert 0 < sum(half({"image": image})["image"] is image for image in slices * 2) < 16


def _smooth_slice(rows: int = 96, cols: int = 80) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(rows * 1.0), torch.arange(cols * 1.0), indexing="ij")
    return (torch.sin(y / 7) + torch.cos(x / 5) + 0.001 * (y - 30) ** 2)[None]


def test_in_plane_affine_is_monais_rotation_zoom_and_shift_in_one_resampling():
    """Each part alone is MONAI's Rotate, Zoom (keep_size) and Affine translation to float precision;
    all three compose as MONAI's three in sequence do, up to the interpolations saved; a class map
    sampled nearest keeps its values and dtype."""
    from monai.transforms import Affine, Rotate, Zoom

    from liver_fcn.transforms import inplane_affine, inplane_affine_matrix

    img = _smooth_slice()
    angle, zoom, shift = 0.2, 1.25, (3.0, -5.0)  # 96 x 80 zoomed 1.25: whole pixels, as MONAI's Zoom rounds
    rotate = Rotate(angle, mode="bilinear", padding_mode="zeros")
    scale = Zoom(zoom, mode="bilinear", keep_size=True, padding_mode="constant")
    move = Affine(translate_params=shift, mode="bilinear", padding_mode="zeros", image_only=True)
    for monai_out, ours in (
        (rotate(img), inplane_affine(img, inplane_affine_matrix(angle=angle))),
        (scale(img), inplane_affine(img, inplane_affine_matrix(zoom=zoom))),
        (move(img), inplane_affine(img, inplane_affine_matrix(shift=shift))),
    ):
        assert torch.allclose(torch.as_tensor(monai_out), ours, atol=1e-4)
    inner = (0, slice(20, -20), slice(20, -20))  # the sequence loses corners the one resampling keeps
    sequence = torch.as_tensor(move(scale(rotate(img))))
    once = inplane_affine(img, inplane_affine_matrix(angle, zoom, shift))
    assert (sequence - once)[inner].abs().max() < 0.05 < (img - once)[inner].abs().max()
    label = (img > 0.5).to(torch.uint8) + (img > 1.2).to(torch.uint8)
    moved = inplane_affine(label, inplane_affine_matrix(angle, zoom, shift), "nearest")
    assert moved.dtype == torch.uint8 and set(moved.unique().tolist()) == {0, 1, 2}
    agree = (moved == (once > 0.5).to(torch.uint8) + (once > 1.2).to(torch.uint8)).float().mean()
    assert agree > 0.95


def test_rand_in_plane_affine_draws_each_part_with_its_own_probability():
    """Rotation, zoom and shift are drawn as MONAI's three transforms draw them, each with its own
    probability; a slice that draws none is passed through, and the run's summary names the three
    parts as before."""
    from liver_fcn.training import describe_augmentation
    from liver_fcn.transforms import RandInPlaneAffined

    t = RandInPlaneAffined(
        keys=["image", "label"],
        rotate_prob=0.3,
        rotate_range=math.radians(12),
        zoom_prob=0.5,
        zoom_range=(0.85, 1.15),
        translate_prob=0.3,
        translate_range=12.5,
    )
    t.set_random_state(0)
    angles, zooms, shifts, untouched = [], [], [], 0
    for _ in range(4000):
        t.randomize()
        if t.matrix is None:
            untouched += 1
            continue
        m = t.matrix[:2, :2]
        zoom = 1 / math.sqrt(abs(np.linalg.det(m)))
        angles.append(math.atan2(m[1, 0], m[0, 0]))
        zooms.append(zoom)
        shifts.append(np.linalg.solve(m, t.matrix[:2, 2]))
    angles, zooms, shifts = np.array(angles), np.array(zooms), np.abs(np.array(shifts))
    assert untouched / 4000 == pytest.approx(0.7 * 0.5 * 0.7, abs=0.03)
    assert np.mean(np.abs(angles) > 1e-9) * (4000 - untouched) / 4000 == pytest.approx(0.3, abs=0.03)
    assert np.mean(np.abs(zooms - 1) > 1e-9) * (4000 - untouched) / 4000 == pytest.approx(0.5, abs=0.03)
    assert np.mean(shifts.max(axis=1) > 1e-9) * (4000 - untouched) / 4000 == pytest.approx(0.3, abs=0.03)
    assert np.abs(angles).max() <= math.radians(12) + 1e-9 and 0.85 - 1e-9 <= zooms.min() <= zooms.max() <= 1.15 + 1e-9
    assert shifts.max() <= 12.5 + 1e-9
    img, label = _smooth_slice(), torch.zeros(1, 96, 80, dtype=torch.uint8)
    never = RandInPlaneAffined(keys=["image", "label"])
    assert never({"image": img, "label": label})["image"] is img
    out = t({"image": img, "label": label})
    assert out["image"].shape == img.shape and out["label"].dtype == torch.uint8
    summary = "rotate p=0.3 (12.0), zoom p=0.5 ([0.85, 1.15]), translate p=0.3 (12.5 px)"
    assert describe_augmentation(Compose([t])) == summary
    with pytest.raises(ValueError, match="zoom_range"):
        RandInPlaneAffined(keys="image", zoom_range=(0.0, 1.2))


def _batch(n: int = 6, size: int = 48, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, size, size, generator=gen)
    label = (image > 0.5).to(torch.uint8) + (image > 0.8).to(torch.uint8)
    annotated = torch.ones(n, 4, dtype=torch.bool)
    annotated[::2, 2:] = False  # painted slices: bone and kidney unannotated
    return {"image": image, "label": label, "annotated": annotated}


def _per_slice(transform, batch: dict, keys=("image", "label")) -> dict:
    items = [transform({**{k: batch[k][i] for k in keys}, "annotated": batch["annotated"][i]}) for i in range(6)]
    return {k: torch.stack([torch.as_tensor(o[k]).float() for o in items]) for k in keys}


def test_batch_augmentations_are_their_slice_transforms_sample_by_sample():
    """Seeded alike, each batch transform draws and applies, sample by sample, what its slice transform
    draws and applies slice by slice (the same random stream), so the batch stage changes where the
    work runs, not what the network sees."""
    from monai.transforms import AdjustContrast, RandFlipd

    from liver_fcn.transforms import (
        BatchRandAdjustContrastd,
        BatchRandFlipd,
        BatchRandInPlaneAffined,
        ElasticWhenDrawnd,
        PerSampled,
        RandInPlaneAffined,
    )

    kw = dict(keys=["image", "label"], rotate_prob=0.3, rotate_range=0.3, zoom_prob=0.3, zoom_range=(0.8, 1.2))
    kw.update(translate_prob=0.3, translate_range=6.0)
    elastic = dict(keys=["image", "label"], spacing=(16, 16), magnitude_range=(1.0, 3.0), mode=["bilinear", "nearest"])
    pairs = [
        (BatchRandInPlaneAffined(**kw), RandInPlaneAffined(**kw)),
        (
            BatchRandFlipd(keys=["image", "label"], prob=0.5),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        ),
        (
            PerSampled(ElasticWhenDrawnd(prob=0.5, **elastic), keys=["image", "label"]),
            ElasticWhenDrawnd(prob=0.5, **elastic),
        ),
    ]
    for batch_t, slice_t in pairs:
        batch = _batch()
        batch_t.set_random_state(7)
        slice_t.set_random_state(7)
        ours, theirs = batch_t(dict(batch)), _per_slice(slice_t, batch)
        changed = [not torch.equal(ours["image"][i], batch["image"][i]) for i in range(6)]
        assert 0 < sum(changed) < 6, type(batch_t).__name__  # some samples drawn, some not
        assert torch.allclose(ours["image"].float(), theirs["image"], atol=1e-5), type(batch_t).__name__
        assert ours["label"].dtype == torch.uint8 and torch.equal(ours["label"].float(), theirs["label"])
    # MONAI's RandAdjustContrastd draws its gamma from a second random stream: the same distribution,
    # checked as MONAI's AdjustContrast with each sample's drawn gamma
    gamma, batch = BatchRandAdjustContrastd(keys="image", prob=0.5, gamma=(0.7, 1.5)), _batch()
    gamma.set_random_state(2)
    out = gamma(dict(batch))["image"]
    assert 0 < sum(g is not None for g in gamma.gammas) < 6
    for i, g in enumerate(gamma.gammas):
        expected = batch["image"][i] if g is None else torch.as_tensor(AdjustContrast(g)(batch["image"][i]))
        assert 0.7 <= (g or 0.7) <= 1.5 and torch.allclose(out[i], expected, atol=1e-6)


def test_the_batch_crop_cuts_the_windows_monais_crop_cuts_from_the_same_seed():
    """``BatchRandSpatialCropd`` draws each sample's window as MONAI's ``RandSpatialCropd`` draws one
    image's (same seed, same places, image and label alike); an axis asked for whole (-1) or longer
    than the slice stays whole; slices of another rank, or keys of different sizes, are refused."""
    from monai.transforms import RandSpatialCropd

    from liver_fcn.transforms import BatchRandSpatialCropd

    for roi in ([32, 24], [-1, 20], [64, 40]):
        batch = _batch()
        ours, theirs = (
            BatchRandSpatialCropd(keys=["image", "label"], roi_size=roi),
            RandSpatialCropd(keys=["image", "label"], roi_size=roi, random_size=False),
        )
        ours.set_random_state(5)
        theirs.set_random_state(5)
        cut, expected = ours(dict(batch)), _per_slice(theirs, batch)
        assert cut["image"].shape == expected["image"].shape == (6, 1, *ours.window((48, 48)))
        assert torch.equal(cut["image"], expected["image"]) and torch.equal(cut["label"].float(), expected["label"])
        assert cut["label"].dtype == torch.uint8 and torch.equal(cut["annotated"], batch["annotated"])
        if roi == [32, 24]:
            assert len(set(ours.corners)) > 1  # each sample its own place
    with pytest.raises(ValueError, match=r"roi_size \[32\] does not match slices of size \[48, 48\]"):
        BatchRandSpatialCropd(keys=["image", "label"], roi_size=[32])(dict(_batch()))
    uneven = {**_batch(), "label": torch.zeros(6, 1, 40, 48, dtype=torch.uint8)}
    with pytest.raises(ValueError, match=r"'label' has slices of size \[40, 48\], 'image' \[48, 48\]"):
        BatchRandSpatialCropd(keys=["image", "label"], roi_size=[32, 24])(uneven)


def test_partial_label_encoding_of_a_batch_is_each_samples_own():
    from liver_fcn.transforms import EncodePartialLabeld

    batch, encode = _batch(), EncodePartialLabeld(keys="label", num_classes=4)
    items = [encode({"label": batch["label"][i], "annotated": batch["annotated"][i]})["label"] for i in range(6)]
    assert torch.equal(encode(dict(batch))["label"], torch.stack(items))
    encoded = encode(dict(batch))["label"]
    assert encoded[1].max() <= 3 and (encoded[0] == 4 * 0b1100).any()  # background or bone or kidney


def test_the_bundles_batch_stage_seeded_by_torch_and_plain_when_nothing_is_drawn():
    """train.json's batch stage (``AugmentedBatch`` as the trainer's ``prepare_batch``): with every
    random part off it gives what the slice chain's centring, encoding and types gave each slice;
    with them on, two trainers seeded alike draw alike."""
    from monai.bundle import ConfigParser

    train_json = str(Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json")
    parser = ConfigParser()
    parser.read_config(train_json)
    for key in ("rotate_prob", "zoom_prob", "translate_prob", "elastic_prob", "flip_prob", "gamma_prob"):
        parser[key] = 0.0
    prepare = parser.get_parsed_content("train#prepare_batch", instantiate=True)
    batch = _batch()
    image, label = prepare(dict(batch), torch.device("cpu"))
    centre, encode = parser.get_parsed_content("train#centre"), parser.get_parsed_content("train#encode_label")
    for i in range(6):
        item = encode(
            centre({"image": batch["image"][i], "label": batch["label"][i], "annotated": batch["annotated"][i]})
        )
        assert torch.equal(image[i], torch.as_tensor(item["image"]).float()) and torch.equal(label[i], item["label"])
    assert image.dtype == torch.float32 and label.dtype == torch.long and type(image) is torch.Tensor
    drawn = []
    for _ in range(2):
        parser = ConfigParser()
        parser.read_config(train_json)
        torch.manual_seed(3)
        drawn.append(parser.get_parsed_content("train#prepare_batch", instantiate=True)(dict(batch), "cpu")[0])
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], image)


def test_the_training_crop_takes_a_window_of_each_sample_and_is_in_the_run_summary():
    """``train_crop`` [X, Y]: after the geometric augmentation each sample of the batch keeps a window
    of that size at its own random place (the network is fully convolutional: inference still runs on
    the whole grid); null (the default) keeps the whole field. The run's augmentation summary names it."""
    from monai.bundle import ConfigParser

    from liver_fcn.training import describe_augmentation

    train_json = str(Path(__file__).resolve().parents[1] / "bundle" / "configs" / "train.json")
    batch = _batch()
    outputs = {}
    for crop in (None, [32, 24]):
        parser = ConfigParser()
        parser.read_config(train_json)
        for key in ("rotate_prob", "zoom_prob", "translate_prob", "elastic_prob", "flip_prob", "gamma_prob"):
            parser[key] = 0.0
        parser["train_crop"] = crop
        torch.manual_seed(0)
        prepare = parser.get_parsed_content("train#prepare_batch", instantiate=True)
        outputs[str(crop)] = prepare(dict(batch), torch.device("cpu"))
        summary = describe_augmentation(prepare.augmentation)
        assert ("crop p=1 (32 x 24 px)" in summary) == (crop is not None), summary
    (full, full_label), (cut, cut_label) = outputs["None"], outputs["[32, 24]"]
    assert cut.shape == (*full.shape[:2], 32, 24) and cut_label.shape == (*full_label.shape[:2], 32, 24)
    places = set()
    for i in range(full.shape[0]):  # each sample's window is a window of that sample, image and label alike
        hits = [
            (x, y)
            for x in range(full.shape[2] - 31)
            for y in range(full.shape[3] - 23)
            if torch.equal(full[i, :, x : x + 32, y : y + 24], cut[i])
            and torch.equal(full_label[i, :, x : x + 32, y : y + 24], cut_label[i])
        ]
        assert hits, f"sample {i}: its crop is no window of it"
        places.add(hits[0])
    assert len(places) > 1  # drawn sample by sample
