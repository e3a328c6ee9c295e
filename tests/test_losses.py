"""Losses against independent references: torch's CrossEntropyLoss / BCEWithLogitsLoss and numpy formulas."""

import numpy as np
import pytest

from rwkvunet_jax.train import losses


def _random_case(seed, shape=(2, 6, 5), num_classes=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(*shape, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, size=shape).astype(np.int32)
    return logits, labels


def _np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_official_dice(logits, labels):
    """The official DiceLoss written out class by class in float64."""
    probs = _np_softmax(logits.astype(np.float64))
    num_classes = logits.shape[-1]
    total = 0.0
    for c in range(num_classes):
        p = probs[..., c]
        g = (labels == c).astype(np.float64)
        total += 1.0 - (2 * (p * g).sum() + 1e-5) / ((p * p).sum() + (g * g).sum() + 1e-5)
    return total / num_classes


def test_cross_entropy_matches_torch_with_and_without_ignore_index():
    torch = pytest.importorskip("torch")
    logits, labels = _random_case(0)
    labels[0, :2] = 3
    t_logits = torch.from_numpy(logits).permute(0, 3, 1, 2)
    t_labels = torch.from_numpy(labels).long()
    for ignore in (None, 3):
        ref = torch.nn.CrossEntropyLoss(ignore_index=-100 if ignore is None else ignore)(t_logits, t_labels)
        got = losses.cross_entropy(logits, labels, ignore_index=ignore)
        np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)


def test_cross_entropy_all_pixels_ignored_is_zero():
    logits, labels = _random_case(1)
    labels[:] = 2
    assert float(losses.cross_entropy(logits, labels, ignore_index=2)) == 0.0


def test_soft_dice_matches_numpy_formula():
    logits, labels = _random_case(2)
    np.testing.assert_allclose(float(losses.soft_dice_loss(logits, labels)), _np_official_dice(logits, labels), rtol=1e-5)


def test_soft_dice_label_outside_classes_counts_as_no_class():
    # ACDC's ignore_index 4 with 4 classes: the official one-hot gives an all-zero row for such pixels.
    logits, labels = _random_case(3)
    labels[1, 0, :] = 4
    np.testing.assert_allclose(float(losses.soft_dice_loss(logits, labels)), _np_official_dice(logits, labels), rtol=1e-5)


def test_soft_dice_is_near_zero_for_confident_correct_logits():
    _, labels = _random_case(4)
    logits = 50.0 * np.eye(4, dtype=np.float32)[labels]
    assert float(losses.soft_dice_loss(logits, labels)) < 1e-6


def test_binary_losses_match_torch_and_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 2, size=(3, 4, 5, 1)).astype(np.float32)
    labels = rng.integers(0, 2, size=(3, 4, 5)).astype(np.int32)
    ref_bce = torch.nn.BCEWithLogitsLoss()(torch.from_numpy(logits[..., 0]), torch.from_numpy(labels).float())
    np.testing.assert_allclose(float(losses.binary_cross_entropy(logits, labels)), float(ref_bce), rtol=1e-5)
    p = 1 / (1 + np.exp(-logits[..., 0].astype(np.float64)))
    g = labels.astype(np.float64)
    per_image = [(2 * (p[b] * g[b]).sum() + 1e-5) / (p[b].sum() + g[b].sum() + 1e-5) for b in range(3)]
    np.testing.assert_allclose(float(losses.binary_dice_loss(logits, labels)), 1 - np.mean(per_image), rtol=1e-5)


def test_segmentation_loss_weights_and_dispatch():
    logits, labels = _random_case(6)
    total, parts = losses.segmentation_loss(logits, labels, ce_weight=0.2, dice_weight=0.8, ignore_index=None)
    np.testing.assert_allclose(float(parts["dice_loss"]), _np_official_dice(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.2 * float(parts["ce"]) + 0.8 * float(parts["dice_loss"]), rtol=1e-6)
    binary_total, binary_parts = losses.segmentation_loss(logits[..., :1], labels % 2, ce_weight=0.5, dice_weight=1.0)
    np.testing.assert_allclose(float(binary_parts["ce"]), float(losses.binary_cross_entropy(logits[..., :1], labels % 2)))
    np.testing.assert_allclose(float(binary_total), 0.5 * float(binary_parts["ce"]) + float(binary_parts["dice_loss"]), rtol=1e-6)


def test_segmentation_loss_rejects_mismatched_shapes():
    logits, labels = _random_case(7)
    with pytest.raises(ValueError, match="disagree"):
        losses.segmentation_loss(logits, labels[:, :-1], ce_weight=0.5, dice_weight=0.5)
