"""A model and its optax optimizer as one functional train state, for ``jax.jit`` with shardings.

The NNX model is split once into a static :class:`ModelDef` (graphs for training and inference mode,
the RNG streams as host constants) and a :class:`TrainState` of pure array trees, so a train step is a
plain function ``(TrainState, batch) -> (TrainState, metrics)`` compiled once:

* ``params``: the ``nnx.Param`` arrays (what the optimizer updates);
* ``batch_stats``: the ``nnx.BatchStat`` arrays (BatchNorm running statistics);
* ``opt_state``: the optax state; ``step``: updates done so far;
* ``ema_params``, ``ema_batch_stats``: exponential moving averages of the two, or None without EMA.

Drop-path randomness is re-derived at every step as ``fold_in(initial key, step)`` (see
:meth:`ModelDef.rngs`), so it depends only on the seed and the step number: a run resumed from a
checkpoint draws the same masks as an uninterrupted one without saving RNG state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Pytree = Any


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, BatchNorm statistics, optimizer state and optional EMA (all arrays)."""

    step: jax.Array
    params: Pytree
    batch_stats: Pytree
    opt_state: Pytree
    ema_params: Pytree = None
    ema_batch_stats: Pytree = None

    @property
    def has_ema(self) -> bool:
        return self.ema_params is not None

    def weights(self, *, ema: bool = False) -> tuple[Pytree, Pytree]:
        """``(params, batch_stats)``: the EMA copies with ``ema`` (an error if none are kept)."""
        if ema and not self.has_ema:
            raise ValueError("this train state keeps no EMA weights (ema_decay was 0)")
        return (self.ema_params, self.ema_batch_stats) if ema else (self.params, self.batch_stats)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
    """The static half of a split model: graph definitions and the RNG streams as host constants."""

    train_graph: Any
    eval_graph: Any
    rng_treedef: Any
    rng_leaves: tuple  # (is_key, numpy data, key impl or None) per leaf of the non-array-state remainder

    def rngs(self, step: jax.Array | int, *indices: jax.Array | int) -> Pytree:
        """The model's RNG streams for update ``step``: every key becomes ``fold_in(key, step)``, then
        ``fold_in`` of each of ``indices`` (micro-batch, BatchNorm group); other leaves stay as built."""
        leaves = []
        for is_key, data, impl in self.rng_leaves:
            if is_key:
                key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(data), impl=impl), step)
                for index in indices:
                    key = jax.random.fold_in(key, index)
                leaves.append(key)
            else:
                leaves.append(jnp.asarray(data))
        return jax.tree.unflatten(self.rng_treedef, leaves)

    def apply(self, params: Pytree, batch_stats: Pytree, images: jax.Array, *, train: bool,
              step: jax.Array | int = 0, indices: tuple = ()) -> tuple[jax.Array, Pytree]:
        """``(float32 logits, new batch_stats)`` of a forward pass (drop path and batch statistics with ``train``)."""
        graph = self.train_graph if train else self.eval_graph
        rngs = self.rngs(step, *indices) if train else self.rngs(0)
        module = nnx.merge(graph, nnx.State(params), nnx.State(batch_stats), nnx.State(rngs))
        logits = module(images).astype(jnp.float32)
        return logits, nnx.to_pure_dict(nnx.state(module, nnx.BatchStat))

    def merge(self, params: Pytree, batch_stats: Pytree) -> nnx.Module:
        """An NNX model (inference mode) carrying these weights (arrays copied)."""
        return nnx.merge(self.eval_graph, nnx.State(params), nnx.State(batch_stats), nnx.State(self.rngs(0)),
                         copy=True)


def split_model(model: nnx.Module) -> tuple[ModelDef, Pytree, Pytree]:
    """``(model_def, params, batch_stats)`` of ``model`` (left in training mode)."""
    model.train()
    graph_train, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    model.eval()
    graph_eval = nnx.graphdef(model)
    model.train()
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(rest))
    entries = []
    for leaf in leaves:
        is_key = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        data = np.asarray(jax.random.key_data(leaf)) if is_key else np.asarray(leaf)
        entries.append((is_key, data, jax.random.key_impl(leaf) if is_key else None))
    model_def = ModelDef(graph_train, graph_eval, treedef, tuple(entries))
    return model_def, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *,
                       ema: bool = False) -> tuple[ModelDef, TrainState]:
    """Split ``model`` into its :class:`ModelDef` and a :class:`TrainState` at step 0 (the model is not changed)."""
    model_def, params, batch_stats = split_model(model)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), ema_params=params if ema else None,
                       ema_batch_stats=batch_stats if ema else None)
    return model_def, state


# ----------------------------------------------------------------------------- checkpoint format


def model_state(params: Pytree, batch_stats: Pytree) -> dict:
    """The ``checkpoint.model_state`` format (one nested dict of parameters and BatchNorm statistics)."""
    return _deep_merge(params, batch_stats)


def split_model_state(merged: Mapping, params_like: Pytree, batch_stats_like: Pytree) -> tuple[dict, dict]:
    """Inverse of :func:`model_state`, taking the paths (and key types) of the two templates; ValueError
    naming the entry when ``merged`` lacks one or holds another shape."""
    params, batch_stats = _select_like(merged, params_like), _select_like(merged, batch_stats_like)
    _check_same_structure(params_like, params, "parameters")
    _check_same_structure(batch_stats_like, batch_stats, "BatchNorm statistics")
    return params, batch_stats


def _check_same_structure(expected: Pytree, got: Pytree, what: str) -> None:
    """ValueError naming the first differing paths or shapes of two trees."""
    exp = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    new = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    if exp.keys() != new.keys():
        missing, extra = sorted(exp.keys() - new.keys())[:5], sorted(new.keys() - exp.keys())[:5]
        raise ValueError(f"{what} differ in structure: missing {missing}, unexpected {extra}")
    for key, shape in exp.items():
        if new[key] != shape:
            raise ValueError(f"{what}: {key} has shape {new[key]}, expected {shape}")


def _deep_merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _deep_merge(out[key], value) if key in out and isinstance(value, Mapping) else value
    return out


def _select_like(tree: Mapping, template: Mapping) -> dict:
    """The entries of ``tree`` at the paths of ``template`` (keys matched as strings, template's key types)."""
    by_str = {str(k): v for k, v in tree.items()}
    out = {}
    for key, sub in template.items():
        if str(key) not in by_str:
            raise ValueError(f"the weights lack entry {key!r} (they have {sorted(by_str)[:8]})")
        value = by_str[str(key)]
        out[key] = _select_like(value, sub) if isinstance(sub, Mapping) else value
    return out
