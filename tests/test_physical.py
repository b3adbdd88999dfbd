"""Physical-space preprocessing, scanner simulation, post-processing, the Dice + CE loss, the schedule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from liver_fcn.losses import PartialLabelCrossEntropyLoss, PartialLabelDiceCELoss, annotated_classes
from liver_fcn.training import augmentation_summary, warmup_decay_schedule
from liver_fcn.transforms import (
    AdjacentSlicesd,
    CountComponentsd,
    FillHolesSlicewised,
    InPlaneResampled,
    KeepLargestComponentsd,
    ResampleToInputd,
    SimulateScannerd,
    body_mask,
    class_map_on_input_grid,
    grid_size,
    voxel_spacing,
)

from .conftest import REPO

CONFIGS = REPO / "bundle" / "configs"


def meta(arr, spacing=(1.0, 1.0, 1.0)) -> MetaTensor:
    return MetaTensor(torch.as_tensor(arr), affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


def test_grid_size_rounds_a_field_of_view_up_to_the_stride():
    assert grid_size(409.6, 1.6) == 256 and grid_size(409.6, 0.8) == 512
    assert grid_size(400, 1.5) == 288  # 266.7 pixels -> 288
    with pytest.raises(ValueError):
        grid_size(400, 0)


def test_body_mask_keeps_the_largest_region_above_the_threshold():
    img = np.full((1, 40, 40, 3), -1000.0)
    img[0, 5:30, 5:30] = 40  # body
    img[0, 35:38, 2:38] = 200  # table, separated by air
    img[0, 1, 1] = 500  # a speck
    m = body_mask(torch.as_tensor(img)).numpy()
    assert m.shape == img.shape and m[0, 5:30, 5:30].all()
    assert not m[0, 35:38].any() and not m[0, 1, 1].any()
    assert not body_mask(torch.full((1, 4, 4, 2), -1000.0)).any()


def world(affine: torch.Tensor, shape) -> torch.Tensor:
    """World (x, y, z) of every voxel centre of a grid: (3, *shape)."""
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"))
    flat = torch.cat([idx.reshape(3, -1), torch.ones(1, idx[0].numel(), dtype=torch.float64)])
    return (affine.to(torch.float64) @ flat)[:3].reshape(3, *shape)


@pytest.mark.parametrize("spacing, target", [((0.6, 0.7, 2.0), 1.5), ((1.6, 1.6, 5.0), 0.8)])
def test_in_plane_resampling_puts_values_where_the_new_affine_says(spacing, target):
    # a linear ramp in world mm (bilinear interpolation reproduces it exactly away from the edges)
    affine = torch.tensor(
        [[-spacing[0], 0, 0, 30.0], [0, spacing[1], 0, -20.0], [0, 0, spacing[2], 5.0], [0, 0, 0, 1]],
        dtype=torch.float64,
    )
    shape = (60, 50, 4)
    w = world(affine, shape)
    ramp = (0.5 * w[0] - 0.25 * w[1] + w[2]).float()
    out = InPlaneResampled("image", pixel_spacing=target)({"image": MetaTensor(ramp[None], affine=affine)})["image"]
    assert voxel_spacing(out).tolist() == pytest.approx([target, target, spacing[2]])
    assert out.shape[-1] == 4 and out.shape[1] == int(60 * spacing[0] / target + 1e-6)
    expected = (lambda v: 0.5 * v[0] - 0.25 * v[1] + v[2])(world(out.affine, out.shape[1:]))
    inner = (slice(3, -3), slice(3, -3), slice(None))
    # PyTorch cuts its anti-aliasing window at whole input pixels: a bias of a few hundredths of a pixel
    atol = 0.03 if target > max(spacing[:2]) else 1e-3
    assert torch.allclose(out[0][inner].double(), expected[inner], atol=atol)
    # a class map keeps its values (nearest), the slices are never touched
    lab = torch.zeros(1, *shape, dtype=torch.uint8)
    lab[0, 20:40, 10:30, 1] = 2
    res = InPlaneResampled(["image", "label"], target, mode=["bilinear", "nearest"])(
        {"image": MetaTensor(ramp[None], affine=affine), "label": MetaTensor(lab, affine=affine)}
    )
    assert res["label"].dtype == torch.uint8 and set(res["label"].unique().tolist()) == {0, 2}
    assert res["label"][..., [0, 2, 3]].sum() == 0 and torch.equal(res["label"].affine, res["image"].affine)


def test_in_plane_resampling_anti_aliases_when_downsampling_only():
    stripes = torch.zeros(1, 64, 64, 2)
    stripes[0, ::2] = 1.0  # the finest pattern a grid holds: must average out, not alias
    down = InPlaneResampled("image", pixel_spacing=2.0)({"image": meta(stripes, (0.5, 0.5, 3.0))})["image"]
    assert (
        down.shape == (1, 16, 16, 2) and float(down.std()) < 0.02 and float(down.mean()) == pytest.approx(0.5, abs=0.02)
    )
    same = {"image": meta(stripes, (1.0, 1.0, 3.0))}
    assert InPlaneResampled("image", pixel_spacing=1.0)(same)["image"] is same["image"]


def input_and_network_grid(axes=(0, 1, 2), flips=(False, False, False)):
    """A CT-like grid (optionally with permuted, flipped axes) and the network grid the pipeline's
    geometry makes of it (RAS, 1.5 mm, body box, padded to the stride)."""
    from monai.transforms import CenterSpatialCropd, Compose, CropForegroundd, DivisiblePadd, Orientationd

    spacing = torch.tensor([0.7, 0.8, 2.5], dtype=torch.float64)
    lin = torch.diag(torch.cat([spacing, torch.ones(1, dtype=torch.float64)]))
    lin[:3, 3] = torch.tensor([-90.0, -100.0, -40.0])
    shape = [256, 240, 20]
    perm = torch.eye(4, dtype=torch.float64)[list(axes) + [3]].T  # input axis i runs along world axis axes[i]
    aff = lin @ perm
    shape = [shape[a] for a in axes]
    for i, f in enumerate(flips):
        if f:
            flip = torch.eye(4, dtype=torch.float64)
            flip[i, i], flip[i, 3] = -1.0, shape[i] - 1
            aff = aff @ flip
    w = world(aff, shape)
    body = ((w[0] / 70) ** 2 + (w[1] / 55) ** 2 < 1).float()
    ct = MetaTensor((body * 1040 - 1000)[None].float(), affine=aff)
    pre = Compose(
        [
            Orientationd("image", axcodes="RAS"),
            InPlaneResampled("image", pixel_spacing=1.5),
            CropForegroundd("image", source_key="image", select_fn=body_mask),
            CenterSpatialCropd("image", roi_size=[256, 256, -1]),
            DivisiblePadd("image", k=[32, 32, 1], mode="constant", value=-1024),
        ]
    )({"image": ct})["image"]
    return ct, pre


@pytest.mark.parametrize(
    "axes, flips",
    [((0, 1, 2), (False, False, False)), ((0, 1, 2), (True, True, False)), ((2, 0, 1), (False, True, True))],
)
def test_class_map_comes_back_onto_the_input_grid_from_the_affines(axes, flips):
    ct, pre = input_and_network_grid(axes, flips)
    # logits that say "liver where world x > 10 mm, kidney where world y > 20 mm", on the network grid
    w = world(pre.affine, pre.shape[1:])
    logits = torch.zeros(4, *pre.shape[1:])
    logits[1] = 4.0 * (w[0] > 10).float()
    logits[3] = 8.0 * (w[1] > 20).float()
    out = ResampleToInputd("pred", ref_key="ct", chunk=7)({"pred": logits, "image": pre, "ct": ct})["pred"]
    assert out.shape == ct.shape and out.dtype == torch.uint8 and torch.equal(out.affine, ct.affine)
    wi = world(ct.affine, ct.shape[1:])
    expected = torch.zeros(ct.shape[1:], dtype=torch.uint8)
    expected[wi[0] > 10] = 1
    expected[wi[1] > 20] = 3
    covered = torch.zeros_like(expected, dtype=torch.bool)  # what the network grid covers of the input
    lo, hi = world(pre.affine, [2, 2, 2]), world(pre.affine, [pre.shape[1], pre.shape[2], 2])
    covered = (
        (wi[0] >= lo[0].min() + 1)
        & (wi[0] <= hi[0].max() - 2)
        & (wi[1] >= lo[1].min() + 1)
        & (wi[1] <= hi[1].max() - 2)
    )
    near = (wi[0] - 10).abs().lt(2) | (wi[1] - 20).abs().lt(2)  # interpolation decides at the boundaries
    agree = (out[0] == expected)[covered & ~near]
    assert agree.float().mean() == 1.0
    assert (
        out[0][~covered & ((wi[0] < lo[0].min() - 2) | (wi[0] > hi[0].max() + 2))] == 0
    ).all()  # outside: background


def test_class_map_matches_monai_invertd_of_the_probabilities():
    from monai.transforms import Compose, CropForegroundd, DivisiblePadd, Invertd, Orientationd, Spacingd

    ct, _ = input_and_network_grid((0, 1, 2), (True, False, False))
    pre_t = Compose(
        [
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=[1.5, 1.5, -1]),
            CropForegroundd("image", source_key="image", select_fn=body_mask),
            DivisiblePadd("image", k=[32, 32, 1], mode="constant", value=-1024),
        ]
    )
    d = pre_t({"image": ct.clone()})
    pre = d["image"]
    torch.manual_seed(0)
    smooth = torch.nn.functional.avg_pool3d(torch.randn(1, 4, *pre.shape[1:]), 9, 1, 4)[0] * 30
    ours = class_map_on_input_grid(smooth, pre.affine, ct.affine, ct.shape[1:], chunk=5)
    probs = torch.softmax(smooth, 0)[1:]
    inv = Invertd("pred", transform=pre_t, orig_keys="image", nearest_interp=False)(
        {"pred": MetaTensor(probs, meta=dict(pre.meta), applied_operations=list(pre.applied_operations)), "image": pre}
    )["pred"]
    theirs = torch.cat([1 - inv.sum(0, keepdim=True), inv]).argmax(0)
    # Invertd undoes the pad to the stride by dropping what the network said there (it reads as
    # background); ResampleToInputd keeps it, as those voxels are the input's too: compare the rest
    inside = inv.sum(0) > 0
    edge = torch.nn.functional.max_pool3d((~inside).float()[None, None], (7, 7, 1), 1, (3, 3, 0))[0, 0] > 0
    inside &= ~edge  # near the edge of the crop, Invertd's resampling blends in its zero padding
    assert inside.float().mean() > 0.3
    assert (ours == theirs)[inside].float().mean() > 0.995  # they differ only where two classes tie within rounding


def test_keep_largest_components_matches_monai_on_the_bounding_box():
    from monai.transforms import KeepLargestConnectedComponentd

    rng = np.random.default_rng(0)
    lab = np.zeros((1, 60, 50, 20), np.uint8)
    lab[0, 10:40, 10:30, 5:15] = 1
    lab[0, 45:50, 40:45, 2:4] = 1  # a smaller liver piece: removed
    for _ in range(20):
        x, y, z = rng.integers(0, 55), rng.integers(0, 45), rng.integers(0, 18)
        lab[0, x : x + 3, y : y + 3, z : z + 2] = 3
    t = torch.as_tensor(lab)
    for labels, n in (([1], 1), ([3], 2), ([3], 5)):  # 5: more kept than compared one by one
        ours = KeepLargestComponentsd("pred", applied_labels=labels, num_components=n)({"pred": t})["pred"]
        theirs = KeepLargestConnectedComponentd("pred", applied_labels=labels, independent=True, num_components=n)(
            {"pred": t.clone()}  # MONAI's changes its input in place
        )["pred"]
        assert torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))
    # asked to, it records the components' sizes before the clean-up, as CountComponentsd does
    recorded = KeepLargestComponentsd("pred", applied_labels=[1, 3], sizes_key="sizes", min_ml=0.01)({"pred": t})
    for label in (1, 3):
        counted = CountComponentsd("pred", label=label, min_ml=0.01, out_key="sizes")({"pred": t})["sizes"]
        assert recorded["sizes"][str(label)] == counted[str(label)]
    assert recorded["sizes"]["1"] == pytest.approx([5.964, 0.05])  # 1 mm voxels: the block less kidney, the piece
    assert recorded["sizes"]["3"] == pytest.approx([0.018] * 20)  # twenty 3 x 3 x 2 kidney blocks
    assert torch.equal(t, torch.as_tensor(lab))  # the input is not changed


def test_clean_up_functions_work_on_plain_arrays_of_any_dimension():
    """The array functions under the dictionary transforms: a 2D class map, no channel, no metadata."""
    from liver_fcn.transforms import component_sizes_ml, fill_holes_slicewise, keep_largest_components

    slice_ = np.zeros((20, 20), np.uint8)
    slice_[2:10, 2:10], slice_[14:16, 14:16], slice_[12:18, 2:4] = 1, 1, 3
    slice_[5, 5] = 0  # a hole
    kept = keep_largest_components(slice_, [1])
    assert kept[14:16, 14:16].sum() == 0 and kept[2:10, 2:10].sum() == 63 and (kept == 3).sum() == 12
    assert slice_[14, 14] == 1  # the input is not changed
    assert component_sizes_ml(slice_, 1, (10.0, 10.0)) == pytest.approx([6.3, 0.4])  # 100 mm^2 pixels: 0.1 mL each
    filled = fill_holes_slicewise(slice_[..., None], [1], axis=-1)[..., 0]
    assert filled[5, 5] == 1 and slice_[5, 5] == 0


def test_slicewise_hole_filling_on_the_box_equals_filling_every_whole_slice():
    """Blobby class maps with holes, labels touching the array's edges, every axis: the box-wise
    filling is scipy's filling of each whole slice, voxels of other classes left alone."""
    from scipy import ndimage

    from liver_fcn.transforms import fill_holes_slicewise

    rng = np.random.default_rng(5)
    for trial in range(4):
        noise = ndimage.gaussian_filter(rng.normal(size=(30, 26, 22)), 2.0)
        classes = np.digitize(noise, np.quantile(noise, [0.45, 0.75, 0.9])).astype(np.uint8)  # 0..3
        classes[rng.random(classes.shape) < 0.03] = 0  # pinholes
        for axis in range(3):
            want = classes.copy()
            for label in (1, 3):
                for k in range(classes.shape[axis]):
                    sl = np.take(classes, k, axis=axis)
                    filled = ndimage.binary_fill_holes(sl == label) & (sl == 0)
                    target = np.moveaxis(want, axis, 0)[k]
                    target[filled] = label
            got = fill_holes_slicewise(classes, [1, 3], axis=axis - 3 if trial % 2 else axis)
            assert np.array_equal(got, want), (trial, axis)
            assert (got != classes).any()  # holes were there to fill


