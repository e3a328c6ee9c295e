"""Metrics against independent references: medpy.metric.binary (dc, hd95) and direct numpy formulas."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from rwkvunet_jax import metrics
from rwkvunet_jax.eval.metrics import dice_hd95, dice_iou, hd95, mean_dice_iou, per_class_dice_hd95

from medpy_reference import medpy_binary, transunet_case  # noqa: E402  (skips without medpy)


def blobs(rng, shape, threshold=0.3, sigma=2.0):
    """Random smooth binary blobs (several components, holes, border contacts)."""
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > threshold * 0.1


@pytest.mark.parametrize("shape", [(37, 53), (9, 24, 31)])
@pytest.mark.parametrize("seed", range(4))
def test_dice_hd95_matches_medpy_on_random_masks(shape, seed):
    rng = np.random.default_rng(seed)
    pred, gt = blobs(rng, shape), blobs(rng, shape)
    assert pred.any() and gt.any()
    d, h = dice_hd95(pred, gt)
    assert d == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-12)
    assert h == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-9)


def test_hd95_matches_medpy_for_small_masks_far_from_the_border():
    # Exercises the bounding-box crop: tiny objects in a large array, far apart.
    pred = np.zeros((80, 90), bool)
    gt = np.zeros((80, 90), bool)
    pred[10:14, 12:15] = True
    gt[50:60, 70:72] = True
    gt[52, 40] = True
    assert hd95(pred, gt) == pytest.approx(medpy_binary.hd95(pred, gt))


def test_hd95_matches_medpy_for_masks_touching_the_border():
    pred = np.zeros((20, 30), bool)
    gt = np.zeros((20, 30), bool)
    pred[:, :12] = True  # touches three sides: the erosion treats outside as background
    gt[5:, 8:30] = True
    assert dice_hd95(pred, gt)[1] == pytest.approx(medpy_binary.hd95(pred, gt))
    full = np.ones((6, 7), bool)
    assert dice_hd95(full, full) == (1.0, pytest.approx(medpy_binary.hd95(full, full)))


@pytest.mark.parametrize("spacing", [(2.5, 0.7, 0.7), 1.5])
def test_hd95_voxelspacing_matches_medpy(spacing):
    rng = np.random.default_rng(11)
    pred, gt = blobs(rng, (8, 20, 22)), blobs(rng, (8, 20, 22))
    expected = medpy_binary.hd95(pred, gt, voxelspacing=spacing)
    assert dice_hd95(pred, gt, voxelspacing=spacing)[1] == pytest.approx(expected)


def test_connectivity_2_matches_medpy():
    rng = np.random.default_rng(3)
    pred, gt = blobs(rng, (30, 30)), blobs(rng, (30, 30))
    assert hd95(pred, gt, connectivity=2) == pytest.approx(medpy_binary.hd95(pred, gt, connectivity=2))
    assert hd95(pred, gt, connectivity=2) != pytest.approx(hd95(pred, gt, connectivity=1))


def test_dice_hd95_conventions_for_empty_masks():
    empty = np.zeros((10, 10), np.uint8)
    some = empty.copy()
    some[2:5, 3:7] = 1
    assert dice_hd95(some, empty) == (1.0, 0.0)  # false positive on an empty label
    assert dice_hd95(empty, some) == (0.0, 0.0)  # missed object
    assert dice_hd95(empty, empty) == (0.0, 0.0)
    assert dice_hd95(some, some) == (1.0, 0.0)
    for pred, gt in [(some, empty), (empty, some), (empty, empty)]:
        assert dice_hd95(pred, gt) == transunet_case(pred, gt)


def test_label_values_above_one_count_as_foreground():
    rng = np.random.default_rng(5)
    pred, gt = blobs(rng, (25, 25)), blobs(rng, (25, 25))
    scaled = dice_hd95(pred.astype(np.int32) * 7, gt.astype(np.float32) * 3)
    assert scaled == pytest.approx(dice_hd95(pred, gt))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shapes differ.*\(4, 4\).*\(4, 5\)"):
        dice_hd95(np.ones((4, 4)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="shapes differ"):
        per_class_dice_hd95(np.ones((4, 4)), np.ones((5, 4)), 3)


@pytest.mark.parametrize("seed", range(3))
def test_dice_iou_matches_direct_numpy(seed):
    rng = np.random.default_rng(seed)
    pred, gt = rng.random((17, 19)) > 0.5, rng.random((17, 19)) > 0.6
    inter, union = np.logical_and(pred, gt).sum(), np.logical_or(pred, gt).sum()
    d, i = dice_iou(pred, gt)
    assert d == pytest.approx(2 * inter / (pred.sum() + gt.sum()))
    assert i == pytest.approx(inter / union)
    assert d == pytest.approx(medpy_binary.dc(pred, gt))
    assert i == pytest.approx(medpy_binary.jc(pred, gt))


def test_dice_iou_empty_cases():
    empty, some = np.zeros((6, 6)), np.zeros((6, 6))
    some[1:3, 1:3] = 1
    assert dice_iou(empty, empty) == (1.0, 1.0)
    assert dice_iou(some, empty) == (0.0, 0.0)
    assert dice_iou(empty, some) == (0.0, 0.0)


def test_mean_dice_iou():
    out = mean_dice_iou([(1.0, 1.0), (0.5, 0.25), (0.0, 0.0)])
    assert out == {"dice": pytest.approx(0.5), "iou": pytest.approx(1.25 / 3), "count": 3}
    with pytest.raises(ValueError):
        mean_dice_iou([])


def test_per_class_dice_hd95_matches_transunet_reference():
    rng = np.random.default_rng(7)
    num_classes = 5
    gt = rng.integers(0, 4, size=(6, 24, 24))  # class 4 absent from the label
    gt = ndimage.median_filter(gt, size=3)
    pred = np.where(rng.random(gt.shape) < 0.15, rng.integers(0, 5, gt.shape), gt)
    pred[pred == 3] = 0  # class 3 never predicted
    out = per_class_dice_hd95(pred, gt, num_classes)
    assert out.shape == (num_classes - 1, 2)
    assert np.isfinite(out).all()
    for c in range(1, num_classes):
        assert out[c - 1] == pytest.approx(transunet_case(pred == c, gt == c))
    assert tuple(out[2]) == (0.0, 0.0)


def test_public_shim_reexports_the_metrics():
    assert metrics.dice_hd95 is dice_hd95
    assert metrics.dice_iou is dice_iou
    assert metrics.per_class_dice_hd95 is per_class_dice_hd95
