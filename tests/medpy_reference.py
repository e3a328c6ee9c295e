"""The independent metric reference of the tests (no tests here): TransUNet's per-case metric on top of medpy."""

from __future__ import annotations

import pytest

medpy_binary = pytest.importorskip("medpy.metric.binary")


def transunet_case(pred, gt):
    """TransUNet's calculate_metric_percase, written here on top of medpy as the reference."""
    pred, gt = pred > 0, gt > 0
    if pred.sum() > 0 and gt.sum() > 0:
        return medpy_binary.dc(pred, gt), medpy_binary.hd95(pred, gt)
    if pred.sum() > 0:
        return 1.0, 0.0
    return 0.0, 0.0