def test_adjacent_slices_at_a_distance_in_mm_whatever_the_slice_spacing():
    def volume(spacing):
        z = torch.arange(12, dtype=torch.float32) * spacing  # each slice holds its height in mm
        return meta(z.view(1, 1, 1, -1).expand(1, 2, 2, 12).clone(), (1.0, 1.0, spacing))

    for spacing in (1.25, 2.5, 5.0):
        out = AdjacentSlicesd("image", channels=3, distance=5.0)({"image": volume(spacing)})["image"]
        assert out.shape == (3, 2, 2, 12) and isinstance(out, MetaTensor)
        k = 6  # an inner slice: its neighbours are exactly 5 mm below and above
        assert out[:, 0, 0, k].tolist() == pytest.approx([k * spacing - 5, k * spacing, k * spacing + 5])
    # between native slices: linear interpolation; at the ends: the end slice repeated
    out = AdjacentSlicesd("image", channels=3, distance=3.0)({"image": volume(2.0)})["image"]
    assert out[2, 0, 0, 4].item() == pytest.approx(11.0) and out[0, 0, 0, 0].item() == 0.0
    with pytest.raises(ValueError, match="positive"):
        AdjacentSlicesd("image", channels=3, distance=0)


def test_fill_holes_fills_enclosed_background_of_the_liver_slice_by_slice_only():
    lab = np.zeros((1, 12, 12, 3), np.uint8)
    lab[0, 2:10, 2:10, :] = 1
    lab[0, 5:7, 5:7, 1] = 0  # a vessel enclosed by liver in slice 1
    lab[0, 4, 4, 0] = 2  # bone inside the liver: not background, kept
    lab[0, 5:7, 0:7, 2] = 0  # a notch open to the outside: kept
    out = FillHolesSlicewised("pred", applied_labels=[1])({"pred": torch.as_tensor(lab)})["pred"].numpy()
    assert (out[0, 5:7, 5:7, 1] == 1).all()
    assert out[0, 4, 4, 0] == 2 and (out[0, 5:7, 0:2, 2] == 0).all()


