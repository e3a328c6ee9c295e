"""What evaluation and training leave on disk: metrics.json/CSV, a printed table, overlay PNGs, progress.png."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Class colours (RGB, 0-255); class 0 is background and never painted; classes past the end wrap around to 1.
PALETTE = np.array(
    [
        (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    ],
    dtype=np.uint8,
)


def palette_index(classes):
    """The ``PALETTE`` row of each class index: 0 for the background, 1..11 cycling for the classes."""
    classes = np.asarray(classes, np.int64)
    return np.where(classes > 0, 1 + (classes - 1) % (len(PALETTE) - 1), 0)


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) of any range -> (H, W, 3) uint8, min-max scaled per image."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"cannot display an image of shape {image.shape}; expected (H, W), (H, W, 1) or (H, W, 3)")
    lo, hi = float(np.min(image)), float(np.max(image))
    scaled = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    return np.round(scaled * 255).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours of an integer ``mask`` (H, W) over ``image``; background (0) stays untouched."""
    rgb = to_display_rgb(image).astype(np.float32)
    mask = np.asarray(mask)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {rgb.shape[:2]}")
    colours = PALETTE[palette_index(mask)].astype(np.float32)
    painted = mask > 0
    rgb[painted] = (1 - alpha) * rgb[painted] + alpha * colours[painted]
    return np.round(rgb).astype(np.uint8)


def save_overlay_png(path: str | Path, image: np.ndarray, pred: np.ndarray, label: np.ndarray | None = None,
                     *, min_height: int = 192, class_names: Sequence[str] | None = None,
                     title: str | None = None) -> Path:
    """Save the panels image | ground truth | prediction (no ground truth panel if ``label`` is None).

    Each panel has its name above it; ``title`` goes on a line above the panels and a legend of the class
    colours below them. ``class_names`` name the foreground classes 1, 2, ... (a leading "background"
    is dropped); without them the legend lists the classes present as "class c". Small images are
    enlarged by an integer factor (nearest neighbour) to at least ``min_height`` rows.
    """
    from PIL import Image, ImageDraw

    pred = np.asarray(pred)
    panels = [("image", to_display_rgb(image))]
    if label is not None:
        panels.append(("ground truth", overlay(image, label)))
    panels.append(("prediction", overlay(image, pred)))
    factor = max(1, -(-min_height // panels[0][1].shape[0]))
    if factor > 1:
        panels = [(name, np.repeat(np.repeat(p, factor, axis=0), factor, axis=1)) for name, p in panels]
    gap = np.full((panels[0][1].shape[0], 4, 3), 255, np.uint8)
    row = np.concatenate([p for _, panel in panels for p in (panel, gap)][:-1], axis=1)

    font = _font()
    line = _text_height(font) + 6
    legend = _legend_entries(class_names, pred, label)
    legend_lines = _layout_legend(legend, row.shape[1], font)
    top = line * (2 if title else 1)
    canvas = Image.new("RGB", (row.shape[1], top + row.shape[0] + line * len(legend_lines) + 4), "white")
    canvas.paste(Image.fromarray(row), (0, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((2, 3), title, fill="black", font=font)
    x = 0
    for name, panel in panels:
        draw.text((x + 2, top - line + 3), name, fill="black", font=font)
        x += panel.shape[1] + gap.shape[1]
    y = top + row.shape[0] + 4
    box = _text_height(font)
    for entries in legend_lines:
        for x, colour, text in entries:
            draw.rectangle((x, y, x + box, y + box), fill=tuple(int(c) for c in colour), outline="black")
            draw.text((x + box + 4, y), text, fill="black", font=font)
        y += line
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _text_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom)


def _legend_entries(class_names: Sequence[str] | None, pred: np.ndarray, label: np.ndarray | None
                    ) -> list[tuple[int, str]]:
    """(class index, name) of the foreground classes: all named ones, else those present."""
    if class_names is not None:
        names = list(class_names)
        if names and names[0].lower() in ("background", "bg"):
            names = names[1:]
        return [(c, name) for c, name in enumerate(names, start=1)]
    present = set(np.unique(pred).tolist())
    if label is not None:
        present |= set(np.unique(label).tolist())
    return [(int(c), f"class {int(c)}") for c in sorted(present) if c > 0]


def _layout_legend(entries: list[tuple[int, str]], width: int, font) -> list[list[tuple[int, np.ndarray, str]]]:
    """Legend entries (x, colour, text) wrapped into lines no wider than ``width``."""
    box = _text_height(font)
    lines: list[list[tuple[int, np.ndarray, str]]] = [[]]
    x = 2
    for c, name in entries:
        size = box + 4 + int(font.getlength(name)) + 12
        if lines[-1] and x + size > width:
            lines.append([])
            x = 2
        lines[-1].append((x, PALETTE[palette_index(c)], name))
        x += size
    return lines if lines[0] else []


def write_metrics(
    outdir: str | Path, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] = (), *, stem: str = "metrics"
) -> tuple[Path, Path]:
    """Write ``summary`` to ``<stem>.json`` (with the per-case ``rows`` under "cases") and ``rows`` to ``<stem>.csv``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = outdir / f"{stem}.json", outdir / f"{stem}.csv"
    payload = {**_jsonable(summary), "cases": [_jsonable(r) for r in rows]}
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(json_path)  # atomic: a reader never sees half a file
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table; floats get 4 decimals."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


def plot_progress(records: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """progress.png: training losses (total, cross-entropy, Dice loss), validation Dice and learning rate.

    ``records`` are metric-writer records (``{"step": s, "train/loss": ..., "val/mean_dice": ..., "train/lr": ...}``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(name):
        pairs = [(r["step"], r[name]) for r in records if name in r and math.isfinite(r[name])]
        return [s for s, _ in pairs], [v for _, v in pairs]

    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for ax, names, ylabel in (
        (axes[0], ("train/loss", "train/ce", "train/dice_loss"), "training loss"),
        (axes[1], ("val/mean_dice",), "validation Dice"),
        (axes[2], ("train/lr",), "learning rate"),
    ):
        for name in names:
            steps, values = series(name)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj
