"""The one train step of every run (pretraining and fine-tuning), jitted with explicit shardings.

``build_steps`` places a :class:`~rwkvunet_jax.train.state.TrainState` on a ``(data, fsdp)`` mesh and
compiles ``train_step(state, batch) -> (state, metrics)``: forward in training mode, ``loss_fn``,
gradients, optimizer update, and as options

* ``accum_steps = k``: the global batch is split into k micro-batches (micro-batch i takes rows i, i + k,
  ..., so every device keeps 1/k of its rows in each) whose gradients are averaged in a ``lax.scan``.
  BatchNorm statistics are then those of each micro-batch, as with a smaller batch; everything else
  equals one big step.
* ``bn_group_size = g``: BatchNorm normalises each group of g consecutive images with that group's
  statistics (what data parallelism without SyncBN does with g images per device; the official ImageNet
  run had 128), and the running averages take the mean of the groups' statistics. With g equal to the
  per-device batch every group lies on one device. 0: statistics of the whole (micro-)batch.
* ``ema_decay = d > 0``: the state keeps ``ema = d * ema + (1 - d) * new`` of parameters and statistics.

Metrics (scalars): ``loss``, the parts ``loss_fn`` returns, ``grad_norm``, ``param_norm`` and ``lr``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rwkvunet_jax.train import sharding as shd
from rwkvunet_jax.train.state import ModelDef, TrainState, create_train_state

Batch = Mapping[str, jax.Array]
# (logits, batch) -> (scalar loss, {name: scalar}); the batch is the (micro-)batch the logits belong to.
LossFn = Callable[[jax.Array, Batch], tuple[jax.Array, Mapping[str, jax.Array]]]
InputFn = Callable[[Batch], jax.Array]


def _images(batch: Batch) -> jax.Array:
    return batch["image"]


def make_train_step(model_def: ModelDef, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                    input_fn: InputFn = _images, schedule: Callable | None = None, ema_decay: float = 0.0,
                    accum_steps: int = 1, bn_group_size: int = 0,
                    mesh: jax.sharding.Mesh | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The un-jitted train step (see the module docstring). ``input_fn(batch)`` gives the network input."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    if bn_group_size < 0:
        raise ValueError(f"bn_group_size must be >= 0, got {bn_group_size}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}")

    def forward(params, batch_stats, images, step, micro):
        n = images.shape[0]
        if not bn_group_size or bn_group_size >= n:
            return model_def.apply(params, batch_stats, images, train=True, step=step, indices=micro)
        if n % bn_group_size:
            raise ValueError(f"a (micro-)batch of {n} images does not split into BatchNorm groups of {bn_group_size}")

        def one_group(group_images, group):
            return model_def.apply(params, batch_stats, group_images, train=True, step=step,
                                   indices=micro + (group,))

        grouped = images.reshape((n // bn_group_size, bn_group_size) + images.shape[1:])
        logits, stats = jax.vmap(one_group)(grouped, jnp.arange(n // bn_group_size))
        return logits.reshape((n,) + logits.shape[2:]), jax.tree.map(lambda s: s.mean(axis=0), stats)

    def loss_and_grads(params, batch_stats, batch, step, micro):
        def compute(params):
            logits, new_stats = forward(params, batch_stats, input_fn(batch), step, micro)
            loss, parts = loss_fn(logits, batch)
            return loss, (dict(parts), new_stats)

        (loss, (parts, new_stats)), grads = jax.value_and_grad(compute, has_aux=True)(params)
        return loss, parts, grads, new_stats

    def split(x):
        # Micro-batch i takes rows i, i + k, ...: every device keeps 1/k of its rows in each micro-batch.
        x = jnp.moveaxis(x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]), 1, 0)
        if mesh is None:
            return x
        spec = jax.sharding.PartitionSpec(None, shd.data_sharding(mesh).spec[0])
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        step = state.step
        if accum_steps == 1:
            loss, parts, grads, new_stats = loss_and_grads(state.params, state.batch_stats, batch, step, ())
        else:
            def body(carry, xs):
                grad_sum, stats = carry
                micro_batch, micro = xs
                loss, parts, grads, stats = loss_and_grads(state.params, stats, micro_batch, step, (micro,))
                return (jax.tree.map(jnp.add, grad_sum, grads), stats), (loss, parts)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grad_sum, new_stats), (micro_losses, micro_parts) = jax.lax.scan(
                body, (zeros, state.batch_stats), (jax.tree.map(split, dict(batch)), jnp.arange(accum_steps)))
            grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
            loss = micro_losses.mean()
            parts = jax.tree.map(lambda p: p.mean(axis=0), micro_parts)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
        if state.has_ema:
            ema = lambda e, p: e * ema_decay + p.astype(e.dtype) * (1.0 - ema_decay)  # noqa: E731
            new_state = new_state.replace(ema_params=jax.tree.map(ema, state.ema_params, params),
                                          ema_batch_stats=jax.tree.map(ema, state.ema_batch_stats, new_stats))
        metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(step), jnp.float32)
        return new_state, metrics

    return train_step


def make_predict_fn(model_def: ModelDef) -> Callable:
    """The un-jitted inference function ``(params, batch_stats, images) -> float32 logits`` (running statistics)."""

    def predict(params, batch_stats, images):
        return model_def.apply(params, batch_stats, images, train=False)[0]

    return predict


@dataclasses.dataclass
class TrainSteps:
    """A placed initial :class:`TrainState`, its shardings and the jitted train step (from :func:`build_steps`)."""

    model_def: ModelDef
    mesh: jax.sharding.Mesh
    state: TrainState
    shardings: TrainState
    train_step: Callable[[TrainState, Batch], tuple[TrainState, dict]]

    def to_model(self, state: TrainState, *, ema: bool = False) -> nnx.Module:
        """The model (inference mode) holding the plain or EMA weights of ``state``."""
        return self.model_def.merge(*shd.to_host(state.weights(ema=ema)))


def build_steps(model: nnx.Module, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                mesh: jax.sharding.Mesh, input_fn: InputFn = _images, schedule: Callable | None = None,
                ema_decay: float = 0.0, accum_steps: int = 1, bn_group_size: int = 0, fsdp: bool = False,
                fsdp_min_size: int = shd.DEFAULT_FSDP_MIN_SIZE, sharding_rules=()) -> TrainSteps:
    """Splits ``model`` into a train state placed on ``mesh`` (FSDP-split by the rules with ``fsdp``) and
    jits :func:`make_train_step` with the state donated and the batch split over the mesh's batch axes."""
    model_def, state = create_train_state(model, tx, ema=ema_decay > 0)
    shardings = shd.state_shardings(state, mesh, fsdp=fsdp, min_size=fsdp_min_size, rules=sharding_rules)
    state = shd.place(state, shardings)
    step = make_train_step(model_def, tx, loss_fn, input_fn=input_fn, schedule=schedule, ema_decay=ema_decay,
                           accum_steps=accum_steps, bn_group_size=bn_group_size, mesh=mesh)
    jitted = jax.jit(step, in_shardings=(shardings, shd.data_sharding(mesh)),
                     out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
    return TrainSteps(model_def=model_def, mesh=mesh, state=state, shardings=shardings, train_step=jitted)
