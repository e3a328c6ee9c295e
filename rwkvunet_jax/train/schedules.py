"""Learning-rate schedules of the paper and of the official training scripts (optax schedules of the step).

``step`` counts optimizer updates from 0; the value at ``step`` is the learning rate of that update.

* ``cosine``: optional linear warm-up, then cosine from ``base_lr`` to ``min_lr`` over the remaining steps
  (the paper's AdamW + CosineAnnealingLR, annealed per iteration).
* ``poly``: ``base_lr * (1 - step / total_steps) ** power`` (power 0.9), what the official Synapse trainer
  writes into the optimizer after every iteration (its per-epoch cosine only perturbs one update per epoch).
* ``cosine_restarts``: the official ACDC quirk. ``CosineAnnealingLR(T_max=period_steps, eta_min=min_lr)``
  stepped per *iteration* with ``T_max = 3 * epochs // 4`` (112 at 150 epochs), so the learning rate keeps
  oscillating with a period of ``2 * period_steps`` updates: ``min + (base - min) (1 + cos(pi step / T)) / 2``.
* ``constant``: ``base_lr`` (after the optional warm-up).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "poly", "cosine_restarts", "constant")

Schedule = Callable[[int], jnp.ndarray]


def make_schedule(
    name: str,
    *,
    base_lr: float,
    total_steps: int,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
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
    if base_lr <= 0 or min_lr < 0:
        raise ValueError(f"learning rates must be positive (base_lr={base_lr}, min_lr={min_lr})")
    decay_steps = total_steps - warmup_steps

    if name == "cosine":
        main = optax.cosine_decay_schedule(base_lr, decay_steps=decay_steps, alpha=min_lr / base_lr)
    elif name == "poly":
        main = optax.polynomial_schedule(base_lr, end_value=0.0, power=power, transition_steps=decay_steps)
    elif name == "constant":
        main = optax.constant_schedule(base_lr)
    else:
        if period_steps <= 0:
            raise ValueError(f"cosine_restarts needs period_steps > 0 (the official T_max), got {period_steps}")

        def main(step):
            phase = jnp.pi * jnp.asarray(step, jnp.float32) / period_steps
            return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + jnp.cos(phase))

    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, base_lr, transition_steps=warmup_steps)
    return optax.join_schedules([warmup, main], boundaries=[warmup_steps])
