"""A model and its optax optimizer as one functional train state for ``jax.jit`` with shardings.

The NNX model is split once into a static graph (one for training mode, one for inference mode) and
pure array trees, so a train step is a plain function ``(TrainState, batch) -> (TrainState, metrics)``
that is compiled once:

* ``params``: the ``nnx.Param`` arrays (what the optimizer updates);
* ``model_state``: the other variables except RNG streams (BatchNorm statistics);
* ``rngs``: the drop-path RNG streams as built (constant).

Drop-path randomness is re-derived at every step from ``fold_in(initial key, step)``, so it depends only on
the seed and the step number: a run resumed from a checkpoint draws the same masks as an uninterrupted
one without saving RNG state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx


@flax.struct.dataclass
class TrainState:
    """Step counter, parameters, non-trainable model state and optimizer state (all arrays)."""

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    rngs: Any  # the model's RNG streams as built; each step folds the step number into their keys


@flax.struct.dataclass
class ModelGraphs:
    """The static halves of the split model: training-mode and inference-mode graph definitions."""

    train: Any = flax.struct.field(pytree_node=False)
    eval: Any = flax.struct.field(pytree_node=False)


def make_optimizer(
    schedule: Callable[[Any], Any],
    *,
    weight_decay: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW (decoupled decay, applied to every parameter as the official scripts do), optional clipping."""
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip_norm), adamw)
    return adamw


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation) -> tuple[ModelGraphs, TrainState]:
    """Split ``model`` into graphs and a :class:`TrainState` at step 0 (the model object is not modified)."""
    model.train()
    train_graph, params, rngs, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    model.eval()
    eval_graph = nnx.split(model, nnx.Param, nnx.RngState, ...)[0]
    model.train()
    params, rngs, model_state = nnx.as_pure(params), nnx.as_pure(rngs), nnx.as_pure(model_state)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=tx.init(params), rngs=rngs
    )
    return ModelGraphs(train=train_graph, eval=eval_graph), state


def merge_model(graphs: ModelGraphs, state: TrainState, *, train: bool = False) -> nnx.Module:
    """An NNX model carrying ``state``'s parameters and statistics (inference mode unless ``train``)."""
    graph = graphs.train if train else graphs.eval
    return nnx.merge(graph, state.params, state.rngs, state.model_state, copy=True)


def replace_model(graphs: ModelGraphs, state: TrainState, model: nnx.Module) -> TrainState:
    """``state`` with the parameters and statistics taken from ``model`` (e.g. after loading weights)."""
    _, params, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    params, model_state = nnx.as_pure(params), nnx.as_pure(model_state)
    _check_same_structure(state.params, params, "parameters")
    _check_same_structure(state.model_state, model_state, "model statistics")
    return state.replace(params=params, model_state=model_state)


def make_train_step(
    graphs: ModelGraphs,
    tx: optax.GradientTransformation,
    loss_fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]],
    schedule: Callable[[Any], Any],
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The un-jitted train step: forward in training mode, loss, gradients, AdamW update.

    ``loss_fn(logits, labels) -> (loss, parts)``. Metrics returned: ``loss``, each part, ``lr``,
    ``grad_norm``; all scalars.
    """

    def step_fn(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rngs = step_rngs(state.rngs, state.step)

        def compute_loss(params, rngs, model_state):
            model = nnx.merge(graphs.train, params, rngs, model_state)
            logits = model(batch["image"])
            loss, parts = loss_fn(logits, batch["label"])
            new_model_state = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState))))
            return loss, (parts, new_model_state)

        (loss, (parts, new_model_state)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            state.params, rngs, state.model_state
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **parts, "lr": jnp.asarray(schedule(state.step), jnp.float32),
                   "grad_norm": optax.tree.norm(grads)}
        new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state,
                                  opt_state=opt_state)
        return new_state, metrics

    return step_fn


def make_predict_fn(graphs: ModelGraphs) -> Callable[[TrainState, jax.Array], jax.Array]:
    """The un-jitted inference function ``(state, images) -> logits`` (inference mode: running BN stats)."""

    def predict(state: TrainState, images: jax.Array) -> jax.Array:
        model = nnx.merge(graphs.eval, state.params, state.rngs, state.model_state)
        return model(images).astype(jnp.float32)

    return predict


# ----------------------------------------------------------------------------------------------------------
# Optimizer state as a flat pure dict for Orbax (its namedtuples would need a restore target anyway).


def opt_state_to_dict(opt_state: Any) -> dict[str, Any]:
    """The optimizer state's leaves keyed by their zero-padded position (restore with the same optimizer)."""
    leaves = jax.tree.leaves(opt_state)
    return {f"{i:06d}": leaf for i, leaf in enumerate(leaves)}


def opt_state_from_dict(template: Any, flat: Mapping[str, Any]) -> Any:
    """Inverse of :func:`opt_state_to_dict` given a freshly initialised optimizer state as template."""
    leaves, treedef = jax.tree.flatten(template)
    if len(flat) != len(leaves):
        raise ValueError(
            f"optimizer state in the checkpoint has {len(flat)} arrays but this optimizer has {len(leaves)}; "
            "was it written with a different optimizer configuration?"
        )
    restored = []
    for i, leaf in enumerate(leaves):
        value = flat[f"{i:06d}"]
        if np.shape(value) != np.shape(leaf):
            raise ValueError(f"optimizer state array {i}: checkpoint shape {np.shape(value)} != expected {np.shape(leaf)}")
        restored.append(jnp.asarray(value, dtype=jnp.asarray(leaf).dtype))
    return jax.tree.unflatten(treedef, restored)


# ----------------------------------------------------------------------------------------------------------


def step_rngs(rngs: Any, step: jax.Array) -> Any:
    """The RNG streams for update ``step``: every key becomes ``fold_in(key, step)``, counters as built."""

    def fold(x):
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.fold_in(x, step)
        return x

    return jax.tree.map(fold, rngs)


def _check_same_structure(expected: Any, got: Any, what: str) -> None:
    exp = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    new = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    if exp.keys() != new.keys():
        missing, extra = sorted(exp.keys() - new.keys())[:5], sorted(new.keys() - exp.keys())[:5]
        raise ValueError(f"{what} differ in structure: missing {missing}, unexpected {extra}")
    for key, shape in exp.items():
        if new[key] != shape:
            raise ValueError(f"{what}: {key} has shape {new[key]}, expected {shape}")
