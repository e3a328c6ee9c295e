"""Synapse multi-organ CT in the TransUNet layout (9 classes: background + 8 organs).

Supported layout (the standard preprocessed release; HU clipped to [-125, 275] and scaled to [0, 1])::

    <root>/train_npz/<case>_slice<NNN>.npz       arrays 'image' (H, W) float, 'label' (H, W) 0..8
    <root>/test_vol_h5/<case>.npy.h5             datasets 'image', 'label' of shape (D, H, W)
    <list_dir>/train.txt, <list_dir>/test_vol.txt  one name per line (e.g. case0031_slice000, case0001)

``list_dir`` defaults to the first of ``<root>/lists_Synapse``, ``<root>/lists/lists_Synapse``,
``<root>/lists`` and ``<root>`` that holds the list file. Without any list file every ``*.npz`` /
``*.npy.h5`` file of the split folder is used (logged). Splits: ``train`` (slices) and ``test``
(12 volumes in the paper); the official recipe has no validation split.
The same reader serves the phantom dataset, whose layout adds ``val_vol_h5`` and ``val_vol.txt``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rwkvunet_jax.data.base import (H5Volumes, NpzSliceSource, SliceSource, VolumeSliceSource, natural_key,
                                    read_list_file, require_dir, require_file, require_nonempty)

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
_LIST_DIRS = ("lists_Synapse", "lists/lists_Synapse", "lists", ".")


def find_list_file(root: Path, filename: str, list_dir: str | Path | None) -> Path | None:
    """The list file to use: in ``list_dir`` when given (must exist), else searched below ``root``."""
    if list_dir is not None:
        return require_file(Path(list_dir) / filename, "list file")
    for sub in _LIST_DIRS:
        candidate = Path(root) / sub / filename
        if candidate.is_file():
            return candidate
    return None


def _listed_files(folder: Path, list_file: Path | None, suffix: str, dataset: str) -> list[Path]:
    if list_file is None:
        files = sorted(folder.glob(f"*{suffix}"), key=lambda p: natural_key(p.name))
        log.info("%s: no list file found, using all %d %s files in %s", dataset, len(files), suffix, folder)
        require_nonempty(files, folder, f"{suffix} files")
        return files
    names = read_list_file(list_file)
    require_nonempty(names, list_file, "names")
    files = [folder / (name if name.endswith(suffix) else name + suffix) for name in names]
    for f in files:
        require_file(f, f"{dataset} file listed in {list_file}")
    return files


def npz_slices(dataset: str, root: Path, split: str, folder: str, list_name: str,
               list_dir: str | Path | None = None) -> NpzSliceSource:
    """Slices ``<root>/<folder>/<name>.npz`` for the names in ``<list_dir>/<list_name>``."""
    root = require_dir(root, f"{dataset} root")
    directory = require_dir(root / folder, f"{dataset} {split} folder")
    files = _listed_files(directory, find_list_file(root, list_name, list_dir), ".npz", dataset)
    return NpzSliceSource(dataset, root, split, files)


def h5_volumes(dataset: str, root: Path, split: str, folder: str, list_name: str,
               list_dir: str | Path | None = None) -> H5Volumes:
    """Volumes ``<root>/<folder>/<name>.npy.h5`` for the names in ``<list_dir>/<list_name>``."""
    root = require_dir(root, f"{dataset} root")
    directory = require_dir(root / folder, f"{dataset} {split} folder")
    files = _listed_files(directory, find_list_file(root, list_name, list_dir), ".npy.h5", dataset)
    return H5Volumes(dataset, files)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"synapse has splits {SPLITS} (the official recipe has no validation split), got {split!r}")


def synapse_source(root: str | Path, split: str, *, list_dir: str | Path | None = None) -> SliceSource:
    """Train slices (npz) or the slices of the test volumes."""
    _check_split(split)
    if split == "train":
        return npz_slices("synapse", Path(root), split, "train_npz", "train.txt", list_dir)
    return VolumeSliceSource("synapse", Path(root), split, synapse_volumes(root, split, list_dir=list_dir))


def synapse_volumes(root: str | Path, split: str, *, list_dir: str | Path | None = None) -> H5Volumes:
    """The test volumes (``split='test'``)."""
    _check_split(split)
    if split != "test":
        raise ValueError("synapse volumes exist for split 'test' only (training data are 2-D npz slices)")
    return h5_volumes("synapse", Path(root), split, "test_vol_h5", "test_vol.txt", list_dir)
