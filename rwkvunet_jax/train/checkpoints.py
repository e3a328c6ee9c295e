"""Train-state checkpoints of every run (pretraining and fine-tuning): one Orbax manager directory.

Each step directory holds four items:

* ``model``: the weights to use, in the model-checkpoint format of :mod:`rwkvunet_jax.checkpoint`
  (the EMA weights when the run keeps an EMA, else the trained ones), so ``load_model``, ``evaluate``,
  ``predict`` and ``convert`` read a training step like a standalone checkpoint;
* ``optimizer``: ``step``, ``opt_state`` and, with an EMA, the trained weights (``trained``);
* ``data``: each process's grain iterator state, written and read by grain's own Orbax handler;
* ``meta``: JSON, with the model description under ``"model"``.

Restores are sharded: every array is read straight into the sharding of the running state (abstract
restore targets), so FSDP-split states never pass through one host. Saves are asynchronous; Orbax
writes into a temporary directory and renames it when complete, so a half-written step is never the
latest. With several processes, :meth:`TrainCheckpoints.reached_preemption` is Orbax's (JAX's
preemption service makes every process stop at the same step).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rwkvunet_jax.checkpoint import CheckpointError
from rwkvunet_jax.train.sharding import to_host
from rwkvunet_jax.train.state import TrainState, model_state, split_model_state

ITEMS = ("model", "optimizer", "data", "meta")


def _items(state: TrainState) -> tuple[dict, dict]:
    """The ``model`` and ``optimizer`` items of ``state`` (arrays, or abstract arrays, or shardings)."""
    optimizer = {"step": state.step, "opt_state": state.opt_state}
    if state.has_ema:
        optimizer["trained"] = model_state(state.params, state.batch_stats)
        return model_state(state.ema_params, state.ema_batch_stats), optimizer
    return model_state(state.params, state.batch_stats), optimizer


class TrainCheckpoints:
    """Saves and restores a :class:`TrainState`, the grain iterator state and JSON meta under ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int | None = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    # ---- listing

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def delete(self, step: int) -> None:
        self._manager.delete(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a preemption notice has reached the processes' common ``step``
        (Orbax's check of JAX's preemption service; False on a single process, see ``train.loop``)."""
        return bool(self._manager.reached_preemption(step))

    # ---- save

    def save(self, state: TrainState, *, iterator: Any, meta: Mapping[str, Any], force: bool = True) -> bool:
        """Starts an asynchronous save of ``state`` at its step (every process calls this).

        ``iterator``: the grain iterator that produced the last batch, or anything else whose ``get_state()``
        gives its state (e.g. a :class:`~rwkvunet_jax.train.failsafe.IteratorSnapshot` of an earlier moment);
        the state is read now, before the call returns. ``meta``: JSON-able, must hold the model description
        under ``"model"``.
        """
        import grain

        step = int(to_host(state.step))
        model, optimizer = _items(state)
        ocp = self._ocp
        return self._manager.save(step, force=force, args=ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            optimizer=ocp.args.StandardSave(optimizer),
            data=grain.checkpoint.CheckpointSave(_DataState(iterator.get_state())),
            meta=ocp.args.JsonSave(json.loads(json.dumps(dict(meta, step=step), default=str))),
        ))

    # ---- restore

    def read_meta(self, step: int) -> dict[str, Any]:
        """The ``meta`` item of checkpoint ``step``."""
        ocp = self._ocp
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # Orbax raises many types for damaged checkpoints
            raise CheckpointError(f"could not read the meta of step {step} in {self.directory}: {err}") from err

    def restore(self, step: int, *, like: TrainState, shardings: TrainState, iterator: Any = None,
                model_meta: Mapping[str, Any] | None = None) -> tuple[TrainState, dict[str, Any]]:
        """``(state, meta)`` of checkpoint ``step``, every array placed with ``shardings``.

        ``like`` is a state of the same structure (e.g. the fresh one); ``iterator`` (if given) is set to
        the saved data position. With ``model_meta``, a checkpoint of another model is refused with a
        :class:`CheckpointError` before any array is read.
        """
        import grain

        meta = self.read_meta(step)
        if model_meta is not None:
            expected = json.loads(json.dumps(model_meta))  # tuples -> lists, as stored
            if meta.get("model") != expected:
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step} holds a different model: {meta.get('model')} but the "
                    f"config builds {expected}; use another --workdir or the matching config")
        model_target, optimizer_target = _items(_abstract_state(like, shardings))
        ocp = self._ocp
        items = dict(model=ocp.args.StandardRestore(model_target),
                     optimizer=ocp.args.StandardRestore(optimizer_target))
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # Orbax raises many types for damaged or foreign checkpoints
            raise CheckpointError(
                f"could not restore the train state of step {step} from {self.directory} (written by another "
                f"optimizer or EMA setting, or an older version? its model item still loads with "
                f"`rwkvunet evaluate/convert`): {err}") from err
        model, optimizer = restored["model"], restored["optimizer"]
        params, batch_stats = split_model_state(model, like.params, like.batch_stats)
        state = like.replace(step=optimizer["step"], opt_state=optimizer["opt_state"])
        if like.has_ema:
            trained = split_model_state(optimizer["trained"], like.params, like.batch_stats)
            state = state.replace(params=trained[0], batch_stats=trained[1], ema_params=params,
                                  ema_batch_stats=batch_stats)
        else:
            state = state.replace(params=params, batch_stats=batch_stats)
        return state, meta

    def restore_data(self, step: int, iterator: Any) -> Any:
        """Sets ``iterator`` (a fresh grain iterator built like the run's) to the position saved at ``step``."""
        import grain

        self._manager.restore(step, args=self._ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
        return iterator

    # ---- lifetime

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> TrainCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _DataState:
    """An iterator state captured at save time, in the form grain's handler writes as it is: JSON bytes (the
    handler would otherwise call ``get_state()`` of a live iterator, which must then be a grain iterator). The
    file is the one grain writes for a ``DatasetIterator``, and restores into one."""

    def __init__(self, state: Any):
        self._json = state if isinstance(state, bytes) else json.dumps(state, indent=4).encode()

    def get_state(self) -> bytes:
        return self._json


def _abstract_state(state: TrainState, shardings: TrainState) -> TrainState:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state, shardings)
