"""One bad example never kills a run: replace it deterministically, flag it, count it, cap the fraction.

Training pipelines read and augment through :class:`ReadAndTransform`, a grain random map over example
*indices*. When reading or transforming example ``i`` raises, it logs a WARNING naming the index and the
file or record, and takes example :func:`replacement_index` ``(i, attempt)`` instead: a function of the
failing index alone, so the data order, the augmentation and an exact resume are the same on every run.
The example carries ``"bad_index"``: the index that failed, or -1. After :data:`MAX_ATTEMPTS` failures in
a row the data is unreadable and :class:`BadDataError` stops the run.

The training loop feeds every batch's ``bad_index`` to a :class:`BadExampleCounter`, which logs the
running count (metric ``data/bad_examples``) and raises :class:`BadDataError` once more than
``max_fraction`` of the examples drawn were bad, counted from ``min_examples`` drawn examples on (so one
corrupt file early in a run does not stop it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 16
BAD_INDEX = "bad_index"
_STRIDE = 2654435761  # a prime near 2^32 / golden ratio: replacements land far from the failing index


class BadDataError(ValueError):
    """Too many examples could not be read or transformed."""


class BadFractionError(BadDataError):
    """More than ``data.max_bad_fraction`` of the drawn examples were bad (decided from counts that
    several processes can sum first, so every process raises it at the same step)."""


def describe(source, index: int) -> str:
    """``source.describe(index)`` (a file path or record key) when the source has it, else ``source[index]``."""
    method = getattr(source, "describe", None)
    if method is not None:
        try:
            return str(method(int(index)))
        except Exception:  # naming must never fail the run
            pass
    return f"{source!r}[{int(index)}]"


def replacement_index(index: int, attempt: int, size: int) -> int:
    """The example read in place of ``index`` after ``attempt`` (1, 2, ...) failures: fixed by the arguments."""
    if size < 2:
        return int(index)
    other = (int(index) + int(attempt) * _STRIDE) % size
    return other if other != index else (other + 1) % size


class ReadAndTransform:
    """grain random map ``index -> transform(source[index], rng)`` (or ``source[index]`` without a transform)
    that replaces a failing example and adds ``"bad_index"`` (int64: the failing index, -1 if none failed).

    The replacement continues with the same ``rng``, so a deterministic failure gives the same batch on
    every run. KeyboardInterrupt and SystemExit are not caught.
    """

    def __init__(self, source, transform: Callable[[Mapping[str, Any], np.random.Generator], dict] | None = None):
        self.source, self.transform = source, transform

    def __call__(self, index, rng: np.random.Generator) -> dict[str, Any]:
        first = current = int(index)
        errors = []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                example = self.source[current]
                example = self.transform(example, rng) if self.transform is not None else dict(example)
            except Exception as err:  # any reader or augmentation error of one example
                errors.append(f"{describe(self.source, current)}: {type(err).__name__}: {err}")
                nxt = replacement_index(first, attempt, len(self.source))
                log.warning("bad example %d (%s); using example %d instead", current, errors[-1], nxt)
                current = nxt
                continue
            example[BAD_INDEX] = np.int64(first if current != first else -1)
            return example
        raise BadDataError(f"{MAX_ATTEMPTS} examples in a row could not be read or transformed (the data or its "
                           f"decoder is broken), e.g. {errors[0]}")

    def __repr__(self) -> str:
        return f"ReadAndTransform({self.source!r}, {self.transform!r})"


class BadExampleCounter:
    """Counts the bad examples of the training batches and stops the run when they are too many.

    ``max_fraction``: the largest tolerated fraction of bad examples (1 or more switches the limit off);
    it applies once ``min_examples`` examples were drawn. ``name`` turns an index into a file or record
    name for the error message (:func:`describe` of the source).
    """

    def __init__(self, max_fraction: float, *, min_examples: int = 1000, name: Callable[[int], str] = str):
        if not max_fraction >= 0:
            raise ValueError(f"data.max_bad_fraction must be >= 0, got {max_fraction}")
        self.max_fraction, self.min_examples, self.name = float(max_fraction), int(min_examples), name
        self.seen = 0
        self.bad = 0
        self.examples: list[int] = []  # the first few bad indices, for the error message

    def update(self, batch: Mapping[str, Any], *, check: bool = True) -> int:
        """Counts ``batch["bad_index"]`` (a batch without it counts as clean) and, with ``check``, applies
        the limit; returns the number of bad examples in the batch."""
        flags = np.asarray(batch.get(BAD_INDEX, ()), np.int64).reshape(-1)
        self.seen += len(flags) if len(flags) else len(np.asarray(batch["label"]))
        bad = flags[flags >= 0]
        self.bad += len(bad)
        for index in bad:
            if len(self.examples) < 5 and int(index) not in self.examples:
                self.examples.append(int(index))
        if check:
            self.check()
        return len(bad)

    def check(self, seen: int | None = None, bad: int | None = None) -> None:
        """Raises :class:`BadFractionError` when ``bad / seen`` (this counter's own counts, or totals over
        processes) is over the limit, once ``min_examples`` were drawn."""
        seen = self.seen if seen is None else int(seen)
        bad = self.bad if bad is None else int(bad)
        fraction = bad / max(seen, 1)
        if seen < self.min_examples or self.max_fraction >= 1 or fraction <= self.max_fraction:
            return
        names = ", ".join(self.name(i) for i in self.examples) or "see the WARNING lines in the log"
        raise BadFractionError(
            f"{bad} of {seen} training examples ({100 * fraction:.2f}%) could not be read or transformed, "
            f"more than data.max_bad_fraction={self.max_fraction:g}; e.g. {names}")
