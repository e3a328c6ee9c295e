"""ACDC cardiac MRI in the SSL4MIS layout (4 classes: background, RV, myocardium, LV).

Supported layout (``root`` may be the ``ACDC`` folder or its parent)::

    <root>/ACDC_training_slices/patientXXX_frameYY_slice_Z.h5   'image' (H, W) float, 'label' (H, W) 0..3
    <root>/ACDC_training_volumes/patientXXX_frameYY.h5          'image', 'label' of shape (D, H, W)

Splits by patient id, as the official trainer: 1-20 test, 21-30 val, 31-100 train. Train examples are the
2-D slice files; val/test examples are the slices of the volumes (the official protocol evaluates volumes).
Files are matched by their patient id, no list files are needed. ``list_dir`` (``--config.data.list_dir``)
switches to SSL4MIS-style list files instead: ``train_slices.list`` (slice names, e.g.
``patient031_frame01_slice_0``), ``val.list`` and ``test.list`` (volume names, e.g. ``patient001_frame01``),
``.txt`` accepted too; every listed file must exist.

Recipes (``configs/acdc.py``): the default presets follow the paper and the official code of Jan-Feb 2025
(TransUNet's augmentation with a nearest resize, cosine to 0 over the run, horizontal-flip TTA on the logits);
``:<size>,feb2025`` keeps that code's learning rate literally (T_max = 150 iterations) and ``:<size>,official``
follows the Oct 2025 code. The paper (Table 4) reports mean DSC 92.17 % (RV 90.86, Myo 88.72, LV 96.92) for
RWKV-UNet, 91.64 % for -S and 90.92 % for -T.
"""

from __future__ import annotations

import re
from pathlib import Path

from rwkvunet_jax.data.base import (H5SliceSource, H5Volumes, SliceSource, VolumeSliceSource, natural_key,
                                    read_list_file, require_dir, require_file, require_nonempty)

PATIENTS = {"test": range(1, 21), "val": range(21, 31), "train": range(31, 101)}
SLICES_DIR, VOLUMES_DIR = "ACDC_training_slices", "ACDC_training_volumes"
_PATIENT = re.compile(r"patient(\d+)_")
LIST_NAMES = {"train": "train_slices", "val": "val", "test": "test"}  # SSL4MIS list files


def _resolve_root(root: str | Path) -> Path:
    root = require_dir(Path(root), "ACDC root")
    if not (root / SLICES_DIR).is_dir() and not (root / VOLUMES_DIR).is_dir() and (root / "ACDC").is_dir():
        return root / "ACDC"
    return root


def _listed_files(folder: Path, split: str, list_dir: str | Path) -> list[Path]:
    stem = Path(list_dir) / LIST_NAMES[split]
    list_file = next((p for p in (stem.with_suffix(".list"), stem.with_suffix(".txt")) if p.is_file()), None)
    list_file = require_file(list_file or stem.with_suffix(".list"), f"ACDC {split} list file")
    names = read_list_file(list_file)
    require_nonempty(names, list_file, "names")
    return [require_file(folder / (n if n.endswith(".h5") else n + ".h5"), f"ACDC file listed in {list_file}")
            for n in names]


def _patient_files(folder: Path, split: str, list_dir: str | Path | None = None) -> list[Path]:
    if split not in PATIENTS:
        raise ValueError(f"acdc has splits {tuple(PATIENTS)}, got {split!r}")
    folder = require_dir(folder, f"ACDC {split} folder")
    if list_dir is not None:
        return _listed_files(folder, split, list_dir)
    wanted = PATIENTS[split]
    files = []
    for path in folder.glob("*.h5"):
        match = _PATIENT.match(path.name)
        if match and int(match.group(1)) in wanted:
            files.append(path)
    files.sort(key=lambda p: natural_key(p.name))
    require_nonempty(files, folder, f"h5 files of patients {wanted.start}-{wanted.stop - 1} ({split} split)")
    return files


def acdc_volumes(root: str | Path, split: str, *, list_dir: str | Path | None = None) -> H5Volumes:
    """The (D, H, W) volumes of the split's patients (ED and ES frames), or of ``list_dir``'s list."""
    root = _resolve_root(root)
    return H5Volumes("acdc", _patient_files(root / VOLUMES_DIR, split, list_dir))


def acdc_source(root: str | Path, split: str, *, list_dir: str | Path | None = None) -> SliceSource:
    """Train: the 2-D slice files of patients 31-100; val/test: the slices of the split's volumes
    (the files of ``list_dir``'s lists instead when given)."""
    resolved = _resolve_root(root)
    if split == "train":
        return H5SliceSource("acdc", resolved, split, _patient_files(resolved / SLICES_DIR, split, list_dir))
    return VolumeSliceSource("acdc", resolved, split, acdc_volumes(resolved, split, list_dir=list_dir))