def test_scanner_simulation_averages_slabs_and_pixels_and_moves_the_grid_consistently():
    ct = np.full((1, 40, 30, 16), -1000.0, np.float32)
    lab = np.zeros((1, 40, 30, 16), np.uint8)
    ct[0, 10:30, 6:24, 4:12] = 60.0
    lab[0, 10:30, 6:24, 4:12] = 1
    affine = torch.tensor(
        [[-0.75, 0, 0, 100.0], [0, -0.75, 0, 50.0], [0, 0, 1.5, -300.0], [0, 0, 0, 1]], dtype=torch.float64
    )
    d = {
        "image": MetaTensor(torch.as_tensor(ct), affine=affine),
        "label": MetaTensor(torch.as_tensor(lab), affine=affine),
        "patient": "p1",
        "condition": "shifted",
    }
    sim = SimulateScannerd(("image", "label"), slab_mm=3.0, pixel_mm=1.5, noise_hu=20.0, offset_hu=40.0)
    out = sim(d)
    img, ref = out["image"], out["label"]
    assert img.shape == ref.shape == (1, 20, 15, 8)
    assert voxel_spacing(img).tolist() == pytest.approx([1.5, 1.5, 3.0])
    # the first new voxel is centred between the first two old ones: same body, new grid
    old_centre = (affine @ torch.tensor([0.5, 0.5, 0.5, 1.0], dtype=torch.float64))[:3]
    assert img.affine[:3, 3].tolist() == pytest.approx(old_centre.tolist())
    inside = img[0][ref[0] == 1]
    assert inside.mean().item() == pytest.approx(100.0, abs=3.0)  # 60 HU + 40 HU offset
    assert inside.std().item() == pytest.approx(20.0, abs=3.0)
    assert int(ref.sum()) == 10 * 9 * 4  # 20 x 18 x 8 voxels become 10 x 9 x 4
    assert torch.equal(sim(d)["image"], img)  # seeded by the patient: the same score every time
    clean = sim({**d, "condition": "clean"})
    assert clean["image"] is d["image"]


