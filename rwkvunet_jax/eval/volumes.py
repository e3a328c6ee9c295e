"""Slice-wise evaluation of whole volumes (Synapse, ACDC), following TransUNet's ``test_single_volume``.

Every axial slice is resized to the network size with a cubic spline (``scipy.ndimage.zoom``, order 3),
segmented, and the label map is resized back with order 0 (nearest). Per foreground class, Dice and
HD95 of the 3-D prediction against the label (``eval.metrics.dice_hd95``: TransUNet conventions, voxel
units); the summary is the mean over cases, then over classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rwkvunet_jax.eval.inference import PredictFn, labels_from_probabilities, predict_probabilities


def resize_slices(volume: np.ndarray, size: Sequence[int], *, order: int) -> np.ndarray:
    """Resize every slice of (D, H, W) or (D, H, W, C) to ``size`` (H', W') with ``scipy.ndimage.zoom``."""
    from scipy.ndimage import zoom

    volume = np.asarray(volume)
    h, w = volume.shape[1:3]
    if (h, w) == tuple(size):
        return volume
    factors = (size[0] / h, size[1] / w) + (1,) * (volume.ndim - 3)
    out = [zoom(s, factors, order=order) for s in volume]
    if out[0].shape[:2] != tuple(size):  # zoom rounds the output size; guard against off-by-one
        raise ValueError(f"zoom produced {out[0].shape[:2]} instead of {tuple(size)} for slices of {(h, w)}")
    return np.stack(out)


def segment_volume(
    predict_fn: PredictFn,
    image: np.ndarray,
    *,
    image_size: Sequence[int],
    batch_size: int,
    tta: str | bool = "none",
) -> np.ndarray:
    """Label map (D, H, W) of a volume (D, H, W) or (D, H, W, C), slice by slice at ``image_size``."""
    image = np.asarray(image, np.float32)
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise ValueError(f"expected a volume (D, H, W) or (D, H, W, C), got shape {image.shape}")
    depth, h, w = image.shape[:3]
    network_input = resize_slices(image, image_size, order=3)
    probs = predict_probabilities(predict_fn, network_input, batch_size=batch_size, tta=tta)
    labels = labels_from_probabilities(probs)
    return resize_slices(labels, (h, w), order=0).astype(np.int32)


def evaluate_volumes(
    predict_fn: PredictFn,
    volumes: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    image_size: Sequence[int],
    batch_size: int,
    tta: str | bool = "none",
    class_names: Sequence[str] | None = None,
    on_case: Callable[[Mapping[str, Any], np.ndarray], None] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-class Dice and HD95 over volumes ``{"image": (D, H, W), "label": (D, H, W), "id": str}``.

    Returns ``(summary, rows)``: rows hold one case each (``id``, ``<class>_dice``, ``<class>_hd95``,
    ``mean_dice``, ``mean_hd95``); the summary holds ``mean_dice``, ``mean_hd95`` (over classes of the
    per-class means over cases), ``per_class`` ({name: {"dice", "hd95"}}) and ``num_cases``. ``on_case``
    receives each volume and its prediction (e.g. to save overlays).
    """
    from rwkvunet_jax.eval.metrics import per_class_dice_hd95

    names = _class_names(num_classes, class_names)
    rows, scores = [], []
    for case in _maybe_tqdm(volumes, progress, "volumes"):
        label = np.asarray(case["label"])
        pred = segment_volume(predict_fn, case["image"], image_size=image_size, batch_size=batch_size, tta=tta)
        per_class = per_class_dice_hd95(pred, label, num_classes)
        scores.append(per_class)
        rows.append(_row(case["id"], names, per_class))
        if on_case is not None:
            on_case(case, pred)
    if not scores:
        raise ValueError("no volumes to evaluate")
    return summarize(np.stack(scores), names), rows


def summarize(scores: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Summary of per-case, per-class (Dice, HD95) scores of shape (cases, classes, 2)."""
    per_class_mean = scores.mean(axis=0)
    return {
        "mean_dice": float(per_class_mean[:, 0].mean()),
        "mean_hd95": float(per_class_mean[:, 1].mean()),
        "per_class": {n: {"dice": float(d), "hd95": float(h)} for n, (d, h) in zip(names, per_class_mean)},
        "num_cases": int(scores.shape[0]),
    }


def _row(case_id: str, names: Sequence[str], per_class: np.ndarray) -> dict[str, Any]:
    row: dict[str, Any] = {"id": case_id}
    for name, (d, h) in zip(names, per_class):
        row[f"{name}_dice"] = float(d)
        row[f"{name}_hd95"] = float(h)
    row["mean_dice"] = float(per_class[:, 0].mean())
    row["mean_hd95"] = float(per_class[:, 1].mean())
    return row


def _class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    """Names of the foreground classes 1..num_classes-1 (``class_names`` may include the background)."""
    if class_names is None:
        return [f"class{c}" for c in range(1, num_classes)]
    names = list(class_names)
    if len(names) == num_classes:
        names = names[1:]
    if len(names) != num_classes - 1:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes: {list(class_names)}")
    return names


def _maybe_tqdm(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(items, desc=desc, total=total, leave=False)
