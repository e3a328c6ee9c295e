"""Evaluate a predict function on one split of a dataset and write the report (``rwkvunet evaluate``).

Writes ``OUTDIR/metrics.json`` (summary: ``mean_dice``, ``mean_hd95`` or ``mean_iou``, ``per_class``, and
the per-case rows under ``cases``), ``OUTDIR/metrics.csv`` (one row per case) and overlay PNGs in
``OUTDIR/overlays/`` (image | ground truth | prediction, with a class legend) of ``num_overlays`` cases
spread over the ranking by Dice: the worst, the median and the best, then others between them. The
chosen cases are segmented again for their pictures (a few cases; nothing is held in memory meanwhile).
In a work directory the evaluation of split S goes to ``WORKDIR/eval_S`` (:func:`eval_dir`), from both
``rwkvunet finetune`` (its final test) and ``rwkvunet evaluate``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rwkvunet_jax.eval.inference import PredictFn, tta_mode
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
    tta: str | bool = "none",
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
    from rwkvunet_jax.eval.volumes import evaluate_volumes, segment_volume

    if protocol not in ("volume", "image"):
        raise ValueError(f"protocol must be 'volume' or 'image', got {protocol!r}")
    tta = tta_mode(tta)
    outdir = Path(outdir)
    overlay_dir = outdir / "overlays"
    common = dict(image_size=tuple(image_size), batch_size=batch_size, tta=tta)
    if protocol == "volume":
        cases = data.get_volumes(dataset, root, split, list_dir=list_dir)
        summary, rows = evaluate_volumes(predict_fn, cases, num_classes=num_outputs, class_names=class_names,
                                         progress=progress, **common)
    else:
        cases = data.get_source(dataset, root, split, split_seed=split_seed, list_dir=list_dir)
        summary, rows = evaluate_images(predict_fn, cases, num_outputs=num_outputs, class_names=class_names,
                                        progress=progress, **common)

    for stale in overlay_dir.glob("[0-9]*_*.png"):  # from an earlier evaluation into the same folder
        stale.unlink()
    scores = [row.get("mean_dice", row.get("dice")) for row in rows]
    picked = pick_cases(scores, num_overlays)
    if protocol == "volume":
        for k, (index, rank) in enumerate(picked, start=1):
            case = cases[index]
            pred = segment_volume(predict_fn, case["image"], **common)
            label = np.asarray(case["label"])
            z = int(np.argmax((label > 0).reshape(label.shape[0], -1).sum(axis=1)))  # the most labelled slice
            save_overlay_png(overlay_dir / f"{k}_{rank}_{case['id']}_slice{z:03d}.png", np.asarray(case["image"])[z],
                             pred[z], label[z], class_names=class_names,
                             title=f"{case['id']} slice {z}: {rank} of {len(rows)} by Dice ({scores[index]:.3f})")
    else:
        subset = [cases[index] for index, _ in picked]
        preds: dict[int, np.ndarray] = {}
        evaluate_images(predict_fn, subset, num_outputs=num_outputs, on_image=preds.__setitem__, progress=False,
                        **common)
        for k, ((index, rank), example) in enumerate(zip(picked, subset), start=1):
            save_overlay_png(overlay_dir / f"{k}_{rank}_{example['id']}.png", example["image"], preds[k - 1],
                             example["label"], class_names=class_names,
                             title=f"{example['id']}: {rank} of {len(rows)} by Dice ({scores[index]:.3f})")

    summary = {"dataset": dataset, "split": split, "protocol": protocol, "tta": tta, **summary}
    if paper:
        reported = {k: float(v) for k, v in paper.items() if v is not None and float(v) >= 0}
        if reported:
            summary["paper"] = reported
    json_path, csv_path = write_metrics(outdir, summary, rows)
    print(describe(summary))
    print(f"metrics: {json_path}\nper case: {csv_path}\noverlays: {overlay_dir}")
    return summary


def eval_dir(workdir: str | Path, split: str) -> Path:
    """Where the evaluation of ``split`` goes in a work directory: ``WORKDIR/eval_<split>``."""
    return Path(workdir) / f"eval_{split}"


def pick_cases(scores: Sequence[float], count: int) -> list[tuple[int, str]]:
    """``count`` cases spread over the ranking by ``scores`` (Dice), worst first: ``[(index, rank name)]``.

    Two or more: the worst and the best; three or more: also the median (the lower one for an even
    number of cases); more: evenly spaced ranks between them, named ``rank<r>`` (1 = worst). One: the median.
    """
    n = len(scores)
    count = min(int(count), n)
    if count <= 0:
        return []
    order = np.argsort(np.asarray(scores, np.float64), kind="stable")
    median = (n - 1) // 2
    ranks = [median] if count == 1 else np.round(np.linspace(0, n - 1, count)).astype(int).tolist()
    if count >= 3:
        nearest = min(range(1, count - 1), key=lambda i: abs(ranks[i] - median))
        ranks[nearest] = median

    def name(rank: int) -> str:
        if n > 1 and rank == 0:
            return "worst"
        if n > 1 and rank == n - 1:
            return "best"
        return "median" if rank == median else f"rank{rank + 1}"

    return [(int(order[rank]), name(rank)) for rank in sorted(set(ranks))]


def describe(summary: Mapping[str, Any]) -> str:
    """A printable table of a summary: per class (Dice, HD95) or the binary means, with the paper's numbers."""
    title = f"{summary.get('dataset', '?')} / {summary.get('split', '?')} (tta={summary.get('tta', 'none')})"
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
