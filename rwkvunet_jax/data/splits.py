"""Seeded train/val/test splits of a list of examples (the paper's 8:1:1 and 9:1 splits).

The official code for these splits is not public; ours: sort the ids, permute them with
``numpy.random.RandomState(split_seed)`` (a frozen stream, identical on every numpy version), take the
first ``round(n * f_train)`` ... as train, the next ``round(n * f_val)`` as val and the rest as test.
The paper averages three random states; pass ``split_seed`` 0, 1, 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """(n_train, n_val, n_test); val and test are rounded, train takes the rest."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    n_val, n_test = int(round(n * fractions[1])), int(round(n * fractions[2]))
    return n - n_val - n_test, n_val, n_test


def ratio_split(num_items: int, split: str, *, split_seed: int,
                fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[int]:
    """Sorted indices (into a sorted id list of length ``num_items``) that belong to ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n_train, n_val, _ = split_sizes(num_items, fractions)
    order = np.random.RandomState(int(split_seed)).permutation(num_items)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, num_items)}
    start, stop = bounds[split]
    return sorted(int(i) for i in order[start:stop])
