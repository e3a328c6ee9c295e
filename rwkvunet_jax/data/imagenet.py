"""ImageNet-1K input pipelines: tfds ArrayRecord or ImageFolder sources, train and eval transforms.

Sources (random access, picklable, yield ``{"image": uint8 (H, W, 3), "label": int32}``):

* :class:`TfdsSource`: tensorflow-datasets' ``imagenet2012`` prepared as ArrayRecord, read with
  ``tfds.data_source`` (no TensorFlow at run time). Prepare it once with TensorFlow installed
  (``tfds build imagenet2012 --file_format=array_record``, the archives in the manual directory).
* :class:`ImageFolderSource`: ``<root>/<class name>/<image files>``; classes sorted by name.

Training batches come from the one grain builder, :func:`rwkvunet_jax.data.pipeline.train_iterator`,
with :class:`TrainTransform` per image and optionally :class:`~rwkvunet_jax.data.mixup.MixupCutmix` per
batch: every host reads only its own share, and the global batch at step k is the same examples with the
same augmentation however many hosts there are. A file that fails to decode or augment is logged and
replaced by an example chosen from its index alone (:mod:`rwkvunet_jax.data.bad_examples`); CMYK, grey,
palette and alpha images are not failures (:mod:`rwkvunet_jax.data.decode`). Images stay uint8 (the trainer
normalises them on the device with :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`), which keeps
host-to-device traffic small.

Evaluation gives every process the same number of batches (collective steps need that); the padding
rows carry ``valid == False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rwkvunet_jax.data.decode import read_rgb8
from rwkvunet_jax.data.image_ops import (IMAGENET_MEAN, IMAGENET_STD, color_jitter, random_resized_crop,
                                         resize_shorter_and_center_crop)
from rwkvunet_jax.data.pipeline import prefetched
from rwkvunet_jax.data.randaugment import RandAugmentPolicy, rand_augment

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
TFDS_SPLITS = {"train": "train", "val": "validation", "validation": "validation"}

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderSource", "TfdsSource", "make_source", "TrainTransform",
    "EvalTransform", "eval_batches", "num_eval_batches", "write_fake_imagefolder",
]


# ----------------------------------------------------------------------------- sources


def _to_rgb_array(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.uint8)


class ImageFolderSource:
    """``<root>/<class>/<image>`` images, labels = index of the class folder in sorted order.

    ``class_names`` fixes the label order (pass the training split's classes to a validation split);
    a class folder outside it raises ValueError.
    """

    def __init__(self, root: str | Path, *, class_names: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageFolder root not found: {self.root} is not a directory")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"ImageFolder root {self.root} has no class sub-directories")
        self.class_names = tuple(class_names) if class_names is not None else tuple(folders)
        unknown = sorted(set(folders) - set(self.class_names))
        if unknown:
            raise ValueError(f"{self.root} has class folders {unknown[:5]} not among the {len(self.class_names)} "
                             "given class names")
        index = {name: i for i, name in enumerate(self.class_names)}
        files: list[str] = []
        labels: list[int] = []
        for name in folders:
            for path in sorted((self.root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    files.append(str(path.relative_to(self.root)))
                    labels.append(index[name])
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self._files = files
        self._labels = np.asarray(labels, np.int32)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": read_rgb8(self.root / self._files[index]), "label": self._labels[index]}

    def describe(self, index: int) -> str:
        """The file of example ``index`` (for logs of bad examples)."""
        return str(self.root / self._files[index])

    def __repr__(self) -> str:  # grain compares it when restoring an iterator state
        return f"ImageFolderSource(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes})"


class TfdsSource:
    """A tfds ArrayRecord split (``tfds.data_source``), e.g. ``imagenet2012`` ``train`` / ``validation``."""

    def __init__(self, name: str = "imagenet2012", *, split: str, data_dir: str | Path | None = None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as err:
            raise ImportError("reading tfds datasets needs tensorflow-datasets: pip install -e '.[data]'") from err
        self.name, self.split = name, TFDS_SPLITS.get(split, split)
        self.data_dir = None if data_dir is None else str(data_dir)
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise FileNotFoundError(f"tfds data_dir not found: {self.data_dir}")
        try:
            self._source = tfds.data_source(name, split=self.split, data_dir=self.data_dir)
        except Exception as err:  # tfds raises assorted errors for unprepared datasets
            raise FileNotFoundError(
                f"could not open tfds dataset {name!r} split {self.split!r} under data_dir={self.data_dir!r} "
                f"as ArrayRecord (prepare it with: tfds build {name} --file_format=array_record): {err}") from err
        self.num_classes = int(self._source.dataset_info.features["label"].num_classes)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        return {"image": _to_rgb_array(record["image"]), "label": np.int32(record["label"])}

    def describe(self, index: int) -> str:
        """The tfds record of example ``index`` (for logs of bad examples)."""
        return f"tfds {self.name}/{self.split} record {int(index)}"

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, n={len(self)})"


def make_source(kind: str, *, split: str, root: str | Path | None = None, data_dir: str | Path | None = None,
                name: str = "imagenet2012", class_names: Sequence[str] | None = None):
    """``kind="tfds"`` (``name``, ``data_dir``) or ``"imagefolder"`` (``root/<split>/<class>/...``)."""
    if kind == "tfds":
        return TfdsSource(name, split=split, data_dir=data_dir)
    if kind == "imagefolder":
        if root is None:
            raise ValueError("an ImageFolder source needs data.root (the folder holding train/ and val/)")
        return ImageFolderSource(Path(root) / split, class_names=class_names)
    raise ValueError(f"unknown data source {kind!r}; choose 'tfds' or 'imagefolder'")


# ----------------------------------------------------------------------------- transforms


class TrainTransform:
    """Random resized crop, horizontal flip, then RandAugment or colour jitter (a grain random map).

    As in the timm recipe the official run used, colour jitter is skipped when RandAugment is on unless
    ``color_jitter_with_randaugment``; the official config set both, so only RandAugment acted.
    """

    def __init__(self, image_size: int, *, randaugment: str | None = "rand-m9-mstd0.5-inc1",
                 color_jitter: float = 0.4, color_jitter_with_randaugment: bool = False, hflip: float = 0.5,
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 interpolation: str = "random"):
        self.image_size = int(image_size)
        self.policy = RandAugmentPolicy.parse(randaugment) if randaugment else None
        self.color_jitter = float(color_jitter or 0.0)
        if self.policy is not None and not color_jitter_with_randaugment:
            self.color_jitter = 0.0
        self.hflip, self.scale, self.ratio = float(hflip), tuple(scale), tuple(ratio)
        self.interpolation = interpolation

    def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        from PIL import Image

        img = Image.fromarray(np.asarray(example["image"], np.uint8))
        img = random_resized_crop(img, self.image_size, rng, scale=self.scale, ratio=self.ratio,
                                  interpolation=self.interpolation)
        if rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.policy is not None:
            img = rand_augment(img, rng, self.policy)
        if self.color_jitter > 0:
            img = color_jitter(img, rng, self.color_jitter)
        return {"image": np.asarray(img, np.uint8), "label": np.int32(example["label"])}

    def __repr__(self) -> str:
        return (f"TrainTransform(size={self.image_size}, policy={self.policy}, jitter={self.color_jitter}, "
                f"hflip={self.hflip}, scale={self.scale}, ratio={self.ratio}, interp={self.interpolation!r})")


class EvalTransform:
    """Shorter side to ``image_size / crop_pct`` (bicubic), central ``image_size`` crop."""

    def __init__(self, image_size: int, *, crop_pct: float = 0.875, interpolation: str = "bicubic"):
        self.image_size, self.crop_pct, self.interpolation = int(image_size), float(crop_pct), interpolation

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        from PIL import Image

        img = Image.fromarray(np.asarray(example["image"], np.uint8))
        img = resize_shorter_and_center_crop(img, self.image_size, crop_pct=self.crop_pct,
                                             interpolation=self.interpolation)
        out = {"image": np.asarray(img, np.uint8), "label": np.int32(example["label"])}
        if "valid" in example:
            out["valid"] = np.bool_(example["valid"])
        return out

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.image_size}, crop_pct={self.crop_pct}, interp={self.interpolation!r})"


# ----------------------------------------------------------------------------- pipelines


class _PaddedShard:
    """This process's share ``index::count`` of a source, padded to ``length`` with flagged repeats."""

    def __init__(self, source, process_index: int, process_count: int, length: int):
        self.source, self.length = source, int(length)
        self.indices = np.arange(process_index, len(source), process_count)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        valid = i < len(self.indices)
        example = self.source[int(self.indices[i if valid else 0])]
        return {**example, "valid": valid}

    def __repr__(self) -> str:
        return f"_PaddedShard({self.source!r}, n={len(self.indices)}, length={self.length})"


def num_eval_batches(num_examples: int, local_batch: int, process_count: int = 1) -> int:
    """Batches each process runs so that every example is seen once (the same count on every process)."""
    return max(1, math.ceil(math.ceil(num_examples / process_count) / local_batch))


def eval_batches(source, *, image_size: int, local_batch: int, crop_pct: float = 0.875, process_index: int = 0,
                 process_count: int = 1, worker_count: int = 0, interpolation: str = "bicubic"
                 ) -> Iterator[dict[str, np.ndarray]]:
    """Every example once: ``{"image": uint8 (b, S, S, 3), "label": int32 (b,), "valid": bool (b,)}``.

    Process ``p`` gets examples ``p, p + P, ...``; all processes yield :func:`num_eval_batches` batches.
    """
    import grain

    if len(source) == 0:
        raise ValueError(f"{source!r} is empty")
    batches = num_eval_batches(len(source), local_batch, process_count)
    shard = _PaddedShard(source, process_index, process_count, batches * local_batch)
    ds = grain.MapDataset.source(shard).map(EvalTransform(image_size, crop_pct=crop_pct,
                                                          interpolation=interpolation))
    return prefetched(ds.batch(local_batch), read_threads=2, prefetch_buffer_size=2, worker_count=worker_count)


# ----------------------------------------------------------------------------- fake data


def write_fake_imagefolder(root: str | Path, *, num_classes: int = 10, train_per_class: int = 24,
                           val_per_class: int = 6, min_size: int = 36, max_size: int = 72, seed: int = 0,
                           image_format: str = "JPEG") -> Path:
    """Writes ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``: a learnable toy ImageNet.

    Each class has its own colour and stripe orientation; sizes vary between ``min_size`` and
    ``max_size`` so cropping and resizing matter. Returns ``root``. Existing files are left alone when
    the folder is already complete (a marker file records the arguments).
    """
    from PIL import Image

    root = Path(root)
    marker = root / ".fake_imagefolder"
    signature = f"{num_classes},{train_per_class},{val_per_class},{min_size},{max_size},{seed},{image_format}"
    if marker.exists() and marker.read_text() == signature:
        return root
    if num_classes < 2 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("need num_classes >= 2 and at least one train and one val image per class")
    rng = np.random.default_rng(seed)
    suffix = ".png" if image_format.upper() == "PNG" else ".jpg"
    for c in range(num_classes):
        hue = c / num_classes
        base = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)]) * 200 + 28
        angle = math.pi * c / num_classes
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
                yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
                stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / 8.0))
                image = base[None, None, :] * (0.75 + 0.25 * stripes[..., None])
                image += rng.normal(0.0, 12.0, size=(h, w, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                    folder / f"{split}_{c}_{i:04d}{suffix}", format=image_format)
    marker.write_text(signature)
    return root