def test_dice_ce_is_ce_plus_soft_dice_over_annotated_classes_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 6, 6))
    target[1][target[1] == 0] += 4 * 8  # sample 1: no kidney masks (bit 3 on its background pixels)
    assert annotated_classes(target, 4).tolist() == [[True] * 4, [True, True, True, False]]
    ce = PartialLabelCrossEntropyLoss(4)(logits, target)
    assert torch.allclose(PartialLabelDiceCELoss(4, dice_weight=0.0)(logits, target), ce)
    loss = PartialLabelDiceCELoss(4, dice_weight=1.0, smooth=0.0)
    probs = torch.softmax(logits, 1)
    cls = target[:, 0] % 4
    dices = []
    for c in (1, 2, 3):
        samples = [0, 1] if c < 3 else [0]  # the kidney Dice only counts sample 0
        inter = sum((probs[n, c] * (cls[n] == c)).sum() for n in samples)
        denom = sum(probs[n, c].sum() + (cls[n] == c).sum() for n in samples)
        dices.append(2 * inter / denom)
    expected = ce + 1 - torch.stack(dices).mean()
    assert torch.allclose(loss(logits, target), expected, atol=1e-5)
    (want,) = torch.autograd.grad(expected, logits)
    loss(logits, target).backward()
    assert torch.allclose(logits.grad, want, atol=1e-6)


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_dice_ce_of_a_fully_annotated_batch_is_plain_cross_entropy_plus_dice_to_the_gradient(dice_weight):
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (3, 1, 8, 8))
    probs, onehot = torch.softmax(logits, 1), F.one_hot(target[:, 0], 4).movedim(-1, 1).float()
    dice = (2 * (probs * onehot).sum((0, 2, 3)) + 1) / ((probs + onehot).sum((0, 2, 3)) + 1)
    expected = F.cross_entropy(logits, target[:, 0]) + dice_weight * (1 - dice[1:].mean())
    (want,) = torch.autograd.grad(expected, logits)
    got = PartialLabelDiceCELoss(4, dice_weight=dice_weight)(logits, target)
    got.backward()
    assert torch.allclose(got, expected, atol=1e-6) and torch.allclose(logits.grad, want, atol=1e-7)


