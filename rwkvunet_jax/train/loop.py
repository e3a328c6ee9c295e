"""The training loop every run shares (pretraining and fine-tuning), and what it needs around it.

:func:`run_loop` takes batches from a grain iterator, runs the jitted train step, logs averaged metrics
(``train/<name>``) every ``config.log_every_steps``, calls the task's ``after_step`` hook (validation,
exports), and saves a train-state checkpoint every ``config.checkpoint.every_steps``, at the last step
and when the job is preempted (SIGTERM; with several processes every process stops at the same step).
Around that, for every run alike:

* a progress bar (:mod:`rwkvunet_jax.train.progress`) that says "compiling" until the first step returns;
* bad examples (:mod:`rwkvunet_jax.data.bad_examples`): each batch's ``"bad_index"`` is counted (metric
  ``data/bad_examples``, summed over processes) and more than ``data.max_bad_fraction`` of the drawn
  examples stops the run with a :class:`~rwkvunet_jax.data.bad_examples.BadFractionError` naming some;
* a run that has trained steps never dies without a checkpoint (:mod:`rwkvunet_jax.train.failsafe`): on
  any exception, Ctrl-C included, the last completed step is saved with the data position after its
  batch before the exception propagates.

It reads only the config fields every training config has (``configs/common.py``,
``configs/pretrain_imagenet.py``): ``batch_size``, ``log_every_steps``, ``checkpoint.every_steps``,
``data.max_bad_fraction``, ``data.bad_fraction_min_examples``, ``debug.log_batches`` and
``debug.sigterm_at_step``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rwkvunet_jax.data.bad_examples import BAD_INDEX, BadExampleCounter, BadFractionError
from rwkvunet_jax.train import PREEMPTED_EXIT_CODE, failsafe
from rwkvunet_jax.train import sharding as shd
from rwkvunet_jax.train.progress import step_bar
from rwkvunet_jax.train.checkpoints import TrainCheckpoints
from rwkvunet_jax.train.state import TrainState
from rwkvunet_jax.train.step import TrainSteps

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class MetricWindow:
    """The metrics of the steps since the last log line: averaged, checked for NaN, with images per second.

    The clock restarts with :meth:`restart_clock` (after compilation, validation or a checkpoint), so the
    throughput counts training steps only.
    """

    def __init__(self, batch_size: int):
        self.batch_size = int(batch_size)
        self._entries: list[tuple[int, Mapping[str, Any]]] = []
        self.restart_clock()

    def __len__(self) -> int:
        return len(self._entries)

    def restart_clock(self) -> None:
        self._start, self._timed = time.perf_counter(), 0

    def add(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._entries.append((step, metrics))
        self._timed += 1

    def flush(self) -> dict[str, float]:
        """``{"train/<name>": mean, ..., "train/lr": last, "train/images_per_sec": ...}``; empties the window.

        Raises :class:`NonFiniteLossError` naming the first step whose loss is not finite.
        """
        host = shd.to_host([m for _, m in self._entries])  # waits for the steps to finish
        seconds = time.perf_counter() - self._start
        for (step, _), metrics in zip(self._entries, host):
            if not np.isfinite(metrics["loss"]):
                raise NonFiniteLossError(
                    f"training loss is {float(metrics['loss'])} at step {step}; lower optim.lr, check the data "
                    f"(labels within [0, num_classes)), or try float32 compute")
        record = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
        if "lr" in host[-1]:
            record["train/lr"] = float(host[-1]["lr"])
        if self._timed:
            record["train/images_per_sec"] = self._timed * self.batch_size / max(seconds, 1e-9)
        self._entries = []
        return record


class PreemptionWatcher:
    """Tells the loop when to save and stop: SIGTERM on any process -> the same step everywhere.

    With several processes this is Orbax's ``reached_preemption`` (JAX's preemption service, started by
    ``jax.distributed``, catches SIGTERM and agrees on a step); on one process a Python handler sets a flag.
    """

    def __init__(self, checkpoints: TrainCheckpoints):
        self.checkpoints = checkpoints
        self.multiprocess = jax.process_count() > 1
        self._flag = False
        self._previous = None
        if not self.multiprocess:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary")
        self._flag = True

    def reached(self, step: int) -> bool:
        return self.checkpoints.reached_preemption(step) if self.multiprocess else self._flag

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def batch_fingerprint(batch: Mapping[str, np.ndarray]) -> str:
    """A short hash of a host batch (``debug.log_batches`` writes one per step and process)."""
    digest = hashlib.sha1()
    for key in sorted(batch):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:16]


def config_dict(config: Any) -> dict:
    """The config as a JSON-able dict (what ``config.json`` and checkpoint meta hold)."""
    to_dict = getattr(config, "to_dict", None)
    return json.loads(json.dumps(to_dict() if to_dict else dict(config), default=str))


def restore_latest(checkpoints: TrainCheckpoints, steps: TrainSteps, iterator: Any, *,
                   model_meta: Mapping[str, Any]) -> tuple[TrainState, dict[str, Any] | None, int | None]:
    """``(state, meta, step)`` of the latest checkpoint (iterator moved to its data position), or the
    fresh state with ``(None, None)`` when there is none."""
    step = checkpoints.latest_step()
    if step is None:
        return steps.state, None, None
    state, meta = checkpoints.restore(step, like=steps.state, shardings=steps.shardings, iterator=iterator,
                                      model_meta=model_meta)
    return state, meta, step


@dataclasses.dataclass
class LoopResult:
    """Where :func:`run_loop` stopped."""

    state: TrainState
    step: int
    preempted: bool


def run_loop(config: Any, *, steps: TrainSteps, state: TrainState, iterator: Any, checkpoints: TrainCheckpoints,
             total_steps: int, steps_per_epoch: int, writer: Any, meta_fn: Callable[[int, bool], dict],
             after_step: Callable[[int, TrainState], Any] | None = None, progress: bool = True,
             desc: str = "train", workdir: str | Path | None = None, name_example: Callable[[int], str] = str,
             stop_after_step: int | None = None) -> LoopResult:
    """Trains from ``state`` (at its step) to ``total_steps`` (see the module docstring).

    ``writer``: a MetricWriter on the primary process, None elsewhere. ``meta_fn(step, preempted)``: the
    checkpoint's JSON meta. ``after_step(step, state)``: runs after the step's log line and before its
    checkpoint. ``name_example(index)``: the file or record of a training example, for the message of too
    many bad examples (e.g. ``bad_examples.describe`` of the source). ``stop_after_step``: stop there
    without a checkpoint (what a kill leaves; for tests).

    Bad examples are checked over all processes at every log step (a collective, so every process stops
    at the same step); a single process also checks on drawing each batch after the run's first (the
    first batch of a run always trains, so that a stop has a step to checkpoint and a count in the metrics).
    """
    step = first = int(shd.to_host(state.step))
    primary = shd.is_primary()
    process_count = jax.process_count()
    window = MetricWindow(config.batch_size)
    watcher = PreemptionWatcher(checkpoints)
    bad_examples = BadExampleCounter(config.data.max_bad_fraction, min_examples=config.data.bad_fraction_min_examples,
                                     name=name_example)
    bar = step_bar(progress and primary, total=total_steps, initial=step, desc=desc)
    batch_log = None
    if config.debug.log_batches and workdir is not None:
        (Path(workdir) / "batch_log").mkdir(parents=True, exist_ok=True)
        batch_log = (Path(workdir) / "batch_log" / f"process_{jax.process_index()}.jsonl").open("a")
    preempted = False
    data_position = failsafe.IteratorSnapshot(iterator)  # the data position after the last completed step
    t_first = time.perf_counter()
    try:
        while step < total_steps:
            batch = next(iterator)
            drawn = failsafe.IteratorSnapshot(iterator)
            if batch_log is not None:
                batch_log.write(json.dumps({"step": step, "hash": batch_fingerprint(batch)}) + "\n")
                batch_log.flush()
            bad_examples.update(batch, check=process_count == 1 and step > first)
            batch = {k: v for k, v in batch.items() if k != BAD_INDEX}
            state, metrics = steps.train_step(state, shd.host_local_batch_to_global(batch, steps.mesh))
            step += 1
            data_position = drawn
            window.add(step, metrics)
            if step == first + 1:  # keep compilation out of the throughput figures
                jax.block_until_ready(metrics)
                log.info("first step compiled and ran in %.1f s", time.perf_counter() - t_first)
                window.restart_clock()
            if config.debug.sigterm_at_step and step == config.debug.sigterm_at_step and jax.process_index() == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # rehearses a preemption notice
            flushed = False
            if step % config.log_every_steps == 0 or step == total_steps or step == stop_after_step:
                record = window.flush()
                record["train/epoch"] = step / steps_per_epoch
                seen, bad = _summed_over_processes(bad_examples.seen, bad_examples.bad)
                record["data/bad_examples"] = bad
                flushed = True
                if writer is not None:
                    writer.write(step, record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record.get('train/lr', math.nan):.2e}")
                bad_examples.check(seen, bad)
            if bar is not None:
                bar.update(1)
            if after_step is not None:
                after_step(step, state)
            preempted = watcher.reached(step)
            if preempted or step % config.checkpoint.every_steps == 0 or step == total_steps:
                checkpoints.save(state, iterator=data_position, meta=meta_fn(step, preempted))
            if flushed:  # throughput excludes validation and checkpoint time
                window.restart_clock()
            if preempted:
                log.warning("preempted: checkpoint at step %d written; exiting with code %d", step,
                            PREEMPTED_EXIT_CODE)
                break
            if stop_after_step is not None and step >= stop_after_step:
                break
    except BaseException as err:
        failsafe.checkpoint_before_raising(
            err, step=step, start_step=first, latest_saved=checkpoints.latest_step(), process_count=process_count,
            collective=isinstance(err, BadFractionError), poisoned=isinstance(err, NonFiniteLossError),
            save=lambda: checkpoints.save(state, iterator=data_position,
                                          meta=dict(meta_fn(step, False), stopped_by=type(err).__name__)))
        raise
    finally:
        watcher.close()
        checkpoints.wait_until_finished()
        if bar is not None:
            bar.close()
        if batch_log is not None:
            batch_log.close()
    return LoopResult(state=state, step=step, preempted=preempted)


def _summed_over_processes(*counts: int) -> tuple[int, ...]:
    """``counts`` summed over every process (a collective: all processes call it at the same step)."""
    if jax.process_count() == 1:
        return tuple(int(c) for c in counts)
    from jax.experimental import multihost_utils

    return tuple(int(v) for v in multihost_utils.process_allgather(np.array(counts, np.int64)).sum(0))
