"""Losses of the official recipes: segmentation (NHWC logits, integer labels) and classification.

* Multi-class (Synapse, ACDC, phantom): ``ce_weight * CE + dice_weight * Dice`` where CE is the mean
  cross entropy over the pixels whose label is not ``ignore_index`` (``torch.nn.CrossEntropyLoss``) and
  Dice is the official soft Dice of the softmax probabilities (see :func:`soft_dice_loss`).
* Binary (one output channel): ``ce_weight * BCE + dice_weight * Dice`` on the sigmoid, the loss of the
  binary benchmarks the paper compares against (0.5 BCE + 1 Dice); Dice per image, then batch mean.
* Classification (ImageNet pretraining): softmax cross entropy against soft targets (label smoothing,
  or the Mixup/CutMix targets the input pipeline made).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DICE_SMOOTH = 1e-5


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int | None = None) -> jax.Array:
    """Mean softmax cross entropy over (B, H, W) pixels; pixels equal to ``ignore_index`` are left out.

    ``logits`` is (B, H, W, C), ``labels`` (B, H, W) integers. If every pixel is ignored the loss is 0.
    """
    logits = logits.astype(jnp.float32)
    if ignore_index is None:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    keep = labels != ignore_index
    safe = jnp.where(keep, labels, 0)
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    return jnp.sum(per_pixel * keep) / jnp.maximum(jnp.sum(keep), 1)


def soft_dice_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The official multi-class Dice loss.

    Softmax probabilities p and one-hot labels g (a label outside ``[0, C)`` is all-zero, as the official
    one-hot encoder makes it); for every class c, background included,
    ``1 - (2 sum p g + 1e-5) / (sum p^2 + sum g^2 + 1e-5)`` with sums over the whole batch; mean over classes.
    """
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    axes = tuple(range(probs.ndim - 1))
    intersect = jnp.sum(probs * onehot, axis=axes)
    denom = jnp.sum(probs * probs, axis=axes) + jnp.sum(onehot * onehot, axis=axes)
    dice = (2.0 * intersect + DICE_SMOOTH) / (denom + DICE_SMOOTH)
    return jnp.mean(1.0 - dice)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean sigmoid binary cross entropy; ``logits`` (B, H, W, 1) or (B, H, W), ``labels`` {0, 1}."""
    logits = _squeeze_channel(logits).astype(jnp.float32)
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean()


def binary_dice_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-image soft Dice of the sigmoid: ``1 - mean_b (2 sum p g + 1e-5) / (sum p + sum g + 1e-5)``."""
    probs = jax.nn.sigmoid(_squeeze_channel(logits).astype(jnp.float32))
    target = labels.astype(jnp.float32)
    axes = tuple(range(1, probs.ndim))
    intersect = jnp.sum(probs * target, axis=axes)
    dice = (2.0 * intersect + DICE_SMOOTH) / (jnp.sum(probs, axis=axes) + jnp.sum(target, axis=axes) + DICE_SMOOTH)
    return 1.0 - jnp.mean(dice)


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    ce_weight: float,
    dice_weight: float,
    ignore_index: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted CE + Dice; binary (sigmoid) when ``logits`` has one channel, softmax otherwise.

    Returns ``(loss, {"ce": ..., "dice_loss": ...})`` (logged as ``train/ce`` and ``train/dice_loss``: 1 - soft Dice).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree: expected (B, H, W, C) and (B, H, W)")
    if logits.shape[-1] == 1:
        ce = binary_cross_entropy(logits, labels)
        dice = binary_dice_loss(logits, labels)
    else:
        ce = cross_entropy(logits, labels, ignore_index=ignore_index)
        dice = soft_dice_loss(logits, labels)
    return ce_weight * ce + dice_weight * dice, {"ce": ce, "dice_loss": dice}


def _squeeze_channel(logits: jax.Array) -> jax.Array:
    return logits[..., 0] if logits.ndim == 4 else logits


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing (``1 - eps + eps/K`` on the label, ``eps/K`` elsewhere)."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def classification_loss(logits: jax.Array, batch, *, num_classes: int, label_smoothing: float
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean softmax cross entropy against ``batch["target"]`` (B, K) if present, else the smoothed labels."""
    targets = batch["target"] if "target" in batch else soft_targets(batch["label"], num_classes, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean(), {}
