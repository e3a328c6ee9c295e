"""Input pipelines: the one grain training iterator (infinite, resumable, sharded) and plain eval batches.

Training order (grain ``MapDataset``, lazy and random-access), for every task::

    indices -> shuffle(seed) -> repeat(forever, reshuffled every epoch) -> read + transform(seed)
            -> every shard_count-th element from shard_index -> batch(drop_remainder)
            -> [batch_transform] -> prefetch (threads, or worker processes) -> iterator

The shuffle and the transform seeds cover the global stream and each host keeps every
``shard_count``-th element of it, so hosts see disjoint examples within an epoch, no example is dropped,
the global batch at step k is the same whatever the number of hosts, and every position has its own
augmentation randomness. An iterator state (``it.get_state()``) restores into a fresh iterator built
with the same arguments (``it.set_state(state)``, or grain's Orbax handler) and continues with the exact
next batch, with or without worker processes. The transforms: :class:`~rwkvunet_jax.data.augment.RecipeTransform`
(segmentation recipes) and :class:`~rwkvunet_jax.data.imagenet.TrainTransform` (ImageNet). An example that
cannot be read or transformed is logged and replaced by another one chosen from its index alone
(:mod:`rwkvunet_jax.data.bad_examples`); every batch says which under ``"bad_index"``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from rwkvunet_jax.data.augment import check_size, resize_pair
from rwkvunet_jax.data.bad_examples import ReadAndTransform


def train_iterator(source, transform, *, batch_size: int, seed: int, shard_index: int = 0, shard_count: int = 1,
                   batch_transform: Any = None, worker_count: int = 0, read_threads: int = 4,
                   prefetch_buffer_size: int = 8):
    """Infinite training batches of ``transform(example, rng)`` outputs for shard ``shard_index`` (numpy),
    plus ``"bad_index"`` int64 (B,): -1, or the index of an example that could not be read or transformed
    and was replaced (see :mod:`rwkvunet_jax.data.bad_examples`).

    ``transform`` and ``batch_transform`` are picklable grain random maps ``(x, np.random.Generator) -> x``;
    ``batch_transform`` (e.g. Mixup/CutMix) acts on whole batches, seeded per shard so that hosts draw
    their own coefficients. ``worker_count`` > 0 runs reading and transforms in that many processes
    (-1: one per CPU core minus two, see :func:`auto_worker_count`). Returns a grain ``DatasetIterator``
    (``get_state()`` / ``set_state()``, JSON states; also saved by ``grain.checkpoint.CheckpointSave``).
    """
    import grain

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                         f"shard_count={shard_count}")
    if len(source) < shard_count * batch_size:
        raise ValueError(f"{source!r} has {len(source)} examples, fewer than one global batch "
                         f"({shard_count} x {batch_size})")
    # Indices, not examples, are shuffled: ReadAndTransform reads and transforms them and replaces an example
    # that fails. The order and the random stream of every position equal those of shuffling the source.
    ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(ReadAndTransform(source, transform), seed=seed)
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    ds = ds.batch(batch_size, drop_remainder=True)
    if batch_transform is not None:
        ds = ds.random_map(batch_transform, seed=seed * 7919 + shard_index + 1)
    return prefetched(ds, read_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size,
                      worker_count=worker_count)


def prefetched(ds, *, read_threads: int, prefetch_buffer_size: int, worker_count: int = 0):
    """An iterator over grain ``MapDataset`` ``ds``, read ahead by threads, or by worker processes when
    ``worker_count`` is not 0 (see :func:`auto_worker_count`)."""
    import grain

    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
    workers = auto_worker_count(worker_count)
    if workers > 0:
        allow_worker_processes()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(iter_ds)


def auto_worker_count(requested: int) -> int:
    """``requested`` if >= 0, else one worker per CPU core of this host minus two (at least 1)."""
    if requested >= 0:
        return int(requested)
    return max(1, (os.cpu_count() or 2) - 2)


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
    size = check_size(image_size)
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
