"""The optimizer of every training run: schedule, weight-decay mask, clipping, from the ``optim`` config.

``optim`` fields (the same in every config, see ``configs/common.py`` and ``configs/pretrain_imagenet.py``):

* ``name``: ``"adamw"`` (decoupled weight decay) or ``"sgd"`` (with ``momentum``; the sharding tests use it
  because Adam magnifies summation-order round-off of near-zero gradients);
* ``lr``, ``min_lr``, ``warmup_init_lr``: the peak, final and warm-up start learning rates. With
  ``reference_batch > 0`` all three are given for that batch size and scale linearly to the run's batch
  (the EMO trainer of the official pretraining: ``lr * batch / 512``, warm-up start and minimum alike);
* ``schedule`` (see :mod:`rwkvunet_jax.train.schedules`), ``poly_power``, ``period_steps``;
  ``warmup_steps``, or when that is 0 ``warmup_epochs`` (converted with the steps per epoch);
* ``weight_decay`` and ``weight_decay_mask`` (see :func:`weight_decay_mask`), ``b1``, ``b2``, ``eps``;
* ``grad_clip_norm``: clip the global gradient norm to this value (0 = off).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from rwkvunet_jax.train import schedules

OPTIMIZERS = ("adamw", "sgd")
WEIGHT_DECAY_MASKS = ("all", "timm")
# Parameters held as (C,) here whose official PyTorch tensor is (1, 1, C): the token-shift mixes.
_VECTORS_2D_IN_TORCH = ("spatial_mix_",)

Pytree = Any


def weight_decay_mask(params: Pytree, rule: str = "timm") -> Pytree:
    """A tree of booleans, True where weight decay applies.

    ``"all"``: every parameter (the official segmentation trainers give ``model.parameters()`` to AdamW).
    ``"timm"``: timm's rule as the official pretraining applied it to the PyTorch model: tensors with one
    dimension (biases, norm scales and shifts, ``spatial_decay``, ``spatial_first``) are exempt. It is
    judged on the official tensor's shape, so the token-shift mixes ``spatial_mix_k/v/r``, (1, 1, C) there
    and (C,) here, are decayed, matched by name.
    """
    if rule not in WEIGHT_DECAY_MASKS:
        raise ValueError(f"optim.weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got {rule!r}")

    def decays(path, leaf) -> bool:
        if rule == "all" or jax.numpy.ndim(leaf) > 1:
            return True
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        return name.startswith(_VECTORS_2D_IN_TORCH)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(schedule: Callable[[Any], Any], params: Pytree, *, name: str = "adamw", weight_decay: float = 0.0,
                   weight_decay_mask_rule: str = "all", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   momentum: float = 0.0, grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
    """AdamW or SGD following ``schedule``, with global-norm clipping first when ``grad_clip_norm > 0``.

    ``params`` (arrays or shapes) gives the structure the weight-decay mask is built for.
    """
    if name == "adamw":
        mask = weight_decay_mask(params, weight_decay_mask_rule)
        core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    elif name == "sgd":
        core = optax.sgd(schedule, momentum=momentum or None)
    else:
        raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {name!r}")
    if grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(grad_clip_norm), core)
    return core


def schedule_from_config(optim: Mapping[str, Any], *, batch_size: int, steps_per_epoch: int,
                         total_steps: int) -> schedules.Schedule:
    """The learning-rate schedule the ``optim`` config describes, for a run of ``total_steps`` updates."""
    scale = batch_size / optim["reference_batch"] if optim["reference_batch"] > 0 else 1.0
    warmup = int(optim["warmup_steps"]) or int(round(optim["warmup_epochs"] * steps_per_epoch))
    return schedules.make_schedule(
        optim["schedule"], lr=optim["lr"] * scale, total_steps=total_steps, min_lr=optim["min_lr"] * scale,
        warmup_steps=min(warmup, total_steps - 1), warmup_init_lr=optim["warmup_init_lr"] * scale,
        power=optim["poly_power"], period_steps=int(optim["period_steps"]))


def optimizer_from_config(optim: Mapping[str, Any], schedule: Callable[[Any], Any],
                          params: Pytree) -> optax.GradientTransformation:
    """:func:`make_optimizer` with the ``optim`` config's settings."""
    return make_optimizer(schedule, params, name=optim["name"], weight_decay=optim["weight_decay"],
                          weight_decay_mask_rule=optim["weight_decay_mask"], b1=optim["b1"], b2=optim["b2"],
                          eps=optim["eps"], momentum=optim["momentum"], grad_clip_norm=optim["grad_clip_norm"])
