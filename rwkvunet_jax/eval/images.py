"""Per-image evaluation of 2-D datasets (the binary datasets, and the phantom slice by slice).

Images are resized to the network size (bilinear), segmented, and the label map is resized back to the
image's own size with order 0 before scoring against the original label:

* one output channel (binary): Dice and IoU per image (``eval.metrics.dice_iou``; an empty prediction on
  an empty label scores 1), mean over the split;
* several classes: per foreground class Dice and HD95 per image (``per_class_dice_hd95``), mean over
  images, then over classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rwkvunet_jax.eval.inference import PredictFn, labels_from_probabilities, predict_probabilities
from rwkvunet_jax.eval.volumes import _class_names, _maybe_tqdm, _row, resize_slices, summarize


def evaluate_images(
    predict_fn: PredictFn,
    source: Any,
    *,
    num_outputs: int,
    image_size: Sequence[int],
    batch_size: int,
    tta: str | bool = "none",
    class_names: Sequence[str] | None = None,
    on_image: Callable[[int, np.ndarray], None] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score every example of ``source`` (``src[i] -> {"image", "label", "id"}``).

    ``num_outputs`` is the model's output channels (1 = binary). Returns ``(summary, rows)``; binary:
    ``{"mean_dice", "mean_iou", "num_images"}`` and rows ``{"id", "dice", "iou"}``; multi-class: like
    :func:`rwkvunet_jax.eval.volumes.evaluate_volumes` with ``num_images``. ``on_image`` gets each
    example's index in ``source`` and its predicted label map at the original size.
    """
    from rwkvunet_jax.data import eval_batches
    from rwkvunet_jax.eval.metrics import dice_iou, per_class_dice_hd95

    if len(source) == 0:
        raise ValueError(f"no images to evaluate in {source!r}")
    binary = num_outputs == 1
    names = None if binary else _class_names(num_outputs, class_names)
    rows: list[dict[str, Any]] = []
    scores = []
    batches = eval_batches(source, image_size=image_size, batch_size=batch_size)
    index = 0
    bar = _maybe_tqdm(batches, progress, "images")
    for batch in bar:
        probs = predict_probabilities(predict_fn, batch["image"], batch_size=batch_size, tta=tta)
        labels = labels_from_probabilities(probs)
        for case_id, pred, gt in zip(batch["id"], labels, batch["orig_label"]):
            pred = resize_slices(pred[None], gt.shape, order=0)[0]
            if binary:
                d, iou = dice_iou(pred, gt)
                rows.append({"id": case_id, "dice": d, "iou": iou})
            else:
                per_class = per_class_dice_hd95(pred, gt, num_outputs)
                scores.append(per_class)
                rows.append(_row(case_id, names, per_class))
            if on_image is not None:
                on_image(index, pred)
            index += 1
    if binary:
        dice = np.array([r["dice"] for r in rows])
        iou = np.array([r["iou"] for r in rows])
        return {"mean_dice": float(dice.mean()), "mean_iou": float(iou.mean()), "num_images": len(rows)}, rows
    summary = summarize(np.stack(scores), names)
    summary["num_images"] = summary.pop("num_cases")
    return summary, rows
