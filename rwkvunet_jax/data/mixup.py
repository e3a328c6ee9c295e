"""Label smoothing, Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on numpy batches.

Batch mode, as in the official (timm) recipe: one mixing coefficient per batch, each image paired with
the image at the mirrored position of the same batch (``batch[::-1]``). Images stay uint8 (Mixup
rounds the blend), so the host ships a quarter of the bytes of float images; the targets are float32
probability vectors with label smoothing applied before mixing:

    target = lam * smooth(y) + (1 - lam) * smooth(y[::-1]),
    smooth(y) = one_hot(y) * (1 - eps) + eps / num_classes.

CutMix's ``lam`` is corrected to the pasted box's true area after clipping at the image border.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def smooth_one_hot(labels: np.ndarray, num_classes: int, smoothing: float = 0.0) -> np.ndarray:
    """(B,) int labels -> (B, num_classes) float32 with ``1 - eps + eps/K`` on the label, ``eps/K`` elsewhere."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    off = smoothing / num_classes
    out = np.full((labels.shape[0], num_classes), off, np.float32)
    out[np.arange(labels.shape[0]), labels] = 1.0 - smoothing + off
    return out


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of a box with area ``(1 - lam) * H * W`` centred at a uniform
    random pixel and clipped to the image."""
    cut = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    left, right = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return int(top), int(bottom), int(left), int(right)


@dataclass(frozen=True)
class MixupCutmix:
    """Batch-level Mixup / CutMix with label smoothing (a grain ``RandomMap`` over batches).

    With probability ``prob`` a batch is mixed: CutMix with probability ``switch_prob`` when both
    alphas are positive (otherwise whichever alpha is positive), ``lam ~ Beta(alpha, alpha)``.
    Unmixed batches still get smoothed targets, so the loss sees one target format.
    """

    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup {self.mixup_alpha}, cutmix {self.cutmix_alpha}")
        if not 0 <= self.prob <= 1 or not 0 <= self.switch_prob <= 1:
            raise ValueError(f"prob and switch_prob must lie in [0, 1], got {self.prob}, {self.switch_prob}")

    def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
        images = np.asarray(batch["image"])
        labels = np.asarray(batch["label"])
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"expected images (B, H, W, C) and labels (B,), got {images.shape} and {labels.shape}")
        lam, mode = 1.0, "none"
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and rng.random() < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            lam = float(rng.beta(alpha, alpha))
            mode = "cutmix" if use_cutmix else "mixup"
        flipped = images[::-1]
        if mode == "mixup":
            mixed = images.astype(np.float32) * lam + flipped.astype(np.float32) * (1.0 - lam)
            images = np.clip(np.rint(mixed), 0, 255).astype(images.dtype) if images.dtype == np.uint8 else mixed
        elif mode == "cutmix":
            top, bottom, left, right = cutmix_box(images.shape[1], images.shape[2], lam, rng)
            images = images.copy()
            images[:, top:bottom, left:right] = flipped[:, top:bottom, left:right]
            lam = 1.0 - (bottom - top) * (right - left) / float(images.shape[1] * images.shape[2])
        target = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        target = lam * target + (1.0 - lam) * target[::-1]
        return {**batch, "image": images, "target": target.astype(np.float32)}
