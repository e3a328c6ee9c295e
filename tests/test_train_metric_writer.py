"""Metric writer (JSON lines, long CSV, TensorBoard) and the progress/overlay/metrics report files."""

import csv
import json

import numpy as np
import pytest

from rwkvunet_jax.eval import report
from rwkvunet_jax.train.metric_writer import MetricWriter, metric_history, read_metrics


def test_writes_jsonl_csv_and_tensorboard(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"train/loss": 1.5, "train/lr": np.float32(1e-3)})
        writer.write(2, {"train/loss": 1.25, "val/mean_dice": 0.5})
    records = read_metrics(tmp_path)
    assert records == [{"step": 1, "train/loss": 1.5, "train/lr": pytest.approx(1e-3)},
                       {"step": 2, "train/loss": 1.25, "val/mean_dice": 0.5}]
    assert metric_history(records, "train/loss") == ([1, 2], [1.5, 1.25])
    with (tmp_path / "metrics.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "name", "value"]
    assert ["2", "val/mean_dice", "0.5"] in rows
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"train/loss": float(step)})
    with MetricWriter(tmp_path, resume_step=3) as writer:
        writer.write(4, {"train/loss": 40.0})
    assert [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    with (tmp_path / "metrics.csv").open() as f:
        steps = [row[0] for row in list(csv.reader(f))[1:]]
    assert steps == ["1", "2", "3", "4"]


def test_fresh_start_clears_old_records(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(7, {"train/loss": 1.0})
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"train/loss": 2.0})
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.0}]


def test_progress_plot_and_overlays_are_images(tmp_path):
    from PIL import Image

    records = [{"step": s, "train/loss": 1 / s, "train/lr": 1e-3 / s} for s in range(1, 20)]
    records += [{"step": 10, "val/mean_dice": 0.5}, {"step": 19, "val/mean_dice": 0.7}]
    path = report.plot_progress(records, tmp_path / "progress.png")
    assert Image.open(path).size[0] > 100

    image = np.linspace(0, 1, 12 * 10).reshape(12, 10)
    label = np.zeros((12, 10), int)
    label[2:5, 3:6] = 2
    overlay = report.overlay(image, label)
    assert overlay.shape == (12, 10, 3) and overlay.dtype == np.uint8
    untouched = report.to_display_rgb(image)
    np.testing.assert_array_equal(overlay[label == 0], untouched[label == 0])
    assert np.abs(overlay[label == 2].astype(int) - untouched[label == 2]).max() > 0
    saved = np.asarray(Image.open(report.save_overlay_png(tmp_path / "o.png", image, label, label, min_height=1,
                                                          class_names=("background", "a", "b"), title="case 7")))
    assert saved.shape[1] == 3 * 10 + 2 * 4  # three panels and two gaps, side by side
    top = _find_block(saved, untouched, x=0)  # the image panel lies below the title and the panel names
    assert top > 0 and saved.shape[0] > top + 12  # ... and above the legend
    np.testing.assert_array_equal(saved[top:top + 12, 14:24], overlay)  # ground truth panel
    legend = saved[top + 12:].reshape(-1, 3)
    for c in (1, 2):  # a legend entry in each class's colour
        assert (legend == report.PALETTE[c]).all(axis=1).any(), c
    assert (saved[:top] != 255).any()  # text above the panels
    enlarged = np.asarray(Image.open(report.save_overlay_png(tmp_path / "big.png", image, label, min_height=30)))
    assert enlarged.shape[1] == 2 * 30 + 4  # 12 rows -> x3, two panels
    assert _find_block(enlarged, np.repeat(np.repeat(untouched, 3, axis=0), 3, axis=1), x=0) > 0
    with pytest.raises(ValueError, match="does not match"):
        report.overlay(image, label[:5])


def _find_block(canvas: np.ndarray, block: np.ndarray, *, x: int) -> int:
    """The row where ``block`` appears in ``canvas`` at column ``x`` (-1 if nowhere)."""
    h, w = block.shape[:2]
    for y in range(canvas.shape[0] - h + 1):
        if np.array_equal(canvas[y:y + h, x:x + w], block):
            return y
    return -1


def test_class_colours_skip_the_background_when_they_wrap():
    classes = np.arange(0, 2 * len(report.PALETTE))
    index = report.palette_index(classes)
    assert index[0] == 0 and (index[1:] > 0).all()
    assert index[len(report.PALETTE)] == index[1]  # class 12 takes class 1's colour, never the background's


def test_write_metrics_json_and_csv(tmp_path):
    rows = [{"id": "a", "dice": 0.5}, {"id": "b", "dice": 1.0, "iou": 1.0}]
    json_path, csv_path = report.write_metrics(tmp_path, {"mean_dice": np.float64(0.75), "bad": float("nan")}, rows)
    payload = json.loads(json_path.read_text())
    assert payload["mean_dice"] == 0.75 and payload["bad"] is None and payload["cases"][1]["iou"] == 1.0
    with csv_path.open() as f:
        assert list(csv.DictReader(f))[1] == {"id": "b", "dice": "1.0", "iou": "1.0"}
    table = report.format_table(rows)
    assert "0.5000" in table and table.splitlines()[0].split() == ["id", "dice"]