def test_schedule_warms_up_then_decays_to_the_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_decay_schedule(opt, total_iterations=100, warmup_iterations=10, kind="cosine")
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    poly = warmup_decay_schedule(opt2, 100, 0, "poly")
    for _ in range(50):
        opt2.step()
        poly.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.5**0.9)
    assert augmentation_summary({"rotate": (0.3, 12.0), "flip": (0.0, None)}) == "rotate p=0.3 (12.0)"


def test_one_preprocessing_file_serves_training_evaluation_and_inference():
    from monai.bundle import ConfigParser

    from liver_fcn.bundle import Pipeline

    for files in (["train.json"], ["train.json", "evaluate.json"], ["inference.json"]):
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / f) for f in files])
        assert parser["pipeline"]["_target_"] == "liver_fcn.bundle.Pipeline", files
        path = Path(parser.get_parsed_content("pipeline#path"))
        assert path.resolve() == (CONFIGS / "pipeline.json").resolve(), files
        # the model settings come as one object: train.json's own, for evaluation and inference the checkpoint's
        model = parser["pipeline"]["model"]
        model = parser["model_settings"] if model == "@model_settings" else model
        if files == ["train.json"]:
            assert model["pixel_spacing"] == "@pixel_spacing" and model["variant"].endswith("variant")
        else:
            assert model == "@settings" and "checkpoint_settings(@model_file)" in parser["settings"], files
    settings = dict(
        class_names=["background", "liver", "bone", "kidney"],
        pixel_spacing=1.6,
        image_size=256,
        in_channels=3,
        slice_distance=2.5,
        hu_window=[-250, 450],
        intensity_mean=0.19,
    )
    pipeline = Pipeline(CONFIGS / "pipeline.json", model={**settings, "variant": "8s", "width": 0.125})
    names = lambda chain: [type(t).__name__ for t in chain]  # noqa: E731
    assert names(pipeline["geometry"]) == names(pipeline.chain("resample", "field_of_view", "context"))
    assert names(pipeline["inference"]) == [
        "CopyItemsd",
        "LoadCTd",
        "CopyAsTyped",
        "Orientationd",
        "InPlaneResampled",
        "CropForegroundd",
        "BorderPadd",
        "CenterSpatialCropd",
        "DivisiblePadd",
        "AdjacentSlicesd",
        "ScaleIntensityRanged",
        "ShiftIntensityd",
        "EnsureTyped",
    ]
    assert pipeline["window"][0].scaler.a_min == -250 and pipeline["context"][0].context == 1
    field_of_view = Pipeline(CONFIGS / "pipeline.json", model=settings, body_only="false", postprocess=False)
    assert field_of_view["window"][0].scaler.a_min == -250
    narrow = Pipeline(CONFIGS / "pipeline.json", model=settings, hu_window=[-100, 200])  # a setting overrides
    assert narrow["window"][0].scaler.a_min == -100
    assert "ResizeWithPadOrCropd" in names(field_of_view["network_input"]) and field_of_view["cleanup"] == []
    with pytest.raises(KeyError, match="defines no chain 'augment'"):
        pipeline["augment"]
    for f in ("train.json", "evaluate.json", "inference.json"):  # nobody restates a transform of the chain
        text = (CONFIGS / f).read_text()
        for target in (
            "InPlaneResampled",
            "CropForegroundd",
            "ResizeWithPadOrCropd",
            "DivisiblePadd",
            "ScaleIntensityRanged",
            "Orientationd",
            "KeepLargestComponentsd",
            "Invertd",
            "Spacingd",
        ):
            assert target not in text, (f, target)


