"""Datasets and input pipelines (numpy out; nothing here knows about models or training).

``get_source(name, root, split)`` gives random-access 2-D examples, ``get_volumes`` the 3-D test volumes,
``train_iterator(source, transform, ...)`` the infinite, resumable, sharded grain iterator of transformed
batches (``RecipeTransform`` applies a segmentation augmentation recipe) and ``eval_batches`` plain
batches for evaluation. ``write_phantom_dataset`` makes the synthetic demo data.
Readers, grain, h5py and Pillow are imported on first use, so ``import rwkvunet_jax.data`` needs numpy only.
"""

from __future__ import annotations

import importlib
from typing import Any

from rwkvunet_jax.data.registry import (DATASETS, available_splits, default_augment, default_image_size,
                                        get_source, get_volumes, in_channels, num_classes)

_LAZY = {
    "SliceSource": "rwkvunet_jax.data.base",
    "RecipeTransform": "rwkvunet_jax.data.augment",
    "train_iterator": "rwkvunet_jax.data.pipeline",
    "eval_batches": "rwkvunet_jax.data.pipeline",
    "write_phantom_dataset": "rwkvunet_jax.data.phantom",
}

__all__ = ["DATASETS", "available_splits", "default_augment", "default_image_size", "get_source", "get_volumes",
           "in_channels", "num_classes", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rwkvunet_jax.data' has no attribute {name!r}")
