"""Synapse multi-organ CT in the TransUNet layout (9 classes: background + 8 organs).

Supported layout (the standard preprocessed release; HU clipped to [-125, 275] and scaled to [0, 1])::

    <root>/train_npz/<case>_slice<NNN>.npz       arrays 'image' (H, W) float, 'label' (H, W) 0..8
    <root>/test_vol_h5/<case>.npy.h5             datasets 'image', 'label' of shape (D, H, W)
    <list_dir>/train.txt, <list_dir>/test_vol.txt  one name per line (e.g. case0031_slice000, case0001)

TransUNet keeps ``lists/lists_Synapse/{train,test_vol}.txt`` beside its code, not beside the data: pass
that folder as ``list_dir`` (``--config.data.list_dir``). Without it, the first of ``<root>/lists_Synapse``,
``<root>/lists/lists_Synapse``, ``<root>/lists`` and ``<root>`` that holds the list file is used; without
any list file every ``*.npz`` / ``*.npy.h5`` file of the split folder is used, with a
:class:`MissingListWarning` (the release's folders hold exactly the listed cases, but a copy with extra
files would silently change the split). Splits: ``train`` (slices) and ``test`` (12 volumes in the
paper); the official recipe has no validation split.
The same reader serves the phantom dataset, whose layout adds ``val_vol_h5`` and ``val_vol.txt``.

Recipes (``configs/synapse.py``): the default presets follow the paper and the official code of Jan-Feb 2025
(TransUNet's augmentation, cubic resize, horizontal-flip TTA on the logits); ``:<size>,official`` follows the
Oct 2025 code. The paper (Table 3) reports mean DSC / HD95 84.02 % / 15.70 mm for RWKV-UNet, 82.20 / 21.16 for
-S and 81.58 / 17.83 for -T on the 12 test volumes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from rwkvunet_jax.data.base import (H5Volumes, NpzSliceSource, SliceSource, VolumeSliceSource, natural_key,
                                    read_list_file, require_dir, require_file, require_nonempty)

SPLITS = ("train", "test")
_LIST_DIRS = ("lists_Synapse", "lists/lists_Synapse", "lists", ".")


class MissingListWarning(UserWarning):
    """No list file was found: every file of the split folder is used."""


def find_list_file(root: Path, filename: str, list_dir: str | Path | None) -> Path | None:
    """The list file to use: in ``list_dir`` when given (must exist), else searched below ``root``."""
    if list_dir is not None:
        return require_file(Path(list_dir) / filename, "list file")
    for sub in _LIST_DIRS:
        candidate = Path(root) / sub / filename
        if candidate.is_file():
            return candidate
    return None


def _listed_files(folder: Path, list_file: Path | None, suffix: str, dataset: str, list_name: str) -> list[Path]:
    if list_file is None:
        files = sorted(folder.glob(f"*{suffix}"), key=lambda p: natural_key(p.name))
        require_nonempty(files, folder, f"{suffix} files")
        warnings.warn(f"{dataset}: no {list_name} found beside the data; using all {len(files)} {suffix} files in "
                      f"{folder}. Set data.list_dir to the folder holding {list_name} (TransUNet: "
                      f"lists/lists_Synapse in its checkout)", MissingListWarning, stacklevel=2)
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
    files = _listed_files(directory, find_list_file(root, list_name, list_dir), ".npz", dataset, list_name)
    return NpzSliceSource(dataset, root, split, files)


def h5_volumes(dataset: str, root: Path, split: str, folder: str, list_name: str,
               list_dir: str | Path | None = None) -> H5Volumes:
    """Volumes ``<root>/<folder>/<name>.npy.h5`` for the names in ``<list_dir>/<list_name>``."""
    root = require_dir(root, f"{dataset} root")
    directory = require_dir(root / folder, f"{dataset} {split} folder")
    files = _listed_files(directory, find_list_file(root, list_name, list_dir), ".npy.h5", dataset, list_name)
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
