"""RWKV-UNet in JAX/Flax NNX.

Public entry points are loaded lazily so that ``import rwkvunet_jax`` stays cheap and never pulls in
optional extras (grain, tfds, torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": ("rwkvunet_jax.models.registry", "create_model"),
    "list_models": ("rwkvunet_jax.models.registry", "list_models"),
    "bi_wkv": ("rwkvunet_jax.wkv", "bi_wkv"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rwkvunet_jax' has no attribute {name!r}")
