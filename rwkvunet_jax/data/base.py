"""Random-access slice sources and the file checks every reader shares.

A *slice source* is what grain reads: ``len(src)`` and ``src[i] -> {"image", "label", "id"}`` with
``image`` float32 (H, W, C), ``label`` int32 (H, W) and ``id`` a str. Sources hold paths only (no open
files), so they pickle into grain worker processes, and their ``repr`` names the dataset, root, split,
split seed and size, because grain compares it when an iterator state is restored.

h5py and Pillow are imported inside the readers, so importing this module needs numpy alone.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Example = dict[str, Any]


# ----------------------------------------------------------------------------- checks


def require_dir(path: Path, what: str) -> Path:
    """Returns ``path`` if it is a directory, else raises FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path} is not a directory")
    return path


def require_file(path: Path, what: str) -> Path:
    """Returns ``path`` if it is a file, else raises FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_nonempty(items: Sequence, where: Path | str, what: str) -> None:
    """Raises ValueError naming ``where`` when a dataset split has no examples."""
    if len(items) == 0:
        raise ValueError(f"empty dataset: no {what} in {where}")


def natural_key(text: str) -> list:
    """Sort key that orders 'img2' before 'img10', so listings are stable and human-ordered."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def read_list_file(path: Path) -> list[str]:
    """Non-empty, stripped lines of a list file (TransUNet ``lists_Synapse/*.txt`` style)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    return [line for line in lines if line]


# ----------------------------------------------------------------------------- readers


def as_label(array: np.ndarray) -> np.ndarray:
    """Label map as int32; float label files (Synapse npz) are rounded, not truncated."""
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(array)
    return array.astype(np.int32)


def read_npz_slice(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image float32 (H, W), label int32 (H, W)) from a TransUNet ``.npz`` slice (safe in many reader
    threads at once, unlike ``np.load``: see :mod:`rwkvunet_jax.data.npyio`)."""
    from rwkvunet_jax.data.npyio import read_npz

    arrays = read_npz(path, ("image", "label"))
    return np.asarray(arrays["image"], np.float32), as_label(arrays["label"])


def read_h5(path: Path, index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label int32) from an h5 file with datasets ``image`` and ``label``.

    ``index`` reads one slice along the first axis of a volume without loading the rest.
    """
    import h5py

    with h5py.File(path, "r") as f:
        if "image" not in f or "label" not in f:
            raise ValueError(f"{path}: expected datasets 'image' and 'label', found {sorted(f.keys())}")
        sel = () if index is None else (int(index),)
        return np.asarray(f["image"][sel], np.float32), as_label(f["label"][sel])


def h5_depth(path: Path) -> int:
    """Number of slices (first axis) of the ``image`` volume in an h5 file."""
    import h5py

    with h5py.File(path, "r") as f:
        if "image" not in f or "label" not in f:
            raise ValueError(f"{path}: expected datasets 'image' and 'label', found {sorted(f.keys())}")
        shape, label_shape = f["image"].shape, f["label"].shape
    if len(shape) != 3 or shape != label_shape:
        raise ValueError(f"{path}: expected 3-D image and label of equal shape, got {shape} and {label_shape}")
    return int(shape[0])


def read_rgb(path: Path) -> np.ndarray:
    """An image file as float32 (H, W, 3) in [0, 1]; any mode (grey, palette, alpha, CMYK, 16-bit grey)
    becomes RGB as :mod:`rwkvunet_jax.data.decode` describes."""
    from rwkvunet_jax.data.decode import read_rgb8

    return read_rgb8(path).astype(np.float32) / 255.0


def read_mask(path: Path) -> np.ndarray:
    """A mask file as a 2-D integer array; colour masks are reduced by their channel maximum.

    Converting colour masks to grey would turn a pure red mask (255, 0, 0) into 76; the maximum keeps 255.
    """
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img)
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1)
    return array


def binarize_mask(mask: np.ndarray, rule: str = "auto") -> np.ndarray:
    """Binary label {0, 1} int32.

    ``"auto"``: 8-bit masks saved as 0/255 (JPEG masks carry compression noise) are thresholded at 128,
    masks whose maximum is 1 at 0. ``"nonzero"``: every non-zero value is foreground (instance maps).
    """
    mask = np.asarray(mask)
    if rule == "nonzero":
        return (mask > 0).astype(np.int32)
    if rule != "auto":
        raise ValueError(f"unknown mask rule {rule!r}; expected 'auto' or 'nonzero'")
    threshold = 127 if mask.size and mask.max() > 1 else 0
    return (mask > threshold).astype(np.int32)


# ----------------------------------------------------------------------------- sources


class SliceSource(abc.ABC):
    """Random-access 2-D examples: ``src[i] -> {"image": (H, W, C) f32, "label": (H, W) i32, "id": str}``."""

    dataset: str
    root: Path
    split: str
    split_seed: int | None = None

    @property
    @abc.abstractmethod
    def ids(self) -> list[str]:
        """Example ids, in index order."""

    @abc.abstractmethod
    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W) or (H, W, C), label (H, W)) of example ``index``."""

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        index %= len(self)
        image, label = self.load(index)
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{self.dataset} example {self.ids[index]!r}: image {image.shape} and label {label.shape} differ in size"
            )
        return {"image": np.ascontiguousarray(image, np.float32), "label": label.astype(np.int32),
                "id": self.ids[index]}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def describe(self, index: int) -> str:
        """Example ``index``'s id and where it is stored (for logs of bad examples)."""
        return self.ids[index]

    def __repr__(self) -> str:
        seed = "" if self.split_seed is None else f", split_seed={self.split_seed}"
        return (f"{type(self).__name__}(dataset={self.dataset!r}, root={str(self.root)!r}, "
                f"split={self.split!r}{seed}, n={len(self)})")


