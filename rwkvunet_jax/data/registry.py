"""Dataset names -> readers, class counts, channels, network sizes and augmentation recipes."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rwkvunet_jax.data.base import H5Volumes, SliceSource


@dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to know about a dataset before reading it."""

    num_classes: int  # including background
    in_channels: int
    image_size: tuple[int, int]  # the paper's network input size
    augment: str  # the paper-time recipe of rwkvunet_jax.data.augment (what the default configs use)
    splits: tuple[str, ...]
    volumes: tuple[str, ...] = ()  # splits that get_volumes serves


_BINARY = DatasetInfo(2, 3, (256, 256), "binary", ("train", "val", "test"))
INFO: dict[str, DatasetInfo] = {
    "synapse": DatasetInfo(9, 1, (224, 224), "transunet", ("train", "test"), ("test",)),
    "acdc": DatasetInfo(4, 1, (224, 224), "transunet", ("train", "val", "test"), ("train", "val", "test")),
    "busi": _BINARY,
    "cvc_clinicdb": _BINARY,
    "cvc_colondb": _BINARY,
    "kvasir_seg": _BINARY,
    "isic2017": _BINARY,
    "glas": _BINARY,
    # num_classes and image_size are the writer's defaults; pass root= to read a dataset's own values.
    # Phantom organs have no preferred orientation, so the ACDC recipe's rotations and flips are safe and
    # stretch the small training set.
    "phantom": DatasetInfo(5, 1, (64, 64), "acdc", ("train", "val", "test"), ("val", "test")),
    "folder": _BINARY,  # generic images/ + masks/ layout
}
DATASETS: tuple[str, ...] = ("synapse", "acdc", "busi", "cvc_clinicdb", "cvc_colondb", "kvasir_seg", "isic2017",
                             "glas", "phantom")


def info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ValueError for unknown names."""
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS + ('folder',)}")
    return INFO[name]


def num_classes(name: str, root: str | Path | None = None) -> int:
    """Classes including background (a phantom dataset's own count when ``root`` is given)."""
    if name == "phantom" and root is not None:
        from rwkvunet_jax.data.phantom import read_phantom_meta

        return int(read_phantom_meta(root)["num_classes"])
    return info(name).num_classes


def in_channels(name: str) -> int:
    """Image channels of the dataset's examples: 1 for CT/MRI/phantom, 3 for RGB."""
    return info(name).in_channels


def default_image_size(name: str, root: str | Path | None = None) -> tuple[int, int]:
    """The network input size of the paper (224 Synapse/ACDC, 256 binary; the phantom's own size)."""
    if name == "phantom" and root is not None:
        from rwkvunet_jax.data.phantom import read_phantom_meta

        return tuple(int(s) for s in read_phantom_meta(root)["image_size"])
    return info(name).image_size


def default_augment(name: str) -> str:
    """The augmentation recipe for training on ``name``."""
    return info(name).augment


def available_splits(name: str) -> tuple[str, ...]:
    """Splits ``get_source`` accepts for ``name``."""
    return info(name).splits


def _call(fn: Callable, name: str, *args, **options):
    accepted = set(inspect.signature(fn).parameters) - {"dataset", "root", "split"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"dataset {name!r} does not take option(s) {unknown}; it takes {sorted(accepted)}")
    return fn(*args, **options)


def _phantom_source(root: str | Path, split: str, *, list_dir: str | Path | None = None) -> SliceSource:
    from rwkvunet_jax.data.base import VolumeSliceSource
    from rwkvunet_jax.data.synapse import npz_slices

    if split == "train":
        return npz_slices("phantom", Path(root), split, "train_npz", "train.txt", list_dir)
    return VolumeSliceSource("phantom", Path(root), split, _phantom_volumes(root, split, list_dir=list_dir))


def _phantom_volumes(root: str | Path, split: str, *, list_dir: str | Path | None = None) -> H5Volumes:
    from rwkvunet_jax.data.synapse import h5_volumes

    if split not in ("val", "test"):
        raise ValueError(f"phantom volumes exist for splits 'val' and 'test', got {split!r}")
    return h5_volumes("phantom", Path(root), split, f"{split}_vol_h5", f"{split}_vol.txt", list_dir)


def _with_list_dir(options: dict, list_dir: str | Path | None) -> dict:
    # "" and None both mean "look beside the data"; only readers with list files take the option.
    return {**options, "list_dir": list_dir} if list_dir else options


def get_source(name: str, root: str | Path, split: str, *, split_seed: int = 0, list_dir: str | Path | None = None,
               **options) -> SliceSource:
    """The random-access 2-D examples of one split of a dataset.

    ``src[i] -> {"image": f32 (H, W, C), "label": i32 (H, W), "id": str}`` at the native resolution.
    ``split_seed`` picks the random 8:1:1 (9:1 for GlaS) split of the binary datasets; it is ignored by
    datasets with official splits. ``list_dir`` is the folder of the list files (synapse, acdc, phantom;
    None or "" = beside the data, ACDC's patient ranges). ``options`` go to the reader (binary:
    ``fractions``, ``val_fraction`` (glas), ``include_normal`` (busi)). Raises FileNotFoundError for a
    missing root/folder/mask/list, ValueError for an empty split or an unknown name, split or option.
    """
    splits = info(name).splits
    if split not in splits:
        raise ValueError(f"dataset {name!r} has splits {splits}, got {split!r}")
    options = _with_list_dir(options, list_dir)
    if name == "synapse":
        from rwkvunet_jax.data.synapse import synapse_source

        return _call(synapse_source, name, root, split, **options)
    if name == "acdc":
        from rwkvunet_jax.data.acdc import acdc_source

        return _call(acdc_source, name, root, split, **options)
    if name == "phantom":
        return _call(_phantom_source, name, root, split, **options)
    from rwkvunet_jax.data.folders import folder_source

    return _call(folder_source, name, name, root, split, split_seed=split_seed, **options)


def get_volumes(name: str, root: str | Path, split: str, *, list_dir: str | Path | None = None,
                **options) -> Sequence[dict]:
    """Lazily loaded volumes ``{"image": f32 (D, H, W), "label": i32 (D, H, W), "id": str}``.

    synapse: 'test'; acdc: 'train', 'val', 'test'; phantom: 'val', 'test' (stacks of independent images).
    ``list_dir`` as for :func:`get_source`.
    """
    volumes = info(name).volumes
    if split not in volumes:
        raise ValueError(f"dataset {name!r} has volumes for splits {volumes}, got {split!r}")
    options = _with_list_dir(options, list_dir)
    if name == "synapse":
        from rwkvunet_jax.data.synapse import synapse_volumes

        return _call(synapse_volumes, name, root, split, **options)
    if name == "acdc":
        from rwkvunet_jax.data.acdc import acdc_volumes

        return _call(acdc_volumes, name, root, split, **options)
    return _call(_phantom_volumes, name, root, split, **options)
