"""Counting multiply-accumulates the way the paper (and thop) count them.

Layers call :func:`record` with the MACs of what they just computed; nothing is recorded unless a
:func:`counting` context is open, and the counter only ever sees static shapes, so it is meant to be
run under ``jax.eval_shape`` (see :func:`count_macs`), never inside a jitted step.

Convention (thop 0.1.1, which reproduces the paper's FLOPs): a convolution costs
``output elements x (in_channels / groups) x kh x kw``; a linear layer ``output elements x in_features``;
an affine BatchNorm or LayerNorm ``4 x input elements``; a bilinear resize ``11 x output elements``.
Activations, element-wise products, pooling and the WKV recurrence are free. thop cannot see the
``F.interpolate`` calls of the official CCM; the paper's figures include them, and so do we.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import jax

_COUNTER: contextvars.ContextVar[dict[str, int] | None] = contextvars.ContextVar(
    "rwkvunet_mac_counter", default=None
)


def record(kind: str, macs: int) -> None:
    """Adds ``macs`` under ``kind`` to the open counter, if any."""
    counter = _COUNTER.get()
    if counter is not None:
        counter[kind] += int(macs)


@contextlib.contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Opens a MAC counter; yields the dict of MACs per kind that layers fill in."""
    counter: dict[str, int] = defaultdict(int)
    token = _COUNTER.set(counter)
    try:
        yield counter
    finally:
        _COUNTER.reset(token)


def count_macs(fn: Callable[..., Any], *args: Any) -> dict[str, int]:
    """MACs of ``fn(*args)`` per kind (conv, linear, norm, resize), traced abstractly."""
    with counting() as counter:
        jax.eval_shape(fn, *args)
    return dict(counter)