def test_precision_auto_follows_the_cpu_and_trains_in_bf16():
    from pathlib import Path

    from liver_fcn.inference import Precision, native_bf16, resolve_precision
    from liver_fcn.networks import FCN

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert native_bf16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16("cpu") else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    torch.manual_seed(0)
    net = Precision(FCN("8s", 1, 4, width=1 / 16), "bf16", channels_last=True)
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 4, (2, 1, 64, 64))
    out = net(x)
    assert out.dtype == torch.float32 and out.shape == (2, 4, 64, 64)
    PartialLabelDiceCELoss(4)(out, y).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert list(net.state_dict())[0].startswith("net.")  # the wrapper adds no parameter of its own
    assert set(net.net.state_dict()) == {k[len("net.") :] for k in net.state_dict()}


@pytest.mark.parametrize("variant", ["32s", "16s", "8s", "4s"])
def test_bf16_training_gradients_agree_with_fp32(variant):
    """Under bf16 autocast every parameter's gradient points where the fp32 one does.

    Guards against wrong low-precision kernels: the CPU's bf16 transposed convolution with a kernel of
    16 or more gives input gradients at cosine ~0.2 to the true ones, which silently ruins training.
    """
    import copy

    from liver_fcn.inference import Precision
    from liver_fcn.networks import FCN

    torch.manual_seed(0)
    base = FCN(variant, 1, 4, width=1 / 16).eval()  # eval: no dropout, the two passes see one network
    with torch.no_grad():  # score layers start at zero; give the backbone a gradient to compare
        for name, p in base.named_parameters():
            if name.startswith("score_"):
                p.normal_(0, 0.05)
    x, y = torch.randn(2, 1, 96, 96), torch.randint(0, 4, (2, 1, 96, 96))
    grads = {}
    for precision in ("fp32", "bf16"):
        net = copy.deepcopy(base)
        PartialLabelDiceCELoss(4)(Precision(net, precision, channels_last=True)(x), y).backward()
        grads[precision] = {k: p.grad.flatten() for k, p in net.named_parameters() if p.grad is not None}
    assert grads["fp32"].keys() == grads["bf16"].keys() and len(grads["fp32"]) > 20
    for k, g in grads["fp32"].items():
        cos = torch.nn.functional.cosine_similarity(g, grads["bf16"][k], dim=0).item()
        ratio = (grads["bf16"][k].norm() / g.norm()).item()
        assert cos > 0.95 and 0.8 < ratio < 1.25, (variant, k, cos, ratio)