class FileSliceSource(SliceSource):
    """One file per 2-D example, read by the subclass's ``read`` function."""

    read: Callable[[Path], tuple[np.ndarray, np.ndarray]]

    def __init__(self, dataset: str, root: Path, split: str, files: Sequence[Path]):
        self.dataset, self.root, self.split = dataset, Path(root), split
        self.files = [Path(f) for f in files]
        self._ids = [f.stem for f in self.files]

    @property
    def ids(self) -> list[str]:
        return self._ids

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return type(self).read(self.files[index])

    def describe(self, index: int) -> str:
        return str(self.files[index])


class NpzSliceSource(FileSliceSource):
    """TransUNet-style 2-D slices: one ``<name>.npz`` (image, label) per list entry."""

    read = staticmethod(read_npz_slice)


class H5SliceSource(FileSliceSource):
    """2-D h5 slices (SSL4MIS ACDC ``*_slice_Z.h5``): one file per example."""

    read = staticmethod(read_h5)


class VolumeSliceSource(SliceSource):
    """The axial slices of h5 volumes (D, H, W), one example per slice; ids ``<volume>_slice<NNN>``."""

    def __init__(self, dataset: str, root: Path, split: str, volumes: "H5Volumes"):
        self.dataset, self.root, self.split = dataset, Path(root), split
        self.volumes = volumes
        self.index = [(v, z) for v, path in enumerate(volumes.files) for z in range(h5_depth(path))]
        self._ids = [f"{volumes.ids[v]}_slice{z:03d}" for v, z in self.index]

    @property
    def ids(self) -> list[str]:
        return self._ids

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        volume, z = self.index[index]
        return read_h5(self.volumes.files[volume], z)

    def describe(self, index: int) -> str:
        volume, z = self.index[index]
        return f"{self.volumes.files[volume]} slice {z}"


class H5Volumes(Sequence):
    """Lazily loaded 3-D volumes: ``vols[i] -> {"image": f32 (D, H, W), "label": i32 (D, H, W), "id"}``."""

    def __init__(self, dataset: str, files: Iterable[Path], ids: Iterable[str] | None = None):
        self.dataset = dataset
        self.files = [Path(f) for f in files]
        self.ids = list(ids) if ids is not None else [volume_id(f) for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        image, label = read_h5(self.files[index])
        if image.ndim != 3 or image.shape != label.shape:
            raise ValueError(f"{self.files[index]}: expected 3-D image and label of equal shape, "
                             f"got {image.shape} and {label.shape}")
        return {"image": image, "label": label, "id": self.ids[index]}

    def __repr__(self) -> str:
        return f"H5Volumes(dataset={self.dataset!r}, n={len(self)})"


def volume_id(path: Path) -> str:
    """'case0001' for 'case0001.npy.h5', 'patient001_frame01' for 'patient001_frame01.h5'."""
    name = Path(path).name
    for suffix in (".npy.h5", ".h5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem
