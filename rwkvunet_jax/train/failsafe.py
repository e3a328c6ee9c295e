"""A run that has trained steps never dies without a checkpoint.

The training loops call :func:`checkpoint_before_raising` from an ``except BaseException`` block and
then re-raise: a data error, a NaN guard, Ctrl-C or any other exception first saves the last completed
step (the loops' own save function, so the checkpoint resumes exactly), unless there is nothing new to save.
The loops' ``finally`` then waits for the asynchronous save to finish.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def checkpoint_before_raising(error: BaseException, *, step: int, start_step: int, latest_saved: int | None,
                              save: Callable[[], object], process_count: int = 1, collective: bool = False,
                              poisoned: bool = False) -> bool:
    """Saves step ``step`` with ``save()`` before ``error`` propagates; True if it saved.

    Nothing is saved when no step ran since ``start_step``, when ``latest_saved`` (the newest checkpoint,
    finished or in flight) is already ``step``, when the state is ``poisoned`` (its weights are not finite:
    resuming from it could only fail again), or when other processes cannot join the save (with several
    processes a save is collective: only errors that every process raises at the same step, ``collective``,
    are saved). A failing save is logged and never hides ``error``.
    """
    reason = type(error).__name__
    if step <= start_step:
        return False
    if latest_saved is not None and int(latest_saved) >= step:
        log.warning("%s at step %d: the checkpoint of step %d is already written", reason, step, step)
        return False
    if poisoned:
        log.warning("%s at step %d: not saving non-finite weights; the last checkpoint is step %s",
                    reason, step, latest_saved)
        return False
    if process_count > 1 and not collective:
        log.warning("%s at step %d on this process only: the other processes cannot join a checkpoint; the last "
                    "checkpoint is step %s", reason, step, latest_saved)
        return False
    log.warning("%s at step %d: saving a checkpoint of step %d before stopping", reason, step, step)
    try:
        save()
    except Exception as err:  # the original error matters more than a failed rescue
        log.error("could not save the checkpoint of step %d after %s: %s: %s", step, reason, type(err).__name__, err)
        return False
    return True


class IteratorSnapshot:
    """A data iterator's state captured now, readable later through the same ``get_state()``: the loops
    take one after each batch and keep the one of the last completed step for :func:`checkpoint_before_raising`
    (the live iterator may already be a batch further, or broken)."""

    def __init__(self, iterator: Any):
        self._state = copy.deepcopy(iterator.get_state())

    def get_state(self) -> Any:
        return self._state
