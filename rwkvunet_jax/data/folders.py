"""Binary segmentation datasets stored as image and mask files (labels {0, 1}, RGB images in [0, 1]).

Native public layouts supported (``root`` is the folder that holds them):

==============  =================================================================================
busi            ``{benign,malignant,normal}/<name>.png`` + ``<name>_mask.png`` (+ ``<name>_mask_1.png``
                ...: several masks of one image are OR-ed). ``root`` may also be the parent of
                ``Dataset_BUSI_with_GT``. 'normal' (no lesion, empty masks) is included, as in the paper;
                ``include_normal=False`` drops it.
cvc_clinicdb    ``Original/`` + ``Ground Truth/`` (tif or png; also under ``PNG/`` or ``TIF/``).
cvc_colondb     ``images/`` + ``masks/``.
kvasir_seg      ``images/`` + ``masks/`` (jpg masks are thresholded at 128 to undo JPEG noise).
isic2017        ``ISIC-2017_{Training,Validation,Test_v2}_Data/ISIC_<n>.jpg`` +
                ``ISIC-2017_{...}_Part1_GroundTruth/ISIC_<n>_segmentation.png`` (official splits).
glas            ``train_<n>.bmp`` + ``train_<n>_anno.bmp``, ``testA_<n>``/``testB_<n>`` (+ ``_anno``),
                in ``root`` or one folder below it; instance labels become foreground. Test = testA + testB.
folder          generic ``images/`` + ``masks/``, matched by file stem (the mask stem may also carry a
                ``_mask``, ``_segmentation`` or ``_anno`` suffix). Every dataset above falls back to it.
==============  =================================================================================

A pre-split variant ``<root>/{train,val,test}/{images,masks}/`` is used as given when ``<root>/train/images``
exists. Otherwise busi, cvc_clinicdb, cvc_colondb, kvasir_seg and folder are split 8:1:1 by ``split_seed``
(see :mod:`rwkvunet_jax.data.splits`); glas splits its official training set 9:1 into train/val and keeps
its official test set; isic2017 uses its official splits (``split_seed`` unused).

Recipes (``configs/<dataset>.py``): the paper's for the binary datasets (256x256, 300 epochs, batch 8, lr 1e-4
cosine to 1e-5) with our ``binary`` augmentation (neither the paper nor the official code gives one) and no
TTA. The paper (Table 5) reports Dice % for RWKV-UNet / -S / -T: BUSI 81.92 / 80.92 / 79.47, CVC-ClinicDB
95.26 / 95.58 / 95.05, CVC-ColonDB 92.27 / 91.30 / 89.56, Kvasir-SEG 91.26 / 91.78 / 91.26, ISIC 2017
85.32 / 86.38 / 85.59, GlaS 92.35 / 92.11 / 91.96.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rwkvunet_jax.data.base import (SliceSource, binarize_mask, natural_key, read_mask, read_rgb, require_dir,
                                    require_nonempty)
from rwkvunet_jax.data.splits import SPLITS, ratio_split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
MASK_STEM_SUFFIXES = ("", "_mask", "_segmentation", "_anno", "_Segmentation")


@dataclass(frozen=True)
class Pair:
    """One image with its mask file(s)."""

    id: str
    image: Path
    masks: tuple[Path, ...]


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def _missing_mask(image: Path, where: Path) -> FileNotFoundError:
    return FileNotFoundError(f"image without mask: {image} (no matching mask in {where})")


def match_by_stem(image_dir: Path, mask_dir: Path, id_prefix: str = "") -> list[Pair]:
    """Pairs every image in ``image_dir`` with the mask of the same stem (or stem + a known suffix)."""
    image_dir = require_dir(image_dir, "image folder")
    mask_dir = require_dir(mask_dir, "mask folder")
    masks = {p.stem: p for p in _image_files(mask_dir)}
    pairs = []
    for image in _image_files(image_dir):
        mask = next((masks[image.stem + s] for s in MASK_STEM_SUFFIXES if image.stem + s in masks), None)
        if mask is None:
            raise _missing_mask(image, mask_dir)
        pairs.append(Pair(id_prefix + image.stem, image, (mask,)))
    require_nonempty(pairs, image_dir, "images")
    return pairs


# ----------------------------------------------------------------------------- native layouts


def _generic(root: Path) -> list[Pair]:
    return match_by_stem(root / "images", root / "masks")


def _clinicdb(root: Path) -> list[Pair]:
    for images, masks in (("Original", "Ground Truth"), ("PNG/Original", "PNG/Ground Truth"),
                          ("TIF/Original", "TIF/Ground Truth")):
        if (root / images).is_dir():
            return match_by_stem(root / images, root / masks)
    return _generic(root)


_BUSI_MASK = re.compile(r"^(.*)_mask(?:_\d+)?$")


def _busi(root: Path, include_normal: bool = True) -> list[Pair]:
    if not (root / "benign").is_dir() and (root / "Dataset_BUSI_with_GT").is_dir():
        root = root / "Dataset_BUSI_with_GT"
    categories = ("benign", "malignant") + (("normal",) if include_normal else ())
    if not any((root / c).is_dir() for c in categories):
        if (root / "images").is_dir():
            return _generic(root)
        raise FileNotFoundError(f"BUSI folders {categories} not found in {root}")
    pairs = []
    for category in categories:
        folder = require_dir(root / category, "BUSI category folder")
        masks: dict[str, list[Path]] = {}
        images = []
        for path in _image_files(folder):
            match = _BUSI_MASK.match(path.stem)
            if match:
                masks.setdefault(match.group(1), []).append(path)
            else:
                images.append(path)
        for image in images:
            if image.stem not in masks:
                raise _missing_mask(image, folder)
            pairs.append(Pair(f"{category}/{image.stem}", image, tuple(masks[image.stem])))
    require_nonempty(pairs, root, "BUSI images")
    return pairs


_GLAS_IMAGE = re.compile(r"^(train|testA|testB)_\d+$")


def _glas_folder(root: Path) -> Path | None:
    for folder in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if any(folder.glob("train_*_anno.bmp")):
            return folder
    return None


def _glas(root: Path) -> dict[str, list[Pair]]:
    folder = _glas_folder(root)
    if folder is None:
        raise FileNotFoundError(f"GlaS files train_<n>.bmp + train_<n>_anno.bmp not found in {root} "
                                "or the folders directly below it")
    pools: dict[str, list[Pair]] = {"train": [], "test": []}
    for image in sorted(folder.glob("*.bmp"), key=lambda p: natural_key(p.name)):
        if not _GLAS_IMAGE.match(image.stem):
            continue
        mask = image.with_name(image.stem + "_anno.bmp")
        if not mask.is_file():
            raise _missing_mask(image, folder)
        pools["train" if image.stem.startswith("train") else "test"].append(Pair(image.stem, image, (mask,)))
    for name, pool in pools.items():
        require_nonempty(pool, folder, f"GlaS {name} images")
    return pools


_ISIC_DIRS = {"train": "Training", "val": "Validation", "test": "Test_v2"}


def _isic2017(root: Path, split: str) -> list[Pair]:
    part = _ISIC_DIRS[split]
    image_dir = root / f"ISIC-2017_{part}_Data"
    mask_dir = root / f"ISIC-2017_{part}_Part1_GroundTruth"
    require_dir(image_dir, f"ISIC 2017 {split} images")
    require_dir(mask_dir, f"ISIC 2017 {split} masks")
    pairs = []
    for image in sorted(image_dir.glob("ISIC_*.jpg"), key=lambda p: natural_key(p.name)):
        mask = mask_dir / f"{image.stem}_segmentation.png"
        if not mask.is_file():
            raise _missing_mask(image, mask_dir)
        pairs.append(Pair(image.stem, image, (mask,)))
    require_nonempty(pairs, image_dir, "ISIC_*.jpg images")
    return pairs


# ----------------------------------------------------------------------------- source


BINARY_DATASETS = ("busi", "cvc_clinicdb", "cvc_colondb", "kvasir_seg", "isic2017", "glas", "folder")
_RATIO_SPLIT = {"busi": _busi, "cvc_clinicdb": _clinicdb, "cvc_colondb": _generic, "kvasir_seg": _generic,
                "folder": _generic}


class FolderSource(SliceSource):
    """Image/mask file pairs of one split; labels {0, 1}."""

    def __init__(self, dataset: str, root: Path, split: str, pairs: Sequence[Pair], *,
                 split_seed: int | None, mask_rule: str = "auto"):
        self.dataset, self.root, self.split, self.split_seed = dataset, Path(root), split, split_seed
        self.pairs = list(pairs)
        self.mask_rule = mask_rule
        self._ids = [p.id for p in self.pairs]

    @property
    def ids(self) -> list[str]:
        return self._ids

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self.pairs[index]
        image = read_rgb(pair.image)
        label = np.zeros(image.shape[:2], np.int32)
        for path in pair.masks:
            mask = read_mask(path)
            if mask.shape != label.shape:
                raise ValueError(f"mask {path} has size {mask.shape}, its image {pair.image} has {label.shape}")
            label |= binarize_mask(mask, self.mask_rule)
        return image, label

    def describe(self, index: int) -> str:
        pair = self.pairs[index]
        return f"{pair.image} (masks {', '.join(str(m) for m in pair.masks)})"


def folder_source(dataset: str, root: str | Path, split: str, *, split_seed: int = 0,
                  fractions: Sequence[float] = (0.8, 0.1, 0.1), val_fraction: float = 0.1,
                  include_normal: bool = True) -> FolderSource:
    """The ``split`` of a binary dataset (see the module docstring for layouts and splits).

    ``fractions``: train/val/test fractions of the 8:1:1 datasets. ``val_fraction``: GlaS's share of its
    official training set used for validation. ``include_normal``: keep BUSI's lesion-free 'normal' images.
    """
    if dataset not in BINARY_DATASETS:
        raise ValueError(f"unknown binary dataset {dataset!r}; expected one of {BINARY_DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = require_dir(Path(root), f"{dataset} root")
    mask_rule = "nonzero" if dataset == "glas" else "auto"

    if (root / "train" / "images").is_dir():  # pre-split generic layout
        pairs = match_by_stem(root / split / "images", root / split / "masks")
        return FolderSource(dataset, root, split, pairs, split_seed=None, mask_rule=mask_rule)
    if dataset == "isic2017":
        return FolderSource(dataset, root, split, _isic2017(root, split), split_seed=None)
    if dataset == "glas":
        pools = _glas(root)
        if split == "test":
            return FolderSource(dataset, root, split, pools["test"], split_seed=None, mask_rule=mask_rule)
        keep = ratio_split(len(pools["train"]), split, split_seed=split_seed,
                           fractions=(1.0 - val_fraction, val_fraction, 0.0))
        require_nonempty(keep, root, f"GlaS {split} examples (val fraction {val_fraction})")
        return FolderSource(dataset, root, split, [pools["train"][i] for i in keep], split_seed=split_seed,
                            mask_rule=mask_rule)

    pairs = _busi(root, include_normal) if dataset == "busi" else _RATIO_SPLIT[dataset](root)
    keep = ratio_split(len(pairs), split, split_seed=split_seed, fractions=fractions)
    require_nonempty(keep, root, f"{split} examples (split {tuple(fractions)} of {len(pairs)} images)")
    return FolderSource(dataset, root, split, [pairs[i] for i in keep], split_seed=split_seed)
