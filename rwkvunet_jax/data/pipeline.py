"""Input pipelines: an infinite, resumable, sharded grain iterator for training and plain eval batches.

Training order (grain ``MapDataset``, lazy and random-access)::

    indices -> shuffle(seed) -> repeat(forever, reshuffled every epoch) -> read + augment(seed)
            -> every shard_count-th element from shard_index -> batch(drop_remainder) -> iterator

The shuffle and the augmentation seeds cover the global stream and each host keeps every
``shard_count``-th element of it, so hosts see disjoint examples within an epoch, no example is dropped,
and every position has its own augmentation randomness. An iterator state (``it.get_state()``) restores
into a fresh iterator built with the same arguments (``it.set_state(state)``) and continues with the
exact next batch, with or without worker processes. An example that cannot be read or augmented is
logged and replaced by another one chosen from its index alone (:mod:`rwkvunet_jax.data.bad_examples`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from rwkvunet_jax.data.augment import RECIPES, augment, resize_pair
from rwkvunet_jax.data.bad_examples import ReadAndTransform


class _Augment:
    """(example dict, rng) -> {"image", "label"} at the network size; a picklable grain random map."""

    def __init__(self, recipe: str, size: tuple[int, int], options: Mapping[str, Any]):
        self.recipe, self.size, self.options = recipe, tuple(size), dict(options)

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image, label = augment(self.recipe, example["image"], example["label"], rng, size=self.size,
                               **self.options)
        return {"image": image, "label": label}

    def __repr__(self) -> str:
        return f"Augment({self.recipe!r}, size={self.size}, options={self.options})"


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be (height, width) of positive ints, got {image_size!r}")
    return size


def train_iterator(source, *, augment: str, image_size: Sequence[int], batch_size: int, seed: int,
                   shard_index: int = 0, shard_count: int = 1, worker_count: int = 0,
                   augment_options: Mapping[str, Any] | None = None, read_threads: int = 4,
                   prefetch_buffer_size: int = 8):
    """Infinite training batches ``{"image": f32 (B, H, W, C), "label": i32 (B, H, W), "bad_index": i64 (B,)}``
    (numpy; ``bad_index`` is -1, or the index of an example that could not be read or augmented and was
    replaced: see :mod:`rwkvunet_jax.data.bad_examples`).

    ``augment``: a recipe of :mod:`rwkvunet_jax.data.augment` ("synapse", "acdc", "binary", "none");
    ``augment_options`` are passed to it (e.g. ``{"rot_flip": True}`` for synapse). ``worker_count`` > 0
    runs loading and augmentation in that many processes. Returns a grain ``DatasetIterator``
    (``get_state()`` / ``set_state()``, JSON-serialisable states; also usable with
    ``grain.checkpoint.CheckpointSave``).
    """
    import grain

    size = _check_size(image_size)
    if augment not in RECIPES:
        raise ValueError(f"unknown augmentation {augment!r}; expected one of {tuple(RECIPES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                         f"shard_count={shard_count}")
    if len(source) < shard_count:
        raise ValueError(f"{source!r} has fewer examples ({len(source)}) than shards ({shard_count})")

    # Indices are shuffled; ReadAndTransform reads and augments them and replaces an example that fails
    # (rwkvunet_jax.data.bad_examples). Order and random streams equal those of shuffling the source.
    ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(ReadAndTransform(source, _Augment(augment, size, augment_options or {})), seed=seed)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.batch(batch_size, drop_remainder=True)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=prefetch_buffer_size))
    if worker_count > 0:
        allow_worker_processes()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def allow_worker_processes() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` (pytest, notebooks) mark them parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def eval_batches(source, *, image_size: Sequence[int], batch_size: int, image_order: int = 1,
                 pad_last: bool = False) -> Iterator[dict]:
    """Every example once, in order, without augmentation.

    Yields ``{"image": f32 (B, H, W, C), "label": i32 (B, H, W), "valid": bool (B,), "id": list[str],
    "orig_label": list of i32 (h_i, w_i)}``: image resized with ``image_order`` (1 = bilinear), label with
    nearest neighbour, and the labels at their original size for metrics there. The last batch is smaller
    unless ``pad_last`` (then it is zero-padded to ``batch_size``, ``valid`` marks the real rows, and ``id``
    and ``orig_label`` list the real rows only), which keeps one compiled shape.
    """
    size = _check_size(image_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(source), batch_size):
        examples = [source[i] for i in range(start, min(start + batch_size, len(source)))]
        pairs = [resize_pair(ex["image"], ex["label"], size, image_order) for ex in examples]
        images = np.stack([p[0] for p in pairs])
        labels = np.stack([p[1] for p in pairs])
        valid = np.ones(len(examples), bool)
        if pad_last and len(examples) < batch_size:
            pad = batch_size - len(examples)
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,) + labels.shape[1:], labels.dtype)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        yield {"image": images, "label": labels, "valid": valid, "id": [ex["id"] for ex in examples],
               "orig_label": [ex["label"] for ex in examples]}