def test_cpu_and_quick_recipes_change_the_budget_not_the_method():
    from monai.bundle import ConfigParser

    train = json.loads((CONFIGS / "train.json").read_text())
    for name in ("cpu.json", "quick.json"):
        overrides = json.loads((CONFIGS / name).read_text())
        # sizes, budget and loader settings only: the preprocessing chain, loss and augmentation stay
        assert set(overrides) <= {
            "width",
            "pixel_spacing",
            "iterations",
            "epoch_length",
            "warmup_iterations",
            "batch_size",
            "train_crop",
            "learning_rate",
            "num_workers",
            "cache_workers",
            "val_slice_batch",
        }, name
        assert all(k in train for k in overrides), name
        parser = ConfigParser()
        parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / name)])
        assert parser.get_parsed_content("image_size") == 256  # 409.6 mm at 1.6 mm


def test_interpolation_along_the_slices_picks_whole_indices_and_mixes_fractional_ones():
    """Whole slice indices (the pipeline's native slices, in either direction) pick the slices
    themselves; fractional ones mix the two neighbours; beyond half a slice past the ends: zero."""
    from liver_fcn.transforms.inversion import _lerp_along

    t = torch.rand(2, 3, 4, 7)
    assert torch.equal(_lerp_along(t, torch.arange(2, 6, dtype=torch.float64), 3), t[..., 2:6])
    assert torch.equal(_lerp_along(t, torch.arange(6, -1, -1, dtype=torch.float64), 3), t.flip(3))
    assert torch.equal(_lerp_along(t, torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64), 3), t[..., [1, 1, 4]])
    out = _lerp_along(t, torch.tensor([0.25, 5.5, -0.4, 6.6], dtype=torch.float64), 3)
    assert torch.allclose(out[..., 0], 0.75 * t[..., 0] + 0.25 * t[..., 1])
    assert torch.allclose(out[..., 1], 0.5 * t[..., 5] + 0.5 * t[..., 6])
    assert torch.equal(out[..., 2], t[..., 0]) and not out[..., 3].any()  # the end slice's half; beyond it


