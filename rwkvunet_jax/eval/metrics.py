"""Segmentation metrics on numpy masks: Dice, IoU and HD95 with the TransUNet / medpy conventions.

``dice_hd95`` reproduces ``medpy.metric.binary.dc`` and ``hd95`` as TransUNet's
``calculate_metric_percase`` calls them (and the RWKV-UNet evaluation inherits):

* prediction and label both non-empty: Dice and the 95th percentile of the symmetric surface distance;
* prediction non-empty, label empty: (1, 0);
* prediction empty (whatever the label): (0, 0). A missed organ therefore scores HD95 0, which flatters
  mean HD95; we keep it so numbers compare with the paper.

Surface voxels are the mask minus its binary erosion with a connectivity-1 structure (medpy's default;
``connectivity`` picks another), the image border counting as background; distances come from
``scipy.ndimage.distance_transform_edt`` in voxels (or physical units with ``voxelspacing``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _binary_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and label shapes differ: {pred.shape} vs {gt.shape}")
    if pred.ndim == 0:
        raise ValueError("masks must have at least one dimension")
    return pred > 0, gt > 0


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box plus a one-voxel zero frame.

    Surface distances only involve voxels inside this box, and the zero frame reproduces the erosion's
    background border, so the result equals that on the full arrays at a fraction of the cost.
    """
    coords = np.nonzero(pred | gt)
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
    return np.pad(pred[box], 1), np.pad(gt[box], 1)


def surface_distances(pred: np.ndarray, gt: np.ndarray, voxelspacing: Sequence[float] | float | None = None,
                      connectivity: int = 1) -> np.ndarray:
    """Distances from every surface voxel of ``pred`` to the nearest surface voxel of ``gt`` (both non-empty)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(pred.ndim, connectivity)
    pred_surface = pred & ~ndimage.binary_erosion(pred, structure=structure, iterations=1)
    gt_surface = gt & ~ndimage.binary_erosion(gt, structure=structure, iterations=1)
    if voxelspacing is not None:
        voxelspacing = np.broadcast_to(np.asarray(voxelspacing, np.float64), (pred.ndim,)).copy()
    distance_to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=voxelspacing)
    return distance_to_gt[pred_surface]


def hd95(pred, gt, voxelspacing: Sequence[float] | float | None = None, connectivity: int = 1) -> float:
    """95th percentile of the symmetric surface distance of two non-empty binary masks (as medpy)."""
    pred, gt = _binary_pair(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("hd95 needs two non-empty masks (dice_hd95 handles empty ones)")
    pred, gt = _crop_to_union(pred, gt)
    both = np.concatenate([surface_distances(pred, gt, voxelspacing, connectivity),
                           surface_distances(gt, pred, voxelspacing, connectivity)])
    return float(np.percentile(both, 95))


def dice(pred, gt) -> float:
    """2|P∩G| / (|P| + |G|) of binary masks (non-zero = foreground); 0 when both are empty (as medpy)."""
    pred, gt = _binary_pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    return 2.0 * int(np.count_nonzero(pred & gt)) / total if total else 0.0


def dice_hd95(pred, gt, voxelspacing: Sequence[float] | float | None = None,
              connectivity: int = 1) -> tuple[float, float]:
    """(Dice, HD95) of a binary prediction against a binary label (2-D or 3-D), TransUNet conventions.

    Both non-empty: (Dice, HD95 in voxels); prediction non-empty and label empty: (1.0, 0.0);
    prediction empty: (0.0, 0.0). Non-zero values are foreground.
    """
    pred, gt = _binary_pair(pred, gt)
    if pred.any() and gt.any():
        return dice(pred, gt), hd95(pred, gt, voxelspacing, connectivity)
    if pred.any():
        return 1.0, 0.0
    return 0.0, 0.0


def dice_iou(pred, gt) -> tuple[float, float]:
    """(Dice, IoU) of one binary image. Both masks empty: (1.0, 1.0), a correct 'nothing here' answer
    (BUSI's 'normal' images have empty masks); exactly one empty: (0.0, 0.0)."""
    pred, gt = _binary_pair(pred, gt)
    intersection = int(np.count_nonzero(pred & gt))
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0, 1.0
    return 2.0 * intersection / (union + intersection), intersection / union


def per_class_dice_hd95(pred_labels, gt_labels, num_classes: int,
                        voxelspacing: Sequence[float] | float | None = None) -> np.ndarray:
    """(num_classes - 1, 2) array of (Dice, HD95) for each foreground class 1..num_classes-1 of label maps."""
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"prediction and label shapes differ: {pred_labels.shape} vs {gt_labels.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return np.array([dice_hd95(pred_labels == c, gt_labels == c, voxelspacing)
                     for c in range(1, num_classes)], np.float64).reshape(num_classes - 1, 2)


def mean_dice_iou(pairs: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Means over a split of per-image (Dice, IoU) pairs: ``{"dice", "iou", "count"}``."""
    scores = np.asarray(pairs, np.float64).reshape(-1, 2)
    if len(scores) == 0:
        raise ValueError("mean_dice_iou needs at least one (dice, iou) pair")
    return {"dice": float(scores[:, 0].mean()), "iou": float(scores[:, 1].mean()), "count": len(scores)}
