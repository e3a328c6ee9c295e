"""The config vocabulary every training config shares: checks of the common fields, renamed fields.

Fine-tuning (``configs/common.py``) and pretraining (``configs/pretrain_imagenet.py``) configs use the same
names for the same things: ``batch_size``, ``epochs``, ``total_steps`` (0 = epochs x steps per epoch),
``seed``, ``accum_steps``, ``ema_decay`` (0 = off), ``bn_group_size`` (0 = whole batch), ``log_every_steps``,
``optim.*`` (see :mod:`rwkvunet_jax.train.optimizer`), ``data.root``, ``data.worker_count``,
``data.train_split`` / ``data.val_split``, ``data.max_bad_fraction`` / ``data.bad_fraction_min_examples``
(see :mod:`rwkvunet_jax.data.bad_examples`), ``eval.every_steps`` / ``eval.every_epochs`` (both 0 = off),
``eval.batch_size``, ``checkpoint.every_steps`` / ``keep`` / ``async_save``, ``debug.log_batches`` /
``debug.sigterm_at_step``. :data:`RENAMED` maps the names older configs used to the current ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# old field -> what to write instead
RENAMED: dict[str, str] = {
    "optim.base_lr": "optim.lr",
    "optim.base_batch": "optim.reference_batch",
    "optim.clip_norm": "optim.grad_clip_norm",
    "num_epochs": "epochs",
    "data.num_workers": "data.worker_count",
    "data.eval_split": "data.val_split",
    "data.seed": "seed",
    "eval.enabled": "eval.every_steps=0 and eval.every_epochs=0 (to switch evaluation off)",
}


def renamed_field_message(field: str) -> str | None:
    """A one-line hint if ``field`` (dotted, e.g. ``"optim.base_lr"``) is an old name, else None."""
    new = RENAMED.get(field.strip().strip("-").removeprefix("config."))
    return None if new is None else f"config field {field!r} was renamed: use {new}"


def renamed_override_message(argv: Sequence[str]) -> str | None:
    """The hint for the first ``--config.<old name>[=value]`` override in ``argv``, or None."""
    for arg in argv:
        if arg.startswith("--config."):
            message = renamed_field_message(arg[len("--config."):].split("=", 1)[0])
            if message is not None:
                return message
    return None


def check_common_fields(config: Any) -> None:
    """ValueError naming the field when a shared setting cannot work (or still has an old name)."""
    from rwkvunet_jax.train.optimizer import OPTIMIZERS, WEIGHT_DECAY_MASKS
    from rwkvunet_jax.train.schedules import SCHEDULES

    for old in RENAMED:  # e.g. a config file copied from an older version
        if _has_field(config, old):
            raise ValueError(renamed_field_message(old))
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {config.batch_size}")
    if config.total_steps < 0 or (config.total_steps == 0 and config.epochs <= 0):
        raise ValueError(f"set epochs > 0 or total_steps > 0 (epochs={config.epochs}, total_steps="
                         f"{config.total_steps}; total_steps=0 means epochs x steps per epoch)")
    if config.accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {config.accum_steps}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1) (0 = no EMA), got {config.ema_decay}")
    if config.bn_group_size < 0:
        raise ValueError(f"bn_group_size must be >= 0 (0 = statistics of the whole batch), got {config.bn_group_size}")
    if config.checkpoint.every_steps < 1 or config.log_every_steps < 1:
        raise ValueError("checkpoint.every_steps and log_every_steps must be >= 1")
    if config.data.worker_count < -1:
        raise ValueError(f"data.worker_count must be >= -1 (-1 = CPU cores - 2), got {config.data.worker_count}")
    if not config.data.max_bad_fraction >= 0 or config.data.bad_fraction_min_examples < 0:
        raise ValueError(f"data.max_bad_fraction and data.bad_fraction_min_examples must be >= 0 (1.0 = no limit), "
                         f"got {config.data.max_bad_fraction} and {config.data.bad_fraction_min_examples}")
    optim = config.optim
    for field, value, choices in (("name", optim.name, OPTIMIZERS), ("schedule", optim.schedule, SCHEDULES),
                                  ("weight_decay_mask", optim.weight_decay_mask, WEIGHT_DECAY_MASKS)):
        if value not in choices:
            raise ValueError(f"optim.{field} must be one of {choices}, got {value!r}")


def _has_field(config: Any, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return False
    return True