def test_class_map_is_the_argmax_of_the_interpolated_probabilities_where_foreground_is_sparse():
    """Foreground in a few blobs of a few slices (most of the volume certainly background, which
    ``class_map_on_input_grid`` does not interpolate): every input voxel still gets the argmax of
    the probabilities interpolated (trilinear, border) at its place on the network's grid, computed
    here independently with scipy."""
    from scipy.ndimage import map_coordinates

    torch.manual_seed(1)
    shape = (30, 26, 10)
    logits = torch.zeros(4, *shape)
    logits[0] = 6.0  # background everywhere ...
    for c, (x, y, z) in zip((1, 2, 3), ((5, 6, 2), (22, 18, 5), (14, 3, 8))):
        logits[c, x - 3 : x + 4, y - 3 : y + 4, z - 1 : z + 2] = 9.0 + 3 * torch.rand(7, 7, 3)  # ... but blobs
    pre = torch.tensor([[2.0, 0, 0, -3.0], [0, 2.0, 0, 4.0], [0, 0, 3.0, 1.5], [0, 0, 0, 1]], dtype=torch.float64)
    inp = torch.diag(torch.tensor([0.8, 0.9, 1.5, 1.0], dtype=torch.float64))
    in_shape = (80, 64, 24)
    ours = class_map_on_input_grid(logits, pre, inp, in_shape, chunk=4).numpy()

    index = np.stack(np.meshgrid(*[np.arange(n) for n in in_shape], indexing="ij"), 0).reshape(3, -1)
    where = (np.linalg.inv(pre.numpy()) @ inp.numpy() @ np.vstack([index, np.ones(index.shape[1])]))[:3]
    prob = torch.softmax(logits, 0).numpy()
    fg = np.stack([map_coordinates(prob[c], where, order=1, mode="nearest") for c in (1, 2, 3)])
    expected = np.argmax(np.vstack([1 - fg.sum(0, keepdims=True), fg]), 0)
    outside = ((where <= -0.5) | (where >= np.array(shape)[:, None] - 0.5)).any(0)  # a half voxel beyond the ends
    expected[outside] = 0
    expected = expected.reshape(in_shape)
    assert {1, 2, 3} <= set(np.unique(ours)) and (ours == 0).mean() > 0.9
    assert (ours == expected).mean() > 0.9999, np.argwhere(ours != expected)[:5]


def test_a_typed_copy_is_monais_copy_then_cast_with_its_own_metadata():
    from monai.data import MetaTensor
    from monai.transforms import CastToTyped, CopyItemsd

    from liver_fcn.transforms import CopyAsTyped

    hu = MetaTensor(torch.randn(1, 6, 5, 4) * 400, affine=torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0])))
    hu.meta["filename_or_obj"] = "series"
    ours = CopyAsTyped("image", names="ct", dtype=torch.int16)({"image": hu})
    theirs = CastToTyped("ct", dtype=torch.int16)(CopyItemsd("image", names="ct")({"image": hu}))
    assert ours["ct"].dtype == torch.int16 and torch.equal(ours["ct"].as_tensor(), theirs["ct"].as_tensor())
    assert torch.equal(ours["ct"].affine, hu.affine) and ours["ct"].meta["filename_or_obj"] == "series"
    assert ours["image"] is hu  # the source is left as it is
    ours["ct"].meta["filename_or_obj"] = "changed"
    ours["ct"].affine[0, 0] = 9.0
    assert hu.meta["filename_or_obj"] == "series" and float(hu.affine[0, 0]) == pytest.approx(0.7)  # nothing shared
    plain = CopyAsTyped(["a", "b"], names=["a16", "b16"])({"a": np.array([1.6, -2.4]), "b": torch.tensor([3.7])})
    assert plain["a16"].dtype == np.int16 and plain["a16"].tolist() == [1, -2] and plain["b16"].dtype == torch.int16
    with pytest.raises(ValueError, match="one name a key"):
        CopyAsTyped(["a", "b"], names="c")
