"""Evaluate a predict function on one split of a dataset and write the report (``rwkvunet evaluate``).

Writes ``OUTDIR/metrics.json`` (summary: ``mean_dice``, ``mean_hd95`` or ``mean_iou``, ``per_class``, and
the per-case rows under ``cases``), ``OUTDIR/metrics.csv`` (one row per case) and overlay PNGs of the
first ``num_overlays`` cases in ``OUTDIR/overlays/`` ([image | label | prediction]), and prints a table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rwkvunet_jax.eval.inference import PredictFn
from rwkvunet_jax.eval.report import format_table, save_overlay_png, write_metrics


def evaluate_dataset(
    predict_fn: PredictFn,
    *,
    dataset: str,
    root: str | Path,
    split: str,
    protocol: str,
    num_outputs: int,
    image_size: Sequence[int],
    batch_size: int,
    outdir: str | Path,
    split_seed: int = 0,
    tta: bool = False,
    class_names: Sequence[str] | None = None,
    num_overlays: int = 4,
    paper: Mapping[str, float] | None = None,
    progress: bool = True,
    list_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the ``protocol`` ("volume" or "image") on ``split`` and write the report; returns the summary.

    ``list_dir``: the folder of the dataset's list files (see :func:`rwkvunet_jax.data.get_source`)."""
    from rwkvunet_jax import data
    from rwkvunet_jax.eval.images import evaluate_images
    from rwkvunet_jax.eval.volumes import evaluate_volumes

    outdir = Path(outdir)
    overlay_dir = outdir / "overlays"
    common = dict(image_size=tuple(image_size), batch_size=batch_size, tta=tta, progress=progress)
    if protocol == "volume":
        volumes = data.get_volumes(dataset, root, split, list_dir=list_dir)
        saved = []

        def on_case(case, pred):
            if len(saved) < num_overlays:
                label = np.asarray(case["label"])
                z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(axis=1)))  # the most labelled slice
                saved.append(save_overlay_png(overlay_dir / f"{case['id']}_slice{z:03d}.png",
                                              np.asarray(case["image"])[z], pred[z], label[z]))

        summary, rows = evaluate_volumes(predict_fn, volumes, num_classes=num_outputs, class_names=class_names,
                                         on_case=on_case, **common)
    elif protocol == "image":
        source = data.get_source(dataset, root, split, split_seed=split_seed, list_dir=list_dir)

        def on_image(index, pred):
            if index < num_overlays:
                example = source[index]
                save_overlay_png(overlay_dir / f"{example['id']}.png", example["image"], pred, example["label"])

        summary, rows = evaluate_images(predict_fn, source, num_outputs=num_outputs, class_names=class_names,
                                        on_image=on_image, **common)
    else:
        raise ValueError(f"protocol must be 'volume' or 'image', got {protocol!r}")

    summary = {"dataset": dataset, "split": split, "protocol": protocol, "tta": bool(tta), **summary}
    if paper:
        reported = {k: float(v) for k, v in paper.items() if v is not None and float(v) >= 0}
        if reported:
            summary["paper"] = reported
    json_path, csv_path = write_metrics(outdir, summary, rows)
    print(describe(summary))
    print(f"metrics: {json_path}\nper case: {csv_path}\noverlays: {overlay_dir}")
    return summary


def describe(summary: Mapping[str, Any]) -> str:
    """A printable table of a summary: per class (Dice, HD95) or the binary means, with the paper's numbers."""
    title = f"{summary.get('dataset', '?')} / {summary.get('split', '?')} (tta={summary.get('tta', False)})"
    if "per_class" in summary:
        rows = [{"class": name, "dice": v["dice"], "hd95": v["hd95"]} for name, v in summary["per_class"].items()]
        rows.append({"class": "mean", "dice": summary["mean_dice"], "hd95": summary["mean_hd95"]})
    else:
        rows = [{"images": summary.get("num_images", ""), "dice": summary["mean_dice"], "iou": summary["mean_iou"]}]
    text = f"{title}\n{format_table(rows)}"
    paper = summary.get("paper")
    if paper:
        ours = f"ours: mean Dice {100 * summary['mean_dice']:.2f}"
        if "mean_hd95" in paper and "mean_hd95" in summary:
            ours += f", HD95 {summary['mean_hd95']:.2f}"
        reported = ", ".join(f"{k} {v:.2f}" for k, v in paper.items())
        text += f"\npaper: {reported} ({ours})"
    return text
