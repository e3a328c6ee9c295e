"""Scalar metrics of a run, written three ways: TensorBoard events, ``metrics.csv`` and ``metrics.jsonl``.

``metrics.jsonl`` holds one JSON object per call, ``{"step": s, "name": value, ...}``; ``metrics.csv`` the
same in long form (``step,name,value``), which stays valid when later calls add new names. A resumed run
passes ``resume_step`` so that lines a killed run wrote after its last checkpoint are dropped and the
curves have no duplicate steps.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"


class MetricWriter:
    """Append scalar metrics to TensorBoard (tensorboardX, if installed), CSV and JSON lines under ``logdir``."""

    def __init__(self, logdir: str | Path, *, resume_step: int | None = None, tensorboard: bool = True):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.logdir / JSONL_NAME
        self.csv_path = self.logdir / CSV_NAME
        if resume_step is None:
            for path in (self.jsonl_path, self.csv_path):
                path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        new_csv = not self.csv_path.exists()
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        self._csv_file = self.csv_path.open("a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._csv_file)
        if new_csv:
            self._csv.writerow(["step", "name", "value"])
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log.warning("tensorboardX is not installed; no TensorBoard events are written")
            else:
                # purge_step hides events a killed run wrote after its last checkpoint.
                purge = 0 if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(str(self.logdir / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` (names to scalars) at ``step``."""
        values = {name: _to_float(value) for name, value in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._csv.writerow([int(step), name, repr(value)])
            if self._tb is not None:
                self._tb.add_scalar(name, value, int(step))
        self._csv_file.flush()

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _truncate_after(self, step: int) -> None:
        if self.jsonl_path.exists():
            kept = [line for line in self.jsonl_path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            self.jsonl_path.write_text("".join(line + "\n" for line in kept))
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as f:
                rows = list(csv.reader(f))
            kept = rows[:1] + [row for row in rows[1:] if int(row[0]) <= step]
            with self.csv_path.open("w", newline="") as f:
                csv.writer(f).writerows(kept)


def read_metrics(logdir: str | Path) -> list[dict[str, float]]:
    """All records of ``logdir/metrics.jsonl`` in order (an empty list if there is none)."""
    path = Path(logdir) / JSONL_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metric_history(records: list[dict[str, float]], name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric from :func:`read_metrics` records."""
    pairs = [(r["step"], r[name]) for r in records if name in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _to_float(value: Any) -> float:
    value = float(value)
    return value if math.isfinite(value) else float("nan")
