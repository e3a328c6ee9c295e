"""Learning-rate schedules of the paper and of the official training scripts (optax schedules of the step).

``step`` counts optimizer updates from 0; the value at ``step`` is the learning rate of that update.

* ``cosine``: optional linear warm-up, then cosine from ``lr`` to ``min_lr`` over the remaining steps
  (the paper's AdamW + CosineAnnealingLR, annealed per iteration).
* ``timm_cosine``: timm's ``CosineLRScheduler`` as the official ImageNet pretraining ran it (per
  iteration, no warm-up prefix): ``min_lr + (lr - min_lr) (1 + cos(pi step / total_steps)) / 2`` on a
  clock that starts at step 0, with its first ``warmup_steps`` replaced by the linear warm-up.
* ``poly``: ``lr * (1 - step / total_steps) ** power`` (power 0.9), what the official Synapse trainer
  writes into the optimizer after every iteration (its per-epoch cosine only perturbs one update per epoch).
* ``cosine_restarts``: ``CosineAnnealingLR(T_max=period_steps, eta_min=min_lr)`` stepped per *iteration*
  although ``T_max`` counts epochs, as the official ACDC trainer does, so the learning rate keeps
  oscillating with a period of ``2 * period_steps`` updates: ``min + (lr - min) (1 + cos(pi step / T)) / 2``.
* ``constant``: ``lr`` (after the optional warm-up).

Every warm-up is linear from ``warmup_init_lr`` (default 0) to ``lr`` over ``warmup_steps`` updates.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "timm_cosine", "poly", "cosine_restarts", "constant")

Schedule = Callable[[int], jnp.ndarray]


def make_schedule(
    name: str,
    *,
    lr: float,
    total_steps: int,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    warmup_init_lr: float = 0.0,
    power: float = 0.9,
    period_steps: int = 0,
) -> Schedule:
    """Build a schedule by name (see the module docstring); raises ValueError on bad arguments."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}), got {warmup_steps}")
    if lr <= 0 or min_lr < 0 or warmup_init_lr < 0:
        raise ValueError(f"learning rates must be positive (lr={lr}, min_lr={min_lr}, warmup_init_lr={warmup_init_lr})")
    decay_steps = total_steps - warmup_steps

    if name == "timm_cosine":
        def main(step):
            t = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps)
            return min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / total_steps))
    elif name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=decay_steps, alpha=min_lr / lr)
    elif name == "poly":
        main = optax.polynomial_schedule(lr, end_value=0.0, power=power, transition_steps=decay_steps)
    elif name == "constant":
        main = optax.constant_schedule(lr)
    else:
        if period_steps <= 0:
            raise ValueError(f"cosine_restarts needs period_steps > 0 (the official T_max), got {period_steps}")

        def main(step):
            phase = jnp.pi * jnp.asarray(step, jnp.float32) / period_steps
            return min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(phase))

    if warmup_steps == 0:
        return main

    def warmup(step):  # timm's form, exact at step 0 (optax's linear_schedule rounds the start in float32)
        return warmup_init_lr + (lr - warmup_init_lr) * jnp.asarray(step, jnp.float32) / warmup_steps

    if name == "timm_cosine":  # the cosine clock does not restart after the warm-up
        return lambda step: jnp.where(jnp.asarray(step) < warmup_steps, warmup(step), main(step))
    return optax.join_schedules([warmup, main], boundaries=[warmup_steps])
