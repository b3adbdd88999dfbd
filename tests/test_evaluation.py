"""SLIVER07-style metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

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
